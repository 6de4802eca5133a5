"""Soak: 2,000 chunks of the tiny model, 4 concurrent sessions of 500 (batched), the WorldKV connector
with a bank that holds only a quarter of them. Memory stays flat once the bank is full (process
RSS after chunk 500 within 10 % of its value at chunk 2,000), the bank never exceeds its cap, the
connector's bookkeeping stays bounded, every session finishes and nothing is left at the end.

Sessions are added with ``keep_results=False``: the engine returns each ChunkResult from step()
and keeps none, so what is measured is the engine + connector, not the user's results.
"""
import json
import logging
import os
import resource
import time

import pytest
import torch

from worldkv_connector.integration.video import VideoEngine

logger = logging.getLogger(__name__)

SESSIONS, CHUNKS = 4, 500
RETRIEVAL, HOT = 3, 4


def rss_bytes() -> int:
    """Resident set size of this process now (/proc), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.slow
def test_soak_2000_chunks_four_sessions_bounded_memory_and_bank():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-core hosts: one compute thread is the fastest and the steadiest
    try:
        _soak()
    finally:
        torch.set_num_threads(threads)


def _soak():
    probe = VideoEngine(model="tiny", kv_connector="worldkv", page_size=20, kv_cache_memory=0.004,
                        kv_connector_config=json.dumps({"keep_ratio": 0.5}))
    slot = probe.connector.worker.bank.slot_bytes  # one compressed chunk
    probe.close()
    cap = SESSIONS * CHUNKS // 4 * slot  # a quarter of the rollout fits
    engine = VideoEngine(
        model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6, page_size=20, kv_cache_memory=0.004,
        num_denoising_steps=1, kv_connector="worldkv",
        kv_connector_config=json.dumps(dict(keep_ratio=0.5, retrieval_chunks=RETRIEVAL, hot_chunks=HOT,
                                            bank_bytes=cap)),
    )
    conn, bm = engine.connector, engine.block_manager
    bank, sched, worker = conn.worker.bank, conn.scheduler, conn.worker
    assert bank.capacity_bytes == cap and bank.num_slots == SESSIONS * CHUNKS // 4
    for i in range(SESSIONS):
        engine.add_session(f"s{i}", trajectory="R_L_R_L_R_L90", num_chunks=CHUNKS, seed=i, keep_results=False)
    produced = {f"s{i}": 0 for i in range(SESSIONS)}
    rss, chunks, start = {}, 0, time.perf_counter()
    page_bound = SESSIONS * HOT * 2  # the hot sets (2 pages per compressed chunk)
    while engine.has_unfinished_sessions():
        results = engine.step()
        for r in results:
            assert r.chunk_index == produced[r.session_id]
            produced[r.session_id] += 1
        chunks += len(results)
        # every step: the bank within its cap, its accounting exact, the bookkeeping bounded
        assert bank.bytes_used <= cap and len(bank) <= bank.num_slots
        assert conn.metrics()["bank_bytes"] == bank.bytes_used
        assert len(sched.index) <= len(bank)
        assert sched.pending_stores() == 0 and worker.stores.pending() == 0  # CPU copies end in the step
        assert sched.held_pages() <= page_bound and len(worker.loads.resident_indices) <= SESSIONS * (HOT + RETRIEVAL)
        assert len(worker.loads._jobs) == 0 and worker.transfer.pending() == 0
        if chunks in (SESSIONS * 125, SESSIONS * CHUNKS):
            rss[chunks] = rss_bytes()
    elapsed = time.perf_counter() - start
    engine.drain()
    assert produced == {f"s{i}": CHUNKS for i in range(SESSIONS)}
    m = conn.metrics()
    assert m["chunks_banked"] == SESSIONS * CHUNKS and m["store_errors"] == 0 and m["load_errors"] == 0
    assert m["bank_evictions"] >= SESSIONS * CHUNKS - bank.num_slots - SESSIONS * 10
    assert m["retrieval_hits"] > 0 and m["retrieval_misses"] > 0
    # every session ended: its bank entries, index entries and pages went back
    assert len(bank) == 0 and bank.bytes_used == 0 and len(sched.index) == 0 and sched.sessions() == []
    assert sched.held_pages() == 0 and bm.num_used == 0
    early, late = rss[SESSIONS * 125], rss[SESSIONS * CHUNKS]
    logger.info("soak: %d chunks in %.1f s; RSS %.1f MiB at chunk 500, %.1f MiB at chunk 2000",
                chunks, elapsed, early / 2**20, late / 2**20)
    assert late <= 1.10 * early, f"RSS grew from {early / 2**20:.1f} MiB to {late / 2**20:.1f} MiB"
    engine.close()
