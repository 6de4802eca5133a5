"""The worldkv plugin in SGLang's CausalWan stage (tiny random model, CPU, fp32): the entry point,
parity with SGLang's own cache, bounded memory over a long session, session isolation, failed loads."""
import types
from importlib.metadata import entry_points

import pytest
import torch

import harness
from worldkv_connector.integration.sglang import plugin
from worldkv_connector.testing import submit_each_layer

pytestmark = pytest.mark.sglang

CHUNKS = 6


def sglang_stage(hooks, model, **kw):
    """A stage with SGLang's own cache (the original allocation, not the plugin's)."""
    stage = harness.make_stage(model, **kw)
    stage._allocate_causal_kv_cache = types.MethodType(hooks, stage)
    return stage


def run(stage, chunks=CHUNKS, seed=0):
    r = harness.Run(stage, seed=seed)
    return r, [r.chunk(i) for i in range(chunks)]


def test_entry_point_is_visible():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.multimodal_gen.plugins")}
    assert eps.get("worldkv") == "worldkv_connector.integration.sglang:register"


def test_plugin_replaces_the_cache(hooks, worldkv):
    from worldkv_connector.integration.sglang.cache import WorldKVCausalKVCache

    worldkv(keep_ratio=1.0)
    r = harness.Run(harness.make_stage(harness.tiny_causal_wan(), sink_frames=3, window_frames=12))
    assert all(isinstance(c, WorldKVCausalKVCache) for c in r.kv_cache)


@pytest.mark.parametrize("window", ["never_evicts", "retrieves_everything"])
def test_keep_ratio_one_equals_sglang_cache(hooks, worldkv, window):
    model = harness.tiny_causal_wan()
    _, want = run(sglang_stage(hooks, model, sink_frames=3, window_frames=3 * CHUNKS))
    if window == "never_evicts":
        worldkv(keep_ratio=1.0)
        stage = harness.make_stage(model, sink_frames=3, window_frames=3 * CHUNKS)
    else:  # a window of sink + one recent chunk; every chunk that left it comes back from the bank
        worldkv(keep_ratio=1.0, retrieval_chunks=CHUNKS, hot_chunks=CHUNKS, sink_frames=3, recent_frames=3)
        stage = harness.make_stage(model, sink_frames=3, window_frames=9)
    r, got = run(stage)
    for c, (w, g) in enumerate(zip(want, got)):
        for p, (wp, gp) in enumerate(zip(w, g)):
            torch.testing.assert_close(gp, wp, rtol=0, atol=1e-5, msg=f"chunk {c} pass {p}")
    group = r.kv_cache[0].group
    if window == "retrieves_everything":
        assert group.retrieved[-1] == list(range(1, CHUNKS - 2))  # sink 0, recent CHUNKS-2, current CHUNKS-1
    else:
        assert all(not ids for ids in group.retrieved)


def test_window_without_memory_differs(hooks, worldkv, caplog):
    """The parity above is not vacuous: without retrieval the same small window gives other outputs.
    CausalWan has no camera: with WORLDKV_POSELESS=off retrieval is off, and the log says so."""
    model = harness.tiny_causal_wan()
    _, want = run(sglang_stage(hooks, model, sink_frames=3, window_frames=3 * CHUNKS))
    worldkv(poseless="off", keep_ratio=1.0, sink_frames=3, recent_frames=3)
    with caplog.at_level("INFO", logger="worldkv_connector.integration.sglang.cache"):
        r, got = run(harness.make_stage(model, sink_frames=3, window_frames=9))
    assert "causal_wan has no camera poses; retrieval is off" in caplog.text
    assert all(not ids for ids in r.kv_cache[0].group.retrieved)
    assert (got[-1][0] - want[-1][0]).abs().max() > 1e-3


