"""Worker half of the WorldKV connector: stores (compression, write-through), loads into pages,
RoPE deltas, failed copies and bank eviction, on synthetic KV pools (no model)."""
import logging

import pytest
import torch

from worldkv_connector.compression import compress_chunk
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector.meta import LoadSpec, RopeDelta, StoreSpec, WorldKVMetadata
from worldkv_connector.connector.worker import WorldKVWorker
from worldkv_connector.rope import rotate_temporal
from worldkv_connector.shapes import PRESETS
from worldkv_connector.testing import submit_each_layer
from worldkv_connector.transfer import TransferEngine

SHAPE = PRESETS["tiny"]  # 2 layers, 2 kv heads x 16, 16 tokens per frame, fp32
L, H, D, FT = SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, SHAPE.frame_tokens
T = SHAPE.chunk_tokens  # 48 tokens per chunk
PS = 20  # page size: a whole chunk is 20 + 20 + 8 (last page partial)
NUM_PAGES = 64


class FailingTransfer(TransferEngine):
    """Fails every job of ``kind``: by raising in submit, or by returning a job with an error."""

    def __init__(self, kind: str, raise_: bool):
        super().__init__("cpu")
        self.kind, self.raise_ = kind, raise_

    def submit_plan(self, kind, plan, **kw):
        if kind == self.kind and self.raise_:
            raise RuntimeError("injected submit failure")
        job = super().submit_plan(kind, plan, **kw)
        if kind == self.kind:
            job.error = "RuntimeError: injected copy failure"
        return job

    def submit_layers(self, kind, plans, **kw):  # the load path's call: each layer's job as above
        return submit_each_layer(self.submit_plan, kind, plans, **kw)


def make_worker(transfer=None, **cfg):
    config = WorldKVConfig(page_size=PS, bank_bytes=cfg.pop("bank_bytes", 1 << 22), **cfg)
    worker = WorldKVWorker(config, SHAPE, page_size=PS, device="cpu", transfer=transfer)
    g = torch.Generator().manual_seed(0)
    caches = {f"blocks.{i}": torch.randn(2, NUM_PAGES, PS, H, D, generator=g) for i in range(L)}
    worker.register_kv_caches(caches)
    return worker, caches


def chunk_kv(caches, layer, pages, n=T):
    """[T, H, D] K and V of a chunk read back from its pages."""
    kv = caches[f"blocks.{layer}"][:, list(pages)]  # [2, P, PS, H, D]
    return kv[0].reshape(-1, H, D)[:n], kv[1].reshape(-1, H, D)[:n]


def run_store(worker, specs, step=0, layers=range(L)):
    worker.bind(WorldKVMetadata(step, stores=list(specs)))
    worker.start_load_kv()
    for i in layers:
        worker.save_kv_layer(f"blocks.{i}", worker.kv_caches[f"blocks.{i}"])
    worker.wait_for_save()
    worker.bind(None)


def run_load(worker, loads, ropes=(), step=1, passes=1):
    worker.bind(WorldKVMetadata(step, loads=list(loads), rope_deltas=list(ropes)))
    worker.start_load_kv()
    for _ in range(passes):  # the engine waits once per layer on every pass
        for i in range(L):
            worker.wait_for_layer_load(f"blocks.{i}")
    worker.wait_for_save()
    worker.bind(None)


def test_uncompressed_store_banks_exact_rows_and_is_ready_only_after_poll():
    worker, caches = make_worker(keep_ratio=1.0)
    pages = (5, 9, 2)  # scattered, last page partial (48 = 20 + 20 + 8)
    run_store(worker, [StoreSpec(("s", 3), pages, T)])
    entry = worker.bank.get(("s", 3))
    assert entry is not None and not entry.ready  # not retrievable before the store job is seen done
    report = worker.poll()
    assert [(r.key, r.ok, r.num_tokens) for r in report.stores] == [(("s", 3), True, T)]
    assert entry.ready
    view = worker.bank.view(("s", 3))  # [L, 2, T, H, D]
    for i in range(L):
        k, v = chunk_kv(caches, i, pages)
        assert torch.equal(view[i, 0], k) and torch.equal(view[i, 1], v)
    assert torch.equal(worker.kept_indices(("s", 3)), torch.arange(T).expand(L, T))
    m = worker.metrics
    assert m.store_jobs == L and m.chunks_banked == 1 and m.bytes_stored == SHAPE.chunk_bytes() + L * T * 8


