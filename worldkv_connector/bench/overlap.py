"""``worldkv bench overlap``: does one step's offload + reinsertion hide behind the model's compute?

The compute is the video backend's forward of one chunk for the preset's model (random weights)
with a dense attention over a fixed-size window ``[sink | k retrieved (compressed) | recent |
current]`` sized from the connector config. The transfers are one step's worth: the committed
chunk's compressed staging buffer -> its bank slot (store) and ``--load-chunks`` retrieved bank
chunks -> scattered pages (load), submitted to the transfer engine's streams just before the
forward. The figure is time(forward with transfers) / time(forward alone); on a GPU the copy
engines run beside the SMs (target <= 1.05). On the CPU the copies are synchronous, so the ratio
there is simply (copy + compute) / compute: overlap needs CUDA streams.

lingbot-fast-sp4 is modelled as LingBot-World-Fast's layer count and head size with a quarter of
the heads and of the FFN (one GPU's share at sequence-parallel 4 under head-split attention).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from worldkv_connector.bench.common import (
    add_common_arguments, cpu_threads, check_preset, measure_many, print_table, print_targets, resolve_device,
    target,
)
from worldkv_connector.bench.paged import PagedLayout
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.shapes import KVShape

__all__ = ["HELP", "add_arguments", "run", "model_config_for"]

HELP = "forward of one chunk alone vs with one step's offload + reinsert on the copy streams (target <= 1.05 on GPU)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, repeats=5, warmup=2)
    cfg = WorldKVConfig()
    p.add_argument("--load-chunks", type=int, default=cfg.retrieval_chunks,
                   help=f"retrieved chunks loaded this step (default {cfg.retrieval_chunks}: all of them changed)")
    p.add_argument("--keep-ratio", type=float, default=cfg.keep_ratio, help="compression of the moved chunks")


def model_config_for(preset: str):
    """The video backend's model config for a bench preset (see the module doc for sp4)."""
    from worldkv_connector.integration.video.model_config import get_model_config

    if preset == "lingbot-fast-sp4":
        full = get_model_config("lingbot-fast")
        heads = full.num_heads // 4
        return full.replace(name=preset, num_heads=heads, num_kv_heads=heads, dim=heads * full.head_dim,
                            ffn_dim=full.ffn_dim // 4)
    return get_model_config(preset)


def _window_tokens(cfg: WorldKVConfig, shape: KVShape) -> int:
    full = shape.chunk_tokens
    return (cfg.sink_chunks + cfg.recent_chunks) * full + cfg.retrieval_chunks * cfg.kept_tokens(shape.frame_tokens)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args)
    with cpu_threads(args) as threads:
        return {**_run(args, device), "threads": threads}


def _run(args: argparse.Namespace, device: torch.device) -> dict:
    shape = check_preset(args.preset, device)
    if not 0 <= args.load_chunks <= 64:
        raise ValueError(f"--load-chunks={args.load_chunks} is out of range: allowed 0 <= load_chunks <= 64")
    from worldkv_connector.integration.video.models import build_model
    from worldkv_connector.transfer import TransferEngine

    cfg = WorldKVConfig(keep_ratio=args.keep_ratio)
    mcfg = model_config_for(shape.name)
    kv = mcfg.kv_shape()
    if (kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.frame_tokens) != (
            shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.frame_tokens):
        raise ValueError(f"model config {mcfg.name!r} has KV {kv} but preset {shape.name!r} is {shape}")
    model = build_model(mcfg, seed=0, device=device)
    dtype, frames = mcfg.torch_dtype, mcfg.frames_per_chunk
    window = _window_tokens(cfg, shape)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device).to(dtype)

    # one window shared by every layer: same compute as per-layer caches, a fraction of the memory
    win_k, win_v = randn(1, window, mcfg.num_heads, mcfg.head_dim), randn(1, window, mcfg.num_heads, mcfg.head_dim)

    def attn_fn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: [B, T, H, D]; keys/values: [B, window + T, H, D]
        kk, vv = torch.cat((win_k, k), 1), torch.cat((win_v, v), 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
        return out.transpose(1, 2)

    from worldkv_connector.integration.video.models import example_inputs

    x, context, extra = example_inputs(mcfg, frames, randn)  # the model family's conditioning inputs
    t = torch.full((1,), 0.5, device=device)
    offset = torch.tensor([window // shape.frame_tokens], device=device)

    kept = cfg.kept_tokens(shape.frame_tokens)
    layout = PagedLayout(shape, cfg.page_size, kept, args.load_chunks + 1, device, seed=3)
    loads = list(range(args.load_chunks))
    load_plan = layout.plan(loads, to_bank=False) if loads else None
    staging = randn(shape.num_layers, 2, kept, shape.num_kv_heads, shape.head_dim)  # the clean pass's output
    store_slot = layout.bank.view(args.load_chunks)
    engine = TransferEngine.for_config(cfg, device)
    moved = staging.numel() * staging.element_size() + (load_plan.layer_bytes * shape.num_layers if load_plan else 0)

    def forward() -> None:
        with torch.inference_mode():
            model(x, t, context, offset, attn_fn, **extra)

    def transfers(then=None) -> None:
        # the store reads what compute wrote, the load fills pages compute reads later: the engine
        # orders both after the work queued on the current stream so far (its default)
        jobs = [engine.submit("store", [staging], [store_slot])]
        if load_plan is not None:
            # planned once: the same pages every repeat (STYLE §9, plan once, run per layer)
            jobs += engine.submit_layers("load", load_plan)
        if then is not None:
            then()
        for job in jobs:
            engine.wait(job)
            if job.error:
                raise RuntimeError(f"transfer job failed: {job.error}")
        engine.poll()

    times = measure_many({"alone": forward, "transfers": transfers, "with": lambda: transfers(forward)}, device,
                         warmup=args.warmup, repeats=args.repeats)
    ms = {n: v.median_s * 1e3 for n, v in times.items()}
    ratio = ms["with"] / ms["alone"]
    serial = (ms["alone"] + ms["transfers"]) / ms["alone"]
    ideal = max(ms["alone"], ms["transfers"]) / ms["alone"]
    print_table(f"overlap: {mcfg.name} forward of one chunk ({shape.chunk_tokens} tokens, window {window}), "
                f"{device.type}; transfers: 1 store + {args.load_chunks} loads, {moved / 1e6:.2f} MB",
                ("forward ms", "transfers ms", "with ms", "with / alone", "serial would be", "perfect overlap"),
                [(ms["alone"], ms["transfers"], ms["with"], ratio, serial, ideal)])
    targets = [target("overlap: forward with transfers / alone", ratio, "<=", 1.05, applies=device.type == "cuda",
                      note="GPU, copy streams beside compute")]
    print_targets(targets)
    if device.type != "cuda":
        print("note: on the CPU the copies are synchronous, so nothing overlaps: the ratio is the copy cost "
              "added to compute. Overlap needs CUDA streams.")
    stats = engine.stats()
    engine.close()
    layout.close()
    return {
        "preset": shape.name, "model": mcfg.name, "device": device.type, "window_tokens": window,
        "chunk_tokens": shape.chunk_tokens, "load_chunks": args.load_chunks, "kept_tokens": kept,
        "moved_bytes": moved, "repeats": args.repeats, "warmup": args.warmup, "time_ms": ms,
        "ratio": ratio, "serial_ratio": serial, "ideal_ratio": ideal, "overlaps": device.type == "cuda",
        "targets": targets, "engine_paths": stats["paths"],
    }
