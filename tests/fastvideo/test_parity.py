"""WorldKV in place of FastVideo's rolling cache, against FastVideo's own cache (same weights,
same inputs, fp32): with keep_ratio 1.0 and a window that loses nothing, the outputs are FastVideo's.

Two ways to lose nothing: a recent window that holds every chunk (nothing leaves it), and a
recent window of one chunk where every evicted chunk is banked and retrieved back (the bank path:
write-through stores at the clean pass, loads into pages, the window rebuilt sink | retrieved |
recent). A window that evicts without retrieval must differ (the check can fail)."""
from __future__ import annotations

import pytest
import torch

import fastvideo_drive as drive
import fastvideo_tiny as tiny
from worldkv_connector.integration.fastvideo import FastVideoWorldKVConfig, WorldKVBinding
from worldkv_connector.integration.fastvideo.models import spec_for

N = 6  # chunks
BUILD = {"causal_wan": tiny.tiny_causal_wan, "matrixgame2": tiny.tiny_matrixgame2, "lingbot2": tiny.tiny_lingbot2}


def _fastvideo_own(kind, actions):
    m = BUILD[kind](local_attn_size=3 * N, sink_size=0)  # FastVideo's window holds all N chunks
    return drive.run(kind, m, drive.dense_caches(m, kind, 3 * N), N, actions=actions)


def _bound(kind, *, recent_frames, retrieval_chunks, keep_ratio=1.0):
    """A tiny model of ``kind`` with WorldKV installed, and the caches to drive it with."""
    m = BUILD[kind](local_attn_size=9, sink_size=3)  # FastVideo's own window settings are replaced
    cfg = FastVideoWorldKVConfig(connector={"keep_ratio": keep_ratio, "retrieval_chunks": retrieval_chunks},
                                 sink_frames=3, recent_frames=recent_frames, page_size=4)
    b = WorldKVBinding(m, spec_for(m), cfg)
    b.install()
    caches = {"kv_cache": b.new_caches(1, torch.float32, "cpu")}
    if kind == "matrixgame2":
        ms, kb = b.new_action_caches()
        caches.update(kv_cache_mouse=ms, kv_cache_keyboard=kb)
    return m, b, caches


def _worldkv(kind, actions, *, recent_frames, retrieval_chunks, keep_ratio=1.0):
    m, b, caches = _bound(kind, recent_frames=recent_frames, retrieval_chunks=retrieval_chunks, keep_ratio=keep_ratio)
    out = drive.run(kind, m, caches, N, actions=actions)
    log = list(b.host.retrieved_log)
    metrics = b.metrics()
    b.uninstall()
    return out, log, metrics


@pytest.fixture(scope="module")
def refs(fastvideo_dist):
    actions = drive.mg2_actions_for(N)
    return {k: (_fastvideo_own(k, actions if k == "matrixgame2" else None), actions) for k in BUILD}


@pytest.mark.parametrize("kind", list(BUILD))
def test_never_evicting_window_equals_fastvideo(kind, refs):
    ref, actions = refs[kind]
    out, log, _ = _worldkv(kind, actions, recent_frames=3 * (N - 1), retrieval_chunks=0)
    assert all(r == [] for r in log)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", list(BUILD))
def test_evict_bank_and_retrieve_all_equals_fastvideo(kind, refs):
    ref, actions = refs[kind]
    out, log, metrics = _worldkv(kind, actions, recent_frames=3, retrieval_chunks=N)
    # chunk c sees sink 0, retrieved 1..c-2 (banked, loaded back), recent c-1
    assert log == [[], [], [], [1], [1, 2], [1, 2, 3]]
    assert metrics["bytes_loaded"] > 0 and metrics["bytes_stored"] > 0
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", list(BUILD))
def test_eviction_without_retrieval_differs(kind, refs):
    ref, actions = refs[kind]
    out, _, _ = _worldkv(kind, actions, recent_frames=3, retrieval_chunks=0)
    assert (out[:3] - ref[:3]).abs().max().item() <= 1e-5  # the window still holds everything
    assert (out[3:] - ref[3:]).abs().max().item() > 1e-3  # chunk 1 is gone from chunk 3 on


