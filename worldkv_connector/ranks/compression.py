"""World Compression over head-sharded ranks: every rank keeps the same tokens.

The novelty score of a token is the cosine of its key (heads x dims flattened) to the anchor
centroid, so it depends on every head. Each rank holds a head shard ``[L, T, H/N, D]``; it computes
the partial dot products and squared norms over its own dims, the ranks sum them (``all_sum``),
and each rank ranks the same scores with ``compression.select_kept``. The kept ids are therefore
identical on every rank; they equal the unsharded ones up to float summation order (a near-tie
could flip; the ranks still agree with each other, which is what the window needs).
"""
from __future__ import annotations

import torch

from worldkv_connector.compression import _EPS, CompressedChunk, select_kept
from worldkv_connector.ranks.group import RankGroup

__all__ = ["sharded_novelty_scores", "sharded_compress_chunk"]


def sharded_novelty_scores(k_shard: torch.Tensor, frame_tokens: int, group: RankGroup) -> torch.Tensor:
    """k_shard: ``[L, T, H/N, D]`` this rank's heads, any float dtype. Returns the full-head scores
    ``[L, T - frame_tokens]`` fp32 (identical on every rank)."""
    if not isinstance(k_shard, torch.Tensor) or k_shard.ndim != 4 or not k_shard.is_floating_point():
        raise ValueError(f"k_shard must be a float [L, T, H/N, D] tensor, got {getattr(k_shard, 'shape', k_shard)!r}")
    num_layers, tokens = k_shard.shape[:2]
    if tokens < frame_tokens or tokens % frame_tokens:
        raise ValueError(f"k_shard has T={tokens} tokens: expected a positive multiple of frame_tokens={frame_tokens}")
    flat = k_shard.reshape(num_layers, tokens, -1).float()  # [L, T, (H/N)*D]
    anchor_sum = flat[:, :frame_tokens].sum(dim=1, keepdim=True)  # centroid * frame_tokens, this shard's dims
    centroid = anchor_sum / frame_tokens  # [L, 1, (H/N)*D]
    rest = flat[:, frame_tokens:]
    partial = torch.stack([
        (rest * centroid).sum(dim=-1),  # dot products [L, T-ft]
        rest.pow(2).sum(dim=-1),  # squared key norms
        centroid.pow(2).sum(dim=-1).expand(num_layers, rest.shape[1]),  # squared centroid norm
    ])
    dots, k2, c2 = group.all_sum(partial)
    return dots / (k2.sqrt() * c2.sqrt()).clamp_min(_EPS)


def sharded_compress_chunk(k_shard: torch.Tensor, v_shard: torch.Tensor, *, frame_tokens: int, keep_ratio: float,
                           pooled: bool, group: RankGroup) -> CompressedChunk:
    """``compression.compress_chunk`` of one rank's head shard with scores over all heads.
    k_shard, v_shard: ``[L, T, H/N, D]``. Returns this rank's kept ``[L, T', H/N, D]`` and the
    kept ids ``[L, T']`` (the same on every rank)."""
    if k_shard.shape != v_shard.shape:
        raise ValueError(f"k_shard {tuple(k_shard.shape)} and v_shard {tuple(v_shard.shape)} must have the same shape")
    scores = sharded_novelty_scores(k_shard, frame_tokens, group)
    frames = k_shard.shape[1] // frame_tokens
    idx = select_kept(scores, frame_tokens, frames, keep_ratio, pooled)  # [L, T']
    layer_ids = torch.arange(k_shard.shape[0], device=k_shard.device).unsqueeze(1)
    return CompressedChunk(k_shard[layer_ids, idx], v_shard[layer_ids, idx], idx)
