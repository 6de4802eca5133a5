"""Pose index and scoring policies: the WorldKV distance by hand, top-k with exclusion, sessions,
the fov policy, a brute-force cross-check, and the ``worldkv bench index`` tool."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldkv_connector.bench import BENCHES
from worldkv_connector.bench import index as bench_index
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.retrieval import (
    POLICIES, FovPolicy, PoseIndex, PosePolicy, get_policy, orthonormalize, register_policy,
)
from worldkv_connector.retrieval.poses import pitch_matrix, yaw_matrix


def _pose(yaw=0.0, t=(0.0, 0.0, 0.0), pitch=0.0) -> np.ndarray:
    p = np.eye(4)
    p[:3, :3] = yaw_matrix(yaw) @ pitch_matrix(pitch)
    p[:3, 3] = t
    return p


def _chunk(yaw=0.0, t=(0.0, 0.0, 0.0), frames=3) -> np.ndarray:
    return np.broadcast_to(_pose(yaw, t), (frames, 4, 4)).copy()


# --- the WorldKV distance ------------------------------------------------------------------


def test_pose_distance_matches_a_hand_computation():
    index = PoseIndex("pose")
    index.add("s", 0, _chunk(0.0, (1, 0, 0)))  # trans 1, rot 0
    index.add("s", 1, _chunk(90.0, (0, 2, 0)))  # trans 4, rot pi/2
    index.add("s", 2, _chunk(180.0, (0, 0, 0)))  # trans 0, rot pi
    ids, dist = index.scores("s", _chunk())
    by_id = dict(zip(ids.tolist(), dist.tolist()))
    # normalised by max trans 4 and max rot pi
    assert by_id[0] == pytest.approx(0.5 * 1 / 4 + 0.0)
    assert by_id[1] == pytest.approx(0.5 * 4 / 4 + 0.5 * (math.pi / 2) / math.pi)
    assert by_id[2] == pytest.approx(0.0 + 0.5 * math.pi / math.pi)
    assert index.query("s", _chunk(), k=3) == [0, 2, 1]


def test_zero_maximum_is_not_divided_and_ties_break_by_chunk_id():
    index = PoseIndex()
    for cid, yaw in [(7, 60.0), (3, 0.0), (5, 0.0), (1, 60.0)]:
        index.add("s", cid, _chunk(yaw, (2, 0, 0)))  # every chunk at the same place: max trans = 0
    ids, dist = index.scores("s", _chunk(0.0, (2, 0, 0)))
    by_id = dict(zip(ids.tolist(), dist.tolist()))
    assert by_id[3] == by_id[5] == 0.0
    assert by_id[1] == by_id[7] == pytest.approx(0.5)  # rot / max rot = 1
    assert index.query("s", _chunk(0.0, (2, 0, 0)), k=4) == [3, 5, 1, 7]
    assert index.query("s", _chunk(0.0, (2, 0, 0)), k=3) == [3, 5, 1]
    # all identical: both maxima are 0, every score is 0, ids ascending
    same = PoseIndex()
    for cid in (9, 2, 4):
        same.add("s", cid, _chunk())
    assert same.scores("s", _chunk())[1].tolist() == [0.0, 0.0, 0.0]
    assert same.query("s", _chunk(), k=2) == [2, 4]


def test_mean_rotation_is_used_without_reorthonormalisation():
    index = PoseIndex()
    frames = np.stack([_pose(30.0), _pose(-30.0), _pose(30.0), _pose(-30.0)])  # mean: diag(c, 1, c)
    index.add("s", 0, frames)
    index.add("s", 1, _chunk(90.0))
    t, R = index.mean_pose("s", 0)
    c = math.cos(math.radians(30.0))
    np.testing.assert_allclose(R, np.diag([c, 1.0, c]), atol=1e-12)
    np.testing.assert_allclose(t, 0.0)
    _, dist = index.scores("s", _chunk())
    # (trace(R_c^T I) - 1) / 2 = c -> rot = 30 deg, against 90 deg for chunk 1 (max trans is 0)
    assert dist[0] == pytest.approx(0.5 * (math.pi / 6) / (math.pi / 2))
    assert dist[1] == pytest.approx(0.5)


def test_excluded_chunks_are_never_returned_and_not_in_the_normalisation():
    index = PoseIndex()
    for cid in range(6):
        index.add("s", cid, _chunk(0.0, (cid, 0, 0)))
    index.add("s", 6, _chunk(180.0, (100, 0, 0)))  # far away, facing back
    q = _chunk(0.0, (0, 0, 0))
    assert index.query("s", q, k=3, exclude=[0, 1]) == [2, 3, 4]
    ids, with_far = index.scores("s", q)
    _, without_far = index.scores("s", q, exclude={6})
    pos = {c: i for i, c in enumerate(ids.tolist())}
    assert with_far[pos[5]] == pytest.approx(0.5 * 25 / 100**2)
    assert without_far[pos[5]] == pytest.approx(0.5 * 25 / 25)  # max over the remaining candidates
    assert without_far[pos[6]] == np.inf
    assert index.query("s", q, k=10, exclude=range(5)) == [5, 6]  # fewer than k: all there is
    assert index.query("s", q, k=0) == []
    assert index.query("s", q, k=3, exclude=range(7)) == []
    assert index.query("s", q, k=2, exclude=[99]) == [0, 1]  # unknown ids are ignored


def test_sessions_are_isolated():
    index = PoseIndex()
    index.add("a", 0, _chunk(0.0, (0, 0, 0)))
    index.add("a", 1, _chunk(0.0, (5, 0, 0)))
    index.add("b", 0, _chunk(0.0, (9, 0, 0)))  # same chunk id, other session: allowed
    index.add("b", 2, _chunk(0.0, (0, 0, 0)))
    assert index.query("a", _chunk(), k=5) == [0, 1]
    assert index.query("b", _chunk(), k=5) == [2, 0]
    assert index.query("nobody", _chunk(), k=5) == []
    np.testing.assert_allclose(index.mean_pose("b", 0)[0], [9, 0, 0])
    assert len(index) == 4 and index.chunks("a") == [0, 1] and index.chunks("b") == [0, 2]
    assert ("a", 1) in index and ("b", 1) not in index
    assert index.remove_session("a") == 2
    assert len(index) == 2 and index.chunks("a") == [] and index.query("a", _chunk(), k=2) == []
    assert index.query("b", _chunk(), k=5) == [2, 0]
    assert index.remove_session("a") == 0


def test_remove_swaps_rows_and_keeps_answers_right():
    index = PoseIndex()
    for cid in range(10):
        index.add("s", cid, _chunk(cid * 10.0, (cid, 0, 0)))
    assert index.remove("s", 3) is True
    assert index.remove("s", 3) is False
    assert index.remove("other", 0) is False
    assert index.remove("s", 0) is True
    assert len(index) == 8 and index.chunks("s") == [1, 2, 4, 5, 6, 7, 8, 9]
    np.testing.assert_allclose(index.mean_pose("s", 9)[0], [9, 0, 0])  # the row moved into the hole
    assert index.query("s", _chunk(0.0, (0, 0, 0)), k=3) == [1, 2, 4]
    with pytest.raises(KeyError, match="chunk 3 of session 's'"):
        index.mean_pose("s", 3)
    index.add("s", 3, _chunk(0.0, (0, 0, 0)))  # an id can come back after removal
    assert index.query("s", _chunk(), k=1) == [3]
    for cid in index.chunks("s"):
        index.remove("s", cid)
    assert len(index) == 0 and index.query("s", _chunk(), k=1) == []


def test_duplicates_and_bad_input_raise():
    index = PoseIndex()
    index.add("s", 1, _chunk())
    with pytest.raises(ValueError, match="chunk 1 of session 's' is already"):
        index.add("s", 1, _chunk(10.0))
    with pytest.raises(ValueError, match="chunk 1 .* already"):
        index.add_many("s", [2, 1], np.stack([_chunk(), _chunk()]))
    with pytest.raises(ValueError, match="chunk 4 .* already"):
        index.add_many("s", [4, 4], np.stack([_chunk(), _chunk()]))
    assert index.chunks("s") == [1]  # all-or-nothing
    with pytest.raises(ValueError, match="chunk_id=-1"):
        index.add("s", -1, _chunk())
    with pytest.raises(ValueError, match="chunk_id=True"):
        index.add("s", True, _chunk())
    with pytest.raises(ValueError, match="session_id=3"):
        index.add(3, 0, _chunk())
    bad = _chunk()
    bad[1, 0, 1] = 0.5
    with pytest.raises(ValueError, match=r"frame_poses of chunk 5\[1\] .*orthonormal"):
        index.add("s", 5, bad)
    with pytest.raises(ValueError, match=r"\[N=2, F, 4, 4\]"):
        index.add_many("s", [7, 8], _chunk())
    with pytest.raises(ValueError, match="k=-1"):
        index.query("s", _chunk(), k=-1)
    with pytest.raises(ValueError, match=r"query_poses\[0\] contains NaN"):
        index.query("s", np.full((4, 4), np.nan), k=1)
    with pytest.raises(ValueError, match="unknown scoring policy 'nearest'.*'fov', 'pose'"):
        PoseIndex("nearest")
    assert len(index) == 1


def test_add_many_equals_repeated_add_and_a_single_pose_query():
    rng = np.random.default_rng(1)
    poses = bench_index.random_chunk_poses(40, 3, rng)
    one, many = PoseIndex(), PoseIndex()
    for cid in range(40):
        one.add("s", cid + 100, poses[cid])
    many.add_many("s", range(100, 140), poses)
    for cid in (100, 117, 139):
        for a, b in zip(one.mean_pose("s", cid), many.mean_pose("s", cid)):
            np.testing.assert_array_equal(a, b)
    q = poses[5]
    assert one.query("s", q, 6, exclude=[105]) == many.query("s", q, 6, exclude=[105])
    assert one.query("s", q[0], 6) == one.query("s", q[:1], 6)  # a [4, 4] query is one frame


# --- brute force cross-check ---------------------------------------------------------------


def _brute_pose_dist(index: PoseIndex, session: str, query: np.ndarray, exclude) -> dict[int, float]:
    q_t, q_R = query[:, :3, 3].mean(axis=0), query[:, :3, :3].mean(axis=0)
    cands = [c for c in index.chunks(session) if c not in set(exclude)]
    trans, rot = {}, {}
    for c in cands:
        t, R = index.mean_pose(session, c)
        trans[c] = float(np.sum((t - q_t) ** 2))
        rot[c] = math.acos(min(1.0, max(-1.0, (float(np.trace(R.T @ q_R)) - 1.0) / 2.0)))
    mt, mr = max(trans.values(), default=0.0), max(rot.values(), default=0.0)
    return {c: 0.5 * (trans[c] / mt if mt > 0 else trans[c]) + 0.5 * (rot[c] / mr if mr > 0 else rot[c]) for c in cands}


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 150),  # both top-k selections: a sort up to EXACT_SELECT, passes above
    k=st.integers(0, 12),
    n_exclude=st.integers(0, 8),
    pool=st.sampled_from([None, 3]),
)
def test_vectorised_query_matches_a_brute_force_loop(seed, n, k, n_exclude, pool):
    rng = np.random.default_rng(seed)
    poses = bench_index.random_chunk_poses(n if pool is None else pool, 3, rng, side=4.0)
    if pool is not None:  # few distinct poses: many exact ties
        poses = poses[rng.integers(0, pool, n)]
    ids = rng.choice(1000, size=n, replace=False)
    index = PoseIndex()
    index.add_many("s", ids.tolist(), poses)
    for cid in ids[: n // 4]:  # exercise swap-remove
        index.remove("s", int(cid))
    exclude = rng.choice(ids, size=min(n_exclude, n), replace=False).tolist()
    query = bench_index.random_chunk_poses(1, 3, rng, side=4.0)[0]
    got = index.query("s", query, k, exclude)
    brute = _brute_pose_dist(index, "s", query, exclude)
    expect = sorted(brute, key=lambda c: (brute[c], c))[:k]
    assert len(got) == len(expect) == min(k, len(brute))
    assert len(set(got)) == len(got) and not set(got) & set(exclude)
    # same distances in the same order (a near-tie may swap ids only within rounding error)
    np.testing.assert_allclose([brute[c] for c in got], [brute[c] for c in expect], rtol=0, atol=1e-12)
    _, scores = index.scores("s", query, exclude)
    np.testing.assert_allclose(sorted(s for s in scores if np.isfinite(s)), sorted(brute.values()), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), k=st.integers(1, 10))
def test_pose_shortlist_holds_the_top_k_with_exact_scores(seed, n, k):
    rng = np.random.default_rng(seed)
    poses = bench_index.random_chunk_poses(n, 3, rng)
    t, R = poses[:, :, :3, 3].mean(axis=1), poses[:, :, :3, :3].mean(axis=1)
    q = bench_index.random_chunk_poses(1, 3, rng)[0]
    q_t, q_R = q[:, :3, 3].mean(axis=0), q[:, :3, :3].mean(axis=0)
    valid = rng.random(n) > 0.2
    policy = PosePolicy()
    full = policy.score(t, R, q_t, q_R, valid=valid)
    rows, dist = policy.shortlist(t, R, q_t, q_R, k, valid=valid)
    np.testing.assert_array_equal(dist, full[rows])
    live = np.flatnonzero(valid)
    if live.size:
        kth = np.sort(full[live])[min(k, live.size) - 1]
        assert set(np.flatnonzero(full <= kth)) <= set(rows.tolist())
    assert valid[rows].all()


@pytest.mark.parametrize("n,density,k", [(5000, 0.99, 6), (20000, 0.9, 1), (20000, 0.9, 40), (9000, 0.001, 6)])
def test_pose_shortlist_seeded_by_a_sample_keeps_the_exact_top_k(n, density, k):
    """Over SEED_SAMPLE rows the threshold comes from a strided sample (at 0.001 density the sample
    has too few valid rows and every row is selected over): the top k and its ties stay exact."""
    rng = np.random.default_rng(n + k)
    poses = bench_index.random_chunk_poses(n, 3, rng)
    t, R = poses[:, :, :3, 3].mean(axis=1), poses[:, :, :3, :3].mean(axis=1)
    policy = PosePolicy()
    for _ in range(5):
        q = bench_index.random_chunk_poses(1, 3, rng, side=n ** (1 / 3))[0]
        q_t, q_R = q[:, :3, 3].mean(axis=0), q[:, :3, :3].mean(axis=0)
        valid = rng.random(n) < density
        valid[:k + 1] = True  # at least k + 1 live rows: the bound path runs
        full = policy.score(t, R, q_t, q_R, valid=valid)
        rows, dist = policy.shortlist(t, R, q_t, q_R, k, valid=valid)
        np.testing.assert_array_equal(dist, full[rows])
        kth = np.sort(full[valid])[k - 1]
        assert set(np.flatnonzero(full <= kth)) <= set(rows.tolist())
        assert valid[rows].all() and rows.size < n // 4  # the shortlist is short


# --- fov policy ----------------------------------------------------------------------------


def _brute_fov(policy: FovPolicy, t, R, q_t, q_R) -> np.ndarray:
    tan_h = math.tan(math.radians(policy.fov_degrees) / 2)
    tan_v = tan_h / policy.aspect
    world = policy.points @ q_R.T + q_t
    out = []
    for tc, Rc in zip(t, R):
        inside = 0
        for p in world:
            x, y, z = Rc.T @ (p - tc)
            inside += policy.near <= z <= policy.far and abs(x) <= tan_h * z and abs(y) <= tan_v * z
        out.append(1.0 - inside / len(world))
    return np.array(out)


def test_fov_prefers_a_camera_looking_the_same_way():
    index = PoseIndex("fov", fov_degrees=90.0, near=0.1, far=10.0)
    index.add("s", 0, _chunk(0.0, (0, 0, 0)))  # identical camera
    index.add("s", 1, _chunk(20.0, (0.5, 0, 0)))  # nearby, a little turned
    index.add("s", 2, _chunk(180.0, (0, 0, 0)))  # same place, facing away
    index.add("s", 3, _chunk(0.0, (100, 0, 0)))  # far away: exact shortcut
    ids, scores = index.scores("s", _chunk())
    by_id = dict(zip(ids.tolist(), scores.tolist()))
    assert by_id[0] == 0.0
    assert 0.0 < by_id[1] < 0.5
    assert by_id[2] == 1.0 and by_id[3] == 1.0
    assert index.query("s", _chunk(), k=4) == [0, 1, 2, 3]
    assert index.query("s", _chunk(), k=2, exclude=[0]) == [1, 2]


def test_fov_matches_a_brute_force_loop_and_uses_orthonormalised_means():
    rng = np.random.default_rng(7)
    poses = bench_index.random_chunk_poses(60, 3, rng, side=6.0)
    policy = FovPolicy(fov_degrees=70.0, aspect=1.5, near=0.2, far=6.0, rays=16, depths=3, seed=5, block=7)
    q = bench_index.random_chunk_poses(1, 3, rng, side=6.0)[0]
    index = PoseIndex("fov", fov_degrees=70.0, aspect=1.5, near=0.2, far=6.0, rays=16, depths=3, seed=5, block=7)
    index.add_many("s", range(60), poses)
    _, got = index.scores("s", q)
    t, R = poses[:, :, :3, 3].mean(axis=1), orthonormalize(poses[:, :, :3, :3].mean(axis=1))
    q_t, q_R = q[:, :3, 3].mean(axis=0), orthonormalize(q[:, :3, :3].mean(axis=0))
    want = _brute_fov(policy, t, R, q_t, q_R)
    # the inner loop runs in float32: a sample on a frustum face may flip (1 of 48 = 0.021)
    assert np.abs(got - want).max() <= 1.0 / 48 + 1e-12
    assert np.mean(got == want) > 0.9
    assert (want < 1.0).sum() >= 5  # the scene really overlaps


def test_fov_policy_validation_and_samples():
    with pytest.raises(ValueError, match=r"FovPolicy.fov_degrees=200.0 is out of range: allowed 1.0"):
        FovPolicy(fov_degrees=200.0)
    with pytest.raises(ValueError, match="FovPolicy.far=1.0 must be greater than near=2.0"):
        FovPolicy(near=2.0, far=1.0)
    with pytest.raises(ValueError, match="FovPolicy.rays"):
        FovPolicy(rays=2.5)
    a, b = FovPolicy(seed=1), FovPolicy(seed=1)
    np.testing.assert_array_equal(a.points, b.points)  # fixed, seeded samples
    assert a.points.shape == (64 * 4, 3)
    assert (a.points[:, 2] > 0.1).all() and (a.points[:, 2] < 10.0).all()
    with pytest.raises(ValueError, match=r"valid must have shape \[2\]"):
        a.score(np.zeros((2, 3)), np.tile(np.eye(3), (2, 1, 1)), np.zeros(3), np.eye(3), valid=[True])


def test_orthonormalize_gives_the_nearest_proper_rotation():
    c = math.cos(math.radians(30.0))
    np.testing.assert_allclose(orthonormalize(np.diag([c, 1.0, c])), np.eye(3), atol=1e-12)
    R = yaw_matrix(40.0) @ pitch_matrix(-10.0)
    np.testing.assert_allclose(orthonormalize(R * 0.7), R, atol=1e-12)
    assert np.linalg.det(orthonormalize(np.diag([1.0, 1.0, -1.0]))) == pytest.approx(1.0)


def test_from_config_picks_the_policy():
    assert PoseIndex.from_config(WorldKVConfig()).policy_name == "pose"
    idx = PoseIndex.from_config(WorldKVConfig(policy="fov", fov_degrees=60.0, fov_near=0.5, fov_far=4.0))
    assert isinstance(idx.policy, FovPolicy) and (idx.policy.fov_degrees, idx.policy.near, idx.policy.far) == (
        60.0,
        0.5,
        4.0,
    )


def test_a_registered_policy_without_shortlist_is_used_by_the_index():
    @register_policy("test-x")
    class XPolicy:  # score = x coordinate of the chunk centre
        orthonormal = False

        def score(self, cand_t, cand_R, q_t, q_R, valid=None):
            out = np.array(cand_t[:, 0], dtype=np.float64)
            if valid is not None:
                out[~np.asarray(valid)] = np.inf
            return out

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_policy("test-x")(XPolicy)
        index = PoseIndex("test-x")
        for cid, x in enumerate([3.0, -1.0, 2.0, 0.0]):
            index.add("s", cid, _chunk(0.0, (x, 0, 0)))
        assert index.query("s", _chunk(), k=3, exclude=[1]) == [3, 2, 0]
        assert isinstance(get_policy("test-x"), XPolicy)
    finally:
        POLICIES.unregister("test-x")


# --- bench -------------------------------------------------------------------------------------


def test_bench_index_runs_and_reports_json_fields(capsys):
    assert "index" in BENCHES
    parser = argparse.ArgumentParser()
    bench_index.add_arguments(parser)
    args = parser.parse_args(["--sizes", "50,400", "--repeats", "3", "--warmup", "1"])
    out = bench_index.run(args)
    assert out["target_ms"] == 2.0
    rows = out["results"]
    assert {(r["chunks"], r["policy"]) for r in rows} == {(50, "pose"), (50, "fov"), (400, "pose"), (400, "fov")}
    for r in rows:
        assert r["k"] == 6 and r["repeats"] == 3
        assert 0 < r["median_ms"] <= r["p90_ms"]
        if r["policy"] == "pose":  # baseline measured (and its answer checked) in the same run
            assert r["baseline_ms"] > 0 and r["speedup"] == pytest.approx(r["baseline_ms"] / r["median_ms"])
        else:
            assert r["baseline_ms"] is None and r["speedup"] is None
    table = capsys.readouterr().out
    assert "median ms" in table and "loop ms" in table and "400" in table
    defaults = parser.parse_args([])
    assert defaults.sizes == [1000, 10_000, 100_000] and defaults.k == 6 and defaults.repeats == 50
    with pytest.raises(ValueError, match="--k=-1"):
        bench_index.run(parser.parse_args(["--k", "-1", "--sizes", "10"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--sizes", "10,x"])


def test_bench_random_chunk_poses_are_valid_camera_chunks():
    rng = np.random.default_rng(0)
    poses = bench_index.random_chunk_poses(20, 3, rng, side=5.0)
    assert poses.shape == (20, 3, 4, 4)
    index = PoseIndex()
    index.add_many("s", range(20), poses)  # validates every frame
    t = poses[:, :, :3, 3]
    assert t.min() > -1.0 and t.max() < 6.0


def test_fov_separation_prefilter_keeps_the_exact_top_k():
    """The fov shortlist skips candidates whose frustum a face plane separates from the query's:
    on dense random banks its top-k (ties by id) equals ranking the full ``score`` pass, and
    every skipped candidate scores exactly 1."""
    from worldkv_connector.bench.index import random_chunk_poses
    from worldkv_connector.retrieval.poses import chunk_mean_pose

    rng = np.random.default_rng(11)
    for n, k in ((3000, 6), (400, 6), (50, 40)):
        index = PoseIndex("fov")
        index.add_many("s", range(n), random_chunk_poses(n, 3, rng))
        for q in random_chunk_poses(4, 3, rng, side=n ** (1 / 3)):
            ids, scores = index.scores("s", q, exclude=[1, 2])
            order = np.lexsort((ids, scores))
            assert index.query("s", q, k, exclude=[1, 2]) == ids[order][:k].tolist()
            s = index._sessions["s"]
            t, R = s.cand_t(), s.cand_R(True)
            world, corners = index.policy._world_samples(*chunk_mean_pose(q))
            sep = index.policy._separated(corners, t, R)
            assert sep.any() and np.all(scores[sep & (ids != 1) & (ids != 2)] == 1.0)


def test_fov_branch_and_bound_keeps_the_exact_top_k_with_ties_and_removals():
    """The tile-bound shortlist (per-chunk planes kept at insert, swap-removal included) returns
    the same top-k, ties by id, as ranking the full ``score`` pass; so does a direct call that
    computes the planes itself, and on a coarse sample set where many counts tie."""
    from worldkv_connector.bench.index import random_chunk_poses
    from worldkv_connector.retrieval.poses import chunk_mean_pose

    rng = np.random.default_rng(23)
    for n, k, kwargs in ((2000, 6, {}), (300, 10, {"rays": 8, "depths": 2}), (500, 6, {"fov_degrees": 40.0, "far": 4.0})):
        index = PoseIndex("fov", **kwargs)
        index.add_many("s", range(n), random_chunk_poses(n, 3, rng))
        for cid in rng.choice(n, n // 10, replace=False).tolist():
            index.remove("s", cid)
        s = index._sessions["s"]
        assert s.prep.shape[-1] >= s.n
        np.testing.assert_allclose(s.prep[..., : s.n], index.policy.prepare(s.cand_t(), s.cand_R(True)), atol=1e-4)
        for q in random_chunk_poses(5, 3, rng, side=n ** (1 / 3)):
            ids, scores = index.scores("s", q, exclude=[3])
            order = np.lexsort((ids, scores))
            assert index.query("s", q, k, exclude=[3]) == ids[order][:k].tolist()
            valid = ids != 3
            rows, dist = index.policy.shortlist(s.cand_t(), s.cand_R(True), *chunk_mean_pose(q), k, valid=valid)
            kth = np.sort(scores[valid])[k - 1]
            assert set(np.flatnonzero(scores <= kth)) <= set(rows.tolist())
            np.testing.assert_array_equal(dist, scores[rows])
