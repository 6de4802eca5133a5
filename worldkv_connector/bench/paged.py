"""The paged layout the transfer benchmarks (offload, reinsert, overlap) move data in: per-layer
pools with shuffled pages and a bank of slots, plus the fragment-size sweep that times one move
five ways and the copy targets of offload and reinsert.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Sequence

import torch

from worldkv_connector.bank import Bank
from worldkv_connector.bench.common import FLUSH_BYTES, gbps, measure_many, parse_sizes, print_targets, save_plot, target
from worldkv_connector.shapes import KVShape, get_preset
from worldkv_connector.transfer import LayerPlans, PagePools, TransferEngine, TransferJob, page_lens_of, plan_layer_copies

__all__ = [
    "PagedLayout", "flat", "cpu_target_shape", "submit_layers", "time_copies", "SWEEP_HEADERS", "sweep_row",
    "sweep_page_sizes", "plot_sweep", "copy_targets",
]

_KIB = 1024


def flat(t: torch.Tensor, numel: int) -> torch.Tensor:
    """1-d view of ``numel`` elements of ``t``'s storage from ``t``'s first element."""
    out = t.new_empty(0)
    return out.set_(t.untyped_storage(), t.storage_offset(), (numel,))


class PagedLayout:
    """``num_chunks`` chunks of ``tokens`` tokens in paged pools on ``device`` plus a bank of slots.

    pools: [L, 2, num_pages, page_size, H, D] (``pools[l]`` is one layer's [2, num_pages, ...]),
    shape's dtype, ``device``; each chunk's pages are scattered (shuffled page ids), as a block
    manager hands them out after a while. bank: one slot per chunk, ``[L, 2, tokens, H, D]`` per
    slot, host memory (pinned when CUDA is present) or device memory for ``bank_tier='gpu'``.
    """

    def __init__(self, shape: KVShape, page_size: int, tokens: int, num_chunks: int, device: torch.device,
                 *, seed: int = 0, bank_tier: str = "cpu") -> None:
        self.shape, self.page_size, self.tokens, self.num_chunks = shape, page_size, tokens, num_chunks
        self.device = device
        self.pages_per_chunk = -(-tokens // page_size)
        num_pages = num_chunks * self.pages_per_chunk
        gen = torch.Generator().manual_seed(seed)
        dims = (shape.num_layers, 2, num_pages, page_size, shape.num_kv_heads, shape.head_dim)
        self.pools = torch.empty(dims, dtype=shape.torch_dtype, device=device)
        self.pools.fill_(0.5)  # touch every page now: no first-use page faults inside the timings
        self._page_pools = PagePools(list(self.pools.unbind(0)))  # checked once, as a worker does
        perm = torch.randperm(num_pages, generator=gen).tolist()
        self.page_ids = [perm[c * self.pages_per_chunk:(c + 1) * self.pages_per_chunk] for c in range(num_chunks)]
        self.bank = Bank(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                         dtype=shape.torch_dtype, slot_tokens=tokens,
                         capacity_bytes=num_chunks * shape.chunk_bytes(tokens), tier=bank_tier,
                         device=device if bank_tier == "gpu" else None)
        for c in range(num_chunks):
            self.bank.reserve(c, tokens)
            self.bank.view(c).fill_(float(c))

    @property
    def chunk_bytes(self) -> int:
        return self.shape.chunk_bytes(self.tokens)

    @property
    def fragment_bytes(self) -> int:
        """Bytes of one full page of one layer's K (or V): one copy fragment."""
        return self.shape.page_bytes(self.page_size)

    def pairs(self, chunks: Sequence[int], *, to_bank: bool, page_ids: dict[int, list[int]] | None = None):
        """(srcs, dsts) of moving ``chunks`` between their pages and their bank slots, one pair per
        (chunk, layer, K/V, page); the last page of a row may be partial. ``page_ids`` overrides
        where a chunk's pages are (reinsertion into freshly allocated pages)."""
        pages_side, bank_side = [], []
        ps, t = self.page_size, self.tokens
        for c in chunks:
            ids = self.page_ids[c] if page_ids is None else page_ids[c]
            slot = self.bank.view(c)  # [L, 2, T, H, D]
            for layer in range(self.shape.num_layers):
                for kv in range(2):
                    for j, pid in enumerate(ids):
                        n = min(ps, t - j * ps)
                        pages_side.append(self.pools[layer, kv, pid, :n])
                        bank_side.append(slot[layer, kv, j * ps:j * ps + n])
        return (pages_side, bank_side) if to_bank else (bank_side, pages_side)

    def plan(self, chunks: Sequence[int], *, to_bank: bool, page_ids: dict[int, list[int]] | None = None) -> LayerPlans:
        """The same copies as :meth:`pairs`, planned as the connector plans them
        (``plan_layer_copies``: address arrays, one plan per layer)."""
        lens = page_lens_of(self.tokens, self.page_size)
        ids = [self.page_ids[c] if page_ids is None else page_ids[c] for c in chunks]
        return plan_layer_copies(self._page_pools, [self.bank.view(c) for c in chunks], ids, [lens] * len(ids),
                                 to_slot=to_bank)

    def contiguous_pair(self, nbytes: int, *, to_bank: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One contiguous pages-memory <-> bank-memory pair of ``nbytes`` (the practical peak)."""
        numel = nbytes // self.shape.itemsize
        pages, bank = flat(self.pools, numel), flat(self.bank.slot_view(0), numel)
        return (pages, bank) if to_bank else (bank, pages)

    def close(self) -> None:
        self.bank.close()


def cpu_target_shape(page_size: int) -> KVShape:
    """A CPU-sized layout whose page of one layer's K is a wan-1.3b page (192 KiB at 64 tokens):
    wan-1.3b's heads and dtype, fewer layers and tokens so it fits the CPU memory limit."""
    wan = get_preset("wan-1.3b")
    return dataclasses.replace(wan, name="wan-1.3b-page", num_layers=2, frame_tokens=4 * page_size)


def kib(nbytes: float) -> float:
    return nbytes / _KIB


def nearest_point(points: Sequence[dict], fragment_bytes: int, key: str = "fragment_bytes") -> dict:
    """The sweep point whose ``key`` (mean fragment or page bytes) is closest, in log scale."""
    return min(points, key=lambda p: abs(math.log(p[key] / fragment_bytes)))


def submit_layers(engine: TransferEngine, kind: str, plans: LayerPlans) -> list[TransferJob]:
    """The step's jobs, one per layer, submitted as the connector's load path does
    (``TransferEngine.submit_layers``); waits for all and raises if a job failed."""
    jobs = engine.submit_layers(kind, plans)
    for job in jobs:
        engine.wait(job)
    engine.poll()  # drop the reports: the figure is the time, not the job list
    for job in jobs:
        if job.error:
            raise RuntimeError(f"transfer job failed: {job.error}")
    return jobs


def time_copies(layout: PagedLayout, chunks: Sequence[int], *, to_bank: bool, engine: TransferEngine,
                reference: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Time one move of ``chunks`` five ways: ours (the connector's path: planned with
    ``plan_layer_copies`` inside the timing, ``submit_layers``: one job per layer, path chosen per
    job), pairs (the engine's tensor-pair
    ``submit``), one contiguous copy of the same bytes between the same memories, a per-fragment
    copy loop, and the reference implementation's style (``reference``). GB/s and ratios to the
    contiguous copy."""
    srcs, dsts = layout.pairs(chunks, to_bank=to_bank)
    nbytes = sum(s.numel() * s.element_size() for s in srcs)
    kind = "store" if to_bank else "load"
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    jobs: list = []

    def run_job(job) -> None:
        engine.wait(job)
        engine.poll()  # drop the report: the figure is the time, not the job list
        if job.error:
            raise RuntimeError(f"transfer job failed: {job.error}")

    def ours() -> None:
        jobs[:] = submit_layers(engine, kind, layout.plan(chunks, to_bank=to_bank))

    def pairs() -> None:
        run_job(engine.submit(kind, srcs, dsts))

    big_src, big_dst = layout.contiguous_pair(nbytes, to_bank=to_bank)

    def contiguous() -> None:
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            big_dst.copy_(big_src, non_blocking=cuda)

    def loop() -> None:
        # one copy call per fragment, as a per-block cudaMemcpyAsync offloader issues them
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for s, d in zip(srcs, dsts):
                d.copy_(s, non_blocking=cuda)

    times = measure_many({"contiguous": contiguous, "ours": ours, "pairs": pairs, "loop": loop,
                          "reference": reference}, device,
                         warmup=warmup, repeats=repeats, flush_bytes=min(FLUSH_BYTES, 4 * nbytes))
    rates = {name: gbps(nbytes, t.median_s) for name, t in times.items()}
    return {
        "page_size": layout.page_size,
        "page_bytes": layout.fragment_bytes,
        # mean bytes per fragment: a page larger than the chunk holds only the chunk's tokens
        "fragment_bytes": nbytes / len(srcs),
        "fragment_kib": kib(nbytes / len(srcs)),
        "bytes": nbytes,
        "fragments": len(srcs),
        "runs": sum(j.num_fragments for j in jobs) if jobs else None,
        "path": jobs[0].path if jobs else None,
        "time_s": {n: t.median_s for n, t in times.items()},
        "gbps": rates,
        "ratio_to_contiguous": {n: r / rates["contiguous"] for n, r in rates.items()},
        "ours_over_loop": rates["ours"] / rates["loop"],
    }


SWEEP_HEADERS = ("page", "frag KiB", "frags", "runs", "path", "contig GB/s", "ours GB/s", "ours x", "pairs x",
                 "loop GB/s", "loop x", "ref GB/s", "ref x", "ours/loop")


def sweep_row(p: dict) -> tuple:
    g, r = p["gbps"], p["ratio_to_contiguous"]
    return (p["page_size"], p["fragment_kib"], p["fragments"], p["runs"], p["path"], g["contiguous"], g["ours"],
            r["ours"], r["pairs"], g["loop"], r["loop"], g["reference"], r["reference"], p["ours_over_loop"])


def sweep_page_sizes(text: str | None, shape: KVShape) -> list[int]:
    """--page-sizes, or the default sweep plus the page size whose fragment is about 16 KiB (the
    size the per-fragment-loop target is defined at)."""
    if text:
        return parse_sizes(text, "--page-sizes")
    near_16k = max(1, round(16 * _KIB / shape.token_bytes))
    return sorted({16, 32, 64, 128, 256, near_16k})


def plot_sweep(path: str, points: Sequence[dict], title: str) -> str:
    xs = [p["fragment_kib"] for p in points]
    series = {name: (xs, [p["gbps"][name] for p in points])
              for name in ("contiguous", "ours", "pairs", "loop", "reference")}
    return save_plot(path, series, xlabel="fragment (KiB, one page of one layer's K)", ylabel="GB/s", title=title)


def copy_targets(what: str, verb: str, points: Sequence[dict], shape: KVShape, page_size: int,
                 device: torch.device, cpu_point: Callable[[KVShape], dict]) -> tuple[list[dict], dict | None]:
    """Print and return the targets shared by ``offload`` and ``reinsert`` (issue "Benchmarks").

    what: "offload" or "reinsert"; verb: "gather" or "scatter" (the CPU target's wording);
    points: the fragment-size sweep; cpu_point(shape): measures one sweep point for the CPU target's
    192 KiB layout (called only without CUDA). Returns (targets, that CPU point or None).
    """
    cuda = device.type == "cuda"
    at_config = nearest_point(points, shape.page_bytes(page_size), key="page_bytes")
    at_16k = nearest_point(points, 16 * 1024)
    targets = [
        target(f"{what} ours / contiguous pinned copy", at_config["ratio_to_contiguous"]["ours"], ">=", 0.9,
               applies=cuda and shape.name == "wan-1.3b",
               note=f"GPU, wan-1.3b layout; here {shape.name} page {at_config['page_size']}"),
        target(f"{what} ours / per-fragment loop at 16 KiB", at_16k["ours_over_loop"], ">=", 5.0, applies=cuda,
               note=f"GPU; measured at {at_16k['fragment_kib']:.1f} KiB fragments"),
    ]
    point = None
    if not cuda:
        big = cpu_target_shape(page_size)
        point = cpu_point(big)
        targets.append(target(f"paged {verb} / contiguous copy at 192 KiB fragments (CPU)",
                              point["ratio_to_contiguous"]["ours"], ">=", 0.8, applies=True,
                              note=f"{big.name}: {point['fragment_kib']:.0f} KiB fragments, "
                                   f"{point['bytes'] / 1e6:.1f} MB"))
    print_targets(targets)
    if not cuda:
        print("note: on the CPU every path is a synchronous memcpy; the GPU targets need a CUDA device.")
    return targets, point
