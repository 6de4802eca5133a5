"""The revisit eval: does a place look the same when the camera comes back to it?

Protocol (after the WorldKV paper's revisit pose pairs). For every trajectory of
``trajectories.REVISIT_TRAJECTORIES`` and every mode (``full``, ``sliding``, the WorldKV connector at
several keep ratios, policies and compressions), the model is rolled out autoregressively through the
video backend engine (its own frames as context, as at inference), with the same weights and noise
seeds. A *revisit pair* is (frame j, frame i): i is the first frame whose pose is within
``yaw_tolerance_degrees`` / ``position_tolerance`` of j's, and i's chunk is neither in the sink nor in
j's recent window (those are in every mode's window, so they test no memory). Per mode it reports the
mean PSNR / SSIM of j against i (consistency with the first visit) and, with ``observe="first-visits"``,
against the world's ground truth; chunks/s (engine busy time), resident and peak KV bytes, and the
peak bank bytes.

``observe="first-visits"``: a chunk with a frame that no earlier frame saw is *observed*: its
denoiser output is replaced by the one that lands exactly on the ground truth (``v = (x - gt) / sigma``),
while the model still runs, so its K/V is the model's own K/V of the true frames; revisits are then
generated from memory and can be compared with the truth. ``observe="none"``: every chunk is
generated (ground truth columns are then n/a).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from worldkv_connector.checks import check_int
from worldkv_connector.integration.video.engine_args import DEFAULT_RECENT_FRAMES, DEFAULT_SINK_FRAMES, EngineArgs
from worldkv_connector.world.image_metrics import psnr, ssim
from worldkv_connector.world.panorama import PanoramaWorld, WorldConfig
from worldkv_connector.world.trajectories import REVISIT_TRAJECTORIES, revisit_poses

__all__ = ["EVAL_MODES", "RevisitConfig", "revisit_pairs", "evaluate", "DEFAULT_MODES"]

# label -> (attention window, connector config overrides or None for no connector)
EVAL_MODES: dict[str, tuple[str, dict | None]] = {
    "full": ("full", None),
    "sliding": ("sliding", None),
    "worldkv": ("sliding", {}),  # the connector's defaults: keep_ratio 0.25, policy pose, novelty
    "worldkv@0.5": ("sliding", {"keep_ratio": 0.5}),
    "worldkv@1.0": ("sliding", {"keep_ratio": 1.0}),
    "worldkv:fov": ("sliding", {"policy": "fov"}),
    "worldkv:fov@0.5": ("sliding", {"policy": "fov", "keep_ratio": 0.5}),
    "tempcache": ("sliding", {"compression": "tempcache"}),
    "tempcache@0.5": ("sliding", {"compression": "tempcache", "keep_ratio": 0.5}),
}
DEFAULT_MODES = tuple(EVAL_MODES)
OBSERVE = ("none", "first-visits")


@dataclass(frozen=True)
class RevisitConfig:
    """One eval run."""

    model: str = "world"
    checkpoint: str | None = None  # None with model "world": the shipped trained weights
    trajectories: tuple[str, ...] = tuple(REVISIT_TRAJECTORIES)
    modes: tuple[str, ...] = DEFAULT_MODES
    num_chunks: int = 48
    num_denoising_steps: int = 8
    timestep_shift: float = 3.0
    seed: int = 0  # noise seed of every rollout (same in every mode)
    world_seed: int = 1000  # held-out worlds: world_seed + trajectory number (training never draws these)
    observe: str = "none"
    yaw_tolerance_degrees: float = 2.0
    position_tolerance: float = 0.02
    device: str = "cpu"
    fov_degrees: float | None = None  # policy "fov" field of view; None: the model's camera FOV

    def __post_init__(self) -> None:
        object.__setattr__(self, "trajectories", tuple(self.trajectories))
        object.__setattr__(self, "modes", tuple(self.modes))
        for t in self.trajectories:
            if t not in REVISIT_TRAJECTORIES:
                raise ValueError(f"trajectory {t!r}: choose from {sorted(REVISIT_TRAJECTORIES)}")
        for m in self.modes:
            if m not in EVAL_MODES:
                raise ValueError(f"mode {m!r}: choose from {list(EVAL_MODES)}")
        if not self.trajectories or not self.modes:
            raise ValueError("RevisitConfig: at least one trajectory and one mode")
        object.__setattr__(self, "num_chunks", check_int("RevisitConfig.num_chunks", self.num_chunks, 2, 100_000))
        if self.observe not in OBSERVE:
            raise ValueError(f"RevisitConfig.observe={self.observe!r}: choose one of {list(OBSERVE)}")
        if not self.yaw_tolerance_degrees >= 0 or not self.position_tolerance >= 0:
            raise ValueError("RevisitConfig: tolerances must be >= 0")
        if self.model != "world" and self.observe != "none":
            raise ValueError(f"observe={self.observe!r} needs the panorama world's model 'world', got {self.model!r}")


def _rotation_degrees(a: np.ndarray, b: np.ndarray) -> float:
    cos = (np.trace(a[:3, :3].T @ b[:3, :3]) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def revisit_pairs(poses: np.ndarray, frames_per_chunk: int, sink_chunks: int, recent_chunks: int,
                  yaw_tolerance_degrees: float, position_tolerance: float) -> list[tuple[int, int]]:
    """poses: [N * F, 4, 4] per frame. Returns (revisit frame j, first-visit frame i) pairs, i < j, with
    i's chunk outside the sink and before j's recent window."""
    pairs = []
    for j in range(poses.shape[0]):
        cj = j // frames_per_chunk
        for i in range(j):
            ci = i // frames_per_chunk
            if ci >= cj - recent_chunks:
                break
            if np.linalg.norm(poses[i][:3, 3] - poses[j][:3, 3]) > position_tolerance:
                continue
            if _rotation_degrees(poses[i], poses[j]) <= yaw_tolerance_degrees:
                if ci >= sink_chunks:
                    pairs.append((j, i))
                break  # the first visit decides (a first visit inside the sink is no memory test)
    return pairs


def first_visit_chunks(poses: np.ndarray, frames_per_chunk: int, yaw_tol: float, pos_tol: float) -> set[int]:
    """Chunks holding a frame whose pose no earlier frame had (the places seen for the first time)."""
    out = set()
    for j in range(poses.shape[0]):
        seen = any(np.linalg.norm(poses[i][:3, 3] - poses[j][:3, 3]) <= pos_tol
                   and _rotation_degrees(poses[i], poses[j]) <= yaw_tol for i in range(j))
        if not seen:
            out.add(j // frames_per_chunk)
    return out


class _Observed(torch.nn.Module):
    """Wraps the engine's model: rows whose chunk is observed get the velocity that lands on the truth."""

    def __init__(self, model: torch.nn.Module, truth: dict[int, torch.Tensor], frames_per_chunk: int) -> None:
        super().__init__()
        self.inner, self.truth, self.fpc = model, truth, frames_per_chunk
        self.config = model.config

    def forward(self, x, t, context, frame_offset, attn_fn, cam=None):
        v = self.inner(x, t, context, frame_offset, attn_fn, cam)  # always runs: the K/V is the model's own
        for row, offset in enumerate(frame_offset.tolist()):
            gt = self.truth.get(offset // self.fpc)
            if gt is not None and float(t[row]) > 0:
                v[row] = (x[row].float() - gt.to(x.device)) / float(t[row])
        return v


def _engine_args(cfg: RevisitConfig, mode: str, checkpoint: str | None, page_size: int, fov: float) -> EngineArgs:
    window, conn = EVAL_MODES[mode]
    kwargs = dict(model=cfg.model, checkpoint=checkpoint, device=cfg.device, seed=cfg.seed, attention_window=window,
                  num_denoising_steps=cfg.num_denoising_steps, timestep_shift=cfg.timestep_shift,
                  page_size=page_size)
    if conn is not None:
        conf = dict(conn)
        if conf.get("policy") == "fov":
            conf.setdefault("fov_degrees", fov)
        kwargs.update(kv_connector="worldkv", kv_connector_config=json.dumps(conf))
    return EngineArgs(**kwargs)


def _rollout(args: EngineArgs, poses: np.ndarray, num_chunks: int, seed: int,
             truth: dict[int, torch.Tensor] | None) -> dict:
    from worldkv_connector.integration.video.engine import VideoEngine

    with VideoEngine(args) as engine:
        if truth:
            engine.runner.model = _Observed(engine.runner.model, truth, engine.model_config.frames_per_chunk)
        engine.add_session("eval", poses=poses, num_chunks=num_chunks, seed=seed, keep_results=False)
        frames, bank, resident = [], [], []
        while engine.has_unfinished_sessions():
            for r in engine.step():
                frames.append(r.latents)
                resident.append(r.resident_kv_bytes)
                if engine.connector is not None:
                    bank.append(engine.connector.metrics()["bank_bytes"])
        engine.drain()
        m = engine.metrics()
        return {"latents": torch.cat(frames), "chunks": m["chunks"], "busy_seconds": m["busy_seconds"],
                "peak_resident_kv_bytes": m["peak_resident_kv_bytes"], "resident_kv_bytes_last": resident[-1],
                "bank_peak_bytes": max(bank) if bank else 0}


def evaluate(cfg: RevisitConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every (trajectory, mode) rollout; returns the report (see ``report_json`` for the schema)."""
    from worldkv_connector.integration.video.model_config import get_model_config
    from worldkv_connector.world.weights import shipped_weights

    mc = get_model_config(cfg.model)
    checkpoint = cfg.checkpoint
    if checkpoint is None and cfg.model == "world":
        checkpoint = str(shipped_weights())
    fpc, page_size = mc.frames_per_chunk, mc.frame_tokens
    fov = cfg.fov_degrees if cfg.fov_degrees is not None else mc.camera_fov_degrees
    sink, recent = DEFAULT_SINK_FRAMES // fpc, DEFAULT_RECENT_FRAMES // fpc
    per_mode: dict[str, dict] = {m: {"psnr": [], "ssim": [], "psnr_gt": [], "ssim_gt": [], "chunks": 0,
                                     "busy": 0.0, "peak_kv": 0, "resident_last": 0, "bank_peak": 0} for m in cfg.modes}
    samples: dict[str, dict] = {}
    trajectories = {}
    for n, name in enumerate(cfg.trajectories):
        poses = revisit_poses(name, fpc, cfg.num_chunks)
        pairs = revisit_pairs(poses, fpc, sink, recent, cfg.yaw_tolerance_degrees, cfg.position_tolerance)
        truth_frames = None
        truth = None
        if cfg.model == "world":
            world = PanoramaWorld(cfg.world_seed + n, WorldConfig(channels=mc.in_channels, rows=mc.latent_height))
            truth_frames = world.render(poses, mc.latent_width, mc.camera_fov_degrees)  # [N*F, C, H, W]
            if cfg.observe == "first-visits":
                seen = first_visit_chunks(poses, fpc, cfg.yaw_tolerance_degrees, cfg.position_tolerance)
                truth = {c: truth_frames[c * fpc:(c + 1) * fpc] for c in seen}
        trajectories[name] = {"revisit_pairs": len(pairs), "observed_chunks": len(truth) if truth else 0}
        for mode in cfg.modes:
            t0 = time.perf_counter()
            out = _rollout(_engine_args(cfg, mode, checkpoint, page_size, fov), poses, cfg.num_chunks,
                           cfg.seed, truth)
            lat = out["latents"]
            acc = per_mode[mode]
            acc.setdefault("by_trajectory", {})[name] = _mean([psnr(lat[j], lat[i]) for j, i in pairs])
            for j, i in pairs:
                acc["psnr"].append(psnr(lat[j], lat[i]))
                acc["ssim"].append(ssim(lat[j], lat[i]))
                if truth is not None:
                    acc["psnr_gt"].append(psnr(lat[j], truth_frames[j]))
                    acc["ssim_gt"].append(ssim(lat[j], truth_frames[j]))
            acc["chunks"] += out["chunks"]
            acc["busy"] += out["busy_seconds"]
            acc["peak_kv"] = max(acc["peak_kv"], out["peak_resident_kv_bytes"])
            acc["resident_last"] = max(acc["resident_last"], out["resident_kv_bytes_last"])
            acc["bank_peak"] = max(acc["bank_peak"], out["bank_peak_bytes"])
            if pairs and name not in samples.get(mode, {}):
                picks = pairs[:: max(1, len(pairs) // 2)][:2]  # two pairs, far apart in the rollout
                samples.setdefault(mode, {})[name] = {
                    "first": [lat[i] for _, i in picks], "revisit": [lat[j] for j, _ in picks],
                    "truth": [truth_frames[j] for j, _ in picks] if truth is not None else None}
            if progress is not None:
                progress(f"{name:<7} {mode:<16} {out['chunks']} chunks in {time.perf_counter() - t0:5.1f} s")
    return {"config": asdict(cfg), "checkpoint": checkpoint, "trajectories": trajectories,
            "modes": {m: _summary(a) for m, a in per_mode.items()}, "num_chunks": cfg.num_chunks,
            "samples": samples}


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _spread(xs: list[float]) -> float | None:
    return float(np.std(xs)) if xs else None


def _summary(a: dict) -> dict:
    return {"revisit_psnr_db": _mean(a["psnr"]), "revisit_psnr_std_db": _spread(a["psnr"]),
            "revisit_ssim": _mean(a["ssim"]), "revisit_psnr_gt_db": _mean(a["psnr_gt"]),
            "revisit_ssim_gt": _mean(a["ssim_gt"]), "revisit_pairs": len(a["psnr"]),
            "chunks_per_s": a["chunks"] / a["busy"] if a["busy"] else 0.0, "chunks": a["chunks"],
            "peak_resident_kv_bytes": a["peak_kv"], "resident_kv_bytes_last": a["resident_last"],
            "bank_peak_bytes": a["bank_peak"], "revisit_psnr_db_by_trajectory": a.get("by_trajectory", {})}


def report_json(report: dict) -> dict:
    """The ``--json`` document: ``revisit_psnr_db`` / ``chunks_per_s`` per mode label, ``num_chunks``,
    plus every other figure per mode and the run's config."""
    modes = report["modes"]
    out = {"revisit_psnr_db": {m: s["revisit_psnr_db"] for m, s in modes.items()},
           "chunks_per_s": {m: s["chunks_per_s"] for m, s in modes.items()},
           "num_chunks": report["num_chunks"]}
    for key in ("revisit_ssim", "revisit_psnr_gt_db", "revisit_ssim_gt", "peak_resident_kv_bytes",
                "resident_kv_bytes_last", "bank_peak_bytes", "revisit_pairs", "revisit_psnr_std_db",
                "revisit_psnr_db_by_trajectory"):
        out[key] = {m: s[key] for m, s in modes.items()}
    out.update(config=report["config"], checkpoint_file=_shareable_path(report["checkpoint"]),
               trajectories=report["trajectories"])
    return out


def _shareable_path(path: str | None) -> str | None:
    """A file inside the installed package as ``worldkv_connector/...`` (a results JSON names the
    shipped weights, not where this machine installed them); any other path as given."""
    if path is None:
        return None
    root = Path(__file__).resolve().parents[2]  # the folder holding the worldkv_connector package
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return path
