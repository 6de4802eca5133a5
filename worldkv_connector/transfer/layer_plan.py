"""One step's page <-> bank-row copies, planned once as numpy address arrays, submitted per layer.

This is the one planner of the project: the connector's load path (bank rows -> pages), its
benchmarks and ``fragments.page_fragments`` all build their copies here. A step's copies are the
same in every layer up to the layer's base addresses, so the fragments (chunk x K/V x page) are
computed and merged once, for layer 0, and layer ``l``'s addresses are layer 0's moved by that
layer's pool base and the slots' layer stride. ``TransferEngine.submit_layers`` makes one job per
layer of it (``LayerPlans.layer(l)``: a ready ``FragmentPlan`` of one layer); nothing per page is a
Python object. Every range is checked once, at planning time, by construction: page ids inside
the pool, page lengths inside a page, rows inside each slot. Two builders make the same plan: the
runs built in C (``plan_runs`` in ``csrc/host_copy.c``) where the extension is built, numpy
otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from worldkv_connector.checks import is_int
from worldkv_connector.transfer import fragments
from worldkv_connector.transfer.addresses import as_u64, run_heads
from worldkv_connector.transfer.fragments import FragmentPlan

__all__ = ["LayerPlans", "PagePools", "plan_layer_copies", "page_fragments", "page_lens_of"]

# The compiled run builder (csrc/host_copy.c), None in an install without a C compiler: then numpy
# builds every plan. Both give the same plan (tests hold them to it); the compiled one costs a
# fraction from cold caches, as right after compute, where each numpy call costs microseconds.
_PLAN_RUNS = getattr(fragments._host_copy, "plan_runs", None)


_LENS: dict[tuple[int, int], np.ndarray] = {}  # (num_tokens, page_size) -> page_lens_of's array
_CHECKED_LENS: dict[int, tuple[np.ndarray, list[int], int]] = {}  # id(that array) -> (it, its values, their sum)
_MAX_LENS = 256


def page_lens_of(num_tokens: int, page_size: int) -> np.ndarray:
    """Valid tokens of each page of a chunk of ``num_tokens``: full pages, the last one partial.
    A read-only array, shared by every call with the same arguments (a step plans many chunks of
    one size: building the array again costs more than the plan's own arithmetic), and known to
    the compiled builder's checks as already checked."""
    key = (int(num_tokens), int(page_size))
    lens = _LENS.get(key)
    if lens is None:
        if len(_LENS) >= _MAX_LENS:  # arrays handed out before stay valid, only no longer known
            _LENS.clear()
            _CHECKED_LENS.clear()
        full, last = divmod(key[0], key[1])
        lens = np.full(full + (1 if last else 0), key[1], dtype=np.uint64)
        if last:
            lens[-1] = last
        lens.setflags(write=False)
        _LENS[key] = lens
        _CHECKED_LENS[id(lens)] = (lens, lens.tolist(), key[0])  # the entry holds the array: its id stays its own
    return lens


@dataclass(eq=False)
class LayerPlans:
    """Merged copy runs of every layer of one step. src, dst: [L, R] uint64 addresses; sizes: [R]
    bytes; src_store / dst_store: [R] index into ``storages[l]``, layer l's table: its pool's
    storage, then the step's slot storages (so ``storages[0]`` lists every device the step touches:
    the pools share one); keep[l]: layer l's tensors. Treated as immutable once built (not frozen:
    a frozen dataclass's ``__init__`` costs about twice as much, and a step builds one)."""

    src: np.ndarray
    dst: np.ndarray
    sizes: np.ndarray
    src_store: np.ndarray
    dst_store: np.ndarray
    storages: tuple
    keep: tuple
    num_pairs: int  # fragments of one layer before merging
    layer_bytes: int  # bytes one layer moves (sizes' sum, from the builder: a numpy reduction costs ~20 us cold)

    @property
    def num_layers(self) -> int:
        return int(self.src.shape[0])

    @property
    def num_runs(self) -> int:
        return int(self.sizes.shape[0])

    def layer(self, layer: int) -> FragmentPlan:
        """The ``FragmentPlan`` of layer ``layer`` (views of the step's arrays, no copy)."""
        return FragmentPlan(self.src[layer], self.dst[layer], self.sizes, self.keep[layer], self.storages[layer],
                            self.src_store, self.dst_store, merged=True, pairs=self.num_pairs, total=self.layer_bytes)

    def all_layers(self) -> FragmentPlan:
        """Every layer's runs in one plan (layer-major), for a single job over all layers."""
        bases: dict[int, torch.device] = {}
        for table in self.storages:
            for base, dev in table:
                bases.setdefault(base, dev)
        index = {b: i for i, b in enumerate(bases)}
        remap = [np.asarray([index[b] for b, _ in table], dtype=np.int64) for table in self.storages]
        keep = tuple({id(t): t for k in self.keep for t in k}.values())
        return FragmentPlan(self.src.reshape(-1), self.dst.reshape(-1), np.tile(self.sizes, self.num_layers), keep,
                            tuple(bases.items()), np.concatenate([r[self.src_store] for r in remap]),
                            np.concatenate([r[self.dst_store] for r in remap]), pairs=self.num_pairs * self.num_layers)


def _layers_of(pools) -> list[torch.Tensor]:
    if isinstance(pools, torch.Tensor):
        if pools.dim() != 6 or pools.shape[1] != 2:
            raise ValueError(f"pools: expected [L, 2, num_pages, page_size, H, D], got {tuple(pools.shape)}")
        return list(pools.unbind(0))
    layers = list(pools)
    if not layers or not all(isinstance(t, torch.Tensor) and t.dim() == 5 and t.shape[0] == 2 for t in layers):
        raise ValueError("pools: expected a [L, 2, num_pages, page_size, H, D] tensor or a non-empty sequence of "
                         "[2, num_pages, page_size, H, D] tensors")
    first = layers[0]
    for i, t in enumerate(layers):
        if t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride() or t.device != first.device:
            raise ValueError(f"pools[{i}]: expected the shape/dtype/strides/device of pools[0] {tuple(first.shape)} "
                             f"{first.dtype} {first.device}, got {tuple(t.shape)} {t.dtype} {t.device}")
    return layers


def _flat(name: str, rows: Sequence) -> np.ndarray:
    """Concatenated int64 values of a sequence of int sequences (tuples, lists, arrays, tensors)."""
    parts = [np.asarray(r.cpu() if isinstance(r, torch.Tensor) else r) for r in rows]
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if flat.size and flat.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integers, got dtype {flat.dtype}")
    return flat.astype(np.int64, copy=False)


def _storage(t: torch.Tensor) -> tuple[int, torch.device]:
    return t.untyped_storage().data_ptr(), t.device


class PagePools:
    """The paged pools of every layer, checked once (same shape, dtype, strides, device; contiguous
    pages): their base addresses and storages, reused by every step's plan.

    pools: [L, 2, num_pages, page_size, H, D] or L tensors [2, num_pages, page_size, H, D].
    """

    def __init__(self, pools) -> None:
        self.layers = _layers_of(pools)
        plane = self.layers[0][0]  # [num_pages, page_size, H, D]
        self.num_pages, self.page_size, self.heads, self.head_dim = plane.shape
        if plane.stride()[1:] != (self.heads * self.head_dim, self.head_dim, 1):
            raise ValueError(f"pools: expected contiguous pages (strides (..., {self.heads * self.head_dim}, "
                             f"{self.head_dim}, 1)), got {plane.stride()}")
        self.dtype = plane.dtype
        self.item = plane.element_size()
        self.row = self.heads * self.head_dim * self.item  # bytes of one token of one (layer, K/V)
        self.kv_stride = self.layers[0].stride(0) * self.item
        self.bases = np.asarray([t.data_ptr() for t in self.layers], dtype=np.uint64)
        self.layer_ids = np.arange(len(self.layers), dtype=np.uint64)[:, None]  # [L, 1], times a run's layer stride
        self.storages = [_storage(t) for t in self.layers]


def plan_layer_copies(pools, slots: Sequence[torch.Tensor], page_ids: Sequence, page_lens: Sequence, *,
                      to_slot: bool, k_only: Sequence[bool] | None = None) -> LayerPlans:
    """Plan the copies between chunks' pages and their bank rows, for every layer.

    pools: a ``PagePools``, or [L, 2, num_pages, page_size, H, D] or L tensors [2, num_pages,
    page_size, H, D] (pages contiguous), any device. slots: C tensors [L, 2, N_c, H, D] (e.g. ``Bank.view``; contiguous
    [N, H, D] rows per (layer, K/V)), the pools' dtype. page_ids[c]: [P_c] page ids of chunk c;
    page_lens[c]: [P_c] valid tokens of each page (page i fills rows
    ``[sum(lens[:i]), sum(lens[:i+1]))`` of the slot, ``sum(lens) <= N_c``). Fragments are ordered
    chunk, K/V, page within a layer and merged where both sides continue each other.
    ``to_slot``: pages -> slots (a store) or slots -> pages (a load). ``k_only[c]``: move only
    chunk c's K rows (default: K and V of every chunk).
    """
    pp = pools if isinstance(pools, PagePools) else PagePools(pools)
    slots = list(slots)
    if len(page_ids) != len(slots) or len(page_lens) != len(slots):
        raise ValueError(f"page_ids/page_lens: expected one entry per slot ({len(slots)}), got {len(page_ids)} and "
                         f"{len(page_lens)}")
    if not slots:
        raise ValueError("slots: expected at least one slot tensor")
    if k_only is not None and len(k_only) != len(slots):
        raise ValueError(f"k_only: expected one flag per slot ({len(slots)}), got {len(k_only)}")
    if _PLAN_RUNS is not None:
        return _plan_compiled(pp, slots, page_ids, page_lens, to_slot, k_only)
    return _plan_numpy(pp, slots, page_ids, page_lens, to_slot, k_only)


def _plan_numpy(pp: PagePools, slots: list, page_ids, page_lens, to_slot: bool, k_only) -> LayerPlans:
    """``plan_layer_copies`` in numpy: every page a fragment of arrays, merged by ``run_heads``."""
    num_pages, page_size, item, row = pp.num_pages, pp.page_size, pp.item, pp.row
    ids, lens, counts = _flat("page_ids", page_ids), _flat("page_lens", page_lens), [len(x) for x in page_ids]
    if [len(x) for x in page_lens] != counts:
        c = next(i for i, (a, b) in enumerate(zip(page_ids, page_lens)) if len(a) != len(b))
        raise ValueError(f"page_lens[{c}]: expected shape ({len(page_ids[c])},) (page_ids[{c}]'s), got "
                         f"({len(page_lens[c])},)")
    chunk = np.repeat(np.arange(len(slots)), counts)  # [F0] chunk of each page
    if ids.size and (int(ids.max()) >= num_pages or int(ids.min()) < 0):
        c = int(chunk[np.flatnonzero((ids >= num_pages) | (ids < 0))[0]])
        raise ValueError(f"page_ids[{c}]: expected ids in [0, {num_pages}), got {list(page_ids[c])}")
    if lens.size and (int(lens.max()) > page_size or int(lens.min()) < 0):
        c = int(chunk[np.flatnonzero((lens > page_size) | (lens < 0))[0]])
        raise ValueError(f"page_lens[{c}]: every value must lie in [0, page_size={page_size}], got "
                         f"{list(page_lens[c])}")
    ends = np.cumsum(lens)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))  # index of each chunk's first page
    totals = np.add.reduceat(lens, first) if lens.size else np.zeros(len(slots), dtype=np.int64)
    totals[np.asarray(counts) == 0] = 0
    starts = (ends - lens - np.repeat(ends[first] - lens[first] if lens.size else 0, counts)).astype(np.uint64)
    for c, t in enumerate(slots):
        _check_slot(pp, c, t, int(totals[c]))
    ids, lens = ids.astype(np.uint64), lens.astype(np.uint64)
    # slot storages: index 1.. after the pool's (index 0 of every layer's table)
    slot_bases, store_of = _slot_bases(slots)
    slot_store = np.asarray(store_of, dtype=np.int64)
    slot_ptr = np.asarray([t.data_ptr() for t in slots], dtype=np.uint64)
    slot_layer = np.asarray([t.stride(0) * item for t in slots], dtype=np.uint64)
    slot_kv = np.asarray([t.stride(1) * item for t in slots], dtype=np.uint64)
    # [2, F0] fragments, then ordered chunk, K/V, page (a stable sort keeps page order)
    kv = np.arange(2, dtype=np.uint64)[:, None]
    order = np.argsort((chunk[None, :] * 2 + kv.astype(np.int64)).reshape(-1), kind="stable")
    pool_rel = (kv * np.uint64(pp.kv_stride) + ids[None, :] * np.uint64(page_size * row)).reshape(-1)[order]
    slot0 = (slot_ptr[chunk][None, :] + kv * slot_kv[chunk][None, :] + starts[None, :] * np.uint64(row)).reshape(-1)[order]
    sizes = np.broadcast_to(lens * np.uint64(row), (2, lens.size)).reshape(-1)[order]
    frag_chunk = np.broadcast_to(chunk, (2, chunk.size)).reshape(-1)[order]
    nonempty = sizes > 0
    if k_only is not None:
        frag_kv = np.broadcast_to(np.arange(2)[:, None], (2, chunk.size)).reshape(-1)[order]
        nonempty &= ~(np.asarray(k_only, dtype=bool)[frag_chunk] & (frag_kv == 1))
    pool_rel, slot0, sizes, frag_chunk = pool_rel[nonempty], slot0[nonempty], sizes[nonempty], frag_chunk[nonempty]
    num_pairs = int(sizes.size)
    s_store, step = slot_store[frag_chunk], slot_layer[frag_chunk]
    # a run stays in one slot storage with one layer stride, so every layer's shift is the run's
    head = run_heads(pool_rel, slot0, sizes, s_store, step) if to_slot else run_heads(slot0, pool_rel, sizes, s_store, step)
    sizes = np.add.reduceat(sizes, head).astype(np.uint64) if sizes.size else sizes
    return _assemble(pp, slots, slot_bases, pool_rel[head], slot0[head], sizes, s_store[head], step[head],
                     num_pairs, to_slot)


