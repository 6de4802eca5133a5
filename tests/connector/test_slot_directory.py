"""Bank slots and evictions decided by the scheduler half (``bank.directory.SlotDirectory``): the
directory's decisions as scenarios, then random rollouts over the video engine in which the
directory and the worker's bank must agree after every step and no load is ever planned for an
entry evicted before."""
import json
import random

import pytest
import torch

from worldkv_connector.bank.directory import SlotDirectory
from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.testing import FaultyTransferEngine, corrupt_entry, drop_entry

SLOT = 2 * 2 * 32 * 2 * 16 * 4  # tiny model, keep 0.5: K+V x layers x kept tokens x heads x dim x fp32


def stored(d, key, tokens=8):
    slot, evicted = d.prepare_store(key, tokens)
    d.complete_store(key, True, tokens)
    return slot, evicted


def test_prepare_store_fills_in_order_then_evicts_the_policy_victim():
    d = SlotDirectory(3, "lru")
    assert [stored(d, ("s", c)) for c in range(3)] == [(0, []), (1, []), (2, [])]
    d.pin(("s", 0))  # a retrieval: the young end of LRU, and no victim until reported
    d.unpin(("s", 0))
    assert stored(d, ("s", 3)) == (1, [("s", 1)])  # the least recently used, its slot reused
    assert d.slots() == {("s", 0): (0, True), ("s", 2): (2, True), ("s", 3): (1, True)}
    with pytest.raises(ValueError, match="already banked"):
        d.prepare_store(("s", 3), 8)


def test_no_room_is_none_and_evicts_nothing():
    d = SlotDirectory(2, "fifo")
    d.prepare_store(("s", 0), 8)  # being written: not a victim
    stored(d, ("s", 1))
    d.pin(("s", 1))  # a planned load: not a victim either
    before = d.slots()
    assert d.prepare_store(("s", 2), 8) is None
    assert d.slots() == before and d.evictions == 0
    d.complete_store(("s", 0), False)  # a failed store gives its slot back
    assert d.prepare_store(("s", 2), 8) == (0, [])


def test_finished_sessions_are_victims_before_live_ones():
    d = SlotDirectory(3, "lru")
    for key in [("a", 0), ("b", 0), ("a", 1)]:
        stored(d, key)
    d.finish_session("a")
    assert stored(d, ("b", 1))[1] == [("a", 0)]  # oldest of the finished session, not LRU's ("b", 0)
    assert stored(d, ("b", 2))[1] == [("a", 1)]
    assert stored(d, ("b", 3))[1] == [("b", 0)]  # nothing of "a" left: the policy again


def test_removed_entries_pinned_by_a_load_go_when_the_load_is_reported():
    d = SlotDirectory(2, "lru")
    stored(d, ("a", 0))
    stored(d, ("a", 1))
    d.pin(("a", 1))
    assert d.remove_session("a") == 1
    assert d.slots() == {("a", 1): (1, True)} and d.ready_tokens(("a", 1)) is None
    d.unpin(("a", 1))
    assert len(d) == 0


def test_adopt_takes_the_banks_slot_and_refuses_a_taken_one():
    d = SlotDirectory(3, "lru")
    d.adopt(("s", 5), 2, 8)
    assert d.ready_tokens(("s", 5)) == 8 and d.prepare_store(("s", 6), 8) == (0, [])
    with pytest.raises(ValueError, match="taken"):
        d.adopt(("t", 0), 0, 8)
    with pytest.raises(ValueError, match="decides the slots"):
        d.adopt(("t", 0), None, 8)


def disk_directory(num_slots, disk_entries, eviction="lru"):
    # entries of 8 tokens, 1 byte per token: the disk tier holds ``disk_entries`` of them
    return SlotDirectory(num_slots, eviction, disk_bytes=8 * disk_entries, entry_bytes=lambda tokens: tokens)


def test_with_a_disk_tier_the_victim_is_spilled_and_stays_banked():
    d = disk_directory(2, 2)
    stored(d, ("s", 0))
    stored(d, ("s", 1))
    assert stored(d, ("s", 2)) == (0, []) and d.take_spilled() == [("s", 0)]  # its slot reused
    assert d.on_disk(("s", 0)) and d.ready_tokens(("s", 0)) == 8 and d.slots()[("s", 0)] == (-1, True)
    assert d.take_spilled() == [] and d.disk_bytes_used == 8 and d.evictions == 0
    stored(d, ("s", 3))
    assert d.take_spilled() == [("s", 1)] and d.disk_bytes_used == 16
    # the disk tier is full: its least recently used unpinned entry is evicted for the next spill
    d.pin(("s", 0))
    assert stored(d, ("s", 4)) == (0, [("s", 1)]) and d.take_spilled() == [("s", 2)]
    assert sorted(k for k in d.keys() if d.on_disk(k)) == [("s", 0), ("s", 2)] and d.evictions == 1
    assert ("s", 1) not in d and d.disk_bytes_used == 16