@pytest.mark.parametrize("keep_ratio,pooled,fraction", [(0.25, True, 1 / 2), (0.5, False, 2 / 3)])
def test_compressed_store_matches_reference(keep_ratio, pooled, fraction):
    worker, caches = make_worker(keep_ratio=keep_ratio, pooled=pooled)
    pages_a, pages_b = (0, 1, 2), (7, 3, 11)
    run_store(worker, [StoreSpec(("s", 0), pages_a, T), StoreSpec(("s", 1), pages_b, T)])
    worker.poll()
    for key, pages in ((("s", 0), pages_a), (("s", 1), pages_b)):
        entry = worker.bank.get(key)
        assert entry.ready and entry.nbytes == SHAPE.chunk_bytes() * fraction
        view = worker.bank.view(key)
        for i in range(L):
            k, v = chunk_kv(caches, i, pages)
            ref = compress_chunk(k, v, frame_tokens=FT, keep_ratio=keep_ratio, pooled=pooled)
            assert torch.equal(view[i, 0], ref.k) and torch.equal(view[i, 1], ref.v)
            assert torch.equal(worker.kept_indices(key)[i], ref.indices)
    assert worker.metrics.compression_ratio == pytest.approx(1 / fraction)
    assert worker.metrics.bank_bytes == worker.bank.bytes_used == 2 * SHAPE.chunk_bytes() * fraction


def test_store_waits_for_delayed_jobs_and_missing_layers_fail(delayed_transfer):
    worker, _ = make_worker(transfer=delayed_transfer(delay=2), keep_ratio=1.0)
    run_store(worker, [StoreSpec(("s", 0), (0, 1, 2), T)])
    assert worker.poll().stores == [] and worker.poll().stores == []  # two polls: still in flight
    assert [r.ok for r in worker.poll().stores] == [True]
    # a clean pass that saved only layer 0 must not bank a half-written chunk
    run_store(worker, [StoreSpec(("s", 1), (3, 4, 5), T)], step=1, layers=[0])
    stores = []
    for _ in range(4):
        stores += worker.poll().stores
    assert [(r.key, r.ok) for r in stores] == [(("s", 1), False)]
    assert ("s", 1) not in worker.bank and worker.metrics.store_errors == 1


@pytest.mark.parametrize("raise_", [True, False])
def test_failed_store_leaves_chunk_unbanked(raise_, caplog):
    worker, _ = make_worker(transfer=FailingTransfer("store", raise_), keep_ratio=0.5)
    with caplog.at_level(logging.WARNING):
        run_store(worker, [StoreSpec(("s", 0), (0, 1, 2), T)])
        report = worker.poll()
    assert [(r.key, r.ok) for r in report.stores] == [(("s", 0), False)]
    assert len(worker.bank) == 0 and worker.metrics.store_errors >= 1
    assert any("not banked" in r.message or "failed" in r.message for r in caplog.records)


def test_load_fills_pages_in_order_and_unpins():
    worker, caches = make_worker(keep_ratio=0.5)  # 32 kept tokens: pages of 20 + 12
    run_store(worker, [StoreSpec(("s", 0), (0, 1, 2), T)])
    worker.poll()
    before = {name: c.clone() for name, c in caches.items()}
    run_load(worker, [LoadSpec(("s", 0), (40, 33), 32)])
    entry = worker.bank.get(("s", 0))
    assert entry.pins == L  # one pin per load job (one per layer) in flight, until observed done
    report = worker.poll()
    assert report.loads_done == [("s", 0)] and entry.pins == 0
    view = worker.bank.view(("s", 0))
    for i in range(L):
        pool = caches[f"blocks.{i}"]
        for kv in (0, 1):
            assert torch.equal(pool[kv, 40], view[i, kv, :20])
            assert torch.equal(pool[kv, 33, :12], view[i, kv, 20:32])
            # rows past the chunk's tokens and every other page are untouched
            assert torch.equal(pool[kv, 33, 12:], before[f"blocks.{i}"][kv, 33, 12:])
        changed = (pool != before[f"blocks.{i}"]).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
        assert changed == [33, 40]
    assert worker.metrics.load_jobs == L and worker.metrics.bytes_loaded == SHAPE.chunk_bytes(32)


