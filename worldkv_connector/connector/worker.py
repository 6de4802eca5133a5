"""Worker half of the WorldKV connector: the bank, the transfer engine, streams and tensors.

It runs the scheduler half's per-step plan (``WorldKVMetadata``): loads at ``start_load_kv``
(``load.LoadPath``), stores at ``save_kv_layer`` (``store.StorePath``), and polls its transfer jobs
in ``poll`` (called from ``get_finished``), which returns a ``WorkerReport`` for the scheduler half:
banked chunks, failed loads and the bank's own evictions. Entries become retrievable only once
their store job completed.

Slots: the scheduler half decides them (``bank.directory.SlotDirectory``), with a disk tier too:
each ``StoreSpec`` names its slot, and the metadata lists the entries evicted, the entries spilled
to the disk tier and the spilled entries this step loads with the slot each comes back into. The
worker applies them in that order (evict, spill, restore), then runs the loads and reserves exactly
the named slots, and only copies and reports. A restore whose file is missing or damaged drops the
entry (reported as evicted, so the scheduler half forgets it) and its load is a reported load
error; nothing is ever loaded from a wrong file. A plan that names no slots (a worker driven on its
own, without a scheduler half) is planned here by a ``local.LocalPlanner``, the same directory.

The transfer engine is a public attribute (``worker.transfer``) so a test or a host can swap in an
instrumented one between steps (``WorldKVConnector.wrap_transfer`` does it for a wrapper such as
``testing.FaultyTransferEngine``).

Ended sessions: ``end_session`` frees a session's bank entries once nothing pins them (entries an
in-flight load still reads go at a later ``poll``); finished sessions the host keeps
(``meta.finished_sessions`` without ``end_session``) stay banked, and the directory takes them
first when a live session needs room.
"""
from __future__ import annotations

import logging

import torch

from worldkv_connector.bank import Bank, BankEntry, apply_moves
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector.load import LoadPath
from worldkv_connector.connector.local import LocalPlanner
from worldkv_connector.connector.meta import ChunkKey, LoadSpec, RopeDelta, WorkerReport, WorldKVMetadata
from worldkv_connector.connector.store import StorePath
from worldkv_connector.metrics import ConnectorMetrics
from worldkv_connector.shapes import KVShape
from worldkv_connector.transfer import TransferEngine

__all__ = ["WorldKVWorker"]

logger = logging.getLogger(__name__)


