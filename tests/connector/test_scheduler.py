"""Scheduler half of the WorldKV connector: retrieval against a brute-force pose oracle on the
revisit trajectories, the hot set, write-through page frees, RoPE positions and config errors.
Driven by a small fake of the engine's scheduler loop (ids and pages only, no model)."""
import json

import numpy as np
import pytest

from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector import resolve_config
from worldkv_connector.connector.meta import StoreResult, WorkerReport
from worldkv_connector.connector.scheduler import WorldKVScheduler
from worldkv_connector.connector.api import ChunkRequest, CommittedChunk, EngineView, SchedulerOutput
from worldkv_connector.retrieval.poses import chunk_poses
from worldkv_connector.retrieval.trajectory import parse_trajectory
from worldkv_connector.shapes import PRESETS

FT, PS = 16, 16  # tokens per frame, page size: a whole chunk is 3 pages
CHUNK = 3 * FT


def wkv_distance(cand, query):
    """The WorldKV score by brute force. cand: [N, F, 4, 4], query: [F, 4, 4] -> [N]."""
    ct, cr = cand[:, :, :3, 3].mean(1), cand[:, :, :3, :3].mean(1)
    qt, qr = query[:, :3, 3].mean(0), query[:, :3, :3].mean(0)
    trans = ((ct - qt) ** 2).sum(-1)
    rot = np.array([np.arccos(np.clip((np.trace(r.T @ qr) - 1) / 2, -1, 1)) for r in cr])
    trans = trans / trans.max() if trans.max() > 0 else trans
    rot = rot / rot.max() if rot.max() > 0 else rot
    return 0.5 * trans + 0.5 * rot


class FakeEngine:
    """The engine's per-step calls on the scheduler half: windows, page allocation, commits,
    sliding-window evictions announced in the step that evicts (as the video engine does), and the
    worker's store reports."""

    def __init__(self, sched: WorldKVScheduler, poses: np.ndarray, sid="s", store_delay=0):
        self.s, self.poses, self.sid, self.delay = sched, poses, sid, store_delay
        self.next_page, self.held, self.step = 0, {}, 0  # page -> owner
        self.table, self.recent, self.inflight = {}, [], []
        self.pages_by_chunk = {}  # every chunk's pages, kept after eviction to catch early frees
        self.freed_early = []

    def alloc(self, n, owner):
        pages = list(range(self.next_page, self.next_page + n))
        self.next_page += n
        for p in pages:
            self.held[p] = owner
        return pages

    def free(self, pages, owners):
        for p in pages:
            assert self.held.get(p) in owners, f"page {p} freed but held by {self.held.get(p)}"
            del self.held[p]

    def run_step(self, c):
        cfg = self.s.config
        req = ChunkRequest(self.sid, c, c * 3, self.poses[c], FT, PS)
        self.s.get_num_new_matched_tokens(req, 0)
        blocks = []
        for e in req.external:
            if e.needs_load:
                e.page_ids = self.alloc(e.num_pages(PS), "connector")
                blocks.append(e.page_ids)
            else:
                assert all(self.held.get(p) == "connector" for p in e.page_ids)
        self.s.update_state_after_alloc(req, blocks, 0)
        cur = self.alloc(3, "session")
        self.table[c] = cur
        self.pages_by_chunk[c] = list(cur)
        committed = CommittedChunk(self.sid, c, cur, CHUNK, self.poses[c])
        # the chunk leaving the recent window at the end of this step is announced in this step
        evicted = []
        if c >= cfg.sink_chunks:
            self.recent.append(c)
            while len(self.recent) > cfg.recent_chunks:
                v = self.recent.pop(0)
                for p in self.table[v]:
                    self.held[p] = "evicted"
                evicted.append(CommittedChunk(self.sid, v, self.table.pop(v), CHUNK, self.poses[v]))
        meta = self.s.build_connector_meta(SchedulerOutput(self.step, [req], [committed], evicted=evicted))
        self.inflight.append([(self.sid, c), self.delay])
        self.free(req.release_pages, {"connector"})
        self.poll()
        self.step += 1
        return req, meta

    def poll(self):
        done = [key for key, n in self.inflight if n <= 0]
        for item in self.inflight:
            item[1] -= 1
        self.inflight = [item for item in self.inflight if item[1] >= 0]
        kept = self.s.config.kept_tokens(FT)
        self.s.update_connector_output(WorkerReport(stores=[StoreResult(k, True, kept) for k in done]))
        self.s.finished(set())
        pending = {p for key, _ in self.inflight for p in self.pages_of(key)}
        pages = self.s.take_pages_to_free()
        self.freed_early += [p for p in pages if p in pending]
        self.free(pages, {"evicted", "connector"})

    def pages_of(self, key):
        return self.pages_by_chunk.get(key[1], [])