@pytest.mark.parametrize("raise_", [True, False])
def test_failed_load_reports_pages_and_warns_once(raise_, caplog):
    worker, _ = make_worker(transfer=FailingTransfer("load", raise_), keep_ratio=1.0)
    run_store(worker, [StoreSpec(("s", 0), (0, 1, 2), T), StoreSpec(("s", 1), (3, 4, 5), T)])
    worker.poll()
    with caplog.at_level(logging.WARNING, logger="worldkv_connector.connector"):
        run_load(worker, [LoadSpec(("s", 0), (10, 11, 12), T), LoadSpec(("s", 1), (20, 21, 22), T)], passes=3)
        assert worker.load_error_pages() == {10, 11, 12, 20, 21, 22}
        report = worker.poll()
    ours = [r for r in caplog.records if r.name.startswith("worldkv_connector.connector")]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per step, not one per layer or pass
    assert set(report.loads_failed) == {("s", 0), ("s", 1)} and report.loads_done == []
    assert worker.metrics.load_errors >= 1
    assert all(worker.bank.get(k).pins == 0 for k in (("s", 0), ("s", 1)))
    # the next step starts with a clean error set
    run_load(worker, [], step=2)
    assert worker.load_error_pages() == set()


def test_load_of_evicted_entry_is_an_error_not_stale_data():
    worker, _ = make_worker(keep_ratio=1.0)
    run_load(worker, [LoadSpec(("s", 9), (1, 2, 3), T)])
    assert worker.load_error_pages() == {1, 2, 3}
    assert worker.poll().loads_failed == [("s", 9)]


def test_rope_delta_rotates_k_once_per_step():
    worker, caches = make_worker(keep_ratio=1.0)
    pages, lens = (6, 7, 8), (20, 20, 8)
    before = {name: c.clone() for name, c in caches.items()}
    run_load(worker, [], ropes=[RopeDelta(("s", 0), pages, lens, -5)], passes=5)
    for i in range(L):
        pool, old = caches[f"blocks.{i}"], before[f"blocks.{i}"]
        for p, n in zip(pages, lens):
            assert torch.allclose(pool[0, p, :n], rotate_temporal(old[0, p, :n], -5), atol=1e-6)
            assert torch.equal(pool[0, p, n:], old[0, p, n:])  # padding rows untouched
            assert torch.equal(pool[1, p], old[1, p])  # values carry no RoPE
        assert torch.equal(pool[:, 9:], old[:, 9:])


def test_full_bank_evicts_lru_and_reports_it():
    slot = SHAPE.chunk_bytes()
    worker, _ = make_worker(keep_ratio=1.0, bank_bytes=2 * slot)
    for c in range(2):
        run_store(worker, [StoreSpec(("s", c), (3 * c, 3 * c + 1, 3 * c + 2), T)], step=c)
        worker.poll()
    run_load(worker, [LoadSpec(("s", 0), (30, 31, 32), T)], step=2)  # touches chunk 0: chunk 1 is LRU
    worker.poll()
    run_store(worker, [StoreSpec(("s", 2), (6, 7, 8), T)], step=3)
    report = worker.poll()
    assert report.evicted == [("s", 1)] and [r.ok for r in report.stores] == [True]
    assert sorted(worker.bank.keys()) == [("s", 0), ("s", 2)]
    assert worker.bank.bytes_used == 2 * slot == worker.metrics.bank_bytes