def _check_slot(pp: PagePools, c: int, t, total: int) -> None:
    nl, heads, head_dim = len(pp.layers), pp.heads, pp.head_dim
    if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.shape[:2] != (nl, 2) \
            or t.shape[3:] != (heads, head_dim) or t.shape[2] < total:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"slot[{c}]: expected [{nl}, 2, N >= {total}, {heads}, {head_dim}], got {shape}")
    if t.dtype != pp.dtype:
        raise ValueError(f"slot[{c}]: expected dtype {pp.dtype} (the pools'), got {t.dtype}")
    if t.stride()[2:] != (heads * head_dim, head_dim, 1):
        raise ValueError(f"slot[{c}]: expected contiguous [N, H, D] rows, got strides {t.stride()}")


def _slot_bases(slots) -> tuple[list, list[int]]:
    """The slots' distinct storages, sorted by base, and each slot's index into every layer's
    storage table (1.. after the pool's, which is index 0)."""
    storages = [_storage(t) for t in slots]  # one untyped_storage() per slot
    bases = sorted(set(storages), key=lambda b: b[0])
    index = {b: i + 1 for i, (b, _) in enumerate(bases)}
    return bases, [index[b] for b, _ in storages]


def _assemble(pp: PagePools, slots, slot_bases, pool_rel, slot0, sizes, s_store, step, num_pairs: int,
              to_slot: bool) -> LayerPlans:
    """Layer 0's merged runs -> every layer's addresses [L, R]: the pool side moves to each layer's
    pool base, the slot side by the run's layer stride."""
    pool_store = np.zeros(sizes.size, dtype=np.int64)
    pool_addr = np.add.outer(pp.bases, pool_rel)
    slot_addr = slot0 + pp.layer_ids * step
    nbytes = int(sizes.sum())
    if to_slot:
        return _layer_plans(pp, slots, slot_bases, pool_addr, slot_addr, sizes, pool_store, s_store, num_pairs, nbytes)
    return _layer_plans(pp, slots, slot_bases, slot_addr, pool_addr, sizes, s_store, pool_store, num_pairs, nbytes)


