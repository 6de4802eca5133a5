"""Paged attention over a block table with per-page valid lengths.

The window of a chunk is ``[sink | retrieved | recent | current]``: a list of pages per batch row,
each page holding ``page_lens[b, p]`` valid tokens (compressed chunks leave their last page
partial). Attention is non-causal inside the window (the whole chunk attends to the whole window)
and reads pages in place, never concatenating K/V.

``paged_attention`` is the Triton kernel (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); ``paged_attention_torch`` below it is the reference, which runs everywhere
and is the video backend's ``torch`` attention backend.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference and the argument checks still work without triton
    triton = tl = None

__all__ = ["paged_attention", "paged_attention_torch", "check_paged_attention_args", "check_page_values"]


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def check_paged_attention_args(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    page_lens: torch.Tensor,
) -> None:
    """Validate shapes, dtypes and devices, then the table's values (lengths in [0, page_size], page ids
    of non-empty pages in range); raise ``ValueError`` with expected and actual values."""
    _check_arg_structure(q, k_pool, v_pool, block_table, page_lens)
    check_page_values(block_table, page_lens, k_pool.shape[0], k_pool.shape[1])


def _check_arg_structure(q, k_pool, v_pool, block_table, page_lens) -> None:
    """The shape, dtype and device checks of check_paged_attention_args (no tensor values are read)."""
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


def check_page_values(block_table: torch.Tensor, page_lens: torch.Tensor, num_pages: int, page_size: int) -> None:
    """The value checks of check_paged_attention_args (they read the tables: a device sync on CUDA).
    Depend only on the tables and the pool's ``num_pages`` x ``page_size``, so a caller running many
    layers over one step's tables runs them once (``validate=False`` on the later calls)."""
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


