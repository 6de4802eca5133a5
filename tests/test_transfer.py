"""The transfer engine: jobs, run merging, stats and errors (CPU); DMA paths (CUDA)."""
import pytest
import torch

from worldkv_connector.bank import Bank
from worldkv_connector.transfer import (
    TransferEngine, TransferJob, merge_runs,
)
from worldkv_connector.transfer.runs import copy_runs, plan_runs

PAGE, H, D = 4, 2, 8  # page_size, kv heads, head dim
PAGE_BYTES = PAGE * H * D * 4  # fp32


def pool(num_pages=8, device="cpu"):
    return torch.randn(num_pages, PAGE, H, D, device=device)  # [num_pages, page_size, H, D]


def test_adjacent_pages_merge_into_one_run():
    src, dst = pool(), torch.zeros(16, PAGE, H, D)
    runs = merge_runs([src[1], src[2], src[3]], [dst[5], dst[6], dst[7]])
    assert runs == [(src[1].data_ptr(), dst[5].data_ptr(), 3 * PAGE_BYTES)]


def test_non_adjacent_pages_stay_separate():
    src, dst = pool(), torch.zeros(16, PAGE, H, D)
    # src adjacent but dst not, then dst adjacent but src not, then a gap on both sides
    runs = merge_runs([src[0], src[1], src[5], src[7]], [dst[0], dst[2], dst[3], dst[9]])
    assert [n for _, _, n in runs] == [PAGE_BYTES] * 4
    # order is kept: a reversed pair never merges
    assert len(merge_runs([src[2], src[1]], [dst[2], dst[1]])) == 2


