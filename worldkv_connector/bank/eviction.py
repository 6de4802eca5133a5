"""Bank eviction policies behind a name registry (policy apart from mechanism: STYLE §7).

A policy only orders keys; the bank decides what may be evicted (ready, unpinned entries) and does
the freeing. A new policy is one class decorated with ``@register_eviction("name")``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Mapping

from worldkv_connector.bank.entry import BankEntry
from worldkv_connector.registry import Registry

__all__ = ["EVICTIONS", "EvictionPolicy", "LRUEviction", "FIFOEviction", "register_eviction", "get_eviction",
           "eviction_names"]

EVICTIONS: Registry[type["EvictionPolicy"]] = Registry("eviction policy")


def register_eviction(name: str) -> Callable[[type["EvictionPolicy"]], type["EvictionPolicy"]]:
    """Class decorator: make a policy available to ``Bank(eviction=name)``."""
    add = EVICTIONS.register(name)

    def deco(cls: type["EvictionPolicy"]) -> type["EvictionPolicy"]:
        cls.name = name
        return add(cls)

    return deco


def get_eviction(name: str) -> "EvictionPolicy":
    """A fresh instance of the policy registered as ``name`` (policies hold per-bank state)."""
    return EVICTIONS.get(name)()


def eviction_names() -> list[str]:
    return EVICTIONS.names()


class EvictionPolicy:
    """Orders bank keys for eviction. The bank calls the hooks; ``choose_victim`` picks.

    The default keeps keys in an ``OrderedDict`` (oldest first), which makes LRU and FIFO O(1) per
    hook; ``choose_victim`` skips entries the bank may not evict (not ready, or pinned).

    With a disk tier the hooks describe the resident (host/GPU) tier only: a spilled key gets
    ``on_remove`` and, when it comes back, ``on_insert``; ``entries`` may still hold spilled
    entries (``tier == "disk"``), so a policy should pick from the keys it was told about.
    """

    name = "base"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None

    def on_touch(self, key: Hashable) -> None:
        """A retrieval of ``key``; the default (FIFO) ignores it."""

    def on_remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def choose_victim(self, entries: Mapping[Hashable, BankEntry]) -> Hashable | None:
        """Key of the entry to evict among ``entries`` (all entries of the bank, by key), or None
        when every entry is still being written (not ready) or pinned by an in-flight transfer."""
        for key in self._order:
            entry = entries.get(key)
            if entry is not None and entry.ready and entry.pins == 0:
                return key
        return None


@register_eviction("lru")
class LRUEviction(EvictionPolicy):
    """Least recently retrieved first: a touch moves the key to the young end."""

    def on_touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)


@register_eviction("fifo")
class FIFOEviction(EvictionPolicy):
    """Oldest stored first, whatever was retrieved since."""
