"""Properties of the bank's allocator under random interleavings of every operation, with and
without a disk tier (exact accounting, nothing leaks, payloads survive spills), and its lifetime
(close, context manager, finalizer)."""
import gc
import os
import tempfile

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from worldkv_connector.bank import Bank, NotResidentError
from worldkv_connector.bank.disk import DiskTier

L, H, D, SLOT = 2, 1, 4, 6
SLOT_BYTES = 2 * L * SLOT * H * D * 4  # fp32
# "store" (reserve + ready) is listed twice: a full bank of ready entries is where spills happen
OPS = ["store", "store", "reserve", "ready", "touch", "pin", "unpin", "free", "spill", "restore", "end_session"]

ops = st.lists(
    st.tuples(st.sampled_from(OPS), st.sampled_from(["a", "b"]), st.integers(0, 3), st.integers(1, SLOT)),
    min_size=20, max_size=80,
)


def make_bank(disk_dir=None, policy="lru"):
    # disk: room for about 2.5 full slots, so byte capacity (not entry count) decides what fits
    disk = DiskTier(disk_dir, SLOT_BYTES * 5 // 2) if disk_dir is not None else None
    return Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=SLOT,
                capacity_bytes=3 * SLOT_BYTES, eviction=policy, pin=False, disk=disk)


def check_invariants(bank, values):
    entries = [bank.get(k) for k in bank.keys()]
    host = [e for e in entries if e.tier == "cpu"]
    disk = [e for e in entries if e.tier == "disk"]
    assert len(host) + len(disk) == len(entries) == len(bank)
    assert bank.bytes_used == sum(e.nbytes for e in host)
    assert bank.disk_bytes_used == sum(e.nbytes for e in disk)
    assert bank.total_bytes_used == bank.bytes_used + bank.disk_bytes_used
    assert bank.free_slots + len(host) == bank.num_slots
    slots = [e.slot for e in host]
    assert len(set(slots)) == len(slots) and all(0 <= s < bank.num_slots for s in slots)
    assert all(e.slot == -1 and e.ready for e in disk)  # only ready entries are ever spilled
    stats = bank.stats()
    assert stats["tiers"]["cpu"]["entries"] == len(host) and stats["tiers"]["disk"]["entries"] == len(disk)
    if bank.disk is not None:
        assert bank.disk.bytes_used <= bank.disk.capacity_bytes
        assert len(os.listdir(bank.disk.dir)) == len(disk)  # one file per spilled entry, no temp files
    else:
        assert not disk
    for e in host:  # ready payloads are exactly what was written, wherever they have been since
        if e.ready:
            assert torch.all(bank.view(e.key) == values[e.key])


def run_ops(bank, ops, values):
    evicted = []
    bank.add_evict_listener(lambda key, entry: evicted.append((key, entry.pins, key in bank)))
    for op, session, chunk, tokens in ops:
        key = (session, chunk)
        e = bank.get(key)
        if op in ("reserve", "store") and e is None:
            pins_before = {k: bank.get(k).pins for k in bank.keys()}
            got = bank.reserve(key, tokens)
            if got is None:  # only when no resident entry may be demoted
                assert bank.free_slots == 0
                assert all(x.pins or not x.ready for x in map(bank.get, bank.keys()) if x.tier == "cpu")
            else:
                values[key] = float(len(values) + 1)
                bank.view(key).fill_(values[key])
                if op == "store":
                    bank.mark_ready(key)
            for gone, pins, present in evicted:
                assert pins_before.get(gone, 0) == 0 and pins == 0 and not present
        elif e is None:
            continue
        elif op == "ready":
            bank.mark_ready(key)
        elif op == "touch":
            bank.touch(key)
        elif op == "pin":
            bank.pin(key)
        elif op == "unpin" and e.pins:
            bank.unpin(key)
        elif op == "free" and not e.pins:
            assert bank.free(key) and key not in bank
        elif op == "spill":
            was_resident = e.tier == "cpu"
            if bank.spill(key):
                assert was_resident and e.ready and not e.pins and bank.get(key).tier == "disk"
                with pytest.raises(NotResidentError):
                    bank.view(key)
        elif op == "restore":
            if bank.ensure_resident(key):
                assert bank.get(key).tier == "cpu" and torch.all(bank.view(key) == values[key])
            else:  # no room right now: every slot unready or pinned
                assert bank.free_slots == 0 and key in bank
        elif op == "end_session":
            pinned = {k for k in bank.keys() if k[0] == session and bank.get(k).pins}
            bank.free_where(lambda k: k[0] == session)
            assert {k for k in bank.keys() if k[0] == session} == pinned
        evicted.clear()
        check_invariants(bank, values)


