"""Tiny random FastVideo models (the pinned fastvideo 0.2.1's own classes) for CPU tests.

Each builder returns the real FastVideo DiT class with small widths, fp32, random weights
(seeded), on the CPU. ``fastvideo_shims.install()`` must have run first (the conftest does it).

Shapes (defaults): latents [B=1, C, T, H=4, W=4], patch (1, 2, 2) -> 4 tokens per latent frame,
3 latent frames per chunk.
"""
from __future__ import annotations

import torch

__all__ = ["tiny_causal_wan", "tiny_matrixgame2", "tiny_lingbot2", "FRAME_H", "FRAME_W"]

FRAME_H = 4  # latent height
FRAME_W = 4  # latent width


def tiny_causal_wan(*, layers: int = 2, heads: int = 2, head_dim: int = 16, local_attn_size: int = -1,
                    sink_size: int = 0, text_dim: int = 16, seed: int = 0):
    """CausalWanTransformer3DModel (Self-Forcing / CausVid), in/out 4 channels."""
    from fastvideo.configs.models.dits import WanVideoConfig
    from fastvideo.models.dits.causal_wanvideo import CausalWanTransformer3DModel

    cfg = WanVideoConfig()
    a = cfg.arch_config
    a.num_attention_heads, a.attention_head_dim = heads, head_dim
    a.in_channels = a.out_channels = 4
    a.text_dim, a.ffn_dim, a.freq_dim, a.num_layers = text_dim, 2 * heads * head_dim, 32, layers
    a.local_attn_size, a.sink_size = local_attn_size, sink_size
    a.__post_init__()
    torch.manual_seed(seed)
    model = CausalWanTransformer3DModel(cfg, {}).float().eval()
    _randomize(model, seed)
    return model


def tiny_matrixgame2(*, layers: int = 2, heads: int = 2, head_dim: int = 16, local_attn_size: int = -1,
                     sink_size: int = 0, image_dim: int = 16, seed: int = 0):
    """CausalMatrixGame2WanModel with its action module (keyboard [B,T,4], mouse [B,T,2]) in
    every block. The action module's mouse RoPE head size is fixed at 64 by FastVideo, so the
    action heads are 64 wide whatever the DiT width."""
    from fastvideo.configs.models.dits.matrixgame2 import MatrixGame2WanVideoConfig
    from fastvideo.models.dits.matrixgame2.causal_model import CausalMatrixGame2WanModel

    cfg = MatrixGame2WanVideoConfig()
    a = cfg.arch_config
    dim = heads * head_dim
    a.num_attention_heads, a.attention_head_dim = heads, head_dim
    a.in_channels, a.out_channels = 8, 4  # MG2 concatenates the image latent (4 + 4 channels)
    a.ffn_dim, a.freq_dim, a.num_layers, a.image_dim = 2 * dim, 32, layers, image_dim
    a.local_attn_size, a.sink_size = local_attn_size, sink_size
    a.action_config = dict(a.action_config)
    a.action_config.update(
        blocks=list(range(layers)), heads_num=1, hidden_size=64, img_hidden_size=dim,
        keyboard_hidden_dim=64, mouse_hidden_dim=64, mouse_qk_dim_list=[16, 24, 24],
        rope_dim_list=[16, 24, 24], windows_size=3,
    )
    a.__post_init__()
    torch.manual_seed(seed)
    model = CausalMatrixGame2WanModel(cfg, {}).float().eval()
    _randomize(model, seed)
    return model


def tiny_lingbot2(*, layers: int = 2, heads: int = 2, head_dim: int = 16, local_attn_size: int = 18,
                  sink_size: int = 6, text_dim: int = 16, seed: int = 0):
    """LingBotWorld2CausalFastTransformer3DModel (i2v: in 8 = 4 noise + 4 image channels; camera
    Plücker conditioning through ``dit_cond_dict['c2ws_plucker_emb']``)."""
    from fastvideo.configs.models.dits.lingbotworld2 import LingBotWorld2CausalFastVideoConfig
    from fastvideo.models.dits.lingbotworld2.causal_fast import LingBotWorld2CausalFastTransformer3DModel

    cfg = LingBotWorld2CausalFastVideoConfig()
    a = cfg.arch_config
    a.dim, a.num_heads, a.in_dim, a.out_dim = heads * head_dim, heads, 8, 4
    a.text_dim, a.ffn_dim, a.freq_dim, a.num_layers, a.text_len = text_dim, 2 * heads * head_dim, 32, layers, 8
    a.local_attn_size, a.sink_size, a.chunk_size = local_attn_size, sink_size, 3
    torch.manual_seed(seed)
    model = LingBotWorld2CausalFastTransformer3DModel(cfg, {}).float().eval()
    _randomize(model, seed)
    return model


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (FastVideo zero-inits some output projections, which would make
    a whole branch invisible to the tests)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5))
