"""``worldkv bench reinsert``: k retrieved bank chunks -> KV pages, GB/s, and the steady state.

Retrieved chunks are compressed bank entries (``kept_tokens`` per layer, slots ``[L, 2, T', H, D]``
in pinned host memory when CUDA is present) loaded into freshly allocated, scattered pages of the
per-layer pools ``[2, num_pages, page_size, H, D]``; the last page of each row is partial. Four ways,
as in ``bench offload`` (ours / contiguous / per-fragment loop / reference); the reference style is
the reference implementation's reinsertion: every step, per layer, ``torch.cat`` of ``.to(device)``
of every retrieved chunk's K (and V), kept as Python lists of pageable per-layer tensors.

Steady state: consecutive steps retrieve mostly the same chunks (``--changed`` new ones per step).
With a GPU hot set only the changed chunks move; the table compares bytes and time per step with
moving all k every step (and with the reference, which always moves all k).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from worldkv_connector.bench.common import (
    add_common_arguments, check_preset, cpu_threads, print_table, resolve_device, sync,
)
from worldkv_connector.bench.paged import (
    PagedLayout, SWEEP_HEADERS, copy_targets, plot_sweep, sweep_page_sizes, submit_layers, sweep_row, time_copies,
)
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.shapes import KVShape
from worldkv_connector.transfer import TransferEngine

__all__ = ["HELP", "add_arguments", "run"]

HELP = ("bank -> pages reinsertion GB/s of k retrieved chunks vs contiguous copy, per-fragment loop and the "
        "reference's per-layer torch.cat; plus hot-set steady state")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, plot=True)
    cfg = WorldKVConfig()
    p.add_argument("--page-sizes", help="page sizes in tokens to sweep (default 16,32,64,128,256 + the ~16 KiB page)")
    p.add_argument("--k", type=int, default=cfg.retrieval_chunks, help=f"chunks retrieved per step (default {cfg.retrieval_chunks})")
    p.add_argument("--keep-ratio", type=float, default=cfg.keep_ratio, help="compression of the banked chunks (1.0: none)")
    p.add_argument("--changed", type=int, default=1, help="retrieved chunks that change from one step to the next (default 1)")
    p.add_argument("--steps", type=int, default=8, help="timed steady-state steps (default 8)")


def reference_bank(layout: PagedLayout) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The reference's bank: per chunk, a list of per-layer (K, V) pageable CPU tensors."""
    out = []
    for c in range(layout.num_chunks):
        view = layout.bank.view(c)  # [L, 2, T', H, D]
        out.append([(view[i, 0].to("cpu", copy=True), view[i, 1].to("cpu", copy=True)) for i in range(view.shape[0])])
    return out


def reference_load(ref: list, chunks, device: torch.device) -> list:
    """One step of the reference's reinsertion: per layer, cat of every retrieved chunk's .to(device)."""
    num_layers = len(ref[0])
    return [
        (torch.cat([ref[c][i][0].to(device) for c in chunks]), torch.cat([ref[c][i][1].to(device) for c in chunks]))
        for i in range(num_layers)
    ]


def _sweep(shape: KVShape, page_sizes, k: int, tokens: int, args, device, engine) -> list[dict]:
    points = []
    for ps in page_sizes:
        layout = PagedLayout(shape, ps, tokens, k, device, seed=1)
        ref = reference_bank(layout)
        chunks = list(range(k))
        points.append(time_copies(layout, chunks, to_bank=False, engine=engine, device=device, warmup=args.warmup,
                                  repeats=args.repeats, reference=lambda: reference_load(ref, chunks, device)))
        layout.close()
    return points


