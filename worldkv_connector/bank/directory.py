"""The scheduler side's view of the bank: which key holds which slot, decided here, no tensors.

vLLM's ``LRUOffloadingManager.prepare_store`` pattern: the scheduler half decides allocation and
eviction and tells the worker half, which only copies and reports. ``prepare_store`` picks a slot
(freeing one when none is free) and returns it with the evicted keys, or None when there is no
room; the step's metadata carries them, and the worker frees the victims, then reserves exactly
that slot (``Bank.reserve(..., slot=s)``).

Victims are ready entries that no planned load pins, entries of finished sessions first (kept
while there is room, never displacing a live session's), then the eviction policy's choice. A
load pins its entry when it is planned (``pin``) and unpins it when the worker reports the load
done or failed (``unpin``), so a load is never planned for an entry evicted since.

Disk tier (``disk_bytes`` > 0): the victim is *spilled* instead of evicted: it stays listed and
ready, without a slot (``on_disk``), and its payload bytes (``entry_bytes(num_tokens)``, the bank's
own formula) count against ``disk_bytes``. When that is over capacity, the least recently used
unpinned disk entries are evicted first; a victim the disk tier cannot take is evicted. The spills
since the last ``take_spilled`` are the metadata's ``spilled``. A planned load of a spilled entry
needs ``prepare_restore``: the slot it comes back into (freed the same way, never taking an entry a
planned load pins). The worker applies a step in that order: evictions, spills, restores, stores.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Iterator

from worldkv_connector.bank.disk import DISK
from worldkv_connector.bank.entry import BankEntry, BankKey
from worldkv_connector.bank.layout import BankLayout
from worldkv_connector.bank.slots import SlotTable
from worldkv_connector.checks import check_int

__all__ = ["SlotDirectory", "apply_moves"]

logger = logging.getLogger(__name__)

_LISTED = "directory"  # BankEntry.tier of a listed entry holding a slot


def _session_of(key: BankKey):
    return key[0] if isinstance(key, tuple) and key else None


class SlotDirectory:
    """Slot, spill and eviction decisions of one bank, for the scheduler half (see the module docstring).

    num_slots: the bank's slots of its host/GPU tier; eviction: the bank's policy name; disk_bytes:
    the disk tier's payload capacity (0: no disk tier); entry_bytes: payload bytes of an entry of
    ``num_tokens`` tokens (``BankLayout.entry_bytes``), needed with a disk tier."""

    def __init__(self, num_slots: int, eviction: str = "lru", *, disk_bytes: int = 0,
                 entry_bytes: Callable[[int], int] | None = None) -> None:
        self.num_slots = check_int("SlotDirectory num_slots", num_slots, 1)
        self.disk_bytes = check_int("SlotDirectory disk_bytes", disk_bytes, 0)
        if self.disk_bytes and entry_bytes is None:
            raise ValueError("SlotDirectory disk_bytes > 0 needs entry_bytes (the bank's payload bytes per entry)")
        self._entry_bytes = entry_bytes
        self._table = SlotTable(num_slots, eviction)
        self._disk: OrderedDict[BankKey, int] = OrderedDict()  # spilled key -> payload bytes, LRU first
        self.disk_bytes_used = 0
        self._spilled: list[BankKey] = []  # spills since the last take_spilled
        self._finished: set = set()  # sessions whose entries are victims first
        self._removing: set[BankKey] = set()  # removed while a planned load pins them: they go at unpin
        self.evictions = 0
        self.spills = 0
        self.restores = 0

    @classmethod
    def for_layout(cls, layout: BankLayout, config) -> "SlotDirectory":
        """The directory of a bank of ``layout`` built from ``config`` (its policy and disk tier)."""
        disk = config.disk_bytes if config.bank_dir is not None else 0
        return cls(layout.num_slots, config.eviction, disk_bytes=disk, entry_bytes=layout.entry_bytes)

    @classmethod
    def for_bank(cls, bank, config) -> "SlotDirectory":
        """The directory of an existing ``bank`` (its ready entries adopted at their slots): the
        decisions of a worker half driven without a scheduler half."""
        directory = cls.for_layout(bank.layout, config)
        for key in bank.keys():
            entry = bank.get(key)
            if entry.ready:
                directory.adopt(key, entry.slot, entry.num_tokens)
        return directory

    @classmethod
    def for_shape(cls, shape, config) -> "SlotDirectory":
        """The directory of ``Bank.for_shape(shape, config)``'s bank."""
        layout = BankLayout(shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.torch_dtype,
                            config.kept_tokens(shape.frame_tokens), config.bank_bytes, config.bank)
        return cls.for_layout(layout, config)

    # --- queries -----------------------------------------------------------------------------------
    def get(self, key: BankKey) -> BankEntry | None:
        return self._table.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __len__(self) -> int:
        return len(self._table)

    def keys(self) -> list[BankKey]:
        """Every listed key (spilled ones too), ready or not, in insertion order."""
        return self._table.keys()

    def on_disk(self, key: BankKey) -> bool:
        """True when ``key`` is listed as spilled (a load of it needs ``prepare_restore`` first)."""
        return key in self._disk

    def ready_tokens(self, key: BankKey) -> int | None:
        """Tokens per layer of ``key``'s entry when it is banked and ready (retrievable), else None."""
        entry = self.get(key)
        return entry.num_tokens if entry is not None and entry.ready and key not in self._removing else None

    def ready_keys(self) -> Iterator[BankKey]:
        return (k for k in self.keys() if self.ready_tokens(k) is not None)

    def slots(self) -> dict[BankKey, tuple[int, bool]]:
        """key -> (slot, ready) of every listed entry (slot -1: spilled)."""
        return {k: (e.slot, e.ready) for k in self.keys() for e in (self.get(k),)}

    def take_spilled(self) -> list[BankKey]:
        """The spills decided since the last call, in order (the step's metadata carries them)."""
        out, self._spilled = self._spilled, []
        return out

    # --- stores ------------------------------------------------------------------------------------
    def prepare_store(self, key: BankKey, num_tokens: int) -> tuple[int, list[BankKey]] | None:
        """A slot for ``key``'s store and the keys evicted to free it, or None when there is no room
        (every entry is being written or pinned by a planned load). A victim spilled instead is in
        ``take_spilled``. ``ValueError`` when ``key`` is already listed."""
        if key in self:
            raise ValueError(f"bank key {key!r} is already banked: it is stored once")
        evicted: list[BankKey] = []
        if not self._table.free_slots and not self._free_a_slot(evicted):
            return None
        entry = BankEntry(key=key, slot=-1, num_tokens=num_tokens, nbytes=0, tier=_LISTED)
        self._table.insert(entry)
        return entry.slot, evicted

    def prepare_restore(self, key: BankKey) -> tuple[int, list[BankKey]] | None:
        """The slot a spilled ``key`` comes back into for a planned load, and the keys evicted to
        free it (a victim spilled instead is in ``take_spilled``); None when there is no room.
        ``ValueError`` when ``key`` is not listed as spilled."""
        if key not in self._disk:
            raise ValueError(f"bank key {key!r} is not on the disk tier: nothing to restore")
        nbytes = self._disk.pop(key)  # its file goes with the restore: never a disk victim meanwhile
        self.disk_bytes_used -= nbytes
        evicted: list[BankKey] = []
        if not self._table.free_slots and not self._free_a_slot(evicted):
            self._disk[key] = nbytes
            self.disk_bytes_used += nbytes
            return None
        slot = self._table.occupy(key)
        self._table.get(key).tier = _LISTED  # type: ignore[union-attr]
        self.restores += 1
        return slot, evicted

    def prepare_restores(self, keys) -> tuple[list[tuple[BankKey, int]], list[BankKey]]:
        """``prepare_restore`` of each spilled key of ``keys`` (the step's planned loads, which pin
        them): ``([(key, slot)], evicted keys)``. A key that finds no slot stays on disk (its load
        then fails on the worker); keys not on disk are skipped."""
        restores, evicted = [], []
        for key in dict.fromkeys(k for k in keys if k in self._disk):
            got = self.prepare_restore(key)
            if got is not None:
                restores.append((key, got[0]))
                evicted.extend(got[1])
        return restores, evicted

    def _free_a_slot(self, evicted: list[BankKey]) -> bool:
        """Spill (or evict) one victim to free a slot; False when nothing may go."""
        victim = self._finished_victim()
        victim = victim if victim is not None else self._table.victim()
        if victim is None:
            return False
        if not self._spill(victim, evicted):
            self._evict(victim, evicted)
        return True

    def _spill(self, key: BankKey, evicted: list[BankKey]) -> bool:
        """Move ``key`` to the disk tier, evicting least recently used unpinned disk entries while it
        is over capacity. False (nothing evicted) without a disk tier or when it cannot make room."""
        if not self.disk_bytes:
            return False
        entry = self._table.get(key)
        need = self._entry_bytes(entry.num_tokens)  # type: ignore[misc,union-attr]
        room, victims = self.disk_bytes - self.disk_bytes_used, []
        for k, nbytes in self._disk.items():
            if room >= need:
                break
            if not self._table.get(k).pins:  # type: ignore[union-attr]
                victims.append(k)
                room += nbytes
        if room < need:
            return False
        for k in victims:
            self._evict(k, evicted)
        self._table.vacate(key)
        entry.tier = DISK  # type: ignore[union-attr]
        self._disk[key] = need
        self.disk_bytes_used += need
        self._spilled.append(key)
        self.spills += 1
        return True

    def _evict(self, key: BankKey, evicted: list[BankKey]) -> None:
        self._drop(key)
        self.evictions += 1
        evicted.append(key)

    def _finished_victim(self) -> BankKey | None:
        """The oldest ready, unpinned, resident entry of a finished session (they never displace a live one)."""
        if not self._finished:
            return None
        for key in self._table.keys():
            entry = self._table.get(key)
            if _session_of(key) in self._finished and entry.ready and not entry.pins and entry.slot >= 0:
                return key
        # sessions with nothing left to give need no more tracking (bounded by the bank)
        self._finished &= {_session_of(k) for k in self._table.keys()}
        return None

    def complete_store(self, key: BankKey, ok: bool, num_tokens: int | None = None) -> None:
        """The worker reported ``key``'s store: ready (``ok``, with the entry's ``num_tokens``) or
        gone (its slot is free again). Unknown keys are ignored."""
        entry = self.get(key)
        if entry is None:
            return
        if not ok:
            self._drop(key)
            return
        entry.ready = True
        if num_tokens is not None:
            entry.num_tokens = num_tokens

    def adopt(self, key: BankKey, slot: int, num_tokens: int) -> None:
        """List a ready entry that arrived in the bank outside a store (a saved bank, the remote
        tier) at the slot the bank gave it (it must be free here; -1: the bank spilled it)."""
        if key in self:
            raise ValueError(f"bank key {key!r} is already banked")
        if slot is None:
            raise ValueError(f"adopt {key!r}: this directory decides the slots, give the bank's slot")
        entry = BankEntry(key=key, slot=-1, num_tokens=num_tokens, nbytes=0, tier=_LISTED, ready=True)
        if slot >= 0:
            self._table.insert(entry, slot)  # ValueError when it is taken or out of range
            return
        if not self.disk_bytes:
            raise ValueError(f"adopt {key!r}: slot {slot}, but this directory has no disk tier")
        entry.tier = DISK
        self._table.insert_spilled(entry)
        self._disk[key] = self._entry_bytes(num_tokens)  # type: ignore[misc]
        self.disk_bytes_used += self._disk[key]

    # --- loads -------------------------------------------------------------------------------------
    def pin(self, key: BankKey, *, touch: bool = True) -> None:
        """A load (``touch``: a retrieval, the young end of the LRU of its tier) or a RoPE reload of
        ``key`` was planned: it is no victim until the worker reports it."""
        entry = self.get(key)
        if entry is None:
            return
        entry.pins += 1
        if touch:
            self._table.touch(key)
            if key in self._disk:
                self._disk.move_to_end(key)

    def unpin(self, key: BankKey, *, every: bool = True) -> bool:
        """The worker reported ``key``'s loads done or failed. ``every``: every read of it ended
        (the video worker reports a key once none of its jobs runs, after the step's jobs were
        submitted); else one planned load ended. True when ``key`` left now (removed while pinned)."""
        entry = self.get(key)
        if entry is None:
            return False
        entry.pins = 0 if every else max(0, entry.pins - 1)
        if key in self._removing and not entry.pins:
            self._drop(key)
            return True
        return False

    # --- leaving -----------------------------------------------------------------------------------
    def finish_session(self, session_id) -> None:
        """A session ended: its entries stay while there is room and are victims first."""
        self._finished.add(session_id)

    def remove_session(self, session_id) -> int:
        """The session's entries leave (a pinned one once its load is reported). Returns how many left now."""
        self._finished.discard(session_id)
        return self.remove([k for k in self.keys() if _session_of(k) == session_id])

    def remove(self, keys) -> int:
        """Unlist ``keys`` (those pinned by a planned load go at ``unpin``). Returns how many left now."""
        gone = 0
        for key in keys:
            entry = self.get(key)
            if entry is None:
                continue
            if entry.pins:
                self._removing.add(key)
                continue
            self._drop(key)
            gone += 1
        return gone

    def forget(self, key: BankKey) -> None:
        """The bank already dropped ``key`` (its own eviction, a damaged spill file, a session
        dropped by the host)."""
        if key in self:
            self._drop(key)

    def _drop(self, key: BankKey) -> None:
        self._removing.discard(key)
        self._table.remove(key)
        nbytes = self._disk.pop(key, None)
        if nbytes is not None:
            self.disk_bytes_used -= nbytes


def apply_moves(bank, spilled, restores) -> list[BankKey]:
    """The worker side of a step's spill and restore decisions, in the directory's order: the
    ``spilled`` keys go to the disk tier, then each ``(key, slot)`` of ``restores`` comes back into
    its slot (``Bank.ensure_resident``). Keys no longer in the bank are skipped. Returns the keys
    whose move failed (a failed write, a refused slot: a fault; a damaged file is the bank's own
    eviction and not listed): the caller drops them and reports them, so the directory forgets them
    and no load reads a wrong slot."""
    failed = []
    for key in spilled:
        if key in bank and not bank.spill(key, decided=True):
            logger.warning("directed spill of %r failed: the entry is dropped", key)
            failed.append(key)
    for key, slot in restores:
        try:
            if key in bank:
                bank.ensure_resident(key, slot)
        except ValueError as exc:
            logger.warning("directed restore of %r refused: %s", key, exc)
            failed.append(key)
    return failed
