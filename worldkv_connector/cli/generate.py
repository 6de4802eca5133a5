"""``worldkv generate``: roll out a camera trajectory with the video backend and report speed/memory.

Prints a progress bar per chunk (stderr) and a summary table (stdout). ``--json`` writes per-chunk
records ``{session, index, step_seconds, resident_kv_bytes, pose, retrieved}`` (plus
``attention_recall`` [per layer] and ``attention_recall_mean`` with ``--eval-attention-recall``)
and the summary;
``--plot`` draws step time and resident KV against chunk index; ``--output`` saves the latents
(off by default: one fp32 tensor ``[num_chunks, F, C, Hl, Wl]`` per session, keyed by session id).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import numpy as np

from worldkv_connector.cli.video_outputs import VideoOutputs, add_video_arguments

__all__ = ["register", "add_engine_arguments", "engine_args_from", "summarize", "cpu_threads", "chunk_record",
           "engine_recall_summary"]

logger = logging.getLogger(__name__)

DEFAULT_TRAJECTORY = "R_L_R_L_R_L90"


def add_engine_arguments(p: argparse.ArgumentParser, *, model_default: str = "tiny") -> None:
    """Engine flags shared by ``generate`` and the e2e bench (names = EngineArgs fields)."""
    from worldkv_connector.integration.video.engine_args import EngineArgs

    d = EngineArgs()
    p.add_argument("--model", default=model_default,
                   help=f"named model config: tiny, small, wan-1.3b, matrix-game-2, lingbot-fast (default {model_default})")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="load weights from a .safetensors file, a directory of .safetensors shards or a .pt/.pth "
                   "state dict, in the upstream Wan key layout or the diffusers/FastVideo layout (converted on "
                   "load); default: random weights from --seed")
    p.add_argument("--checkpoint-key", metavar="ENTRY",
                   help="entry of a .pt/.pth checkpoint that holds the weights, dots for nested entries "
                   "(e.g. generator_ema in Self-Forcing / CausVid checkpoints); default: the file's only state dict")
    p.add_argument("--checkpoint-prefix", metavar="PREFIX", default="",
                   help="prefix stripped from every checkpoint key (e.g. model. in Self-Forcing checkpoints; "
                   "default none)")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="model and KV dtype (default: the model's)")
    p.add_argument("--attention-window", choices=("full", "sliding"), default=d.attention_window,
                   help="full: keep every chunk; sliding: sink + recent frames only (default sliding)")
    p.add_argument("--sink-frames", type=int, default=None,
                   help="latent frames kept at the start of the window, a multiple of 3 (default 3; with a "
                   "connector its config's sink_frames, and a different value here is an error)")
    p.add_argument("--recent-frames", type=int, default=None,
                   help="latent frames of the recent window, a multiple of 3 (default 6; with a connector "
                   "its config's recent_frames, and a different value here is an error)")
    p.add_argument("--num-denoising-steps", type=int, default=d.num_denoising_steps,
                   help=f"flow-matching steps per chunk before the clean pass (default {d.num_denoising_steps})")
    p.add_argument("--timestep-shift", type=float, default=d.timestep_shift,
                   help=f"flow-matching sigma shift (default {d.timestep_shift}; 1.0 = evenly spaced sigmas)")
    p.add_argument("--kv-cache-memory", type=float, metavar="GiB",
                   help="memory of the paged KV cache in GiB (default: auto, 80%% of free GPU memory or 0.25 GiB on CPU)")
    p.add_argument("--page-size", type=int, default=d.page_size, help=f"tokens per KV page (default {d.page_size})")
    p.add_argument("--attention-backend", choices=("torch", "triton"), default=d.attention_backend,
                   help="paged attention implementation (default torch, the reference)")
    p.add_argument("--kv-connector", metavar="NAME",
                   help="KV connector: a registered name (e.g. worldkv) or module:Class (default none)")
    p.add_argument("--kv-connector-config", metavar="JSON", help="JSON configuration passed to the connector")
    p.add_argument("--seed", type=int, default=d.seed, help="weights seed; session i uses seed + i (default 0)")
    p.add_argument("--eval-attention-recall", action="store_true",
                   help="diagnostic: keep a shadow full-KV history and report, per chunk and layer, the share of "
                   "full-history attention mass the window holds (1.0 for full; costs memory and one dense "
                   "attention per layer per chunk, outside the step timings)")


def engine_args_from(args: argparse.Namespace, **overrides):
    from worldkv_connector.integration.video.engine_args import EngineArgs

    fields = ("model", "checkpoint", "checkpoint_key", "checkpoint_prefix", "device", "dtype", "attention_window", "sink_frames", "recent_frames",
              "num_denoising_steps", "timestep_shift", "kv_cache_memory", "page_size", "attention_backend",
              "kv_connector", "kv_connector_config", "seed")
    values = {f: getattr(args, f) for f in fields}
    values["eval_attention_recall"] = bool(getattr(args, "eval_attention_recall", False))
    values.update(overrides)
    return EngineArgs(**values)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a rollout along a camera trajectory with the video backend",
        description="Roll out a causal video DiT chunk by chunk (3 latent frames) along a camera trajectory. "
        "Trajectories are in video frames (2 deg per frame, W/S/A/D over 24 frames, _ holds --hold-frames) "
        "resampled to latent frames (4n+1 video frames -> n+1 latent frames), as the WorldKV reference does; "
        "a trajectory shorter than the rollout holds its last pose.",
    )
    add_engine_arguments(p)
    p.add_argument("--trajectory", help=f"revisit trajectory spec, e.g. R_L_R_L_R_L90 (default {DEFAULT_TRAJECTORY})")
    p.add_argument("--hold-frames", type=int, default=18,
                   help="video frames one '_' of --trajectory holds the pose (default 18, the reference's runs)")
    p.add_argument("--trajectory-frames", choices=("video", "latent"), default="video",
                   help="unit of --trajectory: video frames resampled to latent frames (default, the reference's "
                   "convention) or latent (the older 1:1 mapping, one grammar frame per latent frame)")
    p.add_argument("--poses", metavar="FILE.npy", help="camera-to-world poses [F, 4, 4], one per latent frame "
                   "(instead of --trajectory)")
    p.add_argument("--actions", metavar="FILE",
                   help="Matrix-Game-2 keyboard/mouse actions per video frame: .npy [N, 6] (W, S, A, D, mouse_pitch, "
                   "mouse_yaw) or .json {\"keyboard\": [[W, S, A, D], ...], \"mouse\": [[pitch, yaw], ...]}; they "
                   "condition the model and, integrated into camera poses, are what the connector retrieves by "
                   "(instead of --trajectory / --poses)")
    p.add_argument("--num-chunks", type=int, help="chunks per session (default: enough for the trajectory)")
    p.add_argument("--sessions", type=int, default=1, help="sessions generated together, batched per step (default 1)")
    p.add_argument("--json", metavar="PATH", help="write per-chunk records and the summary as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="plot step time and resident KV against chunk index")
    p.add_argument("--output", metavar="PATH.safetensors",
                   help="save latents (one [num_chunks, F, C, Hl, Wl] tensor per session); default: not saved")
    p.add_argument("--save-bank", metavar="DIR",
                   help="after the rollout, save the connector's bank (entries, kept indices, poses, config "
                   "fingerprint, checksums) to DIR; needs --kv-connector worldkv")
    p.add_argument("--resume-bank", metavar="DIR",
                   help="before the rollout, load a bank saved with --save-bank (or `worldkv bank save`): "
                   "sessions with the saved session ids (s0, s1, ...) retrieve the saved chunks, and their new "
                   "chunks are numbered after them; refused if the model shape or config differs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    add_video_arguments(p)  # --vae, --video, --frames, --contact-sheet, --prompt*, --image (video_outputs.py)
    p.set_defaults(func=run)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (None: unchanged), restoring the count after."""
    import torch

    if n is not None and n < 1:
        raise ValueError(f"--threads {n}: expected >= 1")
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_poses(path: str) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--poses {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several kinds for a file that is not an .npy array
        raise ValueError(f"--poses {path}: not a numpy .npy array ({exc})") from None


def chunk_record(r) -> dict:
    """The JSON record of one ChunkResult."""
    rec = {
        "session": r.session_id, "index": r.chunk_index, "step": r.step,
        "step_seconds": r.step_seconds, "resident_kv_bytes": r.resident_kv_bytes,
        "pose": np.asarray(r.pose).tolist(), "retrieved": [int(c) for c in r.retrieved],
    }
    if r.attention_recall is not None:
        rec["attention_recall"] = list(r.attention_recall)
        rec["attention_recall_mean"] = r.attention_recall_mean
    return rec


def engine_recall_summary(engine, **revisit) -> dict:
    """Attention recall over every session of a finished engine run (integration/video/recall.py:
    mean past the window and at revisit chunks). ``revisit``: max_degrees / max_distance."""
    from worldkv_connector.integration.video.recall import recall_summary

    sessions = []
    for sid in engine.scheduler.sessions:
        res = engine.chunk_results(sid)
        if res:
            sessions.append((np.stack([r.pose for r in res]), [r.attention_recall for r in res]))
    return recall_summary(sessions, engine.scheduler.sink_chunks, engine.scheduler.recent_chunks, **revisit)


def summarize(records: list[dict], metrics: dict) -> dict:
    """Summary of a run: chunks/s over all steps and over the last quarter of the steps, memory."""
    steps: dict[int, list[dict]] = {}
    for r in records:
        steps.setdefault(r["step"], []).append(r)
    order = sorted(steps)
    secs = [steps[s][0]["step_seconds"] for s in order]
    counts = [len(steps[s]) for s in order]
    q = max(1, len(order) // 4)
    connector = metrics.get("connector") or {}
    return {
        "chunks": len(records),
        "steps": len(order),
        "chunks_per_s": sum(counts) / sum(secs) if sum(secs) else 0.0,
        "chunks_per_s_last_quarter": sum(counts[-q:]) / sum(secs[-q:]) if sum(secs[-q:]) else 0.0,
        "resident_kv_bytes_last": records[-1]["resident_kv_bytes"] if records else 0,
        "peak_resident_kv_bytes": metrics["peak_resident_kv_bytes"],
        "peak_pages": metrics["peak_pages"],
        "num_pages": metrics["num_pages"],
        "bank_bytes": connector.get("bank_bytes"),
        "bank_peak_bytes": connector.get("bank_peak_bytes"),
    }


def _table(title: str, summary: dict, connector: dict | None) -> str:
    mib = 1 << 20
    lines = [title, "-" * len(title)]
    rows = [
        ("chunks generated", f"{summary['chunks']}"),
        ("chunks/s (all steps)", f"{summary['chunks_per_s']:.2f}"),
        ("chunks/s (last quarter)", f"{summary['chunks_per_s_last_quarter']:.2f}"),
        ("resident KV, last step", f"{summary['resident_kv_bytes_last'] / mib:.2f} MiB"),
        ("resident KV, peak", f"{summary['peak_resident_kv_bytes'] / mib:.2f} MiB"),
        ("pages, peak / total", f"{summary['peak_pages']} / {summary['num_pages']}"),
    ]
    if summary.get("attention_recall_chunks") is not None:
        for key, label in (("attention_recall_mean", "attention recall, past the window"),
                           ("attention_recall_revisit_mean", "attention recall, revisit chunks")):
            value = summary.get(key)
            count = summary["attention_recall_chunks" if key == "attention_recall_mean" else "revisit_chunks"]
            rows.append((label, "n/a (no such chunk)" if value is None else f"{value:.3f} over {count} chunks"))
    if connector is not None:
        for key, label in (("bank_bytes", "bank at the end"), ("bank_peak_bytes", "bank peak")):
            bank = summary.get(key)
            rows.append((label, "n/a" if bank is None else f"{bank / mib:.2f} MiB"))
        for k, v in sorted(connector.items()):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("bank_bytes", "bank_peak_bytes"):
                rows.append((f"connector {k}", f"{v:.4g}" if isinstance(v, float) else str(v)))
    width = max(len(k) for k, _ in rows)
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _plot(path: str, records: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in records if r["session"] == records[0]["session"]]
    idx = [r["index"] for r in first]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(idx, [r["step_seconds"] * 1e3 for r in first], color="tab:blue", label="step time")
    ax.set_xlabel("chunk index")
    ax.set_ylabel("step time (ms)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(idx, [r["resident_kv_bytes"] / (1 << 20) for r in first], color="tab:red", label="resident KV")
    ax2.set_ylabel("resident KV (MiB)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from worldkv_connector.integration.video.engine import VideoEngine

    if args.sessions < 1:
        raise ValueError(f"--sessions {args.sessions}: expected >= 1")
    if args.trajectory is not None and args.poses is not None:
        raise ValueError("give either --trajectory or --poses, not both")
    for flag, path, suffix in (("--plot", args.plot, ".png"), ("--output", args.output, ".safetensors")):
        if path is not None and not path.endswith(suffix):
            raise ValueError(f"{flag} {path}: expected a {suffix} path")
    from worldkv_connector.integration.video.model_config import get_model_config
    from worldkv_connector.poses import trajectory_poses, validate_poses

    model_config = get_model_config(args.model)  # bad inputs fail before any model or cache is built
    outputs = VideoOutputs.from_args(args, model_config)  # VAE, prompt, image: checked and loaded
    if args.actions is not None:
        from worldkv_connector.actions import load_actions

        if model_config.family != "matrix-game-2":
            raise ValueError(f"--actions: model {args.model!r} is not action-conditioned (use a matrix-game-2 model)")
        if args.trajectory is not None or args.poses is not None:
            raise ValueError("--actions gives the camera path: drop --trajectory / --poses")
        keyboard, mouse = load_actions(args.actions)
        source = {"inputs": {"keyboard": keyboard, "mouse": mouse}}
    elif args.poses is not None:
        source = {"poses": validate_poses(_load_poses(args.poses), "--poses")}
    else:
        source = {"poses": trajectory_poses(args.trajectory or DEFAULT_TRAJECTORY, frames=args.trajectory_frames,
                                            hold_frames=args.hold_frames)}
    engine_args = engine_args_from(args)
    if args.resume_bank is not None and not Path(args.resume_bank).is_dir():
        raise FileNotFoundError(f"--resume-bank {args.resume_bank}: no such bank directory")
    with cpu_threads(args.threads), VideoEngine(engine_args) as engine:
        if args.save_bank or args.resume_bank:
            bank_api = _bank_api(engine, "--save-bank" if args.save_bank else "--resume-bank")
            if args.resume_bank:
                loaded = bank_api.load_bank(args.resume_bank)  # before any session: ids continue after these
                print(f"resumed {len(loaded)} banked chunk(s) from {args.resume_bank}")
            if args.save_bank:
                bank_api.retain_finished_sessions = True  # keep the entries past the sessions' end
        for i in range(args.sessions):
            engine.add_session(f"s{i}", num_chunks=args.num_chunks, seed=args.seed + i, **source,
                               **outputs.session_kwargs(engine.add_session))
        total = sum(s.num_chunks for s in engine.scheduler.sessions.values())
        records: list[dict] = []
        from tqdm import tqdm

        with tqdm(total=total, unit="chunk", file=sys.stderr, disable=args.no_progress, desc="generate") as bar:
            def on_result(r) -> None:
                records.append(chunk_record(r))
                outputs.on_chunk(r)
                bar.update(1)

            try:
                engine.run(on_result)
            finally:  # an interrupted run still leaves a playable video of what was made
                for line in outputs.close(engine):
                    print(line)
        metrics = engine.metrics()
        summary = summarize(records, metrics)
        if engine_args.eval_attention_recall:
            summary.update(engine_recall_summary(engine))
        ea = engine.args  # the window as resolved (a connector's config may define it)
        window = ea.attention_window if ea.attention_window == "full" else (
            f"sliding (sink {ea.sink_frames}, recent {ea.recent_frames} frames)")
        title = (f"worldkv generate: {args.model}, {window}, {args.sessions} session(s), "
                 f"{args.num_denoising_steps} denoising steps, connector {args.kv_connector or 'none'}")
        print(_table(title, summary, metrics["connector"]))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": engine.args.to_dict(), "summary": summary, "metrics": metrics,
                           "records": records}, fh, indent=2, default=float)
            print(f"wrote {args.json}")
        if args.plot:
            _plot(args.plot, records, title)
            print(f"wrote {args.plot}")
        if args.output:
            _save(args.output, engine, engine.args)
            print(f"wrote {args.output}")
        if args.save_bank:
            manifest = engine.connector.save_bank(args.save_bank)
            print(f"wrote bank {args.save_bank} ({len(manifest.get('entries', []))} entries)")
    return 0


def _bank_api(engine, flag: str):
    """The connector's bank persistence (save_bank / load_bank), or a clear error."""
    conn = engine.connector
    if conn is None or not (hasattr(conn, "save_bank") and hasattr(conn, "load_bank")):
        raise ValueError(f"{flag} needs a connector with a bank: add --kv-connector worldkv")
    return conn


def _save(path: str, engine, engine_args) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {sid: torch.stack(engine.results(sid)).contiguous() for sid in engine.scheduler.sessions}
    save_file(tensors, path, metadata={"engine_args": json.dumps(engine_args.to_dict()),
                                       "layout": "[num_chunks, frames_per_chunk, channels, latent_h, latent_w]"})
