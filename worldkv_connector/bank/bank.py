"""The bank: fixed-size slots carved out of one slab, with byte accounting and eviction.

One entry is one chunk (video backend, key ``(session_id, chunk_id)``) or one block (vLLM, key
``(namespace, block_hash)``): the K and V of every layer for ``num_tokens`` tokens, in one slot of
``[num_layers, 2, slot_tokens, num_kv_heads, head_dim]`` (``layout``).

The host tier is one slab allocated once (``slab``); slots never move, so transfer descriptors
built from ``view`` stay valid for the life of an entry. Which entry holds which slot, and the
eviction order, is the ``SlotTable``'s (``slots``); the slot sizes are the ``BankLayout``'s.

Optional disk tier (``disk=DiskTier(...)``, or ``bank_dir`` in the config; see ``spill``): the
eviction victim of a full host/GPU tier is spilled to a file instead of dropped, and
``ensure_resident`` brings it back. A connector's ``SlotDirectory`` decides both (``reserve``,
``spill`` and ``ensure_resident`` with its slot); a bank used on its own decides them itself.
Evict listeners are told only when an entry leaves the bank.

Optional remote tier (``remote=RemoteTier(...)``, or ``remote`` in the config): every entry that
becomes ready is written through to a shared store (Mooncake Store, Redis/Valkey); the host tier
is a cache in front of it (see ``worldkv_connector.remote``).

Accounting: ``bytes_used`` is the host/GPU tier's payload bytes (memory held in the slab),
``disk_bytes_used`` the disk tier's, ``total_bytes_used`` both. ``len(bank)``, ``keys()`` and ``in``
cover every tier: a spilled key is still in the bank.
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable, Iterator

import numpy as np
import torch

from worldkv_connector.bank.disk import DISK, DiskTier, NotResidentError
from worldkv_connector.bank.entry import BankEntry, BankKey
from worldkv_connector.bank.layout import BankLayout
from worldkv_connector.bank.slab import SlabViews, allocate_slab, check_bank_memory, release_slab, resolve_device
from worldkv_connector.bank.slots import SlotTable, bank_stats
from worldkv_connector.bank.spill import DiskSpill
from worldkv_connector.checks import check_int
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.remote.tier import RemoteTier
from worldkv_connector.shapes import KVShape

__all__ = ["Bank", "check_bank_memory"]

logger = logging.getLogger(__name__)


class Bank:
    """A tiered store of KV chunks with a byte capacity and a pluggable eviction policy.

    "No room right now" (every slot holds an entry that is still being written or is pinned) is
    ``reserve`` returning None, not an exception. The bank is composed of its slab (payloads), a
    ``SlotTable`` (which entry holds which slot, in eviction order), and optionally a ``DiskSpill``
    around ``disk`` (a spill tier the bank then owns, closed with the bank) and a remote tier.
    """

    def __init__(
        self,
        *,
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
        slot_tokens: int, capacity_bytes: int, tier: str = "cpu", eviction: str = "lru",
        device: str | torch.device | None = None, pin: bool | None = None,
        disk: DiskTier | None = None, remote: RemoteTier | None = None,
    ) -> None:
        self.layout = layout = BankLayout(num_layers, num_kv_heads, head_dim, dtype, slot_tokens, capacity_bytes, tier)
        if disk is not None and not isinstance(disk, DiskTier):
            raise ValueError(f"Bank disk={disk!r}: expected a DiskTier or None")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.slot_tokens, self.tier = dtype, slot_tokens, tier
        self.capacity_bytes, self.itemsize, self.token_bytes = capacity_bytes, layout.itemsize, layout.token_bytes
        self.slot_bytes, self.num_slots = layout.slot_bytes, layout.num_slots
        self.device = resolve_device(tier, device)
        self._table = SlotTable(self.num_slots, eviction)  # validates the policy name first
        self.eviction = eviction

        self._slab, self.pinned = allocate_slab(layout.slab_shape(), dtype, tier, self.device, capacity_bytes, pin)
        self._finalizer = weakref.finalize(self, release_slab, self._slab, self.pinned)
        self._views = SlabViews(self._slab)

        self._listeners: list[Callable[[BankKey, BankEntry], None]] = []
        self.evictions = 0  # entries that left the bank by eviction, from any tier
        self._spill = DiskSpill(disk) if disk is not None else None
        self._closed = False
        # remote tier (worldkv_connector.remote): ready entries are written through to it; the
        # host slab is registered with it so those writes are zero-copy where the store allows
        self.remote = remote
        if remote is not None and tier == "cpu":
            remote.backend.register(self._slab)

    @classmethod
    def for_shape(cls, shape: KVShape, config: WorldKVConfig, *, slot_tokens: int | None = None,
                  device: str | torch.device | None = None) -> "Bank":
        """A bank sized from a model's KV shape and the connector config: slots hold one compressed
        chunk (``config.kept_tokens(shape.frame_tokens)`` tokens) unless ``slot_tokens`` is given.
        A disk tier is added when ``config.bank_dir`` is set (capacity ``config.disk_bytes``)."""
        return cls(
            num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
            dtype=shape.torch_dtype,
            slot_tokens=config.kept_tokens(shape.frame_tokens) if slot_tokens is None else slot_tokens,
            capacity_bytes=config.bank_bytes, tier=config.bank, eviction=config.eviction, device=device,
            disk=DiskTier.from_config(config), remote=RemoteTier.from_config(config, shape),
        )

    # --- sizes and counters --------------------------------------------------------------------
    @property
    def disk(self) -> DiskTier | None:  # None without a disk tier
        return self._spill.tier if self._spill is not None else None

    @property
    def bytes_used(self) -> int:
        """Payload bytes held in the host/GPU tier (see the module docstring)."""
        return self._table.bytes_used

    @property
    def spills(self) -> int:  # host -> disk moves
        return self._spill.spills if self._spill is not None else 0

    @property
    def restores(self) -> int:  # disk -> host moves
        return self._spill.restores if self._spill is not None else 0

    @property
    def disk_errors(self) -> int:  # spilled entries dropped because their file was missing or damaged
        return self._spill.errors if self._spill is not None else 0

    @property
    def entries(self) -> int:
        """Entries on every tier."""
        return len(self._table)

    @property
    def host_entries(self) -> int:
        """Entries holding a slot of the host/GPU tier."""
        return self.num_slots - self._table.free_slots if not self._closed else 0

    @property
    def free_slots(self) -> int:
        return self._table.free_slots

    @property
    def disk_bytes_used(self) -> int:
        return self._spill.bytes_used if self._spill is not None else 0

    @property
    def total_bytes_used(self) -> int:
        """Payload bytes on every tier (``bytes_used`` + ``disk_bytes_used``)."""
        return self.bytes_used + self.disk_bytes_used

    # --- allocation ----------------------------------------------------------------------------
    def reserve(self, key: BankKey, num_tokens: int, *, indices: torch.Tensor | None = None,
                pose: np.ndarray | None = None, meta: dict | None = None, slot: int | None = None) -> BankEntry | None:
        """Allocate a slot for ``key`` (not ready until ``mark_ready``), evicting per policy among
        ready, unpinned entries when the bank is full (spilling them to the disk tier if there is
        one). Returns None when there is still no room.

        slot: take exactly this slot, decided by the owner of a ``SlotDirectory`` (no eviction
        here); ``ValueError`` when it is out of range or taken, never an overwrite.

        indices: kept token ids ``[L, num_tokens]`` (or ``[num_tokens]``), any int dtype, any
        device; stored as CPU int64. pose: the entry's camera pose (any array-like).
        """
        self._check_open()
        if key in self._table:
            raise ValueError(f"bank key {key!r} already exists: free it before storing it again")
        self.layout.check_tokens(num_tokens)
        indices = self.layout.kept_indices(indices, num_tokens)
        if slot is None and not self._make_room():
            return None
        entry = BankEntry(key=key, slot=-1, num_tokens=num_tokens, nbytes=self.layout.entry_bytes(num_tokens),
                          tier=self.tier, indices=indices, pose=None if pose is None else np.asarray(pose),
                          meta=dict(meta or {}))
        self._table.insert(entry, slot)  # gives it a slot (ValueError: ``slot`` is taken or out of range)
        return entry

    def _make_room(self) -> bool:
        """Free a slot if none is free, demoting policy victims. False when nothing may go."""
        while not self._table.free_slots:
            victim = self._table.victim()
            if victim is None:
                return False
            if not self._spill_entry(victim):  # no disk tier, or it has no room: evicted instead
                self._evict(victim)
        return True

    def _remove(self, key: BankKey) -> BankEntry:
        entry = self._table.remove(key)
        if entry.tier == DISK:
            self._spill.remove(key)  # type: ignore[union-attr]  # disk entries exist only with a disk tier
        return entry

    def _evict(self, key: BankKey) -> None:
        entry = self._remove(key)
        self.evictions += 1
        logger.debug("bank evicted %r (%d bytes, %s tier)", key, entry.nbytes, entry.tier)
        # listeners run after the slot is free, so they see a consistent bank (e.g. drop the key
        # from the pose index)
        for fn in list(self._listeners):
            fn(key, entry)

    def free(self, key: BankKey, *, evict: bool = False) -> bool:
        """Release ``key``'s slot; ``evict``: as an eviction decided by a ``SlotDirectory`` (counted in
        ``evictions``, listeners told). False if absent; ValueError if a transfer still pins it."""
        self._check_open()
        entry = self._table.get(key)
        if entry is None:
            return False
        if entry.pins:
            raise ValueError(f"bank key {key!r} is pinned by {entry.pins} in-flight transfer(s): unpin it first")
        self._evict(key) if evict else self._remove(key)
        return True

    def free_where(self, predicate: Callable[[BankKey], bool]) -> int:
        """Free every entry whose key matches (e.g. one session's chunks). Pinned matches are
        skipped, since a transfer still uses them. Returns how many were freed."""
        self._check_open()
        freed = 0
        for key in [k for k in self._table.keys() if predicate(k)]:
            if self._table.get(key).pins:  # type: ignore[union-attr]
                logger.debug("free_where skipped pinned bank key %r", key)
                continue
            self._remove(key)
            freed += 1
        return freed

    # --- the disk tier -------------------------------------------------------------------------
    def _spill_entry(self, key: BankKey, decided: bool = False) -> bool:
        """Move a ready, unpinned host entry's payload to the disk tier. False without a disk tier
        or when it has no room (the disk files it dropped meanwhile have left the bank)."""
        if self._spill is None:
            return False
        entry = self._table.get(key)
        stored, dropped = self._spill.put(key, self._payload(entry), self._unpinned, decided)
        for gone in dropped:  # the disk tier made room: those entries leave the bank entirely
            self._evict(gone)
        if not stored:
            return False
        self._table.vacate(key)
        entry.tier = DISK
        return True

    def _unpinned(self, key: BankKey) -> bool:
        entry = self._table.get(key)
        return entry is not None and entry.pins == 0

    def is_resident(self, key: BankKey) -> bool:
        """True when ``key``'s payload is in a slot (``view`` works)."""
        return self._entry(key).tier != DISK

    def spill(self, key: BankKey, *, decided: bool = False) -> bool:
        """Move a ready, unpinned host entry to the disk tier now. False when there is no disk
        tier, the entry is not resident, not ready or pinned, or the disk tier has no room.
        decided: by a ``SlotDirectory``, which made the disk tier's room (``DiskTier.put``)."""
        entry = self._entry(key)
        if entry.tier == DISK or not entry.ready or entry.pins:
            return False
        return self._spill_entry(key, decided)

    def ensure_resident(self, key: BankKey, slot: int | None = None) -> bool:
        """Bring a spilled entry back into a slot: ``slot``, decided by a ``SlotDirectory`` (free,
        else ``ValueError``; nothing is demoted here), or when None the bank's choice (demoting a
        policy victim if the tier is full).

        True when ``key`` is resident afterwards. False when there is no room right now (every
        slot is unready or pinned), or when its file was missing or damaged: the entry is then
        dropped from the bank (listeners are told, ``disk_errors`` counts it) rather than ever
        serving wrong bytes.
        """
        entry = self._entry(key)
        if entry.tier != DISK:
            return True
        if slot is None and not self._table.can_free_a_slot():
            return False  # no room right now: nothing was moved
        # read and verified before anything moves: a damaged file must not cost a resident entry
        data = self._empty_payload(entry.num_tokens)
        if not self._spill.load(key, data):  # type: ignore[union-attr]
            self._evict(key)
            return False
        with self._spill.protecting(key):  # type: ignore[union-attr]  # spilling a victim may drop disk files
            if slot is None and not self._make_room():
                return False
        slot = self._table.occupy(key, slot)  # ValueError when ``slot`` is taken: the entry stays on disk
        self._slab[slot, :, :, : entry.num_tokens].copy_(data)
        entry.tier = self.tier
        self._spill.restored(key)  # type: ignore[union-attr]
        return True

    def read_payload(self, key: BankKey) -> torch.Tensor:
        """A contiguous CPU copy ``[num_layers, 2, num_tokens, H, D]`` (bank dtype) of ``key``'s
        payload from whichever tier holds it; the entry does not move. ``DiskTierError`` if its
        file is damaged."""
        entry = self._entry(key)
        if entry.tier != DISK:
            return self.view(key).to("cpu", copy=True).contiguous()
        out = self._empty_payload(entry.num_tokens)
        self._spill.read(key, out)  # type: ignore[union-attr]
        return out

    def _empty_payload(self, num_tokens: int) -> torch.Tensor:
        return torch.empty(self.layout.payload_shape(num_tokens), dtype=self.dtype)

    # --- entry state ---------------------------------------------------------------------------
    def _entry(self, key: BankKey) -> BankEntry:
        self._check_open()
        entry = self._table.get(key)
        if entry is None:
            raise KeyError(f"bank key {key!r} is not in the bank")
        return entry

    def mark_ready(self, key: BankKey) -> None:
        """The entry's store finished: it may now be loaded and evicted (and, with a remote tier,
        it is written through to it; a failed remote write leaves the entry banked here)."""
        entry = self._entry(key)
        entry.ready = True
        if self.remote is not None:
            self.remote.write_entry(key, entry, self._payload(entry))

    def touch(self, key: BankKey) -> None:
        """Record a retrieval of ``key`` (moves it to the young end of LRU, of its own tier)."""
        entry = self._entry(key)
        self._table.touch(key)
        if entry.tier == DISK:
            self._spill.touch(key)  # type: ignore[union-attr]

    def pin(self, key: BankKey) -> None:
        self._entry(key).pins += 1

    def unpin(self, key: BankKey) -> None:
        entry = self._entry(key)
        if entry.pins == 0:
            raise ValueError(f"bank key {key!r} is not pinned")
        entry.pins -= 1

    def get(self, key: BankKey) -> BankEntry | None:
        return self._table.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __len__(self) -> int:
        return len(self._table)

    def keys(self) -> Iterator[BankKey]:
        return iter(self._table.keys())

    def add_evict_listener(self, fn: Callable[[BankKey, BankEntry], None]) -> None:
        """Call ``fn(key, entry)`` after each eviction, i.e. when an entry leaves the bank without
        an explicit ``free`` (a spill to the disk tier is not an eviction)."""
        self._listeners.append(fn)

    # --- payload views -------------------------------------------------------------------------
    def _payload(self, entry: BankEntry) -> torch.Tensor:
        return self._views.get(entry.slot, entry.num_tokens)

    def slot_view(self, slot: int) -> torch.Tensor:
        """``[num_layers, 2, slot_tokens, H, D]`` view of one slot, bank dtype, bank device."""
        self._check_open()
        slot = check_int("slot", slot, 0, self.num_slots - 1)
        return self._slab[slot]

    def view(self, key: BankKey) -> torch.Tensor:
        """``[num_layers, 2, num_tokens, H, D]`` view of ``key``'s payload (strided: each
        ``[layer, k_or_v]`` run is contiguous), bank dtype, bank device; one shared object per
        (slot, tokens): write its data, never its metadata (``SlabViews``)."""
        entry = self._entry(key)
        if entry.tier == DISK:
            raise NotResidentError(f"bank key {key!r} is on the disk tier: call ensure_resident(key) first")
        return self._payload(entry)

    def attach_remote(self, remote: RemoteTier) -> None:
        """Replace the remote tier (closing the previous one), e.g. with a rank's own tier; its
        backend gets the host slab registered for zero-copy transfers."""
        self._check_open()
        if self.remote is not None and self.remote is not remote:
            self.remote.close()
        self.remote = remote
        if self.tier == "cpu":
            remote.backend.register(self._slab)

    # --- reporting and lifetime ----------------------------------------------------------------
    def stats(self) -> dict:
        """Counters. ``bytes_used``/``capacity_bytes`` are the host/GPU tier's; ``entries`` and
        ``total_bytes_used`` cover every tier; ``tiers`` breaks them down per tier."""
        return bank_stats(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the bank is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unregister pinned memory, drop the slab and delete the disk tier's files (after in-flight
        transfers finished). Idempotent; any later use raises ``RuntimeError``."""
        if self._closed:
            return
        pinned = sum(1 for e in self._table.values() if e.pins)
        if pinned:
            logger.warning("closing a bank with %d entries pinned by in-flight transfers", pinned)
        self._closed = True
        self._table.clear()
        self._slab = self._views = None  # type: ignore[assignment]  # views hold the slab's storage
        self._finalizer()
        if self._spill is not None:
            self._spill.close()
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> "Bank":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Bank(tier={self.tier!r}, slots={self.num_slots} x {self.slot_bytes} B, entries={len(self._table)}, "
                f"bytes_used={self.bytes_used}, disk_bytes_used={self.disk_bytes_used}, eviction={self.eviction!r})")
