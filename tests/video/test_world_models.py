"""Matrix-Game-2 and LingBot-World in the video backend: the action caches kept beside the paged KV
(retrieved chunks bring their action K/V back), --actions through the CLI into both the action
conditioning and the poses the connector retrieves by, and bad inputs. Exactness against FastVideo is
in tests/fastvideo/test_world_models_peer.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worldkv_connector.cli import main
from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.integration.video.attention import Segment, WindowPlan
from worldkv_connector.connector.api import CommittedChunk
from worldkv_connector.integration.video.models.action_cache import ActionKVStore
from worldkv_connector.actions import action_poses, load_actions
from worldkv_connector.retrieval.poses import yaw_pitch_degrees


def _plan(rows):
    plan = WindowPlan(page_size=4)
    for sid, segs in rows:
        plan.add_row(sid, [Segment(kind, cid, [0], [1]) for kind, cid in segs],
                     CommittedChunk(sid, segs[-1][1], [0], 1, np.eye(4)[None]))
    return plan


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_action_store_attends_over_exactly_the_window_chunks_in_order():
    store, s, h, d = ActionKVStore(), 3, 2, 4
    g = torch.Generator().manual_seed(0)
    kv = {}
    # commit chunks 0..4 of session "a" (mouse: [S, 3, H, D] per chunk; keyboard: [1, 3, H, D])
    for c in range(5):
        store.begin_step(_plan([("a", [("current", c)])]))
        for kind, rows in (("mouse", s), ("keyboard", 1)):
            k, v = torch.randn(rows, 3, h, d, generator=g), torch.randn(rows, 3, h, d, generator=g)
            kv[(c, kind)] = (k, v)
            store(0, kind, torch.randn(s, 3, h, d, generator=g), k, v)
    # a step with sink 0, retrieved (external) 2, recent 4 and current 5
    plan = _plan([("a", [("sink", 0), ("external", 2), ("recent", 4), ("current", 5)])])
    store.begin_step(plan)
    q = torch.randn(s, 3, h, d, generator=g)
    for kind, rows in (("mouse", s), ("keyboard", 1)):
        k5, v5 = torch.randn(rows, 3, h, d, generator=g), torch.randn(rows, 3, h, d, generator=g)
        out = store(0, kind, q, k5, v5)
        kk = torch.cat([kv[(c, kind)][0] for c in (0, 2, 4)] + [k5], 1).expand(s, -1, -1, -1)
        vv = torch.cat([kv[(c, kind)][1] for c in (0, 2, 4)] + [v5], 1).expand(s, -1, -1, -1)
        torch.testing.assert_close(out, _sdpa(q, kk, vv))
    # a retrieved chunk dropped for a failed load is dropped from the action attention too
    plan.drop_external({0})
    out = store(0, "mouse", q, k5.expand(s, -1, -1, -1), v5.expand(s, -1, -1, -1))
    kk = torch.cat([kv[(c, "mouse")][0] for c in (0, 4)] + [k5.expand(s, -1, -1, -1)], 1)
    assert out.shape == q.shape and store.missing == 0
    # an entry that never existed (a chunk resumed from a saved bank) is counted, not invented
    store.begin_step(_plan([("a", [("external", 7), ("current", 6)])]))
    store(0, "keyboard", q, k5, v5)
    assert store.missing == 1
    store.end_session("a")
    assert store.num_chunks == 0 and store.nbytes == 0


def _revisit_actions(n=4 * 26 + 1):
    """Turn right 45 video frames at 2 deg/frame (mouse yaw 0.1), hold, turn back, hold: a revisit."""
    kb, ms = np.zeros((n, 4)), np.zeros((n, 2))
    ms[:45, 1], ms[54:99, 1] = 0.1, -0.1
    return kb, ms


def test_action_poses_integrate_mouse_yaw_and_keys():
    kb, ms = _revisit_actions()
    poses = action_poses(kb, ms)
    assert poses.shape == (27, 4, 4)  # 105 video frames -> 27 latent frames = 9 chunks
    yaw = yaw_pitch_degrees(poses)[0]
    assert yaw[5] == pytest.approx(40.0) and yaw[12] == pytest.approx(90.0)  # 2 deg per video frame
    assert abs(yaw[26]) < 1e-9  # back where it started
    kb2 = np.zeros((9, 4))
    kb2[:, 0] = 1  # W for 8 steps of 1/24
    np.testing.assert_allclose(action_poses(kb2, np.zeros((9, 2)), frames_per_chunk=1)[-1, :3, 3], [0, 0, 8 / 24])


def test_matrix_game2_retrieval_brings_back_the_action_caches():
    kb, ms = _revisit_actions()
    cfg = dict(keep_ratio=0.5, retrieval_chunks=2, hot_chunks=2)
    with VideoEngine(model="tiny-mg2", num_denoising_steps=1, kv_connector="worldkv",
                     kv_connector_config=json.dumps(cfg)) as engine:
        engine.add_session("a", inputs={"keyboard": kb, "mouse": ms})
        store, seen = engine.runner.action_store, []
        while engine.has_unfinished_sessions():
            for r in engine.step():
                seen.append(r.retrieved)
                # every retrieved chunk's action K/V was in the store for this step
                assert all(store.has("a", c) or r.finished for c in r.retrieved)
        assert store.missing == 0 and any(seen[4:])
        assert store.num_chunks == 0  # freed when the session ended


def test_generate_with_actions_retrieves_by_the_integrated_poses(tmp_path, capsys):
    kb, ms = _revisit_actions()
    path = tmp_path / "revisit.npy"
    np.save(path, np.concatenate((kb, ms), axis=1))
    js = tmp_path / "g.json"
    rc = main(["generate", "--model", "tiny-mg2", "--actions", str(path), "--kv-connector", "worldkv",
               "--kv-connector-config", json.dumps({"retrieval_chunks": 1, "hot_chunks": 1}),
               "--num-denoising-steps", "1", "--no-progress", "--json", str(js), "--per-chunk"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    recs = json.loads(js.read_text())["records"]
    assert len(recs) == 9
    yaws = [float(yaw_pitch_degrees(np.asarray(r["pose"])[None])[0][0]) for r in recs]
    # the return leg (chunks 6-8) retrieves the first-visit chunk whose yaw is closest to its own
    for r in recs[6:]:
        cand = list(range(1, r["index"] - 2))
        best = min(cand, key=lambda c: abs(yaws[c] - yaws[r["index"]]))
        assert r["retrieved"] == [best], (r["index"], r["retrieved"], yaws)
    # --per-chunk printed one row per chunk as it came: the same yaw and retrieved ids
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["session", "chunk"])
    rows = [line.split() for line in lines[start + 1 : start + 10]]
    assert [int(r[1]) for r in rows] == [r["index"] for r in recs] == list(range(9))
    for row, rec, yaw in zip(rows, recs, yaws):
        assert float(row[4]) == pytest.approx(yaw, abs=0.06)
        assert row[7:] == ([str(c) for c in rec["retrieved"]] or ["-"])


def test_actions_file_formats_and_errors(tmp_path, capsys):
    kb, ms = _revisit_actions(9)
    (tmp_path / "a.json").write_text(json.dumps({"keyboard": kb.tolist(), "mouse": ms.tolist()}))
    k2, m2 = load_actions(str(tmp_path / "a.json"))
    np.testing.assert_array_equal(k2, kb)
    np.testing.assert_array_equal(m2, ms)
    np.save(tmp_path / "bad.npy", np.zeros((9, 5)))
    (tmp_path / "bad.json").write_text(json.dumps({"keys": []}))
    for path, needle in ((tmp_path / "bad.npy", "expected [N, 6]"), (tmp_path / "bad.json", "'keyboard'"),
                         (tmp_path / "nope.npy", "no such file")):
        assert main(["generate", "--model", "tiny-mg2", "--actions", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert main(["generate", "--model", "tiny", "--actions", str(tmp_path / "a.json"), "--no-progress"]) == 2
    assert "not action-conditioned" in capsys.readouterr().err
    with VideoEngine(model="tiny-mg2", num_denoising_steps=1) as engine:
        with pytest.raises(ValueError, match=r"keyboard actions must have shape \[N, 4\]"):
            engine.add_session("a", num_chunks=1, inputs={"keyboard": np.zeros((9, 3))})
        with pytest.raises(ValueError, match="takes"):
            engine.add_session("b", num_chunks=1, inputs={"intrinsics": [1, 1, 1, 1]})
        assert not engine.scheduler.sessions  # nothing half-added


def test_lingbot_session_runs_with_poses_relative_to_the_first_frame():
    with VideoEngine(model="tiny-lingbot", num_denoising_steps=1) as engine:
        engine.add_session("a", trajectory="R_L30", inputs={"intrinsics": [40.0, 40.0, 32.0, 32.0]})
        c2w = engine.runner.inputs.get("a")["c2w"]
        np.testing.assert_allclose(c2w[0].numpy(), np.eye(4), atol=1e-6)  # the first frame is the origin
        engine.run()
        assert len(engine.results("a")) == 4
