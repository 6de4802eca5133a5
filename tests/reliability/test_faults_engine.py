"""Injected transfer faults through the whole engine: the connector's transfer engine wrapped in
``FaultyTransferEngine`` (5 % of loads and 5 % of stores fail, seeded). Every failure is counted and
reported, nothing escapes the engine, outputs equal a fault-free run up to the first chunk a fault
touched, later chunks are still produced, failed stores leave their chunks unbanked."""
import json
import logging

import pytest
import torch

from worldkv_connector.testing import FaultyTransferEngine
from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.retrieval.trajectory import trajectory_poses

PS = 20
N = 30  # chunks per session
SESSIONS = (("a", "R_L_R_L60", 1), ("b", "L_R_L_R60", 2))


class RecordingFaults(FaultyTransferEngine):
    """Also records (engine step, kind, failed) of every job."""

    def __init__(self, inner, clock, **kw):
        super().__init__(inner, **kw)
        self.clock, self.log = clock, []

    def submit_plan(self, kind, plan, **kw):
        job = super().submit_plan(kind, plan, **kw)
        self.log.append((self.clock[0], kind, job.error is not None))
        return job

    def submit_layers(self, kind, plans, **kw):
        jobs = super().submit_layers(kind, plans, **kw)
        self.log += [(self.clock[0], kind, job.error is not None) for job in jobs]
        return jobs


def rollout(fault_seed=None, **faults):
    engine = VideoEngine(model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6, page_size=PS,
                         kv_cache_memory=0.004, num_denoising_steps=1, kv_connector="worldkv",
                         kv_connector_config=json.dumps(dict(keep_ratio=0.5, retrieval_chunks=3, hot_chunks=3,
                                                             bank_bytes=1 << 22)))
    conn = engine.connector
    conn.retain_finished_sessions = True  # so the bank can be checked after the run
    clock, rec = [0], None
    if fault_seed is not None:
        rec = conn.wrap_transfer(lambda t: RecordingFaults(t, clock, seed=fault_seed, **faults))
    metas, build = [], conn.build_connector_meta
    conn.build_connector_meta = lambda out: metas.append(build(out)) or metas[-1]
    for sid, traj, seed in SESSIONS:
        # the 1:1 latent-frame grammar: the fault seeds below were chosen for its 30-chunk revisit pattern
        engine.add_session(sid, poses=trajectory_poses(traj, frames="latent", hold_frames=12), num_chunks=N, seed=seed)
    steps = []  # per step: {session: ChunkResult}, load-error pages
    while engine.has_unfinished_sessions():
        results = engine.step()  # never raises: faults are reported, not thrown
        steps.append(({r.session_id: r for r in results}, conn.get_block_ids_with_load_errors()))
        clock[0] += 1
    engine.drain()
    return engine, rec, metas, steps


@pytest.mark.parametrize("fault_seed", [4, 29])  # seeds whose first fault comes after a dozen chunks
def test_random_load_and_store_faults_are_counted_contained_and_do_not_change_clean_chunks(fault_seed, caplog):
    clean, _, _, clean_steps = rollout()
    with caplog.at_level(logging.DEBUG, logger="worldkv_connector.connector"):
        engine, rec, metas, steps = rollout(fault_seed, fail_loads=0.05, fail_stores=0.05)
    conn, bank, index = engine.connector, engine.connector.worker.bank, engine.connector.scheduler.index
    m = conn.metrics()
    # every injected failure is counted, one error per failed job
    assert rec.faults["failed_loads"] >= 2 and rec.faults["failed_stores"] >= 2
    assert m["load_errors"] == rec.faults["failed_loads"] == sum(1 for _, k, bad in rec.log if k == "load" and bad)
    assert m["store_errors"] == rec.faults["failed_stores"] == sum(1 for _, k, bad in rec.log if k == "store" and bad)
    bad_load_steps = {t for t, k, bad in rec.log if k == "load" and bad}
    bad_store_steps = {t for t, k, bad in rec.log if k == "store" and bad}

    # failed loads: their pages are reported and their chunks left out of that step's window
    for t, (results, error_pages) in enumerate(steps):
        planned = {p for spec in metas[t].loads for p in spec.page_ids}
        if t in bad_load_steps:
            assert error_pages == planned and planned
            for spec in metas[t].loads:
                assert spec.key[1] not in results[spec.key[0]].retrieved
        else:
            assert error_pages == set()

    # failed stores: the step's chunks are not banked (not retrievable), every other chunk is
    unbanked = {(sid, t) for t in bad_store_steps for sid, _, _ in SESSIONS}
    for sid, _, _ in SESSIONS:
        for c in range(N):
            assert ((sid, c) in bank) == ((sid, c) not in unbanked)
            assert (c in index.chunks(sid)) == ((sid, c) not in unbanked)
    assert m["chunks_banked"] == len(SESSIONS) * N - len(unbanked)
    messages = [r.getMessage() for r in caplog.records]
    for key in unbanked:  # each named in the log, one warning in all (the rest at debug level)
        assert sum(f"chunk {key} not banked" in msg for msg in messages) == 1
    store_warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "not banked" in r.getMessage()]
    assert len(store_warnings) == 1

    # outputs: identical to the fault-free run up to the first chunk a fault touched; then still produced
    compared = 0
    for sid, _, _ in SESSIONS:
        touched = [t for t in bad_load_steps if any(s.key[0] == sid for s in metas[t].loads)]
        touched += [t for t in range(N) if steps[t][0][sid].retrieved != clean_steps[t][0][sid].retrieved]
        first = min(touched, default=N)
        assert first >= 4, "the fault pattern should leave some clean chunks to compare"
        for t in range(first):
            assert torch.equal(steps[t][0][sid].latents, clean_steps[t][0][sid].latents)
            compared += 1
        got = engine.results(sid)
        assert len(got) == N and all(torch.isfinite(x).all() for x in got)
    assert compared >= 10
    assert conn.scheduler.pending_stores() == 0 and engine.block_manager.num_used == 0
    clean.close()
    engine.close()


def test_delayed_and_failing_copies_leak_nothing_when_sessions_end():
    engine, rec, _, steps = rollout(3, fail_loads=0.1, fail_stores=0.1, delay_polls=2)
    conn = engine.connector
    assert rec.faults["delayed_jobs"] == len(rec.log) and rec.faults["failed_stores"] >= 1
    m = conn.metrics()
    assert m["store_errors"] == rec.faults["failed_stores"] and m["load_errors"] == rec.faults["failed_loads"]
    assert all(len(engine.results(sid)) == N for sid, _, _ in SESSIONS)
    # the retained sessions go when dropped; then nothing is left anywhere
    for sid, _, _ in SESSIONS:
        conn.drop_session(sid)
    engine.drain()
    assert len(conn.worker.bank) == 0 and conn.worker.bank.bytes_used == 0 and len(conn.scheduler.index) == 0
    assert conn.scheduler.held_pages() == 0 and conn.scheduler.pending_stores() == 0
    assert engine.block_manager.num_used == 0
    engine.close()
