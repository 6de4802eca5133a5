"""LingBot-World (Robbyant), causal fast variant: a Wan2.2 I2V DiT with Plucker camera control, in the
upstream layout.

As upstream (``wan/modules/model.py`` of Robbyant/lingbot-world):
- the input is 36 channels, the noisy latent (16) and the conditioning latent ``cond`` (4 mask + 16
  first-frame latent channels, as Matrix-Game-2's); cross-attention reads the umT5 text context;
- camera: Plucker rays ``(origin, direction)`` of every pixel (camera.py) of the camera-to-world poses
  *relative to the first frame*, folded 8x8 pixels per latent pixel (384 channels) and patchified
  like the latents, go through ``patch_embedding_wancamctrl`` and a residual MLP
  (``c2ws_hidden_states_layer{1,2}``); every block, after self-attention, maps them through
  ``cam_injector_layer{1,2}`` (residual) to a scale and shift of the residual stream
  (``cam_scale_layer``, ``cam_shift_layer``): ``x = (1 + scale) * x + shift``.
Keys: the Wan keys plus ``patch_embedding_wancamctrl.*``, ``c2ws_hidden_states_layer{1,2}.*`` and
``blocks.{i}.cam_{injector_layer1,injector_layer2,scale_layer,shift_layer}.*``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldkv_connector.integration.video.camera import PIXELS_PER_LATENT, camera_tokens
from worldkv_connector.integration.video.layers import AttnFn, DiTBlock
from worldkv_connector.integration.video.model import CausalWanDiT
from worldkv_connector.integration.video.models.matrix_game2 import COND_CHANNELS

__all__ = ["LingBotWorldDiT"]


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x.to(layer.weight.dtype))


class _LingBotBlock(DiTBlock):
    def __init__(self, dim, ffn_dim, num_heads, eps, **factory):
        super().__init__(dim, ffn_dim, num_heads, eps, **factory)
        self.cam_injector_layer1 = nn.Linear(dim, dim, **factory)
        self.cam_injector_layer2 = nn.Linear(dim, dim, **factory)
        self.cam_scale_layer = nn.Linear(dim, dim, **factory)
        self.cam_shift_layer = nn.Linear(dim, dim, **factory)

    def forward(self, x, e0, context, layer_idx, attn_fn, rope, cam=None):
        """As DiTBlock, with cam [B, T, dim] fp32 (the embedded rays) modulating x after self-attention."""
        mods = self.modulations(e0)
        shift1, scale1, gate1 = mods[:3]
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale1) + shift1
        x = x + self.self_attn(h, layer_idx, attn_fn, rope).float() * gate1
        if cam is not None:
            hid = _linear(self.cam_injector_layer2, F.silu(_linear(self.cam_injector_layer1, cam))).float() + cam
            x = (1.0 + _linear(self.cam_scale_layer, hid).float()) * x + _linear(self.cam_shift_layer, hid).float()
        x = x + self.cross_attn(self.norm3(x.to(self.norm3.weight.dtype)), context).float()
        return self.feed_forward(x, mods)


class LingBotWorldDiT(CausalWanDiT):
    """forward(x, t, context, frame_offset, attn_fn, cond, c2w, intrinsics) denoises one chunk."""

    def __init__(self, config, device="cpu") -> None:
        super().__init__(config, device)
        c = config
        factory = {"device": torch.device(device), "dtype": c.torch_dtype}
        rays = 6 * PIXELS_PER_LATENT ** 2 * c.patch_elems
        self.patch_embedding_wancamctrl = nn.Linear(rays, c.dim, **factory)
        self.c2ws_hidden_states_layer1 = nn.Linear(c.dim, c.dim, **factory)
        self.c2ws_hidden_states_layer2 = nn.Linear(c.dim, c.dim, **factory)

    def _make_block(self, index: int, factory: dict) -> nn.Module:
        c = self.config
        return _LingBotBlock(c.dim, c.ffn_dim, c.num_heads, c.eps, **factory)

    def embed_camera(self, c2w: torch.Tensor, intrinsics: torch.Tensor | None) -> torch.Tensor:
        """c2w: [B, F, 4, 4] relative to the session's first frame (already framewise and normalised,
        camera.relative_camera); intrinsics [B, 4] or None -> [B, T, dim] fp32."""
        c = self.config
        tokens = camera_tokens(c2w.to(self.device), c.latent_height, c.latent_width, c.patch_size,
                               intrinsics=intrinsics, fov_degrees=c.camera_fov_degrees)  # [B, T, rays]
        emb = _linear(self.patch_embedding_wancamctrl, tokens).float()
        hid = _linear(self.c2ws_hidden_states_layer2, F.silu(_linear(self.c2ws_hidden_states_layer1, emb))).float()
        return emb + hid

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        frame_offset: torch.Tensor,
        attn_fn: AttnFn,
        cond: torch.Tensor | None = None,
        c2w: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, F, 16, Hl, Wl]; t: [B]; context: [B, Lc, text_dim]; frame_offset: [B] int64; cond:
        [B, F, 20, Hl, Wl] (mask + first-frame latent; zeros: no image); c2w: [B, F, 4, 4] camera poses
        relative to the first frame as upstream prepares them (camera.relative_camera), None: no camera
        conditioning; intrinsics: [B, 4] (fx, fy, cx, cy) in pixels of the 8x latent grid, None: a
        pinhole of ``camera_fov_degrees``. Returns [B, F, 16, Hl, Wl]."""
        c = self.config
        b, f = x.shape[:2]
        lat = c.in_channels - COND_CHANNELS
        if x.dim() != 5 or tuple(x.shape[2:]) != (lat, c.latent_height, c.latent_width):
            raise ValueError(f"x: expected [B, F, {lat}, {c.latent_height}, {c.latent_width}], got {tuple(x.shape)}")
        if cond is None:
            cond = x.new_zeros(b, f, COND_CHANNELS, c.latent_height, c.latent_width)
        if tuple(cond.shape) != (b, f, COND_CHANNELS, c.latent_height, c.latent_width):
            raise ValueError(f"cond: expected [{b}, {f}, {COND_CHANNELS}, {c.latent_height}, {c.latent_width}], "
                             f"got {tuple(cond.shape)}")
        if c2w is not None and tuple(c2w.shape) != (b, f, 4, 4):
            raise ValueError(f"c2w: expected [{b}, {f}, 4, 4] camera-to-world poses, got {tuple(c2w.shape)}")
        xin = torch.cat((x.to(self.device), cond.to(self.device, x.dtype)), dim=2)
        self._check_inputs(xin, t, context, frame_offset)
        rope = self.rope(frame_offset, f)
        h = self.embed_patches(xin)
        e, e0 = self.embed_time(t.to(self.device))
        ctx = self.embed_context(context.to(self.device))
        cam = self.embed_camera(c2w, intrinsics) if c2w is not None else None
        for i, block in enumerate(self.blocks):
            h = block(h, e0, ctx, i, attn_fn, rope, cam)
        out = self.head(h, e)
        return self._unpatchify(out, f).to(x.dtype)
