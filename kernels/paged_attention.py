"""Paged attention over a block table with per-page valid lengths.

The window of a chunk is ``[sink | retrieved | recent | current]``: a list of pages per batch row,
each page holding ``page_lens[b, p]`` valid tokens (compressed chunks leave their last page
partial). Attention is non-causal inside the window (the whole chunk attends to the whole window)
and reads pages in place, never concatenating K/V.

This module holds the torch reference (runs everywhere; the video backend's ``torch`` attention
backend). The Triton kernel and its launcher sit above it in this file once written.
"""
from __future__ import annotations

import torch

__all__ = ["paged_attention_torch", "check_paged_attention_args"]


def check_paged_attention_args(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    page_lens: torch.Tensor,
) -> None:
    """Validate shapes, dtypes and devices; raise ``ValueError`` with expected and actual values."""
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, Tq, Hq, D], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"k_pool/v_pool: expected equal shapes [num_pages, page_size, Hkv, D], "
            f"got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    b, _, hq, d = q.shape
    num_pages, page_size, hkv, dk = k_pool.shape
    if dk != d:
        raise ValueError(f"head_dim: q has {d}, k_pool has {dk}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv} (GQA)")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table: expected [B={b}, max_pages], got {tuple(block_table.shape)}")
    if page_lens.shape != block_table.shape:
        raise ValueError(f"page_lens: expected shape {tuple(block_table.shape)}, got {tuple(page_lens.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64) or page_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table/page_lens: expected int32 or int64, got {block_table.dtype}/{page_lens.dtype}")
    if q.dtype != k_pool.dtype or q.dtype != v_pool.dtype:
        raise ValueError(f"dtypes: q {q.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype} must match")
    devices = {t.device for t in (q, k_pool, v_pool, block_table, page_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if block_table.numel():
        lens_ok = bool(((page_lens >= 0) & (page_lens <= page_size)).all())
        if not lens_ok:
            raise ValueError(f"page_lens: every value must lie in [0, page_size={page_size}]")
        used = page_lens > 0
        ids = block_table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
            raise ValueError(
                f"block_table: page ids of pages with valid tokens must lie in [0, {num_pages}), "
                f"got min {int(ids.min())} max {int(ids.max())}"
            )


def paged_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    page_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference paged attention.

    q: [B, Tq, Hq, D]; k_pool, v_pool: [num_pages, page_size, Hkv, D] (same dtype as q, same device);
    block_table: [B, max_pages] int (page ids; entries whose ``page_lens`` is 0 are ignored);
    page_lens: [B, max_pages] int, valid tokens of each page, in [0, page_size].
    Returns [B, Tq, Hq, D] in q's dtype, computed in fp32. A row with no valid token returns zeros.
    """
    check_paged_attention_args(q, k_pool, v_pool, block_table, page_lens)
    b, tq, hq, d = q.shape
    page_size, hkv = k_pool.shape[1], k_pool.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, tq, hq, d, dtype=torch.float32, device=q.device)
    offs = torch.arange(page_size, device=q.device)
    for row in range(b):
        lens = page_lens[row]
        pages = block_table[row][lens > 0].long()
        if pages.numel() == 0:
            continue
        # valid token mask over the gathered pages: [P, page_size]
        mask = offs[None, :] < lens[lens > 0][:, None]
        k = k_pool[pages][mask].float()  # k: [N, Hkv, D]
        v = v_pool[pages][mask].float()
        if hq != hkv:  # GQA: each KV head serves hq // hkv query heads
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("thd,nhd->htn", q[row].float(), k) * scale  # s: [Hq, Tq, N]
        p = torch.softmax(s, dim=-1)
        out[row] = torch.einsum("htn,nhd->thd", p, v)
    return out.to(q.dtype)
