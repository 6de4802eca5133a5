"""Worker half of the vLLM connector: owns the bank, the transfer engine and the copies (STYLE §5).

A bank slot is one vLLM block (``slot_tokens = block_size``) of every layer. Copies go through
the core's :class:`~worldkv_connector.transfer.TransferEngine` as address plans
(``submit_plan``): each KV cache layout maps one block of one layer to a few contiguous byte
ranges (:class:`BlockLayout`), and a request's blocks over all layers are planned at once with
numpy. Stores are issued in ``wait_for_save`` (after the forward wrote the step's KV, one job per
request); loads in ``start_load_kv`` (one job per request). Nothing here
knows about poses or compression: prefix KV must come back bit-exact.

Slots: the scheduler half decides them, with a disk tier too: each store names its slot and the
metadata lists the keys evicted and spilled to free slots and the spilled keys this step loads
with the slot each comes back into. The worker applies them in that order (an evicted key a copy
still reads goes once its copy ended), then loads, then reserves exactly the named slots (a taken
one is a skipped, reported store, never an overwrite) and reports. A spilled block the directory
found no slot for is read straight from its verified file; a missing or damaged file is a load
error and the key is reported lost. A hand-built plan (stores without slots: a worker driven on
its own) is planned by a ``local.LocalPlanner``.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worldkv_connector.bank import Bank, apply_moves
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.bank.disk import DiskTier, DiskTierError
from worldkv_connector.transfer import FragmentPlan, TransferEngine, TransferJob, plan_fragments

from .layout import BlockLayout, detect_layout
from .local import LocalPlanner
from .scheduler import BankKey, BlockTransfer, WorldKVConnectorMetadata, WorldKVWorkerMetadata

__all__ = ["BlockLayout", "detect_layout", "WorldKVWorker"]

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    job: TransferJob
    req_id: str
    keys: list[BankKey]
    block_ids: list[int]


class WorldKVWorker:
    """Bank + transfer engine behind the worker-side connector methods.

    config: the validated core config (bank tier, bank_bytes, eviction). block_size: vLLM's block
    size. load_async: report finished loads through ``get_finished`` (True) or finish them inside
    ``start_load_kv`` before the forward (False).
    """

    def __init__(self, config: WorldKVConfig, *, block_size: int, load_async: bool) -> None:
        self.config = config
        self.block_size = block_size
        self.load_async = load_async
        self.bank: Bank | None = None
        self.engine: TransferEngine | None = None
        self.layout: BlockLayout | None = None
        self._layers: list[torch.Tensor] = []
        self._loads: dict[str, list[_Job]] = {}
        self._stores: dict[str, list[_Job]] = {}
        self._loading: set[str] = set()  # requests whose loads are not all reported finished
        self._deferred: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests with a failed load in this step
        self._stored: Counter = Counter()
        self._lost: set = set()
        self._loaded: Counter = Counter()  # key -> loads of it that ended since the last report
        self._directed: set = set()  # evictions being applied for the scheduler half (not reported)
        self._evict_later: set = set()  # directed evictions of entries a copy still read
        self.local: LocalPlanner | None = None  # slot decisions of a worker driven on its own
        self._warned_load_error = False
        self.totals: Counter = Counter()  # cumulative, see _count
        self._interval: Counter = Counter()

    # --- setup ---------------------------------------------------------------------------------
    def register_kv_caches(
        self, kv_caches: dict[str, torch.Tensor], *, num_blocks: int, num_kv_heads: int, head_size: int
    ) -> None:
        """kv_caches: layer name -> that layer's KV tensor (layouts of :class:`BlockLayout`)."""
        if not kv_caches:
            raise ValueError("register_kv_caches got no KV cache tensors")
        layouts = {
            name: detect_layout(t, num_blocks=num_blocks, block_size=self.block_size,
                                num_kv_heads=num_kv_heads, head_size=head_size)
            for name, t in kv_caches.items()
        }
        if len(set(layouts.values())) != 1:
            raise ValueError(f"KV cache layers disagree on their layout: {layouts}")
        self._layers = list(kv_caches.values())
        first = self._layers[0]
        self.layout = next(iter(layouts.values()))
        self.bank = Bank(
            num_layers=len(self._layers), num_kv_heads=num_kv_heads, head_dim=head_size, dtype=first.dtype,
            slot_tokens=self.block_size, capacity_bytes=self.config.bank_bytes, tier=self.config.bank,
            eviction=self.config.eviction, disk=DiskTier.from_config(self.config),
        )
        self.bank.add_evict_listener(self._on_evict)
        self.engine = TransferEngine.for_config(self.config, first.device)
        logger.info(
            "WorldKV vLLM worker: %d layers, layout %s, bank %s", len(self._layers), self.layout.name, self.bank
        )

    def _on_evict(self, key: BankKey, entry: Any) -> None:
        if key not in self._directed:  # the bank's own eviction: the scheduler half must hear of it
            self._lost.add(key)
        self._count(evictions=1)

    def _apply_evictions(self, keys) -> None:
        """Free the scheduler half's victims; one a copy still pins goes once its copy ended."""
        for key in keys:
            self._directed.add(key)
            try:
                self.bank.free(key, evict=True)
            except ValueError:
                self._evict_later.add(key)
            finally:
                self._directed.discard(key)

    def _count(self, **deltas: float) -> None:
        for name, value in deltas.items():
            self.totals[name] += value
            self._interval[name] += value

    def _plan(self, keys: list[BankKey], block_ids: list[int], *, to_bank: bool,
              staged: dict | None = None) -> FragmentPlan:
        """The copies of ``keys``' blocks over all layers, as address arrays (one job): fragments
        ordered layer, block, part; ranges checked against the cache tensors and the bank views
        (or ``staged``: key -> its payload read from the disk tier)."""
        staged = staged or {}
        views = [staged[key] if key in staged else self.bank.view(key) for key in keys]  # [L, 2, T, H, D] each
        stride, parts, size = self.layout.block_parts(self._layers[0])
        cache_part = np.asarray([c for c, _ in parts], dtype=np.uint64)
        bank_part = np.asarray([b for _, b in parts], dtype=np.uint64)
        item = views[0].element_size()
        bases = np.asarray([t.data_ptr() for t in self._layers], dtype=np.uint64)[:, None, None]  # [L, 1, 1]
        blocks = np.asarray(block_ids, dtype=np.uint64)[None, :, None] * np.uint64(stride)  # [1, n, 1]
        cache = bases + blocks + cache_part[None, None, :]  # [L, n, parts]
        slots = np.asarray([v.data_ptr() for v in views], dtype=np.uint64)[None, :, None]
        layer_step = np.asarray([v.stride(0) * item for v in views], dtype=np.uint64)[None, :, None]
        bank = slots + np.arange(len(self._layers), dtype=np.uint64)[:, None, None] * layer_step + bank_part
        cache, bank = cache.reshape(-1), bank.reshape(-1)
        sizes = np.full(cache.size, size, dtype=np.uint64)
        src, dst = (cache, bank) if to_bank else (bank, cache)
        return plan_fragments(src, dst, sizes, keep=(*self._layers, *views))

    # --- per step ------------------------------------------------------------------------------
    def handle_preemptions(self, meta: WorldKVConnectorMetadata) -> None:
        # a preempted request's blocks go back to the pool and this step may overwrite them:
        # every store still reading blocks must finish first
        if meta.preempted_req_ids and self.engine is not None and self.engine.pending():
            self.engine.wait_all()

    def start_load_kv(self, meta: WorldKVConnectorMetadata) -> None:
        if self.bank is None:
            return
        if meta.bank_slots is not None and meta.bank_slots != self.bank.num_slots:
            raise RuntimeError(f"the scheduler half decides {meta.bank_slots} bank slots, this worker's bank has "
                               f"{self.bank.num_slots}: give both processes the same bank_bytes")
        if self.local is not None:
            self._lost.update(self.local.plan_loads(meta))
        self._apply_evictions(meta.evicted)
        for key in apply_moves(self.bank, meta.spilled, meta.restores):  # a fault: dropped, reported lost
            self._drop_lost(key)
        for load in meta.loads:
            self._loading.add(load.req_id)
            self._load_request(load)
        if not self.load_async:
            # sync loads feed this very forward
            self.engine.wait_all()
            self._drain()

    def _drop_lost(self, key: BankKey) -> None:
        try:
            if self.bank.free(key):
                self._lost.add(key)
        except ValueError:  # a copy still reads it: it goes once the copy ended
            self._evict_later.add(key)
            self._lost.add(key)

    def _load_request(self, load: BlockTransfer) -> None:
        keys, ids, staged = [], [], {}
        for key, block_id in zip(load.keys, load.block_ids):
            entry = self.bank.get(key)
            # the scheduler's view can be stale (evicted or dropped here), and a spilled file may be
            # damaged: vLLM then recomputes or fails the request per kv_load_failure_policy
            ok = entry is not None and entry.ready
            if ok and not self.bank.is_resident(key):  # no slot was found for it: read it through
                try:
                    staged[key] = self.bank.read_payload(key)  # verified against its sha256
                except DiskTierError as exc:
                    logger.warning("WorldKV spilled block %r is unreadable: %s", key, exc)
                    self._drop_lost(key)
                    ok = False
            if not ok:
                self._fail_blocks(load.req_id, [block_id], [key], f"bank entry {key!r} is not loadable")
                self._loaded[key] += 1  # this load of it is over
                continue
            self.bank.pin(key)  # no eviction or spill under the copy
            self.bank.touch(key)  # a hit makes the entry young for LRU
            keys.append(key)
            ids.append(block_id)
        if keys:
            job = self.engine.submit_plan("load", self._plan(keys, ids, to_bank=False, staged=staged), tag="load")
            self._loads.setdefault(load.req_id, []).append(_Job(job, load.req_id, keys, ids))

    def wait_for_save(self, meta: WorldKVConnectorMetadata) -> None:
        if self.bank is None:
            return
        self._deferred |= meta.deferred_req_ids
        if self.local is None and any(store.slots is None for store in meta.stores):
            self.local = LocalPlanner(self.bank, self.config, self.block_size)  # no scheduler half planned it
        if self.local is not None:
            evicted, spilled = self.local.plan_stores(meta)
            self._lost.update(evicted)
            self._apply_evictions(evicted)
            for key in apply_moves(self.bank, spilled, []):
                self._drop_lost(key)
        failed, self._failed_reqs = self._failed_reqs, set()
        for store in meta.stores:
            if store.req_id in failed:
                # a sync load failed under this forward: its new KV attended to unloaded blocks
                # and must never be banked under a prefix hash
                self._lost.update(store.keys)
                self._count(store_skipped_blocks=len(store.keys))
                continue
            keys, ids = [], []
            for key, block_id, slot in zip(store.keys, store.block_ids, store.slots):
                have = self.bank.get(key)
                if have is not None:
                    # already banked (the scheduler forgot it): confirm it; one the scheduler half
                    # placed elsewhere is lost (it evicts it everywhere)
                    if have.ready and slot == have.slot:
                        self._stored[key] += 1
                    else:
                        self._lost.add(key)
                    continue
                if slot is None:  # a hand-built plan found no room: skipped, not an error
                    self._lost.add(key)
                    self._count(store_skipped_blocks=1)
                    continue
                try:
                    entry = self.bank.reserve(key, self.block_size, meta={"layout": self.layout.name}, slot=slot)
                except ValueError as exc:  # the named slot is taken here: a fault, never an overwrite
                    logger.warning("WorldKV store of %r skipped: %s", key, exc)
                    entry = None
                if entry is None:  # no room now (every slot pinned or in flight): skip, not an error
                    self._lost.add(key)
                    self._count(store_skipped_blocks=1)
                    continue
                self.bank.pin(key)
                keys.append(key)
                ids.append(block_id)
            if keys:
                job = self.engine.submit_plan("store", self._plan(keys, ids, to_bank=True), tag="store")
                self._stores.setdefault(store.req_id, []).append(_Job(job, store.req_id, keys, ids))

    def _fail_blocks(self, req_id: str, block_ids: list[int], keys: list[BankKey], why: str) -> None:
        self._failed_blocks.update(block_ids)
        if not self.load_async:
            self._failed_reqs.add(req_id)
        self._lost.update(keys)
        self._count(load_error_blocks=len(block_ids))
        # logged once at warning level: a broken bank would otherwise flood the log
        (logger.debug if self._warned_load_error else logger.warning)(
            "WorldKV load of %d block(s) failed (%s); reported to vLLM as load errors", len(block_ids), why
        )
        self._warned_load_error = True

    def _drain(self) -> None:
        """Account for every job the engine finished since the last poll."""
        done = {id(j) for j in self.engine.poll()} if self.engine is not None else set()
        if not done:
            return
        for table, is_store in ((self._stores, True), (self._loads, False)):
            for req_id in list(table):
                left = []
                for job in table[req_id]:
                    if id(job.job) not in done:
                        left.append(job)
                    elif is_store:
                        self._finish_store(job)
                    else:
                        self._finish_load(job)
                if left:
                    table[req_id] = left
                else:
                    del table[req_id]
        if self._evict_later:  # directed evictions whose copies ended now
            later, self._evict_later = self._evict_later, set()
            self._apply_evictions(later)

    def _finish_store(self, job: _Job) -> None:
        for key in job.keys:
            self.bank.unpin(key)
            if job.job.error:
                self.bank.free(key)
                self._lost.add(key)
            else:
                self.bank.mark_ready(key)
                self._stored[key] += 1
        if job.job.error:
            self._count(store_error_blocks=len(job.keys))
            return
        self._count(store_blocks=len(job.keys), store_tokens=len(job.keys) * self.block_size,
                    store_bytes=job.job.nbytes, store_s=(job.job.finished_at or 0.0) - job.job.submitted_at)

    def _finish_load(self, job: _Job) -> None:
        for key in job.keys:
            self.bank.unpin(key)
            self._loaded[key] += 1
        if job.job.error:
            self._fail_blocks(job.req_id, job.block_ids, job.keys, job.job.error)
            return
        self._count(load_blocks=len(job.keys), load_tokens=len(job.keys) * self.block_size,
                    load_bytes=job.job.nbytes, load_s=(job.job.finished_at or 0.0) - job.job.submitted_at)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._drain()
        sending = {r for r in self._deferred if r not in self._stores}
        self._deferred -= sending
        recving = {r for r in self._loading if r not in self._loads}
        self._loading -= recving
        if not self.load_async:
            recving = set()  # sync loads finish inside their step; vLLM expects no report
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._failed_blocks = self._failed_blocks, set()
        return out

    def build_worker_meta(self) -> WorldKVWorkerMetadata | None:
        if not self._stored and not self._lost and not self._loaded:
            return None
        meta = WorldKVWorkerMetadata(stored=self._stored, lost=self._lost, loaded=self._loaded)
        self._stored, self._lost, self._loaded = Counter(), set(), Counter()
        if self.local is not None:
            self.local.observe(meta)
        return meta

    def take_interval_stats(self) -> dict[str, float]:
        out, self._interval = dict(self._interval), Counter()
        return out

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.totals)
        if self.bank is not None:
            out["bank"] = self.bank.stats()
        if self.engine is not None:
            out["engine"] = self.engine.stats()
        return out

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.bank is not None:
            self.bank.close()
