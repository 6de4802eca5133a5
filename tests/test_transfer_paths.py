"""Copy-path choice (batched DMA / SM copy kernel / torch), the kernel path, and fragment plans."""
import pytest
import torch

from worldkv_connector.bank import Bank
from worldkv_connector.transfer import cuda_copy
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.transfer import (
    PATHS, PathOptions, TransferEngine, choose_path, page_fragments, plan_fragments,
)
from worldkv_connector.transfer.paths import kernel_fragments
from worldkv_connector.transfer.runs import plan_runs

PAGE, H, D = 4, 2, 8  # page_size, kv heads, head dim
PAGE_BYTES = PAGE * H * D * 4  # fp32


def gather_pages_torch(pool, page_ids, page_lens):
    """[*lead, N, H, D]: the first page_lens[i] tokens of page page_ids[i] of pool
    [*lead, num_pages, page_size, H, D], page after page (the reference of a paged gather)."""
    parts = [pool[..., int(p), :int(n), :, :] for p, n in zip(page_ids.tolist(), page_lens.tolist())]
    return torch.cat(parts, dim=-3)


def _host_pool(num_pages, pinned=True):
    t = torch.randn(num_pages, PAGE, H, D)
    return t.pin_memory() if pinned else t


def pool(num_pages=8, device="cpu"):
    return torch.randn(num_pages, PAGE, H, D, device=device)  # [num_pages, page_size, H, D]



# --- copy-path choice (pure decision logic, fake availability) --------------------------------
KIB = 1024
GPU_ALL = PathOptions("cuda", batch_dma=True, sm_kernel=True, kernel_threshold_bytes=28 * KIB)


def test_small_runs_take_the_kernel_large_runs_take_batched_dma():
    host = {"host_pinned": True, "host_mapped": True}
    assert choose_path([16 * KIB] * 60, GPU_ALL, **host) == "sm-kernel"
    assert choose_path([192 * KIB] * 60, GPU_ALL, **host) == "dma-batch"
    # the threshold is exclusive: a run of exactly 28 KiB goes to the copy engines
    assert choose_path([28 * KIB], GPU_ALL, **host) == "dma-batch"
    assert choose_path([28 * KIB - 1], GPU_ALL, **host) == "sm-kernel"


def test_the_median_run_decides_not_the_outliers():
    host = {"host_pinned": True, "host_mapped": True}
    # compressed chunks: many full large pages and one partial page per row -> still DMA
    assert choose_path([192 * KIB] * 3 + [KIB] * 2, GPU_ALL, **host) == "dma-batch"
    # mostly tiny fragments with a few large merged runs -> kernel
    assert choose_path([KIB] * 3 + [4 << 20] * 2, GPU_ALL, **host) == "sm-kernel"


def test_fallbacks_when_a_mechanism_is_missing():
    small = [4 * KIB] * 10
    # kernel unavailable (no CuPy): batched DMA, or the loop without a batch API
    no_kernel = PathOptions("cuda", batch_dma=True, sm_kernel=False)
    assert choose_path(small, no_kernel, host_pinned=True, host_mapped=True) == "dma-batch"
    assert choose_path(small, PathOptions("cuda"), host_pinned=True, host_mapped=True) == "dma-loop"
    # host memory not mapped into the device (pinned only) or pageable: never the kernel
    assert choose_path(small, GPU_ALL, host_pinned=True, host_mapped=False) == "dma-batch"
    assert choose_path(small, GPU_ALL, host_pinned=False, host_mapped=False) == "dma-loop"
    # threshold 0 switches the kernel off; an empty job never launches it
    off = PathOptions("cuda", batch_dma=True, sm_kernel=True, kernel_threshold_bytes=0)
    assert choose_path(small, off, host_pinned=True, host_mapped=True) == "dma-batch"
    assert choose_path([], GPU_ALL, host_pinned=True, host_mapped=True) == "dma-batch"
    # without CUDA there is one path whatever the sizes
    assert choose_path(small, PathOptions("cpu"), host_pinned=False, host_mapped=False) == "cpu-sync"


