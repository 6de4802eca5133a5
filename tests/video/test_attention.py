"""Paged attention over the block table equals dense attention over the concatenated window."""
import importlib

import pytest
import torch

from worldkv_connector.integration.video.attention import (
    PagedAttention, Segment, WindowPlan, select_attention_backend, write_current_kv,
)
from worldkv_connector.connector.api import CommittedChunk
from worldkv_connector.integration.video.sampling import FlowMatchSchedule

H, D, PS = 2, 16, 16


def dense_attention(q, k, v):
    """q: [T, H, D], k, v: [N, H, D] -> [T, H, D] fp32 softmax attention (non-causal)."""
    s = torch.einsum("thd,nhd->htn", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.einsum("htn,nhd->thd", torch.softmax(s, -1), v.double()).float()


def _segment(kind, cid, pages, tokens):
    lens = [PS] * len(pages)
    lens[-1] = tokens - PS * (len(pages) - 1)
    return Segment(kind, cid, list(pages), lens)


def _window(num_pages=32, seed=0):
    """Two rows with different windows (different widths), partial last pages in sink/external."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, num_pages, PS, H, D, generator=g)
    rows = [
        [_segment("sink", 0, [1, 2, 3], 48), _segment("external", 9, [4, 5, 6], 40),  # 16+16+8
         _segment("recent", 3, [7, 8, 9], 48), _segment("current", 4, [10, 11, 12], 48)],
        [_segment("sink", 0, [13, 14, 15], 48), _segment("external", 2, [16], 5),
         _segment("external", 1, [17, 18], 20), _segment("current", 5, [19, 20, 21], 48)],
    ]
    plan = WindowPlan(PS)
    for i, segs in enumerate(rows):
        cur = segs[-1]
        plan.add_row(f"s{i}", segs, CommittedChunk(f"s{i}", cur.chunk_id, cur.page_ids, 48, None))
    return kv, plan


def _gather(pool, seg):
    return torch.cat([pool[p, :n] for p, n in zip(seg.page_ids, seg.page_lens)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_equals_dense_over_concatenated_window(backend):
    if backend == "triton":
        mod = importlib.import_module("worldkv_connector.kernels.paged_attention")
        if not hasattr(mod, "paged_attention"):
            pytest.skip("the Triton paged_attention kernel is not in this build yet")
    kv, plan = _window()
    attn = PagedAttention({"blocks.0": kv}, backend=backend)
    meta = attn.begin_step(plan, torch.device("cpu"))
    attn.set_pass(torch.zeros(2), clean=False)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 48, H, D, generator=g) for _ in range(3))
    out = attn(0, q, k, v)
    assert meta.block_table.shape == (2, 12)  # widest row: 3 + 3 + 3 + 3 pages
    for row, segs in enumerate(plan.rows):
        # reference: concatenate the window's K/V in window order, the current chunk from k/v
        ks = [_gather(kv[0], s) for s in segs[:-1]] + [k[row]]
        vs = [_gather(kv[1], s) for s in segs[:-1]] + [v[row]]
        ref = dense_attention(q[row], torch.cat(ks), torch.cat(vs))
        assert (out[row] - ref).abs().max().item() < 1e-5
    # the current chunk's K/V landed in its pages
    cur = plan.rows[1][-1]
    assert torch.equal(_gather(kv[0], cur), k[1]) and torch.equal(_gather(kv[1], cur), v[1])


def test_drop_external_removes_the_whole_chunk():
    kv, plan = _window()
    dropped = plan.drop_external({17})
    assert dropped == [("s1", 1)]
    assert plan.external_ids(1) == [2] and plan.external_ids(0) == [9]
    bt, pl = plan.tables(torch.device("cpu"))
    assert 17 not in bt[1, pl[1] > 0].tolist() and 18 not in bt[1, pl[1] > 0].tolist()


def test_window_order_is_enforced():
    plan = WindowPlan(PS)
    cur = _segment("current", 1, [1], 16)
    with pytest.raises(ValueError, match="sink\\|external\\|recent\\|current"):
        plan.add_row("a", [_segment("recent", 0, [0], 16), _segment("external", 3, [2], 16), cur], None)
    with pytest.raises(ValueError, match="not ordered"):
        plan.add_row("a", [_segment("sink", 0, [0], 16)], None)


def test_write_and_backend_errors():
    kv = torch.zeros(2, 4, PS, H, D)
    with pytest.raises(ValueError, match="do not fit"):
        write_current_kv(kv, torch.zeros(1, 16, H + 1, D), torch.zeros(1, 16, H + 1, D), torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="choose one of"):
        select_attention_backend("flash")
    with pytest.raises(RuntimeError, match="outside a step"):
        PagedAttention({"blocks.0": kv})(0, *(torch.zeros(1, 16, H, D),) * 3)


def test_flow_matching_schedule():
    assert FlowMatchSchedule(4, shift=1.0).sigmas == [1.0, 0.75, 0.5, 0.25]
    shifted = FlowMatchSchedule(4, shift=5.0).sigmas
    assert shifted[0] == 1.0 and shifted[1] == pytest.approx(0.9375) and shifted[3] == pytest.approx(0.625)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    s = torch.tensor([0.3, 0.9])
    x_t = FlowMatchSchedule.renoise(x0, noise, s)
    # the exact velocity noise - x0 recovers x0
    assert torch.allclose(FlowMatchSchedule.predict_x0(x_t, noise - x0, s), x0, atol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        FlowMatchSchedule(0)
    with pytest.raises(ValueError, match="shift"):
        FlowMatchSchedule(4, shift=-1.0)


def test_table_values_are_checked_once_per_step_and_again_when_replaced(monkeypatch):
    import worldkv_connector.kernels.paged_attention as pa

    calls = []
    check = pa.check_page_values
    monkeypatch.setattr(pa, "check_page_values", lambda *a: (calls.append(a[2:]), check(*a))[1])
    kv, plan = _window()
    attn = PagedAttention({"blocks.0": kv, "blocks.1": kv.clone()}, backend="torch")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 48, H, D, generator=g) for _ in range(3))
    meta = attn.begin_step(plan, torch.device("cpu"))
    outs = []
    for clean in (False, True):  # two passes over two layers: one check
        attn.set_pass(torch.zeros(2), clean=clean)
        outs += [attn(0, q, k, v), attn(1, q, k, v)]
    assert calls == [(32, PS)]
    ref = pa.paged_attention_torch(q, kv[0], kv[1], meta.block_table, meta.page_lens)
    assert torch.equal(outs[0], ref) and torch.equal(outs[2], ref)
    # replaced tables (as after a load error) are checked again, with the same error as before
    bad = meta.page_lens.clone()
    bad[0, 0] = PS + 1
    meta.page_lens = bad
    with pytest.raises(ValueError, match="every value must lie in"):
        attn(0, q, k, v)
    attn.end_step()
    plan.rows[0][1].page_ids[0] = 40  # a page id past the pool: raised by the first call of the step
    attn.begin_step(plan, torch.device("cpu"))
    attn.set_pass(torch.zeros(2), clean=False)
    with pytest.raises(ValueError, match="page ids of pages with valid tokens"):
        attn(0, q, k, v)
    with pytest.raises(ValueError, match="page ids of pages with valid tokens"):
        attn(1, q, k, v)


def test_torch_reference_validate_false_keeps_shape_checks():
    from worldkv_connector.kernels.paged_attention import paged_attention_torch

    kv, plan = _window()
    bt, pl = plan.tables(torch.device("cpu"))
    q = torch.randn(2, 5, H, D)
    assert torch.equal(paged_attention_torch(q, kv[0], kv[1], bt, pl, validate=False),
                       paged_attention_torch(q, kv[0], kv[1], bt, pl))
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention_torch(torch.randn(2, 5, H, D * 2), kv[0], kv[1], bt, pl, validate=False)
    with pytest.raises(ValueError, match="int32 or int64"):
        paged_attention_torch(q, kv[0], kv[1], bt.float(), pl, validate=False)
