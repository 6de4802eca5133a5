"""The bank's parts on their own: the slot table (bookkeeping, no tensors) and the disk spill
object the bank holds (moves and counters), as the bank drives them."""
import pytest
import torch

from worldkv_connector.bank.disk import DiskTier
from worldkv_connector.bank.entry import BankEntry
from worldkv_connector.bank.slots import SlotTable
from worldkv_connector.bank.spill import DiskSpill


def entry(key, nbytes=10, ready=True):
    return BankEntry(key=key, slot=-1, num_tokens=1, nbytes=nbytes, tier="cpu", ready=ready)


def test_table_hands_out_the_lowest_slot_and_counts_bytes():
    table = SlotTable(3, "lru")
    for key in "abc":
        table.insert(entry(key))
    assert [table.get(k).slot for k in "abc"] == [0, 1, 2] and table.free_slots == 0
    assert table.bytes_used == 30 and len(table) == 3 and table.keys() == ["a", "b", "c"]
    assert [table.get(k).last_used for k in "abc"] == [1, 2, 3]  # one clock for inserts and touches


def test_table_victim_follows_the_policy_and_skips_unready_pinned_and_spilled():
    table = SlotTable(3, "lru")
    for key in "abc":
        table.insert(entry(key, ready=key != "c"))
    table.touch("a")
    assert table.victim() == "b"
    table.get("b").pins = 1
    assert table.victim() == "a"
    table.vacate("a")  # spilled: listed, no slot, out of the policy's order
    assert table.get("a").slot == -1 and "a" in table and table.free_slots == 1 and table.bytes_used == 20
    assert table.victim() is None and table.can_free_a_slot()  # b pinned, c unready; one slot is free


def test_table_remove_frees_the_slot_but_the_entry_still_names_it():
    table = SlotTable(2, "fifo")
    table.insert(entry("a"))
    table.insert(entry("b"))
    gone = table.remove("a")
    assert gone.slot == 0 and "a" not in table and table.free_slots == 1 and table.bytes_used == 10
    table.insert(entry("c"))
    assert table.get("c").slot == 0  # the freed slot is reused


def test_table_occupy_brings_a_spilled_entry_back_into_a_free_slot():
    table = SlotTable(1, "lru")
    table.insert(entry("a"))
    table.vacate("a")
    assert table.free_slots == 1 and table.victim() is None
    assert table.occupy("a") == 0 and table.bytes_used == 10 and table.victim() == "a"
    table.clear()
    assert len(table) == 0 and table.free_slots == 0 and table.bytes_used == 0


def test_spill_counts_moves_and_protects_the_key_being_brought_back(tmp_path):
    nbytes = 2 * 1 * 4 * 4  # [1, 2, 1, 1, 4] fp32
    spill = DiskSpill(DiskTier(tmp_path, 2 * nbytes))
    payload = torch.ones(1, 2, 1, 1, 4)
    for key in "ab":
        assert spill.put(key, payload, can_evict=lambda k: True) == (True, [])
    assert spill.spills == 2 and spill.bytes_used == 2 * nbytes
    with spill.protecting("a"):  # "a" is the LRU file, but it is being restored: "b" goes instead
        assert spill.put("c", payload, can_evict=lambda k: True) == (True, ["b"])
    assert spill.put("d", payload, can_evict=lambda k: k != "a") == (True, ["c"])
    out = torch.empty_like(payload)
    assert spill.load("a", out) and torch.equal(out, payload)
    spill.restored("a")
    assert spill.restores == 1 and "a" not in spill.tier and spill.errors == 0
    spill.remove("d")
    assert spill.bytes_used == 0
    spill.close()
    assert spill.bytes_used == 0 and spill.tier.closed


def test_spill_load_of_a_damaged_file_is_counted_not_raised(tmp_path):
    spill = DiskSpill(DiskTier(tmp_path, 1 << 10))
    spill.put("a", torch.ones(1, 2, 1, 1, 4), can_evict=lambda k: True)
    with open(spill.tier.path_of("a"), "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x00")
    out = torch.zeros(1, 2, 1, 1, 4)
    assert not spill.load("a", out) and spill.errors == 1 and torch.all(out == 0)
    with pytest.raises(Exception, match="sha256"):
        spill.read("a", out)  # a plain read (save_bank) raises, and is not counted
    assert spill.errors == 1


def test_named_lowest_slot_takes_the_same_slots_as_none():
    # the O(1) path for a named slot that is the lowest free one keeps the free list's order
    from worldkv_connector.bank.entry import BankEntry
    from worldkv_connector.bank.slots import SlotTable

    a, b = SlotTable(8, "lru"), SlotTable(8, "lru")
    for i in range(5):
        a.insert(BankEntry(key=("s", i), slot=-1, num_tokens=1, nbytes=1, tier="cpu"))
        b.insert(BankEntry(key=("s", i), slot=-1, num_tokens=1, nbytes=1, tier="cpu"), slot=i)
    a.remove(("s", 2)); b.remove(("s", 2))
    a.insert(BankEntry(key=("s", 9), slot=-1, num_tokens=1, nbytes=1, tier="cpu"))
    b.insert(BankEntry(key=("s", 9), slot=-1, num_tokens=1, nbytes=1, tier="cpu"), slot=2)
    assert a._free == b._free and a.get(("s", 9)).slot == b.get(("s", 9)).slot == 2
    b.insert(BankEntry(key=("s", 10), slot=-1, num_tokens=1, nbytes=1, tier="cpu"), slot=7)  # not the lowest: the scan path
    assert 7 not in b._free and b._free == [6, 5]
