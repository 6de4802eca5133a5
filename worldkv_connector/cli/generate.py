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
import os
import signal
import sys
from pathlib import Path

import numpy as np

from worldkv_connector.cli.video_outputs import VideoOutputs, add_video_arguments
from worldkv_connector.cli.outputs import (
    OutputError, RunOutputs, chunk_record, prepare_path, save_latents, summarize, summary_table,
)

__all__ = ["register", "add_engine_arguments", "engine_args_from", "summarize", "cpu_threads", "chunk_record",
           "engine_recall_summary", "default_threads", "EXIT_INTERRUPTED"]

logger = logging.getLogger(__name__)

DEFAULT_TRAJECTORY = "R_L_R_L_R_L90"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


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
    p.add_argument("--per-chunk", action="store_true",
                   help="print one table row per chunk as it is produced (stdout): session, chunk, camera x/z and "
                   "yaw, the chunk ids the connector retrieved into its window, step time and resident KV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: half the CPU cores this process may "
                   "use, at most 8; 1 on a 2-core machine, where more threads ran 30x slower when busy)")
    add_video_arguments(p)  # --vae, --video, --frames, --contact-sheet, --prompt*, --image (video_outputs.py)
    p.set_defaults(func=run)


PER_CHUNK_HEADER = f"{'session':>8} {'chunk':>5} {'x':>7} {'z':>7} {'yaw':>7}  {'step ms':>8} {'KV MiB':>7}  retrieved"


def per_chunk_row(r) -> str:
    """One ``--per-chunk`` row of a ChunkResult: where the camera was (mean pose of the chunk,
    yaw in degrees) and which banked chunks the connector put back into its window."""
    from worldkv_connector.retrieval.poses import yaw_pitch_degrees

    pose = np.asarray(r.pose, dtype=np.float64)
    yaw = float(yaw_pitch_degrees(pose[None])[0][0])
    retrieved = " ".join(str(int(c)) for c in r.retrieved) or "-"
    return (f"{r.session_id:>8} {r.chunk_index:>5} {pose[0, 3]:>7.2f} {pose[2, 3]:>7.2f} {yaw:>7.1f}  "
            f"{r.step_seconds * 1e3:>8.1f} {r.resident_kv_bytes / 2**20:>7.2f}  {retrieved}")