def _steady_state(shape: KVShape, cfg: WorldKVConfig, tokens: int, args, device, engine) -> dict:
    """Steps whose retrieved sets slide by ``changed`` chunks over a ring of k + 2*changed banked chunks."""
    k, changed = args.k, args.changed
    ring = k + 2 * changed
    layout = PagedLayout(shape, cfg.page_size, tokens, ring, device, seed=2)
    ref = reference_bank(layout)
    per_chunk = layout.pages_per_chunk
    free = list(range(ring * per_chunk))
    random.Random(0).shuffle(free)  # pages come back from the block manager in no particular order
    resident: dict[int, list[int]] = {}
    chunk_bytes = shape.chunk_bytes(tokens)

    def retrieved(step: int) -> list[int]:
        return [(step * changed + i) % ring for i in range(k)]

    def load(chunks: list[int], pages: dict[int, list[int]]) -> None:
        if chunks:
            submit_layers(engine, "load", layout.plan(chunks, to_bank=False, page_ids=pages))

    def hot_step(step: int) -> int:
        want = retrieved(step)
        for c in [c for c in resident if c not in want]:  # left the retrieved set: its pages are free
            free.extend(resident.pop(c))
        new = [c for c in want if c not in resident]
        for c in new:
            resident[c] = [free.pop() for _ in range(per_chunk)]
        load(new, resident)
        return len(new) * chunk_bytes

    def all_step(step: int) -> int:
        want = retrieved(step)
        load(want, {c: layout.page_ids[c] for c in want})
        return len(want) * chunk_bytes

    def ref_step(step: int) -> int:
        reference_load(ref, retrieved(step), device)
        return k * chunk_bytes

    out = {}
    for name, fn in (("all", all_step), ("hot", hot_step), ("reference", ref_step)):
        # the first steps warm up (and fill the hot set); the timed steps follow them
        for s in range(max(1, args.warmup)):
            fn(s)
        times, moved = [], []
        for s in range(max(1, args.warmup), max(1, args.warmup) + args.steps):
            sync(device)
            t0 = time.perf_counter()
            moved.append(fn(s))
            sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = {"time_s": statistics.median(times), "bytes_per_step": statistics.mean(moved)}
    layout.close()
    base = out["all"]
    for row in out.values():
        row["time_vs_all"] = row["time_s"] / base["time_s"]
        row["bytes_vs_all"] = row["bytes_per_step"] / base["bytes_per_step"]
    return {"k": k, "changed": changed, "steps": args.steps, "page_size": cfg.page_size, **out}


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args)
    with cpu_threads(args) as threads:
        return {**_run(args, device), "threads": threads}


def _run(args: argparse.Namespace, device: torch.device) -> dict:
    shape = check_preset(args.preset, device)
    for name, lo, hi in (("k", 1, 64), ("changed", 0, 64), ("steps", 1, 10_000)):
        value = getattr(args, name)
        if not lo <= value <= hi:
            raise ValueError(f"--{name}={value} is out of range: allowed {lo} <= {name} <= {hi}")
    if args.changed > args.k:
        raise ValueError(f"--changed={args.changed} must be <= --k={args.k} (only retrieved chunks can change)")
    cfg = WorldKVConfig(keep_ratio=args.keep_ratio, retrieval_chunks=args.k, hot_chunks=max(args.k, 6))
    tokens = cfg.kept_tokens(shape.frame_tokens)
    engine = TransferEngine.for_config(cfg, device)
    points = _sweep(shape, sweep_page_sizes(args.page_sizes, shape), args.k, tokens, args, device, engine)
    print_table(f"reinsert: {shape.name}, k={args.k} chunks of {tokens} kept tokens (keep_ratio {cfg.keep_ratio}), "
                f"bank -> pages, {device.type} (ratios x are to the contiguous copy)",
                SWEEP_HEADERS, [sweep_row(p) for p in points])
    steady = _steady_state(shape, cfg, tokens, args, device, engine)
    print_table(f"steady state: {args.changed} of k={args.k} retrieved chunks change per step, page {cfg.page_size}",
                ("method", "MB/step", "x bytes", "ms/step", "x time"),
                [(n, steady[n]["bytes_per_step"] / 1e6, steady[n]["bytes_vs_all"], steady[n]["time_s"] * 1e3,
                  steady[n]["time_vs_all"]) for n in ("all", "hot", "reference")])
    targets, cpu_point = copy_targets("reinsert", "scatter", points, shape, cfg.page_size, device,
                                      lambda big: _sweep(big, [cfg.page_size], 4, big.chunk_tokens, args, device, engine)[0])
    if getattr(args, "plot", None):
        plot_sweep(args.plot, points, f"reinsert bank -> pages ({shape.name}, {device.type})")
    stats = engine.stats()
    engine.close()
    return {
        "preset": shape.name, "device": device.type, "k": args.k, "kept_tokens": tokens, "keep_ratio": cfg.keep_ratio,
        "repeats": args.repeats, "warmup": args.warmup, "kernel_threshold_bytes": cfg.copy_kernel_threshold_bytes,
        "sweep": points, "steady_state": steady, "cpu_target_point": cpu_point, "targets": targets,
        "engine_paths": stats["paths"],
    }
