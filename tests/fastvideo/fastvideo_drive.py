"""Drive FastVideo's causal transformers chunk by chunk the way its stages do (N denoising
passes at the same ``current_start``, then the clean pass at ``context_noise`` = 0), with either
FastVideo's own dense rolling cache or a WorldKV binding's window dicts. fp32 on the CPU.

``run(kind, model, caches, chunks)`` returns the last denoising pass's output of every chunk,
[chunks, C, F, H, W]. Inputs are seeded per chunk, so two runs see identical inputs.
"""
from __future__ import annotations

import torch

__all__ = ["run", "dense_caches", "FT", "STEPS", "mg2_actions_for"]

FT = 4  # tokens per latent frame (4x4 latents, 2x2 patches)
FPC = 3
STEPS = (1000, 750, 500)


def dense_caches(model, kind: str, frames: int) -> dict:
    """FastVideo's own caches, laid out as its stages allocate them (fp32 here)."""
    def one(rows, n, h, d):
        return {"k": torch.zeros(rows, n, h, d), "v": torch.zeros(rows, n, h, d),
                "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])}

    layers = len(model.blocks)
    if kind == "lingbot2":
        h, d = model.num_heads, model.dim // model.num_heads
    else:
        h, d = model.num_attention_heads, model.attention_head_dim
    out = {"kv_cache": [one(1, frames * FT, h, d) for _ in range(layers)]}
    if kind == "matrixgame2":
        ac = model.action_config
        ah = ac["heads_num"]
        out["kv_cache_keyboard"] = [one(1, frames, ah, ac["keyboard_hidden_dim"] // ah) for _ in range(layers)]
        out["kv_cache_mouse"] = [one(FT, frames, ah, ac["mouse_hidden_dim"] // ah) for _ in range(layers)]
    return out


def mg2_actions_for(chunks: int, yaw_per_frame=None, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """keyboard [1, T, 4], mouse [1, T, 2] for ``chunks`` chunks (T = 1 + 4 * (3 * chunks - 1));
    ``yaw_per_frame``: optional [T] mouse yaw (pitch 0, no keys); else random actions."""
    t = 1 + 4 * (FPC * chunks - 1)
    if yaw_per_frame is not None:
        mouse = torch.zeros(1, t, 2)
        mouse[0, :, 1] = torch.as_tensor(yaw_per_frame[:t], dtype=torch.float32)
        return torch.zeros(1, t, 4), mouse
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, t, 4, generator=g) > 0.7).float(), torch.randn(1, t, 2, generator=g) * 0.1


def _xcache(kind: str, layers: int, model) -> list[dict]:
    if kind == "lingbot2":
        h, d = model.num_heads, model.dim // model.num_heads
        return [{"k": torch.zeros(1, 8, h, d), "v": torch.zeros(1, 8, h, d), "is_init": torch.tensor([0])}
                for _ in range(layers)]
    return [{"is_init": False} for _ in range(layers)]


def run(kind: str, model, caches: dict, chunks: int, *, actions=None, start_chunk: int = 0,
        on_chunk=None) -> torch.Tensor:
    from fastvideo.forward_context import set_forward_context

    layers = len(model.blocks)
    xc = _xcache(kind, layers, model)
    outs = []
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for c in range(start_chunk, start_chunk + chunks):
            g = torch.Generator().manual_seed(1000 + c)
            x = torch.randn(1, 4, FPC, 4, 4, generator=g)
            cond = torch.randn(1, 4, FPC, 4, 4, generator=g)
            text = torch.randn(1, 8, 16, generator=g)
            img = torch.randn(1, 4, 16, generator=g)
            plucker = torch.randn(1, 384, FPC, 4, 4, generator=g)
            kw = dict(caches, crossattn_cache=xc, current_start=c * FPC * FT)
            for t in list(STEPS) + [0]:
                if kind == "causal_wan":
                    out = model(x, text, torch.full((1, 1), t), start_frame=c * FPC, **kw)
                elif kind == "matrixgame2":
                    keys, mouse = actions
                    end = 1 + 4 * (c * FPC + FPC - 1)
                    out = model(torch.cat([x, cond], 1), None, torch.full((1, FPC), t), encoder_hidden_states_image=img,
                                mouse_cond=mouse[:, :end], keyboard_cond=keys[:, :end], start_frame=c * FPC,
                                num_frame_per_block=FPC, **kw)
                else:
                    out = model(x=[x[0]], t=torch.full((1,), float(t)), context=[text[0]], seq_len=FPC * FT,
                                y=[cond[0]], dit_cond_dict={"c2ws_plucker_emb": [plucker]}, frame_seqlen=FT,
                                max_attention_size=caches["kv_cache"][0].get("k", torch.zeros(1, 0)).shape[1] or 1,
                                **kw)
                    out = out[0][None]
                if t != 0:
                    pred = out
                    x = 0.6 * x + 0.4 * out  # a fixed update: the next pass depends on this one
            outs.append(pred[0])
            if on_chunk is not None:
                on_chunk(c)
    return torch.stack(outs)


def _to_fp32(x):
    if torch.is_tensor(x) and x.is_floating_point():
        return x.float()
    if isinstance(x, (list, tuple)) and x and torch.is_tensor(x[0]):
        return type(x)(_to_fp32(y) for y in x)
    if isinstance(x, dict) and not any(isinstance(k, str) and k.startswith("_worldkv") for k in x):
        return {k: _to_fp32(v) for k, v in x.items()}
    return x


def fp32_inputs(model) -> None:
    """FastVideo's stages cast the transformer's inputs to bf16 and rely on CUDA autocast; on the
    CPU that autocast is off, so a test-side wrapper casts the inputs back to the fp32 model."""
    orig = model.forward

    def forward(*args, **kwargs):
        return orig(*[_to_fp32(a) for a in args], **{k: _to_fp32(v) for k, v in kwargs.items()})

    model.forward = forward


def matrixgame2_stage(model, steps=STEPS):
    """FastVideo's own MatrixGame2CausalDenoisingStage on a tiny model, with the pipeline-args
    fields it reads. Returns (stage, fastvideo_args)."""
    import types

    from fastvideo.models.schedulers.scheduling_self_forcing_flow_match import SelfForcingFlowMatchScheduler
    from fastvideo.pipelines.stages.matrixgame2_denoising import MatrixGame2CausalDenoisingStage

    fp32_inputs(model)
    sched = SelfForcingFlowMatchScheduler(num_inference_steps=1000, shift=5.0, sigma_min=0.0, extra_one_step=True,
                                          training=True)
    stage = MatrixGame2CausalDenoisingStage(model, sched)
    orig, orig_act = stage._initialize_kv_cache, stage._initialize_action_kv_cache
    # the stage asks for bf16 caches (for its CUDA autocast); the fp32 model on the CPU needs fp32
    stage._initialize_kv_cache = lambda batch_size, dtype, device: orig(batch_size=batch_size, dtype=torch.float32,
                                                                        device=device)
    stage._initialize_action_kv_cache = lambda batch_size, dtype, device: orig_act(
        batch_size=batch_size, dtype=torch.float32, device=device)
    args = types.SimpleNamespace(disable_autocast=True, VSA_sparsity=0.0, pipeline_config=types.SimpleNamespace(
        dmd_denoising_steps=list(steps), warp_denoising_step=True, context_noise=0,
        dit_config=types.SimpleNamespace(boundary_ratio=None, patch_size=(1, 2, 2))))
    return stage, args


def matrixgame2_batch(chunks: int, seed: int = 0):
    """A ForwardBatch for ``chunks`` streaming chunks (actions start at zero; streaming_step fills them)."""
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch

    g = torch.Generator().manual_seed(seed)
    t = 1 + 4 * (FPC * chunks - 1)
    return ForwardBatch(data_type="video", latents=torch.randn(1, 4, FPC * chunks, 4, 4, generator=g),
                        prompt_embeds=[torch.zeros(1, 1, 16)], image_embeds=[torch.randn(1, 4, 16, generator=g)],
                        image_latent=torch.randn(1, 4, FPC * chunks, 4, 4, generator=g), generator=g,
                        keyboard_cond=torch.zeros(1, t, 4), mouse_cond=torch.zeros(1, t, 2))


def video_frames_of_chunk(c: int) -> int:
    """Video frames of actions a Matrix-Game-2 streaming step takes for chunk ``c``."""
    return 1 + 4 * (FPC - 1) if c == 0 else 4 * FPC


def causal_wan_stage(model, steps=STEPS):
    """FastVideo's own CausalDMDDenosingStage (Self-Forcing / CausVid) on a tiny model."""
    import types

    from fastvideo.models.schedulers.scheduling_self_forcing_flow_match import SelfForcingFlowMatchScheduler
    from fastvideo.pipelines.stages.causal_denoising import CausalDMDDenosingStage

    fp32_inputs(model)
    sched = SelfForcingFlowMatchScheduler(num_inference_steps=1000, shift=5.0, sigma_min=0.0, extra_one_step=True,
                                          training=True)
    stage = CausalDMDDenosingStage(model, sched)
    orig = stage._initialize_kv_cache
    # the stage asks for bf16 caches (for its CUDA autocast); the fp32 model on the CPU needs fp32
    stage._initialize_kv_cache = lambda batch_size, dtype, device: orig(batch_size, torch.float32, device)
    args = types.SimpleNamespace(disable_autocast=True, VSA_sparsity=0.0, pipeline_config=types.SimpleNamespace(
        dmd_denoising_steps=list(steps), warp_denoising_step=True, context_noise=0,
        dit_config=types.SimpleNamespace(boundary_ratio=None, patch_size=(1, 2, 2)),
        text_encoder_configs=[types.SimpleNamespace(arch_config=types.SimpleNamespace(text_len=8))]))
    return stage, args


def causal_wan_batch(chunks: int, seed: int = 0):
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch

    g = torch.Generator().manual_seed(seed)
    return ForwardBatch(data_type="video", latents=torch.randn(1, 4, FPC * chunks, 4, 4, generator=g),
                        prompt_embeds=[torch.randn(1, 8, 16, generator=g)], generator=g)