def test_a_new_request_on_the_same_caches_starts_a_new_session(hooks, worldkv):
    """SGLang resets a reused cache list for each request: the old WorldKV session ends and its
    bank entries go; the next request starts again at chunk 0."""
    worldkv(keep_ratio=1.0, retrieval_chunks=2, hot_chunks=2, sink_frames=3, recent_frames=3)
    stage = harness.make_stage(harness.tiny_causal_wan(), sink_frames=3, window_frames=9)
    r = harness.Run(stage, seed=1)
    for c in range(5):
        r.chunk(c)
    group, rt = r.kv_cache[0].group, _runtime(r)
    old = group.session.session_id
    assert rt.connector.scheduler.banked_chunks(old) == [0, 1, 2, 3, 4]
    stage._reset_causal_caches(kv_cache=r.kv_cache, crossattn_cache=r.crossattn_cache)
    rt.poll()
    assert rt.connector.scheduler.banked_chunks(old) == []
    r.chunk(0)
    assert group.session.session_id != old and group.retrieved == [[]]


def _runtime(r):
    return r.kv_cache[0].group.runtime


def test_sixty_chunks_keep_memory_flat(hooks, worldkv):
    worldkv(keep_ratio=0.5, retrieval_chunks=2, hot_chunks=2, sink_frames=3, recent_frames=3,
            page_size=harness.FRAME_TOKENS)
    r = harness.Run(harness.make_stage(harness.tiny_causal_wan(), sink_frames=3, window_frames=9), seed=1)
    r.num_passes = 1
    rt = _runtime(r)
    used = []
    for c in range(60):
        r.chunk(c)
        used.append(rt.bm.num_used)
    # after the window filled, the pages in use never grow: sink + recent + hot set + current
    per_chunk = -(-rt.chunk_tokens // rt.bm.page_size)
    bound = (1 + 1 + 1 + 2) * per_chunk + per_chunk  # + one evicted chunk waiting for its store
    assert max(used[10:]) <= bound and max(used[10:]) == max(used[10:20])
    print(f"60 chunks: pages in use after chunk 10..60 max {max(used[10:])} (bound {bound}), at chunk 60 {used[-1]}; "
          f"SGLang's growing cache would hold {60 * per_chunk} pages")
    assert len(rt.connector.scheduler.banked_chunks(r.kv_cache[0].group.session.session_id)) >= 55


def test_two_sessions_never_see_each_other(hooks, worldkv):
    worldkv(keep_ratio=1.0, retrieval_chunks=4, hot_chunks=4, sink_frames=3, recent_frames=3)
    model = harness.tiny_causal_wan()
    a = harness.Run(harness.make_stage(model, sink_frames=3, window_frames=9), seed=1)
    b = harness.Run(harness.make_stage(model, sink_frames=3, window_frames=9), seed=2)
    outs = {"a": [], "b": []}
    for c in range(6):  # interleaved chunk by chunk on one connector
        outs["a"].append(a.chunk(c))
        outs["b"].append(b.chunk(c))
    ga, gb = a.kv_cache[0].group, b.kv_cache[0].group
    assert ga.runtime is gb.runtime and ga.session.session_id != gb.session.session_id
    banked = ga.runtime.connector.scheduler
    assert set(banked.banked_chunks(ga.session.session_id)) == set(range(6))
    # session a alone gives the same outputs: b's chunks never entered a's window
    plugin.reset_runtimes()
    alone = harness.Run(harness.make_stage(model, sink_frames=3, window_frames=9), seed=1)
    for c in range(6):
        for p, o in enumerate(alone.chunk(c)):
            torch.testing.assert_close(o, outs["a"][c][p], rtol=0, atol=1e-6)


class GarbageLoads:
    """Wraps the transfer engine (both submit paths): while ``fail`` is set, loads write garbage and
    report an error."""

    def __init__(self, inner):
        self.inner, self.fail = inner, False

    def _spoil(self, kind, job, dsts):
        if kind == "load" and self.fail:
            for d in dsts:
                d.fill_(0x46)  # bytes of 1.27e4 as fp32: wrong data that must never reach attention
            job.error = "RuntimeError: injected"
        return job

    def submit(self, kind, srcs, dsts, **kw):
        return self._spoil(kind, self.inner.submit(kind, srcs, dsts, **kw), [d.view(-1).view(torch.uint8) for d in dsts])

    def submit_plan(self, kind, plan, **kw):
        return self._spoil(kind, self.inner.submit_plan(kind, plan, **kw), plan.dst_views())

    def submit_layers(self, kind, plans, **kw):  # the load path's call: each layer's job spoiled as above
        return submit_each_layer(self.submit_plan, kind, plans, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_failed_load_leaves_the_chunk_out(hooks, worldkv):
    worldkv(keep_ratio=1.0, retrieval_chunks=2, hot_chunks=2, sink_frames=3, recent_frames=3)
    model = harness.tiny_causal_wan()
    r = harness.Run(harness.make_stage(model, sink_frames=3, window_frames=9), seed=3)
    for c in range(4):
        r.chunk(c)
    group = r.kv_cache[0].group
    faults = group.runtime.connector.wrap_transfer(GarbageLoads)
    faults.fail = True
    bad = r.chunk(4)
    # chunk 1 stayed resident (hot set) from the step before; chunk 2's load failed: it is left out
    assert group.retrieved[-1] == [1]
    assert all(torch.isfinite(o).all() and o.abs().max() < 100 for o in bad)
    faults.fail = False
    r.chunk(5)
    assert 2 in group.retrieved[-1]  # loaded again from the bank (the bank copy was never corrupted)


def test_evicted_chunk_pages_wait_for_their_store(hooks, worldkv):
    """Stores that report late (3 polls): a chunk leaving the window keeps its pages until its
    store ended (its memory is not reused before it is banked), and becomes retrievable only then."""
    from worldkv_connector.testing import FaultyTransferEngine

    cfg = dict(keep_ratio=0.5, retrieval_chunks=2, hot_chunks=2, sink_frames=3, recent_frames=3,
               page_size=harness.FRAME_TOKENS)
    model = harness.tiny_causal_wan()
    held, picks = {}, {}
    for delay in (0, 3):
        worldkv(**cfg)
        r = harness.Run(harness.make_stage(model, sink_frames=3, window_frames=9), seed=5)
        r.num_passes = 1
        rt = _runtime(r)
        if delay:
            rt.connector.wrap_transfer(lambda t: FaultyTransferEngine(t, delay_polls=delay))
        for c in range(10):
            r.chunk(c)
        held[delay] = rt.bm.num_used
        picks[delay] = list(r.kv_cache[0].group.retrieved)
        for _ in range(delay + 1):
            rt.poll()
        if delay:  # once the stores reported, the waiting pages go back
            assert rt.bm.num_used == held[0]
    assert held[3] > held[0]  # evicted chunks still wait for their stores
    # chunk 1 left the window after chunk 2; banked at once it is picked for chunk 3, late only for chunk 5
    assert picks[0][3] == [1] and picks[3][3] == [] and picks[3][5] == [1]


def test_a_request_aborted_mid_chunk_leaves_nothing_behind(hooks, worldkv):
    """A forward that fails inside a chunk (before its clean pass): the next request's reset ends
    the session; the half-made chunk is not banked and nothing stays pending or held."""
    worldkv(keep_ratio=1.0, retrieval_chunks=2, hot_chunks=2, sink_frames=3, recent_frames=3)
    stage = harness.make_stage(harness.tiny_causal_wan(), sink_frames=3, window_frames=9)
    r = harness.Run(stage, seed=1)
    for c in range(3):
        r.chunk(c)
    group, rt = r.kv_cache[0].group, _runtime(r)
    sid = group.session.session_id
    x = torch.randn(1, harness.IN_CH, harness.FPC, harness.LAT_H, harness.LAT_W)
    with torch.no_grad():  # one denoising pass of chunk 3, then the request dies (no clean pass)
        stage._forward_causal_transformer(
            r.batch, latent_model_input=x, prompt_embeds=[r.context], timestep=torch.full((1, 1), 900.0),
            kv_cache=r.kv_cache, crossattn_cache=r.crossattn_cache, current_start_tokens=3 * rt.chunk_tokens,
            start_frame=3 * harness.FPC, image_kwargs={}, pos_cond_kwargs={}, current_timestep=0,
            attn_metadata=None, target_dtype=torch.float32, autocast_enabled=False)
    assert group.session.in_step
    stage._reset_causal_caches(kv_cache=r.kv_cache, crossattn_cache=r.crossattn_cache)
    for _ in range(3):
        rt.poll()
    assert rt.connector.scheduler.pending_stores(sid) == 0
    assert rt.connector.scheduler.banked_chunks(sid) == [] and rt.bm.num_used == 0