def test_a_spilled_entry_comes_back_into_a_named_slot_never_taking_a_pinned_one():
    d = disk_directory(2, 4)
    for c in range(3):
        stored(d, ("s", c))
    d.take_spilled()  # ("s", 0) is on disk
    d.pin(("s", 1))  # a load planned this step: no victim
    d.pin(("s", 0))
    # (s, 1) is resident (skipped) and pinned: (s, 2) is spilled to free the slot (s, 0) comes back into
    assert d.prepare_restores([("s", 0), ("s", 1), ("s", 0)]) == ([(("s", 0), 0)], [])
    assert d.take_spilled() == [("s", 2)] and d.restores == 1 and d.disk_bytes_used == 8
    assert d.slots() == {("s", 0): (0, True), ("s", 1): (1, True), ("s", 2): (-1, True)}


def test_a_restore_finds_no_slot_when_every_entry_is_pinned_and_nothing_moves():
    d = disk_directory(1, 4)
    stored(d, ("s", 0))
    stored(d, ("s", 1))
    assert d.take_spilled() == [("s", 0)]
    d.pin(("s", 1))
    d.pin(("s", 0))
    before = d.slots()
    assert d.prepare_restore(("s", 0)) is None and d.prepare_restores([("s", 0)]) == ([], [])
    assert d.slots() == before and d.disk_bytes_used == 8 and d.on_disk(("s", 0))
    with pytest.raises(ValueError, match="not on the disk tier"):
        d.prepare_restore(("s", 1))


def test_a_victim_the_disk_tier_cannot_take_is_evicted():
    d = disk_directory(1, 1)
    stored(d, ("s", 0))
    stored(d, ("s", 1))  # (s, 0) spilled: the disk tier is full
    d.pin(("s", 0))  # and its only entry pinned: nothing there may go
    assert stored(d, ("s", 2)) == (0, [("s", 1)]) and d.take_spilled() == [("s", 0)]


def make_engine(seed, **cfg):
    cfg = {"keep_ratio": 0.5, "retrieval_chunks": 2, "hot_chunks": 3, "bank_bytes": 6 * SLOT, **cfg}
    engine = VideoEngine(model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6, page_size=20,
                         kv_cache_memory=0.004, num_denoising_steps=1, kv_connector="worldkv",
                         kv_connector_config=json.dumps(cfg))
    return engine


