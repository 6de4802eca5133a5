"""Training of the world model: the project's causal DiT (``ModelConfig("world")``) on the panorama world.

Objective: flow matching with teacher forcing over whole trajectories, in two streams that mirror
inference. The *clean stream* runs every chunk of a trajectory at sigma 0 with a block-causal mask
(chunk j attends chunks <= j); its post-RoPE keys and values per layer play the KV cache. The *query
stream* runs each chunk noised at its own sigma as a separate batch row; its queries attend the clean
keys of all earlier chunks plus the chunk's own noisy keys, exactly as a chunk being denoised attends
the cache and itself in the engine. The loss is the MSE of the predicted velocity ``noise - x0``.
Full context in training (every earlier chunk visible) is what teaches the model to use its memory.

Reproducible: a run is fixed by ``TrainConfig`` (seed included), the model config and the world
generator version; all randomness comes from one torch generator seeded from ``seed``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from worldkv_connector.checks import check_int
from worldkv_connector.integration.video.model import CausalWanDiT
from worldkv_connector.integration.video.models import build_model
from worldkv_connector.integration.video.model_config import ModelConfig, get_model_config
from worldkv_connector.world.panorama import WORLD_VERSION, WorldConfig, render, sample_coefficients
from worldkv_connector.world.trajectories import TrajectoryConfig, sample_training_poses

__all__ = ["TrainConfig", "train", "two_stream_loss", "save_trained", "sha256_file"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    model: str = "world"  # named model config (integration/video/model_config.py)
    steps: int = 3200
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    sigma_shift: float = 3.0  # half the chunks draw sigma from the shifted schedule (high noise)
    log_every: int = 25

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("batch", 1), ("log_every", 1), ("warmup", 0), ("seed", 0)):
            object.__setattr__(self, name, check_int(f"TrainConfig.{name}", getattr(self, name), lo=lo))
        if not 0.0 < self.lr <= 1.0:
            raise ValueError(f"TrainConfig.lr={self.lr!r}: expected 0 < lr <= 1")
        if not 0.0 <= self.weight_decay <= 1.0:
            raise ValueError(f"TrainConfig.weight_decay={self.weight_decay!r}: expected 0..1")
        if not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip={self.grad_clip!r}: expected > 0")
        if not 0.0 < self.sigma_shift <= 100.0:
            raise ValueError(f"TrainConfig.sigma_shift={self.sigma_shift!r}: expected 0 < shift <= 100")
        get_model_config(self.model)  # unknown names fail here, before any work


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: [B, Tq, H, D], k, v: [B, Tk, H, D], mask: bool [B or 1, 1, Tq, Tk] (True = attend) -> [B, Tq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def two_stream_loss(model: CausalWanDiT, x0: torch.Tensor, poses: torch.Tensor, sigma: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of a batch of trajectories.

    x0: [B, N*F, C, H, W] clean latents; poses: [B, N*F, 4, 4]; sigma: [B, N] per chunk;
    noise: like x0. Returns the scalar mean velocity MSE over the query stream.
    """
    c = model.config
    f, tc = c.frames_per_chunk, c.chunk_tokens
    b, nf = x0.shape[:2]
    n = nf // f
    ctx = torch.zeros(b, 1, c.text_dim)
    chunk_of = torch.arange(n).repeat_interleave(tc)  # [N*Tc] chunk index of every clean token
    clean_mask = (chunk_of[None, :] <= chunk_of[:, None])[None, None]  # [1, 1, N*Tc, N*Tc]
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def clean_attn(layer: int, q, k, v):
        cache[layer] = (k, v)  # k, v: [B, N*Tc, H, D]
        return _sdpa(q, k, v, clean_mask)

    zeros = torch.zeros(b, dtype=torch.int64)
    model(x0, torch.zeros(b), ctx, zeros, clean_attn, poses)

    # query stream: row (b, j) is chunk j of trajectory b at sigma[b, j]
    s = sigma.reshape(b * n)
    xq = x0.reshape(b * n, f, *x0.shape[2:])
    nq = noise.reshape_as(xq)
    xt = (1 - s.view(-1, 1, 1, 1, 1)) * xq + s.view(-1, 1, 1, 1, 1) * nq
    own = torch.arange(n).repeat(b)  # [B*N] chunk index of each row
    past = (chunk_of[None, :] < own[:, None])  # [B*N, N*Tc]: earlier chunks only
    q_mask = torch.cat((past, torch.ones(b * n, tc, dtype=torch.bool)), dim=1)[:, None, None, :]

    def query_attn(layer: int, q, k, v):
        kc, vc = cache[layer]
        keys = torch.cat((kc.repeat_interleave(n, dim=0), k), dim=1)  # [B*N, N*Tc + Tc, H, D]
        values = torch.cat((vc.repeat_interleave(n, dim=0), v), dim=1)
        return _sdpa(q, keys, values, q_mask)

    vel = model(xt, s, ctx.repeat_interleave(n, dim=0), torch.zeros(b * n, dtype=torch.int64), query_attn,
                poses.reshape(b * n, f, 4, 4))
    return F.mse_loss(vel, nq - xq)


