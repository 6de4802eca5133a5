"""Matrix-Game-2.0 (SkyworkAI): a causal Wan-1.3B I2V DiT with an action module, in the upstream layout.

Differences from Wan T2V (model.py), as upstream:
- **Image conditioning**: the input is 36 channels, the noisy latent (16) concatenated with the
  conditioning latent ``cond`` (20: 4 mask channels + the VAE latent of the first frame, zeros after it);
  the cross-attention context is the CLIP feature of the first frame (``image_len`` x ``image_dim``)
  through ``img_emb.proj`` (LayerNorm, Linear, GELU, Linear, LayerNorm); there is no text.
- **Actions**: the blocks listed in ``ActionConfig.blocks`` run ``action_model`` (action_module.py)
  between cross-attention and the FFN, from per-video-frame keyboard (W, S, A, D) and mouse
  (pitch, yaw) inputs.
Checkpoint keys (upstream): the Wan keys without ``text_embedding``, plus ``img_emb.proj.{0,1,3,4}.*`` and
``blocks.{i}.action_model.*`` (keyboard_embed, mouse_mlp, t_qkv, img_attn_{q,k}_norm, proj_mouse,
key_attn_{q,k}_norm, mouse_attn_q, keyboard_attn_kv, proj_keyboard).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldkv_connector.checks import check_int
from worldkv_connector.integration.video.layers import AttnFn, DiTBlock
from worldkv_connector.integration.video.model import CausalWanDiT
from worldkv_connector.integration.video.models.action_module import ActionAttnFn, ActionModule, dense_action_attn

__all__ = ["MatrixGame2DiT", "COND_CHANNELS", "first_frame_condition"]

COND_CHANNELS = 20  # 4 mask + 16 first-frame latent channels


def first_frame_condition(latent: torch.Tensor, frames: int) -> torch.Tensor:
    """The conditioning latent of a rollout, as upstream builds it: [frames, 20, Hl, Wl] with the 4 mask
    channels 1 at frame 0 (the given image) and 0 after, and the first frame's VAE latent at frame 0.

    latent: [16, Hl, Wl] VAE latent of the first frame (zeros for random-weight runs)."""
    if latent.dim() != 3 or latent.shape[0] != COND_CHANNELS - 4:
        raise ValueError(f"first frame latent: expected [{COND_CHANNELS - 4}, Hl, Wl], got {tuple(latent.shape)}")
    cond = latent.new_zeros(check_int("frames", frames, lo=1), COND_CHANNELS, *latent.shape[1:])
    cond[0, :4] = 1.0
    cond[0, 4:] = latent
    return cond


class _MG2Block(DiTBlock):
    def __init__(self, dim, ffn_dim, num_heads, eps, action, **factory):
        super().__init__(dim, ffn_dim, num_heads, eps, **factory)
        self.action_model = ActionModule(action, dim, **factory) if action is not None else None


class MatrixGame2DiT(CausalWanDiT):
    """Matrix-Game-2.0's causal DiT. forward(x, t, context, frame_offset, attn_fn, cond, keyboard, mouse,
    action_attn) denoises one chunk; see ``forward``."""

    def __init__(self, config, device="cpu") -> None:
        super().__init__(config, device)
        c = config
        factory = {"device": torch.device(device), "dtype": c.torch_dtype}
        self.img_emb = nn.Module()
        self.img_emb.proj = nn.Sequential(
            nn.LayerNorm(c.image_dim, **factory), nn.Linear(c.image_dim, c.image_dim, **factory), nn.GELU(),
            nn.Linear(c.image_dim, c.dim, **factory), nn.LayerNorm(c.dim, **factory),
        )

    def _make_block(self, index: int, factory: dict) -> nn.Module:
        c = self.config
        action = c.action if index in c.action.blocks else None
        return _MG2Block(c.dim, c.ffn_dim, c.num_heads, c.eps, action, **factory)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """image: [B, image_len, image_dim] CLIP features -> [B, image_len, dim] fp32 cross-attention context
        (LayerNorms in fp32, Linears in the model dtype)."""
        p = self.img_emb.proj

        def norm(ln: nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(h.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)

        h = norm(p[0], image.to(self.device))
        return norm(p[4], self._lin(p[3], p[2](self._lin(p[1], h))))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        frame_offset: torch.Tensor,
        attn_fn: AttnFn,
        cond: torch.Tensor | None = None,
        keyboard: torch.Tensor | None = None,
        mouse: torch.Tensor | None = None,
        action_attn: ActionAttnFn | None = None,
    ) -> torch.Tensor:
        """Flow prediction for one chunk.

        x: [B, F, 16, Hl, Wl] noisy latents; t: [B] fp32 sigma; context: [B, image_len, image_dim] CLIP
        features of the first frame; frame_offset: [B] int64 absolute latent frame; cond: [B, F, 20, Hl, Wl] this chunk's frames of the conditioning latent
        (first_frame_condition); keyboard: [B, F, pad, 4] and mouse: [B, F, pad, 2] action windows
        (action_module.action_windows); attn_fn as CausalWanDiT; action_attn(layer, kind, q, k, v) the
        action caches' attention (default: the chunk's own frames). Returns [B, F, 16, Hl, Wl].
        """
        c = self.config
        b, f = x.shape[:2]
        lat = c.in_channels - COND_CHANNELS
        if x.dim() != 5 or tuple(x.shape[2:]) != (lat, c.latent_height, c.latent_width):
            raise ValueError(f"x: expected [B, F, {lat}, {c.latent_height}, {c.latent_width}], got {tuple(x.shape)}")
        if cond is None or tuple(cond.shape) != (b, f, COND_CHANNELS, c.latent_height, c.latent_width):
            raise ValueError(f"cond: expected [{b}, {f}, {COND_CHANNELS}, {c.latent_height}, {c.latent_width}] "
                             f"(mask + first-frame latent), got {None if cond is None else tuple(cond.shape)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != c.image_dim:
            raise ValueError(f"context: expected [{b}, image_len, {c.image_dim}] CLIP features, got {tuple(context.shape)}")
        a = c.action
        for name, val, width in (("keyboard", keyboard, a.keyboard_dim_in), ("mouse", mouse, a.mouse_dim_in)):
            if val is None or tuple(val.shape) != (b, f, a.pad_frames, width):
                raise ValueError(f"{name}: expected [{b}, {f}, {a.pad_frames}, {width}] action windows, got "
                                 f"{None if val is None else tuple(val.shape)}")
        if tuple(t.shape) != (b,) or tuple(frame_offset.shape) != (b,):
            raise ValueError(f"t, frame_offset: expected shape ({b},), got {tuple(t.shape)}, {tuple(frame_offset.shape)}")
        dev = self.device
        action_attn = action_attn or dense_action_attn
        rope = self.rope(frame_offset, f)
        h = self.embed_patches(torch.cat((x.to(dev), cond.to(dev, x.dtype)), dim=2))
        e, e0 = self.embed_time(t.to(dev))
        ctx = self.embed_image(context)
        first = frame_offset.to(dev, torch.int64)
        for i, block in enumerate(self.blocks):
            mods = block.modulations(e0)
            h = block.attend(h, mods, ctx, i, attn_fn, rope)
            if block.action_model is not None:
                h = block.action_model(h, f, first, keyboard.to(dev), mouse.to(dev), i, action_attn)
            h = block.feed_forward(h, mods)
        out = self.head(h, e)
        return self._unpatchify(out, f).to(x.dtype)