def make(**cfg):
    base = dict(page_size=PS, retrieval_chunks=3, hot_chunks=4, sink_frames=3, recent_frames=6, keep_ratio=1.0)
    base.update(cfg)
    return WorldKVScheduler(WorldKVConfig(**base), frame_tokens=FT, page_size=PS, kv_shape=PRESETS["tiny"])


@pytest.mark.parametrize("spec", ["R_L_R_L_R_L90", "L_R_W_S_L_R90", "WSRLRL90"])
def test_retrieval_on_revisits_matches_pose_oracle(spec):
    poses = chunk_poses(parse_trajectory(spec), 3)  # [C, 3, 4, 4]
    sched = make(retrieval_chunks=6, hot_chunks=6)
    eng = FakeEngine(sched, poses)
    hits = total = revisits = 0
    for c in range(len(poses)):
        req, _ = eng.run_step(c)
        got = [e.chunk_id for e in req.external]
        assert got == sorted(got)  # window order: ascending chunk index
        cand = [i for i in range(c) if i not in sched.window_excluded(c)]
        if not cand:
            assert got == []
            continue
        dist = wkv_distance(poses[cand], poses[c])
        k = min(6, len(cand))
        kth = np.sort(dist)[k - 1]
        oracle = {cid for cid, d in zip(cand, dist) if d <= kth + 1e-12}  # ties at the k-th all count
        assert len(got) == k
        hits += len(oracle.intersection(got))
        total += len(got)
        best = cand[int(np.argmin(dist))]
        t_gap = np.linalg.norm(poses[best][:, :3, 3].mean(0) - poses[c][:, :3, 3].mean(0))
        if t_gap < 0.05 and dist.min() < 0.05:  # a revisit: a first-visit chunk sees (nearly) the same view
            revisits += 1
            assert best in got or min(dist[[cand.index(g) for g in got]]) <= dist.min() + 1e-12
    assert revisits >= 3, "the trajectory should revisit earlier views"
    assert hits / total >= 0.9


def test_hot_set_moves_only_changed_chunks_and_respects_budget():
    poses = chunk_poses(parse_trajectory("R_L_R90"), 3)
    sched = make(retrieval_chunks=3, hot_chunks=4)
    eng = FakeEngine(sched, poses)
    prev = set()
    for c in range(len(poses)):
        req, meta = eng.run_step(c)
        chosen = {e.chunk_id for e in req.external}
        loaded = {spec.key[1] for spec in meta.loads}
        resident_before = prev
        assert loaded == {cid for cid in chosen if cid not in resident_before}
        assert all(not e.needs_load for e in req.external if e.chunk_id in resident_before)
        resident = sched.resident_chunks("s")
        assert chosen <= set(resident) and len(resident) <= 4  # hot_chunks
        prev = set(resident)
    m = sched.metrics
    assert m.retrieval_hits > m.retrieval_misses > 0
    # every connector page the fake engine still holds belongs to the hot set
    hot_pages = {p for pages in sched.resident_chunks("s").values() for p in pages}
    assert {p for p, o in eng.held.items() if o == "connector"} == hot_pages


@pytest.mark.parametrize("delay", [0, 3])
def test_evicted_pages_freed_only_after_store_and_without_lag(delay):
    poses = chunk_poses(parse_trajectory("R90"), 3)
    sched = make()
    eng = FakeEngine(sched, poses, store_delay=delay)
    for c in range(12):
        eng.run_step(c)
        assert eng.freed_early == []
        evicted_held = [p for p, o in eng.held.items() if o == "evicted"]
        if delay == 0:
            # the chunk leaving the window this step is freed in the same step, not one step later
            assert evicted_held == []
        else:
            assert len(evicted_held) <= 3 * (delay + 1)
    for _ in range(delay + 1):
        eng.poll()
    assert not [p for p, o in eng.held.items() if o == "evicted"]
    # more steps after the drain: nothing freed twice (FakeEngine.free asserts every freed page is held)
    for c in range(12, 16):
        eng.run_step(c)
    eng.poll()
    assert not [p for p, o in eng.held.items() if o == "evicted"]


