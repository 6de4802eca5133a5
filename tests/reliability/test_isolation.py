"""Sessions are isolated and leave nothing behind: two sessions on the same trajectory retrieve only
their own chunks and generate what they generate alone; an ended session's pages, bank slots and
index entries go back once its stores completed; the scheduler half's accounting stays exact under
random interleavings of steps, store completions, evictions and session ends; close() and the
context managers release the bank and the transfer engine."""
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector import WorldKVConnector
from worldkv_connector.connector.meta import StoreResult, WorkerReport
from worldkv_connector.connector.scheduler import WorldKVScheduler
from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.connector.api import (
    ChunkRequest, CommittedChunk, EngineView, SchedulerOutput,
)
from worldkv_connector.retrieval.poses import chunk_poses
from worldkv_connector.retrieval.trajectory import parse_trajectory
from worldkv_connector.shapes import PRESETS

PS = 20  # page size: a whole tiny chunk (48 tokens) is 3 pages, a compressed one (keep 0.5: 32) 2
TRAJ = "R_L_R_L60"


def make_engine(**cfg):
    base = dict(keep_ratio=0.5, retrieval_chunks=3, hot_chunks=4, bank_bytes=1 << 22)
    base.update(cfg)
    return VideoEngine(model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6, page_size=PS,
                       kv_cache_memory=0.004, num_denoising_steps=1, kv_connector="worldkv",
                       kv_connector_config=json.dumps(base))


def solo(sid, num_chunks, seed):
    with make_engine() as engine:
        engine.add_session(sid, trajectory=TRAJ, num_chunks=num_chunks, seed=seed)
        return engine.run()[sid]


def test_two_sessions_on_one_trajectory_retrieve_only_their_own_chunks():
    engine = make_engine()
    conn, bank, bm = engine.connector, engine.connector.worker.bank, engine.block_manager
    index = conn.scheduler.index
    plans = []  # (session, chunk index, external ids) of every request
    ask = conn.get_num_new_matched_tokens

    def spy(request, computed):
        out = ask(request, computed)
        ids = [e.chunk_id for e in request.external]
        for cid in ids:  # planned from the session's own bank and index only
            assert (request.session_id, cid) in bank and cid in index.chunks(request.session_id)
            assert cid < request.chunk_index
        plans.append((request.session_id, request.chunk_index, ids))
        return out

    conn.get_num_new_matched_tokens = spy
    engine.add_session("a", trajectory=TRAJ, num_chunks=16, seed=1)
    engine.add_session("b", trajectory=TRAJ, num_chunks=10, seed=2)
    latents = {"a": [], "b": []}
    b_entries = None
    while engine.has_unfinished_sessions():
        own = {sid: set(conn.scheduler.banked_chunks(sid)) for sid in ("a", "b")}
        results = engine.step()
        for r in results:
            assert set(r.retrieved) <= own[r.session_id], f"{r.session_id} retrieved another session's chunk"
            latents[r.session_id].append(r.latents)
        if any(r.session_id == "b" and not r.finished for r in results):
            b_entries = sum(1 for k in bank.keys() if k[0] == "b")
        if any(r.session_id == "b" and r.finished for r in results):
            # b ended this step; its last store completed at the step's poll (CPU copies): all gone
            assert b_entries and b_entries >= 8
            assert not [k for k in bank.keys() if k[0] == "b"]
            assert "b" not in index.sessions() and "b" not in conn.scheduler.sessions()
            assert bank.bytes_used == sum(bank.get(k).nbytes for k in bank.keys())
            assert not bm.has_session("b")
            assert len(bank) == len(index) == len(conn.scheduler.banked_chunks("a"))  # a is untouched
    assert sum(len(ids) for sid, _, ids in plans if sid == "a") >= 10  # retrieval did happen
    assert sum(len(ids) for sid, _, ids in plans if sid == "b") >= 5
    # isolation in the outputs: each session generates what it generates alone
    for sid, n, seed in (("a", 16, 1), ("b", 10, 2)):
        alone = solo(sid, n, seed)
        assert len(latents[sid]) == n
        for got, ref in zip(latents[sid], alone):
            assert torch.allclose(got, ref, atol=1e-5)
    engine.drain()
    assert len(bank) == 0 and bank.bytes_used == 0 and len(index) == 0
    assert conn.scheduler.held_pages() == 0 and bm.num_used == 0
    assert conn.metrics()["bank_entries"] == 0
    bm.check_invariants()
    engine.close()


