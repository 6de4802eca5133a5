"""Camera trajectories in the panorama world.

Training trajectories (``sample_training_poses``) are a few chunks long and, chunk by chunk, either keep
panning, jump back to a view seen earlier in the trajectory, or jump to a new view, at pan rates from a
hold up to ``max_pan_degrees`` per latent frame; a quarter of them also walk. Jumps make the right
answer on a revisit depend on chunks outside any short window, so a model trained with full context
learns to look things up in its memory (slow pans alone keep every revisit inside the recent window).

Evaluation trajectories (``REVISIT_TRAJECTORIES``) turn away and come back: a fast sweep, glances at
stations revisited in shuffled order, and a walk that translates. They are built per latent frame
(one pose per latent frame, as the engine takes them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from worldkv_connector.checks import check_int
from worldkv_connector.retrieval.trajectory import parse_trajectory
from worldkv_connector.world.panorama import yaw_pose

__all__ = ["TrajectoryConfig", "sample_training_poses", "REVISIT_TRAJECTORIES", "revisit_poses", "yaw_poses_torch"]


@dataclass(frozen=True)
class TrajectoryConfig:
    """How training trajectories are drawn (fields of the manifest's ``trajectories`` entry)."""

    chunks: int = 8
    frames_per_chunk: int = 3
    p_continue: float = 0.35  # keep panning from the last frame
    p_revisit: float = 0.35  # jump back to an earlier chunk's view (rest: a new random view)
    max_pan_degrees: float = 16.0  # per latent frame
    p_walk: float = 0.25  # share of trajectories whose camera also translates
    max_offset: float = 0.3  # farthest a walking camera gets from the centre (wall radius 1)

    def __post_init__(self) -> None:
        for name, hi in (("chunks", 256), ("frames_per_chunk", 64)):
            object.__setattr__(self, name, check_int(f"TrajectoryConfig.{name}", getattr(self, name), 1, hi))
        for name in ("p_continue", "p_revisit", "p_walk"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrajectoryConfig.{name}={getattr(self, name)!r}: expected 0..1")
        if self.p_continue + self.p_revisit > 1.0:
            raise ValueError("TrajectoryConfig: p_continue + p_revisit must be <= 1")
        if not 0.0 <= self.max_pan_degrees <= 90.0:
            raise ValueError(f"TrajectoryConfig.max_pan_degrees={self.max_pan_degrees!r}: expected 0..90")
        if not 0.0 <= self.max_offset < 0.9:
            raise ValueError(f"TrajectoryConfig.max_offset={self.max_offset!r}: expected 0 <= offset < 0.9")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def yaw_poses_torch(yaw_degrees: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """yaw_degrees: [...] fp32, positions: [..., 3] fp32 -> camera-to-world [..., 4, 4] fp32 (see yaw_pose)."""
    a = torch.deg2rad(yaw_degrees.float())
    c, s = torch.cos(a), torch.sin(a)
    pose = torch.zeros(*a.shape, 4, 4)
    pose[..., 0, 0], pose[..., 0, 2] = c, s
    pose[..., 1, 1] = 1.0
    pose[..., 2, 0], pose[..., 2, 2] = -s, c
    pose[..., :3, 3] = positions.float()
    pose[..., 3, 3] = 1.0
    return pose


def sample_training_poses(config: TrajectoryConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, chunks * frames_per_chunk, 4, 4] fp32 camera-to-world poses, deterministic per generator state."""
    n, f = config.chunks, config.frames_per_chunk

    def uniform(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    yaws = torch.zeros(batch, n, f)
    start = uniform(batch, lo=-180.0, hi=180.0)
    for j in range(n):
        slow = uniform(batch) < 0.5
        rate = torch.where(slow, uniform(batch, lo=-3.0, hi=3.0),
                           uniform(batch, lo=-config.max_pan_degrees, hi=config.max_pan_degrees))
        if j > 0:
            u = uniform(batch)
            earlier = (uniform(batch) * j).long().clamp_max(j - 1)  # a random earlier chunk
            back = yaws[torch.arange(batch), earlier, 0] + uniform(batch, lo=-10.0, hi=10.0)
            cont = yaws[:, j - 1, -1] + rate
            new = uniform(batch, lo=-180.0, hi=180.0)
            start = torch.where(u < config.p_continue, cont,
                                torch.where(u < config.p_continue + config.p_revisit, back, new))
        yaws[:, j] = start[:, None] + rate[:, None] * torch.arange(f, dtype=torch.float32)
    # walking cameras: a random walk of chunk-end positions inside max_offset, linear within a chunk
    pos = torch.zeros(batch, n, f, 3)
    walk = uniform(batch) < config.p_walk
    if config.max_offset > 0 and bool(walk.any()):
        ends = torch.zeros(batch, n + 1, 2)
        ends[:, 0] = (uniform(batch, 2, lo=-1.0, hi=1.0)) * config.max_offset * 0.7
        for j in range(n):
            step = uniform(batch, 2, lo=-0.15, hi=0.15)
            nxt = ends[:, j] + step
            norm = nxt.norm(dim=-1, keepdim=True).clamp_min(1e-9)
            ends[:, j + 1] = torch.where(norm > config.max_offset, nxt / norm * config.max_offset, nxt)
        w = torch.arange(f, dtype=torch.float32)[None, None, :, None] / f
        xz = ends[:, :-1, None, :] * (1 - w) + ends[:, 1:, None, :] * w  # [B, n, f, 2]
        pos[..., 0], pos[..., 2] = xz[..., 0], xz[..., 1]
        pos = pos * walk[:, None, None, None]
    return yaw_poses_torch(yaws.reshape(batch, n * f), pos.reshape(batch, n * f, 3))


def _glance_poses(chunks: int, frames_per_chunk: int, stations: int = 6, pan: float = 3.0, seed: int = 7) -> np.ndarray:
    """Look at ``stations`` evenly spaced directions once, then revisit them in shuffled order (cuts)."""
    rng = np.random.default_rng(seed)
    order = list(range(stations))
    while len(order) < chunks:
        order.extend(int(i) for i in rng.permutation(stations))
    frames = []
    for station in order[:chunks]:
        for k in range(frames_per_chunk):
            frames.append(yaw_pose(station * 360.0 / stations + pan * k))
    return np.stack(frames)


# name -> builder(frames_per_chunk) of per-latent-frame poses [F, 4, 4]
REVISIT_TRAJECTORIES = {
    # sweep 180 degrees right and back, at 15 degrees per latent frame (a chunk turns 45 degrees)
    "sweep": lambda fpc: parse_trajectory("RLRLRLRLRLRL180", deg_per_frame=15.0),
    # six stations 60 degrees apart, each glanced at for one chunk, then revisited in shuffled order
    "glance": lambda fpc: _glance_poses(64, fpc),
    # walk forward and back, then turn away 120 degrees and back, six times
    "walk": lambda fpc: parse_trajectory("WSRLWSRLWSRLWSRLWSRLWSRL120", deg_per_frame=15.0,
                                         move_frames=6, move_distance=0.3),
}


def revisit_poses(name: str, frames_per_chunk: int, num_chunks: int) -> np.ndarray:
    """Per-latent-frame poses [num_chunks * frames_per_chunk, 4, 4] of a named revisit trajectory (a
    shorter trajectory holds its last pose)."""
    if name not in REVISIT_TRAJECTORIES:
        raise ValueError(f"trajectory {name!r}: choose one of {sorted(REVISIT_TRAJECTORIES)}")
    frames = REVISIT_TRAJECTORIES[name](frames_per_chunk)
    need = num_chunks * frames_per_chunk
    if frames.shape[0] < need:
        frames = np.concatenate([frames, np.repeat(frames[-1:], need - frames.shape[0], axis=0)])
    return frames[:need]
