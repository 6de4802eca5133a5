"""Wan-style 3D rotary position embedding (RoPE), shared by the video model, the engine and the
RoPE-delta kernel.

Convention (fixed; keys are cached after RoPE at absolute positions):

- ``head_dim = d`` is split into channel groups temporal ``dt = d - 4*(d//6)``, height
  ``dh = 2*(d//6)`` and width ``dw = 2*(d//6)``, in that order.
- Within a group of size ``g``, channels form adjacent (even, odd) pairs rotated as complex numbers;
  pair ``j`` rotates by ``pos * theta ** (-2*j/g)`` with ``theta = 10000``. ``pos`` is the absolute
  latent frame index for the temporal group and the patch row / column for the other two.

Because rotations compose, ``rotate_temporal(apply_rope(x, f), d) == apply_rope(x, f + d)``: a retrieved
chunk's cached keys can be moved in time without re-encoding (WorldKV's optional RoPE correction).
"""
from __future__ import annotations

import torch

from worldkv_connector.checks import check_int, is_int

__all__ = ["rope_split", "rope_angles", "rope_tables", "apply_rope", "apply_rope_tables", "rotate_temporal", "ROPE_THETA"]

ROPE_THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channel group sizes ``(dt, dh, dw)`` of a head of ``head_dim`` channels (Wan's split)."""
    head_dim = check_int("head_dim", head_dim, lo=2)
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r}: expected an even int >= 2")
    third = head_dim // 6
    return head_dim - 4 * third, 2 * third, 2 * third


def rope_angles(positions: torch.Tensor, group_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotation angles of one channel group.

    positions: [N] int, any device. Returns [N, group_dim // 2] fp32 on the same device;
    entry ``[n, j] = positions[n] * theta ** (-2*j/group_dim)``.
    """
    return _angles64(positions, group_dim, theta).to(torch.float32)


def _angles64(positions: torch.Tensor, group_dim: int, theta: float) -> torch.Tensor:
    """``rope_angles`` in fp64. Angles of late frames are large (thousands of radians), and an fp32
    angle there is off by ~1e-4 rad; cos/sin are taken in fp64 and only their results cast."""
    if group_dim < 0 or group_dim % 2:
        raise ValueError(f"group_dim={group_dim!r}: expected an even int >= 0")
    if positions.dim() != 1:
        raise ValueError(f"positions: expected shape [N], got {tuple(positions.shape)}")
    half = group_dim // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64, device=positions.device) / group_dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def _cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 angles -> fp32 (cos, sin)."""
    return torch.cos(angles).float(), torch.sin(angles).float()


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x: [..., H, 2P]`` (fp32) by angles given as ``cos, sin: [..., 1, P]``."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., H, P, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rope_tables(
    frame_pos: torch.Tensor,
    row_pos: torch.Tensor,
    col_pos: torch.Tensor,
    head_dim: int,
    theta: float = ROPE_THETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables of 3D RoPE, built once per forward and reused by every layer.

    frame_pos: [B, T] int; row_pos, col_pos: [T] int. Returns ``(cos, sin)``, each [B, T, 1, head_dim/2]
    fp32 on frame_pos's device.
    """
    if frame_pos.dim() != 2:
        raise ValueError(f"frame_pos: expected shape [B, T], got {tuple(frame_pos.shape)}")
    b, t = frame_pos.shape
    for name, pos in (("row_pos", row_pos), ("col_pos", col_pos)):
        if tuple(pos.shape) != (t,):
            raise ValueError(f"{name}: expected shape {(t,)}, got {tuple(pos.shape)}")
    dt, dh, dw = rope_split(head_dim)
    dev = frame_pos.device
    ang_t = _angles64(frame_pos.reshape(-1), dt, theta).view(b, t, dt // 2)
    ang_h = _angles64(row_pos.to(dev), dh, theta).expand(b, t, dh // 2)
    ang_w = _angles64(col_pos.to(dev), dw, theta).expand(b, t, dw // 2)
    angles = torch.cat((ang_t, ang_h, ang_w), dim=-1)[:, :, None, :]  # [B, T, 1, D/2]
    return _cos_sin(angles)


def apply_rope_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D], any float dtype; cos, sin: [B, T, 1, D/2] fp32 from ``rope_tables``.
    Computes in fp32; returns x's shape and dtype."""
    if x.dim() != 4 or tuple(cos.shape) != (x.shape[0], x.shape[1], 1, x.shape[3] // 2):
        raise ValueError(f"x {tuple(x.shape)} and rope tables {tuple(cos.shape)} do not match")
    return _rotate_pairs(x.float(), cos.to(x.device), sin.to(x.device)).to(x.dtype)


def apply_rope(
    x: torch.Tensor,
    frame_pos: torch.Tensor,
    row_pos: torch.Tensor,
    col_pos: torch.Tensor,
    theta: float = ROPE_THETA,
) -> torch.Tensor:
    """Apply 3D RoPE at absolute positions.

    x: [B, T, H, D], any float dtype, any device. frame_pos: [B, T] int (latent frame index per token);
    row_pos, col_pos: [T] int (patch row / column per token). Computes in fp32 and returns x's
    shape and dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, T, H, D], got shape {tuple(x.shape)}")
    b, t, _, d = x.shape
    if tuple(frame_pos.shape) != (b, t):
        raise ValueError(f"frame_pos: expected shape {(b, t)}, got {tuple(frame_pos.shape)}")
    cos, sin = rope_tables(frame_pos.to(x.device), row_pos, col_pos, d, theta)
    return apply_rope_tables(x, cos, sin)


def rotate_temporal(k: torch.Tensor, delta: int | torch.Tensor, theta: float = ROPE_THETA) -> torch.Tensor:
    """Shift the temporal RoPE position of already-rotated keys by ``delta`` latent frames.

    k: [..., H, D], any float dtype, any device (e.g. [N, H, D] tokens or [P, page_size, H, D] pages).
    delta: an int, or an int tensor whose shape is a prefix of ``k.shape[:-2]`` (e.g. [N] for
    [N, H, D]: ``delta[i]`` moves ``k[i]``), broadcast over the remaining leading dims.
    Only the temporal channel group changes. Computes in fp32; returns k's shape and dtype.
    This is the torch reference of the RoPE-delta kernel.
    """
    if k.dim() < 2:
        raise ValueError(f"k: expected [..., H, D], got shape {tuple(k.shape)}")
    d = k.shape[-1]
    dt, _, _ = rope_split(d)
    lead = tuple(k.shape[:-2])
    if isinstance(delta, torch.Tensor):
        if delta.dtype.is_floating_point or delta.dtype == torch.bool:
            raise ValueError(f"delta: expected an int tensor, got dtype {delta.dtype}")
        if tuple(delta.shape) != lead[: delta.dim()]:
            raise ValueError(
                f"delta: shape {tuple(delta.shape)} must be a prefix of k's leading dims {lead}"
            )
        flat = delta.reshape(-1).to(k.device)
        ang = _angles64(flat, dt, theta).view(*delta.shape, *([1] * (len(lead) - delta.dim())), 1, dt // 2)
    elif is_int(delta):
        ang = _angles64(torch.tensor([int(delta)], device=k.device), dt, theta).view(*([1] * (len(lead) + 1)), dt // 2)
    else:
        raise ValueError(f"delta: expected an int or an int tensor, got {type(delta).__name__}")
    kf = k.float()
    out = kf.clone()
    out[..., :dt] = _rotate_pairs(kf[..., :dt], *_cos_sin(ang))
    return out.to(k.dtype)
