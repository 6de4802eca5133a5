"""``worldkv bench offload``: committed chunks in a paged pool -> bank slots, GB/s.

Chunks sit in per-layer pools ``[2, num_pages, page_size, H, D]`` on scattered (shuffled) pages,
as a block manager hands them out after a while; each is copied into its bank slot
``[L, 2, T, H, D]`` (pinned host memory when CUDA is present). Four ways, measured in the same run:

- ours: the transfer engine (runs merged, path chosen per job: batched DMA / SM kernel / loop);
- contiguous: one copy of the same number of bytes between the same two memories (the peak);
- loop: one ``copy_`` per fragment (per page, per layer, per K/V), a per-block offloader's style;
- reference: the reference implementation's style, per layer ``.to('cpu')`` of the chunk's slice of
  a contiguous cache into pageable memory plus ``.clone()``.

The page size is swept (the fragment is one page of one layer's K). With compression, the chunk is
pruned (novelty vs the anchor frame), gathered into a staging buffer and sent in one copy; its
figure is the effective rate, uncompressed chunk bytes per second of banking.
"""
from __future__ import annotations

import argparse

import torch

from worldkv_connector.bank import Bank
from worldkv_connector.bench.common import (
    FLUSH_BYTES, add_common_arguments, check_preset, cpu_threads, gbps, measure_many, print_table, resolve_device,
)
from worldkv_connector.bench.paged import (
    PagedLayout, SWEEP_HEADERS, copy_targets, plot_sweep, sweep_page_sizes, sweep_row, time_copies,
)
from worldkv_connector.compression import compress_chunk
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.shapes import KVShape
from worldkv_connector.transfer import TransferEngine

__all__ = ["HELP", "add_arguments", "run"]

HELP = "paged pool -> bank offload GB/s vs one contiguous copy, a per-fragment loop and the reference's .to('cpu').clone()"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # copies of a few MB take ~0.1 ms: on a shared host a median of 5 swings by 2x, so more runs
    add_common_arguments(p, plot=True, repeats=21, warmup=3)
    p.add_argument("--page-sizes", help="page sizes in tokens to sweep (default 16,32,64,128,256 + the ~16 KiB page)")
    p.add_argument("--chunks", type=int, default=4, help="chunks moved per timed copy (default 4)")
    p.add_argument("--keep-ratio", type=float, default=WorldKVConfig().keep_ratio,
                   help="compression keep ratio of the compressed variant (default: the config's)")


def reference_store(layout: PagedLayout, chunks) -> list:
    """The reference's store: per chunk and layer, K and V sliced from a contiguous cache, copied
    with ``.to('cpu')`` (pageable) and ``.clone()``d into a Python list."""
    shape, out = layout.shape, []
    span = layout.pages_per_chunk * layout.page_size
    for c in chunks:
        a, b = c * span, c * span + layout.tokens
        for layer in range(shape.num_layers):
            k = layout.pools[layer, 0].view(-1, shape.num_kv_heads, shape.head_dim)[a:b]
            v = layout.pools[layer, 1].view(-1, shape.num_kv_heads, shape.head_dim)[a:b]
            out.append((k.to("cpu").clone(), v.to("cpu").clone()))
    return out


def _sweep(shape: KVShape, page_sizes, args, device, engine, tokens: int) -> list[dict]:
    points = []
    for ps in page_sizes:
        layout = PagedLayout(shape, ps, tokens, args.chunks, device)
        chunks = list(range(args.chunks))
        points.append(time_copies(layout, chunks, to_bank=True, engine=engine, device=device, warmup=args.warmup,
                                  repeats=args.repeats, reference=lambda: reference_store(layout, chunks)))
        layout.close()
    return points


