"""PSNR and SSIM of latent frames (the paper scores revisit pose pairs with PSNR / SSIM).

Frames are ``[C, H, W]`` fp32 latents of unit variance per pixel; ``DATA_RANGE`` (6.0 = +-3 standard
deviations of the panorama texture) plays the role of the 255 of 8-bit images. SSIM uses a 3x3
uniform window over each channel (the frames are only 4 x 12), the usual constants
``(0.01 L)^2, (0.03 L)^2``, averaged over channels and window positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DATA_RANGE", "psnr", "ssim"]

DATA_RANGE = 6.0


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"frames must both be [C, H, W], got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """a, b: [C, H, W] -> PSNR in dB (capped at 100 dB for identical frames)."""
    _check(a, b)
    mse = float((a.float() - b.float()).pow(2).mean())
    return 100.0 if mse <= 1e-10 * data_range ** 2 else 10.0 * math.log10(data_range ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE, window: int = 3) -> float:
    """a, b: [C, H, W] (H, W >= window) -> mean SSIM in [-1, 1]."""
    _check(a, b)
    x, y = a.float()[:, None], b.float()[:, None]  # [C, 1, H, W]: channels as a batch
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, stride=1)

    mx, my = pool(x), pool(y)
    vx, vy = pool(x * x) - mx * mx, pool(y * y) - my * my
    cov = pool(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
