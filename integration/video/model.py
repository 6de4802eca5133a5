"""CausalWanDiT: the Wan2.1 T2V DiT behind Self-Forcing and CausVid (and the base of Matrix-Game-2.0 and
LingBot-World-Fast in models/), run causally chunk by chunk.

One forward call denoises one chunk (a few latent frames) of each batch row. Self-attention does not
attend by itself: each block hands its post-RoPE q, k, v to ``attn_fn(layer_idx, q, k, v)``, which the
engine implements over its paged KV cache (earlier chunks in the window + the current chunk). Keys are
rotated at absolute positions (``frame_offset``), so cached keys never need re-encoding.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from worldkv_connector.integration.video.layers import AttnFn, DiTBlock, Head, init_weights_, sinusoidal_embedding
from worldkv_connector.integration.video.model_config import ModelConfig
from worldkv_connector.rope import rope_tables

__all__ = ["CausalWanDiT"]


class CausalWanDiT(nn.Module):
    """Causal Wan-style DiT. Submodule names follow Wan's checkpoint layout (see checkpoint.py)."""

    def __init__(self, config: ModelConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.config = config
        c = config
        factory = {"device": torch.device(device), "dtype": c.torch_dtype}
        self.patch_embedding = nn.Conv3d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size, **factory)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.text_dim, c.dim, **factory), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim, **factory)
        ) if c.text_dim else None  # Matrix-Game-2 has no text
        self.time_embedding = nn.Sequential(
            nn.Linear(c.freq_dim, c.dim, **factory), nn.SiLU(), nn.Linear(c.dim, c.dim, **factory)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim, **factory))
        self.blocks = nn.ModuleList(self._make_block(i, factory) for i in range(c.num_layers))
        self.head = Head(c.dim, c.patch_elems * c.out_channels, c.eps, **factory)
        # patch row / column of each token of one frame (frame-major order inside a chunk)
        rows = torch.arange(c.grid_height, dtype=torch.int64).repeat_interleave(c.grid_width)
        cols = torch.arange(c.grid_width, dtype=torch.int64).repeat(c.grid_height)
        self.register_buffer("_rows", rows.to(factory["device"]), persistent=False)
        self.register_buffer("_cols", cols.to(factory["device"]), persistent=False)
        self._memo: dict | None = None  # set only inside reuse_conditioning()

    def _make_block(self, index: int, factory: dict) -> nn.Module:
        c = self.config
        return DiTBlock(c.dim, c.ffn_dim, c.num_heads, c.eps, **factory)

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # --- conditioning -------------------------------------------------------------------------
    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [B] fp32 sigma in [0, 1] -> (e [B, dim] fp32 for the head, e0 [B, 6, dim] fp32 for blocks)."""
        c = self.config
        sin = sinusoidal_embedding(c.freq_dim, t.float() * c.timestep_scale)  # [B, freq_dim]
        e = self.time_embedding[2](self.time_embedding[1](self._lin(self.time_embedding[0], sin))).float()
        e0 = self._lin(self.time_projection[1], self.time_projection[0](e)).float()
        return e, e0.unflatten(1, (6, c.dim))

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """context: [B, Lc, text_dim] (Lc <= text_len; zero-padded to text_len as Wan does) -> [B, text_len, dim]."""
        c = self.config
        if context.shape[1] < c.text_len:
            pad = context.new_zeros(context.shape[0], c.text_len - context.shape[1], context.shape[2])
            context = torch.cat((context, pad), dim=1)
        return self.text_embedding[2](self.text_embedding[1](self._lin(self.text_embedding[0], context)))

    @staticmethod
    def _lin(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return layer(x.to(layer.weight.dtype))

    def _check_inputs(self, x, t, context, frame_offset) -> None:
        c = self.config
        if x.dim() != 5 or tuple(x.shape[2:]) != (c.in_channels, c.latent_height, c.latent_width):
            raise ValueError(
                f"x: expected [B, F, {c.in_channels}, {c.latent_height}, {c.latent_width}], got {tuple(x.shape)}"
            )
        b, f = x.shape[:2]
        if b < 1 or f < 1:
            raise ValueError(f"x: expected B >= 1 and F >= 1, got shape {tuple(x.shape)}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"t: expected shape ({b},), got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != c.text_dim:
            raise ValueError(f"context: expected [{b}, Lc, {c.text_dim}], got {tuple(context.shape)}")
        if not 1 <= context.shape[1] <= c.text_len:
            raise ValueError(f"context: length {context.shape[1]} outside 1..text_len={c.text_len}")
        if tuple(frame_offset.shape) != (b,) or frame_offset.dtype.is_floating_point:
            raise ValueError(
                f"frame_offset: expected an int tensor of shape ({b},), got {frame_offset.dtype} {tuple(frame_offset.shape)}"
            )

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        frame_offset: torch.Tensor,
        attn_fn: AttnFn,
    ) -> torch.Tensor:
        """Flow (velocity) prediction for one chunk.

        x: [B, F, C, Hl, Wl] noisy latents, any float dtype, model device. t: [B] fp32 sigma in [0, 1]
        (0 = clean). context: [B, Lc, text_dim]. frame_offset: [B] int64, absolute latent frame of the
        chunk's first frame. attn_fn(layer_idx, q, k, v) -> out, all [B, T, H, D] in the model dtype with
        T = F * frame_tokens, tokens frame-major. Returns [B, F, out_channels, Hl, Wl] in x's dtype.
        """
        self._check_inputs(x, t, context, frame_offset)
        f = x.shape[1]
        rope = self.rope(frame_offset, f)
        h = self.embed_patches(x)
        e, e0 = self.embed_time(t.to(self.device))
        ctx = self.embed_context(context.to(self.device))
        for i, block in enumerate(self.blocks):
            h = block(h, e0, ctx, i, attn_fn, rope)
        out = self.head(h, e)  # [B, T, patch_elems * out_channels]
        return self._unpatchify(out, f).to(x.dtype)

    # --- per-step reuse of conditioning tables -------------------------------------------------
    @contextlib.contextmanager
    def reuse_conditioning(self) -> Iterator[None]:
        """Inside the block, tables derived only from a pass's positions / poses (RoPE, camera rays) are
        reused when a later pass gives inputs equal to the last one's (same dtype, shape, device and
        values), instead of being rebuilt. The engine opens one per step: all denoising passes and the
        clean pass of a chunk share them. Outside it (training, tests) every call computes afresh."""
        prev, self._memo = self._memo, {}
        try:
            yield
        finally:
            self._memo = prev

    def _memoized(self, name: str, key: torch.Tensor, extra: tuple, compute: Callable[[], object]):
        """``compute()``, or inside reuse_conditioning() the stored result for an equal ``key`` tensor
        and ``extra`` (an exact match: dtype, shape, device and every element; NaN never matches)."""
        memo = self._memo
        if memo is None:
            return compute()
        hit = memo.get(name)
        if hit is not None:
            k, e, out = hit
            if (e == extra and k.dtype == key.dtype and k.shape == key.shape and k.device == key.device
                    and torch.equal(k, key)):
                return out
        out = compute()  # raises (bad input) before anything is stored
        memo[name] = (key.detach().clone(), extra, out)
        return out

    def rope(self, frame_offset: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of a chunk of ``f`` frames starting at ``frame_offset`` [B] (built once per forward,
        and once per step inside reuse_conditioning())."""
        return self._memoized("rope", frame_offset, (int(f), self.device), lambda: self._rope(frame_offset, f))

    def _rope(self, frame_offset: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, dev = self.config, self.device
        # positions of every token: frame-major, absolute latent frame for the temporal RoPE group
        frame_pos = (frame_offset.to(dev, torch.int64)[:, None] + torch.arange(f, device=dev)).repeat_interleave(
            c.frame_tokens, dim=1
        )  # [B, T]
        if not c.temporal_rope:
            frame_pos = torch.zeros_like(frame_pos)  # no time position: the temporal channels stay unrotated
        row_pos, col_pos = self._rows.repeat(f), self._cols.repeat(f)  # [T]
        return rope_tables(frame_pos, row_pos, col_pos, c.head_dim)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, F, C_in, Hl, Wl] -> [B, T, dim] fp32 residual stream (tokens frame-major)."""
        h = self.patch_embedding(x.to(self.device, self.dtype).transpose(1, 2))  # [B, dim, F, gh, gw]
        return h.flatten(2).transpose(1, 2).float()

    def _unpatchify(self, out: torch.Tensor, f: int) -> torch.Tensor:
        """out: [B, T, pt*ph*pw*C] -> [B, F*pt, C, Hl, Wl]."""
        c = self.config
        pt, ph, pw = c.patch_size
        b = out.shape[0]
        u = out.reshape(b, f, c.grid_height, c.grid_width, pt, ph, pw, c.out_channels)
        u = u.permute(0, 1, 4, 7, 2, 5, 3, 6)  # [B, F, pt, C, gh, ph, gw, pw]
        return u.reshape(b, f * pt, c.out_channels, c.latent_height, c.latent_width)
