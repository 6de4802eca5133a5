"""Page gather/scatter: pack the valid tokens of many pages into one contiguous staging buffer.

A transfer made of many small fragments (partial pages of compressed chunks, one page per layer
and K/V) is slow as separate DMA descriptors (DESIGN §2: under ~28 KiB they collapse to a few
GB/s). These kernels pack the valid tokens of many pages into one contiguous buffer (one large
copy to the host follows) and unpack a loaded buffer back into pages.

Layouts: a pool is ``[num_pages, page_size, H, D]``, or with leading plane dims
``[2, num_pages, page_size, H, D]`` (one layer's K and V) or ``[L, 2, num_pages, page_size, H, D]``
(every layer). The staging buffer has the same leading dims followed by ``[N, H, D]`` with
``N = sum(page_lens)``: page ``page_ids[i]`` contributes its first ``page_lens[i]`` tokens at
rows ``[sum(page_lens[:i]), sum(page_lens[:i+1]))`` of every plane.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references still work without triton
    triton = tl = None

__all__ = ["gather_pages", "scatter_pages", "gather_pages_torch", "scatter_pages_torch"]

_MAX_PLANE_DIMS = 2


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_page_args(pool, page_ids, page_lens, buf, validate: bool, scatter: bool) -> int | None:
    """Validate; return N = sum(page_lens) when it was computed (validate or no buffer), else None."""
    if not isinstance(pool, torch.Tensor) or not 4 <= pool.dim() <= 4 + _MAX_PLANE_DIMS:
        shape = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
        raise ValueError(f"pool: expected [..., num_pages, page_size, H, D] with at most 2 leading dims, got {shape}")
    for name, t in (("page_ids", page_ids), ("page_lens", page_lens)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 1-d [P] int32/int64 tensor, got {desc}")
        if t.device != pool.device:
            raise ValueError(f"{name}: expected device {pool.device} (the pool's), got {t.device}")
    if page_ids.shape != page_lens.shape:
        raise ValueError(f"page_lens: expected shape {tuple(page_ids.shape)} (page_ids'), got {tuple(page_lens.shape)}")
    lead, (num_pages, page_size, heads, head_dim) = tuple(pool.shape[:-4]), tuple(pool.shape[-4:])
    total = None
    if validate or buf is None:
        total = int(page_lens.sum()) if page_lens.numel() else 0
    if validate and page_ids.numel():
        lo, hi = int(page_ids.min()), int(page_ids.max())
        if lo < 0 or hi >= num_pages:
            raise ValueError(f"page_ids: expected ids in [0, {num_pages}), got min {lo} max {hi}")
        if int(page_lens.min()) < 0 or int(page_lens.max()) > page_size:
            raise ValueError(f"page_lens: every value must lie in [0, page_size={page_size}]")
        if scatter and torch.unique(page_ids).numel() != page_ids.numel():
            raise ValueError("page_ids: expected distinct ids for a scatter (two writers to one page race)")
    if buf is not None:
        if not isinstance(buf, torch.Tensor) or buf.dim() != pool.dim() - 1:
            shape = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise ValueError(f"staging: expected [*{list(lead)}, N, {heads}, {head_dim}], got {shape}")
        rows = buf.shape[-3] if total is None else total
        expected = (*lead, rows, heads, head_dim)
        if tuple(buf.shape) != expected:
            raise ValueError(f"staging: expected shape {expected} (N = sum(page_lens)), got {tuple(buf.shape)}")
        if buf.dtype != pool.dtype:
            raise ValueError(f"staging: expected dtype {pool.dtype} (the pool's), got {buf.dtype}")
        if buf.device != pool.device:
            raise ValueError(f"staging: expected device {pool.device} (the pool's), got {buf.device}")
    return total


def _check_kernel_layout(pool: torch.Tensor, buf: torch.Tensor) -> None:
    if pool.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"pool: the Triton kernel needs cuda tensors (or TRITON_INTERPRET=1), got {pool.device}; "
            "use gather_pages_torch / scatter_pages_torch on the CPU"
        )
    if triton is None:
        raise RuntimeError("page gather/scatter kernels need triton; use the *_torch references instead")
    for name, t in (("pool", pool), ("staging", buf)):
        h, d = t.shape[-2], t.shape[-1]
        # tokens are copied as flat rows of H*D elements
        if (t.stride(-1) != 1 and d > 1) or (t.stride(-2) != d and h > 1):
            raise ValueError(
                f"{name}: expected contiguous [H, D] rows (strides (..., {d}, 1)), got strides {t.stride()}"
            )


@_jit
def _page_copy_kernel(
    pool_ptr, buf_ptr, ids_ptr, lens_ptr, starts_ptr, n_b, row,
    sp_a, sp_b, sp_page, sp_tok, sb_a, sb_b, sb_tok,
    TO_STAGING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: one listed page (axis 0), BLOCK_T of its tokens (axis 1), one plane (axis 2).
    i = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    plane = tl.program_id(2)
    a = (plane // n_b).to(tl.int64)
    b = (plane % n_b).to(tl.int64)
    n_valid = tl.load(lens_ptr + i)
    page = tl.load(ids_ptr + i).to(tl.int64)
    first = tl.load(starts_ptr + i).to(tl.int64)  # staging row of this page's first token
    tok_ok = tok < n_valid  # never read or write past the page's valid length
    pool_rows = pool_ptr + a * sp_a + b * sp_b + page * sp_page + tok[:, None] * sp_tok
    buf_rows = buf_ptr + a * sb_a + b * sb_b + (first + tok)[:, None] * sb_tok
    for start in range(0, row, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = tok_ok[:, None] & (cols < row)[None, :]
        if TO_STAGING:
            tl.store(buf_rows + cols[None, :], tl.load(pool_rows + cols[None, :], mask=mask), mask=mask)
        else:
            tl.store(pool_rows + cols[None, :], tl.load(buf_rows + cols[None, :], mask=mask), mask=mask)


def _launch(pool: torch.Tensor, buf: torch.Tensor, page_ids, page_lens, to_staging: bool) -> None:
    _check_kernel_layout(pool, buf)
    if page_ids.numel() == 0 or buf.numel() == 0:
        return
    # every layout is addressed as [A, B, num_pages, page_size, H, D] / [A, B, N, H, D];
    # missing leading dims get size 1 and stride 0
    pad = _MAX_PLANE_DIMS - (pool.dim() - 4)
    dims = [1] * pad + list(pool.shape[:-4])
    sp = [0] * pad + list(pool.stride()[:-4])
    sb = [0] * pad + list(buf.stride()[:-3])
    starts = torch.cumsum(page_lens, 0) - page_lens  # exclusive prefix: first staging row per page
    page_size, row = pool.shape[-3], pool.shape[-2] * pool.shape[-1]
    block_t = min(32, max(16, triton.next_power_of_2(page_size)))
    block_c = min(256, triton.next_power_of_2(row))
    grid = (page_ids.shape[0], triton.cdiv(page_size, block_t), dims[0] * dims[1])
    _page_copy_kernel[grid](
        pool, buf, page_ids.contiguous(), page_lens.contiguous(), starts, dims[1], row,
        sp[0], sp[1], pool.stride(-4), pool.stride(-3), sb[0], sb[1], buf.stride(-3),
        TO_STAGING=to_staging, BLOCK_T=block_t, BLOCK_C=block_c,
    )


def gather_pages(
    pool: torch.Tensor,
    page_ids: torch.Tensor,
    page_lens: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Pack the valid tokens of listed pages into a contiguous staging buffer (Triton).

    pool: [num_pages, page_size, H, D], [2, num_pages, page_size, H, D] or
    [L, 2, num_pages, page_size, H, D], any dtype, cuda (or cpu under ``TRITON_INTERPRET=1``),
    contiguous [H, D] rows; page_ids, page_lens: [P] int32/int64 on the pool's device.
    out: optional [*lead, N, H, D] (N = sum(page_lens)), pool's dtype and device. Returns out.
    Allocating ``out`` reads N on the host (a device synchronization); pass ``out`` together with
    ``validate=False`` on a hot path planned once per step.
    """
    total = _check_page_args(pool, page_ids, page_lens, out, validate, scatter=False)
    if out is None:
        out = torch.empty(*pool.shape[:-4], total, *pool.shape[-2:], dtype=pool.dtype, device=pool.device)
    _launch(pool, out, page_ids, page_lens, to_staging=True)
    return out


