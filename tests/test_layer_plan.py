"""The step planner (``plan_layer_copies``) against the per-page tensor-pair reference: random page
layouts, partial last pages, chunks of several sessions in one step, both directions."""
import numpy as np
import pytest
import torch

from worldkv_connector.bank import Bank
from worldkv_connector.testing import FaultyTransferEngine
from worldkv_connector.transfer import TransferEngine, layer_plan, page_lens_of, plan_layer_copies

L, PAGES, PS, H, D = 3, 48, 4, 2, 8


def _reference(pools, slots, page_ids, num_tokens, to_slot):
    """Today's per-page tensor pairs, one copy_ each: the ground truth."""
    for layer, pool in enumerate(pools):
        for slot, ids, n in zip(slots, page_ids, num_tokens):
            for kv in (0, 1):
                for i, page in enumerate(ids):
                    m = min(PS, n - i * PS)
                    if to_slot:
                        slot[layer, kv, i * PS:i * PS + m].copy_(pool[kv, page, :m])
                    else:
                        pool[kv, page, :m].copy_(slot[layer, kv, i * PS:i * PS + m])


def _layout(rng, bank, sessions):
    """Chunks of several sessions with random token counts (partial last pages) and page ids drawn
    from one shuffled free list, some runs contiguous."""
    free = list(range(PAGES))
    rng.shuffle(free)
    runs = sorted(free[:8])  # a few chunks get consecutive pages
    keys, ids, tokens = [], [], []
    for s in range(sessions):
        for c in range(int(rng.integers(1, 3))):
            n = int(rng.integers(1, 4 * PS + 1))
            p = -(-n // PS)
            if c == 0 and runs and runs[0] + p <= PAGES and all(q not in sum(ids, []) for q in range(runs[0], runs[0] + p)):
                chosen = list(range(runs[0], runs[0] + p))
                free = [q for q in free if q not in chosen]
                runs = []
            else:
                chosen, free = free[:p], free[p:]
            key = (f"s{s}", c)
            bank.reserve(key, n)
            bank.mark_ready(key)
            bank.view(key).copy_(torch.randn(bank.view(key).shape, generator=torch.Generator().manual_seed(s * 7 + c)))
            keys.append(key)
            ids.append(chosen)
            tokens.append(n)
    return keys, ids, tokens


@pytest.fixture(params=["compiled", "numpy"])
def planner(request, monkeypatch):
    """Both builders: the compiled run builder (when the extension is built) and numpy (always)."""
    if request.param == "compiled" and layer_plan._PLAN_RUNS is None:
        pytest.skip("the compiled run builder is not built (an install without a C compiler)")
    if request.param == "numpy":
        monkeypatch.setattr(layer_plan, "_PLAN_RUNS", None)
    return request.param


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("to_slot", [False, True])
def test_plan_equals_the_per_page_reference_on_random_layouts(seed, to_slot, planner):
    rng = np.random.default_rng(seed)
    bank = Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=4 * PS,
                capacity_bytes=16 * 2 * L * 4 * PS * H * D * 4, pin=False)
    keys, ids, tokens = _layout(rng, bank, sessions=int(rng.integers(1, 4)))
    pools = [torch.randn(2, PAGES, PS, H, D) for _ in range(L)]
    ref_pools = [p.clone() for p in pools]
    slots = [bank.view(k) for k in keys]
    ref_slots = [s.clone() for s in slots]
    if to_slot:
        for s in slots:
            s.zero_()
        for s in ref_slots:
            s.zero_()
    plans = plan_layer_copies(pools, slots, ids, [page_lens_of(n, PS) for n in tokens], to_slot=to_slot)
    pages = sum(len(i) for i in ids)
    assert plans.num_pairs == 2 * pages and plans.num_runs <= plans.num_pairs
    assert plans.layer_bytes == 2 * sum(tokens) * H * D * 4
    with TransferEngine() as eng:
        jobs = [eng.submit_plan("store" if to_slot else "load", plans.layer(i)) for i in range(L)]
    assert all(j.error is None and j.num_fragments == plans.num_runs for j in jobs)
    _reference(ref_pools, ref_slots, ids, tokens, to_slot)
    for got, want in zip(pools, ref_pools):
        assert torch.equal(got, want)  # pages past a partial page's tokens untouched too
    for got, want in zip(slots, ref_slots):
        assert torch.equal(got, want)
    bank.close()


needs_compiled = pytest.mark.skipif(layer_plan._PLAN_RUNS is None,
                                    reason="the compiled run builder is not built (an install without a C compiler)")


