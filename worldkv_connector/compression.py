"""World Compression (DESIGN §2): prune the keys of a chunk that duplicate its anchor frame.

Per layer, per chunk. A chunk is ``frames`` latent frames of ``frame_tokens`` tokens each, stored
frame-major. Frame 0 (the anchor) is kept in full. The centroid is the mean anchor key with heads
and head dims flattened; every non-anchor token is scored by the cosine similarity of its
flattened key to that centroid (in fp32), and the ``ceil(keep_ratio * frame_tokens)`` least
similar (most novel) tokens of each non-anchor frame are kept, or, in pooled mode, the
``(frames - 1) * ceil(keep_ratio * frame_tokens)`` least similar non-anchor tokens overall. Kept
tokens stay in their original order; ties break towards the lower index. There is no threshold, so
the number of kept tokens is fixed by the config (``kept_tokens_per_chunk``) and a compressed chunk
always fits the bank slot sized for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worldkv_connector.checks import check_int
from worldkv_connector.registry import Registry

__all__ = [
    "CompressedChunk", "novelty_scores", "select_kept", "compress_chunk", "COMPRESSIONS", "get_compression",
    "correspondence", "tempcache_chunk", "kept_tokens_per_chunk",
]

# Guards the cosine against all-zero keys (e.g. padding): the score becomes 0 instead of NaN.
_EPS = 1e-12


def kept_tokens_per_chunk(frame_tokens: int, frames_per_chunk: int, keep_ratio: float) -> int:
    """Tokens a compressed chunk keeps: the whole anchor frame plus
    ``ceil(keep_ratio * frame_tokens)`` per non-anchor frame (pooled or not, the total is the same)."""
    if keep_ratio >= 1.0:
        return frame_tokens * frames_per_chunk
    per_frame = math.ceil(keep_ratio * frame_tokens)
    return frame_tokens + (frames_per_chunk - 1) * per_frame


@dataclass
class CompressedChunk:
    """The kept part of one chunk.

    ``k``/``v``: ``[L, T', H, D]`` (or ``[T', H, D]`` for unbatched input), the input's dtype and
    device. ``indices``: ``[L, T']`` (or ``[T']``) int64 on the input's device, ascending token ids
    into the uncompressed chunk; the anchor ``0..frame_tokens-1`` always leads.
    """

    k: torch.Tensor
    v: torch.Tensor
    indices: torch.Tensor
    # tokens each kept token stands for, [L, T'] (or [T']) fp32; None: 1 each (pruning, no merge)
    counts: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.k.shape[-3]


def _check_frame_tokens(frame_tokens: int) -> None:
    check_int("frame_tokens", frame_tokens, 1)


def _check_keep_ratio(keep_ratio: float) -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise ValueError(f"keep_ratio={keep_ratio!r}: expected a float in (0, 1]")
    if not (math.isfinite(keep_ratio) and 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio={keep_ratio!r} is out of range: allowed 0 < keep_ratio <= 1")


def novelty_scores(k: torch.Tensor, frame_tokens: int) -> torch.Tensor:
    """Cosine similarity of each non-anchor key to the anchor-frame centroid (lower = more novel).

    k: ``[L, T, H, D]`` or ``[T, H, D]``, any float dtype, any device; T a multiple of
    ``frame_tokens`` and at least one frame.
    Returns ``[L, T - frame_tokens]`` (or ``[T - frame_tokens]``), fp32, on k's device.
    """
    _check_frame_tokens(frame_tokens)
    if not isinstance(k, torch.Tensor) or k.ndim not in (3, 4):
        raise ValueError(f"k must be a [L, T, H, D] or [T, H, D] tensor, got {_describe(k)}")
    if not k.is_floating_point():
        raise ValueError(f"k must have a float dtype, got {k.dtype}")
    unbatched = k.ndim == 3
    kb = k.unsqueeze(0) if unbatched else k
    num_layers, tokens = kb.shape[0], kb.shape[1]
    if tokens < frame_tokens or tokens % frame_tokens:
        raise ValueError(f"k has T={tokens} tokens: expected a positive multiple of frame_tokens={frame_tokens}")
    # flat: [L, T, H*D] fp32 -- the score is defined on heads x dims flattened
    flat = kb.reshape(num_layers, tokens, -1).float()
    centroid = flat[:, :frame_tokens].mean(dim=1, keepdim=True)  # [L, 1, H*D]
    rest = flat[:, frame_tokens:]  # [L, T-ft, H*D]
    dots = (rest * centroid).sum(dim=-1)
    norms = rest.norm(dim=-1) * centroid.norm(dim=-1)
    scores = dots / norms.clamp_min(_EPS)
    return scores[0] if unbatched else scores


def select_kept(
    scores: torch.Tensor, frame_tokens: int, frames: int, keep_ratio: float, pooled: bool
) -> torch.Tensor:
    """Token ids kept per layer, ascending, anchor first.

    scores: ``[L, (frames-1) * frame_tokens]`` (or 1-D), any float dtype, any device, as returned by
    ``novelty_scores``. Returns ``[L, T']`` (or ``[T']``) int64 on scores' device with
    ``T' = kept_tokens_per_chunk(frame_tokens, frames, keep_ratio)``.
    """
    _check_frame_tokens(frame_tokens)
    _check_keep_ratio(keep_ratio)
    check_int("frames", frames, 1)
    if not isinstance(scores, torch.Tensor) or scores.ndim not in (1, 2):
        raise ValueError(f"scores must be a [L, T - frame_tokens] tensor, got {_describe(scores)}")
    unbatched = scores.ndim == 1
    sb = scores.unsqueeze(0) if unbatched else scores
    expected = (frames - 1) * frame_tokens
    if sb.shape[1] != expected:
        raise ValueError(
            f"scores has {sb.shape[1]} tokens per layer: expected (frames - 1) * frame_tokens = {expected}"
        )
    num_layers, device = sb.shape[0], sb.device
    total = frames * frame_tokens
    kept = kept_tokens_per_chunk(frame_tokens, frames, keep_ratio)
    if kept == total:  # identity: nothing to rank
        out = torch.arange(total, device=device, dtype=torch.int64).expand(num_layers, total).contiguous()
        return out[0] if unbatched else out
    per_frame = math.ceil(keep_ratio * frame_tokens)
    if pooled:
        # one shared budget over all non-anchor tokens; stable sort = lower index wins ties
        order = torch.sort(sb, dim=1, stable=True).indices[:, : (frames - 1) * per_frame]
    else:
        framed = sb.reshape(num_layers, frames - 1, frame_tokens)
        order = torch.sort(framed, dim=2, stable=True).indices[:, :, :per_frame]
        offsets = torch.arange(frames - 1, device=device, dtype=torch.int64).view(1, -1, 1) * frame_tokens
        order = (order + offsets).reshape(num_layers, -1)
    rest = torch.sort(order, dim=1).values + frame_tokens  # back to original order, chunk token ids
    anchor = torch.arange(frame_tokens, device=device, dtype=torch.int64).expand(num_layers, frame_tokens)
    out = torch.cat([anchor, rest.to(torch.int64)], dim=1)
    return out[0] if unbatched else out


def compress_chunk(
    k: torch.Tensor, v: torch.Tensor, *, frame_tokens: int, keep_ratio: float, pooled: bool = True
) -> CompressedChunk:
    """Keep the anchor frame and the most novel tokens of one chunk, per layer.

    k, v: ``[L, T, H, D]`` or ``[T, H, D]`` (same shape, dtype and device), any float dtype, CPU or
    CUDA; T a multiple of ``frame_tokens``. Returns a ``CompressedChunk`` whose k/v are new
    contiguous tensors of k's dtype and device with ``T' = kept_tokens_per_chunk(...)`` tokens.
    """
    _check_keep_ratio(keep_ratio)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
            raise ValueError(f"{name} must be a [L, T, H, D] or [T, H, D] tensor, got {_describe(t)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"k and v must share dtype and device, got k {k.dtype}/{k.device} and v {v.dtype}/{v.device}")
    scores = novelty_scores(k, frame_tokens)  # also validates T and the dtype
    unbatched = k.ndim == 3
    kb, vb = (k.unsqueeze(0), v.unsqueeze(0)) if unbatched else (k, v)
    frames = kb.shape[1] // frame_tokens
    idx = select_kept(scores.unsqueeze(0) if unbatched else scores, frame_tokens, frames, keep_ratio, pooled)
    # gather kept tokens per layer: layer_ids [L, 1] broadcasts against idx [L, T']
    layer_ids = torch.arange(kb.shape[0], device=kb.device).unsqueeze(1)
    ck, cv = kb[layer_ids, idx], vb[layer_ids, idx]  # [L, T', H, D]
    if unbatched:
        return CompressedChunk(ck[0], cv[0], idx[0])
    return CompressedChunk(ck, cv, idx)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__


# --- TempCache: merge instead of prune ---------------------------------------------------------------
# After TempCache ("Fast Autoregressive Video Diffusion and World Models with Temporal Cache Compression
# and Sparse Attention", 2026): consecutive frames of a world model repeat most of their content, so the
# keys of frame f mostly duplicate keys of frame f - 1 at a moved position. Each non-anchor token is
# linked to its temporal correspondent: the most similar key (cosine over heads x dims) of the
# previous frame. The budget is the same as novelty pruning (``kept_tokens_per_chunk``): the anchor
# frame plus the tokens least similar to their correspondent are kept; every other token is *merged*
# into the kept token its correspondence chain reaches (its correspondent, or the correspondent's
# representative, back to the anchor frame).
#
# A kept token of a group of ``c`` tokens keeps its own key, takes the mean value of its group, and
# carries ``log c`` as a logit bias in paged attention. Why: the group's share of any query's
# attention is ``sum_i exp(q.k_i) v_i``; for near-duplicate keys (k_i ~ k) that is
# ``exp(q.k + log c) * mean(v_i)``, exactly one key with bias ``log c`` and the mean value, and
# exactly equal when the keys are identical. Pruning drops the ``c - 1`` duplicates' mass, so the
# rest of the window gains weight it never had; merging keeps the mass where it was. The key is not
# averaged because keys carry RoPE at their own positions: averaging rotated keys would blur the
# position the representative key still encodes exactly.


def correspondence(k: torch.Tensor, frame_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal correspondent of every non-anchor token.

    k: [L, T, H, D], any float dtype and device, T a multiple of frame_tokens. Returns
    (similarity [L, T - frame_tokens] fp32, the cosine to the correspondent; target [L, T - frame_tokens]
    int64, the correspondent's token id in the chunk, always in the previous frame).
    """
    num, tokens = k.shape[0], k.shape[1]
    frames = tokens // frame_tokens
    flat = k.reshape(num, frames, frame_tokens, -1).float()
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # [L, F, ft, H*D]
    sim = torch.einsum("lfpc,lfqc->lfpq", unit[:, 1:], unit[:, :-1])  # [L, F-1, ft(cur), ft(prev)]
    best, arg = sim.max(dim=-1)  # ties: the lowest previous-frame index
    prev_base = torch.arange(frames - 1, device=k.device).view(1, -1, 1) * frame_tokens
    return best.reshape(num, -1), (arg + prev_base).reshape(num, -1)


