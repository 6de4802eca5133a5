"""Resident KV stays bounded over long FastVideo sessions with WorldKV: 64 Matrix-Game-2 streaming
chunks through FastVideo's own stage, with a small bank that must evict."""
from __future__ import annotations

import torch

import fastvideo_drive as drive
import fastvideo_tiny as tiny
from worldkv_connector.integration.fastvideo import enable_worldkv, worldkv_binding

CHUNKS = 64


def test_64_chunks_flat_memory(fastvideo_dist):
    stage, args = drive.matrixgame2_stage(tiny.tiny_matrixgame2(local_attn_size=9))
    chunk_bytes = 2 * 2 * 12 * 2 * 16 * 4  # layers x (K, V) x tokens x heads x dim x fp32
    enable_worldkv(stage, connector={"retrieval_chunks": 2, "keep_ratio": 0.5, "hot_chunks": 2,
                                     "bank_bytes": 10 * chunk_bytes}, sink_frames=3, recent_frames=6, page_size=4)
    b = worldkv_binding(stage)
    samples = []

    def sample(c):
        m = b.metrics()
        samples.append((m["resident_kv_bytes"], m["pool_pages_used"], m["bank_bytes"], m["action_bank_chunks"],
                        m["window_bytes"], m["bank_entries"]))

    yaws = [0.1 if (c // 8) % 2 == 0 else -0.1 for c in range(CHUNKS)]  # sweep right and left
    stage.streaming_reset(drive.matrixgame2_batch(CHUNKS), args)
    for c, yaw in enumerate(yaws):
        n = drive.video_frames_of_chunk(c)
        mouse = torch.zeros(1, n, 2)
        mouse[0, :, 1] = yaw
        stage.streaming_step(torch.zeros(1, n, 4), mouse)
        sample(c)
    m = b.metrics()
    assert m["bank_evictions"] > 0  # the bank was full and made room (bounded, not unbounded)
    assert m["retrieval_hits"] > 0
    resident, pages, bank, action_chunks, window, entries = zip(*samples)
    # device KV: never more pages than the pool, and no growth after the window filled
    assert max(pages) <= m["pool_pages"]
    assert max(resident[CHUNKS // 2:]) <= max(resident[8:CHUNKS // 2])
    assert max(bank) <= m["bank_capacity_bytes"]
    assert max(bank[CHUNKS // 2:]) <= max(bank[8:CHUNKS // 2])
    assert len(set(window)) == 1  # the window dicts are allocated once per session
    # the action K/V beside the bank follows the bank: bounded by what the bank and the window hold
    # (banked entries + sink 1 + recent 2 + hot set 2 + the chunk just committed)
    assert max(action_chunks[CHUNKS // 2:]) <= max(action_chunks[8:CHUNKS // 2]) <= max(entries) + 6
    stage.streaming_clear()
    m = b.metrics()
    assert m["bank_entries"] == 0 and m["pool_pages_used"] == 0 and m["action_bank_chunks"] == 0
