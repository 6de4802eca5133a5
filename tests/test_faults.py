"""Fault injection: failed and late transfers, damaged and lost bank entries, and that each is
detected (by the job's error, a checksum or a presence check) and counted."""
import hashlib

import pytest
import torch

from worldkv_connector.bank import Bank
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.testing import INJECTED, FaultyTransferEngine, corrupt_entry, drop_entry
from worldkv_connector.bank.persist import load_bank, save_bank
from worldkv_connector.shapes import get_preset
from worldkv_connector.transfer import TransferEngine, plan_fragments

L, H, D, T = 2, 2, 4, 8


def pairs(n, fill=1.0):
    srcs = [torch.full((T, H, D), fill + i) for i in range(n)]
    dsts = [torch.zeros(T, H, D) for _ in range(n)]
    return srcs, dsts


def test_chosen_jobs_fail_without_copying():
    eng = FaultyTransferEngine(TransferEngine("cpu"), fail_jobs={2})
    results = []
    for i in range(3):
        srcs, dsts = pairs(2, fill=10.0 * i)
        results.append((eng.submit("load", srcs, dsts, tag=i), dsts))
    done = eng.poll()
    assert [j.job_id for j in done] == [1, 2, 3]
    ok, bad = done[0], done[1]
    assert ok.error is None and torch.all(results[0][1][1] == 1.0)
    assert bad.error.startswith(INJECTED) and bad.tag == 1 and bad.nbytes == 2 * T * H * D * 4
    assert all(torch.all(d == 0) for d in results[1][1])  # not copied: stale bytes, flagged by the error
    assert eng.faults == {"failed_loads": 1, "failed_stores": 0, "delayed_jobs": 0} and eng.failed_job_ids == {2}
    assert eng.stats()["jobs"] == 3 and eng.path == "cpu-sync"  # the rest is the inner engine's


def _submit_paths():
    """The engine's public submit methods: each must go through the fault wrapper."""
    return sorted(n for n in dir(TransferEngine) if n.startswith("submit") and callable(getattr(TransferEngine, n)))


def test_every_submit_path_of_the_engine_is_wrapped():
    paths = _submit_paths()
    assert {"submit", "submit_plan"} <= set(paths)
    unwrapped = [n for n in paths if n not in vars(FaultyTransferEngine)]
    assert unwrapped == [], f"FaultyTransferEngine passes {unwrapped} through without injected faults"
    eng = FaultyTransferEngine(TransferEngine("cpu"))
    with pytest.raises(AttributeError, match="does not wrap TransferEngine.submit_later"):
        eng.submit_later  # a submit path the wrapper lacks is refused, never passed through


def test_submit_layers_draws_once_per_layer_and_fails_only_the_chosen_layers():
    from worldkv_connector.transfer import plan_layer_copies

    pools = torch.zeros(3, 2, 4, 2, 1, 2)  # [L, 2, pages, page_size, H, D]
    slot = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2, 1, 2) + 1

    def plans():
        return plan_layer_copies(pools, [slot], [[1]], [[2]], to_slot=False)

    eng = FaultyTransferEngine(TransferEngine("cpu"), fail_jobs={3})  # submission 3: the step's layer 1
    assert eng.submit("load", [slot[0, 0, 0]], [pools[0, 0, 0, 0]]).error is None  # submission 1
    jobs = eng.submit_layers("load", plans(), tags=["a", "b", "c"])  # submissions 2-4
    assert [j.tag for j in jobs] == ["a", "b", "c"] and [j.error is not None for j in jobs] == [False, True, False]
    assert torch.equal(pools[0, :, 1], slot[0]) and torch.equal(pools[2, :, 1], slot[2])
    assert not pools[1].any()  # the failed layer copied nothing
    pools.zero_()
    jobs = eng.submit_layers("load", plans())  # no failing layer: the inner engine's one call
    assert all(j.error is None for j in jobs) and torch.equal(pools[:, :, 1], slot)
    assert eng.faults["failed_loads"] == 1 and eng._submitted == 7


def test_submit_and_submit_plan_draw_faults_from_one_sequence():
    eng = FaultyTransferEngine(TransferEngine("cpu"), fail_jobs={2, 3})
    src, dst = torch.full((64,), 7.0), torch.zeros(64)

    def plan():
        return plan_fragments([src.data_ptr()], [dst.data_ptr()], [src.numel() * src.element_size()], keep=[src, dst])

    jobs = [eng.submit("load", [src], [dst]), eng.submit_plan("load", plan()), eng.submit("store", [src], [dst])]
    dst.zero_()
    jobs.append(eng.submit_plan("store", plan()))
    assert [j.job_id for j in eng.poll()] == [1, 2, 3, 4]
    assert [bool(j.error and j.error.startswith(INJECTED)) for j in jobs] == [False, True, True, False]
    assert jobs[1].nbytes == 64 * 4  # the bytes the plan asked for
    assert torch.all(dst == 7.0)  # the last plan copied
    assert eng.faults["failed_loads"] == 1 and eng.faults["failed_stores"] == 1 and eng.failed_job_ids == {2, 3}