def scatter_pages(
    staging: torch.Tensor,
    pool: torch.Tensor,
    page_ids: torch.Tensor,
    page_lens: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Unpack a staging buffer into the listed pages (the reverse of :func:`gather_pages`, Triton).

    staging: [*lead, N, H, D]; pool, page_ids, page_lens as in :func:`gather_pages`; page ids distinct.
    Only the first ``page_lens[i]`` tokens of each listed page are written. Returns pool.
    """
    _check_page_args(pool, page_ids, page_lens, staging, validate, scatter=True)
    _launch(pool, staging, page_ids, page_lens, to_staging=False)
    return pool


def _page_token_index(page_ids: torch.Tensor, page_lens: torch.Tensor):
    """(page, token) index pairs of every valid token, in staging order."""
    lens = page_lens.long()
    pages = torch.repeat_interleave(page_ids.long(), lens)
    starts = torch.cumsum(lens, 0) - lens
    toks = torch.arange(int(lens.sum()), device=lens.device) - torch.repeat_interleave(starts, lens)
    return pages, toks


def gather_pages_torch(
    pool: torch.Tensor, page_ids: torch.Tensor, page_lens: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of :func:`gather_pages` (same arguments, any device)."""
    _check_page_args(pool, page_ids, page_lens, out, validate=True, scatter=False)
    pages, toks = _page_token_index(page_ids, page_lens)
    rows = pool[..., pages, toks, :, :]  # rows: [*lead, N, H, D]
    return rows.contiguous() if out is None else out.copy_(rows)


def scatter_pages_torch(
    staging: torch.Tensor, pool: torch.Tensor, page_ids: torch.Tensor, page_lens: torch.Tensor
) -> torch.Tensor:
    """Torch reference of :func:`scatter_pages` (same arguments, any device). Returns pool."""
    _check_page_args(pool, page_ids, page_lens, staging, validate=True, scatter=True)
    pages, toks = _page_token_index(page_ids, page_lens)
    pool[..., pages, toks, :, :] = staging
    return pool
