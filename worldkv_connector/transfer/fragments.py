"""Copy plans as address arrays: thousands of page fragments planned with numpy, not a Python loop.

A reinsertion of k=6 compressed Wan-1.3B chunks is 6 x 30 layers x 2 x 37 pages = 13,320
fragments. Submitting them as tensor pairs costs a few microseconds of Python each (tens of
milliseconds per step, more than the copy itself at PCIe speed); planning them as arrays of
addresses costs microseconds in all. A ``FragmentPlan`` carries the addresses and the tensors they
point into: ``plan_fragments`` checks every range lies inside one of those tensors' storages, and
the engine keeps them alive until the copy ran.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from worldkv_connector.addresses import as_u64, run_heads

__all__ = ["FragmentPlan", "plan_fragments", "page_fragments", "concat_plans", "merge_fragment_arrays", "memmove_runs",
           "copy_runs_by_view", "translate_runs"]


@dataclass(frozen=True, eq=False)
class FragmentPlan:
    """Copy descriptors: ``sizes[i]`` bytes from address ``src[i]`` to ``dst[i]`` (uint64 [F]).

    ``keep``: the tensors the addresses point into. ``src_store`` / ``dst_store``: index into
    ``storages`` of the storage holding each fragment's side; ``storages``: ``(base, device)``.
    """

    src: np.ndarray
    dst: np.ndarray
    sizes: np.ndarray
    keep: tuple
    storages: tuple
    src_store: np.ndarray
    dst_store: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.sizes.sum())

    @property
    def num_fragments(self) -> int:
        return int(self.sizes.shape[0])

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


def concat_plans(plans: Sequence[FragmentPlan]) -> FragmentPlan:
    """One plan doing every plan's copies in order (e.g. all chunks of a step: one job, one batch)."""
    if not plans:
        raise ValueError("concat_plans: expected at least one plan")
    keep = tuple({id(t): t for p in plans for t in p.keep}.values())
    return plan_fragments(*(np.concatenate([getattr(p, f) for p in plans]) for f in ("src", "dst", "sizes")), keep)