def test_rates_are_per_kind_and_seeded():
    def run(seed):
        eng = FaultyTransferEngine(TransferEngine("cpu"), fail_loads=0.5, fail_stores=0.0, seed=seed)
        for i in range(200):
            eng.submit("load" if i % 2 else "store", *pairs(1))
        return eng, {j.job_id for j in eng.poll() if j.error}

    eng, failed = run(seed=3)
    assert failed == eng.failed_job_ids and all(j % 2 == 0 for j in failed)  # only loads (even ids) fail
    assert eng.faults["failed_stores"] == 0 and 30 < eng.faults["failed_loads"] == len(failed) < 70
    assert run(seed=3)[1] == failed and run(seed=4)[1] != failed


def test_delayed_completion():
    eng = FaultyTransferEngine(TransferEngine("cpu"), delay_polls=2)
    job = eng.submit("store", *pairs(1))
    assert not job.done() and eng.pending() == 1
    assert eng.poll() == [] and eng.poll() == []  # held back for two polls
    assert eng.poll() == [job] and job.done() and eng.pending() == 0
    late = eng.submit("store", *pairs(1))
    eng.wait(late)  # asking for it ends the hold-back
    assert eng.poll() == [late] and eng.faults["delayed_jobs"] == 2


def test_bad_arguments_and_bad_pairs():
    with pytest.raises(ValueError, match=r"fail_loads=1.5 is out of range: allowed 0 <= fail_loads <= 1"):
        FaultyTransferEngine(TransferEngine("cpu"), fail_loads=1.5)
    with pytest.raises(ValueError, match="delay_polls=-1 is out of range"):
        FaultyTransferEngine(TransferEngine("cpu"), delay_polls=-1)
    eng = FaultyTransferEngine(TransferEngine("cpu"), fail_stores=1.0)
    with pytest.raises(ValueError, match="numel mismatch"):  # an injected failure still checks its input
        eng.submit("store", [torch.zeros(3)], [torch.zeros(4)])
    with eng:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit("store", *pairs(1))


def test_store_loop_banks_only_what_copied():
    """The write-through pattern a connector follows: an entry becomes ready only when its store job
    finished without error, and a failed store frees its slot. What the bank reports matches what
    was injected, and no ready entry holds stale bytes."""
    bank = Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=T,
                capacity_bytes=16 * 2 * L * T * H * D * 4, pin=False)
    eng = FaultyTransferEngine(TransferEngine("cpu"), fail_stores=0.3, delay_polls=1, seed=7)
    inflight, failed = {}, []
    for c in range(12):
        key = ("s", c)
        bank.reserve(key, T)
        bank.pin(key)  # a transfer writes it
        view = bank.view(key)
        srcs = [torch.full((T, H, D), float(c + 1)) for _ in range(2 * L)]
        job = eng.submit("store", srcs, [view[layer, kv] for layer in range(L) for kv in range(2)], tag=key)
        inflight[job.job_id] = key
    while eng.pending():
        for job in eng.poll():
            key = inflight.pop(job.job_id)
            bank.unpin(key)
            if job.error:
                failed.append(job.job_id)
                bank.free(key)
            else:
                bank.mark_ready(key)
    assert sorted(failed) == sorted(eng.failed_job_ids) and len(bank) == 12 - eng.faults["failed_stores"] > 0
    for key in bank.keys():
        assert bank.get(key).ready and torch.all(bank.view(key) == key[1] + 1)


def digest(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_corrupted_and_dropped_host_entries_are_detected(tmp_path):
    shape = get_preset("tiny")
    config = WorldKVConfig(bank_bytes=4 * shape.chunk_bytes(24))
    bank = Bank.for_shape(shape, config)
    evicted = []
    bank.add_evict_listener(lambda k, e: evicted.append(k))
    for c in range(3):
        bank.reserve(("s", c), 24)
        bank.view(("s", c)).normal_()
        bank.mark_ready(("s", c))
    save_bank(bank, tmp_path / "before", config=config, kv_shape=shape)
    before = digest(bank.read_payload(("s", 1)))
    assert corrupt_entry(bank, ("s", 1), seed=5) == "cpu"
    after = bank.read_payload(("s", 1))
    assert digest(after) != before  # a checksum taken before catches it
    restored = Bank.for_shape(shape, config)
    load_bank(tmp_path / "before", restored, config=config, kv_shape=shape)
    diff = (after != restored.read_payload(("s", 1))).sum().item()
    assert diff == 1  # exactly one value was damaged
    assert drop_entry(bank, ("s", 2)) == "cpu"
    assert ("s", 2) not in bank and evicted == []  # lost silently: only a presence check notices
    assert bank.bytes_used == 2 * shape.chunk_bytes(24) and bank.free_slots == bank.num_slots - 2
    with pytest.raises(KeyError, match="not in the bank"):
        drop_entry(bank, ("s", 2))
    with pytest.raises(KeyError, match="not in the bank"):
        corrupt_entry(bank, ("s", 9))
