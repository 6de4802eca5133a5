"""The bank: banked chunk/block entries (``entry``), the ``Bank`` (``bank``), composed of its slot
sizes (``layout``), its memory (``slab``), its bookkeeping (``slots``: which entry holds which slot,
in eviction order) and the disk spill tier it holds (``spill`` over ``disk``'s files); the
scheduler half's slot and eviction decisions (``directory``: ``SlotDirectory``); eviction
policies behind a name registry (``eviction``); persistence of a bank to a directory (``persist``,
``manifest``, ``files``)."""
from worldkv_connector.bank.bank import Bank, check_bank_memory
from worldkv_connector.bank.directory import SlotDirectory, apply_moves
from worldkv_connector.bank.disk import DiskTier, DiskTierConfig, DiskTierError, NotResidentError
from worldkv_connector.bank.entry import BankEntry, BankKey
from worldkv_connector.bank.eviction import EVICTIONS, EvictionPolicy, get_eviction, register_eviction

__all__ = [
    "Bank", "BankEntry", "BankKey", "check_bank_memory", "NotResidentError", "SlotDirectory", "apply_moves",
    "DiskTier", "DiskTierConfig", "DiskTierError",
    "EVICTIONS", "EvictionPolicy", "register_eviction", "get_eviction",
]
