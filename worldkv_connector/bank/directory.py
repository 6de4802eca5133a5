"""The scheduler side's view of the bank: which key holds which slot, decided here, no tensors.

vLLM's ``LRUOffloadingManager.prepare_store`` pattern: the scheduler half decides allocation and
eviction and tells the worker half, which only copies and reports. ``prepare_store`` picks a slot
(evicting a victim when none is free) and returns it with the evicted keys, or None when there is
no room; the step's metadata carries both, and the worker frees the victims, then reserves exactly
that slot (``Bank.reserve(..., slot=s)``).

Victims are ready entries that no planned load pins, entries of finished sessions first (kept
while there is room, never displacing a live session's), then the eviction policy's choice. A
load pins its entry when it is planned (``pin``) and unpins it when the worker reports the load
done or failed (``unpin``), so a load is never planned for an entry evicted since.

Two modes. **Deciding** (``num_slots`` given): the directory owns the host/GPU tier's slots.
**Listing** (``num_slots`` None: a bank with a disk tier, where an eviction is a spill the bank
decides, or a scheduler run without a bank shape): the bank decides, ``prepare_store`` gives no
slot, and the directory only lists what the worker reports banked or evicted.
"""
from __future__ import annotations

from typing import Iterator

from worldkv_connector.bank.entry import BankEntry, BankKey
from worldkv_connector.bank.layout import BankLayout
from worldkv_connector.bank.slots import SlotTable

__all__ = ["SlotDirectory"]


def _session_of(key: BankKey):
    return key[0] if isinstance(key, tuple) and key else None


class SlotDirectory:
    """Slot decisions and bookkeeping of one bank, for the scheduler half (see the module docstring).

    num_slots: the bank's slots (None: listing mode); eviction: the bank's policy name."""

    def __init__(self, num_slots: int | None, eviction: str = "lru") -> None:
        self.num_slots = num_slots
        self._table = SlotTable(num_slots, eviction) if num_slots is not None else None
        self._listed: dict[BankKey, BankEntry] = {}  # listing mode's entries
        self._finished: set = set()  # sessions whose entries are victims first
        self._removing: set[BankKey] = set()  # removed while a planned load pins them: they go at unpin
        self.evictions = 0

    @classmethod
    def for_shape(cls, shape, config) -> "SlotDirectory":
        """The directory of ``Bank.for_shape(shape, config)``'s bank: deciding, unless the config has a
        disk tier (whose spills the bank decides)."""
        if config.bank_dir is not None and config.disk_bytes != 0:
            return cls(None, config.eviction)
        layout = BankLayout(shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.torch_dtype,
                            config.kept_tokens(shape.frame_tokens), config.bank_bytes, config.bank)
        return cls(layout.num_slots, config.eviction)

    @property
    def decides(self) -> bool:
        """True when this directory chooses slots and victims (deciding mode)."""
        return self._table is not None

    # --- queries -----------------------------------------------------------------------------------
    def get(self, key: BankKey) -> BankEntry | None:
        return self._table.get(key) if self._table is not None else self._listed.get(key)

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._table) if self._table is not None else len(self._listed)

    def keys(self) -> list[BankKey]:
        """Every listed key, ready or not, in insertion order."""
        return self._table.keys() if self._table is not None else list(self._listed)

    def ready_tokens(self, key: BankKey) -> int | None:
        """Tokens per layer of ``key``'s entry when it is banked and ready (retrievable), else None."""
        entry = self.get(key)
        return entry.num_tokens if entry is not None and entry.ready and key not in self._removing else None

    def ready_keys(self) -> Iterator[BankKey]:
        return (k for k in self.keys() if self.ready_tokens(k) is not None)

    def slots(self) -> dict[BankKey, tuple[int, bool]]:
        """key -> (slot, ready) of every listed entry (slot -1 in listing mode)."""
        return {k: (e.slot, e.ready) for k in self.keys() for e in (self.get(k),)}

    # --- stores ------------------------------------------------------------------------------------
    def prepare_store(self, key: BankKey, num_tokens: int) -> tuple[int | None, list[BankKey]] | None:
        """A slot for ``key``'s store and the keys evicted to free it, or None when there is no room
        (every entry is being written or pinned by a planned load). Listing mode: ``(None, [])``,
        the bank picks. ``ValueError`` when ``key`` is already listed."""
        if key in self:
            raise ValueError(f"bank key {key!r} is already banked: it is stored once")
        entry = BankEntry(key=key, slot=-1, num_tokens=num_tokens, nbytes=0, tier="directory")
        if self._table is None:
            self._listed[key] = entry
            return None, []
        evicted = []
        if not self._table.free_slots:
            victim = self._finished_victim()
            victim = victim if victim is not None else self._table.victim()
            if victim is None:
                return None
            self._table.remove(victim)
            self.evictions += 1
            evicted.append(victim)
        self._table.insert(entry)
        return entry.slot, evicted

    def _finished_victim(self) -> BankKey | None:
        """The oldest ready, unpinned entry of a finished session (they never displace a live one)."""
        if not self._finished:
            return None
        for key in self._table.keys():  # type: ignore[union-attr]
            entry = self._table.get(key)  # type: ignore[union-attr]
            if _session_of(key) in self._finished and entry.ready and not entry.pins:
                return key
        # sessions with nothing left to give need no more tracking (bounded by the bank)
        self._finished &= {_session_of(k) for k in self._table.keys()}  # type: ignore[union-attr]
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

    def adopt(self, key: BankKey, slot: int | None, num_tokens: int) -> None:
        """List a ready entry that arrived in the bank outside a store (a saved bank, the remote
        tier) at the slot the bank gave it (deciding mode: required, and it must be free here)."""
        if key in self:
            raise ValueError(f"bank key {key!r} is already banked")
        entry = BankEntry(key=key, slot=-1, num_tokens=num_tokens, nbytes=0, tier="directory", ready=True)
        if self._table is None:
            self._listed[key] = entry
            return
        if slot is None:
            raise ValueError(f"adopt {key!r}: this directory decides the slots, give the bank's slot")
        self._table.insert(entry, slot)

    # --- loads -------------------------------------------------------------------------------------
    def pin(self, key: BankKey, *, touch: bool = True) -> None:
        """A load (``touch``: a retrieval, the LRU's young end) or a RoPE reload of ``key`` was
        planned: it is no victim until the worker reports it."""
        entry = self.get(key)
        if entry is None:
            return
        entry.pins += 1
        if touch and self._table is not None:
            self._table.touch(key)

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
        """The bank already dropped ``key`` (its own eviction, or a session dropped by the host)."""
        if key in self:
            self._drop(key)

    def _drop(self, key: BankKey) -> None:
        self._removing.discard(key)
        if self._table is not None:
            self._table.remove(key)
        else:
            self._listed.pop(key, None)
