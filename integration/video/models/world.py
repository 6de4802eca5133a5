"""The panorama world model (worldkv_connector/world): the project's causal Wan DiT with a camera
conditioning of its own, small enough to train on the CPU.

Not an upstream model. Each block adds ``cam_injector`` (a linear map of the token's Plucker rays) to
its input before self-attention. A ray is ``(d, o x d)`` for the pixel's unit world direction ``d``
and the camera centre ``o`` (OpenCV axes, camera-to-world poses): 6 channels that name the ray, not a
point on it, patchified like the latents. With ``temporal_rope=False`` (the ``world`` config) no token
carries a time position, so any subset of cached chunks is a valid context.
Keys: the Wan keys plus ``blocks.{i}.cam_injector.{weight,bias}``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from worldkv_connector.integration.video.layers import AttnFn, DiTBlock
from worldkv_connector.integration.video.model import CausalWanDiT

__all__ = ["WorldDiT", "world_rays"]


def world_rays(cam: torch.Tensor, height: int, width: int, fov_degrees: float,
               patch_size: tuple[int, int, int]) -> torch.Tensor:
    """cam: [B, F, 4, 4] camera-to-world, one pinhole of ``fov_degrees`` (horizontal) per latent pixel
    -> [B, F * (H/ph) * (W/pw), 6 * ph * pw] fp32 tokens, frame-major, features (channel, dy, dx)."""
    if cam.dim() != 4 or tuple(cam.shape[-2:]) != (4, 4):
        raise ValueError(f"cam: expected [B, F, 4, 4] camera-to-world poses, got shape {tuple(cam.shape)}")
    if not torch.isfinite(cam).all():
        raise ValueError("cam: poses contain NaN or Inf")
    cam, dev = cam.float(), cam.device
    focal = (width / 2) / math.tan(math.radians(fov_degrees) / 2)
    u = (torch.arange(width, device=dev, dtype=torch.float32) + 0.5 - width / 2) / focal
    v = (torch.arange(height, device=dev, dtype=torch.float32) + 0.5 - height / 2) / focal
    dirs = torch.stack((u[None, :].expand(height, width), v[:, None].expand(height, width),
                        torch.ones(height, width, device=dev)), dim=-1)  # [H, W, 3] camera frame
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    rot, origin = cam[..., :3, :3], cam[..., :3, 3]  # [B, F, 3, 3], [B, F, 3]
    d_world = torch.einsum("bfij,hwj->bfhwi", rot, dirs)  # [B, F, H, W, 3]
    moment = torch.cross(origin[:, :, None, None, :].expand_as(d_world), d_world, dim=-1)
    rays = torch.cat((d_world, moment), dim=-1).permute(0, 1, 4, 2, 3)  # [B, F, 6, H, W]
    b, f, ch, h, w = rays.shape
    _, ph, pw = patch_size
    x = rays.reshape(b, f, ch, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)  # [B, F, gh, gw, 6, ph, pw]
    return x.reshape(b, f * (h // ph) * (w // pw), ch * ph * pw)


class _WorldBlock(DiTBlock):
    def __init__(self, dim, ffn_dim, num_heads, eps, cam_features: int, **factory):
        super().__init__(dim, ffn_dim, num_heads, eps, **factory)
        self.cam_injector = nn.Linear(cam_features, dim, **factory)

    def forward(self, x, e0, context, layer_idx, attn_fn, rope, rays=None):
        """As DiTBlock, with rays [B, T, cam_features] fp32 added (projected) to the block input."""
        if rays is not None:
            x = x + self.cam_injector(rays.to(self.cam_injector.weight.dtype)).float()
        return super().forward(x, e0, context, layer_idx, attn_fn, rope)


class WorldDiT(CausalWanDiT):
    """forward(x, t, context, frame_offset, attn_fn, cam) denoises one chunk; cam: [B, F, 4, 4]."""

    def _make_block(self, index: int, factory: dict) -> nn.Module:
        c = self.config
        return _WorldBlock(c.dim, c.ffn_dim, c.num_heads, c.eps, 6 * c.patch_elems, **factory)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, frame_offset: torch.Tensor,
                attn_fn: AttnFn, cam: torch.Tensor | None = None) -> torch.Tensor:
        """As CausalWanDiT.forward; cam: [B, F, 4, 4] camera-to-world poses of the chunk's frames (required)."""
        c = self.config
        self._check_inputs(x, t, context, frame_offset)
        b, f = x.shape[:2]
        if cam is None or tuple(cam.shape) != (b, f, 4, 4):
            got = None if cam is None else tuple(cam.shape)
            raise ValueError(f"cam: model {c.name!r} is camera-conditioned; expected [{b}, {f}, 4, 4] poses, got {got}")
        rays = self._memoized("world_rays", cam, (self.device,), lambda: world_rays(
            cam.to(self.device), c.latent_height, c.latent_width, c.camera_fov_degrees, c.patch_size))
        rope = self.rope(frame_offset, f)
        h = self.embed_patches(x)
        e, e0 = self.embed_time(t.to(self.device))
        ctx = self.embed_context(context.to(self.device))
        for i, block in enumerate(self.blocks):
            h = block(h, e0, ctx, i, attn_fn, rope, rays)
        return self._unpatchify(self.head(h, e), f).to(x.dtype)
