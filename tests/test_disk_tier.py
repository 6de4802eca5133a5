"""The disk tier: checksummed spill files, capacity and LRU, and the bank spilling into it."""
import gc
import os

import numpy as np
import pytest
import torch

from worldkv_connector.bank import Bank, NotResidentError
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.bank.disk import DiskTier, DiskTierConfig, DiskTierError
from worldkv_connector.testing import corrupt_entry, drop_entry
from worldkv_connector.shapes import get_preset

L, H, D, SLOT = 2, 2, 4, 8
SLOT_BYTES = 2 * L * SLOT * H * D * 4  # fp32


def payload(tokens, fill=None, dtype=torch.float32):
    t = torch.randn(L, 2, tokens, H, D).to(dtype)
    return t.fill_(fill) if fill is not None else t


def spill_files(tier):
    return sorted(os.listdir(tier.dir))


def make_bank(tmp_path, slots=2, disk_slots=2, **kw):
    disk = DiskTier(tmp_path / "spill", disk_slots * SLOT_BYTES)
    return Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=SLOT,
                capacity_bytes=slots * SLOT_BYTES, pin=False, disk=disk, **kw)


def store(bank, key, value, tokens=SLOT):
    assert bank.reserve(key, tokens, pose=np.eye(4), meta={"v": value}) is not None
    bank.view(key).fill_(value)
    bank.mark_ready(key)


# --- the tier on its own -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_put_read_roundtrip_and_file_layout(tmp_path, dtype):
    tier = DiskTier(tmp_path, 1 << 20)
    assert os.path.dirname(tier.dir) == str(tmp_path) and os.path.basename(tier.dir).startswith("spill-")
    src = payload(5, dtype=dtype)
    assert tier.put("a", src) == (True, [])
    assert "a" in tier and len(tier) == 1 and tier.bytes_used == src.numel() * src.element_size()
    files = spill_files(tier)
    assert len(files) == 1 and not any(f.startswith(".tmp") for f in files)  # renamed into place
    assert os.path.getsize(tier.path_of("a")) == 40 + tier.bytes_used  # magic + sha256 + payload
    out = torch.zeros(L, 2, SLOT, H, D, dtype=dtype)[:, :, :5]  # strided, like a bank slot view
    tier.read("a", out)
    assert torch.equal(out, src)
    with pytest.raises(ValueError, match="already on the disk tier"):
        tier.put("a", src)
    assert tier.remove("a") and not tier.remove("a")
    assert spill_files(tier) == [] and tier.bytes_used == 0


def test_capacity_and_lru_eviction(tmp_path):
    one = SLOT_BYTES
    tier = DiskTier(tmp_path, 3 * one)
    for k in "abc":
        assert tier.put(k, payload(SLOT)) == (True, [])
    tier.touch("a")  # "b" is now the least recently used
    assert tier.put("d", payload(SLOT)) == (True, ["b"])
    assert tier.keys() == ["c", "a", "d"] and tier.evictions == 1 and tier.bytes_used == 3 * one
    # "c" may not go (pinned in the bank, say): the next oldest that may go is evicted instead
    assert tier.put("e", payload(SLOT), can_evict=lambda k: k != "c") == (True, ["a"])
    # nothing may go: refused, nothing evicted
    assert tier.put("f", payload(SLOT), can_evict=lambda k: False) == (False, [])
    assert tier.put("big", torch.zeros(L, 2, 4 * SLOT, H, D)) == (False, [])  # larger than the tier
    assert sorted(tier.keys()) == ["c", "d", "e"] and len(spill_files(tier)) == 3


def test_damaged_missing_and_truncated_files_are_detected(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20)
    for k in "abc":
        tier.put(k, payload(SLOT, fill=1.0))
    out = torch.full((L, 2, SLOT, H, D), 7.0)
    with open(tier.path_of("a"), "r+b") as fh:  # flip a payload bit
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(DiskTierError, match="'a' failed its sha256 check"):
        tier.read("a", out)
    os.unlink(tier.path_of("b"))
    with pytest.raises(DiskTierError, match="'b' is missing"):
        tier.read("b", out)
    with open(tier.path_of("c"), "r+b") as fh:
        fh.truncate(60)
    with pytest.raises(DiskTierError, match="'c' is truncated"):
        tier.read("c", out)
    assert torch.all(out == 7.0)  # never half-written
    with pytest.raises(KeyError, match="'zz' is not on the disk tier"):
        tier.read("zz", out)
    tier.put("d", payload(2))
    with pytest.raises(ValueError, match="out holds 1024 bytes, key 'd' has 256"):
        tier.read("d", out)