def test_finished_sessions_make_room_before_live_ones_are_evicted():
    slot = SHAPE.chunk_bytes()
    worker, _ = make_worker(keep_ratio=1.0, bank_bytes=3 * slot)
    for step, key in enumerate([("b", 0), ("a", 0), ("a", 1)]):  # b's entry is the least recently used
        run_store(worker, [StoreSpec(key, (3 * step, 3 * step + 1, 3 * step + 2), T)], step=step)
        worker.poll()
    worker.bind(WorldKVMetadata(3, stores=[StoreSpec(("b", 1), (9, 10, 11), T)], finished_sessions=["a"]))
    worker.start_load_kv()
    for i in range(L):
        worker.save_kv_layer(f"blocks.{i}", worker.kv_caches[f"blocks.{i}"])
    worker.wait_for_save()
    report = worker.poll()
    assert report.evicted == [("a", 0)] and [r.ok for r in report.stores] == [True]
    assert sorted(worker.bank.keys()) == [("a", 1), ("b", 0), ("b", 1)]
    assert worker.kept_indices(("a", 1)) is not None  # still there for diagnostics while room lasts


def test_no_room_in_bank_fails_store_gracefully(delayed_transfer):
    slot = SHAPE.chunk_bytes()
    worker, _ = make_worker(transfer=delayed_transfer(delay=5), keep_ratio=1.0, bank_bytes=slot)
    run_store(worker, [StoreSpec(("s", 0), (0, 1, 2), T)])
    # the only slot is still being written: no victim, the second chunk is not banked
    run_store(worker, [StoreSpec(("s", 1), (3, 4, 5), T)], step=1)
    results = []
    for _ in range(8):
        results += worker.poll().stores
    assert sorted((r.key, r.ok) for r in results) == [(("s", 0), True), (("s", 1), False)]


def test_register_kv_caches_checks_shapes():
    worker, _ = make_worker()
    with pytest.raises(ValueError, match="expected \\[2, num_pages, 20"):
        worker.register_kv_caches({f"blocks.{i}": torch.zeros(2, 4, 16, H, D) for i in range(L)})
    with pytest.raises(ValueError, match="1 layers"):
        worker.register_kv_caches({"blocks.0": torch.zeros(2, 4, PS, H, D)})
    with pytest.raises(ValueError, match="float32"):
        worker.register_kv_caches({f"blocks.{i}": torch.zeros(2, 4, PS, H, D, dtype=torch.float16) for i in range(L)})


@pytest.mark.cuda
def test_cuda_store_and_load_match_cpu_reference():
    config = WorldKVConfig(page_size=PS, bank_bytes=1 << 22, keep_ratio=0.25)
    worker = WorldKVWorker(config, SHAPE, page_size=PS, device="cuda")
    g = torch.Generator().manual_seed(0)
    caches = {f"blocks.{i}": torch.randn(2, NUM_PAGES, PS, H, D, generator=g).cuda() for i in range(L)}
    worker.register_kv_caches(caches)
    run_store(worker, [StoreSpec(("s", 0), (4, 1, 9), T)])
    worker.transfer.wait_all()
    assert [r.ok for r in worker.poll().stores] == [True]
    view = worker.bank.view(("s", 0))
    for i in range(L):
        k, v = (x.cpu() for x in chunk_kv(caches, i, (4, 1, 9)))
        ref = compress_chunk(k, v, frame_tokens=FT, keep_ratio=0.25)
        assert torch.equal(view[i, 0].cpu(), ref.k) and torch.equal(view[i, 1].cpu(), ref.v)
        assert torch.equal(worker.kept_indices(("s", 0))[i], ref.indices)
    run_load(worker, [LoadSpec(("s", 0), (50, 51), 24)])
    torch.cuda.synchronize()
    worker.transfer.wait_all()
    assert worker.poll().loads_done == [("s", 0)]
    for i in range(L):
        pool = caches[f"blocks.{i}"]
        assert torch.equal(pool[0, 50].cpu(), view[i, 0, :20].cpu())
        assert torch.equal(pool[1, 51, :4].cpu(), view[i, 1, 20:24].cpu())
    worker.close()