def bank_slots(bank):
    return {k: (bank.get(k).slot, bank.get(k).ready) for k in bank.keys()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_rollouts_directory_and_bank_agree_and_no_load_names_an_evicted_key(seed):
    rng = random.Random(seed)
    engine = make_engine(seed, eviction=rng.choice(["lru", "fifo"]))
    conn = engine.connector
    conn.retain_finished_sessions = rng.random() < 0.5  # retained: reclaimed first, else freed at the end
    faults = conn.wrap_transfer(lambda t: FaultyTransferEngine(t, delay_polls=rng.choice([0, 1, 2]), seed=seed))
    directory, bank = conn.scheduler.directory, conn.worker.bank
    assert directory.num_slots == bank.num_slots == 6
    evicted, loads, plan = set(), [], conn.scheduler.build_connector_meta

    def checked_plan(scheduler_output):
        meta = plan(scheduler_output)
        named = {spec.key for spec in meta.loads}
        assert not named & evicted, "a load was planned for an entry the directory evicted"
        assert not named & set(meta.evicted)  # a planned load pins its entry
        assert all(spec.slot is not None for spec in meta.stores)
        evicted.update(meta.evicted)
        loads.extend(named)
        return meta

    conn.scheduler.build_connector_meta = checked_plan
    trajectories = ["R_L_R_L_R_L90", "L_R30", "R_L_R30", "R_L90"]
    added = 0
    for step in range(60):
        if added < 4 and (not engine.has_unfinished_sessions() or rng.random() < 0.15):
            engine.add_session(f"s{added}", trajectory=rng.choice(trajectories), num_chunks=rng.randint(8, 16),
                               seed=seed * 10 + added)
            added += 1
        if not engine.has_unfinished_sessions():
            break
        engine.step()
        assert directory.slots() == bank_slots(bank)
        # every retrievable chunk is banked and ready
        for sid in conn.scheduler.sessions():
            assert all(bank.get((sid, c)) is not None and bank.get((sid, c)).ready
                       for c in conn.scheduler.index.chunks(sid))
    engine.drain()
    assert directory.slots() == bank_slots(bank)
    m = engine.metrics()["connector"]
    assert loads and evicted and m["bank_evictions"] == directory.evictions == len(evicted)
    assert m["load_errors"] == 0  # no stale load reached the load path's own checks
    assert faults.faults["failed_stores"] == 0
    engine.close()


def test_the_worker_still_refuses_a_load_of_an_entry_lost_behind_the_directory():
    engine = make_engine(0, bank_bytes=12 * SLOT)
    conn = engine.connector
    conn.retain_finished_sessions = True
    plan, lost = conn.scheduler.build_connector_meta, []

    def lose_first_load(scheduler_output):
        meta = plan(scheduler_output)
        if meta.loads and not lost:
            lost.append(meta.loads[0].key)
            assert drop_entry(conn.worker.bank, lost[0]) == "cpu"  # the directory still lists it
        return meta

    conn.scheduler.build_connector_meta = lose_first_load
    engine.add_session("a", trajectory="R_L_R_L_R_L90", num_chunks=14, seed=0)
    after = []
    while engine.has_unfinished_sessions():
        results = engine.step()
        if lost:
            after.extend(results)
    # every later plan that named it (the index still lists it) was refused: it never reached a window
    assert after and all(lost[0][1] not in r.retrieved for r in after)
    assert conn.metrics()["load_errors"] >= 1
    engine.close()


def disk_engine(tmp_path, host_slots=6, disk_slots=64, **cfg):
    return make_engine(0, bank_bytes=host_slots * SLOT, bank_dir=str(tmp_path / "spill"), disk_bytes=disk_slots * SLOT,
                       **cfg)


def recording(conn, metas):
    plan = conn.scheduler.build_connector_meta

    def recorded(scheduler_output):
        meta = plan(scheduler_output)
        metas.append(meta)
        return meta

    conn.scheduler.build_connector_meta = recorded


def test_with_a_disk_tier_the_directory_decides_and_lists_the_spills(tmp_path):
    # an eviction there is a spill the directory decides (host tier -> disk): every slot is named
    engine = disk_engine(tmp_path)
    conn = engine.connector
    conn.retain_finished_sessions = True  # its entries stay: compared below
    directory, bank, metas = conn.scheduler.directory, conn.worker.bank, []
    recording(conn, metas)
    engine.add_session("a", trajectory="R_L_R_L_R_L90", num_chunks=20, seed=0)
    while engine.has_unfinished_sessions():
        engine.step()
        assert directory.slots() == bank_slots(bank)  # spilled entries: slot -1 on both sides
    engine.drain()
    stores = [spec for meta in metas for spec in meta.stores]
    spilled = [key for meta in metas for key in meta.spilled]
    assert stores and all(spec.slot is not None for spec in stores)
    assert all(meta.evicted == [] for meta in metas)  # the disk tier had room for every victim
    assert spilled and bank.spills == directory.spills == len(spilled)  # the host tier overflowed into disk
    assert len(bank) == 20 and set(directory.ready_keys()) == set(bank.keys())  # spilled ones are still banked
    assert directory.slots() == bank_slots(bank)
    engine.close()


def test_a_rollout_with_a_small_host_tier_retrieves_spilled_chunks_exactly(tmp_path):
    # three slots for retrieval_chunks=2: revisits keep bringing spilled chunks back from disk
    engine = disk_engine(tmp_path, host_slots=3, disk_slots=8)
    conn = engine.connector
    directory, bank, metas, first = conn.scheduler.directory, conn.worker.bank, [], {}
    recording(conn, metas)
    engine.add_session("a", trajectory="R_L_R_L_R_L90", num_chunks=24, seed=0)
    retrieved = 0
    while engine.has_unfinished_sessions():
        retrieved += sum(len(r.retrieved) for r in engine.step())
        assert directory.slots() == bank_slots(bank)
        for key in bank.keys():  # the bytes of each chunk as it was stored
            if key not in first and bank.get(key).ready and bank.is_resident(key):
                first[key] = bank.read_payload(key)
    engine.drain()
    restored = {key for meta in metas for key, _ in meta.restores}
    m = conn.metrics()
    assert restored and bank.restores == directory.restores >= len(restored) > 0
    assert m["load_errors"] == 0 and bank.disk_errors == 0 and retrieved
    assert any(meta.evicted for meta in metas)  # the disk tier filled up too: its LRU entries left
    for key in restored & set(bank.keys()):
        assert torch.equal(bank.read_payload(key), first[key])  # came back bit-exact
    engine.close()


def test_a_damaged_spill_file_is_a_load_error_and_the_scheduler_forgets_the_key(tmp_path):
    engine = disk_engine(tmp_path, host_slots=3, disk_slots=8)
    conn = engine.connector
    directory, bank, plan, damaged = conn.scheduler.directory, conn.worker.bank, conn.scheduler.build_connector_meta, []

    def damage_first_restore(scheduler_output):
        meta = plan(scheduler_output)
        if meta.restores and not damaged:
            damaged.extend(key for key, _ in meta.restores)
            for key in damaged:
                assert corrupt_entry(bank, key) == "disk"
        return meta

    conn.scheduler.build_connector_meta = damage_first_restore
    engine.add_session("a", trajectory="R_L_R_L_R_L90", num_chunks=24, seed=0)
    results = []
    while engine.has_unfinished_sessions():
        step = engine.step()
        if damaged:
            results.extend(step)
        assert directory.slots() == bank_slots(bank)
    engine.drain()
    assert damaged and bank.disk_errors == len(damaged)
    assert conn.metrics()["load_errors"] >= len(damaged)
    for sid, cid in damaged:  # forgotten: never planned again, never in a window
        assert (sid, cid) not in directory and (sid, cid) not in bank and cid not in conn.scheduler.index.chunks(sid)
        assert all(cid not in r.retrieved for r in results[1:])
    engine.close()
