"""``worldkv bench e2e``: end-to-end rollouts of the video backend, one per mode, in one run.

Prints chunks/s and resident KV per window of chunks (default 8) for every mode. The baseline is
``full`` (keep every chunk): its attention window grows with the rollout, so it slows down, while
``sliding`` stays flat. Modes are a registry (``register_mode``), so connector modes (``worldkv``,
``reference-style``...) are one entry each: a function from options to EngineArgs overrides.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

from worldkv_connector.cli.generate import cpu_threads

__all__ = ["HELP", "add_arguments", "run", "run_rollout", "register_mode", "MODES", "window_rates"]

HELP = "end-to-end rollout: chunks/s and resident KV per chunk window for full, sliding and connector modes"

DEFAULT_TRAJECTORY = "R_L_R_L_R_L90"
# the bench's own default: 2 denoising steps keep a 48-chunk CPU run short while attention over a
# growing full window still dominates by the end (stated in the output)
BENCH_DENOISING_STEPS = 2

ModeFn = Callable[[dict], dict]
MODES: dict[str, ModeFn] = {}


def register_mode(name: str, overrides: ModeFn) -> None:
    """``overrides(options) -> dict`` of EngineArgs fields for mode ``name``; ``options`` holds the
    run_rollout keyword arguments (e.g. ``kv_connector_config``)."""
    MODES[name] = overrides


register_mode("full", lambda o: {"attention_window": "full"})
register_mode("sliding", lambda o: {"attention_window": "sliding"})
register_mode("worldkv", lambda o: {"attention_window": "sliding", "kv_connector": "worldkv",
                                    "kv_connector_config": o.get("kv_connector_config")})


def run_rollout(mode: str, preset: str = "small", num_chunks: int = 48, *,
                num_denoising_steps: int = BENCH_DENOISING_STEPS, sessions: int = 1, device: str = "cpu",
                dtype: str | None = None, seed: int = 0, trajectory: str = DEFAULT_TRAJECTORY,
                sink_frames: int = 3, recent_frames: int = 6, page_size: int = 64,
                kv_cache_memory: float | None = None, attention_backend: str = "torch",
                kv_connector_config: str | None = None, warmup_chunks: int = 1) -> dict:
    """Roll out ``sessions`` x ``num_chunks`` chunks of model config ``preset`` in ``mode``.

    A warm-up session of ``warmup_chunks`` chunks runs first (first-call costs) and is not timed.
    Returns ``{mode, preset, num_chunks, step_seconds: [per step], resident_kv_bytes: [per step],
    retrieved: [per step, first session], chunks_per_s, metrics}``.
    """
    from worldkv_connector.integration.video.engine import VideoEngine
    from worldkv_connector.integration.video.engine_args import EngineArgs

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {sorted(MODES)}")
    if num_chunks < 1 or sessions < 1:
        raise ValueError(f"num_chunks={num_chunks}, sessions={sessions}: expected >= 1")
    options = dict(kv_connector_config=kv_connector_config)
    args = EngineArgs(
        model=preset, device=device, dtype=dtype, seed=seed, sink_frames=sink_frames, recent_frames=recent_frames,
        num_denoising_steps=num_denoising_steps, page_size=page_size, kv_cache_memory=kv_cache_memory,
        attention_backend=attention_backend, **MODES[mode](options),
    )
    with VideoEngine(args) as engine:
        if warmup_chunks:
            engine.add_session("warmup", trajectory=trajectory, num_chunks=warmup_chunks, seed=seed)
            engine.run()
        for i in range(sessions):
            engine.add_session(f"s{i}", trajectory=trajectory, num_chunks=num_chunks, seed=seed + i)
        step_s, resident, retrieved = [], [], []
        start = time.perf_counter()
        while engine.has_unfinished_sessions():
            results = engine.step()
            step_s.append(results[0].step_seconds)
            resident.append(results[0].resident_kv_bytes)
            retrieved.append(list(results[0].retrieved))
        wall = time.perf_counter() - start
        metrics = engine.metrics()
    return {
        "mode": mode, "preset": preset, "num_chunks": num_chunks, "sessions": sessions,
        "num_denoising_steps": num_denoising_steps, "step_seconds": step_s, "resident_kv_bytes": resident,
        "retrieved": retrieved, "wall_seconds": wall,
        "chunks_per_s": sessions * num_chunks / sum(step_s) if sum(step_s) else 0.0, "metrics": metrics,
    }


def window_rates(step_seconds: list[float], window: int, sessions: int = 1) -> list[float]:
    """Chunks/s over consecutive windows of ``window`` steps (the last window may be shorter)."""
    out = []
    for i in range(0, len(step_seconds), window):
        part = step_seconds[i : i + window]
        out.append(sessions * len(part) / sum(part) if sum(part) else 0.0)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model config (tiny, small, wan-1.3b, ...; default small)")
    p.add_argument("--num-chunks", type=int, default=48, help="chunks per session (default 48)")
    p.add_argument("--modes", default="full,sliding",
                   help="comma-separated modes, the first is the baseline (default full,sliding; "
                   "registered: full, sliding, worldkv and any added by connector modules)")
    p.add_argument("--num-denoising-steps", type=int, default=BENCH_DENOISING_STEPS,
                   help=f"denoising steps per chunk, plus the clean pass (default {BENCH_DENOISING_STEPS})")
    p.add_argument("--sessions", type=int, default=1, help="sessions batched per step (default 1)")
    p.add_argument("--window", type=int, default=8, help="chunks per reported window (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="model/KV dtype (default: the preset's)")
    p.add_argument("--trajectory", default=DEFAULT_TRAJECTORY, help=f"camera trajectory (default {DEFAULT_TRAJECTORY})")
    p.add_argument("--sink-frames", type=int, default=3, help="sink latent frames (default 3)")
    p.add_argument("--recent-frames", type=int, default=6, help="recent latent frames (default 6)")
    p.add_argument("--page-size", type=int, default=64, help="tokens per KV page (default 64)")
    p.add_argument("--kv-cache-memory", type=float, metavar="GiB", help="KV cache GiB (default auto)")
    p.add_argument("--attention-backend", choices=("torch", "triton"), default="torch", help="default torch")
    p.add_argument("--kv-connector-config", metavar="JSON", help="JSON for connector modes")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --device cpu, which keeps "
                   "timings steady on a machine shared with other jobs; torch's default otherwise)")


def run(args: argparse.Namespace) -> dict:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise ValueError(f"--modes {args.modes!r}: unknown {unknown}; choose from {sorted(MODES)}")
    if args.window < 1:
        raise ValueError(f"--window {args.window}: expected >= 1")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    runs = {}
    for mode in modes:
        with cpu_threads(args.threads):
            runs[mode] = _run_mode(args, mode)
    rates = {m: window_rates(r["step_seconds"], args.window, args.sessions) for m, r in runs.items()}
    _print_table(args, runs, rates)
    base = modes[0]
    summary = {
        m: {
            "chunks_per_s": r["chunks_per_s"],
            "first_window_chunks_per_s": rates[m][0],
            "last_window_chunks_per_s": rates[m][-1],
            "last_over_first": rates[m][-1] / rates[m][0] if rates[m][0] else 0.0,
            f"last_window_speedup_vs_{base}": rates[m][-1] / rates[base][-1] if rates[base][-1] else 0.0,
            "peak_resident_kv_bytes": r["metrics"]["peak_resident_kv_bytes"],
        }
        for m, r in runs.items()
    }
    return {"config": {k: v for k, v in vars(args).items() if k != "func"}, "window_chunks_per_s": rates,
            "summary": summary, "runs": runs}


def _run_mode(args: argparse.Namespace, mode: str) -> dict:
    return run_rollout(
        mode, args.preset, args.num_chunks, num_denoising_steps=args.num_denoising_steps,
        sessions=args.sessions, device=args.device, dtype=args.dtype, seed=args.seed,
        trajectory=args.trajectory, sink_frames=args.sink_frames, recent_frames=args.recent_frames,
        page_size=args.page_size, kv_cache_memory=args.kv_cache_memory,
        attention_backend=args.attention_backend, kv_connector_config=args.kv_connector_config,
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _print_table(args, runs: dict, rates: dict) -> None:
    mib = 1 << 20
    modes = list(runs)
    print(f"e2e rollout: preset {args.preset}, {args.sessions} session(s) x {args.num_chunks} chunks, "
          f"{args.num_denoising_steps} denoising steps + clean pass per chunk, device {args.device}, "
          f"sink {args.sink_frames} / recent {args.recent_frames} frames, {args.threads or _threads()} CPU thread(s)")
    head = f"{'chunks':>9}" + "".join(f"  {m + ' ch/s':>16}" for m in modes) + "".join(
        f"  {m + ' KV MiB':>18}" for m in modes)
    print(head)
    print("-" * len(head))
    for w in range(len(rates[modes[0]])):
        lo = w * args.window
        hi = min(lo + args.window, args.num_chunks) - 1
        cells = "".join(f"  {rates[m][w]:>16.2f}" for m in modes)
        kv = "".join(f"  {runs[m]['resident_kv_bytes'][hi] / mib:>18.2f}" for m in modes)
        print(f"{f'{lo}-{hi}':>9}{cells}{kv}")
    base = modes[0]
    for m in modes:
        r = rates[m]
        print(f"{m}: {runs[m]['chunks_per_s']:.2f} chunks/s overall, last/first window {r[-1] / r[0]:.2f}x, "
              f"last window vs {base} {r[-1] / rates[base][-1]:.2f}x")