def test_retained_sessions_stay_banked_until_dropped():
    with make_engine() as engine:
        conn = engine.connector
        conn.retain_finished_sessions = True
        engine.add_session("a", trajectory=TRAJ, num_chunks=6, seed=0)
        engine.run()
        assert sorted(k[1] for k in conn.worker.bank.keys()) == list(range(6))
        assert conn.scheduler.index.chunks("a") == list(range(6))
        assert conn.drop_session("a") == 6 and len(conn.worker.bank) == 0
        engine.drain()
        assert len(conn.scheduler.index) == 0  # the frees leave the index at the next poll


def test_close_releases_bank_and_transfer_engine_and_is_idempotent(tmp_path):
    with make_engine() as engine:
        conn = engine.connector
        engine.add_session("a", trajectory=TRAJ, num_chunks=4, seed=0)
        engine.run()
    # VideoEngine.close closed the connector: bank and transfer engine are gone
    assert conn.worker.bank.closed
    with pytest.raises(RuntimeError, match="closed"):
        conn.worker.transfer.submit("store", [], [])
    with pytest.raises(RuntimeError, match="connector is closed"):
        conn.save_bank(tmp_path / "b")
    conn.close()  # again: a no-op
    view = EngineView(model="tiny", num_layers=2, frames_per_chunk=3, frame_tokens=16, page_size=PS, num_pages=32,
                      sink_frames=3, recent_frames=6, attention_window="sliding", dtype="fp32")
    with WorldKVConnector(view, PRESETS["tiny"], '{"bank_bytes": 1048576}', "cpu") as direct:
        bank = direct.worker.bank
        assert not bank.closed
    assert bank.closed


# --- property: the scheduler half under random interleavings ---------------------------------------
FT = 16
CHUNK = 3 * FT


class Driver:
    """The engine's calls on the scheduler half (as the video engine makes them) plus a fake
    worker: stores complete (or fail) when the test says, banked entries may be evicted. Pages get
    fresh ids and a named owner, so a page freed twice, early or by the wrong owner is caught."""

    def __init__(self, sched, lengths, poses):
        self.s, self.poses = sched, poses
        self.lengths = dict(lengths)
        self.next_chunk = {sid: 0 for sid in lengths}
        self.table = {sid: {} for sid in lengths}
        self.recent = {sid: [] for sid in lengths}
        self.owner = {}  # page -> owner
        self.pages_of = {}  # store key -> its chunk's pages
        self.inflight = []  # store keys not yet reported
        self.banked = set()
        self.parked = {}  # session -> pages kept until its stores ended
        self.step_no, self.next_page = 0, 0

    def alloc(self, n, owner):
        pages = list(range(self.next_page, self.next_page + n))
        self.next_page += n
        self.owner.update(dict.fromkeys(pages, owner))
        return pages

    def free(self, pages, owners):
        for p in pages:
            assert self.owner.get(p) in owners, f"page {p} freed while held by {self.owner.get(p)!r}"
            del self.owner[p]

    def running(self):
        return [sid for sid, c in self.next_chunk.items() if c < self.lengths[sid]]

    def step(self, sid):
        c, cfg = self.next_chunk[sid], self.s.config
        req = ChunkRequest(sid, c, 3 * c, self.poses[c], FT, PS)
        self.s.get_num_new_matched_tokens(req, 0)
        blocks = []
        for e in req.external:
            assert (sid, e.chunk_id) in self.banked, "retrieved a chunk that is not banked for this session"
            if e.needs_load:
                e.page_ids = self.alloc(e.num_pages(PS), "connector")
                blocks.append(e.page_ids)
            else:
                assert all(self.owner.get(p) == "connector" for p in e.page_ids)
        self.s.update_state_after_alloc(req, blocks, 0)
        cur = self.alloc(3, sid)
        self.table[sid][c] = cur
        self.pages_of[(sid, c)] = cur
        evicted = []
        if c >= cfg.sink_chunks:
            self.recent[sid].append(c)
            if len(self.recent[sid]) > cfg.recent_chunks:
                v = self.recent[sid].pop(0)
                pages = self.table[sid].pop(v)
                self.owner.update(dict.fromkeys(pages, "evicted"))
                evicted.append(CommittedChunk(sid, v, pages, CHUNK, self.poses[v]))
        committed = CommittedChunk(sid, c, cur, CHUNK, self.poses[c])
        self.s.build_connector_meta(SchedulerOutput(self.step_no, [req], [committed], evicted=evicted))
        self.step_no += 1
        self.inflight.append((sid, c))
        self.free(req.release_pages, {"connector"})
        self.next_chunk[sid] = c + 1
        if c + 1 == self.lengths[sid]:
            self.end(sid)

    def end(self, sid):
        pages = [p for ps in self.table[sid].values() for p in ps]
        self.next_chunk[sid] = self.lengths[sid]
        wait, _ = self.s.request_finished(sid, pages)
        if wait:
            self.owner.update(dict.fromkeys(pages, f"parked:{sid}"))
            self.parked[sid] = pages
        else:
            self.free(pages, {sid})
        self.table[sid] = {}

    def complete(self, i, ok):
        key = self.inflight.pop(i % len(self.inflight))
        if ok:
            self.banked.add(key)
        self.s.update_connector_output(WorkerReport(stores=[StoreResult(key, ok, CHUNK if ok else 0)]))

    def evict(self, i):
        key = sorted(self.banked)[i % len(self.banked)]
        self.banked.discard(key)
        self.s.update_connector_output(WorkerReport(evicted=[key]))

    def poll(self):
        """get_finished + take_pages_to_free as the engine and the facade run them."""
        for item in self.s.finished(set(self.parked)):
            if isinstance(item, str):
                self.free(self.parked.pop(item), {f"parked:{item}"})
        for sid in self.s.take_ended_sessions():
            self.s.forget_session(sid)
            self.banked = {k for k in self.banked if k[0] != sid}  # the worker frees its entries
        busy = {p for key in self.inflight for p in self.pages_of[key]}
        pages = self.s.take_pages_to_free()
        assert not busy.intersection(pages), "a page went back before its store ended"
        self.free(pages, {"evicted", "connector"})

    def check(self):
        held = sum(1 for o in self.owner.values() if o in ("evicted", "connector"))
        assert self.s.held_pages() == held  # exact: every page the connector holds, no more
        assert self.s.pending_stores() == len(self.inflight)
        for sid in self.s.index.sessions():
            assert {(sid, c) for c in self.s.index.chunks(sid)} <= self.banked


