"""The bank's disk tier as an object the bank holds: writes a resident entry's payload to a spill
file, reads it back verified, and counts the moves. The bank keeps its own slot bookkeeping and
tells this object, per call, which keys the disk tier may drop to make room (``can_evict``).

When the host/GPU tier is full, the bank's eviction victim is spilled to a file instead of dropped,
and ``Bank.ensure_resident`` brings it back into a slot. A spilled entry keeps its key, pose, meta
and indices in the bank (``tier == "disk"``, ``slot == -1``); only its payload moves. Evict
listeners are told only when an entry leaves the bank entirely (dropped from the host tier without
a disk tier, or from the disk tier).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Hashable, Iterator

import torch

from worldkv_connector.bank.disk import DiskTier, DiskTierError

__all__ = ["DiskSpill"]

logger = logging.getLogger(__name__)


class DiskSpill:
    """Moves payloads between the bank's slots and ``tier`` (a ``DiskTier`` it then owns).

    ``spills``/``restores`` count host -> disk and disk -> host moves; ``errors`` the spilled entries
    whose file was missing or damaged when they were brought back.
    """

    def __init__(self, tier: DiskTier) -> None:
        self.tier = tier
        self.spills = 0
        self.restores = 0
        self.errors = 0
        self._protected: Hashable | None = None  # the key being brought back: never dropped meanwhile

    @property
    def bytes_used(self) -> int:
        return self.tier.bytes_used if not self.tier.closed else 0

    def put(self, key: Hashable, payload: torch.Tensor, can_evict: Callable[[Hashable], bool],
            decided: bool = False) -> tuple[bool, list[Hashable]]:
        """Write ``payload`` (``[L, 2, T, H, D]``, bank dtype) as ``key``'s spill file, dropping least
        recently used files with ``can_evict(key)`` true when it does not fit (none when ``decided``:
        see ``DiskTier.put``). Returns ``(stored, dropped_keys)``: the dropped keys have left the disk
        tier, the bank must unlist them."""
        stored, dropped = self.tier.put(key, payload, can_evict=lambda k: k != self._protected and can_evict(k),
                                        decided=decided)
        if stored:
            self.spills += 1
            logger.debug("bank spilled %r to disk (%d bytes)", key, payload.numel() * payload.element_size())
        return stored, dropped

    def read(self, key: Hashable, out: torch.Tensor) -> None:
        """Copy ``key``'s verified payload into ``out`` (``[L, 2, T, H, D]``); ``DiskTierError`` when
        its file is missing or damaged (not counted: the entry is not being brought back)."""
        self.tier.read(key, out)

    def load(self, key: Hashable, out: torch.Tensor) -> bool:
        """``read`` for a restore: False, counted in ``errors`` and logged once, when the file is
        missing or damaged (the bank then drops the entry rather than ever serve wrong bytes)."""
        try:
            self.tier.read(key, out)
        except DiskTierError as exc:
            self.errors += 1
            logger.warning("dropping bank entry %r: %s", key, exc)
            return False
        return True

    @contextlib.contextmanager
    def protecting(self, key: Hashable) -> Iterator[None]:
        """While the bank makes room to bring ``key`` back, spills may drop files: never ``key``'s."""
        self._protected = key
        try:
            yield
        finally:
            self._protected = None

    def restored(self, key: Hashable) -> None:
        """``key``'s payload is back in a slot: its file goes."""
        self.tier.remove(key)
        self.restores += 1

    def touch(self, key: Hashable) -> None:
        self.tier.touch(key)

    def remove(self, key: Hashable) -> None:
        self.tier.remove(key)

    def close(self) -> None:
        self.tier.close()
