"""``worldkv bench compress``: time to compress one chunk next to the time to copy it off.

Compression (novelty of each key vs the anchor frame's centroid, selection of the most novel
tokens, gather of the kept K and V into one staging buffer ``[L, 2, T', H, D]``) runs at store time,
so it should cost less than the copy it saves. Per preset: the compression time (the Triton kernel
on CUDA, with the torch reference beside it; the torch reference on the CPU) and the time of one
contiguous copy of the compressed bytes to host memory (pinned on CUDA), their ratio, and the
kept/total token counts.
"""
from __future__ import annotations

import argparse

import torch

from worldkv_connector.bench.common import (
    BENCH_PRESETS, CPU_PRESETS, add_common_arguments, check_preset, cpu_threads, gbps, measure_many, print_table,
    resolve_device,
)
from worldkv_connector.compression import compress_chunk
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.shapes import KVShape

__all__ = ["HELP", "add_arguments", "run"]

HELP = "compression time of one chunk (Triton on CUDA, torch on CPU) vs the copy of its compressed bytes, per preset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, multi_preset=True, repeats=5, warmup=1)
    p.add_argument("--keep-ratio", type=float, default=WorldKVConfig().keep_ratio,
                   help="share of each non-anchor frame's tokens kept (default: the config's)")


def _one(shape: KVShape, cfg: WorldKVConfig, args, device: torch.device) -> dict:
    L, T, H, D = shape.num_layers, shape.chunk_tokens, shape.num_kv_heads, shape.head_dim
    kept = cfg.kept_tokens(shape.frame_tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(L, T, H, D, generator=gen, device=device).to(shape.torch_dtype)  # [L, T, H, D]
    v = torch.randn(L, T, H, D, generator=gen, device=device).to(shape.torch_dtype)
    staging = torch.empty(L, 2, kept, H, D, dtype=shape.torch_dtype, device=device)
    host = torch.empty(staging.shape, dtype=staging.dtype, pin_memory=device.type == "cuda")
    kw = dict(frame_tokens=shape.frame_tokens, keep_ratio=cfg.keep_ratio, pooled=cfg.pooled)

    def torch_compress() -> None:
        cc = compress_chunk(k, v, **kw)
        torch.stack((cc.k, cc.v), dim=1, out=staging)

    def copy() -> None:
        host.copy_(staging, non_blocking=device.type == "cuda")

    fns = {"compress": torch_compress, "copy": copy}
    check = None
    if device.type == "cuda":
        from worldkv_connector.kernels.compress import compress_chunk_kernel

        def kernel_compress() -> None:
            compress_chunk_kernel(k, v, out=staging, **kw)

        fns = {"compress": kernel_compress, "torch": torch_compress, "copy": copy}
        # the kernel must keep the reference's tokens: a fast wrong answer is no answer
        _, idx = compress_chunk_kernel(k, v, out=staging, **kw)
        check = bool(torch.equal(idx, compress_chunk(k, v, **kw).indices))
    times = measure_many(fns, device, warmup=args.warmup, repeats=args.repeats)
    ms = {n: t.median_s * 1e3 for n, t in times.items()}
    moved = staging.numel() * staging.element_size()
    return {
        "preset": shape.name, "tokens": T, "kept_tokens": kept, "kept_fraction": kept / T,
        "compressed_bytes": moved, "chunk_bytes": shape.chunk_bytes(), "time_ms": ms,
        "copy_gbps": gbps(moved, times["copy"].median_s), "compress_over_copy": ms["compress"] / ms["copy"],
        "compress_impl": "triton" if device.type == "cuda" else "torch", "matches_reference": check,
    }


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args)
    names = args.preset or list(CPU_PRESETS if device.type == "cpu" else BENCH_PRESETS)
    shapes = [check_preset(n, device) for n in dict.fromkeys(names)]
    cfg = WorldKVConfig(keep_ratio=args.keep_ratio)
    with cpu_threads(args) as threads:
        rows = [_one(shape, cfg, args, device) for shape in shapes]
    impl = rows[0]["compress_impl"]
    print_table(
        f"compress one chunk ({impl}, keep_ratio {cfg.keep_ratio}) vs copying its compressed bytes to "
        f"{'pinned ' if device.type == 'cuda' else ''}host memory, {device.type}",
        ("preset", "kept/total", "compress ms", "copy ms", "copy GB/s", "compress / copy")
        + (("torch ms", "same tokens") if device.type == "cuda" else ()),
        [(r["preset"], f"{r['kept_tokens']}/{r['tokens']}", r["time_ms"]["compress"], r["time_ms"]["copy"],
          r["copy_gbps"], r["compress_over_copy"])
         + ((r["time_ms"]["torch"], r["matches_reference"]) if device.type == "cuda" else ()) for r in rows],
    )
    if device.type != "cuda":
        print("note: on the CPU compression is the torch reference; the Triton kernel runs on CUDA.")
    return {"device": device.type, "keep_ratio": cfg.keep_ratio, "repeats": args.repeats, "warmup": args.warmup,
            "threads": threads, "presets": rows}