def drain(bank):
    # labels in hypothesis statistics (pytest --hypothesis-show-statistics): the runs do reach
    # spills, restores and drops, not only the easy paths
    for name in ("spills", "restores", "evictions", "disk_errors"):
        event(f"{name}>0: {getattr(bank, name) > 0}")
    for key in list(bank.keys()):
        while bank.get(key).pins:
            bank.unpin(key)
    bank.free_where(lambda key: True)
    assert len(bank) == 0 and bank.bytes_used == 0 and bank.total_bytes_used == 0
    assert bank.free_slots == bank.num_slots
    if bank.disk is not None:
        assert os.listdir(bank.disk.dir) == [] and bank.disk.bytes_used == 0


@settings(max_examples=60, deadline=None)
@given(ops=ops, policy=st.sampled_from(["lru", "fifo"]))
def test_allocator_without_disk(ops, policy):
    bank = make_bank(policy=policy)
    run_ops(bank, ops, {})
    drain(bank)


@settings(max_examples=80, deadline=None)
@given(ops=ops, policy=st.sampled_from(["lru", "fifo"]))
def test_allocator_with_disk_tier(ops, policy):
    with tempfile.TemporaryDirectory() as tmp:
        bank = make_bank(tmp, policy=policy)
        run_ops(bank, ops, {})
        drain(bank)
        spill_dir = bank.disk.dir
        bank.close()
        assert not os.path.exists(spill_dir)


# --- lifetime ------------------------------------------------------------------------------------
def test_close_is_idempotent_and_later_use_is_a_clear_error(tmp_path):
    bank = make_bank(tmp_path)
    bank.reserve("a", SLOT)
    bank.close()
    bank.close()
    assert bank.closed and len(bank) == 0 and bank.stats()["bytes_used"] == 0
    for call in (lambda: bank.reserve("b", 1), lambda: bank.view("a"), lambda: bank.touch("a"),
                 lambda: bank.pin("a"), lambda: bank.free("a"), lambda: bank.free_where(lambda k: True),
                 lambda: bank.ensure_resident("a"), lambda: bank.slot_view(0), lambda: bank.read_payload("a")):
        with pytest.raises(RuntimeError, match="the bank is closed"):
            call()


def test_context_manager_releases_everything(tmp_path):
    with make_bank(tmp_path) as bank:
        for c in range(5):
            bank.reserve(("a", c), SLOT)
            bank.mark_ready(("a", c))
        spill_dir = bank.disk.dir
        assert len(os.listdir(spill_dir)) == 2
    assert bank.closed and bank.disk.closed and not os.path.exists(spill_dir) and bank._slab is None


def test_finalizer_runs_when_the_bank_is_collected_without_close(tmp_path):
    bank = make_bank(tmp_path)
    for c in range(4):
        bank.reserve(("a", c), SLOT)
        bank.mark_ready(("a", c))
    finalizer, spill_dir = bank._finalizer, bank.disk.dir
    assert finalizer.alive and os.listdir(spill_dir)
    del bank
    gc.collect()
    assert not finalizer.alive  # the slab's release ran (cudaHostUnregister when it was pinned)
    assert not os.path.exists(spill_dir)  # and the disk tier's files went with it
