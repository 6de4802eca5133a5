"""``worldkv bench e2e``: end-to-end rollouts of the video backend, one per mode, in one run.

Prints chunks/s and resident KV per window of chunks (default 8) for every mode. The baseline is
``full`` (keep every chunk): its attention window grows with the rollout, so it slows down, while
``sliding`` stays flat. ``worldkv`` is the WorldKV connector (paged reinsertion); ``reference-style``
is the WorldKV reference scripts' data path with the same retrieval and compression (CPU lists,
synchronous ``.to()``, per-step ``torch.cat``, dense attention; integration/video/reference_attention.py). The bench
prints ``worldkv`` vs ``full`` over the last window (target >= 2x on ``small``, 48 chunks) and
``worldkv`` vs ``reference-style`` per-step time (target: faster), and checks that both retrieve
the same chunks. Modes are a registry (``register_mode``): EngineArgs overrides, plus an optional
``attach(engine, options)`` that swaps a variant into the engine after it is built.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

from worldkv_connector.bench.common import cpu_threads
from worldkv_connector.integration.video import reference_attention as reference_style

__all__ = ["HELP", "add_arguments", "run", "run_rollout", "register_mode", "MODES", "Mode", "window_rates"]

HELP = ("end-to-end rollout: chunks/s and resident KV per chunk window for full, sliding, worldkv and "
        "reference-style")
DEFAULT_MODES = "full,sliding,worldkv,reference-style"

DEFAULT_TRAJECTORY = "R_L_R_L_R_L90"
# the bench's own default: 2 denoising steps keep a 48-chunk CPU run short while attention over a
# growing full window still dominates by the end (stated in the output)
BENCH_DENOISING_STEPS = 2

ModeFn = Callable[[dict], dict]
AttachFn = Callable[[object, dict], object]


@dataclass(frozen=True)
class Mode:
    """``overrides(options)``: EngineArgs fields; ``attach(engine, options)``: optional, swaps a variant
    into the built engine and returns an object the bench may ask for ``retrieved(session, chunk)``,
    ``extra_resident_bytes()`` and ``bank_bytes()``. ``options`` holds run_rollout's keyword arguments
    (e.g. ``kv_connector_config``)."""

    overrides: ModeFn
    attach: AttachFn | None = None


MODES: dict[str, Mode] = {}


def register_mode(name: str, overrides: ModeFn, attach: AttachFn | None = None) -> None:
    MODES[name] = Mode(overrides, attach)


register_mode("full", lambda o: {"attention_window": "full"})
register_mode("sliding", lambda o: {"attention_window": "sliding"})
register_mode("worldkv", lambda o: {"attention_window": "sliding", "kv_connector": "worldkv",
                                    "kv_connector_config": o.get("kv_connector_config")})
register_mode("reference-style", reference_style.overrides, reference_style.attach)


def _engine_args(mode: str, options: dict, base: dict):
    from worldkv_connector.integration.video.engine_args import EngineArgs

    values = dict(base)
    for key, value in MODES[mode].overrides(options).items():
        given = values.get(key)
        if key in ("sink_frames", "recent_frames") and given is not None and given != value:
            raise ValueError(f"mode {mode}: --{key.replace('_', '-')} {given} disagrees with the WorldKV config's "
                             f"{key}={value} (--kv-connector-config); give the same value or leave it out")
        values[key] = value
    return EngineArgs(**values)


def run_rollout(mode: str, preset: str = "small", num_chunks: int = 48, *,
                num_denoising_steps: int = BENCH_DENOISING_STEPS, sessions: int = 1, device: str = "cpu",
                dtype: str | None = None, seed: int = 0, trajectory: str = DEFAULT_TRAJECTORY,
                sink_frames: int | None = None, recent_frames: int | None = None, page_size: int = 64,
                kv_cache_memory: float | None = None, attention_backend: str = "torch",
                kv_connector_config: str | None = None, warmup_chunks: int = 1) -> dict:
    """Roll out ``sessions`` x ``num_chunks`` chunks of model config ``preset`` in ``mode``.

    A warm-up session of ``warmup_chunks`` chunks runs first (first-call costs) and is not timed.
    ``sink_frames``/``recent_frames`` None: 3 and 6, or the WorldKV config's in connector modes.
    Returns ``{mode, preset, num_chunks, step_seconds: [per step], resident_kv_bytes: [per step],
    retrieved: [per step, first session], chunks_per_s, bank_bytes, metrics}``.
    """
    from worldkv_connector.integration.video.engine import VideoEngine

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {sorted(MODES)}")
    if num_chunks < 1 or sessions < 1:
        raise ValueError(f"num_chunks={num_chunks}, sessions={sessions}: expected >= 1")
    options = dict(kv_connector_config=kv_connector_config)
    args = _engine_args(mode, options, dict(
        model=preset, device=device, dtype=dtype, seed=seed, sink_frames=sink_frames, recent_frames=recent_frames,
        num_denoising_steps=num_denoising_steps, page_size=page_size, kv_cache_memory=kv_cache_memory,
        attention_backend=attention_backend,
    ))
    with VideoEngine(args) as engine:
        attached = MODES[mode].attach(engine, options) if MODES[mode].attach else None
        if warmup_chunks:
            engine.add_session("warmup", trajectory=trajectory, num_chunks=warmup_chunks, seed=seed)
            engine.run()
        for i in range(sessions):
            engine.add_session(f"s{i}", trajectory=trajectory, num_chunks=num_chunks, seed=seed + i)
        step_s, resident, retrieved = [], [], []
        start = time.perf_counter()
        while engine.has_unfinished_sessions():
            results = engine.step()
            r = results[0]
            step_s.append(r.step_seconds)
            extra = attached.extra_resident_bytes() if hasattr(attached, "extra_resident_bytes") else 0
            resident.append(r.resident_kv_bytes + extra)
            ids = attached.retrieved(r.session_id, r.chunk_index) if hasattr(attached, "retrieved") else r.retrieved
            retrieved.append([int(c) for c in ids])
        wall = time.perf_counter() - start
        engine.drain()
        metrics = engine.metrics()
    bank = attached.bank_bytes() if hasattr(attached, "bank_bytes") else (metrics["connector"] or {}).get("bank_bytes")
    return {
        "mode": mode, "preset": preset, "num_chunks": num_chunks, "sessions": sessions,
        "num_denoising_steps": num_denoising_steps, "step_seconds": step_s, "resident_kv_bytes": resident,
        "retrieved": retrieved, "wall_seconds": wall, "bank_bytes": bank,
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
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help=f"comma-separated modes, the first is the baseline (default {DEFAULT_MODES}; "
                   "registered: full, sliding, worldkv, reference-style and any added by connector modules)")
    p.add_argument("--num-denoising-steps", type=int, default=BENCH_DENOISING_STEPS,
                   help=f"denoising steps per chunk, plus the clean pass (default {BENCH_DENOISING_STEPS})")
    p.add_argument("--sessions", type=int, default=1, help="sessions batched per step (default 1)")
    p.add_argument("--window", type=int, default=8, help="chunks per reported window (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="model/KV dtype (default: the preset's)")
    p.add_argument("--trajectory", default=DEFAULT_TRAJECTORY, help=f"camera trajectory (default {DEFAULT_TRAJECTORY})")
    p.add_argument("--sink-frames", type=int, help="sink latent frames (default 3, or the WorldKV config's in "
                   "worldkv / reference-style modes; a different value there is an error)")
    p.add_argument("--recent-frames", type=int, help="recent latent frames (default 6, or the WorldKV config's in "
                   "worldkv / reference-style modes)")
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
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected >= 1")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    runs = {}
    for mode in modes:
        with cpu_threads(args):
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
            "peak_resident_kv_bytes": max(r["metrics"]["peak_resident_kv_bytes"], max(r["resident_kv_bytes"])),
            "step_seconds_mean": _mean(r["step_seconds"]),
            "bank_bytes": r["bank_bytes"],
        }
        for m, r in runs.items()
    }
    comparisons = _comparisons(runs, rates)
    _print_comparisons(args, comparisons)
    return {"config": {k: v for k, v in vars(args).items() if k != "func"}, "window_chunks_per_s": rates,
            "summary": summary, "comparisons": comparisons, "runs": runs}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _comparisons(runs: dict, rates: dict) -> dict:
    """worldkv vs full over the last window, worldkv vs reference-style per-step time and retrieval."""
    out: dict = {}
    if "worldkv" in runs and "full" in runs:
        full_last = rates["full"][-1]
        out["worldkv_vs_full_last_window"] = rates["worldkv"][-1] / full_last if full_last else 0.0
    if "worldkv" in runs and "reference-style" in runs:
        ours, ref = runs["worldkv"]["step_seconds"], runs["reference-style"]["step_seconds"]
        out["worldkv_step_seconds_mean"] = _mean(ours)
        out["reference_style_step_seconds_mean"] = _mean(ref)
        out["reference_style_over_worldkv_step_time"] = _mean(ref) / _mean(ours) if _mean(ours) else 0.0
        out["same_retrieval"] = runs["worldkv"]["retrieved"] == runs["reference-style"]["retrieved"]
    return out


def _print_comparisons(args, comp: dict) -> None:
    if "worldkv_vs_full_last_window" in comp:
        print(f"worldkv vs full, last {args.window} chunks: {comp['worldkv_vs_full_last_window']:.2f}x "
              f"(target >= 2.0x on small, 48 chunks)")
    if "same_retrieval" in comp:
        print(f"per-step time: worldkv {comp['worldkv_step_seconds_mean'] * 1e3:.1f} ms vs reference-style "
              f"{comp['reference_style_step_seconds_mean'] * 1e3:.1f} ms: reference-style / worldkv "
              f"{comp['reference_style_over_worldkv_step_time']:.2f}x (target: > 1, worldkv faster); same retrieved "
              f"chunks: {'yes' if comp['same_retrieval'] else 'NO'}")


def _run_mode(args: argparse.Namespace, mode: str) -> dict:
    return run_rollout(
        mode, args.preset, args.num_chunks, num_denoising_steps=args.num_denoising_steps,
        sessions=args.sessions, device=args.device, dtype=args.dtype, seed=args.seed,
        trajectory=args.trajectory, sink_frames=args.sink_frames, recent_frames=args.recent_frames,
        page_size=args.page_size, kv_cache_memory=args.kv_cache_memory,
        attention_backend=args.attention_backend, kv_connector_config=args.kv_connector_config,
    )


def _or(value, default):
    return default if value is None else value


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _print_table(args, runs: dict, rates: dict) -> None:
    mib = 1 << 20
    modes = list(runs)
    print(f"e2e rollout: preset {args.preset}, {args.sessions} session(s) x {args.num_chunks} chunks, "
          f"{args.num_denoising_steps} denoising steps + clean pass per chunk, device {args.device}, "
          f"sink {_or(args.sink_frames, 3)} / recent {_or(args.recent_frames, 6)} frames (connector modes: the "
          f"config's), {args.threads or _threads()} CPU thread(s)")
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
