"""RoPE delta: move retrieved keys in time, in place, inside their pages.

Keys are cached after RoPE at absolute positions. With ``rope_correction`` on, a retrieved chunk is
made to sit just before the recent window by rotating only its temporal RoPE channels by a delta of
``delta`` latent frames (rotations compose, so no re-encoding is needed).

Convention (shared with ``worldkv_connector.rope``): head_dim ``d`` splits into temporal
``dt = d - 4*(d//6)``, height ``2*(d//6)`` and width ``2*(d//6)`` channel groups in that order; in
the temporal group, adjacent (even, odd) channel pairs ``j = 0..dt/2-1`` rotate like complex
numbers by ``delta * 10000 ** (-2*j/dt)``. Angles are computed in fp64 and rounded to fp32 once,
like the reference, so large deltas lose no precision; the rotation runs in fp32.
"""
from __future__ import annotations

import os

import torch

from worldkv_connector.checks import check_int

try:
    import triton
    import triton.language as tl
except ImportError:  # rope_delta_torch still works without triton
    triton = tl = None

__all__ = ["rope_delta_", "rope_delta_torch", "temporal_channels"]

ROPE_THETA = 10000.0


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def temporal_channels(head_dim: int) -> int:
    """Channels of the temporal RoPE group of a ``head_dim``-channel head: ``d - 4*(d//6)``."""
    head_dim = check_int("head_dim", head_dim, lo=2)
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r}: expected an even int >= 2")
    return head_dim - 4 * (head_dim // 6)


def _delta_angles(deltas: torch.Tensor, dt: int) -> torch.Tensor:
    """[P] int frames -> [P, dt/2] fp32 angles (fp64 product, one rounding)."""
    j = torch.arange(dt // 2, dtype=torch.float64, device=deltas.device)
    inv_freq = ROPE_THETA ** (-2.0 * j / dt)
    return (deltas.to(torch.float64)[:, None] * inv_freq[None, :]).to(torch.float32)


def _check_rope_args(k_pool, page_ids, deltas, page_lens, validate: bool) -> None:
    if not isinstance(k_pool, torch.Tensor) or k_pool.dim() not in (4, 5):
        shape = tuple(k_pool.shape) if isinstance(k_pool, torch.Tensor) else type(k_pool).__name__
        raise ValueError(
            f"k_pool: expected [num_pages, page_size, H, D] or [L, num_pages, page_size, H, D], got {shape}"
        )
    if k_pool.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"k_pool: expected dtype bf16, fp16 or fp32, got {k_pool.dtype}")
    temporal_channels(k_pool.shape[-1])  # validates head_dim
    for name, t in (("page_ids", page_ids), ("deltas", deltas), ("page_lens", page_lens)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 1-d [P] tensor, got {shape}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected int32 or int64, got {t.dtype}")
        if t.device != k_pool.device:
            raise ValueError(f"{name}: expected device {k_pool.device} (k_pool's), got {t.device}")
    if not (page_ids.shape == deltas.shape == page_lens.shape):
        raise ValueError(
            f"page_ids/deltas/page_lens: expected equal lengths, got {page_ids.shape[0]}, "
            f"{deltas.shape[0]}, {page_lens.shape[0]}"
        )
    if validate and page_ids.numel():
        num_pages, page_size = k_pool.shape[-4], k_pool.shape[-3]
        lo, hi = int(page_ids.min()), int(page_ids.max())
        if lo < 0 or hi >= num_pages:
            raise ValueError(f"page_ids: expected ids in [0, {num_pages}), got min {lo} max {hi}")
        if int(page_lens.min()) < 0 or int(page_lens.max()) > page_size:
            raise ValueError(f"page_lens: every value must lie in [0, page_size={page_size}]")
        if torch.unique(page_ids).numel() != page_ids.numel():
            raise ValueError("page_ids: expected distinct ids (a page rotated twice in one call is a race)")


@_jit
def _rope_delta_kernel(
    k_ptr, ids_ptr, lens_ptr, ang_ptr, heads,
    s_l, s_p, s_t, s_h,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: one listed page (axis 0), BLOCK_T of its tokens (axis 1), one layer (axis 2);
    # all heads x temporal pairs, BLOCK_C (head, pair) items at a time.
    i = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    layer = tl.program_id(2).to(tl.int64)
    n_valid = tl.load(lens_ptr + i)
    page = tl.load(ids_ptr + i).to(tl.int64)
    tok_ok = tok < n_valid  # never touch tokens past the page's valid length
    base = k_ptr + layer * s_l + page * s_p + tok[:, None] * s_t
    for start in range(0, heads * HALF, BLOCK_C):
        item = start + tl.arange(0, BLOCK_C)
        item_ok = item < heads * HALF
        head = item // HALF
        pair = item % HALF
        theta = tl.load(ang_ptr + i * HALF + pair, mask=item_ok, other=0.0)
        cos = tl.cos(theta)[None, :]
        sin = tl.sin(theta)[None, :]
        mask = tok_ok[:, None] & item_ok[None, :]
        ptr0 = base + (head * s_h + 2 * pair)[None, :]
        x0 = tl.load(ptr0, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(ptr0 + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr0, (x0 * cos - x1 * sin).to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(ptr0 + 1, (x0 * sin + x1 * cos).to(k_ptr.dtype.element_ty), mask=mask)


def rope_delta_(
    k_pool: torch.Tensor,
    page_ids: torch.Tensor,
    deltas: torch.Tensor,
    page_lens: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Rotate the temporal RoPE channels of listed pages' valid tokens by ``deltas`` frames, in place.

    k_pool: [num_pages, page_size, H, D] (or [L, num_pages, page_size, H, D]: every layer at once),
    bf16/fp16/fp32, cuda (or cpu under ``TRITON_INTERPRET=1``), last dim contiguous, D even;
    page_ids, deltas (latent frames, may be negative), page_lens: [P] int32/int64 on k_pool's
    device; page ids distinct. Only the first ``page_lens[i]`` tokens of page ``page_ids[i]`` change.
    Returns ``k_pool``. ``validate=False`` skips the value checks that synchronize with the device.
    """
    _check_rope_args(k_pool, page_ids, deltas, page_lens, validate)
    if k_pool.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"k_pool: the Triton kernel needs a cuda tensor (or TRITON_INTERPRET=1), got {k_pool.device}; "
            "use rope_delta_torch on the CPU"
        )
    if triton is None:
        raise RuntimeError("rope_delta_ needs triton; use rope_delta_torch instead")
    if k_pool.stride(-1) != 1:
        raise ValueError(f"k_pool: expected a contiguous last dim (stride 1), got strides {k_pool.stride()}")
    pool = k_pool if k_pool.dim() == 5 else k_pool.unsqueeze(0)  # [L, num_pages, page_size, H, D]
    num_layers, _, page_size, heads, head_dim = pool.shape
    half = temporal_channels(head_dim) // 2
    if page_ids.numel() == 0 or num_layers == 0 or heads == 0 or half == 0:
        return k_pool
    angles = _delta_angles(deltas, 2 * half).contiguous()  # [P, dt/2] fp32
    block_t = min(64, max(16, triton.next_power_of_2(page_size)))
    block_c = min(128, triton.next_power_of_2(heads * half))
    grid = (page_ids.shape[0], triton.cdiv(page_size, block_t), num_layers)
    _rope_delta_kernel[grid](
        pool, page_ids.contiguous(), page_lens.contiguous(), angles, heads,
        pool.stride(0), pool.stride(1), pool.stride(2), pool.stride(3),
        HALF=half, BLOCK_T=block_t, BLOCK_C=block_c,
    )
    return k_pool


def rope_delta_torch(
    k_pool: torch.Tensor, page_ids: torch.Tensor, deltas: torch.Tensor, page_lens: torch.Tensor
) -> torch.Tensor:
    """Torch reference of :func:`rope_delta_` (same arguments, any device, in place; returns k_pool)."""
    _check_rope_args(k_pool, page_ids, deltas, page_lens, validate=True)
    pool = k_pool if k_pool.dim() == 5 else k_pool.unsqueeze(0)
    dt = temporal_channels(pool.shape[-1])
    angles = _delta_angles(deltas, dt)  # [P, dt/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    for i, (page, n) in enumerate(zip(page_ids.tolist(), page_lens.tolist())):
        x = pool[:, page, :n, :, :dt].float()  # x: [L, n, H, dt]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        rot = torch.stack((x0 * cos[i] - x1 * sin[i], x0 * sin[i] + x1 * cos[i]), dim=-1).flatten(-2)
        pool[:, page, :n, :, :dt] = rot.to(pool.dtype)
    return k_pool