def test_every_chosen_path_is_a_registered_name_and_the_engine_counts_each():
    sizes = ([4 * KIB] * 10, [64 * KIB] * 10, [])
    options = (GPU_ALL, PathOptions("cuda"), PathOptions("cuda", batch_dma=True), PathOptions("cpu"))
    chosen = {choose_path(s, o, host_pinned=p, host_mapped=p) for s in sizes for o in options for p in (True, False)}
    assert chosen == set(PATHS) == {"cpu-sync", "dma-batch", "dma-loop", "sm-kernel"}
    assert PATHS.get("sm-kernel")  # each name says what the path is
    with pytest.raises(ValueError, match=r"unknown copy path 'dma': choose one of \['cpu-sync'"):
        PATHS.get("dma")
    assert set(TransferEngine(device="cpu").stats()["paths"]) == set(PATHS)


def test_path_options_and_engine_knobs_are_validated():
    with pytest.raises(ValueError, match="kernel_threshold_bytes=-1 is out of range"):
        PathOptions("cuda", kernel_threshold_bytes=-1)
    with pytest.raises(ValueError, match="device_type='tpu'"):
        PathOptions("tpu")
    with pytest.raises(ValueError, match="need device_type='cuda'"):
        PathOptions("cpu", sm_kernel=True)
    with pytest.raises(ValueError, match="kernel_threshold_bytes=True"):
        TransferEngine("cpu", kernel_threshold_bytes=True)
    with pytest.raises(ValueError, match="sm_kernel=True needs a cuda device"):
        TransferEngine("cpu", sm_kernel=True)


def test_threshold_comes_from_the_config():
    cfg = WorldKVConfig(copy_kernel_threshold_bytes=64 * KIB)
    with TransferEngine.for_config(cfg, "cpu") as eng:
        stats = eng.stats()
        assert eng.options.kernel_threshold_bytes == 64 * KIB
    assert stats["kernel_threshold_bytes"] == 64 * KIB and stats["sm_kernel"] is False
    assert TransferEngine("cpu").options.kernel_threshold_bytes == WorldKVConfig().copy_kernel_threshold_bytes


def test_kernel_fragments_translate_host_addresses_per_storage():
    src, dst = pool(), torch.zeros(8, PAGE, H, D)
    other = torch.zeros(2, PAGE, H, D)
    srcs = [src[0], src[1], src[5]]
    dsts = [dst[0], dst[1], other[0]]
    runs = plan_runs(srcs, dsts)
    assert len(runs) == 2
    s_base, d_base, o_base = (t.untyped_storage().data_ptr() for t in (src, dst, other))
    mapping = {s_base: 1 << 40, d_base: 2 << 40, o_base: 3 << 40}  # fake device addresses
    got = kernel_fragments(runs, srcs, dsts, mapping)
    assert got == (
        [1 << 40, (1 << 40) + 5 * PAGE_BYTES],
        [2 << 40, 3 << 40],
        [2 * PAGE_BYTES, PAGE_BYTES],
    )
    # a run that spans two storages (pretend-merged) is split back into its pairs
    fake = [(src[0].data_ptr(), dst[0].data_ptr(), 2 * PAGE_BYTES, 0, 1)]
    got = kernel_fragments(fake, [src[0], src[1]], [dst[0], other[0]], mapping)
    assert got == ([1 << 40, (1 << 40) + PAGE_BYTES], [2 << 40, 3 << 40], [PAGE_BYTES, PAGE_BYTES])


# --- CUDA: the SM copy kernel path moves the same bytes as DMA ---------------------------------
needs_kernel = pytest.mark.skipif(not cuda_copy.available(), reason="the SM copy kernel needs CUDA and CuPy")


@pytest.mark.cuda
@needs_kernel
def test_kernel_path_equals_dma_path_both_directions():
    src_host = _host_pool(32)
    order = [7, 3, 4, 5, 20, 0, 1, 31, 12]
    results = {}
    for kernel in (True, False):
        eng = TransferEngine("cuda", sm_kernel=kernel, kernel_threshold_bytes=1 << 30)
        dev = torch.zeros(32, PAGE, H, D, device="cuda")
        load = eng.submit("load", [src_host[i] for i in order], [dev[i + 1] for i in range(len(order))])
        back = torch.zeros(32, PAGE, H, D).pin_memory()
        store = eng.submit("store", [dev[i] for i in reversed(range(32))], list(back))
        eng.wait_all()
        expected_path = "sm-kernel" if kernel else eng.path
        assert (load.path, store.path) == (expected_path, expected_path)
        assert load.error is None and store.error is None
        assert eng.stats()["paths"][expected_path] == 2
        results[kernel] = back
        eng.close()
    assert torch.equal(results[True], results[False])
    expected = torch.zeros(32, PAGE, H, D)
    expected[1:1 + len(order)] = src_host[order]
    assert torch.equal(results[True], expected.flip(0))


