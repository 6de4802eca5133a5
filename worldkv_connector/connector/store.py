"""Store path of the worker half: compress each committed chunk's K/V per layer and copy it into
its bank slot (pages -> bank), write-through, during the clean pass.

Per step the committed chunks' page slots are turned into one gather index (planned once, reused by
every layer), and the bank side of the copies is planned once as address arrays. At
``save_kv_layer`` the layer's rows are gathered, compressed (novelty pruning:
``compression.compress_chunk`` on the CPU, the Triton ``kernels.compress`` path on CUDA) and one
``submit_plan`` job per layer (``submit_layer``) copies K, V and the kept token ids into the bank
on a copy stream, after an event on the compute stream. An entry becomes ready (and retrievable) only when all its layers'
jobs completed; a failed copy or a full bank leaves the chunk unbanked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from worldkv_connector.bank import Bank, BankEntry
from worldkv_connector.compression import compress_chunk, get_compression
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector.meta import ChunkKey, StoreResult, StoreSpec
from worldkv_connector.metrics import ConnectorMetrics
from worldkv_connector.transfer import FragmentPlan, TransferEngine, TransferJob

__all__ = ["StorePath"]

logger = logging.getLogger(__name__)


@dataclass
class _Store:
    """One chunk being banked."""

    spec: StoreSpec
    entry: BankEntry | None  # None: no bank slot (full bank or an error before reserving)
    layers_submitted: int = 0
    outstanding: int = 0  # submitted jobs not yet observed done
    closed: bool = False  # no more layers will be submitted (end of the clean pass)
    failed: bool = False


class StorePath:
    """Compress-and-store of committed chunks. One per worker; not thread-safe."""

    def __init__(self, config: WorldKVConfig, bank: Bank, metrics: ConnectorMetrics, *, frame_tokens: int,
                 num_layers: int, page_size: int, device: torch.device) -> None:
        self.config = config
        self.bank = bank
        self.metrics = metrics
        self.frame_tokens = frame_tokens
        self.num_layers = num_layers
        self.page_size = page_size
        self.device = device
        self.kept = config.kept_tokens(frame_tokens)
        self._stores: dict[ChunkKey, _Store] = {}
        self._step: list[_Store] = []  # this step's stores, batch order
        self._rows: torch.Tensor | None = None  # [B, T] int64 flat page slots of the step's chunks
        # bank side of the step's copies (``_plan_bank_side``): every layer's (K, V, ids) addresses of
        # each chunk as [L, 3B] array, their storage indices [3B], the tensors they point into
        self._dst_arr: np.ndarray | None = None
        self._dst_store_arr: np.ndarray | None = None
        self._bank_keep: tuple = ()
        self._bank_storages: tuple = ()
        self._jobs: dict[int, list[ChunkKey]] = {}  # job id -> keys it writes
        self._source_layout: tuple | None = None  # the last (k, v, ids) layout _check_sources accepted
        self._source_steps: list = []  # its row steps (bytes between chunks) per source
        self._source_rows: tuple = ()  # its fragment sizes (list, array) and source storage indices
        self._source_bytes = 0
        # one event serves every store job: the copy stream's wait_event captures the record at call
        # time, so re-recording it for the next layer cannot release an earlier wait
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self._warned = False
        # page-locked ids so their device-to-host copy joins the job's DMA batch (pageable memory
        # would force a copy that blocks the host until the compute stream caught up)
        self._pin = device.type == "cuda"
        # compress(k, v) -> (k, v, ids) replacing the one-rank compression (head-sharded ranks:
        # worldkv_connector.integration.video.ranks, whose scores need every rank's heads)
        self.compress_fn = None

    # --- per step -------------------------------------------------------------------------------
    def begin_step(self, stores: list[StoreSpec]) -> None:
        """Reserve the bank slot each spec names (decided by a ``SlotDirectory``) and plan the page
        gather of this step's committed chunks."""
        if any(not st.closed for st in self._stores.values()):
            self.end_step()  # the previous clean pass never reached wait_for_save (a failed step)
        chunk_tokens = None
        for spec in stores:
            if spec.key in self._stores:
                logger.warning("chunk %s is already being stored; store request ignored", spec.key)
                continue
            if chunk_tokens is None:
                chunk_tokens = spec.num_tokens
            entry = None
            if spec.num_tokens != chunk_tokens:
                self._fail_early(spec, f"{spec.num_tokens} tokens, the step's other chunks have {chunk_tokens}")
            elif spec.num_tokens % self.frame_tokens:
                self._fail_early(spec, f"{spec.num_tokens} tokens is not a whole number of frames")
            else:
                # indices land per layer with the layer's store job (no device sync on CUDA); every
                # row is written before the entry is ready (a partial store frees it), so no zero-fill
                idx = torch.empty(self.num_layers, self.kept, dtype=torch.int64, pin_memory=self._pin)
                # pose and first frame travel with the entry so a saved bank can be re-indexed
                meta = {"first_frame": spec.first_frame} if spec.first_frame >= 0 else None
                try:
                    entry = self.bank.reserve(spec.key, self.kept, indices=idx, pose=spec.frame_poses, meta=meta,
                                              slot=spec.slot)
                    if entry is not None and self.config.compression != "novelty":
                        # merge counts travel with the entry like the kept ids (tempcache's logit bias)
                        entry.counts = torch.ones(self.num_layers, self.kept, pin_memory=self._pin)
                    if entry is None:
                        self._fail_early(spec, "the bank has no free slot (every entry is pinned or being written)")
                except ValueError as exc:  # the key is already banked, or its slot is taken: never fail the step
                    self._fail_early(spec, str(exc))
            st = _Store(spec, entry, failed=entry is None)
            self._stores[spec.key] = st
            if entry is not None:
                self._step.append(st)
        if self._step:
            ps = self.page_size
            pages = torch.tensor([st.spec.page_ids for st in self._step], dtype=torch.int64)  # [B, P]
            rows = (pages[:, :, None] * ps + torch.arange(ps)).reshape(len(self._step), -1)  # [B, P * ps]
            self._rows = rows[:, :chunk_tokens].to(self.device)
            self._plan_bank_side()

    def _fail_early(self, spec: StoreSpec, why: str) -> None:
        self.metrics.store_errors += 1
        self._log(f"chunk {spec.key} not banked: {why}")

    def _log(self, msg: str) -> None:
        # the first failure is a warning; repeats are debug so a full bank cannot flood the log
        (logger.debug if self._warned else logger.warning)("%s", msg)
        self._warned = True

    def save_layer(self, layer: int, kv_layer: torch.Tensor, transfer: TransferEngine) -> None:
        """kv_layer: [2, num_pages, page_size, H, D], the pool of layer ``layer`` after the clean pass
        wrote the committed chunks. Enqueues one store job (K, V, kept ids of every chunk)."""
        live = [st for st in self._step if not st.failed]
        if not live:
            return
        try:
            rows = self._rows if len(live) == len(self._step) else self._rows[[self._step.index(st) for st in live]]
            _, num_pages, ps, h, d = kv_layer.shape
            flat = kv_layer.view(2, num_pages * ps, h, d)
            b, t = rows.shape
            flat_rows = rows.reshape(-1)
            k = flat[0].index_select(0, flat_rows).view(b, t, h, d)  # [B, T, H, D] gathered chunk K
            v = flat[1].index_select(0, flat_rows).view(b, t, h, d)
            ck, cv, idx, cnt = self._compress(k, v)  # [B, T', H, D] x2, [B, T'] int64, [B, T'] fp32 or None
            if cnt is not None:
                # queued on the compute stream before submit_layer records the event the store job
                # waits on, so a finished store job implies its counts landed too
                for b, st in enumerate(live):
                    if st.entry.counts is not None:
                        st.entry.counts[layer].copy_(cnt[b], non_blocking=True)
        except Exception as exc:  # noqa: BLE001 - a failed store leaves the chunk unbanked, never fails the step
            self._store_failed(layer, live, exc)
            return
        self.submit_layer(layer, ck, cv, idx, transfer)

    def submit_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor,
                     transfer: TransferEngine) -> None:
        """Copy one layer's compressed rows of the step's live chunks into their bank slots: one
        ``submit_plan`` job. k, v: [B, T', H, D] (each [T', H, D] contiguous), ids: [B, T'] int64,
        B = the step's live stores in batch order. The bank-side addresses were planned at
        ``begin_step``; here only the three source bases are read."""
        live = [st for st in self._step if not st.failed]
        if not live:
            return
        try:
            plan = self._layer_plan(layer, [i for i, st in enumerate(self._step) if not st.failed], k, v, ids)
            after = None
            if self._event is not None:
                # the copy stream must not read the staging rows before compute wrote them
                self._event.record(torch.cuda.current_stream(self.device))
                after = self._event
            job = transfer.submit_plan("store", plan, after=after, tag=("store", layer))
        except Exception as exc:  # noqa: BLE001 - a failed store leaves the chunk unbanked, never fails the step
            self._store_failed(layer, live, exc)
            return
        keys = []
        for st in live:
            st.layers_submitted += 1
            st.outstanding += 1
            keys.append(st.spec.key)
        self._jobs[job.job_id] = keys

    def _store_failed(self, layer: int, live: list[_Store], exc: BaseException) -> None:
        for st in live:
            st.failed = True
        self.metrics.store_errors += 1
        self._log(f"store of layer {layer} failed for {[st.spec.key for st in live]}: {type(exc).__name__}: {exc}")

    def _plan_bank_side(self) -> None:
        """Bank-side addresses of the step's stores, one (K rows, V rows, kept ids) triple per chunk,
        for every layer at once (layer l: layer 0's addresses plus l times the slot's layer stride), so
        a layer's plan reads its row instead of converting addresses again."""
        views = [self.bank.view(st.spec.key) for st in self._step]  # [L, 2, T', H, D]
        idx = [st.entry.indices for st in self._step]  # [L, T'] int64 each
        item = views[0].element_size()
        # layer 0's K rows, V rows (one K/V stride on) and kept ids of each chunk, and their layer steps
        dst0 = [(w.data_ptr(), w.data_ptr() + w.stride(1) * item, i.data_ptr()) for w, i in zip(views, idx)]
        step = [(w.stride(0) * item, w.stride(0) * item, i.stride(0) * i.element_size()) for w, i in zip(views, idx)]
        self._bank_keep = (*views, *idx)
        bases = {t.untyped_storage().data_ptr(): t.device for t in self._bank_keep}
        self._bank_storages = tuple(bases.items())
        where = {base: j + 3 for j, base in enumerate(bases)}  # after the k, v, ids storages
        stores = [(where[w.untyped_storage().data_ptr()],) * 2 + (where[i.untyped_storage().data_ptr()],)
                  for w, i in zip(views, idx)]
        layers = np.arange(self.num_layers, dtype=np.uint64)[:, None]
        d0, dstep = (np.array(x, dtype=np.uint64).reshape(-1) for x in (dst0, step))  # [3B] each
        self._dst_arr = d0 + layers * dstep  # [L, 3B]
        self._dst_store_arr = np.array(stores, dtype=np.int64).reshape(-1)  # [3B]

    def _check_sources(self, b: int, srcs: tuple) -> None:
        """Validate one layer's (k, v, ids) against the step's stores; sets their row steps and the
        fragment sizes of ``b`` chunks."""
        t, h, d = self.kept, self.bank.num_kv_heads, self.bank.head_dim
        for name, x, shape, dtype, rows in zip(("k", "v", "ids"), srcs, ((b, t, h, d), (b, t, h, d), (b, t)),
                                               (self.bank.dtype, self.bank.dtype, torch.int64),
                                               ((h * d, d, 1), (h * d, d, 1), (1,))):
            if x.shape != shape or x.dtype != dtype or (t > 1 and x.stride()[1:] != rows) \
                    or x.device.type not in ("cpu", self.device.type):
                raise ValueError(f"store {name}: expected {shape} {dtype} with contiguous rows, got {tuple(x.shape)} "
                                 f"{x.dtype} strides {x.stride()} on {x.device}")
        k, v, _ = srcs
        size = (t * h * d * k.element_size(), t * h * d * v.element_size(), t * 8)
        self._source_steps = [x.stride(0) * x.element_size() for x in srcs]
        self._source_items = (k.element_size(), v.element_size(), 8)  # ids: int64
        sizes = list(size) * b  # the fragments of b chunks: their sizes and source storage index
        self._source_rows = (np.array(sizes, dtype=np.uint64), np.tile(np.arange(3, dtype=np.int64), b))
        self._source_bytes = sum(sizes)

    def _layer_plan(self, layer: int, live: list[int], k: torch.Tensor, v: torch.Tensor,
                    ids: torch.Tensor) -> FragmentPlan:
        """Layer ``layer``'s copies: row j of k, v, ids -> the bank slot of the j-th live store
        (``live``: their indices into the step). Built from ints (3 fragments per chunk)."""
        b = len(live)
        srcs = (k, v, ids)
        # every layer of a step usually brings sources of one layout: checked in full once per layout
        devices = (k.device, v.device, ids.device)
        layout = (b, k.shape, v.shape, ids.shape, k.dtype, v.dtype, ids.dtype, k.stride(), v.stride(), ids.stride(),
                  devices)
        if layout != self._source_layout:
            self._check_sources(b, srcs)
            self._source_layout = layout
        base = [k.data_ptr(), v.data_ptr(), ids.data_ptr()]
        step = self._source_steps
        # one fragment per (chunk, source): the sources are distinct tensors, so no two continue each other
        src = [base[f] + j * step[f] for j in range(b) for f in range(3)]
        if b == len(self._step):
            dst_arr, d_store = self._dst_arr[layer], self._dst_store_arr
        else:  # some of the step's stores failed: their columns
            cols = [3 * i + f for i in live for f in range(3)]
            dst_arr, d_store = self._dst_arr[layer, cols], self._dst_store_arr[cols]
        sizes_arr, s_store = self._source_rows
        # each source's storage base from its data pointer (an untyped_storage() object per tensor
        # costs more)
        item = self._source_items
        storages = ((base[0] - k.storage_offset() * item[0], devices[0]),
                    (base[1] - v.storage_offset() * item[1], devices[1]),
                    (base[2] - ids.storage_offset() * item[2], devices[2])) + self._bank_storages
        return FragmentPlan(np.array(src, dtype=np.uint64), dst_arr, sizes_arr, (*srcs, *self._bank_keep), storages,
                            s_store, d_store, merged=True, pairs=3 * b, total=self._source_bytes)

    def _compress(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, T, H, D] -> (k [B, T', H, D], v [B, T', H, D], ids [B, T'] int64, counts [B, T'] fp32
        or None for pruning), on k's device."""
        if self.compress_fn is not None:  # head-sharded ranks: pruning scored over every rank's heads
            return (*self.compress_fn(k, v), None)
        b, t = k.shape[:2]
        if self.kept == t:  # keep_ratio 1: nothing to rank
            ids = torch.arange(t, device=k.device).expand(b, t).contiguous()
            return k, v, ids, None
        if self.config.compression != "novelty":  # a registered merging compression (torch, any device)
            out = get_compression(self.config.compression)(
                k, v, frame_tokens=self.frame_tokens, keep_ratio=self.config.keep_ratio, pooled=self.config.pooled)
            return out.k, out.v, out.indices, out.counts
        if k.device.type == "cuda":
            from worldkv_connector.kernels.compress import compress_chunk_kernel

            staging, ids = compress_chunk_kernel(
                k, v, frame_tokens=self.frame_tokens, keep_ratio=self.config.keep_ratio, pooled=self.config.pooled
            )  # staging: [B, 2, T', H, D] contiguous
            return staging[:, 0], staging[:, 1], ids, None
        out = compress_chunk(k, v, frame_tokens=self.frame_tokens, keep_ratio=self.config.keep_ratio,
                             pooled=self.config.pooled)
        return out.k, out.v, out.indices, None

    def end_step(self) -> None:
        """End of the clean pass: a chunk that did not get every layer is not banked."""
        for st in self._step:
            st.closed = True
            if st.layers_submitted != self.num_layers and not st.failed:
                st.failed = True
                self.metrics.store_errors += 1
                self._log(f"chunk {st.spec.key} not banked: {st.layers_submitted} of {self.num_layers} layers saved")
        for st in self._stores.values():
            st.closed = True
        self._step, self._rows = [], None
        self._bank_keep = ()  # the views stay alive through the jobs' own keep

    # --- completion -----------------------------------------------------------------------------
    def on_job(self, job: TransferJob) -> None:
        """A store job finished (successfully or not)."""
        for key in self._jobs.pop(job.job_id, ()):
            st = self._stores.get(key)
            if st is None:
                continue
            st.outstanding -= 1
            if job.error is not None and not st.failed:
                st.failed = True
                self._log(f"chunk {key} not banked: store copy failed ({job.error})")

    def collect(self) -> list[StoreResult]:
        """Stores that ended: ready entries (ok) or freed slots (failed)."""
        out = []
        for key in [k for k, st in self._stores.items() if st.closed and st.outstanding == 0]:
            st = self._stores.pop(key)
            if st.failed or st.entry is None:
                if st.entry is not None and key in self.bank:
                    self.bank.free(key)  # no copy writes into the slot any more: safe to reuse
                out.append(StoreResult(key, False, 0))
            else:
                self.bank.mark_ready(key)
                self.metrics.record_chunk(st.spec.num_tokens, st.entry.num_tokens)
                out.append(StoreResult(key, True, st.entry.num_tokens))
        return out

    def pending(self) -> int:
        return len(self._stores)