def _layer_plans(pp: PagePools, slots, slot_bases, src, dst, sizes, src_store, dst_store, num_pairs: int,
                 layer_bytes: int) -> LayerPlans:
    """The step's ``LayerPlans``: every layer's storage table is its pool's storage, then the slots'."""
    shared = tuple(slot_bases)
    storages = tuple((st, *shared) for st in pp.storages)
    keep = ((*pp.layers, *slots),) * len(pp.layers)  # every layer's job keeps the step's tensors alive
    return LayerPlans(src, dst, sizes, src_store, dst_store, storages, keep, num_pairs, layer_bytes)


def _ints(name: str, values) -> Sequence[int]:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.dtype.is_floating_point if isinstance(values, torch.Tensor) else values.dtype.kind not in "iu":
            raise ValueError(f"{name}: expected integers, got dtype {values.dtype}")
        return values.tolist()
    if type(values) in (list, tuple) and set(map(type, values)) <= {int}:  # the common case, checked in C
        return values  # read, never written
    out = list(values)
    for i, v in enumerate(out):
        if not is_int(v):
            raise ValueError(f"{name}: expected integers, got {type(v).__name__}")
        out[i] = int(v)
    return out


def _plan_compiled(pp: PagePools, slots: list, page_ids, page_lens, to_slot: bool, k_only) -> LayerPlans:
    """``plan_layer_copies`` with the runs built in C (``plan_runs``): the checks here, per chunk;
    the fragments, order and merging those of ``_plan_numpy``. Each tensor attribute is read once
    (a read costs microseconds from cold caches), numpy is called a few times per step, not per chunk."""
    num_pages, page_size, row, item = pp.num_pages, pp.page_size, pp.row, pp.item
    nl, heads, head_dim, dtype = len(pp.layers), pp.heads, pp.head_dim, pp.dtype
    row_strides = (heads * head_dim, head_dim, 1)
    devices: dict[int, torch.device] = {}  # slot storage base -> device
    chunks: list[tuple] = []  # (ids, lens, slot ptr, slot storage base, layer step, kv step, 1 = K only or 2)
    last: tuple = (None, None, 0)  # (lens object, its checked int list, its sum): chunks of one size share it
    for c, (t, ids, lens) in enumerate(zip(slots, page_ids, page_lens)):
        if lens is last[0]:
            lens, total = last[1], last[2]
        else:
            known = _CHECKED_LENS.get(id(lens))
            if known is not None and known[0] is lens and (not known[1] or known[1][0] <= page_size):
                obj, lens, total = known  # from page_lens_of: checked when made; its first page is the largest
            else:
                obj, lens = lens, _ints("page_lens", lens)
                if lens and (max(lens) > page_size or min(lens) < 0):
                    raise ValueError(f"page_lens[{c}]: every value must lie in [0, page_size={page_size}], got {lens}")
                total = sum(lens)
            last = (obj, lens, total)
        ids = _ints("page_ids", ids)
        if len(lens) != len(ids):
            raise ValueError(f"page_lens[{c}]: expected shape ({len(ids)},) (page_ids[{c}]'s), got ({len(lens)},)")
        if ids and (max(ids) >= num_pages or min(ids) < 0):
            raise ValueError(f"page_ids[{c}]: expected ids in [0, {num_pages}), got {ids}")
        shape, strides = t.shape, t.stride()
        if len(shape) != 5 or shape[0] != nl or shape[1] != 2 or shape[3] != heads or shape[4] != head_dim \
                or shape[2] < total or t.dtype is not dtype or strides[2:] != row_strides:
            _check_slot(pp, c, t, total)  # raises, naming what is wrong
        ptr = t.data_ptr()
        base = ptr - t.storage_offset() * item  # the storage's first byte (dtype checked: the pools')
        if base not in devices:
            devices[base] = t.device
        chunks.append((ids, lens, ptr, base, strides[0] * item, strides[1] * item,
                       1 if k_only is not None and k_only[c] else 2))
    bases = sorted(devices)  # slot storages: index 1.. after the pool's (index 0 of every layer's table)
    index = {b: i + 1 for i, b in enumerate(bases)}
    buf, num_runs, num_pairs, nbytes = _PLAN_RUNS(chunks, pp.bases, index, page_size, row, pp.kv_stride, to_slot)
    rows = np.frombuffer(buf, dtype=np.uint64).reshape(2 * nl + 3, num_runs)  # src [L], dst [L], sizes, stores [2]
    stores = rows[2 * nl + 1:].view(np.int64)
    return _layer_plans(pp, slots, [(b, devices[b]) for b in bases], rows[:nl], rows[nl:2 * nl], rows[2 * nl],
                        stores[0], stores[1], num_pairs, nbytes)


def page_fragments(pools, page_ids, slot, page_lens=None, *, to_slot: bool = True) -> FragmentPlan:
    """All layers' copies between listed pages and bank slots in one plan (one job).

    pools: as :func:`plan_layer_copies`. slot: one [L, 2, N, H, D] tensor with page_ids [P], or a
    sequence of C such tensors with page_ids [C, P]. page_lens: [P] valid tokens per page shared by
    all chunks (default: whole pages). Built by :func:`plan_layer_copies`, runs ordered layer,
    chunk, K/V, page.
    """
    pp = PagePools(pools)
    num_pages, page_size = pp.num_pages, pp.page_size
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
    return plan_layer_copies(pp, slots, list(ids), [lens] * len(slots), to_slot=to_slot).all_layers()
