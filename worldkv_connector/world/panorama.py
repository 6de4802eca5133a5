"""The procedural panorama world: a place whose every view has a computable ground truth.

An episode's world is a vertical cylinder of radius ``radius`` around the origin whose inside wall is
painted with random low-frequency latent texture: for channel ``c`` and texture row ``r``,

    tex[c, r](phi) = sum_{k=0..modes} a[c, r, k] cos(k phi) + b[c, r, k] sin(k phi)

with ``a, b ~ N(0, 1 / (modes + 1))`` (unit variance per latent pixel). A camera (OpenCV convention,
camera-to-world pose, horizontal field of view ``fov_degrees``) sees, at latent pixel ``(h, w)``, the
wall point its ray hits: the azimuth ``phi`` of that point gives the texture column, the pixel row gives
the texture row (the wall is banded: no vertical parallax). A yaw-only camera at the origin sees
``phi = yaw + atan(u)``; a translated camera sees parallax. Content outside every view seen so far is
independent random coefficients, so a model can reproduce a place only by remembering it.

``WORLD_VERSION`` names this generator; it is part of every trained model's manifest, and changes
whenever the texture, the geometry or the sampling of coefficients changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from worldkv_connector.checks import check_int

__all__ = ["WORLD_VERSION", "WorldConfig", "PanoramaWorld", "render", "sample_coefficients", "yaw_pose"]

WORLD_VERSION = "panorama-v1"
_SEED_SALT = 0x5EED_0F_3D  # separates world seeds from every other random stream of the project


@dataclass(frozen=True)
class WorldConfig:
    """Texture and geometry of the panorama world (fields of the manifest's ``world`` entry)."""

    channels: int = 4  # latent channels (= the world model's in_channels)
    rows: int = 4  # texture rows (= latent_height of the views)
    modes: int = 12  # highest Fourier mode of the texture around the cylinder
    radius: float = 1.0  # cylinder radius; cameras must stay strictly inside it
    version: str = WORLD_VERSION

    def __post_init__(self) -> None:
        for name in ("channels", "rows", "modes"):
            object.__setattr__(self, name, check_int(f"WorldConfig.{name}", getattr(self, name), 1, 1024))
        if not isinstance(self.radius, (int, float)) or not 0.0 < self.radius < 1e6:
            raise ValueError(f"WorldConfig.radius={self.radius!r}: expected 0 < radius < 1e6")
        if self.version != WORLD_VERSION:
            raise ValueError(f"WorldConfig.version={self.version!r}: this generator is {WORLD_VERSION!r}")

    def to_dict(self) -> dict:
        return {"channels": self.channels, "rows": self.rows, "modes": self.modes, "radius": self.radius,
                "version": self.version}


def yaw_pose(yaw_degrees: float, position: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Camera-to-world [4, 4] float64 of a camera turned by ``yaw_degrees`` about the world's y axis
    (0 looks along +z, positive turns toward +x) at ``position``."""
    a = math.radians(yaw_degrees)
    pose = np.eye(4)
    pose[:3, :3] = [[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]]
    pose[:3, 3] = position
    return pose


def sample_coefficients(config: WorldConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Random worlds: [batch, channels, rows, modes + 1, 2] fp32 (cos, sin) coefficients on the CPU."""
    c = config
    coeffs = torch.randn(batch, c.channels, c.rows, c.modes + 1, 2, generator=generator)
    coeffs = coeffs / math.sqrt(c.modes + 1)
    coeffs[..., 0, 1] = 0.0  # sin(0 * phi) = 0: mode 0 has a cos term only
    return coeffs


def _wall_azimuth(poses: torch.Tensor, width: int, fov_degrees: float, radius: float) -> torch.Tensor:
    """poses: [B, N, 4, 4] fp32 -> azimuth [B, N, W] fp32 of the wall point seen by each pixel column
    (the centre row's ray, projected on the horizontal plane)."""
    focal = (width / 2) / math.tan(math.radians(fov_degrees) / 2)
    u = (torch.arange(width, dtype=torch.float32) + 0.5 - width / 2) / focal  # [W]
    dirs = torch.stack((u, torch.zeros_like(u), torch.ones_like(u)), dim=-1)  # [W, 3] camera frame
    d = torch.einsum("bnij,wj->bnwi", poses[..., :3, :3], dirs)  # [B, N, W, 3] world
    dx, dz = d[..., 0], d[..., 2]
    norm = torch.sqrt(dx * dx + dz * dz).clamp_min(1e-12)
    dx, dz = dx / norm, dz / norm
    ox, oz = poses[..., 0, 3][..., None], poses[..., 2, 3][..., None]  # [B, N, 1]
    if bool(((ox * ox + oz * oz) >= radius * radius).any()):
        raise ValueError(f"poses: every camera must stay inside the wall (|x, z| < radius={radius})")
    # o + s d on the circle |p| = radius, s > 0: s = -(o.d) + sqrt((o.d)^2 - |o|^2 + r^2)
    od = ox * dx + oz * dz
    s = -od + torch.sqrt(od * od - (ox * ox + oz * oz) + radius * radius)
    return torch.atan2(ox + s * dx, oz + s * dz)


def render(coeffs: torch.Tensor, poses: torch.Tensor, height: int, width: int, fov_degrees: float,
           radius: float = 1.0) -> torch.Tensor:
    """Ground-truth latent views.

    coeffs: [B, C, R, K + 1, 2] from ``sample_coefficients``; poses: [B, N, 4, 4] camera-to-world (any
    float dtype, CPU). ``height`` must equal R (one texture row per latent row). Returns
    [B, N, C, height, width] fp32 on the CPU.
    """
    if coeffs.dim() != 5 or coeffs.shape[-1] != 2:
        raise ValueError(f"coeffs: expected [B, C, R, K+1, 2], got {tuple(coeffs.shape)}")
    if poses.dim() != 4 or tuple(poses.shape[-2:]) != (4, 4) or poses.shape[0] != coeffs.shape[0]:
        raise ValueError(f"poses: expected [{coeffs.shape[0]}, N, 4, 4], got {tuple(poses.shape)}")
    if height != coeffs.shape[2]:
        raise ValueError(f"height={height}: must equal the world's texture rows {coeffs.shape[2]}")
    phi = _wall_azimuth(poses.float().cpu(), width, fov_degrees, radius)  # [B, N, W]
    k = torch.arange(coeffs.shape[3], dtype=torch.float32)
    ang = phi[..., None] * k  # [B, N, W, K+1]
    basis = torch.stack((torch.cos(ang), torch.sin(ang)), dim=-1)  # [B, N, W, K+1, 2]
    out = torch.einsum("bcrkz,bnwkz->bncrw", coeffs.float(), basis)  # [B, N, C, R, W]
    return out.contiguous()


class PanoramaWorld:
    """One world, drawn from ``seed`` (numpy stream independent of the training worlds' torch stream)."""

    def __init__(self, seed: int, config: WorldConfig | None = None) -> None:
        seed = check_int("seed", seed, lo=0)
        self.seed = seed
        self.config = config or WorldConfig()
        c = self.config
        rng = np.random.default_rng([_SEED_SALT, seed])
        coeffs = rng.standard_normal((1, c.channels, c.rows, c.modes + 1, 2)) / math.sqrt(c.modes + 1)
        coeffs[..., 0, 1] = 0.0
        self.coeffs = torch.from_numpy(coeffs.astype(np.float32))  # [1, C, R, K+1, 2]

    def render(self, poses: np.ndarray | torch.Tensor, width: int, fov_degrees: float) -> torch.Tensor:
        """poses: [N, 4, 4] camera-to-world -> ground-truth views [N, C, rows, width] fp32."""
        p = torch.as_tensor(np.asarray(poses), dtype=torch.float32)
        if p.dim() != 3:
            raise ValueError(f"poses: expected [N, 4, 4], got {tuple(p.shape)}")
        return render(self.coeffs, p[None], self.config.rows, width, fov_degrees, self.config.radius)[0]

    def value_range(self, samples: int = 1440) -> float:
        """Peak-to-peak value of the whole wall texture (the data range of PSNR / SSIM)."""
        phi = torch.linspace(-math.pi, math.pi, samples)
        k = torch.arange(self.coeffs.shape[3], dtype=torch.float32)
        basis = torch.stack((torch.cos(phi[:, None] * k), torch.sin(phi[:, None] * k)), dim=-1)  # [S, K+1, 2]
        tex = torch.einsum("crkz,skz->crs", self.coeffs[0], basis)
        return float(tex.max() - tex.min())
