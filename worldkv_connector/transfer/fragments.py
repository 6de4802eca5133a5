"""Copy plans as address arrays: thousands of page fragments planned with numpy, not a Python loop.

A reinsertion of k=6 compressed Wan-1.3B chunks is 6 x 30 layers x 2 x 37 pages = 13,320
fragments. Submitting them as tensor pairs costs a few microseconds of Python each (tens of
milliseconds per step, more than the copy itself at PCIe speed); planning them as arrays of
addresses costs microseconds in all. A ``FragmentPlan`` carries the addresses and the tensors they
point into: ``plan_fragments`` checks every range lies inside one of those tensors' storages, and
the engine keeps them alive until the copy ran. Page <-> bank-row plans are built by
``layer_plan.plan_layer_copies`` (one plan per layer of a step).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from worldkv_connector.transfer.addresses import as_u64, run_heads

__all__ = ["FragmentPlan", "plan_fragments", "merge_fragment_arrays", "host_copy_runs", "HOST_COPY", "copy_runs_by_view",
           "translate_runs"]


@dataclass(eq=False)
class FragmentPlan:
    """Copy descriptors: ``sizes[i]`` bytes from address ``src[i]`` to ``dst[i]`` (uint64 [F]).

    ``keep``: the tensors the addresses point into. ``src_store`` / ``dst_store``: index into
    ``storages`` of the storage holding each fragment's side; ``storages``: ``(base, device)``.
    Treated as immutable once built (not frozen: a step builds one per layer, and a frozen
    dataclass's ``__init__`` costs about twice as much).
    """

    src: np.ndarray
    dst: np.ndarray
    sizes: np.ndarray
    keep: tuple
    storages: tuple
    src_store: np.ndarray
    dst_store: np.ndarray
    merged: bool = False  # runs already merged (``layer_plan`` plans): the engine skips merging
    pairs: int | None = None  # page fragments described before merging (None: one per entry)
    total: int | None = None  # the payload bytes, when the planner already has them (saves a reduction per job)

    @property
    def nbytes(self) -> int:
        return int(self.sizes.sum()) if self.total is None else self.total

    @property
    def num_fragments(self) -> int:
        """Page fragments the plan moves (before any merging into runs)."""
        return int(self.sizes.shape[0]) if self.pairs is None else self.pairs

    def dst_views(self) -> list[torch.Tensor]:
        """One uint8 tensor viewing each fragment's destination bytes (for tests and diagnostics)."""
        owners = _storage_tensors(self)
        return [_bytes(owners[int(i)], int(d), int(n)) for d, n, i in zip(self.dst, self.sizes, self.dst_store)]

    def host_storages(self) -> list[int]:
        """Indices into ``storages`` of host (CPU) memory the plan touches."""
        used = np.union1d(self.src_store, self.dst_store)
        return [int(i) for i in used if self.storages[i][1].type == "cpu"]


def _locate(name: str, ptrs: np.ndarray, sizes: np.ndarray, bases: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Index of the storage holding each ``[ptr, ptr + size)``; ValueError naming the first stray."""
    idx = np.searchsorted(bases, ptrs, side="right").astype(np.int64) - 1
    ok = idx >= 0
    ok[ok] &= ptrs[ok] + sizes[ok] <= ends[idx[ok]]
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{name}[{i}]: bytes [{int(ptrs[i]):#x}, {int(ptrs[i] + sizes[i]):#x}) lie outside every "
                         "tensor in keep: pass the tensors the addresses point into")
    return idx


def plan_fragments(src, dst, sizes, keep: Sequence[torch.Tensor]) -> FragmentPlan:
    """Validate raw descriptors against the tensors they address.

    src, dst, sizes: [F] non-negative ints (addresses and byte counts); keep: the tensors whose
    storages hold every range (CPU or CUDA). Empty fragments are dropped.
    """
    src, dst, sizes = as_u64("src", src), as_u64("dst", dst), as_u64("sizes", sizes)
    if not (src.shape == dst.shape == sizes.shape):
        raise ValueError(f"src/dst/sizes: expected equal lengths, got {src.size}, {dst.size}, {sizes.size}")
    if not keep or not all(isinstance(t, torch.Tensor) for t in keep):
        raise ValueError("keep: expected a non-empty sequence of the tensors the addresses point into")
    found: dict[int, tuple[int, torch.device]] = {}
    for t in keep:
        st = t.untyped_storage()
        found[st.data_ptr()] = (st.nbytes(), t.device)
    bases_sorted = sorted(found)
    bases = np.asarray(bases_sorted, dtype=np.uint64)
    ends = bases + np.asarray([found[b][0] for b in bases_sorted], dtype=np.uint64)
    nonempty = sizes > 0
    src, dst, sizes = src[nonempty], dst[nonempty], sizes[nonempty]
    src_store = _locate("src", src, sizes, bases, ends)
    dst_store = _locate("dst", dst, sizes, bases, ends)
    storages = tuple((b, found[b][1]) for b in bases_sorted)
    return FragmentPlan(src, dst, sizes, tuple(keep), storages, src_store, dst_store)


def merge_fragment_arrays(plan: FragmentPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge fragments that continue each other on both sides within the same storages.

    Returns ``(src, dst, sizes, head)`` where ``head`` indexes each run's first fragment (its
    storages are those of the whole run).
    """
    src, dst, sizes = plan.src, plan.dst, plan.sizes
    if plan.merged or src.size <= 1:
        return src, dst, sizes, np.arange(src.size)
    head = run_heads(src, dst, sizes, plan.src_store, plan.dst_store)
    return src[head], dst[head], np.add.reduceat(sizes, head).astype(np.uint64), head


# --- executing merged runs of a plan (the engine picks which) ----------------------------------
try:  # csrc/host_copy.c, built by the install (optional: it needs a C compiler)
    from worldkv_connector.csrc import _host_copy
except ImportError:  # pragma: no cover - exercised only on installs without a compiler
    _host_copy = None

# which host copy loop runs: "compiled" (threads, streaming stores) or "memmove" (one run at a time)
HOST_COPY = "compiled" if _host_copy is not None else "memmove"


def host_copy_runs(src: np.ndarray, dst: np.ndarray, sizes: np.ndarray, threads: int | None = None) -> None:
    """Host-to-host copies by address (the CPU path; ranges were checked by ``plan_fragments``).

    src, dst: uint64 arrays of R addresses (any shape, read in C order: ``LayerPlans``' [L, R]);
    sizes: [R], or [R / k] repeated k times (a step's layers share one layer's run sizes).
    threads: copy threads for a large job (default torch's intra-op thread count, so
    ``torch.set_num_threads`` governs copies as it governs compute). Without the compiled loop (an
    install without a C compiler) one ``ctypes.memmove`` per run.
    """
    if _host_copy is None:
        if src.size != dst.size or (src.size % sizes.size if sizes.size else src.size):
            raise ValueError(f"src, dst, sizes: expected src and dst of one length, a multiple of sizes' length, "
                             f"got {src.size}, {dst.size}, {sizes.size} values")
        src, dst = src.reshape(-1), dst.reshape(-1)
        if src.size != sizes.size:
            sizes = np.tile(sizes, src.size // sizes.size)
        for s, d, n in zip(src.tolist(), dst.tolist(), sizes.tolist()):
            ctypes.memmove(d, s, n)
        return
    n = torch.get_num_threads() if threads is None else threads
    _host_copy.copy_runs(_u64(src), _u64(dst), _u64(sizes), min(max(int(n), 1), _host_copy.MAX_THREADS))


_U64 = np.dtype(np.uint64)


def _u64(a: np.ndarray) -> np.ndarray:
    # `is`: numpy's built-in dtypes are singletons, and `==` costs several times more from cold caches
    return a if a.dtype is _U64 and a.flags.c_contiguous else np.ascontiguousarray(a, dtype=np.uint64)


def _storage_tensors(plan: FragmentPlan) -> list[torch.Tensor]:
    by_base = {t.untyped_storage().data_ptr(): t for t in plan.keep}
    return [by_base[base] for base, _ in plan.storages]


def copy_runs_by_view(plan: FragmentPlan, src, dst, sizes, head, non_blocking: bool) -> None:
    """One ``copy_`` per run through byte views (the loop path: any memory, any driver)."""
    owners = _storage_tensors(plan)
    for s, d, n, h in zip(src.tolist(), dst.tolist(), sizes.tolist(), head.tolist()):
        so, do = owners[plan.src_store[h]], owners[plan.dst_store[h]]
        _bytes(do, d, n).copy_(_bytes(so, s, n), non_blocking=non_blocking)


def _bytes(t: torch.Tensor, ptr: int, n: int) -> torch.Tensor:
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, ptr - st.data_ptr(), (n,))


def translate_runs(plan: FragmentPlan, src, dst, head, mapping: dict[int, int | None]):
    """Device-visible addresses of the runs for the SM copy kernel: host storages are shifted by
    their mapped device base (identity under unified addressing). ``mapping``: host base -> device
    base, every host storage of the plan mapped."""
    delta = np.zeros(len(plan.storages), dtype=np.int64)
    for i, (base, device) in enumerate(plan.storages):
        if device.type == "cpu":
            delta[i] = int(mapping[base]) - int(base)
    src_dev = (src.astype(np.int64) + delta[plan.src_store[head]]).astype(np.uint64)
    dst_dev = (dst.astype(np.int64) + delta[plan.dst_store[head]]).astype(np.uint64)
    return src_dev, dst_dev
