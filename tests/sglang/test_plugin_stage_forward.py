"""SGLang's whole offline causal loop (``CausalDMDDenoisingStage.forward``: cache init, DMD denoising
of each block, clean pass, the next request resetting the caches) with the plugin, against the same
loop on SGLang's own cache. Only the request preparation is given (scheduler, timesteps, latents)."""
import types

import pytest
import torch

import harness

pytestmark = pytest.mark.sglang

CHUNKS = 5


class FlowScheduler:
    """The scheduler surface the causal DMD loop reads: sigmas, timesteps, add_noise."""

    def __init__(self, steps=(1000, 750, 500, 250)):
        self.timesteps = torch.tensor(steps, dtype=torch.float32)
        self.sigmas = self.timesteps / 1000.0

    def add_noise(self, x0, noise, timestep):
        s = (timestep.float() / 1000.0).reshape(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise


def offline_stage(model, original=None):
    from sglang.multimodal_gen.runtime.pipelines_core.stages.causal_denoising import CausalDMDForwardContext

    stage = harness.make_stage(model, sink_frames=3, window_frames=3 * CHUNKS)
    stage.transformer.independent_first_frame = False
    if original is not None:
        stage._allocate_causal_kv_cache = types.MethodType(original, stage)
    stage.progress_bar = lambda *a, **k: _NoBar()
    scheduler = FlowScheduler()

    def prepare(self, batch, server_args):
        return CausalDMDForwardContext(
            target_dtype=torch.float32, autocast_enabled=False, device=torch.device("cpu"), scheduler=scheduler,
            timesteps=scheduler.timesteps.clone(), latents=batch.latents, prompt_embeds=batch.prompt_embeds,
            image_kwargs={}, pos_cond_kwargs={}, batch_size=1, channels=harness.IN_CH,
            num_frames=batch.latents.shape[2], height=harness.LAT_H, width=harness.LAT_W)

    stage._prepare_causal_dmd_forward_context = types.MethodType(prepare, stage)
    stage._build_causal_attn_metadata = lambda *a, **k: None
    stage._get_max_text_len = lambda server_args: harness.TEXT_LEN
    return stage


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass


def request(seed):
    g = torch.Generator().manual_seed(seed)
    return types.SimpleNamespace(
        latents=torch.randn(1, harness.IN_CH, harness.FPC * CHUNKS, harness.LAT_H, harness.LAT_W, generator=g),
        prompt_embeds=[torch.randn(1, harness.TEXT_LEN, harness.TEXT_DIM, generator=g)], image_latent=None,
        extra={}, generator=torch.Generator().manual_seed(seed), is_warmup=False)


def generate(stage, seed):
    return stage.forward(request(seed), harness.shims.unit_server_args()).latents


def test_stage_forward_with_plugin_equals_sglang_cache(hooks, worldkv):
    model = harness.tiny_causal_wan()
    base = offline_stage(model, original=hooks)
    want = [generate(base, s) for s in (1, 2)]  # two requests: the second reuses and resets the caches
    worldkv(keep_ratio=1.0, retrieval_chunks=CHUNKS, hot_chunks=CHUNKS, sink_frames=3, recent_frames=3)
    ours = offline_stage(model)
    got = [generate(ours, s) for s in (1, 2)]
    group = ours.causal_kv_cache[0].group
    assert len(group.retrieved) == CHUNKS and group.retrieved[-1] == list(range(1, CHUNKS - 2))
    sessions = group.runtime.connector.scheduler.sessions()
    assert group.session.session_id in sessions and len(sessions) == 1  # the first request's session ended
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
