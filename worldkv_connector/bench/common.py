"""Shared pieces of the benchmarks: flags, timing, tables, plots and targets.

Every figure is a ratio against a baseline measured in the same run, after a warm-up, as the
median of ``--repeats`` runs (STYLE §12). ``bench.paged`` holds the paged layout the transfer
benchmarks move data in.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from worldkv_connector.shapes import KVShape, get_preset

__all__ = [
    "BENCH_PRESETS", "CPU_PRESETS", "FLUSH_BYTES", "add_common_arguments", "resolve_device", "check_preset", "Timing",
    "measure_many", "gbps", "print_table", "save_plot", "target", "parse_sizes", "sync", "cpu_threads",
    "print_targets",
]

BENCH_PRESETS = ("tiny", "small", "wan-1.3b", "matrix-game-2", "lingbot-fast-sp4")
CPU_PRESETS = ("tiny", "small")
FLUSH_BYTES = 64 << 20  # twice a large server L3: evicts what the previous timed run left there


def add_common_arguments(parser: argparse.ArgumentParser, *, plot: bool = False, multi_preset: bool = False,
                         repeats: int = 5, warmup: int = 1) -> None:
    """--preset, --device, --repeats, --warmup (and --plot)."""
    parser.add_argument("--preset", choices=BENCH_PRESETS, nargs="+" if multi_preset else None,
                        help=f"model KV layout (default: tiny on CPU, wan-1.3b on CUDA; CPU allows {list(CPU_PRESETS)})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per figure (median; default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs first (default {warmup})")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 steadies CPU figures "
                        "on a busy machine, where multi-threaded copies wait on each other")
    if plot:
        parser.add_argument("--plot", metavar="PATH.png", help="write a plot of GB/s against fragment size")


def resolve_device(args: argparse.Namespace) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise ValueError(f"--threads={args.threads} is out of range: allowed 1 <= threads <= 1024")
    for flag in ("repeats", "warmup"):
        value = getattr(args, flag)
        lo = 1 if flag == "repeats" else 0
        if not lo <= value <= 10_000:
            raise ValueError(f"--{flag}={value} is out of range: allowed {lo} <= {flag} <= 10000")
    return torch.device(name)


@contextlib.contextmanager
def cpu_threads(args: argparse.Namespace) -> Iterator[int]:
    """Run with ``--threads`` torch CPU threads, then restore the previous count (the bench may run
    inside a longer process, e.g. a test session)."""
    before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def check_preset(name: str | None, device: torch.device) -> KVShape:
    """The preset's KVShape; on the CPU only the small presets (time and memory limits)."""
    name = name or ("tiny" if device.type == "cpu" else "wan-1.3b")
    shape = get_preset(name)
    if device.type == "cpu" and name not in CPU_PRESETS:
        raise ValueError(
            f"--preset {name}: not allowed on the CPU ({shape.chunk_bytes() / 1e6:.0f} MB of KV per chunk would take "
            f"minutes and gigabytes of memory); use one of {list(CPU_PRESETS)} or --device cuda"
        )
    return shape


def parse_sizes(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected comma-separated ints, e.g. 16,64,256") from None
    if not values or any(not 1 <= v <= 1 << 16 for v in values):
        raise ValueError(f"{flag}={text!r}: every value must lie in 1..65536")
    return sorted(set(values))


# --- timing ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_many(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                 repeats: int, flush_bytes: int = 0) -> dict[str, Timing]:
    """Wall time of each function including its device work (synchronized before and after each
    run), interleaved (a b c a b c ...): the load of a shared
    machine drifts, and interleaving makes every method see the same drift as its baseline.

    flush_bytes: on the CPU, write that many scratch bytes before each timed run, so no method
    finds the data the previous one left in the last-level cache (copies of a few tens of MB
    fit in it and would otherwise favour whichever method runs second).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    scratch = torch.empty(flush_bytes, dtype=torch.uint8) if device.type == "cpu" and flush_bytes > 0 else None
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            if scratch is not None:
                scratch.fill_(i & 0xFF)
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    return {n: Timing(statistics.median(v), min(v), max(v), repeats) for n, v in samples.items()}


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


# --- output ------------------------------------------------------------------------------------
def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in text:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def save_plot(path: str, series: dict[str, tuple[list[float], list[float]]], *, xlabel: str, ylabel: str,
              title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def target(name: str, measured: float | None, op: str, goal: float, *, applies: bool, note: str = "") -> dict:
    """A target beside its measured figure. ``met`` is None where it cannot be checked here."""
    met = None
    if applies and measured is not None:
        met = measured >= goal if op == ">=" else measured <= goal
    return {"name": name, "goal": f"{op} {goal:g}", "measured": measured, "met": met, "note": note}


def print_targets(targets: Sequence[dict]) -> None:
    rows = []
    for t in targets:
        status = {True: "met", False: "MISSED", None: "n/a here"}[t["met"]]
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        rows.append((t["name"], t["goal"], measured, status, t["note"]))
    print_table("targets", ("target", "goal", "measured", "status", "note"), rows)
