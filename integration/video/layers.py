"""Layers of the causal Wan-style DiT, named and shaped as in Wan2.1 so that state_dict keys follow the
original checkpoint layout (``blocks.{i}.self_attn.q.weight``, ``blocks.{i}.modulation``...).

Precision: the residual stream, the timestep embeddings and the modulation arithmetic stay in fp32
(as Wan does under autocast); every Linear sees its input cast to its own weight dtype, so a bf16 model
runs on the CPU without autocast.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldkv_connector.rope import apply_rope_tables

__all__ = ["AttnFn", "RMSNorm", "sinusoidal_embedding", "SelfAttention", "CrossAttention", "DiTBlock", "Head"]

# attn_fn(layer_idx, q, k, v) -> out; q, k, v, out: [B, T, H, D], model dtype, model device
AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x.to(layer.weight.dtype))


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the last dim (a learned weight of size ``dim``), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, **factory) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim], any float dtype -> same shape and dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's 1D sinusoidal embedding: position [N] float -> [N, dim] fp32, ``[cos | sin]`` halves."""
    half = dim // 2
    pos = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angles = pos[:, None] * freqs[None, :]
    return torch.cat((torch.cos(angles), torch.sin(angles)), dim=1).float()


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, in fp32: x [..., dim] -> fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class _Projections(nn.Module):
    """Wan's attention parameters: q, k, v, o projections and RMSNorm on q and k over the full dim
    (names match the checkpoint keys ``self_attn.*`` / ``cross_attn.*``)."""

    def __init__(self, dim: int, num_heads: int, eps: float, **factory) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, **factory)
        self.k = nn.Linear(dim, dim, **factory)
        self.v = nn.Linear(dim, dim, **factory)
        self.o = nn.Linear(dim, dim, **factory)
        self.norm_q = RMSNorm(dim, eps, **factory)
        self.norm_k = RMSNorm(dim, eps, **factory)


class SelfAttention(_Projections):
    """q, k, v, o projections with RMSNorm on q and k over the full dim, then 3D RoPE on q and k.

    The attention itself is ``attn_fn``: the engine owns the paged KV cache of earlier chunks.
    """

    def forward(self, x, layer_idx: int, attn_fn: AttnFn, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [B, T, dim] fp32; rope: (cos, sin) [B, T, 1, D/2] fp32 from rope_tables -> [B, T, dim] (model dtype)."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.norm_q(_linear(self.q, x)).view(shape)  # q: [B, T, H, D]
        k = self.norm_k(_linear(self.k, x)).view(shape)
        v = _linear(self.v, x).view(shape)
        q = apply_rope_tables(q, *rope)
        k = apply_rope_tables(k, *rope)
        out = attn_fn(layer_idx, q, k, v)
        if tuple(out.shape) != shape:
            raise ValueError(f"attn_fn(layer {layer_idx}) returned shape {tuple(out.shape)}, expected {shape}")
        return _linear(self.o, out.reshape(b, t, -1))


class CrossAttention(_Projections):
    """Attention of the video tokens to the embedded text context (Wan's T2V cross-attention)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim]; context: [B, Lc, dim] -> [B, T, dim] (model dtype)."""
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.norm_q(_linear(self.q, x)).view(b, t, h, d).transpose(1, 2)  # q: [B, H, T, D]
        k = self.norm_k(_linear(self.k, context)).view(b, -1, h, d).transpose(1, 2)  # k: [B, H, Lc, D]
        v = _linear(self.v, context).view(b, -1, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, D]
        return _linear(self.o, out.transpose(1, 2).reshape(b, t, -1))


class DiTBlock(nn.Module):
    """One Wan attention block: modulated self-attention, cross-attention, modulated FFN.

    ``modulation`` [1, 6, dim] is added to the time projection: (shift, scale, gate) for self-attention,
    then (shift, scale, gate) for the FFN. ``cross_attn_norm`` (Wan's default) applies the affine
    LayerNorm ``norm3`` before cross-attention.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, **factory):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, eps, **factory)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True, **factory)
        self.cross_attn = CrossAttention(dim, num_heads, eps, **factory)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim, **factory), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim, **factory)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim, **factory))

    def modulations(self, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """e0: [B, 6, dim] fp32 -> (shift1, scale1, gate1, shift2, scale2, gate2), each [B, 1, dim] fp32."""
        return (self.modulation.float() + e0).unsqueeze(2).unbind(1)

    def attend(self, x, mods, context, layer_idx, attn_fn, rope) -> torch.Tensor:
        """Self-attention and cross-attention residuals: x [B, T, dim] fp32 -> [B, T, dim] fp32."""
        shift1, scale1, gate1 = mods[:3]
        h = _layer_norm(x, self.eps) * (1 + scale1) + shift1
        x = x + self.self_attn(h, layer_idx, attn_fn, rope).float() * gate1
        return x + self.cross_attn(self.norm3(x.to(self.norm3.weight.dtype)), context).float()

    def feed_forward(self, x, mods) -> torch.Tensor:
        """Modulated FFN residual: x [B, T, dim] fp32 -> [B, T, dim] fp32."""
        shift2, scale2, gate2 = mods[3:]
        h = _layer_norm(x, self.eps) * (1 + scale2) + shift2
        ffn = self.ffn[2](self.ffn[1](_linear(self.ffn[0], h)))
        return x + ffn.float() * gate2

    def forward(self, x, e0, context, layer_idx, attn_fn, rope):
        """x: [B, T, dim] fp32 residual stream; e0: [B, 6, dim] fp32 time projection;
        context: [B, Lc, dim]; rope: (cos, sin) tables. Returns [B, T, dim] fp32."""
        mods = self.modulations(e0)
        return self.feed_forward(self.attend(x, mods, context, layer_idx, attn_fn, rope), mods)



class Head(nn.Module):
    """Output head: LayerNorm + (shift, scale) modulation from the time embedding, then a Linear to
    ``prod(patch_size) * out_channels`` per token."""

    def __init__(self, dim: int, out_features: int, eps: float, **factory) -> None:
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features, **factory)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim, **factory))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] fp32; e: [B, dim] fp32 time embedding -> [B, T, out_features] fp32."""
        shift, scale = (self.modulation.float() + e[:, None, :]).unsqueeze(2).unbind(1)  # each [B, 1, dim]
        return _linear(self.head, _layer_norm(x, self.eps) * (1 + scale) + shift).float()


def init_weights_(module: nn.Module, generator: torch.Generator) -> None:
    """Random init in place, deterministic for a given generator state (see build_model).

    Linear/Conv: Xavier-uniform weights and zero biases (Wan's init); modulation ~ N(0, 1/dim) as Wan;
    unlike Wan, the head is not zero-initialised so a randomly built model produces a non-trivial output.
    """
    for name, mod in module.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv3d)):
            w = mod.weight
            fan_out = w.shape[0]
            fan_in = w[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            with torch.no_grad():
                w.uniform_(-bound, bound, generator=generator)
                if mod.bias is not None:
                    mod.bias.zero_()
        elif isinstance(mod, (DiTBlock, Head)):
            with torch.no_grad():
                dim = mod.modulation.shape[-1]
                mod.modulation.normal_(0.0, dim ** -0.5, generator=generator)