def tempcache_chunk(
    k: torch.Tensor, v: torch.Tensor, *, frame_tokens: int, keep_ratio: float, pooled: bool = True
) -> CompressedChunk:
    """Merge near-duplicate tokens across frames, keeping their attention mass (see above).

    k, v: [L, T, H, D] or [T, H, D] (same shape, dtype, device). Returns a CompressedChunk with the
    same kept-token count as ``compress_chunk`` (equal storage), ``indices`` the representatives'
    ids ascending, ``v`` the group means and ``counts`` [L, T'] fp32 group sizes (sum = T per layer).
    """
    _check_keep_ratio(keep_ratio)
    _check_frame_tokens(frame_tokens)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float [L, T, H, D] or [T, H, D] tensor, got {_describe(t)}")
    if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"k and v must share shape, dtype and device, got k {tuple(k.shape)} {k.dtype} {k.device} "
                         f"and v {tuple(v.shape)} {v.dtype} {v.device}")
    unbatched = k.ndim == 3
    kb, vb = (k.unsqueeze(0), v.unsqueeze(0)) if unbatched else (k, v)
    num, tokens = kb.shape[0], kb.shape[1]
    if tokens < frame_tokens or tokens % frame_tokens:
        raise ValueError(f"k has T={tokens} tokens: expected a positive multiple of frame_tokens={frame_tokens}")
    frames = tokens // frame_tokens
    dev = kb.device
    if kept_tokens_per_chunk(frame_tokens, frames, keep_ratio) == tokens or frames == 1:
        ids = torch.arange(tokens, device=dev).expand(num, tokens).contiguous()
        ones = torch.ones(num, tokens, device=dev)
        out = CompressedChunk(kb.clone(), vb.clone(), ids, ones)
    else:
        sim, target = correspondence(kb, frame_tokens)
        idx = select_kept(sim, frame_tokens, frames, keep_ratio, pooled)  # least similar = most novel kept
        kept = torch.zeros(num, tokens, dtype=torch.bool, device=dev)
        kept.scatter_(1, idx, True)
        rep = torch.arange(tokens, device=dev).expand(num, tokens).clone()  # representative of each token
        for f in range(1, frames):  # frame order: the previous frame's representatives are final
            lo, hi = f * frame_tokens, (f + 1) * frame_tokens
            via = rep.gather(1, target[:, lo - frame_tokens:hi - frame_tokens])
            rep[:, lo:hi] = torch.where(kept[:, lo:hi], rep[:, lo:hi], via)
        counts = torch.zeros(num, tokens, device=dev).scatter_add_(1, rep, torch.ones(num, tokens, device=dev))
        vsum = torch.zeros(vb.shape, dtype=torch.float32, device=dev)
        vsum.scatter_add_(1, rep[:, :, None, None].expand(vb.shape), vb.float())
        layer_ids = torch.arange(num, device=dev).unsqueeze(1)
        c = counts[layer_ids, idx]  # [L, T'] >= 1: every representative is kept
        vm = (vsum[layer_ids, idx] / c[:, :, None, None]).to(vb.dtype)
        out = CompressedChunk(kb[layer_ids, idx], vm, idx, c)
    if unbatched:
        return CompressedChunk(out.k[0], out.v[0], out.indices[0], out.counts[0])
    return out


COMPRESSIONS: Registry = Registry("compression")
COMPRESSIONS.register("novelty")(compress_chunk)
COMPRESSIONS.register("tempcache")(tempcache_chunk)


def get_compression(name: str):
    """The compress function registered as ``name``: ``fn(k, v, *, frame_tokens, keep_ratio, pooled)``
    -> CompressedChunk. Unknown names raise ValueError listing the registered ones."""
    return COMPRESSIONS.get(name)
