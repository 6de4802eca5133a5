"""What differs between FastVideo's three causal world models, for the adapter.

FastVideo 0.2.1 keeps three copies of the cached causal self-attention (``CausalWanSelfAttention``
in ``causal_wanvideo.py``, ``CausalMatrixGame2SelfAttention`` in ``matrixgame2/causal_model.py``,
``CausalWanSelfAttention`` in ``lingbotworld2/causal_fast.py``), each writing the new chunk's
roped keys into a dense per-layer dict ``{"k", "v": [B, tokens, H, D], "global_end_index",
"local_end_index"}`` and attending to a slice of it. A ``ModelSpec`` says where those modules are,
how a transformer call names its timestep / start / frame tokens, and how to set the window
attributes so the copy attends to the whole dict the adapter fills (no rolling of its own).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ModelSpec", "spec_for", "CallInfo"]


@dataclass
class CallInfo:
    """One transformer call: timestep [B] or [B, F]; current_start in tokens; latent frames of the
    chunk; tokens per latent frame."""

    timestep: torch.Tensor
    current_start: int
    num_frames: int
    frame_tokens: int


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "causal_wan", "matrixgame2" or "lingbot2"
    has_actions: bool

    def attention_modules(self, transformer) -> list[torch.nn.Module]:
        if self.kind == "lingbot2":
            return [b.self_attn for b in transformer.blocks]
        return [b.attn1 for b in transformer.blocks]

    def action_modules(self, transformer) -> list[torch.nn.Module | None]:
        if not self.has_actions:
            return [None] * len(transformer.blocks)
        return [getattr(b, "action_model", None) for b in transformer.blocks]

    def kv_dims(self, transformer) -> tuple[int, int]:
        """(heads, head_dim) of the self-attention K/V."""
        if self.kind == "lingbot2":
            return transformer.num_heads, transformer.dim // transformer.num_heads
        return transformer.num_attention_heads, transformer.attention_head_dim

    def call_info(self, transformer, args: tuple, kwargs: dict) -> CallInfo:
        if self.kind == "lingbot2":
            t = kwargs.get("t", args[2] if len(args) > 2 else kwargs.get("timestep"))
            x = kwargs.get("x")
            latent = x[0] if x is not None else args[0][0]  # [C, F, H, W]
            p = transformer.patch_size
            ft = kwargs.get("frame_seqlen") or (latent.shape[-2] // p[1]) * (latent.shape[-1] // p[2])
            return CallInfo(torch.as_tensor(t), int(kwargs.get("current_start", 0)), latent.shape[1] // p[0], int(ft))
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, C, F, H, W]
        t = args[2] if len(args) > 2 else kwargs["timestep"]
        p = transformer.patch_size
        ft = (hidden.shape[-2] // p[1]) * (hidden.shape[-1] // p[2])
        return CallInfo(torch.as_tensor(t), int(kwargs.get("current_start", 0)), hidden.shape[2] // p[0], ft)

    def open_window(self, transformer, frames: int) -> dict:
        """Let every attention copy (and action module) attend to ``frames`` latent frames of its
        dict without rolling; returns the previous attribute values for ``restore_window``."""
        saved = {}
        mods = [("attn", m) for m in self.attention_modules(transformer)]
        mods += [("action", m) for m in self.action_modules(transformer) if m is not None]
        for i, (_, m) in enumerate(mods):
            saved[i] = (m.local_attn_size, getattr(m, "sink_size", 0))
            m.local_attn_size = frames
            if hasattr(m, "sink_size"):
                m.sink_size = 0
        return saved

    def restore_window(self, transformer, saved: dict) -> None:
        mods = list(self.attention_modules(transformer))
        mods += [m for m in self.action_modules(transformer) if m is not None]
        for i, m in enumerate(mods):
            if i in saved:
                m.local_attn_size, sink = saved[i]
                if hasattr(m, "sink_size"):
                    m.sink_size = sink


_BY_CLASS = {
    "CausalWanTransformer3DModel": ("causal_wan", False),
    "CausalMatrixGame2WanModel": ("matrixgame2", True),
    "LingBotWorld2CausalFastTransformer3DModel": ("lingbot2", False),
}


def spec_for(transformer, model: str = "auto") -> ModelSpec:
    """The spec of a FastVideo transformer (``model`` "auto": from its class name)."""
    name = type(transformer).__name__
    if model == "auto":
        if name not in _BY_CLASS:
            raise ValueError(f"worldkv: FastVideo transformer {name!r} is not supported; supported: "
                             f"{sorted(_BY_CLASS)} (or pass model=...)")
        kind, actions = _BY_CLASS[name]
    else:
        kind = model
        actions = model == "matrixgame2"
    if kind == "lingbot2" and getattr(transformer, "rope_cache_policy", "absolute") != "absolute":
        raise ValueError("worldkv: LingBot-World v2 with a non-absolute RoPE cache policy is not supported")
    if getattr(transformer, "rope_cache_policy", "absolute") != "absolute":
        raise ValueError(f"worldkv: rope_cache_policy={transformer.rope_cache_policy!r}: WorldKV banks keys roped at "
                         "absolute positions; use rope_cache_policy='absolute'")
    return ModelSpec(kind, actions)