def test_chunks_become_candidates_only_when_banked():
    poses = chunk_poses(parse_trajectory("R90"), 3)
    sched = make()
    eng = FakeEngine(sched, poses, store_delay=100)  # stores never finish
    for c in range(8):
        req, _ = eng.run_step(c)
        assert req.external == []
    assert sched.banked_chunks("s") == [] and sched.pending_stores() == 8


def test_session_end_waits_for_stores_and_returns_hot_pages():
    poses = chunk_poses(parse_trajectory("R_L90"), 3)
    sched = make()
    eng = FakeEngine(sched, poses, store_delay=2)
    for c in range(10):
        eng.run_step(c)
    hot = {p for pages in sched.resident_chunks("s").values() for p in pages}
    hot_chunks = list(sched.resident_chunks("s"))
    assert hot
    wait, _ = sched.request_finished("s", [p for pages in eng.table.values() for p in pages])
    assert wait  # the last chunks' stores are still in flight
    assert set(sched.take_pages_to_free()) >= hot and sched.resident_chunks("s") == {}
    assert "s" not in sched.finished({"s"})  # not before its stores ended
    for _ in range(3):
        sched.update_connector_output(WorkerReport(stores=[StoreResult(k, True, CHUNK) for k, _ in eng.inflight]))
        eng.inflight = []
    assert "s" in sched.finished({"s"})
    assert sched.finished({"s"}) == set()  # reported once
    # the worker hears of it with the next plan: it forgets the hot chunks and may reclaim the entries
    meta = sched.build_connector_meta(SchedulerOutput(99, [], []))
    assert meta.finished_sessions == ["s"] and {key[1] for key in meta.released} >= set(hot_chunks)


def test_rope_positions_are_contiguous_before_recent_and_rotate_from_the_original():
    poses = chunk_poses(parse_trajectory("R_L_R90"), 3)
    sched = make(rope_correction=True, retrieval_chunks=3, hot_chunks=3)
    eng = FakeEngine(sched, poses)
    position = {}  # chunk -> where its keys sit now (original position when loaded)
    reloads = 0
    for c in range(len(poses)):
        req, meta = eng.run_step(c)
        for spec in meta.loads:
            position[spec.key[1]] = spec.key[1] * 3
        for d in meta.rope_deltas:
            origin = d.key[1] * 3
            # the delta is from the original keys; pages holding rotated keys are restored first
            assert d.reload == (position[d.key[1]] != origin)
            assert origin + d.delta != position[d.key[1]]  # only when its target moved
            reloads += d.reload
            position[d.key[1]] = origin + d.delta
            n = len(d.page_ids)
            assert d.page_lens == tuple([PS] * (n - 1) + [CHUNK - PS * (n - 1)])
        m = len(req.external)
        recent_start = max(1, c - 2) * 3
        for j, e in enumerate(req.external):
            assert position[e.chunk_id] == recent_start - (m - j) * 3
        assert len({d.key for d in meta.rope_deltas}) == len(meta.rope_deltas)
    assert reloads  # kept chunks did move again: each time from the bank's original keys


def test_load_failure_drops_chunk_from_hot_set_and_reloads():
    poses = chunk_poses(parse_trajectory("R90"), 3)
    sched = make(retrieval_chunks=2, hot_chunks=2)
    eng = FakeEngine(sched, poses)
    for c in range(7):
        req, meta = eng.run_step(c)
    chosen = [e.chunk_id for e in req.external]
    assert chosen
    sched.update_connector_output(WorkerReport(loads_failed=[("s", chosen[0])]))
    bad_pages = set(sched.resident_chunks("s")[chosen[0]])
    req, meta = eng.run_step(7)
    if chosen[0] in [e.chunk_id for e in req.external]:
        assert chosen[0] in {s.key[1] for s in meta.loads}  # loaded again into new pages
    assert bad_pages <= set(req.release_pages)


def test_bank_eviction_removes_chunk_from_retrieval():
    poses = chunk_poses(parse_trajectory("R90"), 3)
    sched = make(retrieval_chunks=8, hot_chunks=8)
    eng = FakeEngine(sched, poses)
    for c in range(8):
        eng.run_step(c)
    sched.update_connector_output(WorkerReport(evicted=[("s", 3)]))
    assert ("s", 3) not in sched.index and 3 not in sched.banked_chunks("s")
    req, _ = eng.run_step(8)
    assert 3 not in [e.chunk_id for e in req.external]


VIEW = EngineView(model="tiny", num_layers=2, frames_per_chunk=3, frame_tokens=16, page_size=16, num_pages=64,
                  sink_frames=3, recent_frames=6, attention_window="sliding", dtype="fp32")


