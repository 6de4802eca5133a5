"""Key layouts of published Wan-family checkpoints, converted to the upstream (Wan original) layout
that this backend's models use.

- ``wan``: the upstream layout (Wan2.1/2.2, Self-Forcing, CausVid, Matrix-Game-2.0, LingBot-World):
  ``blocks.{i}.self_attn.q.weight``, ``blocks.{i}.norm3.*``, ``head.head.*``, ``img_emb.proj.*``...
- ``diffusers``: the layout diffusers' ``WanTransformer3DModel`` and FastVideo's published
  ``*-Diffusers`` repositories use (``blocks.{i}.attn1.to_q``, ``condition_embedder.*``,
  ``scale_shift_table``, ``proj_out``; diffusers' ``norm2`` is Wan's ``norm3``), and the module names of
  FastVideo's in-memory models (``blocks.{i}.to_q``, ``ffn.fc_in``, ``self_attn_residual_norm.norm``,
  ``time_modulation.linear``, ``patch_embedding.proj``), so a state dict saved from FastVideo loads too.
  Keys that no rule matches (e.g. Matrix-Game-2's ``blocks.{i}.action_model.*``) keep their names.
"""
from __future__ import annotations

import re

__all__ = ["LAYOUTS", "detect_layout", "to_wan_key", "convert_keys"]

LAYOUTS = ("auto", "wan", "diffusers")

_B = r"^blocks\.(\d+)\."
# (pattern, replacement) applied in order; the first match wins
_DIFFUSERS_TO_WAN: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^patch_embedding\.proj\.", "patch_embedding."),
        (r"^condition_embedder\.time_embedder\.(?:linear_1|mlp\.fc_in)\.", "time_embedding.0."),
        (r"^condition_embedder\.time_embedder\.(?:linear_2|mlp\.fc_out)\.", "time_embedding.2."),
        (r"^condition_embedder\.time_(?:proj|modulation\.linear)\.", "time_projection.1."),
        (r"^condition_embedder\.text_embedder\.(?:linear_1|fc_in)\.", "text_embedding.0."),
        (r"^condition_embedder\.text_embedder\.(?:linear_2|fc_out)\.", "text_embedding.2."),
        (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
        (r"^condition_embedder\.image_embedder\.ff\.(?:net\.0\.proj|fc_in)\.", "img_emb.proj.1."),
        (r"^condition_embedder\.image_embedder\.ff\.(?:net\.2|fc_out)\.", "img_emb.proj.3."),
        (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
        (_B + r"attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
        (_B + r"attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
        (_B + r"attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
        (_B + r"to_([qkv])\.", r"blocks.\1.self_attn.\2."),  # FastVideo: self-attention on the block
        (_B + r"to_out\.", r"blocks.\1.self_attn.o."),
        (_B + r"norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
        (_B + r"attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
        (_B + r"attn2\.to_out\.(?:0\.)?", r"blocks.\1.cross_attn.o."),
        (_B + r"attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
        (_B + r"attn2\.add_k_proj\.", r"blocks.\1.cross_attn.k_img."),
        (_B + r"attn2\.add_v_proj\.", r"blocks.\1.cross_attn.v_img."),
        (_B + r"attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
        (_B + r"(?:norm2|self_attn_residual_norm\.norm)\.", r"blocks.\1.norm3."),
        (_B + r"ffn\.(?:net\.0\.proj|fc_in)\.", r"blocks.\1.ffn.0."),
        (_B + r"ffn\.(?:net\.2|fc_out)\.", r"blocks.\1.ffn.2."),
        (_B + r"scale_shift_table$", r"blocks.\1.modulation"),
        (r"^scale_shift_table$", "head.modulation"),
        (r"^proj_out\.", "head.head."),
    )
)
# names only the diffusers / FastVideo layouts have
_DIFFUSERS_MARKERS = re.compile(r"(^condition_embedder\.|\.attn1\.|\.attn2\.|scale_shift_table|^proj_out\.|\.to_q\.)")


def detect_layout(keys) -> str:
    """``"diffusers"`` if any key is in the diffusers / FastVideo layout, else ``"wan"``."""
    return "diffusers" if any(_DIFFUSERS_MARKERS.search(k) for k in keys) else "wan"


def to_wan_key(key: str, layout: str) -> str:
    """One key of ``layout`` (``wan`` or ``diffusers``) in the upstream Wan layout."""
    if layout == "wan":
        return key
    if layout != "diffusers":
        raise ValueError(f"checkpoint layout {layout!r}: choose one of {list(LAYOUTS)}")
    for pattern, repl in _DIFFUSERS_TO_WAN:
        new, n = pattern.subn(repl, key, count=1)
        if n:
            return new
    return key


def convert_keys(keys, layout: str = "auto") -> tuple[dict[str, str], str]:
    """Map checkpoint keys to Wan keys: returns ({wan key: checkpoint key}, the layout used).

    Raises ``ValueError`` if two checkpoint keys land on one Wan key (a checkpoint mixing layouts)."""
    keys = list(keys)
    if layout not in LAYOUTS:
        raise ValueError(f"checkpoint layout {layout!r}: choose one of {list(LAYOUTS)}")
    used = detect_layout(keys) if layout == "auto" else layout
    out: dict[str, str] = {}
    for k in keys:
        w = to_wan_key(k, used)
        if w in out:
            raise ValueError(f"checkpoint keys {out[w]!r} and {k!r} both map to {w!r} ({used} layout): mixed layouts")
        out[w] = k
    return out, used