@pytest.mark.cuda
@needs_kernel
def test_kernel_path_respects_threshold_and_pageable_memory():
    dev = torch.randn(16, PAGE, H, D, device="cuda")
    with TransferEngine("cuda", sm_kernel=True, kernel_threshold_bytes=PAGE_BYTES) as eng:
        # runs of exactly the threshold go to the copy engines
        host = torch.zeros(16, PAGE, H, D).pin_memory()
        job = eng.submit("store", [dev[i] for i in range(0, 16, 2)], [host[i] for i in range(8)])
        eng.wait(job)
        assert job.path == eng.path and torch.equal(host[:8], dev[0::2].cpu())
    with TransferEngine("cuda", sm_kernel=True, kernel_threshold_bytes=1 << 30) as eng:
        pageable = torch.zeros(16, PAGE, H, D)  # not mapped: the kernel cannot reach it
        job = eng.submit("store", [dev[i] for i in range(0, 16, 2)], [pageable[i] for i in range(8)])
        eng.wait(job)
        assert job.path == "dma-loop" and torch.equal(pageable[:8], dev[0::2].cpu())
        # device-to-device small fragments may take the kernel
        other = torch.zeros_like(dev)
        job = eng.submit("load", [dev[i] for i in range(0, 16, 2)], [other[i] for i in range(8)])
        eng.wait(job)
        assert job.path == "sm-kernel" and torch.equal(other[:8], dev[0::2])


# --- fragment plans: thousands of page fragments planned as address arrays ---------------------


def _pools(layers=2, num_pages=10):
    return torch.randn(layers, 2, num_pages, PAGE, H, D)  # [L, 2, num_pages, page_size, H, D]


def test_page_fragments_match_the_gather_reference_and_tensor_pairs():
    pools = _pools()
    ids, lens = [7, 2, 3, 9], [PAGE, PAGE, PAGE, 1]  # pages 2, 3 adjacent; last page partial
    n = sum(lens)
    bank = Bank(num_layers=2, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=n + 3,
                capacity_bytes=1 << 16, pin=False)
    bank.reserve("c", n)
    slot = bank.view("c")  # [L, 2, n, H, D], rows strided by slot_tokens
    plan = page_fragments(pools, ids, slot, lens)
    assert plan.num_fragments == 2 * 2 * 4 and plan.nbytes == 2 * 2 * n * H * D * 4
    with TransferEngine() as eng:
        job = eng.submit_plan("store", plan, tag="x")
        assert job.done() and job.error is None and job.path == "cpu-sync" and job.tag == "x"
        # 7 | 2-3 merged on both sides | 9, per (layer, K/V) plane
        assert (job.num_pairs, job.num_fragments, job.nbytes) == (16, 12, plan.nbytes)
        assert eng.poll() == [job] and eng.stats()["bytes_stored"] == plan.nbytes
    ref = gather_pages_torch(pools, torch.tensor(ids), torch.tensor(lens))  # [L, 2, n, H, D]
    assert torch.equal(slot, ref)
    # and back into other pages (a reinsertion), per-layer pool list form
    layers = [torch.zeros(2, 10, PAGE, H, D) for _ in range(2)]
    with TransferEngine() as eng:
        eng.submit_plan("load", page_fragments(layers, [0, 5, 1, 8], slot, lens, to_slot=False))
    for layer in range(2):
        got = gather_pages_torch(layers[layer], torch.tensor([0, 5, 1, 8]), torch.tensor(lens))
        assert torch.equal(got, ref[layer])
        assert not layers[layer][:, 8, 1:].any()  # past the partial page's valid tokens: untouched