def test_causal_wan_stage_forward_equals_fastvideo(fastvideo_dist):
    """FastVideo's own CausalDMDDenosingStage.forward (Self-Forcing's chunk loop and clean pass),
    without and with WorldKV enabled on it."""
    from worldkv_connector.integration.fastvideo import enable_worldkv, worldkv_binding

    stage, args = drive.causal_wan_stage(tiny.tiny_causal_wan(local_attn_size=3 * N))
    ref = stage.forward(drive.causal_wan_batch(N), args).latents.clone()
    stage2, args2 = drive.causal_wan_stage(tiny.tiny_causal_wan(local_attn_size=9, sink_size=3))
    enable_worldkv(stage2, connector={"keep_ratio": 1.0, "retrieval_chunks": N}, sink_frames=3, recent_frames=3,
                   page_size=4)
    out = stage2.forward(drive.causal_wan_batch(N), args2).latents
    b = worldkv_binding(stage2)
    assert b.host.retrieved_log == [[], [], [], [1], [1, 2], [1, 2, 3]]
    assert (out - ref).abs().max().item() <= 1e-5
    assert b.metrics()["bank_entries"] == 0  # the stage call was the world: its bank is freed


def test_matrixgame2_stage_forward_equals_fastvideo(fastvideo_dist):
    """FastVideo's own MatrixGame2CausalDenoisingStage.forward (per-block seams), with its keyboard
    and mouse caches, without and with WorldKV (evict, bank, retrieve everything back)."""
    from worldkv_connector.integration.fastvideo import enable_worldkv, worldkv_binding

    def batch():
        bt = drive.matrixgame2_batch(N)
        bt.keyboard_cond, bt.mouse_cond = drive.mg2_actions_for(N)
        return bt

    stage, args = drive.matrixgame2_stage(tiny.tiny_matrixgame2(local_attn_size=3 * N))
    ref = stage.forward(batch(), args).latents.clone()
    stage2, args2 = drive.matrixgame2_stage(tiny.tiny_matrixgame2(local_attn_size=9, sink_size=3))
    enable_worldkv(stage2, connector={"keep_ratio": 1.0, "retrieval_chunks": N}, sink_frames=3, recent_frames=3,
                   page_size=4)
    out = stage2.forward(batch(), args2).latents
    assert worldkv_binding(stage2).host.retrieved_log == [[], [], [], [1], [1, 2], [1, 2, 3]]
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["causal_wan", "matrixgame2"])
def test_failed_loads_drop_the_chunk_from_every_window(kind, refs):
    """Every load fails: the retrieved chunks leave the step's window (self-attention and, for
    Matrix-Game-2, the action caches), so the outputs are exactly those of a window that never
    retrieved: never attention over pages that did not arrive."""
    from worldkv_connector.testing import FaultyTransferEngine

    _, actions = refs[kind]
    plain, _, _ = _worldkv(kind, actions, recent_frames=3, retrieval_chunks=0)
    m, b, caches = _bound(kind, recent_frames=3, retrieval_chunks=N)

    def fail_loads_from_now(c):
        if c == 0:  # the host (and its connector) is built at the first call: wrap its transfer engine then
            b.host.connector.wrap_transfer(lambda t: FaultyTransferEngine(t, fail_loads=1.0))

    out = drive.run(kind, m, caches, N, actions=actions, on_chunk=fail_loads_from_now)
    assert b.metrics()["load_errors"] > 0
    assert b.host.retrieved_log[3:] == [[], [], []]  # every retrieved chunk was dropped
    assert (out - plain).abs().max().item() <= 1e-5
    b.uninstall()
