"""Attention recall (integration/video/recall.py): the mass computation by hand, the shadow history
with kept tokens, revisit chunks, and the engine / CLI scenarios (full = 1, sliding < 1, WorldKV
at keep_ratio 1 holds at least what sliding holds at revisits)."""
import json
import math

import numpy as np
import pytest
import torch

from worldkv_connector.cli import main
from worldkv_connector.cli.generate import engine_recall_summary
from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.integration.video.attention import Segment, WindowPlan
from worldkv_connector.connector.api import CommittedChunk
from worldkv_connector.integration.video.recall import RecallTracker, attention_mass, recall_summary, revisit_sources
from worldkv_connector.retrieval.poses import yaw_matrix


def test_attention_mass_by_hand():
    # one query, one head, D = 1: logits are q * k * scale
    q = torch.tensor([[[2.0]]])  # [Tq=1, H=1, D=1]
    k = torch.tensor([[[0.0]], [[1.0]], [[math.log(3.0) / 2.0]]])  # logits 0, 2, ln 3
    w = np.array([1.0, math.e**2, 3.0])
    held = torch.tensor([True, False, True])
    assert attention_mass(q, k, held, scale=1.0) == pytest.approx((w[0] + w[2]) / w.sum(), rel=1e-6)
    assert attention_mass(q, k, torch.tensor([True, True, True])) == 1.0
    assert attention_mass(q, k, torch.tensor([False, False, False])) == 0.0
    # mean over queries and heads; GQA: 2 query heads share 1 KV head
    q2 = torch.tensor([[[2.0], [0.0]], [[0.0], [0.0]]])  # [Tq=2, Hq=2, D=1]
    uniform = 2.0 / 3.0  # zero logits: each token 1/3
    expected = ((w[0] + w[2]) / w.sum() + 3 * uniform) / 4
    assert attention_mass(q2, k, held, scale=1.0) == pytest.approx(expected, rel=1e-6)


def test_attention_mass_bad_inputs():
    q, k = torch.zeros(2, 2, 4), torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match="held"):
        attention_mass(q, k, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="Hq % Hkv"):
        attention_mass(torch.zeros(2, 3, 4), k, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="held"):
        attention_mass(q, k, torch.ones(3))


def _plan(chunk, segments, sid="s"):
    plan = WindowPlan(page_size=4)
    cur = Segment("current", chunk, [0], [2])
    plan.add_row(sid, [Segment(kind, cid, [0], [2]) for kind, cid in segments] + [cur],
                 CommittedChunk(sid, chunk, [0], 2, np.eye(4)[None]))
    return plan


def test_tracker_counts_kept_tokens_of_external_chunks_and_nothing_of_forgotten_ones():
    torch.manual_seed(0)
    keys = [torch.randn(1, 2, 1, 4) for _ in range(4)]  # [B=1, T=2, H=1, D=4] per chunk, one layer
    q = torch.randn(1, 2, 1, 4)
    tracker = RecallTracker(1, kept_fn=lambda sid, cid: torch.tensor([[1]]))  # only token 1 of a retrieved chunk
    for c in range(3):  # commit chunks 0, 1, 2 (window: everything so far)
        tracker.observe(0, q, keys[c], _plan(c, [("recent", j) for j in range(c)]))
        tracker.finish_step()
        assert tracker.take("s", c) == [1.0]
    # chunk 3: sink 0, external 1 (token 1 kept), chunk 2 forgotten
    tracker.observe(0, q, keys[3], _plan(3, [("sink", 0), ("external", 1)]))
    tracker.finish_step()
    k_all = torch.cat([keys[0][0], keys[1][0], keys[2][0], keys[3][0]])
    held = torch.tensor([True, True, False, True, False, False, True, True])
    expected = attention_mass(q[0], k_all, held)
    assert 0.0 < expected < 1.0
    assert tracker.take("s", 3) == [pytest.approx(expected, rel=1e-6)]
    assert tracker.take("s", 3) is None  # taken once
    assert tracker.shadow_bytes() == 4 * 2 * 4 * 4
    tracker.end_session("s")
    assert tracker.shadow_bytes() == 0


def _yaw_poses(yaws):
    out = np.repeat(np.eye(4)[None], len(yaws), axis=0)
    out[:, :3, :3] = yaw_matrix(np.asarray(yaws, dtype=float))
    return out


def test_revisit_needs_a_candidate_chunk_and_leaving_in_between():
    # chunk:  0  1   2   3   4   5   6   7  8
    yaws = [0, 10, 20, 40, 60, 40, 20, 5, 5]
    src = revisit_sources(_yaw_poses(yaws), sink_chunks=1, recent_chunks=2, max_degrees=6.0)
    assert src[5] == []  # the same yaw as chunk 3, but chunk 3 is in chunk 5's recent window (3, 4)
    assert src[6] == [2]  # back at 20 after leaving: a revisit of chunk 2
    assert src[7] == [1]  # 5 deg: within 6 of chunk 1 (10); chunk 0 is the sink, never a candidate
    assert src[8] == [1]  # chunk 7 is recent; chunk 1 again
    held = revisit_sources(_yaw_poses([0, 30, 30, 30, 30, 30]), 1, 2, max_degrees=6.0)
    assert all(not s for s in held)  # holding a pose is not coming back to it
    # a slow pan is no revisit at 30 degrees either: every chunk in between is close
    assert all(not s for s in revisit_sources(_yaw_poses([0, 5, 10, 15, 20, 25]), 1, 2, max_degrees=30.0))
    moved = _yaw_poses([0, 0, 0, 0, 0])
    moved[:, 0, 3] = [0.0, 0.0, 2.0, 2.0, 0.1]  # translation: away and back
    assert revisit_sources(moved, 1, 2)[4] == [1]
    with pytest.raises(ValueError, match="chunk_poses"):
        revisit_sources(np.zeros((3, 3, 3)), 1, 2)