def test_one_plan_for_many_chunks_keeps_chunk_layer_page_order():
    pools = _pools(num_pages=12)
    slots = torch.zeros(3, 2, 2, 2 * PAGE, H, D)  # 3 chunks' slots [L, 2, 2 pages of rows, H, D]
    ids = [[5, 0], [11, 3], [7, 8]]
    plan = page_fragments(pools, ids, list(slots))
    assert plan.num_fragments == 3 * 2 * 2 * 2
    with TransferEngine() as eng:
        job = eng.submit_plan("store", plan)
    assert job.error is None
    for c in range(3):
        assert torch.equal(slots[c], gather_pages_torch(pools, torch.tensor(ids[c]), torch.tensor([PAGE, PAGE])))


def test_plans_refuse_addresses_outside_their_tensors():
    a, b = torch.randn(64), torch.zeros(64)
    ok = plan_fragments([a.data_ptr()], [b.data_ptr()], [256], keep=[a, b])
    assert ok.nbytes == 256 and ok.num_fragments == 1
    with pytest.raises(ValueError, match=r"dst\[0\]: bytes .* lie outside every tensor in keep"):
        plan_fragments([a.data_ptr()], [b.data_ptr() + 4], [256], keep=[a, b])
    with pytest.raises(ValueError, match=r"src\[1\]"):
        plan_fragments([a.data_ptr(), 16], [b.data_ptr(), b.data_ptr()], [4, 4], keep=[a, b])
    with pytest.raises(ValueError, match="equal lengths"):
        plan_fragments([a.data_ptr()], [], [4], keep=[a, b])
    with pytest.raises(ValueError, match="keep: expected"):
        plan_fragments([a.data_ptr()], [b.data_ptr()], [4], keep=[])
    with pytest.raises(ValueError, match="non-negative"):
        plan_fragments([-1], [b.data_ptr()], [4], keep=[a, b])
    pools = _pools()
    slot = torch.zeros(2, 2, 2 * PAGE, H, D)
    with pytest.raises(ValueError, match=r"page_ids: expected ids in \[0, 10\)"):
        page_fragments(pools, [3, 10], slot)
    with pytest.raises(ValueError, match="page_lens: every value must lie in"):
        page_fragments(pools, [3, 4], slot, [PAGE, PAGE + 1])
    with pytest.raises(ValueError, match=r"slot\[0\]: expected \[2, 2, N >= 12"):
        page_fragments(pools, [3, 4, 5], slot)  # 3 pages do not fit 2 pages of rows
    with pytest.raises(ValueError, match=r"page_ids: expected \[P\] with one slot or \[C, P\] with C slots"):
        page_fragments(pools, [[3], [4]], [slot])
    with pytest.raises(ValueError, match=r"slot\[0\]: expected dtype"):
        page_fragments(pools, [3], slot.double())
    with pytest.raises(ValueError, match="plan: expected a FragmentPlan"):
        TransferEngine().submit_plan("load", [a, b])


@pytest.mark.cuda
def test_plan_paths_equal_the_reference_on_cuda():
    pools = _pools(num_pages=16).cuda()
    ids, lens = [9, 4, 5, 0, 15], [PAGE, PAGE, PAGE, PAGE, 2]
    ref = gather_pages_torch(pools, torch.tensor(ids, device="cuda"), torch.tensor(lens, device="cuda")).cpu()
    options = [dict(batch_dma=False, sm_kernel=False), dict(sm_kernel=False)]
    if cuda_copy.available():
        options.append(dict(sm_kernel=True, kernel_threshold_bytes=1 << 30))
    for kw in options:
        slot = torch.zeros(2, 2, sum(lens), H, D).pin_memory()
        with TransferEngine("cuda", **kw) as eng:
            job = eng.submit_plan("store", page_fragments(pools, ids, slot, lens))
            eng.wait(job)
            assert job.error is None, (kw, job.error)
            back = torch.zeros_like(pools)
            eng.wait(eng.submit_plan("load", page_fragments(back, ids, slot, lens, to_slot=False)))
        assert torch.equal(slot, ref), kw
        got = gather_pages_torch(back, torch.tensor(ids, device="cuda"), torch.tensor(lens, device="cuda"))
        assert torch.equal(got.cpu(), ref), kw
