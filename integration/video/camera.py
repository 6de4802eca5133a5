"""Plucker-ray camera conditioning (Matrix-Game-2.0 / LingBot-World style camera control).

For every latent pixel, a pinhole camera gives a ray with unit world direction ``d`` and moment
``o x d`` (``o`` = camera centre): 6 channels that describe the ray independently of where along it
the origin sits. They are patchified like the latents and projected per block (``cam_injector``).
Camera convention: OpenCV (x right, y down, z forward), poses are camera-to-world.
"""
from __future__ import annotations

import math

import torch

__all__ = ["plucker_rays", "patchify_rays"]


def plucker_rays(cam: torch.Tensor, height: int, width: int, fov_degrees: float = 90.0) -> torch.Tensor:
    """Plucker rays of each pixel of each frame.

    cam: [B, F, 4, 4] camera-to-world, any float dtype, any device. ``fov_degrees`` is the horizontal
    field of view; pixels are square. Returns [B, F, 6, height, width] fp32 ``(d, o x d)``.
    """
    if cam.dim() != 4 or tuple(cam.shape[-2:]) != (4, 4):
        raise ValueError(f"cam: expected [B, F, 4, 4] camera-to-world poses, got shape {tuple(cam.shape)}")
    if not torch.isfinite(cam).all():
        raise ValueError("cam: poses contain NaN or Inf")
    cam = cam.float()
    dev = cam.device
    focal = (width / 2) / math.tan(math.radians(fov_degrees) / 2)
    # pixel centres relative to the principal point, in focal units
    u = (torch.arange(width, device=dev, dtype=torch.float32) + 0.5 - width / 2) / focal
    v = (torch.arange(height, device=dev, dtype=torch.float32) + 0.5 - height / 2) / focal
    dirs = torch.stack(
        (u[None, :].expand(height, width), v[:, None].expand(height, width), torch.ones(height, width, device=dev)),
        dim=-1,
    )  # [H, W, 3] camera frame
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    rot, origin = cam[..., :3, :3], cam[..., :3, 3]  # [B, F, 3, 3], [B, F, 3]
    d_world = torch.einsum("bfij,hwj->bfhwi", rot, dirs)  # [B, F, H, W, 3]
    moment = torch.cross(origin[:, :, None, None, :].expand_as(d_world), d_world, dim=-1)
    return torch.cat((d_world, moment), dim=-1).permute(0, 1, 4, 2, 3).contiguous()


def patchify_rays(rays: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """rays: [B, F, C, H, W] -> [B, F * (H/ph) * (W/pw), C * ph * pw], tokens frame-major (f, row, col),
    features ordered (channel, dy, dx). Temporal patch must be 1."""
    b, f, c, h, w = rays.shape
    _, ph, pw = patch_size
    x = rays.reshape(b, f, c, h // ph, ph, w // pw, pw)
    x = x.permute(0, 1, 3, 5, 2, 4, 6)  # [B, F, gh, gw, C, ph, pw]
    return x.reshape(b, f * (h // ph) * (w // pw), c * ph * pw)
