"""Tiny random CausalWan / LingBot-World runs through SGLang's own stage code on the CPU.

A run drives the real ``CausalDMDDenoisingStage`` seams chunk by chunk: the cache list comes from
``_initialize_causal_caches`` (so from the plugin's REPLACE hook when it is applied), each chunk runs
``num_passes`` denoising forwards through ``_forward_causal_transformer`` and then the clean pass
``_update_causal_context_cache``, as ``_denoise_and_update_causal_block`` does.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

import shims

H, D, LAYERS, IN_CH, TEXT_DIM, TEXT_LEN = 2, 12, 2, 4, 16, 8
FPC, LAT_H, LAT_W = 3, 4, 4  # 3 latent frames per chunk, 4x4 latents -> 2x2 = 4 tokens per frame
FRAME_TOKENS = (LAT_H // 2) * (LAT_W // 2)


def tiny_causal_wan(seed: int = 0):
    from sglang.multimodal_gen.configs.models.dits.wanvideo import WanVideoArchConfig, WanVideoConfig
    from sglang.multimodal_gen.runtime.models.dits.causal_wanvideo import CausalWanTransformer3DModel

    shims.init_single_process_parallel()
    arch = WanVideoArchConfig(num_attention_heads=H, attention_head_dim=D, in_channels=IN_CH, out_channels=IN_CH,
                              text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=LAYERS, num_frames_per_block=FPC)
    torch.manual_seed(seed)
    model = CausalWanTransformer3DModel(WanVideoConfig(arch_config=arch), hf_config={}).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    shims.fix_causal_wan_cross_attention(model)
    return model


def make_stage(model, *, sink_frames: int, window_frames: int, lingbot: bool = False):
    """A causal DMD stage around ``model`` (built without the pipeline loader)."""
    from sglang.multimodal_gen.runtime.pipelines_core.stages.causal_denoising import CausalDMDDenoisingStage
    from sglang.multimodal_gen.runtime.pipelines_core.stages.model_specific_stages.lingbot_world.lingbot_world_causal_denoising import (
        LingBotWorldCausalDMDDenoisingStage,
    )

    cls = LingBotWorldCausalDMDDenoisingStage if lingbot else CausalDMDDenoisingStage
    stage = cls.__new__(cls)
    stage.transformer = model
    stage.num_transformer_blocks = LAYERS
    stage.num_token_per_frame = FRAME_TOKENS
    stage.num_frames_per_block = FPC
    stage.local_attn_size = -1
    stage.sink_size = sink_frames
    stage.sliding_window_num_frames = window_frames
    stage.causal_kv_cache = stage.crossattn_cache = None
    stage.causal_kv_cache_neg = stage.crossattn_cache_neg = None
    stage._component_residency_manager = None
    stage._kv_quant_args = SimpleNamespace(enabled=False)
    return stage


class Run:
    """One session on a stage: ``chunk(i)`` generates chunk i and returns every pass's output."""

    def __init__(self, stage, seed: int = 0, num_passes: int = 2, extra: dict | None = None):
        self.stage = stage
        self.batch = SimpleNamespace(extra=dict(extra or {}), generator=None)
        self.server_args = shims.unit_server_args()
        g = torch.Generator().manual_seed(seed)
        self.context = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
        self.gen = g
        self.num_passes = num_passes
        stage._initialize_causal_caches(batch_size=1, max_text_len=TEXT_LEN, dtype=torch.float32,
                                        device=torch.device("cpu"))
        self.kv_cache, self.crossattn_cache = stage.causal_kv_cache, stage.crossattn_cache

    def chunk(self, index: int, pos_cond: dict | None = None) -> list[torch.Tensor]:
        x = torch.randn(1, IN_CH, FPC, LAT_H, LAT_W, generator=self.gen)
        start = index * FPC * FRAME_TOKENS
        outs = []
        kw = dict(prompt_embeds=[self.context], kv_cache=self.kv_cache, crossattn_cache=self.crossattn_cache,
                  current_start_tokens=start, start_frame=index * FPC, image_kwargs={}, pos_cond_kwargs=dict(pos_cond or {}),
                  target_dtype=torch.float32, autocast_enabled=False)
        with torch.no_grad():
            for p in range(self.num_passes):
                t = torch.full((1, 1), 900.0 - 300.0 * p)
                out = self.stage._forward_causal_transformer(self.batch, latent_model_input=x, timestep=t,
                                                             current_timestep=p, attn_metadata=None, **kw)
                outs.append(out)
                x = 0.5 * x + 0.5 * out  # the next pass sees this pass's output
            self.stage._update_causal_context_cache(self.batch, self.server_args, context_input=x,
                                                    attn_metadata=None, **kw)
        return outs
