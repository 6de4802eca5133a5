"""The panorama world: deterministic per seed, and its ground truth is the geometry it claims."""
import math

import numpy as np
import pytest
import torch

from worldkv_connector.world.panorama import WORLD_VERSION, PanoramaWorld, WorldConfig, render, sample_coefficients, yaw_pose
from worldkv_connector.world.trajectories import REVISIT_TRAJECTORIES, TrajectoryConfig, revisit_poses, sample_training_poses


def _texture(world: PanoramaWorld, phi: float) -> torch.Tensor:
    """Direct evaluation of the Fourier wall texture at azimuth phi: [C, R]."""
    k = torch.arange(world.coeffs.shape[3], dtype=torch.float64)
    c = world.coeffs[0].double()
    return (c[..., 0] * torch.cos(k * phi) + c[..., 1] * torch.sin(k * phi)).sum(-1)


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = PanoramaWorld(3), PanoramaWorld(3), PanoramaWorld(4)
    poses = np.stack([yaw_pose(y) for y in (0.0, 40.0, 200.0)])
    assert torch.equal(a.render(poses, 12, 45.0), b.render(poses, 12, 45.0))
    assert not torch.allclose(a.render(poses, 12, 45.0), c.render(poses, 12, 45.0))
    assert WorldConfig().version == WORLD_VERSION


def test_yaw_camera_sees_the_wall_at_yaw_plus_pixel_angle():
    world = PanoramaWorld(7)
    width, fov, yaw = 12, 45.0, 33.0
    view = world.render(yaw_pose(yaw)[None], width, fov)[0]  # [C, R, W]
    focal = (width / 2) / math.tan(math.radians(fov) / 2)
    for w in (0, 5, 11):
        phi = math.radians(yaw) + math.atan((w + 0.5 - width / 2) / focal)
        assert torch.allclose(view[:, :, w].double(), _texture(world, phi), atol=1e-4)


def test_full_turn_returns_the_same_view_and_translation_gives_parallax():
    world = PanoramaWorld(1)
    v0 = world.render(np.stack([yaw_pose(10.0), yaw_pose(370.0)]), 12, 45.0)
    assert torch.allclose(v0[0], v0[1], atol=1e-4)
    moved = world.render(yaw_pose(10.0, (0.3, 0.0, 0.0))[None], 12, 45.0)[0]
    assert not torch.allclose(moved, v0[0], atol=1e-2)
    # the centre ray of a camera at (0.5, 0, 0) looking along +z hits the wall at x = 0.5, z = sqrt(0.75)
    phi = math.atan2(0.5, math.sqrt(0.75))
    one = world.render(yaw_pose(0.0, (0.5, 0.0, 0.0))[None], 2, 1.0)[0]  # 2 columns ~ the centre ray
    assert torch.allclose(one.mean(-1).double(), _texture(world, phi), atol=2e-2)


def test_cameras_outside_the_wall_and_bad_shapes_are_refused():
    world = PanoramaWorld(0)
    with pytest.raises(ValueError, match="inside the wall"):
        world.render(yaw_pose(0.0, (1.5, 0.0, 0.0))[None], 12, 45.0)
    with pytest.raises(ValueError, match="height"):
        render(world.coeffs, torch.eye(4)[None, None], 5, 12, 45.0)
    with pytest.raises(ValueError, match="seed"):
        PanoramaWorld(-1)


def test_training_batches_are_deterministic_per_generator():
    cfg = WorldConfig()
    a = sample_coefficients(cfg, 2, torch.Generator().manual_seed(5))
    b = sample_coefficients(cfg, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.all(a[..., 0, 1] == 0)
    pa = sample_training_poses(TrajectoryConfig(), 3, torch.Generator().manual_seed(5))
    pb = sample_training_poses(TrajectoryConfig(), 3, torch.Generator().manual_seed(5))
    assert torch.equal(pa, pb) and pa.shape == (3, 24, 4, 4)
    assert float(pa[..., [0, 2], 3].norm(dim=-1).max()) <= TrajectoryConfig().max_offset + 1e-6


def test_revisit_trajectories_reach_48_chunks_and_stay_inside():
    for name in REVISIT_TRAJECTORIES:
        poses = revisit_poses(name, 3, 48)
        assert poses.shape == (144, 4, 4)
        assert np.linalg.norm(poses[:, [0, 2], 3], axis=1).max() < 1.0
    with pytest.raises(ValueError, match="choose one of"):
        revisit_poses("nowhere", 3, 4)