def test_close_and_garbage_collection_remove_the_directory(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("a", payload(SLOT))
    d = tier.dir
    tier.close()
    tier.close()  # idempotent
    assert not os.path.exists(d) and os.path.isdir(tmp_path)  # only our own subdirectory goes
    with pytest.raises(RuntimeError, match="closed"):
        tier.put("b", payload(SLOT))
    tier2 = DiskTier(tmp_path, 1 << 20)
    tier2.put("a", payload(SLOT))
    d2 = tier2.dir
    del tier2
    gc.collect()
    assert not os.path.exists(d2)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match=r"DiskTierConfig.capacity_bytes=0 is out of range"):
        DiskTier(tmp_path, 0)
    with pytest.raises(ValueError, match="DiskTierConfig.path=''"):
        DiskTierConfig("", 10)
    assert DiskTier.from_config(WorldKVConfig()) is None
    assert DiskTier.from_config(WorldKVConfig(bank_dir=str(tmp_path), disk_bytes=0)) is None
    tier = DiskTier.from_config(WorldKVConfig(bank_dir=str(tmp_path / "x"), disk_bytes=1234))
    assert tier.capacity_bytes == 1234 and os.path.isdir(tier.dir)


# --- the bank spilling into it -------------------------------------------------------------------
def test_full_bank_spills_instead_of_evicting(tmp_path):
    bank = make_bank(tmp_path, slots=2, disk_slots=2)
    evicted = []
    bank.add_evict_listener(lambda key, entry: evicted.append(key))
    store(bank, "a", 1.0)
    store(bank, "b", 2.0)
    bank.touch("a")
    store(bank, "c", 3.0)  # the LRU victim "b" goes to disk, not away
    assert evicted == [] and "b" in bank and len(bank) == 3 and bank.spills == 1
    e = bank.get("b")
    assert e.tier == "disk" and e.slot == -1 and e.meta == {"v": 2.0} and not bank.is_resident("b")
    with pytest.raises(NotResidentError, match="'b' is on the disk tier: call ensure_resident"):
        bank.view("b")
    assert bank.bytes_used == 2 * SLOT_BYTES and bank.disk_bytes_used == SLOT_BYTES
    assert bank.total_bytes_used == 3 * SLOT_BYTES
    stats = bank.stats()
    assert stats["tiers"] == {"cpu": {"entries": 2, "bytes_used": 2 * SLOT_BYTES, "capacity_bytes": 2 * SLOT_BYTES},
                              "disk": {"entries": 1, "bytes_used": SLOT_BYTES, "capacity_bytes": 2 * SLOT_BYTES}}
    assert stats["entries"] == 3 and stats["evictions"] == 0 and stats["spills"] == 1
    assert torch.all(bank.read_payload("b") == 2.0) and bank.get("b").tier == "disk"  # read without moving

    # retrieval brings it back and spills the host LRU ("a" was touched before "c" was stored)
    assert bank.ensure_resident("b") and bank.get("b").tier == "cpu"
    assert torch.all(bank.view("b") == 2.0) and bank.get("a").tier == "disk" and bank.restores == 1
    assert bank.ensure_resident("c")  # already resident: nothing to do
    assert bank.bytes_used == 2 * SLOT_BYTES and bank.disk_bytes_used == SLOT_BYTES

    # the disk tier fills up: its LRU leaves the bank entirely, and only then listeners hear of it
    store(bank, "d", 4.0)  # spills "c"; disk: a, c
    store(bank, "e", 5.0)  # spills "b"; disk full: "a" (disk LRU) is dropped
    assert evicted == ["a"] and "a" not in bank and bank.evictions == 1
    assert sorted(bank.keys()) == ["b", "c", "d", "e"] and len(spill_files(bank.disk)) == 2
    bank.free("c")
    assert bank.free_where(lambda k: True) == 3
    assert bank.total_bytes_used == 0 and bank.free_slots == 2 and spill_files(bank.disk) == []


def test_decided_spills_and_restores_move_exactly_what_the_directory_named(tmp_path):
    # a SlotDirectory decided them: the bank evicts nothing itself and takes the named slots
    bank = make_bank(tmp_path, slots=2, disk_slots=1)
    evicted = []
    bank.add_evict_listener(lambda key, entry: evicted.append(key))
    for key, value, slot in [("a", 1.0, 1), ("b", 2.0, 0)]:
        assert bank.reserve(key, SLOT, slot=slot).slot == slot
        bank.view(key).fill_(value)
        bank.mark_ready(key)
    assert bank.spill("a", decided=True) and bank.free_slots == 1
    # the disk tier holds one entry: a decided spill still writes (the step's restore frees it)
    assert bank.spill("b", decided=True) and bank.disk_bytes_used == 2 * SLOT_BYTES and evicted == []
    assert bank.reserve("c", SLOT, slot=0) is not None
    with pytest.raises(ValueError, match="taken"):
        bank.ensure_resident("a", 0)  # slot 0 is "c"'s now
    assert bank.get("a").tier == "disk"  # refused: nothing moved
    assert bank.ensure_resident("a", 1) and bank.get("a").slot == 1 and torch.all(bank.view("a") == 1.0)
    assert bank.disk_bytes_used == SLOT_BYTES and bank.restores == 1 and evicted == []
    corrupt_entry(bank, "b")
    bank.free("c")
    assert not bank.ensure_resident("b", 0) and "b" not in bank and evicted == ["b"]  # never wrong bytes
    assert bank.disk_errors == 1