def merge_fragment_arrays(plan: FragmentPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge fragments that continue each other on both sides within the same storages.

    Returns ``(src, dst, sizes, head)`` where ``head`` indexes each run's first fragment (its
    storages are those of the whole run).
    """
    src, dst, sizes = plan.src, plan.dst, plan.sizes
    if src.size <= 1:
        return src, dst, sizes, np.arange(src.size)
    head = run_heads(src, dst, sizes, plan.src_store, plan.dst_store)
    return src[head], dst[head], np.add.reduceat(sizes, head).astype(np.uint64), head


def _pool_planes(pools) -> tuple[np.ndarray, torch.Tensor, tuple]:
    """Base address of every (layer, K/V) plane [L*2], one sample plane, and the tensors to keep.

    pools: [L, 2, num_pages, page_size, H, D] tensor or a sequence of L [2, num_pages, ...] tensors.
    """
    if isinstance(pools, torch.Tensor):
        if pools.dim() != 6 or pools.shape[1] != 2:
            raise ValueError(f"pools: expected [L, 2, num_pages, page_size, H, D], got {tuple(pools.shape)}")
        item = pools.element_size()
        planes = np.arange(pools.shape[0] * 2, dtype=np.uint64)
        offsets = (planes // np.uint64(2)) * np.uint64(pools.stride(0) * item) + (planes % np.uint64(2)) * np.uint64(pools.stride(1) * item)
        return np.uint64(pools.data_ptr()) + offsets, pools[0], (pools,)
    layers = list(pools)
    if not layers or not all(isinstance(t, torch.Tensor) and t.dim() == 5 and t.shape[0] == 2 for t in layers):
        raise ValueError("pools: expected a [L, 2, num_pages, page_size, H, D] tensor or a sequence of "
                         "[2, num_pages, page_size, H, D] tensors")
    first = layers[0]
    for i, t in enumerate(layers):
        if t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride():
            raise ValueError(f"pools[{i}]: expected shape/dtype/strides of pools[0] {tuple(first.shape)}, got {tuple(t.shape)}")
    kv = first.stride(0) * first.element_size()
    bases = np.asarray([[t.data_ptr(), t.data_ptr() + kv] for t in layers], dtype=np.uint64).reshape(-1)
    return bases, first, tuple(layers)


def page_fragments(pools, page_ids, slot, page_lens=None, *, to_slot: bool = True) -> FragmentPlan:
    """Plan the copy between listed pages of every layer and bank slots, vectorized.

    pools: [L, 2, num_pages, page_size, H, D] or a sequence of L [2, num_pages, page_size, H, D]
    (pages contiguous), any device. slot: one [L, 2, N, H, D] tensor with page_ids [P], or a
    sequence of C such tensors (same shape and strides, e.g. ``Bank.view`` of C chunks) with
    page_ids [C, P]; contiguous [N, H, D] rows per (layer, K/V), the pools' dtype. page_lens: [P]
    valid tokens per page, shared by all chunks (default: whole pages); N >= sum(page_lens). Page i
    fills slot rows ``[sum(page_lens[:i]), sum(page_lens[:i+1]))`` of every (layer, K/V); fragments
    are ordered chunk, layer, K/V, page. ``to_slot=False`` plans the reverse (a reinsertion).
    """
    bases, plane, keep = _pool_planes(pools)
    num_planes = bases.size
    num_pages, page_size, heads, head_dim = plane.shape[1:]
    if plane.stride()[1:] != (page_size * heads * head_dim, heads * head_dim, head_dim, 1):
        raise ValueError(f"pools: expected contiguous pages (strides (..., {heads * head_dim}, {head_dim}, 1)), "
                         f"got {plane.stride()}")
    slots = [slot] if isinstance(slot, torch.Tensor) else list(slot)
    ids = np.asarray(page_ids.cpu().numpy() if isinstance(page_ids, torch.Tensor) else page_ids)
    if ids.ndim != (1 if isinstance(slot, torch.Tensor) else 2) or (ids.ndim == 2 and ids.shape[0] != len(slots)):
        raise ValueError(f"page_ids: expected [P] with one slot or [C, P] with C slots, got shape {ids.shape} "
                         f"for {len(slots)} slot(s)")
    ids = as_u64("page_ids", ids.reshape(-1)).reshape(len(slots), -1)
    if ids.size and int(ids.max()) >= num_pages:
        raise ValueError(f"page_ids: expected ids in [0, {num_pages}), got max {int(ids.max())}")
    count = ids.shape[1]
    lens = np.full(count, page_size, dtype=np.uint64) if page_lens is None else as_u64("page_lens", page_lens)
    if lens.shape != (count,):
        raise ValueError(f"page_lens: expected shape ({count},) (pages per chunk), got {lens.shape}")
    if lens.size and int(lens.max()) > page_size:
        raise ValueError(f"page_lens: every value must lie in [0, page_size={page_size}], got max {int(lens.max())}")
    total = int(lens.sum())
    first = slots[0] if slots else None
    for i, t in enumerate(slots):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or tuple(t.shape[:2]) != (num_planes // 2, 2) \
                or tuple(t.shape[3:]) != (heads, head_dim) or t.shape[2] < total:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"slot[{i}]: expected [{num_planes // 2}, 2, N >= {total}, {heads}, {head_dim}], got {shape}")
        if t.dtype != plane.dtype:
            raise ValueError(f"slot[{i}]: expected dtype {plane.dtype} (the pools'), got {t.dtype}")
        if t.stride() != first.stride() or t.stride()[2:] != (heads * head_dim, head_dim, 1):
            raise ValueError(f"slot[{i}]: expected contiguous [N, H, D] rows and the strides of slot[0], got {t.stride()}")
    if not slots:
        raise ValueError("slot: expected at least one slot tensor")
    item = plane.element_size()
    row = heads * head_dim * item  # bytes of one token
    planes = np.arange(num_planes, dtype=np.uint64)
    slot_plane = (planes // np.uint64(2)) * np.uint64(first.stride(0) * item) + (planes % np.uint64(2)) * np.uint64(first.stride(1) * item)
    slot_base = np.asarray([t.data_ptr() for t in slots], dtype=np.uint64)
    starts = np.cumsum(lens, dtype=np.uint64) - lens  # first slot row of each page
    # [C, planes, P] addresses on both sides
    pool_addr = bases[None, :, None] + ids[:, None, :] * np.uint64(page_size * row)
    slot_addr = slot_base[:, None, None] + slot_plane[None, :, None] + starts[None, None, :] * np.uint64(row)
    sizes = np.broadcast_to(lens * np.uint64(row), pool_addr.shape).reshape(-1)
    pool_addr, slot_addr = pool_addr.reshape(-1), slot_addr.reshape(-1)
    src, dst = (pool_addr, slot_addr) if to_slot else (slot_addr, pool_addr)
    return plan_fragments(src, dst, sizes, keep=(*keep, *slots))


# --- executing merged runs of a plan (the engine picks which) ----------------------------------
def memmove_runs(src: np.ndarray, dst: np.ndarray, sizes: np.ndarray) -> None:
    """Host-to-host copies by address (the CPU path; ranges were checked by ``plan_fragments``)."""
    for s, d, n in zip(src.tolist(), dst.tolist(), sizes.tolist()):
        ctypes.memmove(d, s, n)


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
