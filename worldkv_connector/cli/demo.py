"""``worldkv demo`` (``make demo``): full KV vs a sliding window vs WorldKV on one revisit trajectory.

Runs the same model, trajectory and seeds three times (``full``, ``sliding``, ``worldkv`` with the
connector at its defaults unless ``--kv-connector-config``), all with attention recall on, and prints:

1. for the worldkv run, one row per chunk: yaw of the chunk's mean pose, the retrieved chunk ids,
   bytes banked so far and the compression ratio, and a verdict: did every revisit retrieve its
   first-visit chunks? A *revisit* here is a chunk whose yaw is within ``--revisit-degrees`` (a few
   degrees) of a chunk generated before its recent window (integration/video/recall.py, with this
   tolerance); it *retrieved its first-visit chunks* when one of its retrieved ids is such a chunk;
2. one comparison table: chunks/s, resident KV, bank bytes, attention recall past the window and at
   the revisit chunks, per mode;

and writes a plot of step time and resident KV against chunk index for the three modes (``--plot``)
and, with ``--json``, everything as JSON. Finishes in a minute or two on a 2-core CPU.

By default it runs the trained world model (worldkv_connector/world, shipped weights) on a fast
revisit sweep of its panorama world, where memory is the only way to get a revisit right, and the
comparison adds the revisit PSNR of each mode (revisit frames vs the first visit of their pose,
world/revisit.py). ``--model tiny`` (random weights) runs the old smoke demo.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from worldkv_connector.cli.generate import (
    DEFAULT_TRAJECTORY, chunk_record, cpu_threads, engine_recall_summary, summarize,
)

__all__ = ["register", "run", "DEMO_MODES"]

DEMO_MODES = ("full", "sliding", "worldkv")
DEFAULT_PLOT = "out/demo.png"
WORLD_TRAJECTORY = "RLRLRL150"  # the world model's default: 150 degrees out and back, three times (chunks realign)
WORLD_DEG_PER_FRAME = 15.0  # a chunk turns 45 degrees, one field of view of the world model
DEFAULT_REVISIT_DEGREES = 5.0  # a few degrees: the yaw moves 6 degrees per chunk on the default trajectory
_MiB = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="full vs sliding vs worldkv on a revisit trajectory: retrieval, memory, recall, plot",
        description="Generate the same revisit rollout with full KV, a sliding window and the WorldKV connector "
        "(tiny model, CPU), with attention recall on; print what WorldKV retrieved at each chunk and a comparison "
        "table, and plot step time and resident KV per chunk.",
    )
    p.add_argument("--model", default="world", help="named model config (default world: the trained world model; "
                   "tiny: random weights)")
    p.add_argument("--checkpoint", metavar="PATH", help="safetensors weights (default for world: the shipped ones)")
    p.add_argument("--trajectory", help=f"camera trajectory spec (default {WORLD_TRAJECTORY} for world, "
                   f"{DEFAULT_TRAJECTORY} otherwise)")
    p.add_argument("--deg-per-frame", type=float, help=f"yaw degrees per latent frame of R/L (default "
                   f"{WORLD_DEG_PER_FRAME:g} for world, 2 otherwise)")
    p.add_argument("--timestep-shift", type=float, default=3.0, help="flow-matching sigma shift (default 3.0)")
    p.add_argument("--num-chunks", type=int, help="chunks to generate (default: the whole trajectory)")
    p.add_argument("--kv-connector-config", metavar="JSON",
                   help="WorldKV config JSON for the worldkv run (default: the connector's defaults)")
    p.add_argument("--num-denoising-steps", type=int, default=4, help="denoising steps per chunk (default 4)")
    p.add_argument("--revisit-degrees", type=float, default=DEFAULT_REVISIT_DEGREES,
                   help=f"yaw tolerance of a revisit (default {DEFAULT_REVISIT_DEGREES:g})")
    p.add_argument("--seed", type=int, default=0, help="weights and noise seed (default 0)")
    p.add_argument("--plot", default=DEFAULT_PLOT, metavar="PATH.png",
                   help=f"plot of step time and resident KV per chunk (default {DEFAULT_PLOT}; folders are created)")
    p.add_argument("--json", metavar="PATH", help="write every mode's records and summary as JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model gains nothing from more, and timings stay "
                   "steady on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _mode_args(mode: str, args: argparse.Namespace):
    from worldkv_connector.integration.video.engine_args import EngineArgs

    window = {"full": {"attention_window": "full"}, "sliding": {"attention_window": "sliding"},
              "worldkv": {"attention_window": "sliding", "kv_connector": "worldkv",
                          "kv_connector_config": args.kv_connector_config}}[mode]
    return EngineArgs(model=args.model, checkpoint=args.checkpoint, seed=args.seed,
                      num_denoising_steps=args.num_denoising_steps, timestep_shift=args.timestep_shift,
                      page_size=args.page_size, eval_attention_recall=True, **window)


def _rollout(mode: str, args: argparse.Namespace, poses: np.ndarray) -> dict:
    from tqdm import tqdm

    from worldkv_connector.integration.video.engine import VideoEngine
    from worldkv_connector.retrieval.poses import yaw_pitch_degrees

    with VideoEngine(_mode_args(mode, args)) as engine:
        engine.add_session("demo", poses=poses, num_chunks=args.num_chunks, seed=args.seed)
        total = engine.scheduler.sessions["demo"].num_chunks
        records, latents = [], []
        with tqdm(total=total, unit="chunk", desc=mode, file=sys.stderr, disable=args.no_progress) as bar:
            while engine.has_unfinished_sessions():
                for r in engine.step():
                    latents.append(r.latents)
                    rec = chunk_record(r)
                    rec["yaw_degrees"] = float(yaw_pitch_degrees(np.asarray(r.pose)[None])[0][0])
                    if engine.connector is not None:  # what the bank holds after this chunk
                        # the last chunk ends the session, which frees its entries: show the bank
                        # as it was when that chunk was banked, not the emptied one
                        m = (engine.metrics()["connector_before_session_end"] if r.finished else None) \
                            or engine.connector.metrics()
                        rec["bank_bytes"], rec["compression_ratio"] = m["bank_bytes"], m["compression_ratio"]
                    records.append(rec)
                    bar.update(1)
        engine.drain()
        metrics = engine.metrics()
        summary = summarize(records, metrics)
        summary.update(engine_recall_summary(engine, max_degrees=args.revisit_degrees))
        # the bank of an ended session is freed, so its size after the run is 0: report the peak
        banked = [r["bank_bytes"] for r in records if "bank_bytes" in r]
        summary["bank_peak_bytes"] = max(banked) if banked else None
        summary["revisit_psnr_db"] = _revisit_psnr(engine, poses, latents, args.num_chunks)
        return {"args": engine.args.to_dict(), "records": records, "summary": summary, "metrics": metrics,
                "sink_chunks": engine.scheduler.sink_chunks, "recent_chunks": engine.scheduler.recent_chunks}


def _revisit_psnr(engine, poses: np.ndarray, latents: list, num_chunks: int | None) -> float | None:
    """Mean PSNR of revisit frames against the first visit of their pose (world/revisit.py pairs)."""
    from worldkv_connector.world.image_metrics import psnr
    from worldkv_connector.world.revisit import revisit_pairs

    fpc = engine.model_config.frames_per_chunk
    frames = torch.cat(latents)  # [N * F, C, H, W]
    per_frame = poses[: frames.shape[0]]
    if per_frame.shape[0] < frames.shape[0]:  # a trajectory shorter than the rollout holds its last pose
        per_frame = np.concatenate([per_frame, np.repeat(per_frame[-1:], frames.shape[0] - per_frame.shape[0], 0)])
    pairs = revisit_pairs(per_frame, fpc, engine.scheduler.sink_chunks, engine.scheduler.recent_chunks, 2.0, 0.02)
    return float(np.mean([psnr(frames[j], frames[i]) for j, i in pairs])) if pairs else None


def _verdict(run: dict, degrees: float) -> dict:
    """Revisits of the worldkv run and whether each retrieved one of its first-visit chunks."""
    from worldkv_connector.integration.video.recall import REVISIT_DISTANCE, revisit_sources

    recs = run["records"]
    poses = np.array([r["pose"] for r in recs])  # [N, 4, 4] chunk means
    # the mean of a chunk's rotations is not a rotation (a chunk turning 30 degrees shrinks it enough that
    # two identical chunks sit ~20 degrees apart by the trace distance): judge revisits on its nearest rotation
    u, _, vt = np.linalg.svd(poses[:, :3, :3])
    poses[:, :3, :3] = u @ vt
    sources = revisit_sources(poses, run["sink_chunks"], run["recent_chunks"],
                              max_degrees=degrees, max_distance=REVISIT_DISTANCE)
    hits, misses = [], []
    for r, src in zip(recs, sources):
        if src:
            (hits if set(r["retrieved"]) & set(src) else misses).append(r["index"])
    return {"revisit_chunks": hits + misses, "hits": hits, "misses": misses, "sources": sources,
            "all_retrieved": bool(hits) and not misses}


def _print_chunks(run: dict, verdict: dict) -> None:
    print("worldkv run, per chunk (retrieved: chunk ids put back in the window; * = revisit; banked: the bank "
          "after the chunk was stored, before the session's end freed it)")
    head = f"{'chunk':>5}  {'yaw deg':>7}  {'banked KiB':>10}  {'compression':>11}  retrieved"
    print(head)
    print("-" * max(len(head), 60))
    for r, src in zip(run["records"], verdict["sources"]):
        mark = "*" if src else " "
        print(f"{r['index']:>4}{mark}  {r['yaw_degrees']:>7.1f}  {r['bank_bytes'] / 1024:>10.1f}  "
              f"{r['compression_ratio']:>10.2f}x  {r['retrieved']}")
    n = len(verdict["revisit_chunks"])
    if not n:
        print("verdict: no revisit in this rollout (no chunk returns to a yaw seen before its recent window)")
    elif not verdict["misses"]:
        print(f"verdict: yes - every revisit ({n} chunks) retrieved at least one of its first-visit chunks")
    else:
        print(f"verdict: no - {len(verdict['hits'])}/{n} revisits retrieved a first-visit chunk; missed at chunks "
              f"{verdict['misses']}")


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _print_comparison(runs: dict) -> None:
    print("comparison (same model, trajectory and seeds; recall: share of full-history attention mass the window "
          "holds)")
    head = (f"{'mode':<8}  {'chunks/s':>8}  {'resident KV MiB':>15}  {'peak KV MiB':>11}  {'bank peak MiB':>13}  "
            f"{'recall':>6}  {'recall@revisit':>14}  {'revisit PSNR dB':>15}")
    print(head)
    print("-" * len(head))
    for mode, run in runs.items():
        s = run["summary"]
        bank = None if s["bank_peak_bytes"] is None else s["bank_peak_bytes"] / _MiB
        print(f"{mode:<8}  {s['chunks_per_s']:>8.2f}  {s['resident_kv_bytes_last'] / _MiB:>15.3f}  "
              f"{s['peak_resident_kv_bytes'] / _MiB:>11.3f}  {_fmt(bank, '.3f', '-'):>13}  "
              f"{_fmt(s['attention_recall_mean'], '.3f'):>6}  {_fmt(s['attention_recall_revisit_mean'], '.3f'):>14}  "
              f"{_fmt(s['revisit_psnr_db'], '.2f'):>15}")


def _plot(path: str, runs: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for mode, run in runs.items():
        idx = [r["index"] for r in run["records"]]
        top.plot(idx, [r["step_seconds"] * 1e3 for r in run["records"]], label=mode)
        bottom.plot(idx, [r["resident_kv_bytes"] / _MiB for r in run["records"]], label=mode)
    top.set_ylabel("step time (ms)")
    bottom.set_ylabel("resident KV (MiB)")
    bottom.set_xlabel("chunk index")
    top.legend()
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from worldkv_connector.integration.video.model_config import get_model_config
    from worldkv_connector.retrieval.trajectory import trajectory_poses

    if args.num_chunks is not None and args.num_chunks < 1:
        raise ValueError(f"--num-chunks {args.num_chunks}: expected >= 1")
    if not args.plot.endswith(".png"):
        raise ValueError(f"--plot {args.plot}: expected a .png path")
    if args.revisit_degrees < 0:
        raise ValueError(f"--revisit-degrees {args.revisit_degrees}: expected >= 0")
    config = get_model_config(args.model)  # bad inputs fail before any model is built
    world = args.model == "world"
    if args.checkpoint is None and world:
        from worldkv_connector.world.weights import shipped_weights

        args.checkpoint = str(shipped_weights())
    if args.trajectory is None:
        args.trajectory = WORLD_TRAJECTORY if world else DEFAULT_TRAJECTORY
    if args.deg_per_frame is None:
        args.deg_per_frame = WORLD_DEG_PER_FRAME if world else 2.0
    if not args.deg_per_frame > 0:
        raise ValueError(f"--deg-per-frame {args.deg_per_frame}: expected > 0")
    # one frame per page for the world model (12 tokens): compression then shows in resident KV
    args.page_size = config.frame_tokens if world else 64
    if world:  # the world model's trajectories count latent frames (a chunk turns one field of view)
        poses = trajectory_poses(args.trajectory, frames="latent", deg_per_frame=args.deg_per_frame)
    else:  # video frames resampled to latent frames, as the reference does
        poses = trajectory_poses(args.trajectory, deg_per_frame=args.deg_per_frame)
    runs = {}
    with cpu_threads(args.threads):
        for mode in DEMO_MODES:
            runs[mode] = _rollout(mode, args, poses)
    verdict = _verdict(runs["worldkv"], args.revisit_degrees)
    title = (f"worldkv demo: {args.model}, {args.trajectory}, {len(runs['full']['records'])} chunks, "
             f"{args.num_denoising_steps} denoising steps")
    print(title)
    print()
    _print_chunks(runs["worldkv"], verdict)
    print()
    _print_comparison(runs)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    _plot(args.plot, runs, title)
    print(f"wrote {args.plot}")
    if args.json:
        out = {"model": args.model, "trajectory": args.trajectory, "revisit_degrees": args.revisit_degrees,
               "verdict": {k: v for k, v in verdict.items() if k != "sources"},
               "modes": {m: {k: r[k] for k in ("args", "summary", "metrics", "records")} for m, r in runs.items()}}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)
        print(f"wrote {args.json}")
    return 0
