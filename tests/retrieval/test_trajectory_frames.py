"""Trajectories in video frames resampled to latent frames, as the WorldKV reference does: 2 deg per
video frame, ``_`` holds 18 video frames, 4n+1 video frames -> n+1 latent frames (latent frame j is
video frame 4j), translation linear and rotation slerp in between. Poses are checked against values
computed by hand from the grammar."""
from __future__ import annotations

import numpy as np
import pytest

from worldkv_connector.retrieval.poses import (
    chunk_poses,
    interpolate_poses,
    resample_video_poses,
    yaw_matrix,
    yaw_pitch_degrees,
)
from worldkv_connector.retrieval.trajectory import parse_trajectory, trajectory_poses


def _yaw(poses) -> np.ndarray:
    return yaw_pitch_degrees(poses)[0]


def test_r_l_r_l_r_l90_is_30_chunks_at_8_degrees_per_latent_frame():
    latent = trajectory_poses("R_L_R_L_R_L90")
    assert parse_trajectory("R_L_R_L_R_L90").shape[0] == 361  # 4 * 90 + 1 video frames
    assert latent.shape == (90, 4, 4)  # 91 latent frames cut to whole chunks
    assert chunk_poses(latent, 3).shape[0] == 30
    yaw = _yaw(latent)
    # by hand: R over video 0..45 (2v deg), hold to 63, L to 108 (90 - 2(v - 63)), hold to 126,
    # R again from 126 ... L3 from 315; latent j = video 4j
    hand = {0: 0.0, 1: 8.0, 5: 40.0, 11: 88.0, 12: 90.0, 15: 90.0, 16: 88.0, 20: 56.0, 27: 0.0,
            30: 0.0, 32: 4.0, 33: 12.0, 89: 8.0}
    for j, deg in hand.items():
        assert yaw[j] == pytest.approx(deg, abs=1e-9), f"latent frame {j}"
    np.testing.assert_allclose(np.abs(np.diff(yaw[:12])), 8.0, atol=1e-9)
    np.testing.assert_allclose(latent[:, :3, 3], 0.0, atol=1e-12)


def test_hold_length_is_a_grammar_parameter():
    assert parse_trajectory("R_L90", hold_frames=18).shape[0] == 1 + 45 + 18 + 45
    short = trajectory_poses("R_L_R_L_R_L90", hold_frames=12)  # 331 video frames -> 83 latent -> 81
    assert short.shape[0] == 81
    # 331 is not 4n+1: latent j sits at video j * 330 / 82; the hold covers video 45..57 at 90 degrees
    assert _yaw(short)[14] == pytest.approx(90.0, abs=1e-9)  # video 56.34
    assert _yaw(short)[15] == pytest.approx(90.0 - 2 * (15 * 330 / 82 - 57), abs=1e-9)  # video 60.37


def test_fractional_positions_interpolate_translation_linearly_and_rotation_by_slerp():
    # 10 video frames (R18: 9 steps of 2 deg) -> 3 latent frames at video 0, 4.5, 9
    latent = trajectory_poses("R18", frames_per_chunk=1)
    np.testing.assert_allclose(_yaw(latent), [0.0, 9.0, 18.0], atol=1e-9)
    # W over 9 frames moves 1 unit: latent frames at 0, 0.5, 1.0 along +z
    latent = trajectory_poses("W", move_frames=9, frames_per_chunk=1)
    np.testing.assert_allclose(latent[:, :3, 3], [[0, 0, 0], [0, 0, 0.5], [0, 0, 1.0]], atol=1e-12)
    # slerp is the geodesic: a quarter of the way from 0 to 120 degrees is 30 degrees, still a rotation
    a, b = np.eye(4), np.eye(4)
    b[:3, :3] = yaw_matrix(120.0)
    b[:3, 3] = [4.0, 0.0, 0.0]
    mid = interpolate_poses(np.stack([a, b]), [0.25, 1.0])
    assert _yaw(mid)[0] == pytest.approx(30.0, abs=1e-9)
    np.testing.assert_allclose(mid[0, :3, 3], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(mid[1], b, atol=1e-12)


def test_resampling_keeps_ends_and_the_4n_plus_1_rule():
    video = parse_trajectory("R_W90")
    assert video.shape[0] == 1 + 45 + 18 + 24  # 88 video frames -> (88 - 1) // 4 + 1 = 22 latent
    latent = resample_video_poses(video)
    assert latent.shape[0] == 22
    np.testing.assert_allclose(latent[0], video[0])
    np.testing.assert_allclose(latent[-1], video[-1], atol=1e-12)
    assert resample_video_poses(video[:3]).shape[0] == 1  # fewer than 5 frames: one latent frame


def test_latent_convention_is_the_old_one_to_one_mapping():
    np.testing.assert_allclose(trajectory_poses("R_L90", frames="latent"), parse_trajectory("R_L90"))


@pytest.mark.parametrize("kwargs, field", [({"frames": "pixels"}, "frames"), ({"temporal_stride": 0}, "temporal_stride"),
                                           ({"frames_per_chunk": 0}, "frames_per_chunk"), ({"hold_frames": 0}, "hold_frames")])
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        trajectory_poses("R_L90", **kwargs)


def test_interpolate_rejects_positions_outside_the_trajectory():
    with pytest.raises(ValueError, match="positions"):
        interpolate_poses(parse_trajectory("R10"), [0.0, 7.5])


def test_engine_and_cli_take_trajectories_in_video_frames(tmp_path, capsys):
    from worldkv_connector.cli import main
    from worldkv_connector.integration.video import VideoEngine

    with VideoEngine(model="tiny", num_denoising_steps=1) as engine:
        engine.add_session("a", trajectory="R_L_R_L_R_L90")
        assert engine.scheduler.sessions["a"].num_chunks == 30
    js = tmp_path / "g.json"
    for frames, chunks in (("video", 4), ("latent", 21)):
        # R_L30: 49 video frames -> 13 latent frames -> 4 whole chunks; 1:1 with a 30-frame hold: 61 -> 21 chunks
        assert main(["generate", "--model", "tiny", "--trajectory", "R_L30", "--trajectory-frames", frames,
                     "--hold-frames", "18" if frames == "video" else "30", "--num-denoising-steps", "1",
                     "--no-progress", "--json", str(js)]) == 0
        capsys.readouterr()
        import json

        assert json.loads(js.read_text())["summary"]["chunks"] == chunks