def test_recall_summary_means():
    poses = _yaw_poses([0, 10, 20, 40, 60, 40, 20])
    recalls = [[1.0], [1.0], [1.0], [1.0], [0.5, 0.7], [0.4], [0.2]]
    s = recall_summary([(poses, recalls)], 1, 2, max_degrees=6.0)
    assert s["attention_recall_mean"] == pytest.approx((0.6 + 0.4 + 0.2) / 3)  # chunks 4, 5, 6: past 1 + 2
    assert s["attention_recall_revisit_mean"] == pytest.approx(0.2) and s["revisit_chunks"] == 1
    empty = recall_summary([(poses[:2], [[1.0], [1.0]])], 1, 2)
    assert empty["attention_recall_mean"] is None and empty["revisit_chunks"] == 0


TRAJ = "R_L90"  # 15 chunks right, a hold, 15 back: the return revisits the way out


def _rollout(num_chunks, **kwargs):
    kwargs.setdefault("kv_cache_memory", 0.01)
    with VideoEngine(model="tiny", num_denoising_steps=1, eval_attention_recall=True, **kwargs) as engine:
        engine.add_session("a", trajectory=TRAJ, num_chunks=num_chunks)
        engine.run()
        return engine.chunk_results("a"), engine_recall_summary(engine)


def test_full_window_recall_is_one_and_sliding_forgets():
    full, full_sum = _rollout(12, attention_window="full")
    assert all(r.attention_recall == [1.0, 1.0] for r in full)  # tiny: 2 layers
    sliding, _ = _rollout(12, attention_window="sliding", sink_frames=3, recent_frames=3)
    values = [r.attention_recall_mean for r in sliding]
    assert values[:3] == [1.0, 1.0, 1.0]  # history still inside sink 1 + recent 1 + current
    assert all(0.0 < v < 1.0 for v in values[3:])
    assert values[-1] < values[3]  # the forgotten share grows with the rollout
    assert full_sum["attention_recall_mean"] == 1.0


def test_recall_is_passive_and_off_by_default():
    on, _ = _rollout(5, attention_window="sliding")
    with VideoEngine(model="tiny", num_denoising_steps=1, kv_cache_memory=0.01) as engine:
        assert engine.runner.recall is None
        engine.add_session("a", trajectory=TRAJ, num_chunks=5)
        engine.run()
        off = engine.chunk_results("a")
    assert all(r.attention_recall is None for r in off)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(on, off))


def test_worldkv_at_full_keep_ratio_recalls_at_least_sliding_at_revisits():
    cfg = json.dumps({"keep_ratio": 1.0, "bank_bytes": 1 << 22})
    wkv, wkv_sum = _rollout(34, kv_connector="worldkv", kv_connector_config=cfg)
    sld, sld_sum = _rollout(34, attention_window="sliding")
    assert wkv_sum["revisit_chunks"] == sld_sum["revisit_chunks"] > 0
    assert wkv_sum["attention_recall_revisit_mean"] >= sld_sum["attention_recall_revisit_mean"]
    assert any(r.retrieved for r in wkv)
    # a retrieved chunk at keep_ratio 1 is held whole: the window holds a superset of sliding's
    assert all(0.0 < r.attention_recall_mean <= 1.0 for r in wkv)


def test_generate_flag_writes_recall_records_and_summary(tmp_path, capsys):
    js = tmp_path / "r.json"
    rc = main(["generate", "--trajectory", TRAJ, "--num-chunks", "8", "--num-denoising-steps", "1",
               "--kv-cache-memory", "0.01", "--eval-attention-recall", "--no-progress", "--json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "attention recall, past the window" in out
    data = json.loads(js.read_text())
    recs = data["records"]
    assert len(recs[0]["attention_recall"]) == 2 and recs[0]["attention_recall_mean"] == 1.0
    assert 0.0 < recs[-1]["attention_recall_mean"] < 1.0
    assert 0.0 < data["summary"]["attention_recall_mean"] < 1.0 and data["args"]["eval_attention_recall"]


@pytest.mark.cuda
def test_cuda_recall_matches_the_cpu_reference():
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparison
    torch.backends.cudnn.allow_tf32 = False
    cpu, _ = _rollout(8, attention_window="sliding", sink_frames=3, recent_frames=3)
    gpu, _ = _rollout(8, attention_window="sliding", sink_frames=3, recent_frames=3, device="cuda")
    for a, b in zip(cpu, gpu):
        assert a.attention_recall == pytest.approx(b.attention_recall, abs=1e-3)
