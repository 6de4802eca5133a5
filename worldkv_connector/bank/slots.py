"""The bank's bookkeeping, no tensors: which entry holds which slot of the host/GPU tier, the free
slots, the eviction order and the byte count of the tier.

Entries spilled to the disk tier stay listed (``slot == -1``) but leave the free list's accounting
and the eviction policy's order, so the policy only ever chooses resident keys.
"""
from __future__ import annotations

from typing import Any, Iterator

from worldkv_connector.bank.disk import DISK
from worldkv_connector.bank.entry import BankEntry, BankKey
from worldkv_connector.bank.eviction import EvictionPolicy, get_eviction
from worldkv_connector.checks import is_int

__all__ = ["SlotTable", "bank_stats"]


class SlotTable:
    """Slots ``0 .. num_slots - 1`` and the entries that hold them, ordered by the ``eviction``
    policy. A fresh table hands out the lowest free slot first, so a fresh bank fills in order."""

    def __init__(self, num_slots: int, eviction: str) -> None:
        self.num_slots = num_slots
        self.eviction = eviction
        self._policy: EvictionPolicy = get_eviction(eviction)
        self._entries: dict[BankKey, BankEntry] = {}
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest
        self._clock = 0
        self.bytes_used = 0  # payload bytes of the entries holding a slot

    # --- queries -----------------------------------------------------------------------------------
    def get(self, key: BankKey) -> BankEntry | None:
        return self._entries.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[BankKey]:
        """Every listed key (spilled ones too), in insertion order."""
        return list(self._entries)

    def values(self) -> Iterator[BankEntry]:
        return iter(list(self._entries.values()))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def victim(self) -> BankKey | None:
        """The key the policy would evict now (ready, unpinned, resident), or None."""
        key = self._policy.choose_victim(self._entries)
        if key is not None and self._entries[key].slot < 0:
            raise RuntimeError(f"eviction policy {self.eviction!r} chose {key!r}, which is not resident")
        return key

    def can_free_a_slot(self) -> bool:
        """A slot is free, or the policy has a victim to make one."""
        return bool(self._free) or self._policy.choose_victim(self._entries) is not None

    # --- changes -----------------------------------------------------------------------------------
    def is_free(self, slot: int) -> bool:
        return slot in self._free

    def insert(self, entry: BankEntry, slot: int | None = None) -> None:
        """List a new ``entry`` in ``slot``, or in the lowest free slot when None (``entry.slot``
        and ``last_used`` are set). The caller made room first (``ValueError`` when ``slot`` is taken)."""
        entry.slot = self._take(slot, entry.key)
        entry.last_used = self._tick()
        self._entries[entry.key] = entry
        self.bytes_used += entry.nbytes
        self._policy.on_insert(entry.key)

    def insert_spilled(self, entry: BankEntry) -> None:
        """List a new ``entry`` that has no slot (its payload is on the disk tier)."""
        entry.slot = -1
        entry.last_used = self._tick()
        self._entries[entry.key] = entry

    def _take(self, slot: int | None, key: BankKey) -> int:
        if slot is None:
            return self._free.pop()
        free = self._free
        if is_int(slot) and free and free[-1] == slot:  # the lowest free slot (the usual choice): O(1)
            return free.pop()
        if is_int(slot) and slot in free:
            free.remove(slot)
            return slot
        # a taken slot is a fault of whoever chose it, never an overwrite
        raise ValueError(f"slot {slot!r} for {key!r} is out of range or taken: allowed one of the "
                         f"{len(self._free)} free slots of 0 .. {self.num_slots - 1}")

    def vacate(self, key: BankKey) -> BankEntry:
        """``key``'s entry gives its slot back but stays listed (spilled: ``slot`` is -1)."""
        entry = self._entries[key]
        self._release(entry)
        entry.slot = -1
        return entry

    def occupy(self, key: BankKey, slot: int | None = None) -> int:
        """A listed entry without a slot takes a free one back (a restore): ``slot``, or the lowest
        free one when None (``ValueError`` when ``slot`` is taken). Returns the slot."""
        entry = self._entries[key]
        entry.slot = self._take(slot, key)
        entry.last_used = self._tick()
        self.bytes_used += entry.nbytes
        self._policy.on_insert(key)
        return entry.slot

    def remove(self, key: BankKey) -> BankEntry:
        """Unlist ``key``; its slot, if it holds one, becomes free (``entry.slot`` still names it,
        so an evict listener can tell which slot it left)."""
        entry = self._entries.pop(key)
        if entry.slot >= 0:
            self._release(entry)
        return entry

    def touch(self, key: BankKey) -> None:
        """A use of ``key``: its clock moves, and a resident key moves to the young end of the policy."""
        entry = self._entries[key]
        entry.last_used = self._tick()
        if entry.slot >= 0:
            self._policy.on_touch(key)

    def clear(self) -> None:
        """Forget every entry and every slot (the bank closed)."""
        self._entries.clear()
        self._free.clear()
        self.bytes_used = 0

    def _release(self, entry: BankEntry) -> None:
        self._policy.on_remove(entry.key)
        self._free.append(entry.slot)
        self.bytes_used -= entry.nbytes

    def _tick(self) -> int:
        self._clock += 1
        return self._clock


def bank_stats(bank: Any) -> dict:
    """A bank's counters, from its public sizes (``Bank.stats``). ``bytes_used``/``capacity_bytes``
    are the host/GPU tier's; ``entries`` and ``total_bytes_used`` cover every tier; ``tiers`` breaks
    them down per tier."""
    disk_cap = bank.disk.capacity_bytes if bank.disk is not None else 0
    disk_entries = bank.entries - bank.host_entries
    return {
        "bytes_used": bank.bytes_used,
        "entries": bank.entries,
        "capacity_bytes": bank.capacity_bytes,
        "slot_bytes": bank.slot_bytes,
        "num_slots": bank.num_slots,
        "free_slots": bank.free_slots,
        "evictions": bank.evictions,
        "tier": bank.tier,
        "pinned": bank.pinned,
        "total_bytes_used": bank.total_bytes_used,
        "disk_bytes_used": bank.disk_bytes_used,
        "disk_entries": disk_entries,
        "spills": bank.spills,
        "restores": bank.restores,
        "disk_errors": bank.disk_errors,
        "tiers": {
            bank.tier: {"entries": bank.host_entries, "bytes_used": bank.bytes_used, "capacity_bytes": bank.capacity_bytes},
            DISK: {"entries": disk_entries, "bytes_used": bank.disk_bytes_used, "capacity_bytes": disk_cap},
        },
        **({"remote": bank.remote.stats()} if bank.remote is not None else {}),
    }