def _exact_rotation(k, delta):
    """fp64 rotation of the temporal channel pairs of k [..., H, D] by ``delta`` frames."""
    from worldkv_connector.rope import ROPE_THETA, rope_split

    dt = rope_split(k.shape[-1])[0]
    inv = ROPE_THETA ** (-2.0 * torch.arange(dt // 2, dtype=torch.float64) / dt)
    cos, sin = torch.cos(delta * inv), torch.sin(delta * inv)
    x = k.double().clone()
    x0, x1 = x[..., 0:dt:2].clone(), x[..., 1:dt:2].clone()
    x[..., 0:dt:2], x[..., 1:dt:2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return x


def test_rope_correction_over_100_steps_stays_at_the_one_shot_error():
    """A hot chunk re-targeted every step for 100 steps: each step's keys are rotated from the
    bank's original keys (reload), so the error against an exact fp64 rotation stays at the level
    of one bf16 rotation; accumulating the same deltas in place on bf16 pages drifts."""
    from worldkv_connector.kernels.rope_delta import rope_delta_torch
    from worldkv_connector.shapes import KVShape

    shape = KVShape("bf16", num_layers=2, num_kv_heads=2, head_dim=128, frame_tokens=16, dtype="bf16")
    config = WorldKVConfig(page_size=PS, bank_bytes=1 << 22, keep_ratio=1.0, rope_correction=True)
    worker = WorldKVWorker(config, shape, page_size=PS, device="cpu")
    g = torch.Generator().manual_seed(3)
    caches = {f"blocks.{i}": torch.zeros(2, NUM_PAGES, PS, 2, 128, dtype=torch.bfloat16) for i in range(2)}
    worker.register_kv_caches(caches)
    key, pages, lens = ("s", 0), (11, 12, 13), (20, 20, 8)
    worker.bank.reserve(key, T)
    worker.bank.view(key).copy_(torch.randn(2, 2, T, 2, 128, generator=g))
    worker.bank.mark_ready(key)
    original = worker.bank.view(key)[:, 0].clone()  # [L, T, H, D] K as banked

    def rel_error(k_pages, delta):  # k_pages: [L, 3 pages, PS, H, D] -> chunk rows vs exact
        got = torch.cat([k_pages[:, i, :n] for i, n in enumerate(lens)], dim=1).double()
        want = _exact_rotation(original, delta)
        return float((got - want).norm() / want.norm())

    targets = [-3 * (1 + (s * 7) % 23) for s in range(101)]  # positions relative to the original
    run_load(worker, [LoadSpec(key, pages, T)], ropes=[RopeDelta(key, pages, lens, targets[0])], step=0)
    one_shot = rel_error(torch.stack([c[0, list(pages)] for c in caches.values()]), targets[0])
    errors = []
    for s in range(1, 101):
        run_load(worker, [], ropes=[RopeDelta(key, pages, lens, targets[s], reload=True)], step=s)
        worker.poll()
        errors.append(rel_error(torch.stack([c[0, list(pages)] for c in caches.values()]), targets[s]))
    assert 0 < one_shot < 5e-3  # one bf16 rounding of the rotated keys
    assert max(errors) < 1.5 * one_shot, (one_shot, max(errors))
    assert worker.metrics.load_errors == 0
    # the failure mode this prevents: the same positions reached by in-place deltas on bf16 pages
    drift = torch.stack([c[0].clone() for c in caches.values()])  # [L, pages, PS, H, D]
    for i, p in enumerate(pages):
        drift[:, p, :lens[i]] = torch.stack([original[layer, 20 * i:20 * i + lens[i]] for layer in range(2)])
    ids, n = torch.tensor(pages), torch.tensor(lens)
    prev = 0
    for t in targets:
        rope_delta_torch(drift, ids, torch.full((3,), t - prev), n)
        prev = t
    assert rel_error(drift[:, list(pages)], targets[-1]) > 3 * one_shot
    worker.close()


def test_rope_reload_of_an_evicted_chunk_is_a_load_error_not_drift():
    worker, _ = make_worker(keep_ratio=1.0, rope_correction=True)
    run_load(worker, [], ropes=[RopeDelta(("s", 4), (6, 7, 8), (20, 20, 8), -3, reload=True)])
    assert worker.load_error_pages() == {6, 7, 8}
    assert worker.poll().loads_failed == [("s", 4)]