class WorldKVWorker:
    """Tensors and copies of the connector for one device.

    config: resolved ``WorldKVConfig``; kv_shape: the model's KV shape (layers, heads, dims, dtype);
    page_size: the engine's tokens per page; device: where the KV pools live (cpu or cuda).
    transfer: an optional ``TransferEngine`` (default: one on ``device``).
    """

    def __init__(self, config: WorldKVConfig, kv_shape: KVShape, *, page_size: int, device: torch.device | str,
                 transfer: TransferEngine | None = None) -> None:
        self.config = config
        self.kv_shape = kv_shape
        self.page_size = page_size
        self.device = torch.device(device)
        bank_device = self.device if config.bank == "gpu" else None
        self.bank = Bank.for_shape(kv_shape, config, device=bank_device)
        self.transfer = transfer if transfer is not None else TransferEngine.for_config(config, self.device)
        self.metrics = ConnectorMetrics()
        self._evicted: list[ChunkKey] = []  # the bank's own evictions since the last poll
        self._directed: set[ChunkKey] = set()  # evictions being applied for the scheduler half
        self.local: LocalPlanner | None = None  # slot decisions of a worker driven on its own
        self._ending: set[str] = set()  # ended sessions whose entries are freed once unpinned
        self.bank.add_evict_listener(self._on_evict)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.logit_bias: dict[str, torch.Tensor] | None = None  # merging compressions only (load.py)
        self.layer_names: list[str] = []
        self._layer_of: dict[str, int] = {}
        self.loads = LoadPath(self.bank, self.metrics, page_size=page_size, device=self.device)
        self.stores = StorePath(config, self.bank, self.metrics, frame_tokens=kv_shape.frame_tokens,
                                num_layers=kv_shape.num_layers, page_size=page_size, device=self.device)
        self._meta: WorldKVMetadata | None = None
        self._closed = False
        self.metrics.set_bank(self.bank.stats())

    def _on_evict(self, key, entry: BankEntry) -> None:
        if key not in self._directed:  # the bank's own eviction: the scheduler half must hear of it
            self._evicted.append(key)

    # --- setup ----------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """kv_caches: ``"blocks.{i}"`` -> [2, num_pages, page_size, H, D] (K at [0], V at [1]), in
        layer order, the KV shape's dtype, on ``device``."""
        s = self.kv_shape
        if len(kv_caches) != s.num_layers:
            raise ValueError(f"register_kv_caches: {len(kv_caches)} layers, the KV shape {s.name!r} has {s.num_layers}")
        for name, t in kv_caches.items():
            if t.dim() != 5 or t.shape[0] != 2 or tuple(t.shape[2:]) != (self.page_size, s.num_kv_heads, s.head_dim):
                raise ValueError(
                    f"kv cache {name!r}: expected [2, num_pages, {self.page_size}, {s.num_kv_heads}, {s.head_dim}], "
                    f"got {tuple(t.shape)}"
                )
            if t.dtype != s.torch_dtype or t.device.type != self.device.type:
                raise ValueError(
                    f"kv cache {name!r}: expected {s.torch_dtype} on {self.device}, got {t.dtype} on {t.device}"
                )
        self.kv_caches = dict(kv_caches)
        self.layer_names = list(kv_caches)
        if self.config.compression != "novelty":  # merged tokens carry log(count) into attention
            self.logit_bias = {name: torch.zeros(t.shape[1], t.shape[2], device=t.device) for name, t in kv_caches.items()}
            self.loads.logit_bias = self.logit_bias
            self.loads.require_counts = self.config.kept_tokens(s.frame_tokens) < s.frame_tokens * self.config.frames_per_chunk
        self._layer_of = {name: i for i, name in enumerate(self.layer_names)}

    def _layer(self, layer_name: str) -> int:
        try:
            return self._layer_of[layer_name]
        except KeyError:
            raise ValueError(f"unknown layer {layer_name!r}: registered {self.layer_names[:3]}...") from None

    # --- per step -------------------------------------------------------------------------------
    def bind(self, meta: WorldKVMetadata | None) -> None:
        self._meta = meta

    def start_load_kv(self) -> None:
        """Apply the step's slot decisions, enqueue its loads and reserve its stores' bank slots
        (plan once per step)."""
        meta = self._meta
        if meta is None:
            return
        if self.local is None and any(spec.slot is None for spec in meta.stores):
            self.local = LocalPlanner(self.bank, self.config)  # no scheduler half made this plan
        if self.local is not None:
            meta = self.local.plan(meta)
        self.loads.release(meta.released)
        # the directory's order: victims go, spilled ones free their slots, restores take theirs
        # (never an entry a planned load pins: the directory excluded those)
        self._apply_evictions(meta.evicted)
        # a spill or restore that fails (a fault) drops its entry, reported, so its slot is free as
        # decided and no load reads a wrong slot
        for key in apply_moves(self.bank, meta.spilled, meta.restores):
            self._drop_reported(key)
        loads, ropes, away = self._resident_only(meta.loads, meta.rope_deltas)
        self.loads.begin_step(loads, ropes, self.layer_names, self.kv_caches, self.transfer)
        self._refuse(away)  # after begin_step, which starts the step's error pages afresh
        self.stores.begin_step(meta.stores)

    def _apply_evictions(self, keys: list[ChunkKey]) -> None:
        """Free the entries the scheduler half evicted (counted as evictions, not reported back: the
        scheduler half decided them). One a transfer still pins is a fault, logged, never forced:
        the store given its slot then fails (``Bank.reserve`` refuses a taken slot)."""
        for key in keys:
            self._directed.add(key)
            try:
                self.bank.free(key, evict=True)  # False: already gone (e.g. dropped by the host since)
            except ValueError as exc:
                logger.warning("directed eviction of %s refused: %s", key, exc)
        self._directed.clear()

    def _drop_reported(self, key: ChunkKey) -> None:
        try:
            if self.bank.free(key):
                self._evicted.append(key)  # the scheduler half must forget it
        except ValueError as exc:  # pinned by a copy in flight: it stays, a later decision retries
            logger.warning("bank entry %s could not be dropped: %s", key, exc)

    def _resident_only(self, loads: list[LoadSpec], ropes: list[RopeDelta]):
        """Split off the loads and RoPE reloads whose entry is still on the disk tier (no slot was
        found for it): ``(loads, ropes, refused specs)``."""
        def away(key: ChunkKey) -> bool:
            return key in self.bank and not self.bank.is_resident(key)

        refused = [spec for spec in loads if away(spec.key)]
        refused += [LoadSpec(r.key, r.page_ids, sum(r.page_lens)) for r in ropes if r.reload and away(r.key)]
        if not refused:
            return loads, ropes, []
        return ([spec for spec in loads if not away(spec.key)],
                [r for r in ropes if not (r.reload and away(r.key))], refused)

    def _refuse(self, specs: list[LoadSpec]) -> None:
        """Loads of entries left on disk: load errors of their pages, reported failed."""
        for spec in specs:
            self.metrics.load_errors += 1
            self.loads.error_pages.update(spec.page_ids)
            self.loads.failed.append(spec.key)
        if specs:
            logger.warning("KV load of spilled chunk(s) %s found no bank slot: left out of this step's window",
                           [s.key for s in specs])

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer(layer_name)
        self.loads.wait_layer(layer, self.kv_caches[layer_name])

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        """kv_layer: [2, num_pages, page_size, H, D] after the clean pass wrote the committed chunks."""
        self.stores.save_layer(self._layer(layer_name), kv_layer, self.transfer)

    def wait_for_save(self) -> None:
        """End of the clean pass; does not wait for the copies."""
        self.stores.end_step()

    def load_error_pages(self) -> set[int]:
        return set(self.loads.error_pages)

    # --- completion -----------------------------------------------------------------------------
    def poll(self) -> WorkerReport:
        """Observe finished jobs (never waits) and report what ended since the last poll."""
        for job in self.transfer.poll():
            self.metrics.record_job(job)
            if job.kind == "store":
                self.stores.on_job(job)
            else:
                self.loads.on_job(job)
        report = WorkerReport(stores=self.stores.collect())
        report.loads_done, report.loads_failed = self.loads.collect()
        if self._ending:
            self._free_ending()
        if self.local is not None:
            report.stores += self.local.failed
            self._evicted += self.local.evicted
            self.local.failed, self.local.evicted = [], []
        report.evicted, self._evicted = self._evicted, []
        if self.local is not None:
            self.local.observe(report)
        self.metrics.set_bank(self.bank.stats())
        return report

    def end_session(self, session_id: str) -> int:
        """A session ended and its stores ended: free its bank entries (those an in-flight load
        still pins go at a later ``poll``) and forget its resident ids. The frees are not reported
        as evictions: the scheduler half forgets the session itself. Returns entries freed now."""
        self._ending.add(session_id)
        for key in [k for k in self.loads.resident_indices if k[0] == session_id]:
            del self.loads.resident_indices[key]
        freed = self._free_ending()
        self.metrics.set_bank(self.bank.stats())
        return freed

    def _free_ending(self) -> int:
        freed, left = 0, set()
        for key in list(self.bank.keys()):
            if not (isinstance(key, tuple) and key and key[0] in self._ending):
                continue
            entry = self.bank.get(key)
            if entry.pins or not entry.ready:
                left.add(key[0])  # a copy still uses it: next poll
                continue
            self.bank.free(key)
            if self.local is not None:
                self.local.forget([key])
            freed += 1
        self._ending = left
        return freed

    def kept_indices(self, key: ChunkKey) -> torch.Tensor | None:
        """Kept token ids [L, T'] (CPU int64, ascending, anchor first) of a banked or resident chunk."""
        entry = self.bank.get(key)
        if entry is not None and entry.ready and entry.indices is not None:
            return entry.indices
        return self.loads.resident_indices.get(key)

    def drop_session(self, session_id: str) -> list[ChunkKey]:
        """Free a session's ready, unpinned bank entries; they are reported as evicted at the next
        poll (so they leave the pose index). Returns the freed keys."""
        for key in [k for k in self.loads.resident_indices if k[0] == session_id]:
            del self.loads.resident_indices[key]
        freed = []
        for key in list(self.bank.keys()):
            entry = self.bank.get(key)
            if key[0] == session_id and entry.ready and not entry.pins:
                self.bank.free(key)
                freed.append(key)
        self._evicted.extend(freed)
        return freed

    def stats(self) -> dict:
        out = {"bank": self.bank.stats(), "transfer": self.transfer.stats(), "pending_stores": self.stores.pending()}
        return out

    def close(self) -> None:
        """Wait for every copy, then release the bank. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.transfer.close()
        self.poll()
        self.bank.close()
