"""The bank: fixed-size slots carved out of one slab, with byte accounting and eviction.

One entry is one chunk (video backend, key ``(session_id, chunk_id)``) or one block (vLLM, key
``(namespace, block_hash)``): the K and V of every layer for ``num_tokens`` tokens. Each slot has
the layout ``[num_layers, 2, slot_tokens, num_kv_heads, head_dim]`` (2 = K, V) and an entry uses the
first ``num_tokens`` rows of each (layer, K/V) run, so every run is one contiguous copy fragment.

The host tier is one slab allocated once. When CUDA is present it is pinned with
``cudaHostRegister`` on a plain allocation: torch's pinned allocator rounds every request up to a
power of two, which would waste up to half of a multi-GiB bank (DESIGN §2). The GPU tier is one
slab on the device. Slots never move, so transfer descriptors built from ``view`` stay valid for
the life of an entry.

Optional disk tier (``disk=DiskTier(...)``, or ``bank_dir`` in the config): when the host/GPU tier
is full, the eviction victim is spilled to a file instead of dropped, and ``ensure_resident`` brings
it back into a slot. A spilled entry keeps its key, pose, meta and indices in the bank (``tier ==
"disk"``, ``slot == -1``); only its payload moves. Evict listeners are told only when an entry
leaves the bank entirely (dropped from the host tier without a disk tier, or from the disk tier).

Optional remote tier (``remote=RemoteTier(...)``, or ``remote`` in the config): every entry that
becomes ready is written through to a shared store (Mooncake Store, Redis/Valkey); the host tier
is a cache in front of it (see ``worldkv_connector.remote``).

Accounting: ``bytes_used`` is the host/GPU tier's payload bytes (its meaning from before the disk
tier existed: memory held in the slab); ``disk_bytes_used`` the disk tier's; ``total_bytes_used``
both. ``len(bank)``, ``keys()`` and ``in`` cover every tier: a spilled key is still in the bank.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Iterator

import numpy as np
import torch

from worldkv_connector.config import WorldKVConfig
from worldkv_connector.bank.disk import DISK, DiskSpillMixin, DiskTier, NotResidentError
from worldkv_connector.bank.entry import BankEntry, BankKey
from worldkv_connector.bank.eviction import EvictionPolicy, get_eviction
from worldkv_connector.remote.tier import RemoteTier
from worldkv_connector.machine import host_memory
from worldkv_connector.shapes import KVShape

__all__ = ["Bank", "check_bank_memory"]

logger = logging.getLogger(__name__)

_TIERS = ("cpu", "gpu")
_GiB = 1 << 30


def check_bank_memory(tier: str, device: torch.device | str, nbytes: int) -> None:
    """A bank larger than the machine could ever hold is a configuration error (before allocating)."""
    if tier == "gpu":
        free, total = torch.cuda.mem_get_info(device)
        if nbytes > free:
            raise ValueError(f"bank_bytes: a gpu bank of {nbytes} bytes ({nbytes / _GiB:.3g} GiB) is more than the "
                             f"{free / _GiB:.3g} GiB free on {device} (of {total / _GiB:.3g} GiB); lower bank_bytes")
        return
    total, available = host_memory()
    if total is not None and nbytes > total:
        raise ValueError(f"bank_bytes: a cpu bank of {nbytes} bytes ({nbytes / _GiB:.3g} GiB) is more than this "
                         f"machine's {total / _GiB:.3g} GiB of memory and swap; lower bank_bytes")
    if available is not None and nbytes > available:
        logger.warning("bank of %.3g GiB is more than the %.3g GiB of host memory available now: it is allocated "
                       "lazily, and filling it may swap or fail", nbytes / _GiB, available / _GiB)


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Bank {name}={value!r}: expected a positive int")
    return value


_HOST_REGISTER_PORTABLE = 0x01  # cudaHostRegisterPortable
_HOST_REGISTER_MAPPED = 0x02  # cudaHostRegisterMapped


def _host_register(t: torch.Tensor) -> bool:
    """Pin ``t``'s memory in place (no power-of-two rounding). False, with a warning, on failure."""
    # Portable: usable from every device's context; Mapped: device-addressable, so the SM copy
    # kernel can read and write the slab directly (unified addressing) instead of only DMA.
    flags = _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), flags)
    code = int(getattr(err, "value", err))
    if code != 0:
        logger.warning("cudaHostRegister of %d bytes failed (error %s): the bank stays pageable", t.nbytes, err)
        return False
    return True


