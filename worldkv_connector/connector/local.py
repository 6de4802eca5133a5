"""The slot decisions of a worker half driven on its own (tests, tools): no scheduler half made its
plan, so this plays the scheduler half's ``SlotDirectory`` part for it.

A plan from the scheduler half names every store's slot. One that names none (``StoreSpec.slot``
None) was built by hand; the worker hands it to a ``LocalPlanner`` once, which decides exactly as
the scheduler half would (``SlotDirectory``: victims, spills, restores, slots) and keeps the
directory in step with the worker's reports. Its evictions are reported back like the bank's own
(nobody else decided them), and a store it finds no room for ends as a failed store.
"""
from __future__ import annotations

import dataclasses
import logging

from worldkv_connector.bank import Bank, SlotDirectory
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector.meta import ChunkKey, StoreResult, WorkerReport, WorldKVMetadata

__all__ = ["LocalPlanner"]

logger = logging.getLogger(__name__)


class LocalPlanner:
    """A ``SlotDirectory`` over ``bank`` (its ready entries adopted), planning hand-built steps."""

    def __init__(self, bank: Bank, config: WorldKVConfig) -> None:
        self.directory = SlotDirectory.for_bank(bank, config)
        self.evicted: list[ChunkKey] = []  # decided here: the worker reports them as its own
        self.failed: list[StoreResult] = []  # stores with no room: they end at the next poll

    def plan(self, meta: WorldKVMetadata) -> WorldKVMetadata:
        """``meta`` with its stores' slots and the step's evictions, spills and restores decided."""
        d = self.directory
        for sid in meta.finished_sessions:
            d.finish_session(sid)
        for spec in meta.loads:
            d.pin(spec.key)  # until the worker reports the load (``observe``)
        reloads = [r.key for r in meta.rope_deltas if r.reload]
        for key in reloads:
            d.pin(key, touch=False)
        restores, evicted = d.prepare_restores([spec.key for spec in meta.loads] + reloads)
        stores = []
        for spec in meta.stores:
            try:
                got = d.prepare_store(spec.key, spec.num_tokens)
            except ValueError:  # already banked: the store path refuses it and reports it
                stores.append(spec)
                continue
            if got is None:
                logger.warning("chunk %s not banked: the bank has no free slot (every entry is pinned or being "
                               "written)", spec.key)
                self.failed.append(StoreResult(spec.key, False, 0))
                continue
            evicted.extend(got[1])
            stores.append(dataclasses.replace(spec, slot=got[0]))
        self.evicted.extend(evicted)
        return dataclasses.replace(meta, stores=stores, evicted=meta.evicted + evicted,
                                   spilled=meta.spilled + d.take_spilled(), restores=meta.restores + restores)

    def observe(self, report: WorkerReport) -> None:
        """The worker's report, as the scheduler half would take it (before it goes out)."""
        for res in report.stores:
            self.directory.complete_store(res.key, res.ok, res.num_tokens)
        for key in report.evicted:
            self.directory.forget(key)
        for key in report.loads_done + report.loads_failed:
            self.directory.unpin(key)

    def forget(self, keys) -> None:
        """Entries the worker freed on the host's word (an ended or dropped session)."""
        for key in keys:
            self.directory.forget(key)
