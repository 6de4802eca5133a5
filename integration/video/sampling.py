"""Few-step flow-matching sampler of a chunk (Self-Forcing / CausVid style).

Flow matching: ``x_s = (1 - s) * x0 + s * noise`` for sigma ``s`` in [0, 1]; the model predicts the
velocity ``v = noise - x0``, so ``x0 = x_s - s * v``. A chunk starts from pure noise (s = 1), each
step predicts x0 and re-noises it to the next sigma with fresh noise, and the last prediction is the
chunk's latent. A final pass at s = 0 on that latent (the *clean pass*) writes the chunk's K/V.

The sigmas are evenly spaced base sigmas ``1, 1 - 1/N, ..., 1/N`` (N = steps; for N = 4:
1.0, 0.75, 0.5, 0.25) warped by the usual flow-matching shift ``shift*s / (1 + (shift-1)*s)``, as
Self-Forcing's "warped denoising steps" do (shift 5.0 there). ``shift = 1`` keeps the base sigmas.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from worldkv_connector.checks import check_int

__all__ = ["FlowMatchSchedule"]


@dataclass(frozen=True)
class FlowMatchSchedule:
    num_steps: int = 4
    shift: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_steps", check_int("FlowMatchSchedule.num_steps", self.num_steps, 1, 1000))
        if not isinstance(self.shift, (int, float)) or not 0.0 < float(self.shift) <= 100.0:
            raise ValueError(f"FlowMatchSchedule.shift={self.shift!r}: allowed 0 < shift <= 100")

    @property
    def base_sigmas(self) -> list[float]:
        return [1.0 - i / self.num_steps for i in range(self.num_steps)]

    @property
    def sigmas(self) -> list[float]:
        """Sigma of each denoising step (decreasing, first = 1.0)."""
        k = float(self.shift)
        return [k * s / (1.0 + (k - 1.0) * s) for s in self.base_sigmas]

    @staticmethod
    def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma * v. x_t, velocity: [B, ...]; sigma: [B] fp32. Computes in fp32."""
        s = sigma.float().view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t.float() - s * velocity.float()).to(x_t.dtype)

    @staticmethod
    def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_s = (1 - s) * x0 + s * noise. x0, noise: [B, ...]; sigma: [B] fp32."""
        s = sigma.float().view(-1, *([1] * (x0.dim() - 1)))
        return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)