def _same_plan(pools, slots, ids, lens, monkeypatch, **kw):
    compiled = plan_layer_copies(pools, slots, ids, lens, **kw)
    with monkeypatch.context() as m:
        m.setattr(layer_plan, "_PLAN_RUNS", None)
        vectorised = plan_layer_copies(pools, slots, ids, lens, **kw)
    assert compiled.storages == vectorised.storages
    for name in ("src", "dst", "sizes", "src_store", "dst_store"):
        got, want = getattr(compiled, name), getattr(vectorised, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert (compiled.num_pairs, compiled.layer_bytes) == (vectorised.num_pairs, vectorised.layer_bytes)
    assert compiled.layer_bytes == int(vectorised.sizes.sum())
    return compiled


@needs_compiled
def test_both_builders_give_the_same_plan_over_slots_of_several_storages(monkeypatch):
    # slots from two storages, interleaved (a bank and a staging tensor, say): same runs, same
    # storage table, same index of each run's slot storage
    rng = np.random.default_rng(11)
    a, b = torch.zeros(3, L, 2, 2 * PS, H, D), torch.zeros(2, L, 2, 2 * PS, H, D)
    slots = [a[0], b[1], a[2], b[0]]
    ids = [rng.permutation(PAGES)[:2].tolist() for _ in slots]
    lens = [page_lens_of(n, PS) for n in (2 * PS, PS + 3, 5, 2 * PS)]
    pools = [torch.zeros(2, PAGES, PS, H, D) for _ in range(L)]
    plan = _same_plan(pools, slots, ids, lens, monkeypatch, to_slot=True)
    assert len(plan.storages[0]) == 3 and set(plan.dst_store.tolist()) == {1, 2}  # pool + 2 slot storages


@needs_compiled
@pytest.mark.parametrize("seed", range(8))
def test_both_builders_give_the_same_plan_on_random_steps(seed, monkeypatch):
    # runs of consecutive pages (merged), empty pages inside and at the end of a chunk, K-only
    # chunks, lengths given as lists, tuples, arrays and tensors, both directions
    rng = np.random.default_rng(seed)
    bank = torch.zeros(6, L, 2, 4 * PS, H, D)
    pools = torch.zeros(L, 2, PAGES, PS, H, D)
    free = rng.permutation(PAGES).tolist()
    slots, ids, lens = [], [], []
    for c in range(int(rng.integers(1, 7))):
        n = int(rng.integers(1, 5))
        start = free.pop()
        consecutive = rng.random() < 0.4 and start + n <= PAGES
        pages = list(range(start, start + n)) if consecutive else [free.pop() for _ in range(n)]
        tokens = [int(x) for x in rng.choice([0, 1, PS - 1, PS, PS, PS], n)]
        kind = c % 4
        slots.append(bank[c])
        ids.append(pages if kind else tuple(pages))
        lens.append([tokens, tuple(tokens), np.asarray(tokens), torch.tensor(tokens)][kind])
    k_only = [bool(x) for x in rng.random(len(slots)) < 0.3]
    for to_slot in (False, True):
        plan = _same_plan(pools, slots, ids, lens, monkeypatch, to_slot=to_slot, k_only=k_only)
        assert plan.num_runs <= plan.num_pairs


@needs_compiled
def test_runs_whose_bytes_meet_do_not_merge_across_layer_strides(monkeypatch):
    # a K-only chunk's rows end where the next slot begins (one storage), the pages follow each
    # other too: layer 0 could be one run, but the slots move by different strides per layer
    hd = H * D
    store = torch.zeros(16 * L * PS * hd)
    a = store.as_strided((L, 2, PS, H, D), (2 * PS * hd, PS * hd, hd, D, 1), 0)
    b = store.as_strided((L, 2, PS, H, D), (3 * PS * hd, PS * hd, hd, D, 1), PS * hd)
    pools = torch.zeros(L, 2, PAGES, PS, H, D)
    plan = _same_plan(pools, [a, b], [[5], [6]], [[PS], [PS]], monkeypatch, to_slot=True, k_only=[True, False])
    assert plan.num_runs == 3  # a's K, b's K, b's V: none merged


@needs_compiled
def test_runs_whose_bytes_meet_do_not_merge_across_slot_storages(monkeypatch):
    # two storages back to back (views of one numpy buffer): a K-only chunk's rows end where the
    # next chunk's slot begins, on pages that follow each other, one layer: one run by the bytes,
    # two by storage (the storage table names where each run lies)
    n, hd = PS, H * D
    buf = np.zeros(3 * n * hd, dtype=np.float32)
    first = torch.from_numpy(buf[:n * hd]).as_strided((1, 2, n, H, D), (2 * n * hd, 0, hd, D, 1))  # K = V rows
    second = torch.from_numpy(buf[n * hd:3 * n * hd]).view(1, 2, n, H, D)  # the same layer stride as first's
    assert first.data_ptr() + n * hd * 4 == second.data_ptr()
    pools = torch.zeros(1, 2, PAGES, PS, H, D)
    plan = _same_plan(pools, [first, second], [[5], [6]], [[PS], [PS]], monkeypatch, to_slot=True,
                      k_only=[True, False])
    assert plan.num_runs == 3 and plan.dst_store.tolist() == [1, 2, 2]


@needs_compiled
def test_the_compiled_builder_refuses_malformed_chunks_without_crashing():
    run = layer_plan._PLAN_RUNS
    bases, index = np.zeros(L, dtype=np.uint64), {0: 1}
    good = ([1, 2], [PS, PS], 0, 0, 64, 32, 2)
    buf, runs, pairs, nbytes = run([good], bases, index, PS, 8, 4096, True)
    assert (runs, pairs, nbytes) == (2, 4, 2 * 2 * PS * 8)  # pages 1, 2 merge: one run for K, one for V
    rows = np.frombuffer(buf, dtype=np.uint64).reshape(2 * L + 3, runs)
    assert rows[:L].tolist() == [[PS * 8, 4096 + PS * 8]] * L  # pool side: page 1 of K and of V
    assert rows[L:2 * L].tolist() == [[64 * i, 32 + 64 * i] for i in range(L)]  # slot side moves by the layer step
    assert rows[2 * L:].tolist() == [[2 * PS * 8] * 2, [0, 0], [1, 1]]  # sizes, pool storage 0, slot storage 1
    for chunk, match in [
        (good[:6], "expected tuples"),
        (([1, 2], [PS], 0, 0, 64, 32, 2), "one length"),
        (({1, 2}, [PS, PS], 0, 0, 64, 32, 2), "lists or tuples"),
        (([1, 2], [PS, PS], 0, 7, 64, 32, 2), "missing from index"),
        (([1, 2], [PS, PS], 0, 0, 64, 32, 3), r"kvs=3, expected 1 \(K only\) or 2"),
    ]:
        with pytest.raises(ValueError, match=match):
            run([chunk], bases, index, PS, 8, 4096, True)
    with pytest.raises(OverflowError):
        run([([-1], [PS], 0, 0, 64, 32, 2)], bases, index, PS, 8, 4096, True)
    with pytest.raises(TypeError):
        run([(["1"], [PS], 0, 0, 64, 32, 2)], bases, index, PS, 8, 4096, True)
    with pytest.raises(ValueError, match="chunks: expected a list"):
        run((good,), bases, index, PS, 8, 4096, True)


def test_contiguous_pages_merge_into_one_run_per_chunk_and_kv(planner):
    bank = Bank(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=37,
                capacity_bytes=4 * 2 * L * 37 * H * D * 4, pin=False)
    bank.reserve("a", 37)
    bank.reserve("b", 37)
    pools = torch.zeros(L, 2, PAGES, PS, H, D)
    lens = page_lens_of(37, PS)  # 10 pages, the last with 1 token
    plans = plan_layer_copies(pools, [bank.view("a"), bank.view("b")], [list(range(10)), list(range(20, 30))],
                              [lens, lens], to_slot=False)
    assert plans.num_pairs == 2 * 2 * 10 and plans.num_runs == 2 * 2
    scattered = plan_layer_copies(pools, [bank.view("a")], [list(range(0, 20, 2))], [lens], to_slot=False)
    assert scattered.num_runs == 2 * 10
    bank.close()


def test_page_lens_are_shared_read_only_arrays():
    lens = page_lens_of(37, PS)
    assert lens.tolist() == [PS] * 9 + [1] and page_lens_of(37, PS) is lens  # one array per size
    assert page_lens_of(4 * PS, PS).tolist() == [PS] * 4 and page_lens_of(0, PS).size == 0
    with pytest.raises(ValueError, match="read-only"):  # a caller cannot change another's lengths
        lens[0] = 1


def test_plan_refuses_bad_layouts_naming_the_field(planner):
    pools = [torch.zeros(2, PAGES, PS, H, D) for _ in range(L)]
    slot = torch.zeros(L, 2, 8, H, D)
    with pytest.raises(ValueError, match=r"page_ids\[0\]: expected ids in \[0, 48\)"):
        plan_layer_copies(pools, [slot], [[3, 48]], [[PS, PS]], to_slot=False)
    with pytest.raises(ValueError, match=r"page_lens\[0\]: every value must lie in \[0, page_size=4\]"):
        plan_layer_copies(pools, [slot], [[3]], [[PS + 1]], to_slot=False)
    with pytest.raises(ValueError, match=r"slot\[0\]: expected \[3, 2, N >= 12"):
        plan_layer_copies(pools, [slot], [[1, 2, 3]], [[PS] * 3], to_slot=False)
    with pytest.raises(ValueError, match=r"pools\[1\]"):
        plan_layer_copies([pools[0], pools[1][:, :3]], [slot[:2]], [[1]], [[PS]], to_slot=False)
    with pytest.raises(ValueError, match="one entry per slot"):
        plan_layer_copies(pools, [slot], [[1], [2]], [[PS]], to_slot=False)


def test_k_only_moves_only_the_keys(planner):
    pools = [torch.zeros(2, PAGES, PS, H, D) for _ in range(L)]
    slot = torch.randn(L, 2, 2 * PS, H, D)
    plans = plan_layer_copies(pools, [slot], [[9, 3]], [[PS, 2]], to_slot=False, k_only=[True])
    with TransferEngine() as eng:
        for i in range(L):
            eng.submit_plan("load", plans.layer(i))
    for i, pool in enumerate(pools):
        assert torch.equal(pool[0, 9], slot[i, 0, :PS]) and torch.equal(pool[0, 3, :2], slot[i, 0, PS:PS + 2])
        assert not pool[1].any() and not pool[0, 3, 2:].any()


@pytest.mark.parametrize("seed", range(3))
def test_submit_layers_moves_what_per_layer_plans_move_one_job_per_layer(seed, planner):
    rng = np.random.default_rng(seed)
    src = [torch.randn(2, PAGES, PS, H, D) for _ in range(L)]
    slots = [torch.randn(L, 2, 3 * PS, H, D) for _ in range(3)]
    lens = [page_lens_of(int(n), PS) for n in rng.integers(1, 3 * PS + 1, 3)]
    free = rng.permutation(PAGES).tolist()  # disjoint pages: no two chunks write one page
    ids = [[free.pop() for _ in x] for x in lens]
    got, want = [torch.zeros_like(p) for p in src], [torch.zeros_like(p) for p in src]
    with TransferEngine() as eng:
        per_layer = plan_layer_copies(want, slots, ids, lens, to_slot=False)
        ref = [eng.submit_plan("load", per_layer.layer(i), tag=i) for i in range(L)]
        plans = plan_layer_copies(got, slots, ids, lens, to_slot=False)
        jobs = eng.submit_layers("load", plans, tags=list(range(L)))
        assert eng.stats()["load_jobs"] == 2 * L and eng.stats()["errors"] == 0
        reported = eng.poll()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    fields = ("kind", "nbytes", "num_fragments", "num_pairs", "tag", "path", "error")
    assert [[getattr(j, f) for f in fields] for j in jobs] == [[getattr(j, f) for f in fields] for j in ref]
    assert [j.job_id for j in reported] == [j.job_id for j in ref + jobs] and all(j.done() for j in jobs)


def test_submit_layers_refuses_bad_input_before_copying():
    pools = [torch.zeros(2, PAGES, PS, H, D) for _ in range(L)]
    plans = plan_layer_copies(pools, [torch.ones(L, 2, PS, H, D)], [[4]], [[PS]], to_slot=False)
    eng = TransferEngine()
    with pytest.raises(ValueError, match="plans: expected LayerPlans"):
        eng.submit_layers("load", plans.layer(0))
    with pytest.raises(ValueError, match=r"tags: expected one per layer \(3\), got 2"):
        eng.submit_layers("load", plans, tags=["a", "b"])
    with pytest.raises(ValueError, match="kind='copy'"):
        eng.submit_layers("copy", plans)
    assert not any(p.any() for p in pools) and eng.stats()["jobs"] == 0
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit_layers("load", plans)


def test_faulty_engine_injects_on_the_plan_path():
    pools = [torch.ones(2, PAGES, PS, H, D) for _ in range(L)]
    slot = torch.zeros(L, 2, 2 * PS, H, D)
    plans = plan_layer_copies(pools, [slot], [[5, 6]], [[PS, PS]], to_slot=True)
    eng = FaultyTransferEngine(TransferEngine("cpu"), fail_jobs={2})
    jobs = [eng.submit_plan("store", plans.layer(i)) for i in range(L)]
    assert [j.error is not None for j in jobs] == [False, True, False]
    assert jobs[1].nbytes == plans.layer_bytes and eng.faults["failed_stores"] == 1
    assert slot[0].eq(1).all() and not slot[1].any() and slot[2].eq(1).all()  # a failed job copied nothing
    assert sorted(j.job_id for j in eng.poll()) == [j.job_id for j in jobs]