OPS = st.lists(st.tuples(st.sampled_from(["step", "step", "complete", "fail", "evict", "end"]),
                         st.integers(0, 50)), max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), ops=OPS)
def test_scheduler_accounting_is_exact_and_nothing_leaks(lengths, ops):
    cfg = WorldKVConfig(page_size=PS, retrieval_chunks=2, hot_chunks=3, sink_frames=3, recent_frames=6, keep_ratio=1.0)
    sched = WorldKVScheduler(cfg, frame_tokens=FT, page_size=PS, kv_shape=PRESETS["tiny"])
    poses = chunk_poses(parse_trajectory("R_L_R30"), 3, 9)
    d = Driver(sched, {f"s{i}": n for i, n in enumerate(lengths)}, poses)
    for op, i in ops:
        running = d.running()
        if op == "step" and running:
            d.step(running[i % len(running)])
        elif op in ("complete", "fail") and d.inflight:
            d.complete(i, op == "complete")
        elif op == "evict" and d.banked:
            d.evict(i)
        elif op == "end" and running:
            d.end(running[i % len(running)])  # a session cut short (cancelled)
        d.poll()
        d.check()
    # the rest of the run: every session to its end, every store completes
    while d.running():
        d.step(d.running()[0])
        d.poll()
        d.check()
    while d.inflight:
        d.complete(0, True)
        d.poll()
        d.check()
    assert sched.held_pages() == 0 and sched.pending_stores() == 0
    assert not d.owner and not d.parked  # every page went back exactly once
    assert len(sched.index) == 0 and sched.sessions() == []
    meta = sched.build_connector_meta(SchedulerOutput(d.step_no, [], []))
    assert not meta.loads and not meta.stores and not meta.rope_deltas
    assert sched.build_connector_meta(SchedulerOutput(d.step_no + 1, [], [])).is_empty()


def test_driver_catches_an_early_free():
    """The property test's driver is not blind: a page handed back while its store runs fails."""
    cfg = WorldKVConfig(page_size=PS, retrieval_chunks=1, hot_chunks=1, sink_frames=3, recent_frames=3, keep_ratio=1.0)
    sched = WorldKVScheduler(cfg, frame_tokens=FT, page_size=PS, kv_shape=PRESETS["tiny"])
    d = Driver(sched, {"s": 4}, chunk_poses(parse_trajectory("R30"), 3, 4))
    for _ in range(3):
        d.step("s")
    sched._free_now.extend(d.pages_of[("s", 2)])  # a broken connector returning busy pages
    with pytest.raises(AssertionError, match="before its store ended"):
        d.poll()
    np.testing.assert_equal(sched.pending_stores(), 3)
