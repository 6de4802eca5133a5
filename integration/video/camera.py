"""Plucker-ray camera conditioning as LingBot-World prepares it (upstream ``wan/utils/cam_utils.py``).

Poses are camera-to-world, OpenCV axes (x right, y down, z forward). ``relative_camera`` makes a
session's latent-frame poses relative to its first frame, then frame to frame (each pose relative to
the previous latent frame), with translations scaled by their largest norm, as upstream does before
computing rays. ``plucker_rays`` gives every pixel of the 8x latent grid the ray ``(origin, direction)``
(upstream's channel order); ``camera_tokens`` folds 8x8 pixels into each latent pixel (384 channels,
ordered (ray channel, dy, dx)) and patchifies like the latents (features (channel, ph, pw)).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["PIXELS_PER_LATENT", "relative_camera", "plucker_rays", "camera_tokens", "default_intrinsics"]

PIXELS_PER_LATENT = 8  # the Wan VAE's spatial stride


def relative_camera(poses, framewise: bool = True, normalize: bool = True) -> np.ndarray:
    """poses: [L, 4, 4] camera-to-world -> [L, 4, 4] float64: relative to frame 0 (frame 0 = identity),
    then (``framewise``) frame i relative to frame i-1, translations divided by their largest norm
    when it is > 0 (``normalize``)."""
    arr = np.asarray(poses, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (4, 4):
        raise ValueError(f"poses: expected [L, 4, 4], got {list(arr.shape)}")
    rel = np.linalg.inv(arr[0]) @ arr
    rel[0] = np.eye(4)
    if framewise and len(rel) > 1:
        rel[1:] = np.linalg.inv(rel[:-1]) @ rel[1:]
    if normalize:
        norm = np.linalg.norm(rel[:, :3, 3], axis=-1).max()
        if norm > 0:
            rel[:, :3, 3] /= norm
    return rel


def default_intrinsics(height: int, width: int, fov_degrees: float) -> torch.Tensor:
    """[4] (fx, fy, cx, cy) in pixels of a pinhole with horizontal field of view ``fov_degrees``."""
    f = (width / 2) / math.tan(math.radians(fov_degrees) / 2)
    return torch.tensor([f, f, width / 2, height / 2])


def plucker_rays(c2w: torch.Tensor, height: int, width: int, intrinsics: torch.Tensor) -> torch.Tensor:
    """c2w: [B, F, 4, 4]; intrinsics: [B, 4] (fx, fy, cx, cy) pixels. Returns [B, F, height, width, 6] fp32
    ``(origin, direction)`` per pixel, directions unit length, pixel centres at +0.5."""
    if c2w.dim() != 4 or tuple(c2w.shape[-2:]) != (4, 4):
        raise ValueError(f"c2w: expected [B, F, 4, 4] camera-to-world poses, got shape {tuple(c2w.shape)}")
    if not torch.isfinite(c2w).all():
        raise ValueError("c2w: poses contain NaN or Inf")
    c2w = c2w.float()
    dev = c2w.device
    k = intrinsics.to(dev).float()
    fx, fy, cx, cy = (k[:, i, None, None] for i in range(4))  # each [B, 1, 1]
    v, u = torch.meshgrid(torch.arange(height, device=dev, dtype=torch.float32) + 0.5,
                          torch.arange(width, device=dev, dtype=torch.float32) + 0.5, indexing="ij")
    dirs = torch.stack(((u - cx) / fx, (v - cy) / fy, torch.ones_like(u).expand_as((u - cx) / fx)), dim=-1)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)  # [B, H, W, 3] camera frame
    d = torch.einsum("bfij,bhwj->bfhwi", c2w[..., :3, :3], dirs)
    o = c2w[..., :3, 3][:, :, None, None, :].expand_as(d)
    return torch.cat((o, d), dim=-1)


def camera_tokens(c2w: torch.Tensor, latent_height: int, latent_width: int, patch_size: tuple[int, int, int],
                  intrinsics: torch.Tensor | None = None, fov_degrees: float = 90.0) -> torch.Tensor:
    """c2w: [B, F, 4, 4] -> [B, F * gh * gw, 6 * 64 * ph * pw] fp32 ray features per token (frame-major)."""
    s = PIXELS_PER_LATENT
    b, f = c2w.shape[:2]
    h, w = latent_height * s, latent_width * s
    if intrinsics is None:
        intrinsics = default_intrinsics(h, w, fov_degrees).expand(b, 4)
    rays = plucker_rays(c2w, h, w, intrinsics)  # [B, F, H, W, 6]
    rays = rays.view(b, f, latent_height, s, latent_width, s, 6).permute(0, 1, 2, 4, 6, 3, 5)
    rays = rays.reshape(b, f, latent_height, latent_width, 6 * s * s)  # channel = (ray c, dy, dx)
    _, ph, pw = patch_size
    x = rays.view(b, f, latent_height // ph, ph, latent_width // pw, pw, 6 * s * s)
    x = x.permute(0, 1, 2, 4, 6, 3, 5)  # [B, F, gh, gw, C, ph, pw]
    return x.reshape(b, f * (latent_height // ph) * (latent_width // pw), -1)
