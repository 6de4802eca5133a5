"""The slot decisions of a vLLM worker half driven on its own (tests, tools): a plan whose stores
name no slots was built by hand, so this plays the scheduler half's ``SlotDirectory`` part for it,
deciding exactly as the scheduler half would and following the worker's reports. Its evictions
are reported as lost (nobody else decided them); a block it finds no room for is a skipped store.
"""
from __future__ import annotations

from worldkv_connector.bank import Bank, SlotDirectory
from worldkv_connector.config import WorldKVConfig

from .scheduler import BankKey, WorldKVConnectorMetadata, WorldKVWorkerMetadata

__all__ = ["LocalPlanner"]


class LocalPlanner:
    """A ``SlotDirectory`` over ``bank`` (its ready entries adopted), planning hand-built steps in place."""

    def __init__(self, bank: Bank, config: WorldKVConfig, block_size: int) -> None:
        self.directory = SlotDirectory.for_bank(bank, config)
        self.block_size = block_size

    def plan_loads(self, meta: WorldKVConnectorMetadata) -> list[BankKey]:
        """Pin the step's loads and decide their restores (added to ``meta``); returns the evicted keys."""
        keys = [key for load in meta.loads for key in load.keys]
        for key in keys:
            self.directory.pin(key)
        restores, evicted = self.directory.prepare_restores(keys)
        meta.restores = meta.restores + restores
        meta.spilled = meta.spilled + self.directory.take_spilled()
        meta.evicted = meta.evicted + evicted
        return evicted

    def plan_stores(self, meta: WorldKVConnectorMetadata) -> tuple[list[BankKey], list[BankKey]]:
        """Name the slots of the stores that name none (None: no room, the block is skipped);
        returns the ``(evicted, spilled)`` keys to apply first."""
        evicted: list[BankKey] = []
        for store in meta.stores:
            if store.slots is not None:
                continue
            store.slots = []
            for key in store.keys:
                if key in self.directory:  # banked already: the worker confirms it at its slot
                    store.slots.append(self.directory.get(key).slot)
                    continue
                got = self.directory.prepare_store(key, self.block_size)
                store.slots.append(None if got is None else got[0])
                evicted.extend(got[1] if got is not None else ())
        return evicted, self.directory.take_spilled()

    def observe(self, report: WorldKVWorkerMetadata) -> None:
        """The worker's report, as the scheduler half takes it (one worker)."""
        for key in report.stored:
            self.directory.complete_store(key, True, self.block_size)
        for key in report.lost:
            self.directory.forget(key)
        for key, n in report.loaded.items():
            for _ in range(n):
                self.directory.unpin(key, every=False)