@_jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr,
    tq, hq, max_pages, qk_scale,
    sq_b, sq_t, sq_h,
    sk_p, sk_t, sk_h,
    sv_p, sv_t, sv_h,
    sbt_b, sbt_p, sl_b, sl_p,
    so_b, so_t, so_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: one (batch row, query head) and BLOCK_M queries; online softmax over every
    # valid token of every page in the row's block table, BLOCK_N tokens at a time.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // hq
    h = pid_bh % hq
    kvh = h // GROUP  # GQA: GROUP consecutive query heads share one KV head
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < tq
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for p in range(0, max_pages):
        n_valid = tl.load(lens_ptr + b * sl_b + p * sl_p)
        # int64: pools of real models exceed 2**31 elements
        page = tl.load(bt_ptr + b * sbt_b + p * sbt_p).to(tl.int64)
        k_base = k_ptr + page * sk_p + kvh * sk_h
        v_base = v_ptr + page * sv_p + kvh * sv_h
        # zero-length pages run no iteration, so their (possibly invalid) page id is never read
        for start in range(0, n_valid, BLOCK_N):
            tok = start + offs_n
            tok_ok = tok < n_valid  # never read past the page's valid length
            k = tl.load(k_base + tok[:, None] * sk_t + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
            v = tl.load(v_base + tok[:, None] * sv_t + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # s: [BLOCK_M, BLOCK_N], log2 units
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            # every block holds >= 1 valid token, so m_new is finite and exp2(-inf) gives 0 on the first block
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            prob = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(prob, 1)
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
    # a row with no valid token keeps acc == 0 and l_i == 0: it returns zeros, like the reference
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    """Power-of-two block size covering ``n`` within [lo, hi] (tl.dot needs dims >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    page_lens: torch.Tensor,
    scale: float | None = None,
    *,
    validate: bool = True,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged attention (Triton); same semantics as :func:`paged_attention_torch`.

    q: [B, Tq, Hq, D], bf16/fp16/fp32, cuda (or cpu under ``TRITON_INTERPRET=1``), last dim contiguous;
    k_pool, v_pool: [num_pages, page_size, Hkv, D], q's dtype and device, last dim contiguous;
    block_table, page_lens: [B, max_pages] int32/int64 on q's device; D a power of two in [16, 256].
    Returns [B, Tq, Hq, D] in q's dtype (fp32 accumulation). ``validate=False`` skips the value checks
    (page ids in range, lengths in [0, page_size]) that synchronize with the device; use it only
    with a block table already checked once per step.
    """
    if triton is None:
        raise RuntimeError("paged_attention needs triton; use paged_attention_torch instead")
    if logit_bias is not None:
        raise ValueError("paged_attention (Triton): logit_bias is not supported by the kernel yet; "
                         "use attention_backend torch with a merging compression (tempcache)")
    _check_layout(q, k_pool, v_pool, block_table, page_lens)
    if validate:
        check_paged_attention_args(q, k_pool, v_pool, block_table, page_lens)
    b, tq, hq, d = q.shape
    page_size, hkv = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    scale = d**-0.5 if scale is None else float(scale)
    # the interpreter's tl.dot mishandles bf16 (numpy has no bf16): upcast there; on the GPU bf16/fp16
    # feed the tensor cores directly and fp32 keeps full precision ("ieee", not tf32)
    upcast = _interpreting() and q.dtype == torch.bfloat16
    precision = "ieee" if (upcast or q.dtype == torch.float32) else "tf32"
    block_m, block_n = _block(tq), _block(page_size)
    grid = (b * hq, triton.cdiv(tq, block_m))
    _paged_attention_kernel[grid](
        q, k_pool, v_pool, block_table, page_lens, out,
        tq, hq, block_table.shape[1], scale * 1.4426950408889634,  # log2(e): softmax via exp2
        q.stride(0), q.stride(1), q.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        block_table.stride(0), block_table.stride(1), page_lens.stride(0), page_lens.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=upcast, DOT_PRECISION=precision,
    )
    return out


def _check_layout(q, k_pool, v_pool, block_table, page_lens) -> None:
    """Structural checks the kernel relies on (no device synchronization)."""
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name}: expected dtype bf16, fp16 or fp32, got {t.dtype}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: expected a contiguous last dim (stride 1), got strides {t.stride()}")
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim: expected a power of two in [16, 256], got {d}")
    if k_pool.shape != v_pool.shape or k_pool.shape[-1] != d:
        raise ValueError(
            f"k_pool/v_pool: expected equal shapes [num_pages, page_size, Hkv, D={d}], "
            f"got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    if q.shape[2] % k_pool.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k_pool.shape[2]} (GQA)")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0] or page_lens.shape != block_table.shape:
        raise ValueError(
            f"block_table/page_lens: expected [B={q.shape[0]}, max_pages], "
            f"got {tuple(block_table.shape)} and {tuple(page_lens.shape)}"
        )
    for name, t in (("block_table", block_table), ("page_lens", page_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected int32 or int64, got {t.dtype}")
    if q.dtype != k_pool.dtype or q.dtype != v_pool.dtype:
        raise ValueError(f"dtypes: q {q.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype} must match")
    devices = {t.device for t in (q, k_pool, v_pool, block_table, page_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"device: the Triton kernel needs cuda tensors (or TRITON_INTERPRET=1), got {q.device}; "
            "use paged_attention_torch on the CPU"
        )


def paged_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    page_lens: torch.Tensor,
    scale: float | None = None,
    logit_bias: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Reference paged attention.

    q: [B, Tq, Hq, D]; k_pool, v_pool: [num_pages, page_size, Hkv, D] (same dtype as q, same device);
    block_table: [B, max_pages] int (page ids; entries whose ``page_lens`` is 0 are ignored);
    page_lens: [B, max_pages] int, valid tokens of each page, in [0, page_size].
    logit_bias: optional [num_pages, page_size] fp32 added to every query's logit of that slot (a merged
    key's ``log(count)``, compression.tempcache_chunk), same device.
    Returns [B, Tq, Hq, D] in q's dtype, computed in fp32. A row with no valid token returns zeros.
    ``validate=False`` skips the value checks (check_page_values), as in :func:`paged_attention`; use it
    only with tables already checked against this pool's geometry (the engine: once per step).
    """
    if validate:
        check_paged_attention_args(q, k_pool, v_pool, block_table, page_lens)
    else:
        _check_arg_structure(q, k_pool, v_pool, block_table, page_lens)
    if logit_bias is not None and tuple(logit_bias.shape) != tuple(k_pool.shape[:2]):
        raise ValueError(f"logit_bias: expected [num_pages, page_size] = {tuple(k_pool.shape[:2])}, "
                         f"got {tuple(logit_bias.shape)}")
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
        if logit_bias is not None:
            s = s + logit_bias[pages][mask].float()  # [N], broadcast over heads and queries
        p = torch.softmax(s, dim=-1)
        out[row] = torch.einsum("htn,nhd->thd", p, v)
    return out.to(q.dtype)
