"""Matrix-Game-2 through FastVideo's own streaming stage (streaming_reset / streaming_step /
streaming_clear) with WorldKV enabled on it: retrieval by integrated actions on a session that
turns away and comes back, the action caches following retrieval, and the end of the stream
freeing the bank."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastvideo_drive as drive
import fastvideo_tiny as tiny
from worldkv_connector.retrieval.index import PoseIndex
from worldkv_connector.integration.fastvideo import enable_worldkv, worldkv_binding
from worldkv_connector.retrieval.poses import yaw_matrix

YAW_SPEED = 20.0  # degrees per mouse unit per video frame
RIGHT, LEFT = 6, 10  # chunks turning right, then left (back past the start)


def _yaw_schedule(chunks: int) -> list[float]:
    """Mouse yaw per streaming step: +0.1 (2 deg per video frame) for RIGHT chunks, then -0.07."""
    return [0.1 if c < RIGHT else -0.07 for c in range(chunks)]


def _stream(stage, args, batch, yaws, on_chunk=None):
    stage.streaming_reset(batch, args)
    for c, yaw in enumerate(yaws):
        n = drive.video_frames_of_chunk(c)
        mouse = torch.zeros(1, n, 2)
        mouse[0, :, 1] = yaw
        stage.streaming_step(torch.zeros(1, n, 4), mouse)
        if on_chunk is not None:
            on_chunk(c)


def _oracle_poses(yaws) -> np.ndarray:
    """Ground-truth camera per latent frame: the yaw accumulated over the video frames, built
    directly from the schedule (not through the adapter's action integration)."""
    per_frame = np.concatenate([np.full(drive.video_frames_of_chunk(c), y * YAW_SPEED) for c, y in enumerate(yaws)])
    deg = np.cumsum(per_frame)
    lat = len(yaws) * 3
    out = np.repeat(np.eye(4)[None], lat, axis=0)
    for j in range(lat):
        out[j, :3, :3] = yaw_matrix(deg[min(4 * j, len(deg) - 1)])
    return out


def test_revisit_retrieves_first_visit_chunks_by_integrated_actions(fastvideo_dist):
    chunks = RIGHT + LEFT
    k = 2
    stage, args = drive.matrixgame2_stage(tiny.tiny_matrixgame2(local_attn_size=9))
    enable_worldkv(stage, connector={"retrieval_chunks": k, "keep_ratio": 0.5}, sink_frames=3, recent_frames=3,
                   page_size=4, yaw_speed=YAW_SPEED)
    b = worldkv_binding(stage)
    action_window = []
    _stream(stage, args, drive.matrixgame2_batch(chunks), _yaw_schedule(chunks),
            on_chunk=lambda c: action_window.append(dict(b._win_frames)))
    log = list(b.host.retrieved_log)

    truth = _oracle_poses(_yaw_schedule(chunks))
    index = PoseIndex("pose")
    hits = total = fv_want = fv_got = 0
    for c in range(2, chunks):
        index.add("s", c - 2, truth[3 * (c - 2):3 * (c - 1)])  # banked: all but sink 0 and recent c - 1
        cand_exclude = [0]
        want = index.query("s", truth[3 * c:3 * c + 3], k, exclude=cand_exclude)
        got = log[c]
        assert len(got) == min(k, c - 2)  # every candidate is banked: the connector always fills k
        hits += len(set(got) & set(want))
        total += len(got)
        if c >= RIGHT:  # on the way back: the first-visit chunks the oracle picks
            first = {x for x in want if x < RIGHT}
            fv_want += len(first)
            fv_got += len(first & set(got))
    precision = hits / total
    print(f"matrixgame2 revisit: precision {precision:.3f} over {total} retrievals; first-visit recall "
          f"{fv_got}/{fv_want}")
    assert total >= 2 * (chunks - 4)
    assert precision >= 0.9, (precision, log)
    # coming back, the first-visit chunks of the same views are put back into the window
    assert fv_want >= 6 and fv_got / fv_want >= 0.9, (fv_got, fv_want, log)
    # the action caches held the same chunks as self-attention: 3 frames per chunk in the window
    for c in range(3, chunks):
        assert set(action_window[c].values()) == {3 * (1 + len(log[c]) + 1)}  # sink + retrieved + recent
    stage.streaming_clear()
    assert b.metrics()["bank_entries"] == 0 and b.metrics()["action_bank_chunks"] == 0


def test_streaming_reset_starts_a_new_world(fastvideo_dist):
    stage, args = drive.matrixgame2_stage(tiny.tiny_matrixgame2(local_attn_size=9))
    enable_worldkv(stage, connector={"retrieval_chunks": 2}, sink_frames=3, recent_frames=3, page_size=4)
    b = worldkv_binding(stage)
    _stream(stage, args, drive.matrixgame2_batch(5), [0.1] * 5)
    first = b.host.session_id
    assert b.metrics()["bank_entries"] > 0
    _stream(stage, args, drive.matrixgame2_batch(4, seed=1), [0.1] * 4)  # reset without clear
    assert b.host.session_id != first
    assert first not in b.host.connector.scheduler.sessions()
    stage.streaming_clear()
    assert b.metrics()["bank_entries"] == 0


def test_bad_batch_size_is_a_clear_error(fastvideo_dist):
    stage, args = drive.matrixgame2_stage(tiny.tiny_matrixgame2(local_attn_size=9))
    enable_worldkv(stage, sink_frames=3, recent_frames=3, page_size=4)
    batch = drive.matrixgame2_batch(2)
    batch.latents = batch.latents.repeat(2, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="batch_size=2"):
        stage.streaming_reset(batch, args)
