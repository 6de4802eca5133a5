"""Camera poses: the revisit-trajectory grammar, validation, chunk means and action integration."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldkv_connector.retrieval.poses import (
    chunk_mean_pose,
    chunk_poses,
    pitch_matrix,
    pose_for_frames,
    validate_poses,
    yaw_matrix,
    yaw_pitch_degrees,
)
from worldkv_connector.retrieval.trajectory import integrate_actions, parse_trajectory


def _pose(yaw=0.0, pitch=0.0, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    p = np.eye(4)
    p[:3, :3] = yaw_matrix(yaw) @ pitch_matrix(pitch)
    p[:3, 3] = t
    return p


# --- convention ----------------------------------------------------------------------------


def test_yaw_right_turns_forward_towards_plus_x_and_pitch_up_towards_minus_y():
    np.testing.assert_allclose(yaw_matrix(90.0) @ [0, 0, 1], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(pitch_matrix(90.0) @ [0, 0, 1], [0, -1, 0], atol=1e-12)  # world up is -y
    yaw, pitch = yaw_pitch_degrees(np.stack([_pose(30.0, 10.0), _pose(-120.0, -45.0)]))
    np.testing.assert_allclose(yaw, [30.0, -120.0], atol=1e-9)
    np.testing.assert_allclose(pitch, [10.0, -45.0], atol=1e-9)
    batch = yaw_matrix(np.array([0.0, 90.0]))
    assert batch.shape == (2, 3, 3)
    np.testing.assert_allclose(batch[1], yaw_matrix(90.0))


# --- trajectory grammar ----------------------------------------------------------------------


def test_r90_is_45_frames_of_2_degrees_ending_90_degrees_right():
    poses = parse_trajectory("R90")
    assert poses.shape == (46, 4, 4)  # start pose + 45 steps
    yaw, pitch = yaw_pitch_degrees(poses)
    np.testing.assert_allclose(np.diff(yaw), 2.0, atol=1e-9)
    assert yaw[-1] == pytest.approx(90.0)
    np.testing.assert_allclose(pitch, 0.0, atol=1e-9)
    np.testing.assert_allclose(poses[:, :3, 3], 0.0)  # rotation in place
    assert parse_trajectory("R").shape == (46, 4, 4)  # 90 degrees is the default amount
    assert yaw_pitch_degrees(parse_trajectory("L"))[0][-1] == pytest.approx(-90.0)


def test_r_l_r_l_r_l90_frame_count_and_returns_to_start_yaw():
    poses = parse_trajectory("R_L_R_L_R_L90")
    assert poses.shape[0] == 1 + 6 * 45 + 5 * 18 == 4 * 90 + 1
    yaw, _ = yaw_pitch_degrees(poses)
    assert yaw.max() == pytest.approx(90.0)
    assert yaw.min() == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(poses[-1], np.eye(4), atol=1e-9)
    # the hold after the first R keeps the pose for 18 frames (the default hold_frames)
    np.testing.assert_allclose(poses[45:64], np.broadcast_to(poses[45], (19, 4, 4)))


def test_l_r_w_s_l_r90_moves_forward_one_unit_and_back():
    poses = parse_trajectory("L_R_W_S_L_R90")
    assert poses.shape[0] == 1 + 4 * 45 + 2 * 24 + 5 * 18
    w_start = 1 + 45 + 18 + 45 + 18  # after L _ R _
    np.testing.assert_allclose(poses[w_start - 1, :3, 3], 0.0, atol=1e-12)
    np.testing.assert_allclose(poses[w_start + 23, :3, 3], [0, 0, 1.0], atol=1e-9)  # forward is +z
    np.testing.assert_allclose(np.diff(poses[w_start - 1 : w_start + 24, 2, 3]), 1.0 / 24, atol=1e-12)
    np.testing.assert_allclose(poses[-1], np.eye(4), atol=1e-9)


def test_wsrlrl90_frame_count_and_custom_amount_and_rates():
    assert parse_trajectory("WSRLRL90").shape[0] == 1 + 2 * 24 + 4 * 45
    poses = parse_trajectory("R45")  # 22.5 steps at 2 deg/frame -> 23 equal steps
    assert poses.shape[0] == 24
    assert yaw_pitch_degrees(poses)[0][-1] == pytest.approx(45.0)
    poses = parse_trajectory("D_A", move_frames=10, move_distance=2.0, hold_frames=3, deg_per_frame=5.0)
    assert poses.shape[0] == 1 + 10 + 3 + 10
    np.testing.assert_allclose(poses[10, :3, 3], [2.0, 0, 0], atol=1e-12)  # D = camera right = +x
    np.testing.assert_allclose(poses[-1, :3, 3], 0.0, atol=1e-12)
    assert parse_trajectory("R30", deg_per_frame=5.0).shape[0] == 7


def test_translation_follows_the_current_heading_and_the_start_pose():
    poses = parse_trajectory("RW90")  # after turning right, forward is world +x
    np.testing.assert_allclose(poses[-1, :3, 3], [1.0, 0, 0], atol=1e-9)
    start = _pose(yaw=180.0, t=(5.0, -1.0, 2.0))
    poses = parse_trajectory("W", start=start)
    np.testing.assert_allclose(poses[0], start)
    np.testing.assert_allclose(poses[-1, :3, 3], [5.0, -1.0, 1.0], atol=1e-9)  # facing -z
    validate_poses(poses)


@pytest.mark.parametrize(
    "spec, where, what",
    [
        ("RX90", "position 1", "'X'"),
        ("R9L", "position 1", "'9'"),  # number in the middle
        ("r90", "position 0", "'r'"),
        ("R 90", "position 1", "' '"),
        ("R-90", "position 1", "'-'"),
        ("R0", "position 1", "must be > 0"),
        ("R0.0", "position 1", "must be > 0"),
        ("R9.0.0", "position 1", "bad number"),
        ("90", "no ops", "90"),
        ("", "non-empty", "''"),
    ],
)
def test_bad_grammar_names_position_character_and_allowed_ops(spec, where, what):
    with pytest.raises(ValueError) as err:
        parse_trajectory(spec)
    msg = str(err.value)
    assert where in msg and what in msg
    assert "R L W S A D _" in msg


@pytest.mark.parametrize(
    "kwargs", [{"deg_per_frame": 0.0}, {"move_frames": 0}, {"move_distance": -1.0}, {"hold_frames": 2.5}]
)
def test_bad_trajectory_parameters(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        parse_trajectory("R_W", **kwargs)


@settings(max_examples=40, deadline=None)
@given(ops=st.text(alphabet="RLWSAD_", min_size=1, max_size=8), amount=st.integers(1, 360))
def test_any_spec_gives_valid_poses_with_the_documented_frame_count(ops, amount):
    poses = parse_trajectory(f"{ops}{amount}")
    rot = ops.count("R") + ops.count("L")
    moves = sum(ops.count(c) for c in "WSAD")
    assert poses.shape[0] == 1 + rot * math.ceil(amount / 2) + moves * 24 + ops.count("_") * 18
    validate_poses(poses)
    yaw, _ = yaw_pitch_degrees(poses[-1:])
    net = (ops.count("R") - ops.count("L")) * amount
    assert (yaw[0] - net + 180.0) % 360.0 - 180.0 == pytest.approx(0.0, abs=1e-6)


# --- validation ------------------------------------------------------------------------------


def test_validate_poses_accepts_float32_and_returns_a_float64_copy():
    src = np.stack([_pose(10.0), _pose(20.0, 5.0, (1, 2, 3))]).astype(np.float32)
    out = validate_poses(src)
    assert out.dtype == np.float64 and out.shape == (2, 4, 4)
    out[0, 0, 3] = 99.0
    assert src[0, 0, 3] == 0.0


def _bad(index: int, edit) -> np.ndarray:
    poses = np.stack([_pose(), _pose(45.0), _pose(90.0)])
    edit(poses[index])
    return poses


@pytest.mark.parametrize(
    "poses, match",
    [
        (_bad(1, lambda p: p.__setitem__((0, 3), np.nan)), r"poses\[1\] contains NaN"),
        (_bad(2, lambda p: p.__setitem__((2, 2), np.inf)), r"poses\[2\] contains NaN or inf"),
        (_bad(1, lambda p: p.__setitem__((0, 1), 0.3)), r"poses\[1\] rotation block is not orthonormal"),  # shear
        (_bad(0, lambda p: p.__setitem__(slice(0, 3), p[:3] * 2.0)), r"poses\[0\] .*not orthonormal"),  # scale
        (_bad(2, lambda p: p.__setitem__((slice(None), 0), -p[:, 0])), r"poses\[2\] rotation block has det -1"),
        (_bad(1, lambda p: p.__setitem__((3, 0), 1.0)), r"poses\[1\] bottom row"),
        (np.eye(4), r"shape \[F, 4, 4\].*\[4, 4\]"),
        (np.zeros((2, 3, 4)), r"shape \[F, 4, 4\].*\[2, 3, 4\]"),
        (np.zeros((0, 4, 4)), r"F >= 1"),
        ([["a"]], r"numeric"),
    ],
)
def test_validate_poses_rejects_bad_input_naming_the_frame(poses, match):
    with pytest.raises(ValueError, match=match):
        validate_poses(poses)


def test_validate_poses_uses_the_given_name():
    with pytest.raises(ValueError, match=r"query_poses\[0\]"):
        validate_poses(np.full((1, 4, 4), np.nan), "query_poses")


# --- chunks ----------------------------------------------------------------------------------


def test_chunk_mean_pose_is_the_elementwise_mean_not_reorthonormalised():
    poses = np.stack([_pose(30.0, t=(0, 0, 0)), _pose(-30.0, t=(2, 4, 6))])
    t, R = chunk_mean_pose(poses)
    np.testing.assert_allclose(t, [1, 2, 3])
    c = math.cos(math.radians(30.0))
    np.testing.assert_allclose(R, np.diag([c, 1.0, c]), atol=1e-12)  # not a rotation: det = c^2
    with pytest.raises(ValueError, match="shape"):
        chunk_mean_pose(np.eye(4))


def test_chunk_poses_groups_frames_and_holds_the_last_pose():
    traj = parse_trajectory("R", deg_per_frame=15.0)  # 7 frames
    chunks = chunk_poses(traj, frames_per_chunk=3)
    assert chunks.shape == (3, 3, 4, 4)
    np.testing.assert_allclose(chunks[1, 0], traj[3])
    np.testing.assert_allclose(chunks[2], np.broadcast_to(traj[6], (3, 4, 4)))  # frame 6, then held
    longer = chunk_poses(traj, frames_per_chunk=3, num_chunks=5)
    np.testing.assert_allclose(longer[4], np.broadcast_to(traj[-1], (3, 4, 4)))
    np.testing.assert_allclose(chunk_poses(traj, 2, num_chunks=1)[0], traj[:2])  # extra frames dropped
    with pytest.raises(ValueError, match="frames_per_chunk"):
        chunk_poses(traj, frames_per_chunk=0)
    with pytest.raises(ValueError, match="num_chunks"):
        chunk_poses(traj, num_chunks=0)


def test_pose_for_frames_truncates_or_holds():
    traj = parse_trajectory("W", move_frames=4)  # 5 frames
    np.testing.assert_allclose(pose_for_frames(traj, 3), traj[:3])
    held = pose_for_frames(traj, 8)
    assert held.shape == (8, 4, 4)
    np.testing.assert_allclose(held[5:], np.broadcast_to(traj[-1], (3, 4, 4)))
    with pytest.raises(ValueError, match="num_frames"):
        pose_for_frames(traj, 0)


# --- actions ---------------------------------------------------------------------------------


def test_yaw_two_degrees_per_frame_for_45_frames_is_90_degrees_right():
    actions = np.zeros((45, 6))
    actions[:, 4] = 2.0
    poses = integrate_actions(actions)
    assert poses.shape == (46, 4, 4)
    yaw, pitch = yaw_pitch_degrees(poses)
    assert yaw[-1] == pytest.approx(90.0)
    np.testing.assert_allclose(pitch, 0.0, atol=1e-9)
    validate_poses(poses)


def test_w_moves_along_the_camera_forward_and_d_to_its_right():
    start = _pose(yaw=90.0, t=(1.0, 0.0, 1.0))  # looking along world +x
    forward = np.zeros((24, 6))
    forward[:, 0] = 1  # W held for 24 frames at the default 1/24 unit per frame
    poses = integrate_actions(forward, start)
    np.testing.assert_allclose(poses[0], start)
    np.testing.assert_allclose(poses[-1, :3, 3], [2.0, 0.0, 1.0], atol=1e-9)
    right = np.zeros((12, 6), dtype=bool)
    right[:, 3] = True  # D
    np.testing.assert_allclose(integrate_actions(right, start)[-1, :3, 3], [1.0, 0.0, 0.5], atol=1e-9)  # right = -z


def test_pitch_is_clamped_and_walking_stays_horizontal():
    actions = np.zeros((20, 6))
    actions[:, 5] = 10.0  # look up 10 deg/frame
    actions[:, 0] = 1.0
    poses = integrate_actions(actions, move_speed=0.5)
    _, pitch = yaw_pitch_degrees(poses)
    assert pitch.max() == pytest.approx(89.0)
    np.testing.assert_allclose(poses[:, 1, 3], 0.0, atol=1e-12)  # height unchanged
    assert poses[-1, 2, 3] == pytest.approx(10.0)  # 20 frames x 0.5 along +z
    validate_poses(poses)


def test_dict_actions_match_the_array_form():
    rng = np.random.default_rng(3)
    arr = np.zeros((30, 6))
    arr[:, :4] = rng.integers(0, 2, (30, 4))
    arr[:, 4:] = rng.uniform(-3, 3, (30, 2))
    as_dict = {"forward": arr[:, 0] - arr[:, 1], "strafe": arr[:, 3] - arr[:, 2], "yaw": arr[:, 4], "pitch": arr[:, 5]}
    start = _pose(20.0, 5.0, (0.5, -1.0, 3.0))
    np.testing.assert_allclose(integrate_actions(as_dict, start), integrate_actions(arr, start), atol=1e-12)
    only_yaw = integrate_actions({"yaw": np.full(10, 3.0)}, start, yaw_speed=2.0)
    assert yaw_pitch_degrees(only_yaw)[0][-1] == pytest.approx(80.0)  # 20 + 10 x 3 x 2
    assert yaw_pitch_degrees(only_yaw)[1][-1] == pytest.approx(5.0)  # start pitch kept


@pytest.mark.parametrize(
    "actions, match",
    [
        (np.zeros((5, 5)), r"\[F, 6\]"),
        (np.zeros(6), r"\[F, 6\]"),
        (np.array([[0, 0, 0, 0, np.nan, 0]]), r"actions\[0\] contains NaN"),
        ({"jump": [1, 0]}, "allowed keys"),
        ({}, "allowed keys"),
        ({"yaw": [1, 2], "pitch": [1]}, "one length"),
        ({"yaw": [[1, 2]]}, r"actions\['yaw'\]"),
    ],
)
def test_integrate_actions_rejects_bad_input(actions, match):
    with pytest.raises(ValueError, match=match):
        integrate_actions(actions)


def test_integrate_actions_rejects_bad_parameters():
    with pytest.raises(ValueError, match="move_speed"):
        integrate_actions(np.zeros((2, 6)), move_speed=float("nan"))
    with pytest.raises(ValueError, match="max_pitch"):
        integrate_actions(np.zeros((2, 6)), max_pitch=120.0)
    with pytest.raises(ValueError, match=r"start\[0\]"):
        integrate_actions(np.zeros((2, 6)), start=np.zeros((4, 4)))