def test_partial_pages_and_empty_pairs():
    src, dst = pool(), torch.zeros(8, PAGE, H, D)
    # a partial last page still merges with its predecessor; empty pairs vanish
    runs = merge_runs([src[0], src[1, :2], src[2, :0]], [dst[3], dst[4, :2], dst[5, :0]])
    assert runs == [(src[0].data_ptr(), dst[3].data_ptr(), PAGE_BYTES + PAGE_BYTES // 2)]


def test_bank_slot_rows_to_pages_plan():
    """A compressed chunk's (layer, K/V) rows of a bank slot map onto consecutive pages."""
    bank = Bank(num_layers=2, num_kv_heads=H, head_dim=D, dtype=torch.float32, slot_tokens=10,
                capacity_bytes=1 << 16, pin=False)
    bank.reserve("c", 10)
    view = bank.view("c")  # [L, 2, 10, H, D]
    pages = torch.zeros(32, PAGE, H, D)
    srcs, dsts = [], []
    for i, run in enumerate(view.reshape(4, 10, H, D)):  # 4 (layer, K/V) runs of 10 tokens
        for p, start in enumerate(range(0, 10, PAGE)):
            n = min(PAGE, 10 - start)
            srcs.append(run[start:start + n])
            dsts.append(pages[i * 3 + p, :n])
    runs = merge_runs(srcs, dsts)
    # within a run: full pages merge with the partial page that follows; runs never merge with
    # each other (slot rows end at 10 tokens, pages restart at a page boundary)
    assert len(runs) == 4 and all(n == 10 * H * D * 4 for _, _, n in runs)
    with TransferEngine("cpu") as eng:
        view.copy_(torch.randn_like(view))
        eng.submit("load", srcs, dsts)
    for i in range(4):
        assert torch.equal(pages[i * 3:i * 3 + 3].reshape(-1, H, D)[:10], view.reshape(4, 10, H, D)[i])


def test_cpu_jobs_copy_and_report():
    src, dst = pool(), torch.zeros(8, PAGE, H, D)
    with TransferEngine("cpu") as eng:
        assert eng.path == "cpu-sync"
        j1 = eng.submit("store", [src[0], src[1], src[4]], [dst[2], dst[3], dst[7]], tag=("s", 1))
        assert isinstance(j1, TransferJob) and j1.done() and j1.error is None
        assert (j1.kind, j1.nbytes, j1.num_fragments, j1.num_pairs, j1.path) == ("store", 3 * PAGE_BYTES, 2, 3, "cpu-sync")
        assert torch.equal(dst[2:4], src[0:2]) and torch.equal(dst[7], src[4])
        assert eng.pending() == 0
        j2 = eng.submit("load", [dst[7]], [src[6]])
        assert eng.poll() == [j1, j2]  # finished since the last poll, in id order
        assert eng.poll() == []
        assert j1.tag == ("s", 1) and j2.job_id == j1.job_id + 1
        assert j1.finished_at >= j1.submitted_at
        stats = eng.stats()
    assert stats["bytes_stored"] == 3 * PAGE_BYTES and stats["bytes_loaded"] == PAGE_BYTES
    assert stats["jobs"] == 2 and stats["store_jobs"] == 1 and stats["load_jobs"] == 1
    assert stats["fragments"] == 4 and stats["merged_fragments"] == 3
    assert stats["paths"] == {"cpu-sync": 2, "dma-batch": 0, "dma-loop": 0, "sm-kernel": 0}
    assert stats["busy_s"] > 0 and stats["errors"] == 0


def test_merged_copy_across_storages_is_correct():
    """Two separate allocations can sit back to back; the copy must still be exact."""
    big = torch.randn(4, PAGE, H, D)
    a, b = big[0].clone(), big[1].clone()
    srcs, dsts = [a, b], [torch.zeros_like(a), torch.zeros_like(b)]
    runs = [(a.data_ptr(), dsts[0].data_ptr(), a.nbytes * 2, 0, 1)]  # pretend they merged
    copy_runs(runs, srcs, dsts, non_blocking=False)
    assert torch.equal(dsts[0], a) and torch.equal(dsts[1], b)
    # and a real merged run inside one storage is copied through byte views
    dst = torch.zeros(4, PAGE, H, D)
    plan = plan_runs([big[1], big[2]], [dst[0], dst[1]])
    assert len(plan) == 1
    copy_runs(plan, [big[1], big[2]], [dst[0], dst[1]], non_blocking=False)
    assert torch.equal(dst[:2], big[1:3])


def test_dtype_preserving_copy_of_bf16():
    src = torch.randn(3, PAGE, H, D).to(torch.bfloat16)
    dst = torch.zeros_like(src)
    with TransferEngine() as eng:
        job = eng.submit("load", list(src), list(dst))
    assert job.num_fragments == 1 and torch.equal(dst, src)


def test_pairs_need_equal_numel_not_equal_shape():
    """A page [page_size, H, D] and a flat bank row agree only in numel; the copy follows memory order."""
    src = torch.randn(3, PAGE, H, D)
    flat_rows = torch.zeros(3, PAGE * H * D)
    with TransferEngine() as eng:
        job = eng.submit("store", [src[0], src[2]], [flat_rows[0], flat_rows[2]])
        back = eng.submit("load", [flat_rows[2]], [src[1]])
    assert job.error is None and back.error is None
    assert torch.equal(flat_rows[0], src[0].reshape(-1)) and torch.equal(flat_rows[2], src[2].reshape(-1))
    assert torch.equal(src[1], src[2]) and not flat_rows[1].any()


def test_errors():
    src, dst = pool(), torch.zeros(8, PAGE, H, D)
    eng = TransferEngine("cpu")
    with pytest.raises(ValueError, match="kind='move'"):
        eng.submit("move", [src[0]], [dst[0]])
    with pytest.raises(ValueError, match="pair 1: numel mismatch"):
        eng.submit("load", [src[0], src[1]], [dst[0], dst[1, :2]])
    with pytest.raises(ValueError, match="pair 0: dtype mismatch"):
        eng.submit("load", [src[0]], [dst[0].double()])
    with pytest.raises(ValueError, match="pair 0: src .* is not contiguous"):
        eng.submit("store", [src[:, 0]], [dst[:, 0].contiguous()])
    with pytest.raises(ValueError, match="pair 1: dst .* is not contiguous"):
        eng.submit("store", [src[0], src[1]], [dst[0], dst[:, 0, 0]])
    with pytest.raises(ValueError, match="2 srcs and 1 dsts"):
        merge_runs([src[0], src[1]], [dst[0]])
    with pytest.raises(ValueError, match="expected tensors"):
        merge_runs([src[0]], [None])
    assert eng.stats()["jobs"] == 0  # nothing was accounted for rejected submissions
    with pytest.raises(ValueError, match="num_streams=0"):
        TransferEngine("cpu", num_streams=0)
    with pytest.raises(ValueError, match="batch_dma=True needs a cuda device"):
        TransferEngine("cpu", batch_dma=True)
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit("load", [src[0]], [dst[0]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_engine_needs_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        TransferEngine("cuda")


def test_failed_copy_is_reported_on_the_job():
    src = torch.randn(PAGE, H, D)
    with torch.inference_mode():
        dst = torch.zeros(PAGE, H, D)  # writing it outside inference mode raises inside the copy
    eng = TransferEngine("cpu")
    job = eng.submit("load", [src], [dst])
    assert job.done() and job.error is not None and job.error.startswith("RuntimeError")
    assert eng.stats()["errors"] == 1 and eng.poll() == [job]


# --- CUDA: stream ordering, batch vs loop, polling --------------------------------------------
def _host_pool(num_pages, pinned=True):
    t = torch.randn(num_pages, PAGE, H, D)
    return t.pin_memory() if pinned else t


@pytest.mark.cuda
def test_store_waits_on_after_event():
    eng = TransferEngine("cuda")
    pages = torch.zeros(8, PAGE, H, D, device="cuda")
    host = torch.zeros(8, PAGE, H, D).pin_memory()
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        torch.cuda._sleep(50_000_000)  # keep compute busy so a store that does not wait reads zeros
        pages.fill_(7.0)
        written = torch.cuda.Event()
        written.record(compute)
    job = eng.submit("store", list(pages), list(host), after=written)
    eng.wait(job)
    assert job.error is None and torch.all(host == 7.0)
    assert eng.poll() == [job] and eng.stats()["busy_s"] > 0
    # default ordering: after everything queued on the current stream
    torch.cuda._sleep(50_000_000)
    pages.fill_(3.0)
    job2 = eng.submit("store", list(pages), list(host))
    eng.wait_all()
    assert torch.all(host == 3.0) and job2.done()
    eng.close()


@pytest.mark.cuda
def test_batch_and_loop_paths_give_identical_bytes():
    src_host = _host_pool(16)
    order = [3, 4, 5, 9, 0, 1, 12]
    results = {}
    for batch in (True, False):
        eng = TransferEngine("cuda", batch_dma=batch)
        assert eng.path == ("dma-batch" if batch else "dma-loop")
        dev = torch.zeros(16, PAGE, H, D, device="cuda")
        job = eng.submit("load", [src_host[i] for i in order], [dev[i + 2] for i in range(len(order))])
        eng.wait(job)
        assert job.path == eng.path and job.num_fragments == 4 and job.error is None  # 3-5, 9, 0-1, 12
        back = torch.zeros(16, PAGE, H, D).pin_memory()
        eng.wait(eng.submit("store", list(dev), list(back)))
        results[batch] = back
        eng.close()
    assert torch.equal(results[True], results[False])
    expected = torch.zeros(16, PAGE, H, D)
    expected[2:2 + len(order)] = src_host[order]
    assert torch.equal(results[True], expected)


@pytest.mark.cuda
def test_poll_does_not_wait_and_pageable_falls_back_to_loop():
    eng = TransferEngine("cuda")
    dev = torch.randn(64, PAGE, H, D, device="cuda")
    host = torch.zeros(64, PAGE, H, D).pin_memory()
    torch.cuda._sleep(200_000_000)  # the store is queued behind this
    job = eng.submit("store", list(dev), list(host))
    assert eng.poll() == [] and eng.pending() == 1 and not job.done()
    eng.wait_all()
    assert eng.poll() == [job] and torch.equal(host, dev.cpu())
    pageable = torch.zeros(4, PAGE, H, D)
    job = eng.submit("store", list(dev[:4]), list(pageable))
    eng.wait(job)
    assert job.path == "dma-loop" and torch.equal(pageable, dev[:4].cpu())
    eng.close()
