"""LingBot-World v2 causal-fast through FastVideo's own LingBotWorld2CausalFastGenerationStage
(its chunk loop, camera conditioning from ``poses.npy`` / ``intrinsics.npy``, clean pass), without
and with WorldKV: evict, bank and retrieve every chunk back -> FastVideo's output (fp32, 1e-5).
The VAE is a fixed random projection (the stage only needs ``encode(...).mean``)."""
from __future__ import annotations

import os
import types

import numpy as np
import torch

import fastvideo_drive as drive
import fastvideo_tiny as tiny
from worldkv_connector.integration.fastvideo import enable_worldkv, worldkv_binding
from worldkv_connector.retrieval.poses import yaw_matrix

VIDEO_FRAMES = 73  # -> 19 latent frames -> 18 = 6 chunks


class _ProjectionVAE(torch.nn.Module):
    scaling_factor = torch.tensor(1.0)
    shift_factor = None

    def __init__(self):
        super().__init__()
        self.w = torch.randn(16, 3, generator=torch.Generator().manual_seed(5))

    def encode(self, video):  # [1, 3, F, H, W] -> mean [1, 16, (F - 1) // 4 + 1, H / 8, W / 8]
        v = torch.cat([video[:, :, :1], video[:, :, 1::4]], 2)
        v = torch.nn.functional.avg_pool3d(v, (1, 8, 8))
        return types.SimpleNamespace(mean=torch.einsum("oc,bcfhw->bofhw", self.w, v))


def _model(local_attn_size: int, sink_size: int):
    from fastvideo.configs.models.dits.lingbotworld2 import LingBotWorld2CausalFastVideoConfig
    from fastvideo.models.dits.lingbotworld2.causal_fast import LingBotWorld2CausalFastTransformer3DModel

    cfg = LingBotWorld2CausalFastVideoConfig()
    a = cfg.arch_config
    a.dim, a.num_heads, a.in_dim, a.out_dim = 32, 2, 36, 16  # the stage draws 16-channel noise
    a.text_dim, a.ffn_dim, a.freq_dim, a.num_layers, a.text_len = 16, 64, 32, 2, 8
    a.local_attn_size, a.sink_size, a.chunk_size, a.max_area = local_attn_size, sink_size, 3, 64 * 64
    torch.manual_seed(0)
    m = LingBotWorld2CausalFastTransformer3DModel(cfg, {}).float().eval()
    tiny._randomize(m, 0)
    return m, cfg


def _run(action_path, local_attn_size, sink_size, enable=None):
    from fastvideo.models.schedulers.scheduling_flow_unipc_multistep import FlowUniPCMultistepScheduler
    from fastvideo.pipelines.basic.lingbotworld2.causal_fast_pipeline import LingBotWorld2CausalFastGenerationStage
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch

    m, cfg = _model(local_attn_size, sink_size)
    drive.fp32_inputs(m)
    stage = LingBotWorld2CausalFastGenerationStage(m, FlowUniPCMultistepScheduler(shift=1.0, use_dynamic_shifting=False),
                                                   _ProjectionVAE())
    orig = stage._initialize_self_kv_cache
    # the stage asks for bf16 caches (for its CUDA autocast); the fp32 model on the CPU needs fp32
    stage._initialize_self_kv_cache = lambda b, kv_size, dtype, device: orig(b, kv_size, torch.float32, device)
    if enable is not None:
        enable(stage)
    args = types.SimpleNamespace(vae_cpu_offload=False, pipeline_config=types.SimpleNamespace(dit_config=cfg))
    g = torch.Generator().manual_seed(0)
    batch = ForwardBatch(data_type="video", prompt_embeds=[torch.randn(1, 8, 16, generator=g)],
                         pil_image=torch.rand(3, 64, 64, generator=g) * 2 - 1, num_frames=VIDEO_FRAMES, seed=7,
                         action_path=str(action_path), max_sequence_length=8)
    return stage.forward(batch, args).latents, stage


def test_lingbot_stage_forward_equals_fastvideo(tmp_path, fastvideo_dist):
    c2ws = np.repeat(np.eye(4)[None], VIDEO_FRAMES, axis=0)
    for i in range(VIDEO_FRAMES):
        c2ws[i, :3, :3] = yaw_matrix(2.0 * i)
        c2ws[i, :3, 3] = [0.02 * i, 0.0, 0.0]
    np.save(os.path.join(tmp_path, "poses.npy"), c2ws)
    np.save(os.path.join(tmp_path, "intrinsics.npy"), np.array([[500.0, 500.0, 416.0, 240.0]]))
    ref, _ = _run(tmp_path, 18, 0)  # FastVideo's own window holds all 18 latent frames
    out, stage = _run(tmp_path, 9, 3, lambda s: enable_worldkv(
        s, connector={"keep_ratio": 1.0, "retrieval_chunks": 6}, sink_frames=3, recent_frames=3, page_size=4))
    b = worldkv_binding(stage)
    assert ref.shape == (1, 16, 18, 8, 8)
    assert b.host.retrieved_log == [[], [], [], [1], [1, 2], [1, 2, 3]]
    assert (out - ref).abs().max().item() <= 1e-5
    assert b.metrics()["bank_entries"] == 0  # the stage call was the world
    # the poses the bank was labelled with are LingBot's absolute c2w (first latent frame = frame 0)
    np.testing.assert_allclose(b.latent_poses[0], c2ws[0], atol=1e-9)
    assert b.latent_poses.shape == (18, 4, 4)
