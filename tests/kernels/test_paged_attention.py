"""Paged attention: the Triton kernel against the torch reference (CPU under TRITON_INTERPRET=1,
and on a CUDA GPU when one is present), over windows with partial, empty and missing pages."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldkv_connector.kernels.paged_attention import paged_attention, paged_attention_torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_window(b=2, tq=5, hq=4, hkv=2, d=16, num_pages=7, page_size=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, d, generator=g).to(dtype=dtype, device=device)
    k_pool = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype=dtype, device=device)
    v_pool = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype=dtype, device=device)
    return q, k_pool, v_pool


def check(q, k_pool, v_pool, block_table, page_lens, **kw):
    out = paged_attention(q, k_pool, v_pool, block_table, page_lens, **kw)
    ref = paged_attention_torch(q, k_pool, v_pool, block_table, page_lens, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[q.dtype], rtol=TOL[q.dtype])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_window_with_partial_empty_and_missing_pages_matches_reference(dtype):
    # row 0: sink page, a compressed chunk ending in a partial page, an unused slot (-1);
    # row 1: a retrieved set that came back empty -> all lengths 0 -> zeros
    q, k_pool, v_pool = make_window(dtype=dtype)
    block_table = torch.tensor([[3, 1, 5, -1], [0, 6, 2, 4]])
    page_lens = torch.tensor([[8, 8, 3, 0], [0, 0, 0, 0]])
    out = check(q, k_pool, v_pool, block_table, page_lens)
    assert torch.count_nonzero(out[1]) == 0


@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 32), (4, 1, 16), (6, 2, 64)])
def test_gqa_and_head_dims(hq, hkv, d):
    q, k_pool, v_pool = make_window(b=1, tq=3, hq=hq, hkv=hkv, d=d, num_pages=4, page_size=4)
    block_table = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    page_lens = torch.tensor([[4, 1, 2]], dtype=torch.int32)
    check(q, k_pool, v_pool, block_table, page_lens)


def test_many_queries_and_long_pages_span_several_blocks():
    # Tq = 70 needs two query blocks; page_size 80 needs two key blocks per page
    q, k_pool, v_pool = make_window(b=1, tq=70, hq=1, hkv=1, d=16, num_pages=3, page_size=80)
    check(q, k_pool, v_pool, torch.tensor([[2, 0]]), torch.tensor([[80, 37]]))


def test_scale_and_strided_query_view():
    q, k_pool, v_pool = make_window(b=2, tq=6, hq=2, hkv=2, d=16)
    q_strided = torch.randn(2, 2, 6, 16).transpose(1, 2)  # [B, Tq, Hq, D] view, last dim contiguous
    assert not q_strided.is_contiguous()
    bt, pl = torch.tensor([[1, 4], [6, 0]]), torch.tensor([[5, 8], [2, 7]])
    check(q_strided, k_pool, v_pool, bt, pl, scale=0.3)


def test_result_ignores_tokens_past_valid_length():
    q, k_pool, v_pool = make_window(b=1, tq=4, hq=2, hkv=2)
    bt, pl = torch.tensor([[2, 5]]), torch.tensor([[8, 3]])
    before = paged_attention(q, k_pool, v_pool, bt, pl)
    k_pool[5, 3:] = 1e4  # garbage after the partial page's valid tokens
    v_pool[5, 3:] = float("nan")
    after = paged_attention(q, k_pool, v_pool, bt, pl)
    torch.testing.assert_close(after, before)


def test_validate_false_gives_the_same_result():
    q, k_pool, v_pool = make_window()
    bt, pl = torch.tensor([[3, 1], [0, 6]]), torch.tensor([[8, 2], [4, 8]])
    torch.testing.assert_close(
        paged_attention(q, k_pool, v_pool, bt, pl, validate=False), paged_attention(q, k_pool, v_pool, bt, pl)
    )


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_random_block_tables_match_reference(data):
    b = data.draw(st.integers(1, 2))
    max_pages = data.draw(st.integers(0, 4))
    num_pages, page_size = 6, data.draw(st.sampled_from([3, 8, 16]))
    q, k_pool, v_pool = make_window(b=b, tq=data.draw(st.integers(1, 9)), hq=2, hkv=1, num_pages=num_pages,
                                    page_size=page_size, seed=data.draw(st.integers(0, 1000)))
    ids = data.draw(st.lists(st.integers(0, num_pages - 1), min_size=b * max_pages, max_size=b * max_pages))
    lens = data.draw(st.lists(st.integers(0, page_size), min_size=b * max_pages, max_size=b * max_pages))
    bt = torch.tensor(ids, dtype=torch.int64).view(b, max_pages)
    pl = torch.tensor(lens, dtype=torch.int64).view(b, max_pages)
    check(q, k_pool, v_pool, bt, pl)


def test_empty_block_table_gives_zeros():
    q, k_pool, v_pool = make_window(b=2)
    out = check(q, k_pool, v_pool, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.int64))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q=a["q"][0]), "4 dims|expected"),
        (lambda a: a.update(k_pool=a["k_pool"].half()), "dtype"),
        (lambda a: a.update(block_table=torch.zeros(2, 2, dtype=torch.int64, device="meta")), "device"),
        (lambda a: a.update(block_table=torch.tensor([[3, 9], [0, 1]])), "page ids"),
        (lambda a: a.update(page_lens=torch.tensor([[9, 1], [1, 1]])), "page_size"),
        (lambda a: a.update(page_lens=torch.ones(2, 3, dtype=torch.int64)), "page_lens"),
        (lambda a: a.update(block_table=a["block_table"].float()), "int32 or int64"),
        (lambda a: a.update(k_pool=torch.randn(7, 8, 16, 2).transpose(2, 3)), "contiguous last dim"),
        (lambda a: a.update(q=torch.randn(2, 5, 3, 16)), "multiple"),
        (lambda a: a.update(q=torch.randn(2, 5, 4, 24), k_pool=torch.randn(7, 8, 2, 24),
                            v_pool=torch.randn(7, 8, 2, 24)), "power of two"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, match):
    q, k_pool, v_pool = make_window()
    args = dict(q=q, k_pool=k_pool, v_pool=v_pool, block_table=torch.tensor([[3, 1], [0, 6]]),
                page_lens=torch.tensor([[8, 2], [4, 8]]))
    mutate(args)
    with pytest.raises(ValueError, match=match):
        paged_attention(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv", [(12, 12), (12, 4)])
def test_cuda_model_shaped_window_matches_reference(dtype, hq, hkv):
    page_size, d = 64, 128
    q, k_pool, v_pool = make_window(b=2, tq=96, hq=hq, hkv=hkv, d=d, num_pages=40, page_size=page_size,
                                    dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(1)
    bt = torch.randperm(40, generator=g)[:24].view(2, 12).cuda()
    pl = torch.full((2, 12), page_size, dtype=torch.int64)
    pl[0, 5], pl[0, 11], pl[1, 3:6] = 17, 0, 0  # partial page, unused slot, empty retrieved set
    check(q, k_pool, v_pool, bt, pl.cuda())


@pytest.mark.cuda
def test_cuda_validate_false_and_empty_row():
    q, k_pool, v_pool = make_window(b=2, tq=33, hq=4, hkv=2, d=64, num_pages=9, page_size=64,
                                    dtype=torch.bfloat16, device="cuda")
    bt = torch.tensor([[1, 2, 3], [-1, -1, -1]], device="cuda")
    pl = torch.tensor([[64, 64, 5], [0, 0, 0]], device="cuda")
    out = paged_attention(q, k_pool, v_pool, bt, pl, validate=False)
    ref = paged_attention_torch(q, k_pool, v_pool, bt, pl)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.count_nonzero(out[1]) == 0


def test_kernels_import_and_references_run_without_triton_or_cupy():
    # triton is a test extra and CuPy an optional extra: the torch paths must work without them
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        sys.modules["cupy"] = None
        import torch
        import worldkv_connector.kernels as k
        from worldkv_connector.transfer import cuda_copy
        q, pool = torch.randn(1, 2, 2, 16), torch.randn(3, 4, 2, 16)
        bt, pl = torch.tensor([[0]]), torch.tensor([[3]])
        assert k.paged_attention_torch(q, pool, pool, bt, pl).shape == q.shape
        assert cuda_copy.available() is False
        try:
            k.paged_attention_triton(q, pool, pool, bt, pl)
        except RuntimeError as exc:
            assert "paged_attention_torch" in str(exc)
        else:
            raise AssertionError("expected RuntimeError")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