def default_threads() -> int:
    """Torch CPU threads when ``--threads`` is not given: half the cores this process may use
    (at most 8). Torch's own default (every core) oversubscribes a shared machine: on a busy 2-core
    machine the tiny model made 2.4-4 chunks/s with 2 threads against 110 with 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


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


class _StopOnSigint:
    """Ctrl-C once: stop after the current step (outputs and bank are still written); twice: abort."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous = None

    def __enter__(self) -> "_StopOnSigint":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True
        print("\ninterrupted: stopping after the current step (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_inputs(args: argparse.Namespace):
    """Every check that needs no model: flags, bounds, KV cache size, output paths. Returns
    (the poses source, EngineArgs)."""
    from worldkv_connector.cli.inputs import check_trajectory, load_poses
    from worldkv_connector.integration.video.engine import check_kv_capacity
    from worldkv_connector.integration.video.engine_args import MAX_CHUNKS
    from worldkv_connector.integration.video.model_config import get_model_config
    from worldkv_connector.retrieval.poses import validate_poses
    from worldkv_connector.retrieval.trajectory import trajectory_poses

    if not 1 <= args.sessions <= 1024:
        raise ValueError(f"--sessions {args.sessions}: allowed 1 <= sessions <= 1024")
    if args.num_chunks is not None and not 1 <= args.num_chunks <= MAX_CHUNKS:
        raise ValueError(f"--num-chunks {args.num_chunks}: allowed 1 <= num-chunks <= {MAX_CHUNKS}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise ValueError(f"--threads {args.threads}: allowed 1 <= threads <= 1024")
    if args.trajectory is not None and args.poses is not None:
        raise ValueError("give either --trajectory or --poses, not both")
    if args.output is not None and not args.output.endswith(".safetensors"):
        raise ValueError(f"--output {args.output}: expected a .safetensors path")
    model = get_model_config(args.model)  # bad inputs fail before any model or cache is built
    if args.actions is not None:
        from worldkv_connector.actions import action_poses, load_actions

        if model.family != "matrix-game-2":
            raise ValueError(f"--actions: model {args.model!r} is not action-conditioned (use a matrix-game-2 model)")
        if args.trajectory is not None or args.poses is not None:
            raise ValueError("--actions gives the camera path: drop --trajectory / --poses")
        keyboard, mouse = load_actions(args.actions)
        source = {"inputs": {"keyboard": keyboard, "mouse": mouse}}
        num_frames = action_poses(keyboard, mouse, frames_per_chunk=model.frames_per_chunk).shape[0]
    elif args.poses is not None:
        source = {"poses": validate_poses(load_poses(args.poses), "--poses")}
        num_frames = source["poses"].shape[0]
    else:
        check_trajectory(args.trajectory if args.trajectory is not None else DEFAULT_TRAJECTORY)
        source = {"poses": trajectory_poses(args.trajectory or DEFAULT_TRAJECTORY, frames=args.trajectory_frames,
                                            frames_per_chunk=model.frames_per_chunk, hold_frames=args.hold_frames)}
        num_frames = source["poses"].shape[0]
    engine_args = engine_args_from(args)
    chunks = args.num_chunks or -(-num_frames // model.frames_per_chunk)
    if chunks > MAX_CHUNKS:
        raise ValueError(f"the trajectory makes {chunks} chunks: allowed at most {MAX_CHUNKS} (give --num-chunks)")
    check_kv_capacity(engine_args, [chunks] * args.sessions)
    if engine_args.kv_connector == "worldkv" and engine_args.device == "cpu":  # before the model is built
        from worldkv_connector.bank import check_bank_memory
        from worldkv_connector.config import WorldKVConfig

        config = WorldKVConfig.from_json(engine_args.kv_connector_config)
        if config.bank == "cpu":
            check_bank_memory("cpu", "cpu", config.bank_bytes)
    from worldkv_connector.cli.inputs import check_run_size

    latent_bytes = 4 * model.frames_per_chunk * model.out_channels * model.latent_height * model.latent_width
    check_run_size(chunks * args.sessions, latent_bytes_per_chunk=latent_bytes, keep_latents=bool(args.output),
                   keep_records=bool(args.json))
    for flag, path in (("--save-bank", args.save_bank), ("--resume-bank", args.resume_bank)):
        if path is not None and (not path or Path(path).is_file()):
            raise ValueError(f"{flag} {path!r}: expected a bank directory" + (", got a file" if path else ""))
    if args.resume_bank is not None and not Path(args.resume_bank).is_dir():
        raise FileNotFoundError(f"--resume-bank {args.resume_bank}: no such bank directory")
    return source, engine_args


def engine_args_model(args: argparse.Namespace):
    from worldkv_connector.integration.video.model_config import get_model_config

    return get_model_config(args.model)


def run(args: argparse.Namespace) -> int:
    from worldkv_connector.integration.video.engine import VideoEngine

    source, engine_args = _check_inputs(args)
    video = VideoOutputs.from_args(args, engine_args_model(args))  # VAE, prompt, image: checked and loaded
    output = None if args.output is None else prepare_path("--output", args.output, ".safetensors")
    outputs = RunOutputs(args.json, args.plot, header={"args": engine_args.to_dict()})
    threads = args.threads if args.threads is not None else (default_threads() if engine_args.device == "cpu" else None)
    # latents are kept only when --output saves them (and recall needs the per-chunk results)
    keep = bool(args.output) or engine_args.eval_attention_recall
    with cpu_threads(threads), VideoEngine(engine_args) as engine:
        if args.save_bank or args.resume_bank:
            bank_api = _bank_api(engine, "--save-bank" if args.save_bank else "--resume-bank")
            if args.resume_bank:
                loaded = bank_api.load_bank(args.resume_bank)  # before any session: ids continue after these
                print(f"resumed {len(loaded)} banked chunk(s) from {args.resume_bank}")
            if args.save_bank:
                bank_api.retain_finished_sessions = True  # keep the entries past the sessions' end
        for i in range(args.sessions):
            engine.add_session(f"s{i}", num_chunks=args.num_chunks, seed=args.seed + i, **source,
                               keep_results=keep, **video.session_kwargs(engine.add_session))
        total = sum(s.num_chunks for s in engine.scheduler.sessions.values())
        from tqdm import tqdm

        stopped = "error"
        with tqdm(total=total, unit="chunk", file=sys.stderr, disable=args.no_progress, desc="generate") as bar, \
                _StopOnSigint() as sigint:
            if args.per_chunk:
                bar.write(PER_CHUNK_HEADER, file=sys.stdout)

            def on_result(r) -> None:
                outputs.add(r)
                video.on_chunk(r)
                if args.per_chunk:
                    bar.write(per_chunk_row(r), file=sys.stdout)
                bar.update(1)

            try:
                engine.run(on_result, should_stop=lambda: sigint.stopped)
                stopped = "interrupted" if sigint.stopped else None
            finally:  # finished, interrupted or failed: what was produced is written
                for line in video.close(engine):  # an interrupted run still leaves a playable video
                    print(line)
                try:
                    _finish(args, engine, engine_args, outputs, output, stopped, keep)
                except Exception as exc:
                    if stopped != "error":
                        raise
                    # the run's own error is on its way out: do not hide it behind this one
                    print(f"worldkv generate: could not write the outputs after the failure: {exc}", file=sys.stderr)
    return EXIT_INTERRUPTED if stopped == "interrupted" else 0


def _finish(args, engine, engine_args, outputs: RunOutputs, output: Path | None, stopped: str | None,
            keep: bool) -> None:
    """Summary table, JSON, plot, latents and bank of a run that ended for reason ``stopped``
    (None: finished; "interrupted"; "error": an exception is on its way out, so only files are
    written, and a failure to write one does not hide it)."""
    metrics = engine.metrics()
    summary = summarize(outputs.stats, metrics)
    if engine_args.eval_attention_recall and stopped is None:
        summary.update(engine_recall_summary(engine))
    ea = engine.args  # the window as resolved (a connector's config may define it)
    window = ea.attention_window if ea.attention_window == "full" else (
        f"sliding (sink {ea.sink_frames}, recent {ea.recent_frames} frames)")
    title = (f"worldkv generate: {args.model}, {window}, {args.sessions} session(s), "
             f"{args.num_denoising_steps} denoising steps, connector {args.kv_connector or 'none'}")
    if stopped is not None:
        title += f" ({stopped} after {summary['chunks']} chunks)"
    steps = [
        ("json", lambda: outputs.write_json(summary, metrics, complete=stopped is None, stopped=stopped)),
        ("plot", lambda: outputs.write_plot(title)),
    ]
    if output is not None and keep:
        steps.append(("output", lambda: _save(output, engine, engine.args)))
    if args.save_bank and stopped != "error":
        steps.append(("bank", lambda: _save_bank(engine, args.save_bank)))
    if stopped != "error":
        print(summary_table(title, summary, metrics["connector"]))
    for name, step in steps:
        try:
            step()
        except Exception as exc:
            if stopped != "error":
                raise
            print(f"worldkv generate: could not write the {name} output after the failure: {exc}", file=sys.stderr)
            continue
        path = {"json": outputs.json_path, "plot": outputs.plot_path, "output": output}.get(name)
        if path is not None and (name != "plot" or outputs.stats.chunks):
            print(f"wrote {path}" + ("" if stopped is None else f" ({summary['chunks']} chunks, {stopped})"))


def _save_bank(engine, path: str) -> None:
    manifest = engine.connector.save_bank(path)
    print(f"wrote bank {path} ({len(manifest.get('entries', []))} entries)")


def _bank_api(engine, flag: str):
    """The connector's bank persistence (save_bank / load_bank), or a clear error."""
    conn = engine.connector
    if conn is None or not (hasattr(conn, "save_bank") and hasattr(conn, "load_bank")):
        raise ValueError(f"{flag} needs a connector with a bank: add --kv-connector worldkv")
    return conn


def _save(path: Path, engine, engine_args) -> None:
    import torch

    tensors = {sid: torch.stack(engine.results(sid)).contiguous() for sid, s in engine.scheduler.sessions.items()
               if s.keep_results and s.results}
    save_latents("--output", path, tensors, {"engine_args": json.dumps(engine_args.to_dict()),
                                             "layout": "[num_chunks, frames_per_chunk, channels, latent_h, latent_w]"})