def test_resolve_config_adopts_engine_window_and_rejects_disagreement():
    cfg = resolve_config(json.dumps({"keep_ratio": 0.5}), VIEW, PRESETS["tiny"])
    assert (cfg.sink_frames, cfg.recent_frames, cfg.page_size, cfg.keep_ratio) == (3, 6, 16, 0.5)
    assert resolve_config(None, VIEW, PRESETS["tiny"]).page_size == 16
    with pytest.raises(ValueError, match=r"sink_frames=6 disagrees with the engine's --sink-frames 3"):
        resolve_config('{"sink_frames": 6}', VIEW, PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"recent_frames=3 .*--recent-frames 6"):
        resolve_config('{"recent_frames": 3}', VIEW, PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"page_size=64 .*--page-size 16"):
        resolve_config('{"page_size": 64}', VIEW, PRESETS["tiny"])
    with pytest.raises(ValueError, match="sliding"):
        resolve_config(None, EngineView(**{**VIEW.__dict__, "attention_window": "full"}), PRESETS["tiny"])
    with pytest.raises(ValueError, match="does not match the engine"):
        resolve_config(None, VIEW, PRESETS["small"])


@pytest.mark.parametrize("text,key", [
    ('{"retrieval_chunk": 3}', "retrieval_chunk"),
    ('{"keep_ratio": 0}', "keep_ratio"),
    ('{"keep_ratio": 1.5}', "keep_ratio"),
    ('{"policy": "nearest"}', "policy"),
    ('{"bank": "disk"}', "bank"),
    ('{"hot_chunks": 2, "retrieval_chunks": 4}', "hot_chunks"),
    ('{"pooled": "yes"}', "pooled"),
    ('[1, 2]', "JSON object"),
    ('{"keep_ratio": ', "not valid JSON"),
])
def test_bad_config_json_names_the_key(text, key):
    with pytest.raises(ValueError, match=key):
        resolve_config(text, VIEW, PRESETS["tiny"])


def test_adopted_chunks_are_candidates_and_resumed_chunk_ids_continue():
    """A resumed session (chunks adopted from a saved bank): the loaded chunks are retrieval
    candidates with their saved positions, and the engine's chunk c is chunk id base + c."""
    poses = chunk_poses(parse_trajectory("R_L90"), 3)
    sched = make(rope_correction=True, retrieval_chunks=2, hot_chunks=2)
    for cid in range(5):
        sched.adopt("s", cid, CHUNK, poses[cid], first_frame=30 + 3 * cid, slot=cid)  # saved at frames 30, 33, ...
    assert sched.chunk_base("s") == 5 and sched.banked_chunks("s") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="already banked"):
        sched.adopt("s", 2, CHUNK, poses[2], None, slot=7)
    req = ChunkRequest("s", 0, 0, poses[2], FT, PS)
    sched.get_num_new_matched_tokens(req, 0)
    got = [e.chunk_id for e in req.external]
    assert 2 in got and len(got) == 2 and all(e.needs_load for e in req.external)
    blocks = [[10, 11, 12], [13, 14, 15]]
    sched.update_state_after_alloc(req, blocks, 0)
    cur = CommittedChunk("s", 0, [0, 1, 2], CHUNK, poses[2])
    meta = sched.build_connector_meta(SchedulerOutput(0, [req], [cur]))
    # RoPE: from the saved positions to just before the recent window (which starts at frame 3)
    assert [(d.key, d.delta) for d in meta.rope_deltas] == [
        (("s", got[0]), -3 - (30 + 3 * got[0])), (("s", got[1]), 0 - (30 + 3 * got[1]))]
    # the engine's chunk 0 is stored as chunk 5, with its poses and the frame its keys sit at
    (spec,) = meta.stores
    assert spec.key == ("s", 5) and spec.first_frame == 0 and np.array_equal(spec.frame_poses, poses[2])
    sched.update_connector_output(WorkerReport(stores=[StoreResult(("s", 5), True, CHUNK)]))
    assert sched.banked_chunks("s") == [0, 1, 2, 3, 4, 5]
    # later: chunk 5 is the engine's sink chunk 0, so it is never a candidate
    assert [5 + e for e in sched.window_excluded(3)] == [5, 6, 7]
    req = ChunkRequest("s", 3, 9, poses[0], FT, PS)
    sched.get_num_new_matched_tokens(req, 0)
    assert 5 not in [e.chunk_id for e in req.external]