def _compressed(shape: KVShape, cfg: WorldKVConfig, args, device, engine) -> dict:
    """Bank one chunk with compression: prune + gather to staging + one copy; vs the reference
    (torch compression, then per-layer .to('cpu').clone()) and the contiguous copy of the whole chunk."""
    L, T, H, D = shape.num_layers, shape.chunk_tokens, shape.num_kv_heads, shape.head_dim
    kept = cfg.kept_tokens(shape.frame_tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    fresh = torch.randn(L, 2, T, H, D, generator=gen, device=device).to(shape.torch_dtype)  # the clean pass's K/V
    k, v = fresh[:, 0], fresh[:, 1]  # [L, T, H, D] views with contiguous [H, D] rows
    staging = torch.empty(L, 2, kept, H, D, dtype=shape.torch_dtype, device=device)
    bank = Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=shape.torch_dtype, slot_tokens=kept,
                capacity_bytes=shape.chunk_bytes(kept))
    bank.reserve(0, kept)
    slot = bank.view(0)
    full = Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=shape.torch_dtype, slot_tokens=T,
                capacity_bytes=shape.chunk_bytes(T))
    full_slot = full.slot_view(0)
    kw = dict(frame_tokens=shape.frame_tokens, keep_ratio=cfg.keep_ratio, pooled=cfg.pooled)
    if device.type == "cuda":
        from worldkv_connector.kernels.compress import compress_chunk_kernel

        def compress() -> None:
            compress_chunk_kernel(k, v, out=staging, **kw)
    else:
        def compress() -> None:
            cc = compress_chunk(k, v, **kw)
            torch.stack((cc.k, cc.v), dim=1, out=staging)

    def ours() -> None:
        compress()
        engine.wait(engine.submit("store", [staging], [slot]))
        engine.poll()

    def reference() -> list:
        cc = compress_chunk(k, v, **kw)
        return [(cc.k[i].to("cpu").clone(), cc.v[i].to("cpu").clone()) for i in range(L)]

    def contiguous() -> None:
        full_slot.copy_(fresh, non_blocking=device.type == "cuda")

    t = measure_many({"contiguous": contiguous, "ours": ours, "reference": reference}, device, warmup=args.warmup,
                     repeats=args.repeats, flush_bytes=min(FLUSH_BYTES, 4 * shape.chunk_bytes()))
    chunk_bytes = shape.chunk_bytes()
    rates = {n: gbps(chunk_bytes, x.median_s) for n, x in t.items()}
    bank.close()
    full.close()
    return {
        "keep_ratio": cfg.keep_ratio, "tokens": T, "kept_tokens": kept, "chunk_bytes": chunk_bytes,
        "moved_bytes": shape.chunk_bytes(kept), "time_s": {n: x.median_s for n, x in t.items()},
        "effective_gbps": rates, "ratio_to_contiguous": {n: r / rates["contiguous"] for n, r in rates.items()},
    }


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args)
    with cpu_threads(args) as threads:
        return {**_run(args, device), "threads": threads}


def _run(args: argparse.Namespace, device: torch.device) -> dict:
    shape = check_preset(args.preset, device)
    if not 1 <= args.chunks <= 64:
        raise ValueError(f"--chunks={args.chunks} is out of range: allowed 1 <= chunks <= 64")
    cfg = WorldKVConfig(keep_ratio=args.keep_ratio)
    page_sizes = sweep_page_sizes(args.page_sizes, shape)
    engine = TransferEngine.for_config(cfg, device)
    points = _sweep(shape, page_sizes, args, device, engine, shape.chunk_tokens)
    print_table(f"offload: {shape.name}, {args.chunks} chunk(s) of {shape.chunk_tokens} tokens, pages -> bank, "
                f"{device.type} (ratios x are to the contiguous copy)", SWEEP_HEADERS, [sweep_row(p) for p in points])
    comp = _compressed(shape, cfg, args, device, engine)
    print_table(
        f"offload with compression (keep_ratio {cfg.keep_ratio}: {comp['kept_tokens']}/{comp['tokens']} tokens kept), "
        "effective GB/s of the uncompressed chunk",
        ("method", "time ms", "effective GB/s", "x contiguous"),
        [(n, comp["time_s"][n] * 1e3, comp["effective_gbps"][n], comp["ratio_to_contiguous"][n])
         for n in ("contiguous", "ours", "reference")],
    )
    targets, cpu_point = copy_targets("offload", "gather", points, shape, cfg.page_size, device,
                                      lambda big: _sweep(big, [cfg.page_size], args, device, engine, big.chunk_tokens)[0])
    if getattr(args, "plot", None):
        plot_sweep(args.plot, points, f"offload pages -> bank ({shape.name}, {device.type})")
    stats = engine.stats()
    engine.close()
    return {
        "preset": shape.name, "device": device.type, "chunks": args.chunks, "tokens_per_chunk": shape.chunk_tokens,
        "repeats": args.repeats, "warmup": args.warmup, "kernel_threshold_bytes": cfg.copy_kernel_threshold_bytes,
        "sweep": points, "compressed": comp, "cpu_target_point": cpu_point, "targets": targets,
        "engine_paths": stats["paths"],
    }
