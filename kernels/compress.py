"""World Compression on the GPU: novelty scores and the gather of kept tokens into a staging buffer.

At store time (the clean pass, per layer or for all layers at once) a chunk's keys are scored
against the anchor-frame centroid, the most novel tokens are selected, and the kept K and V rows
are gathered into one contiguous staging buffer ``[L, 2, T', H, D]`` that goes to the host in a
single copy. The scoring and the gather are Triton kernels; selection is a sort on the scores
(``worldkv_connector.compression.select_kept``, shared with the CPU path so both keep the same
tokens). ``worldkv_connector.compression`` is the torch reference of this whole module.
"""
from __future__ import annotations

import os

import torch

from worldkv_connector.checks import check_int
from worldkv_connector.compression import select_kept
from worldkv_connector.config import kept_tokens_per_chunk

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference in worldkv_connector.compression still works
    triton = tl = None

__all__ = ["novelty_scores_triton", "gather_rows_triton", "compress_chunk_kernel"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_EPS = 1e-12  # same guard as the reference: all-zero keys score 0 instead of NaN


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_kernel_tensor(name: str, t: torch.Tensor, rank: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != rank:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a {rank}-d tensor, got {shape}")
    if t.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"{name}: the Triton kernel needs a cuda tensor (or TRITON_INTERPRET=1), got {t.device}; "
            "use worldkv_connector.compression on the CPU"
        )
    if triton is None:
        raise RuntimeError("this kernel needs triton; use worldkv_connector.compression instead")


def _check_rows(name: str, t: torch.Tensor) -> None:
    """Each token's [H, D] must be one contiguous row of H*D elements (the kernels address it flat)."""
    h, d = t.shape[-2], t.shape[-1]
    if (t.stride(-1) != 1 and d > 1) or (t.stride(-2) != d and h > 1):
        raise ValueError(f"{name}: expected contiguous [H, D] rows (strides (..., {d}, 1)), got strides {t.stride()}")


@_jit
def _centroid_kernel(k_ptr, c_ptr, frame_tokens, row, s_l, s_t, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program: one layer, BLOCK_C flattened channels; mean over the anchor frame's tokens.
    layer = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < row
    acc = tl.zeros([BLOCK_C], tl.float32)
    base = k_ptr + layer.to(tl.int64) * s_l
    for start in range(0, frame_tokens, BLOCK_T):
        tok = start + tl.arange(0, BLOCK_T)
        mask = (tok < frame_tokens)[:, None] & col_ok[None, :]
        x = tl.load(base + tok[:, None] * s_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x, 0)
    tl.store(c_ptr + layer * row + cols, acc / frame_tokens, mask=col_ok)


@_jit
def _novelty_kernel(
    k_ptr, c_ptr, out_ptr, frame_tokens, n_rest, row, s_l, s_t, eps,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: one layer, BLOCK_T non-anchor tokens; cosine to the centroid over H*D channels.
    layer = tl.program_id(0)
    rest = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = rest < n_rest
    base = k_ptr + layer.to(tl.int64) * s_l + (rest + frame_tokens)[:, None] * s_t
    dots = tl.zeros([BLOCK_T], tl.float32)
    norms = tl.zeros([BLOCK_T], tl.float32)
    c_norm = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, row, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < row
        c = tl.load(c_ptr + layer * row + cols, mask=col_ok, other=0.0)
        x = tl.load(base + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        dots += tl.sum(x * c[None, :], 1)
        norms += tl.sum(x * x, 1)
        c_norm += c * c
    denom = tl.sqrt(norms) * tl.sqrt(tl.sum(c_norm, 0))
    tl.store(out_ptr + layer * n_rest + rest, dots / tl.maximum(denom, eps), mask=tok_ok)


def novelty_scores_triton(k: torch.Tensor, frame_tokens: int) -> torch.Tensor:
    """Cosine similarity of each non-anchor key to the anchor-frame centroid (lower = more novel).

    k: [L, T, H, D], bf16/fp16/fp32, cuda (or cpu under ``TRITON_INTERPRET=1``), contiguous [H, D]
    rows; T a positive multiple of ``frame_tokens``. Returns [L, T - frame_tokens] fp32 on k's device.
    Same result as ``worldkv_connector.compression.novelty_scores``.
    """
    _check_kernel_tensor("k", k, 4)
    if k.dtype not in _FLOATS:
        raise ValueError(f"k: expected dtype bf16, fp16 or fp32, got {k.dtype}")
    frame_tokens = check_int("frame_tokens", frame_tokens, lo=1)
    num_layers, tokens, heads, head_dim = k.shape
    if tokens < frame_tokens or tokens % frame_tokens:
        raise ValueError(f"k has T={tokens} tokens: expected a positive multiple of frame_tokens={frame_tokens}")
    _check_rows("k", k)
    row, n_rest = heads * head_dim, tokens - frame_tokens
    out = torch.empty(num_layers, n_rest, dtype=torch.float32, device=k.device)
    if out.numel() == 0 or row == 0:
        return out.zero_()
    centroid = torch.empty(num_layers, row, dtype=torch.float32, device=k.device)  # [L, H*D]
    block_c = min(256, triton.next_power_of_2(row))
    _centroid_kernel[(num_layers, triton.cdiv(row, block_c))](
        k, centroid, frame_tokens, row, k.stride(0), k.stride(1), BLOCK_T=32, BLOCK_C=block_c
    )
    block_t = 32
    _novelty_kernel[(num_layers, triton.cdiv(n_rest, block_t))](
        k, centroid, out, frame_tokens, n_rest, row, k.stride(0), k.stride(1), _EPS,
        BLOCK_T=block_t, BLOCK_C=block_c,
    )
    return out


@_jit
def _gather_rows_kernel(
    k_ptr, v_ptr, idx_ptr, out_ptr, n_kept, row,
    sk_l, sk_t, sv_l, sv_t, si_l, so_l, so_kv, so_t,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: one layer, K or V (axis 2), BLOCK_T kept tokens; copies whole H*D rows.
    layer = tl.program_id(0).to(tl.int64)
    dst = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    which = tl.program_id(2)
    tok_ok = dst < n_kept
    src_tok = tl.load(idx_ptr + layer * si_l + dst, mask=tok_ok, other=0).to(tl.int64)
    if which == 0:
        src = k_ptr + layer * sk_l + src_tok[:, None] * sk_t
    else:
        src = v_ptr + layer * sv_l + src_tok[:, None] * sv_t
    out = out_ptr + layer * so_l + which * so_kv + dst[:, None] * so_t
    for start in range(0, row, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = tok_ok[:, None] & (cols < row)[None, :]
        tl.store(out + cols[None, :], tl.load(src + cols[None, :], mask=mask), mask=mask)


def gather_rows_triton(
    k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, *, validate: bool = True
) -> torch.Tensor:
    """Gather kept token rows of K and V into a contiguous staging buffer.

    k, v: [L, T, H, D], same shape/dtype/device (cuda, or cpu under ``TRITON_INTERPRET=1``),
    contiguous [H, D] rows; indices: [L, T'] int32/int64 token ids in [0, T) on k's device;
    out: [L, 2, T', H, D], k's dtype and device, contiguous (``out[:, 0]`` = K, ``out[:, 1]`` = V).
    Returns ``out``. ``validate=False`` skips the id range check (a device synchronization).
    """
    _check_kernel_tensor("k", k, 4)
    _check_kernel_tensor("v", v, 4)
    _check_kernel_tensor("indices", indices, 2)
    _check_kernel_tensor("out", out, 5)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"v: expected shape {tuple(k.shape)} and dtype {k.dtype}, got {tuple(v.shape)} {v.dtype}")
    num_layers, tokens, heads, head_dim = k.shape
    if indices.shape[0] != num_layers or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"indices: expected [L={num_layers}, T'] int32/int64, got {tuple(indices.shape)} {indices.dtype}"
        )
    n_kept = indices.shape[1]
    expected = (num_layers, 2, n_kept, heads, head_dim)
    if tuple(out.shape) != expected or out.dtype != k.dtype:
        raise ValueError(f"out: expected shape {expected} and dtype {k.dtype}, got {tuple(out.shape)} {out.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous staging buffer, got strides {out.stride()}")
    devices = {t.device for t in (k, v, indices, out)}
    if len(devices) != 1:
        raise ValueError(f"k, v, indices and out must share one device, got {sorted(map(str, devices))}")
    _check_rows("k", k)
    _check_rows("v", v)
    if indices.numel() and indices.stride(1) != 1:
        raise ValueError(f"indices: expected a contiguous last dim, got strides {indices.stride()}")
    if validate and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= tokens:
            raise ValueError(f"indices: token ids must lie in [0, {tokens}), got min {lo} max {hi}")
    row = heads * head_dim
    if out.numel() == 0:
        return out
    block_t, block_c = 16, min(256, triton.next_power_of_2(row))
    _gather_rows_kernel[(num_layers, triton.cdiv(n_kept, block_t), 2)](
        k, v, indices, out, n_kept, row,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), indices.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_T=block_t, BLOCK_C=block_c,
    )
    return out


def compress_chunk_kernel(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    frame_tokens: int,
    keep_ratio: float,
    pooled: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress one chunk on the GPU: score, select, gather into a staging buffer.

    k, v: [L, T, H, D], bf16/fp16/fp32, cuda (or cpu under ``TRITON_INTERPRET=1``); T a multiple of
    ``frame_tokens``. out: optional [L, 2, T', H, D] contiguous buffer of k's dtype and device
    (e.g. pooled, reused every step) with ``T' = kept_tokens_per_chunk(frame_tokens, T // frame_tokens,
    keep_ratio)``. Returns ``(staging [L, 2, T', H, D], indices [L, T'] int64)``: the same tokens as
    ``worldkv_connector.compression.compress_chunk``, anchor first, in original order.
    """
    _check_kernel_tensor("k", k, 4)
    frame_tokens = check_int("frame_tokens", frame_tokens, lo=1)
    num_layers, tokens, heads, head_dim = k.shape
    if tokens < frame_tokens or tokens % frame_tokens:
        raise ValueError(f"k has T={tokens} tokens: expected a positive multiple of frame_tokens={frame_tokens}")
    frames = tokens // frame_tokens
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio!r} is out of range: allowed 0 < keep_ratio <= 1")
    kept = kept_tokens_per_chunk(frame_tokens, frames, keep_ratio)
    if kept == tokens:  # nothing pruned: skip the scores, the gather is a straight copy
        indices = torch.arange(tokens, device=k.device, dtype=torch.int64).expand(num_layers, tokens).contiguous()
    else:
        scores = novelty_scores_triton(k, frame_tokens)  # [L, T - ft] fp32
        indices = select_kept(scores, frame_tokens, frames, keep_ratio, pooled)  # [L, T'] int64, sorted
    if out is None:
        out = torch.empty(num_layers, 2, kept, heads, head_dim, dtype=k.dtype, device=k.device)
    # ids come from arange/select_kept and are in range by construction: no synchronizing check
    gather_rows_triton(k, v, indices, out, validate=False)
    return out, indices