def _batch(config: ModelConfig, world: WorldConfig, traj: TrajectoryConfig, tc: TrainConfig, gen: torch.Generator):
    coeffs = sample_coefficients(world, tc.batch, gen)
    poses = sample_training_poses(traj, tc.batch, gen)
    x0 = render(coeffs, poses, config.latent_height, config.latent_width, config.camera_fov_degrees, world.radius)
    u = torch.rand(tc.batch, traj.chunks, generator=gen)
    shifted = tc.sigma_shift * u / (1 + (tc.sigma_shift - 1) * u)
    pick = torch.rand(tc.batch, traj.chunks, generator=gen) < 0.5
    sigma = torch.where(pick, shifted, u)
    noise = torch.randn(x0.shape, generator=gen)
    return x0, poses, sigma, noise


def train(tc: TrainConfig, world: WorldConfig | None = None, traj: TrajectoryConfig | None = None,
          on_log: Callable[[int, float, float], None] | None = None) -> tuple[CausalWanDiT, dict]:
    """Train from scratch; returns (model in eval mode, record). ``on_log(step, loss, elapsed_s)`` is
    called every ``log_every`` steps with the mean loss since the last call."""
    config = get_model_config(tc.model)
    world = world or WorldConfig(channels=config.in_channels, rows=config.latent_height)
    traj = traj or TrajectoryConfig(frames_per_chunk=config.frames_per_chunk)
    if world.channels != config.in_channels or world.rows != config.latent_height:
        raise ValueError(f"world {world.to_dict()} does not match model {config.name!r} latents "
                         f"(channels {config.in_channels}, height {config.latent_height})")
    torch.manual_seed(tc.seed)
    model = build_model(config, seed=tc.seed)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    def lr_at(step: int) -> float:
        if step < tc.warmup:
            return tc.lr * (step + 1) / tc.warmup
        p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
        return tc.lr * 0.5 * (1 + math.cos(math.pi * p))

    gen = torch.Generator().manual_seed(tc.seed)
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    t0 = time.perf_counter()
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x0, poses, sigma, noise = _batch(config, world, traj, tc, gen)
        loss = two_stream_loss(model, x0, poses, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        window.append(float(loss.detach()))
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            mean = sum(window) / len(window)
            curve.append((step + 1, mean))
            window = []
            if on_log is not None:
                on_log(step + 1, mean, time.perf_counter() - t0)
    model.eval().requires_grad_(False)
    record = {
        "train": asdict(tc), "world": world.to_dict(), "trajectories": traj.to_dict(),
        "model_config": config.to_dict(), "steps": tc.steps, "final_loss": curve[-1][1],
        "loss_curve": [[s, round(v, 6)] for s, v in curve], "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__, "machine": f"{platform.machine()} {platform.system()}",
        "threads": torch.get_num_threads(), "world_version": WORLD_VERSION,
    }
    return model, record


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_trained(model: CausalWanDiT, record: dict, weights: str | Path) -> Path:
    """Write ``weights`` (safetensors, Wan key layout) and its manifest beside it (same stem, .json)
    with the record and the file's sha256. Returns the manifest path."""
    from worldkv_connector.integration.video.checkpoint import save_checkpoint

    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, weights)
    manifest = dict(record, weights=weights.name, sha256=sha256_file(weights), bytes=weights.stat().st_size)
    path = weights.with_suffix(".json")
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path