def _release(slab: torch.Tensor, pinned: bool) -> None:
    # Runs once, from close() or when the bank is garbage collected without close().
    if pinned:
        err = torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())
        if int(getattr(err, "value", err)) != 0:
            logger.warning("cudaHostUnregister failed (error %s)", err)


class Bank(DiskSpillMixin):
    """A tiered store of KV chunks with a byte capacity and a pluggable eviction policy.

    "No room right now" (every slot holds an entry that is still being written or is pinned) is
    ``reserve`` returning None, not an exception. ``disk``: an optional spill tier the bank then
    owns (closed with the bank); moving entries to and from it (``spill``, ``ensure_resident``,
    ``is_resident``, ``read_payload``) is ``DiskSpillMixin``'s part, in ``disk_tier.py``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        slot_tokens: int,
        capacity_bytes: int,
        tier: str = "cpu",
        eviction: str = "lru",
        device: str | torch.device | None = None,
        pin: bool | None = None,
        disk: DiskTier | None = None,
        remote: RemoteTier | None = None,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("slot_tokens", slot_tokens),
            ("capacity_bytes", capacity_bytes),
        ):
            _positive_int(name, value)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"Bank dtype={dtype!r}: expected a floating torch.dtype")
        if tier not in _TIERS:
            raise ValueError(f"Bank tier={tier!r}: choose one of {list(_TIERS)}")
        if disk is not None and not isinstance(disk, DiskTier):
            raise ValueError(f"Bank disk={disk!r}: expected a DiskTier or None")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.slot_tokens, self.tier = dtype, slot_tokens, tier
        self.capacity_bytes = capacity_bytes
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = num_kv_heads * head_dim * self.itemsize  # one token of K (or V), one layer
        self.slot_bytes = 2 * num_layers * slot_tokens * self.token_bytes
        if self.slot_bytes > capacity_bytes:
            raise ValueError(
                f"chunk of {self.slot_bytes} bytes is larger than the whole bank of {capacity_bytes} bytes: "
                "raise bank_bytes"
            )
        self.num_slots = capacity_bytes // self.slot_bytes
        self.device = self._resolve_device(tier, device)
        self._policy: EvictionPolicy = get_eviction(eviction)
        self.eviction = eviction

        shape = (self.num_slots, num_layers, 2, slot_tokens, num_kv_heads, head_dim)
        slab_bytes = self.num_slots * self.slot_bytes
        check_bank_memory(tier, self.device, slab_bytes)
        try:
            self._slab = torch.empty(shape, dtype=dtype, device=self.device)
        except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            raise ValueError(f"bank_bytes={capacity_bytes} ({capacity_bytes / _GiB:.3g} GiB): the {tier} tier cannot "
                             f"allocate {slab_bytes} bytes on this machine ({str(exc).splitlines()[0][:120]}); "
                             "lower bank_bytes") from None
        want_pin = torch.cuda.is_available() if pin is None else bool(pin)
        if want_pin and tier == "cpu" and not torch.cuda.is_available():
            raise ValueError("Bank pin=True needs CUDA: torch.cuda.is_available() is False")
        self.pinned = bool(want_pin and tier == "cpu" and _host_register(self._slab))
        self._finalizer = weakref.finalize(self, _release, self._slab, self.pinned)

        self._entries: dict[BankKey, BankEntry] = {}
        # pop() hands out the lowest free slot first, so a fresh bank fills slots in order
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))
        self._listeners: list[Callable[[BankKey, BankEntry], None]] = []
        self._clock = 0
        self.bytes_used = 0  # host/GPU tier only (see the module docstring)
        self.evictions = 0  # entries that left the bank by eviction, from any tier
        self.disk = disk
        self.spills = 0  # host -> disk moves
        self.restores = 0  # disk -> host moves
        self.disk_errors = 0  # spilled entries dropped because their file was missing or damaged
        self._protected: BankKey | None = None  # the key ensure_resident is bringing back
        self._closed = False
        # remote tier (worldkv_connector.remote): ready entries are written through to it; the
        # host slab is registered with it so those writes are zero-copy where the store allows
        self.remote = remote
        if remote is not None and tier == "cpu":
            remote.backend.register(self._slab)

    @staticmethod
    def _resolve_device(tier: str, device: str | torch.device | None) -> torch.device:
        if tier == "cpu":
            dev = torch.device("cpu") if device is None else torch.device(device)
            if dev.type != "cpu":
                raise ValueError(f"Bank device={device!r} does not match tier='cpu' (host memory)")
            return dev
        dev = torch.device("cuda") if device is None else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"Bank device={device!r} does not match tier='gpu': expected a cuda device")
        if not torch.cuda.is_available():
            raise ValueError("Bank tier='gpu' needs a CUDA device: torch.cuda.is_available() is False")
        return dev

    @classmethod
    def for_shape(
        cls,
        shape: KVShape,
        config: WorldKVConfig,
        *,
        slot_tokens: int | None = None,
        device: str | torch.device | None = None,
    ) -> "Bank":
        """A bank sized from a model's KV shape and the connector config: slots hold one compressed
        chunk (``config.kept_tokens(shape.frame_tokens)`` tokens) unless ``slot_tokens`` is given.
        A disk tier is added when ``config.bank_dir`` is set (capacity ``config.disk_bytes``)."""
        return cls(
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            dtype=shape.torch_dtype,
            slot_tokens=config.kept_tokens(shape.frame_tokens) if slot_tokens is None else slot_tokens,
            capacity_bytes=config.bank_bytes,
            tier=config.bank,
            eviction=config.eviction,
            device=device,
            disk=DiskTier.from_config(config),
            remote=RemoteTier.from_config(config, shape),
        )

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        """Entries on every tier."""
        return len(self._entries)

    @property
    def host_entries(self) -> int:
        """Entries holding a slot of the host/GPU tier."""
        return self.num_slots - len(self._free) if not self._closed else 0

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def disk_bytes_used(self) -> int:
        return self.disk.bytes_used if self.disk is not None and not self.disk.closed else 0

    @property
    def total_bytes_used(self) -> int:
        """Payload bytes on every tier (``bytes_used`` + ``disk_bytes_used``)."""
        return self.bytes_used + self.disk_bytes_used

    def entry_bytes(self, num_tokens: int) -> int:
        return 2 * self.num_layers * num_tokens * self.token_bytes

    # --- allocation ----------------------------------------------------------------------------
    def reserve(
        self,
        key: BankKey,
        num_tokens: int,
        *,
        indices: torch.Tensor | None = None,
        pose: np.ndarray | None = None,
        meta: dict | None = None,
    ) -> BankEntry | None:
        """Allocate a slot for ``key`` (not ready until ``mark_ready``), evicting per policy among
        ready, unpinned entries when the bank is full (spilling them to the disk tier if there is
        one). Returns None when there is still no room.

        indices: kept token ids ``[L, num_tokens]`` (or ``[num_tokens]``), any int dtype, any
        device; stored as CPU int64. pose: the entry's camera pose (any array-like).
        """
        self._check_open()
        if key in self._entries:
            raise ValueError(f"bank key {key!r} already exists: free it before storing it again")
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or not 1 <= num_tokens <= self.slot_tokens:
            raise ValueError(f"num_tokens={num_tokens!r} is out of range: allowed 1 <= num_tokens <= {self.slot_tokens}")
        if indices is not None:
            if not isinstance(indices, torch.Tensor) or indices.ndim not in (1, 2) or indices.shape[-1] != num_tokens:
                got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
                raise ValueError(f"indices must be [{self.num_layers}, {num_tokens}] token ids, got {got}")
            if indices.ndim == 2 and indices.shape[0] != self.num_layers:
                raise ValueError(f"indices must be [{self.num_layers}, {num_tokens}] token ids, got {tuple(indices.shape)}")
            indices = indices.detach().to("cpu", torch.int64)
        if not self._make_room():
            return None
        self._clock += 1
        entry = BankEntry(
            key=key,
            slot=self._free.pop(),
            num_tokens=num_tokens,
            nbytes=self.entry_bytes(num_tokens),
            tier=self.tier,
            last_used=self._clock,
            indices=indices,
            pose=None if pose is None else np.asarray(pose),
            meta=dict(meta or {}),
        )
        self._entries[key] = entry
        self.bytes_used += entry.nbytes
        self._policy.on_insert(key)
        return entry

    def _make_room(self) -> bool:
        """Free a slot if none is free, demoting policy victims. False when nothing may go."""
        while not self._free:
            # the policy only knows host keys (spilled keys leave its order), so it never picks one
            victim = self._policy.choose_victim(self._entries)
            if victim is None:
                return False
            if self._entries[victim].tier == DISK:
                raise RuntimeError(f"eviction policy {self.eviction!r} chose {victim!r}, which is not resident")
            self._demote(victim)
        return True

    def _demote(self, key: BankKey) -> None:
        """Move a ready, unpinned host entry to the disk tier, or evict it when that fails."""
        if not self._spill(key):
            self._evict(key)

    def _remove(self, key: BankKey) -> BankEntry:
        entry = self._entries.pop(key)
        if entry.tier == DISK:
            self.disk.remove(key)  # type: ignore[union-attr]  # disk entries exist only with a disk tier
            return entry
        self._policy.on_remove(key)
        self._free.append(entry.slot)
        self.bytes_used -= entry.nbytes
        return entry

    def _evict(self, key: BankKey) -> None:
        entry = self._remove(key)
        self.evictions += 1
        logger.debug("bank evicted %r (%d bytes, %s tier)", key, entry.nbytes, entry.tier)
        # listeners run after the slot is free, so they see a consistent bank (e.g. drop the key
        # from the pose index)
        for fn in list(self._listeners):
            fn(key, entry)

    def free(self, key: BankKey) -> bool:
        """Release ``key``'s slot. False if absent; ValueError if a transfer still pins it."""
        self._check_open()
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.pins:
            raise ValueError(f"bank key {key!r} is pinned by {entry.pins} in-flight transfer(s): unpin it first")
        self._remove(key)
        return True

    def free_where(self, predicate: Callable[[BankKey], bool]) -> int:
        """Free every entry whose key matches (e.g. one session's chunks). Pinned matches are
        skipped, since a transfer still uses them. Returns how many were freed."""
        self._check_open()
        freed = 0
        for key in [k for k in self._entries if predicate(k)]:
            if self._entries[key].pins:
                logger.debug("free_where skipped pinned bank key %r", key)
                continue
            self._remove(key)
            freed += 1
        return freed

    # --- entry state ---------------------------------------------------------------------------
    def _entry(self, key: BankKey) -> BankEntry:
        self._check_open()
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"bank key {key!r} is not in the bank") from None

    def mark_ready(self, key: BankKey) -> None:
        """The entry's store finished: it may now be loaded and evicted (and, with a remote tier,
        it is written through to it; a failed remote write leaves the entry banked here)."""
        entry = self._entry(key)
        entry.ready = True
        if self.remote is not None:
            self.remote.write_entry(key, entry, self._slab[entry.slot, :, :, : entry.num_tokens])

    def touch(self, key: BankKey) -> None:
        """Record a retrieval of ``key`` (moves it to the young end of LRU, of its own tier)."""
        entry = self._entry(key)
        self._clock += 1
        entry.last_used = self._clock
        if entry.tier == DISK:
            self.disk.touch(key)  # type: ignore[union-attr]
        else:
            self._policy.on_touch(key)

    def pin(self, key: BankKey) -> None:
        self._entry(key).pins += 1

    def unpin(self, key: BankKey) -> None:
        entry = self._entry(key)
        if entry.pins == 0:
            raise ValueError(f"bank key {key!r} is not pinned")
        entry.pins -= 1

    def get(self, key: BankKey) -> BankEntry | None:
        return self._entries.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterator[BankKey]:
        return iter(list(self._entries))

    def add_evict_listener(self, fn: Callable[[BankKey, BankEntry], None]) -> None:
        """Call ``fn(key, entry)`` after each eviction, i.e. when an entry leaves the bank without
        an explicit ``free`` (a spill to the disk tier is not an eviction)."""
        self._listeners.append(fn)

    # --- payload views -------------------------------------------------------------------------
    def slot_view(self, slot: int) -> torch.Tensor:
        """``[num_layers, 2, slot_tokens, H, D]`` view of one slot, bank dtype, bank device."""
        self._check_open()
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot={slot!r} is out of range: allowed 0 <= slot < {self.num_slots}")
        return self._slab[slot]

    def view(self, key: BankKey) -> torch.Tensor:
        """``[num_layers, 2, num_tokens, H, D]`` view of ``key``'s payload (strided: each
        ``[layer, k_or_v]`` run is contiguous), bank dtype, bank device."""
        entry = self._entry(key)
        if entry.tier == DISK:
            raise NotResidentError(f"bank key {key!r} is on the disk tier: call ensure_resident(key) first")
        return self._slab[entry.slot, :, :, : entry.num_tokens]

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
        disk_cap = self.disk.capacity_bytes if self.disk is not None else 0
        disk_entries = len(self._entries) - self.host_entries
        return {
            "bytes_used": self.bytes_used,
            "entries": len(self._entries),
            "capacity_bytes": self.capacity_bytes,
            "slot_bytes": self.slot_bytes,
            "num_slots": self.num_slots,
            "free_slots": len(self._free),
            "evictions": self.evictions,
            "tier": self.tier,
            "pinned": self.pinned,
            "total_bytes_used": self.total_bytes_used,
            "disk_bytes_used": self.disk_bytes_used,
            "disk_entries": disk_entries,
            "spills": self.spills,
            "restores": self.restores,
            "disk_errors": self.disk_errors,
            "tiers": {
                self.tier: {"entries": self.host_entries, "bytes_used": self.bytes_used, "capacity_bytes": self.capacity_bytes},
                DISK: {"entries": disk_entries, "bytes_used": self.disk_bytes_used, "capacity_bytes": disk_cap},
            },
            **({"remote": self.remote.stats()} if self.remote is not None else {}),
        }

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
        pinned = sum(1 for e in self._entries.values() if e.pins)
        if pinned:
            logger.warning("closing a bank with %d entries pinned by in-flight transfers", pinned)
        self._closed = True
        self._entries.clear()
        self._free.clear()
        self.bytes_used = 0
        self._slab = None  # type: ignore[assignment]
        self._finalizer()
        if self.disk is not None:
            self.disk.close()
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> "Bank":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Bank(tier={self.tier!r}, slots={self.num_slots} x {self.slot_bytes} B, "
            f"entries={len(self._entries)}, bytes_used={self.bytes_used}, disk_bytes_used={self.disk_bytes_used}, "
            f"eviction={self.eviction!r})"
        )
