"""The bank: slot accounting, eviction policies, pinning, views into the slab."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldkv_connector.bank import Bank, BankEntry
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.bank.eviction import EvictionPolicy, get_eviction, register_eviction
from worldkv_connector.shapes import get_preset

L, H, D, SLOT = 2, 2, 4, 8
SLOT_BYTES = 2 * L * SLOT * H * D * 4  # fp32


def make_bank(slots=4, **kw):
    args = dict(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=SLOT,
                capacity_bytes=slots * SLOT_BYTES + SLOT_BYTES // 2, pin=False)
    args.update(kw)
    return Bank(**args)


def fill(bank, keys, ready=True):
    for key in keys:
        assert bank.reserve(key, SLOT) is not None
        if ready:
            bank.mark_ready(key)


def test_sizes_and_accounting():
    bank = make_bank(4)
    assert bank.slot_bytes == SLOT_BYTES and bank.num_slots == 4  # the half slot left over is unused
    e = bank.reserve(("s", 0), 5, meta={"frames": 3}, pose=[1.0, 2.0])
    assert isinstance(e, BankEntry) and not e.ready and e.tier == "cpu"
    assert e.nbytes == 2 * L * 5 * H * D * 4 and bank.bytes_used == e.nbytes
    assert isinstance(e.pose, np.ndarray) and e.meta == {"frames": 3}
    bank.reserve(("s", 1), SLOT)
    assert bank.bytes_used == e.nbytes + SLOT_BYTES and bank.entries == len(bank) == 2
    assert bank.free_slots == 2 and ("s", 1) in bank and ("s", 9) not in bank
    assert bank.free(("s", 0)) and not bank.free(("s", 0))
    assert bank.bytes_used == SLOT_BYTES and bank.free_slots == 3
    stats = bank.stats()
    assert stats["bytes_used"] == SLOT_BYTES and stats["entries"] == 1 and stats["tier"] == "cpu"
    assert stats["capacity_bytes"] == 4 * SLOT_BYTES + SLOT_BYTES // 2 and stats["evictions"] == 0


def test_lru_evicts_least_recently_touched():
    bank = make_bank(3, eviction="lru")
    evicted = []
    bank.add_evict_listener(lambda key, entry: evicted.append((key, entry.slot, key in bank)))
    fill(bank, ["a", "b", "c"])
    bank.touch("a")  # a retrieval: "b" is now the least recently used
    fill(bank, ["d"])
    assert evicted == [("b", 1, False)]  # listener sees the bank after removal
    assert bank.get("d").slot == 1  # the victim's slot is reused
    bank.touch("c")
    fill(bank, ["e", "f"])
    assert [k for k, _, _ in evicted] == ["b", "a", "d"]
    assert sorted(bank.keys()) == ["c", "e", "f"] and bank.stats()["evictions"] == 3


def test_fifo_ignores_touches():
    bank = make_bank(3, eviction="fifo")
    evicted = []
    bank.add_evict_listener(lambda key, entry: evicted.append(key))
    fill(bank, ["a", "b", "c"])
    bank.touch("a")
    fill(bank, ["d", "e"])
    assert evicted == ["a", "b"]


def test_pinned_and_unready_entries_are_not_evicted():
    bank = make_bank(2)
    fill(bank, ["a"])
    fill(bank, ["b"], ready=False)  # its store is still in flight
    bank.pin("a")
    assert bank.reserve("c", SLOT) is None  # no room right now: a return value
    assert bank.entries == 2 and bank.stats()["evictions"] == 0
    with pytest.raises(ValueError, match="pinned"):
        bank.free("a")
    bank.mark_ready("b")
    assert bank.reserve("c", SLOT) is not None and "b" not in bank  # "a" is pinned, "b" goes
    bank.unpin("a")
    with pytest.raises(ValueError, match="not pinned"):
        bank.unpin("a")
    assert bank.free("a")


def test_free_where_skips_pinned():
    bank = make_bank(4)
    fill(bank, [("s1", 0), ("s1", 1), ("s2", 0), ("s1", 2)])
    bank.pin(("s1", 1))
    assert bank.free_where(lambda key: key[0] == "s1") == 2
    assert sorted(bank.keys()) == [("s1", 1), ("s2", 0)]
    assert bank.bytes_used == 2 * SLOT_BYTES


def test_views_land_in_their_slot():
    bank = make_bank(3)
    for i, key in enumerate(["a", "b", "c"]):
        bank.reserve(key, SLOT - i)
    view = bank.view("b")
    assert view.shape == (L, 2, SLOT - 1, H, D) and view.dtype == torch.float32
    for layer in range(L):
        for kv in range(2):
            assert view[layer, kv].is_contiguous()  # one copy fragment per (layer, K/V)
    for i, key in enumerate(["a", "b", "c"]):
        bank.view(key).fill_(i + 1)
    slot_b = bank.slot_view(bank.get("b").slot)
    assert slot_b.shape == (L, 2, SLOT, H, D)
    assert torch.all(slot_b[:, :, : SLOT - 1] == 2)  # written through the view
    assert not torch.any(slot_b[:, :, SLOT - 1 :] == 2)  # rows past num_tokens untouched
    assert torch.all(bank.view("a") == 1) and torch.all(bank.view("c") == 3)  # no overlap
    ptrs = sorted(bank.slot_view(s).data_ptr() for s in range(3))
    assert all(b - a == SLOT_BYTES for a, b in zip(ptrs, ptrs[1:]))


def test_views_are_reused_per_slot_and_size_and_follow_a_slot_reused_at_another_size(monkeypatch):
    from worldkv_connector.bank.slab import SlabViews

    bank = make_bank(2)
    bank.reserve("a", SLOT - 3)
    first = bank.view("a")
    assert bank.view("a") is first  # made once: planning a step does not build views again
    slot = bank.get("a").slot
    bank.free("a")
    bank.reserve("b", SLOT - 1, slot=slot)  # the same slot, another size: a new view of the new size
    assert bank.get("b").slot == slot and bank.view("b").shape == (L, 2, SLOT - 1, H, D)
    bank.view("b").fill_(7.0)
    assert torch.all(bank.slot_view(slot)[:, :, : SLOT - 1] == 7.0)
    monkeypatch.setattr(SlabViews, "MAX_VIEWS", 1)  # a full cache is dropped, never stale
    bank.reserve("c", 2)
    assert bank.view("c").shape == (L, 2, 2, H, D) and bank.view("b").shape == (L, 2, SLOT - 1, H, D)
    bank.close()
    assert bank._views is None  # the closed bank holds no view of its slab
    with pytest.raises(RuntimeError, match="closed"):
        bank.view("b")


def test_indices_stored_on_cpu_as_int64():
    bank = make_bank(2)
    e = bank.reserve("a", 3, indices=torch.tensor([[0, 1, 5], [0, 2, 5]], dtype=torch.int32))
    assert e.indices.dtype == torch.int64 and e.indices.device.type == "cpu"
    with pytest.raises(ValueError, match=r"indices must be \[2, 3\]"):
        bank.reserve("b", 3, indices=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"indices must be \[2, 4\]"):
        bank.reserve("b", 4, indices=torch.zeros(2, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match=f"chunk of {SLOT_BYTES} bytes is larger than the whole bank of 100 bytes"):
        make_bank(capacity_bytes=100)
    with pytest.raises(ValueError, match="tier='disk'"):
        make_bank(tier="disk")
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        make_bank(eviction="mru")
    with pytest.raises(ValueError, match="slot_tokens=0"):
        make_bank(slot_tokens=0)
    with pytest.raises(ValueError, match="dtype"):
        make_bank(dtype=torch.int8)
    bank = make_bank(2)
    bank.reserve("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        bank.reserve("a", 1)
    with pytest.raises(ValueError, match="num_tokens=9 is out of range"):
        bank.reserve("b", SLOT + 1)
    with pytest.raises(ValueError, match="num_tokens=0"):
        bank.reserve("b", 0)
    with pytest.raises(ValueError, match="slot=2 is out of range"):
        bank.slot_view(2)
    with pytest.raises(KeyError, match="'zz' is not in the bank"):
        bank.view("zz")
    assert bank.get("zz") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
def test_gpu_tier_and_pinning_need_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_bank(tier="gpu")
    with pytest.raises(ValueError, match="pin=True needs CUDA"):
        make_bank(pin=True)
    assert not make_bank(pin=None).pinned


def test_for_shape_uses_config():
    shape = get_preset("tiny")
    config = WorldKVConfig(keep_ratio=0.25, eviction="fifo", bank_bytes=1 << 20)
    with Bank.for_shape(shape, config) as bank:
        assert bank.slot_tokens == config.kept_tokens(shape.frame_tokens) == 24  # half of 3 x 16
        assert bank.slot_bytes == shape.chunk_bytes(24)
        assert bank.num_slots == (1 << 20) // bank.slot_bytes and bank.eviction == "fifo"
    assert bank.closed
    with pytest.raises(RuntimeError, match="closed"):
        bank.reserve("a", 1)
    bank.close()  # idempotent


def test_custom_policy_via_registry():
    @register_eviction("test-newest")
    class Newest(EvictionPolicy):
        def choose_victim(self, entries):
            for key in reversed(self._order):
                if entries[key].ready and entries[key].pins == 0:
                    return key
            return None

    assert isinstance(get_eviction("test-newest"), Newest)
    bank = make_bank(2, eviction="test-newest")
    fill(bank, ["a", "b", "c"])
    assert sorted(bank.keys()) == ["a", "c"]


ops = st.lists(
    st.tuples(st.sampled_from(["reserve", "ready", "touch", "pin", "unpin", "free"]),
              st.integers(0, 7), st.integers(1, SLOT)),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(ops=ops, policy=st.sampled_from(["lru", "fifo"]))
def test_accounting_property(ops, policy):
    bank = make_bank(3, eviction=policy)
    evicted = []
    bank.add_evict_listener(lambda key, entry: evicted.append(entry))
    for op, key, tokens in ops:
        e = bank.get(key)
        if op == "reserve" and e is None:
            before = {k: bank.get(k).pins for k in bank.keys()}
            got = bank.reserve(key, tokens)
            if got is None:  # only when nothing may be evicted
                assert all(bank.get(k).pins or not bank.get(k).ready for k in bank.keys())
            for gone in evicted:
                assert before.get(gone.key, 0) == 0 and gone.ready
            evicted.clear()
        elif op == "ready" and e is not None:
            bank.mark_ready(key)
        elif op == "touch" and e is not None:
            bank.touch(key)
        elif op == "pin" and e is not None:
            bank.pin(key)
        elif op == "unpin" and e is not None and e.pins:
            bank.unpin(key)
        elif op == "free" and e is not None and not e.pins:
            assert bank.free(key)
        entries = [bank.get(k) for k in bank.keys()]
        assert bank.bytes_used == sum(x.nbytes for x in entries)
        assert bank.free_slots + len(entries) == bank.num_slots
        assert len({x.slot for x in entries}) == len(entries)  # no slot handed out twice
    for key in list(bank.keys()):
        while bank.get(key).pins:
            bank.unpin(key)
    assert bank.free_where(lambda key: True) >= 0
    assert bank.bytes_used == 0 and bank.free_slots == bank.num_slots and len(bank) == 0


@pytest.mark.cuda
def test_pinned_host_bank_and_gpu_tier():
    with make_bank(2, pin=None) as bank:
        assert bank.pinned and bank.slot_view(0).is_pinned()
        bank.reserve("a", SLOT)
        src = torch.randn(L, 2, SLOT, H, D, device="cuda")
        bank.view("a").copy_(src)
        assert torch.equal(bank.view("a"), src.cpu())
    with make_bank(2, tier="gpu") as gbank:
        assert gbank.slot_view(0).is_cuda
        gbank.reserve("a", 4)
        gbank.view("a").fill_(3)
        assert torch.all(gbank.view("a").cpu() == 3)