def test_ensure_resident_when_no_room_and_pinned_disk_entries(tmp_path):
    bank = make_bank(tmp_path, slots=1, disk_slots=1)
    store(bank, "a", 1.0)
    store(bank, "b", 2.0)  # "a" spills
    bank.pin("b")
    assert not bank.ensure_resident("a")  # the only slot is pinned: no room right now
    assert bank.get("a").tier == "disk"
    bank.unpin("b")
    bank.pin("a")  # a pinned disk entry is never dropped from the disk tier...
    bank.pin("b")
    assert bank.reserve("c", SLOT) is None
    bank.unpin("b")
    store(bank, "c", 3.0)  # ...so "b" cannot spill (disk full of pinned "a") and is evicted
    assert "b" not in bank and bank.get("a").tier == "disk"
    assert not bank.spill("a")  # already on disk
    assert not bank.spill("c") and bank.get("c").tier == "cpu"  # the disk tier holds only pinned "a"
    bank.unpin("a")
    assert bank.spill("c") and bank.get("c").tier == "disk" and "a" not in bank  # now "a" may go


def test_restoring_never_evicts_the_entry_being_restored(tmp_path):
    bank = make_bank(tmp_path, slots=1, disk_slots=1)
    evicted = []
    bank.add_evict_listener(lambda key, entry: evicted.append(key))
    store(bank, "a", 1.0)
    store(bank, "b", 2.0)  # "a" spills and fills the disk tier
    # making room for "a" spills "b", which would need "a"'s disk space: "b" is dropped instead
    assert bank.ensure_resident("a") and torch.all(bank.view("a") == 1.0)
    assert evicted == ["b"] and list(bank.keys()) == ["a"] and bank.free_slots == 0
    assert bank.disk_bytes_used == 0 and spill_files(bank.disk) == []


def test_damaged_spill_is_dropped_not_served(tmp_path):
    bank = make_bank(tmp_path, slots=1, disk_slots=3)
    evicted = []
    bank.add_evict_listener(lambda key, entry: evicted.append(key))
    for i, k in enumerate("abcd"):
        store(bank, k, float(i))
    assert [bank.get(k).tier for k in "abcd"] == ["disk", "disk", "disk", "cpu"]
    assert corrupt_entry(bank, "a") == "disk"
    assert drop_entry(bank, "b") == "disk"
    with pytest.raises(DiskTierError):
        bank.read_payload("a")
    assert not bank.ensure_resident("a") and not bank.ensure_resident("b")
    assert evicted == ["a", "b"] and bank.disk_errors == 2 and "a" not in bank and "b" not in bank
    assert bank.get("d").tier == "cpu"  # the resident entry was not disturbed...
    assert bank.ensure_resident("c") and torch.all(bank.view("c") == 2.0)  # ...until a good one came back
    assert bank.total_bytes_used == bank.bytes_used + bank.disk_bytes_used == 2 * SLOT_BYTES


def test_for_shape_builds_the_disk_tier_and_close_cleans_up(tmp_path):
    shape = get_preset("tiny")
    config = WorldKVConfig(bank_bytes=2 * shape.chunk_bytes(24), bank_dir=str(tmp_path), disk_bytes=1 << 20)
    with Bank.for_shape(shape, config) as bank:
        assert bank.disk is not None and bank.disk.capacity_bytes == 1 << 20 and bank.num_slots == 2
        for c in range(4):
            bank.reserve(("s", c), 24)
            bank.mark_ready(("s", c))
        assert bank.stats()["disk_entries"] == 2
        spill_dir = bank.disk.dir
        assert len(os.listdir(spill_dir)) == 2
    assert not os.path.exists(spill_dir) and bank.disk.closed
    bank.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        bank.ensure_resident(("s", 0))


def test_bad_disk_argument(tmp_path):
    with pytest.raises(ValueError, match="Bank disk='x': expected a DiskTier"):
        Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=SLOT,
             capacity_bytes=SLOT_BYTES, pin=False, disk="x")


@pytest.mark.cuda
def test_gpu_bank_spills_and_restores(tmp_path):
    disk = DiskTier(tmp_path, 4 * SLOT_BYTES)
    with Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.bfloat16, slot_tokens=SLOT,
              capacity_bytes=SLOT_BYTES, tier="gpu", disk=disk) as bank:
        ref = {}
        for k in "ab":
            bank.reserve(k, SLOT)
            ref[k] = torch.randn(L, 2, SLOT, H, D, device="cuda").to(torch.bfloat16)
            bank.view(k).copy_(ref[k])
            bank.mark_ready(k)
        assert bank.get("a").tier == "disk" and bank.ensure_resident("a")
        assert bank.view("a").is_cuda and torch.equal(bank.view("a"), ref["a"])
        assert torch.equal(bank.read_payload("b"), ref["b"].cpu())
