"""Matrix-Game-2's action module (upstream ``blocks.{i}.action_model``): per-frame mouse and keyboard
conditioning inside a DiT block, with its own attention caches.

- **Mouse**: for every spatial token, the token's features and the mouse window of its latent frame
  (``pad_frames`` video frames of (pitch, yaw)) go through ``mouse_mlp`` and ``t_qkv``; the token attends
  over *time*, to its own position in the frames of the window (a temporal attention per token).
- **Keyboard**: the keyboard window of each latent frame is embedded (``keyboard_embed``), projected to
  keys/values (``keyboard_attn_kv``: one key per latent frame, shared by every token), and every token
  of a frame queries them (``mouse_attn_q``).
Both rotate q and k at absolute latent frame positions (the first ``mouse_qk_dim_list[0]`` channels,
interleaved pairs, theta ``rope_theta``), so cached keys never need re-encoding.

The attention itself is ``action_attn(layer_idx, kind, q, k, v)`` (kind ``"mouse"`` or ``"keyboard"``),
which the engine implements over the action caches of the chunks in the window (action_cache.py),
exactly as ``attn_fn`` does for self-attention. Without it, a chunk attends to itself only.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldkv_connector.integration.video.layers import RMSNorm
from worldkv_connector.integration.video.model_config import ActionConfig

__all__ = ["ActionModule", "ActionAttnFn", "action_windows", "dense_action_attn", "action_rope"]

# action_attn(layer_idx, kind, q, k, v) -> out. mouse: q, k, v, out [B*S, F, H, Dm];
# keyboard: q, out [B*S, F, H, Dk], k, v [B, F, H, Dk] (one key per latent frame, shared by the S tokens)
ActionAttnFn = Callable[[int, str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x.to(layer.weight.dtype))


def action_windows(actions: torch.Tensor, first_frame: int, num_frames: int, cfg: ActionConfig) -> torch.Tensor:
    """The per-latent-frame action windows of one chunk, as upstream groups them.

    actions: [N, C] per video frame (N >= ``4 * (first_frame + num_frames - 1) + 1``). The sequence is
    left-padded with ``pad_frames`` copies of frame 0; latent frame ``f`` sees padded frames
    ``[r*f, r*f + pad_frames)`` (r = vae_time_compression_ratio). Returns [num_frames, pad_frames, C].
    """
    r, pad = cfg.vae_time_compression_ratio, cfg.pad_frames
    need = r * (first_frame + num_frames - 1) + 1
    if actions.dim() != 2 or actions.shape[0] < need:
        raise ValueError(f"actions: expected [N >= {need}, C] video frames for latent frames "
                         f"{first_frame}..{first_frame + num_frames - 1}, got {tuple(actions.shape)}")
    padded = torch.cat((actions[:1].expand(pad, -1), actions), dim=0)
    return torch.stack([padded[r * f: r * f + pad] for f in range(first_frame, first_frame + num_frames)])


def action_rope(x: torch.Tensor, positions: torch.Tensor, rope_dims: int, theta: float) -> torch.Tensor:
    """Rotate the first ``rope_dims`` channels of x [N, F, H, D] in interleaved pairs by the latent frame
    positions [N, F] (absolute); the other channels keep position 0 (no rotation). Computed in fp32."""
    half = rope_dims // 2
    freqs = 1.0 / theta ** (torch.arange(0, rope_dims, 2, dtype=torch.float64, device=x.device)[:half] / rope_dims)
    ang = positions.to(x.device, torch.float64)[..., None] * freqs  # [N, F, half]
    cos, sin = ang.cos().float()[:, :, None, :], ang.sin().float()[:, :, None, :]
    xf = x.float()
    a, b = xf[..., 0:rope_dims:2], xf[..., 1:rope_dims:2]
    rot = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    return torch.cat((rot, xf[..., rope_dims:]), dim=-1).to(x.dtype)


def dense_action_attn(layer_idx: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A chunk attending to its own frames only (no cache): q [N, F, H, D]; keyboard k/v [B, F, H, D]
    are shared by the N / B tokens of each row."""
    if kind == "keyboard":
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class ActionModule(nn.Module):
    """Mouse and keyboard conditioning of one block; parameter names follow upstream's ``action_model``."""

    def __init__(self, cfg: ActionConfig, dim: int, **factory) -> None:
        super().__init__()
        self.cfg = cfg
        c, kh, hid = cfg.mouse_hidden_dim, cfg.keyboard_hidden_dim, cfg.hidden_size
        bias = cfg.qkv_bias
        self.keyboard_embed = nn.Sequential(nn.Linear(cfg.keyboard_dim_in, hid, **factory), nn.SiLU(),
                                            nn.Linear(hid, hid, **factory))
        self.mouse_mlp = nn.Sequential(
            nn.Linear(cfg.mouse_dim_in * cfg.pad_frames + dim, c, **factory), nn.GELU(approximate="tanh"),
            nn.Linear(c, c, **factory), nn.LayerNorm(c, **factory),
        )
        self.t_qkv = nn.Linear(c, 3 * c, bias=bias, **factory)
        self.img_attn_q_norm = RMSNorm(c // cfg.heads_num, 1e-6, **factory)
        self.img_attn_k_norm = RMSNorm(c // cfg.heads_num, 1e-6, **factory)
        self.proj_mouse = nn.Linear(c, dim, bias=bias, **factory)
        self.key_attn_q_norm = RMSNorm(kh // cfg.heads_num, 1e-6, **factory)
        self.key_attn_k_norm = RMSNorm(kh // cfg.heads_num, 1e-6, **factory)
        self.mouse_attn_q = nn.Linear(dim, kh, bias=bias, **factory)
        self.keyboard_attn_kv = nn.Linear(hid * cfg.pad_frames, 2 * kh, bias=bias, **factory)
        self.proj_keyboard = nn.Linear(kh, dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor, frames: int, first_frame: torch.Tensor, keyboard: torch.Tensor,
                mouse: torch.Tensor, layer_idx: int, action_attn: ActionAttnFn) -> torch.Tensor:
        """x: [B, T, dim] fp32 (T = frames * S, frame-major); first_frame: [B] int64 absolute latent frame;
        keyboard: [B, F, pad_frames, keyboard_dim_in], mouse: [B, F, pad_frames, mouse_dim_in] (action_windows).
        Returns x plus the mouse and keyboard residuals, [B, T, dim] fp32."""
        cfg, h = self.cfg, self.cfg.heads_num
        b, t, dim = x.shape
        s = t // frames
        pos = first_frame.to(x.device, torch.float64)[:, None] + torch.arange(frames, dtype=torch.float64,
                                                                             device=x.device)  # [B, F]
        tok_pos = pos.repeat_interleave(s, dim=0)  # [(B S), F]
        rd, theta = cfg.mouse_qk_dim_list[0], cfg.rope_theta
        # mouse: a temporal attention per spatial token
        tokens = x.view(b, frames, s, dim).transpose(1, 2).reshape(b * s, frames, dim)  # [(B S), F, dim]
        m = mouse.to(x.dtype).flatten(2)  # [B, F, pad * C]
        m = m[:, None].expand(b, s, frames, m.shape[-1]).reshape(b * s, frames, -1)
        feat = self.mouse_mlp[3](self.mouse_mlp[2](self.mouse_mlp[1](_linear(self.mouse_mlp[0], torch.cat((tokens, m), -1)))))
        qkv = _linear(self.t_qkv, feat).unflatten(-1, (3, h, -1))  # [(B S), F, 3, H, Dm]
        q = action_rope(self.img_attn_q_norm(qkv[:, :, 0]), tok_pos, rd, theta)
        k = action_rope(self.img_attn_k_norm(qkv[:, :, 1]), tok_pos, rd, theta)
        out = action_attn(layer_idx, "mouse", q, k, qkv[:, :, 2].contiguous())  # [(B S), F, H, Dm]
        out = out.reshape(b, s, frames, -1).transpose(1, 2).reshape(b, t, -1)  # [B, (F S), c]
        x = x + _linear(self.proj_mouse, out).float()
        # keyboard: every token of a frame queries that frame's (and the window's) keyboard keys
        kb = self.keyboard_embed[2](self.keyboard_embed[1](_linear(self.keyboard_embed[0], keyboard.to(x.dtype))))
        kv = _linear(self.keyboard_attn_kv, kb.flatten(2)).unflatten(-1, (2, h, -1))  # [B, F, 2, H, Dk]
        kk = action_rope(self.key_attn_k_norm(kv[:, :, 0]), pos, rd, theta)
        q = self.key_attn_q_norm(_linear(self.mouse_attn_q, x).unflatten(-1, (h, -1)))  # [B, T, H, Dk]
        q = q.view(b, frames, s, h, -1).transpose(1, 2).reshape(b * s, frames, h, -1)
        q = action_rope(q, tok_pos, rd, theta)
        out = action_attn(layer_idx, "keyboard", q, kk, kv[:, :, 1].contiguous())  # [(B S), F, H, Dk]
        out = out.reshape(b, s, frames, -1).transpose(1, 2).reshape(b, t, -1)
        return x + _linear(self.proj_keyboard, out).float()
