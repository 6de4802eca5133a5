"""The SM copy engine: descriptor merging runs on the CPU (executed here with memmove, against torch
references); the CuPy/NVRTC kernel runs the transfer planner's tables against the same references
on a GPU."""
import ctypes

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldkv_connector.transfer import cuda_copy
from worldkv_connector.transfer.cuda_copy import CopyKernelConfig, copy_fragments, merge_fragments
from worldkv_connector.transfer import plan_layer_copies

HAS_CUPY = cuda_copy._cupy() is not None


def run_on_cpu(src, dst, sizes):
    """Execute a descriptor table on CPU memory (what the kernel does on the GPU)."""
    for s, d, n in zip(src.tolist(), dst.tolist(), sizes.tolist()):
        ctypes.memmove(d, s, n)


def pools(layers=3, num_pages=6, page_size=4, heads=2, head_dim=8, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return torch.randn(layers, 2, num_pages, page_size, heads, head_dim, generator=g).to(dtype=dtype, device=device)


def packed_reference(p, ids, lens):
    """[L, 2, N, H, D]: the first lens[i] tokens of page ids[i], page after page."""
    parts = [p[:, :, i, :n] for i, n in zip(ids, lens)]
    return torch.cat(parts, dim=2) if parts else p[:, :, :0, 0]


def test_merge_joins_runs_and_drops_empty_fragments():
    src, dst, sizes = merge_fragments([100, 110, 200, 300, 316], [0, 10, 20, 50, 66], [10, 10, 30, 0, 4])
    # 100+10 continues on both sides; 200 continues dst (20) but 0-size 300 is dropped; 316 does not
    assert src.tolist() == [100, 200, 316] and dst.tolist() == [0, 20, 66] and sizes.tolist() == [20, 30, 4]
    assert src.dtype == np.uint64


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3)), min_size=0, max_size=12))
def test_merged_table_moves_the_same_bytes(pieces):
    # random fragments over a 256-byte source; merged and unmerged tables must give the same result
    source = torch.arange(256, dtype=torch.uint8)
    out_a, out_b = torch.zeros(256, dtype=torch.uint8), torch.zeros(256, dtype=torch.uint8)
    src, dst, sizes, pos_s, pos_d = [], [], [], 0, 0
    for n, gap in pieces:
        src.append(source.data_ptr() + pos_s)
        sizes.append(n)
        pos_s += n + gap
        pos_d += n + (gap % 2)
        dst.append(pos_d - n)
    run_on_cpu(np.array(src, dtype=np.uint64), np.array(dst, dtype=np.uint64) + np.uint64(out_a.data_ptr()),
               np.array(sizes, dtype=np.uint64))
    m_src, m_dst, m_sizes = merge_fragments(src, np.array(dst, dtype=np.uint64) + np.uint64(out_b.data_ptr()), sizes)
    assert len(m_src) <= len([s for s in sizes if s])
    run_on_cpu(m_src, m_dst, m_sizes)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p, h: merge_fragments([1, 2], [3], [4, 5]), "equal lengths"),
        (lambda p, h: merge_fragments([1.5], [3], [4]), "integers"),
        (lambda p, h: merge_fragments([-1], [3], [4]), "non-negative"),
    ],
)
def test_bad_plans_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(pools(), 4096)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"sm_share": 0}, "sm_share"), ({"threads": 100}, "threads"), ({"chunk_bytes": 1000}, "chunk_bytes")],
)
def test_kernel_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CopyKernelConfig(**kwargs)


def test_available_is_a_bool_and_copies_refuse_without_cuda():
    assert isinstance(cuda_copy.available(), bool)
    if cuda_copy.available():
        pytest.skip("CUDA and CuPy are present: the refusal path does not apply")
    with pytest.raises(RuntimeError, match="CuPy"):
        copy_fragments([0], [0], [16])


def test_the_shipped_source_defines_the_kernel():
    from worldkv_connector.csrc import SOURCES, read_source

    assert "paged_copy.cu" in SOURCES
    assert 'extern "C" __global__ void wkv_copy_fragments' in read_source("paged_copy.cu")
    with pytest.raises(ValueError, match="unknown CUDA source"):
        read_source("missing.cu")


# without a GPU the conftest's `cuda` skip (and its reason) applies first; with one, CuPy is also needed
needs_cupy = pytest.mark.skipif(
    torch.cuda.is_available() and not HAS_CUPY, reason="needs CuPy (pip install cupy-cuda13x) for the NVRTC kernel"
)


def _kernel_run(plans, stream=None, max_blocks=None):
    """Every layer's plan through the kernel (host memory is pinned: identity under UVA)."""
    for layer in range(plans.num_layers):
        plan = plans.layer(layer)
        copy_fragments(plan.src, plan.dst, plan.sizes, stream=stream, max_blocks=max_blocks)


@pytest.mark.cuda
@needs_cupy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_gathers_planned_pages_to_pinned_host_and_back(dtype):
    p = pools(layers=4, num_pages=40, page_size=64, heads=12, head_dim=128, dtype=dtype, device="cuda")
    ids = [7, 8, 9, 30, 2]
    lens = [64] * 5
    slot = torch.zeros(4, 2, 5 * 64, 12, 128, dtype=dtype).pin_memory()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the pools were written on the current stream
    _kernel_run(plan_layer_copies(p, [slot], [ids], [lens], to_slot=True), stream=stream)
    stream.synchronize()
    assert torch.equal(slot, packed_reference(p, ids, lens).cpu())
    back = torch.zeros_like(p)
    _kernel_run(plan_layer_copies(back, [slot], [ids], [lens], to_slot=False), max_blocks=1)
    torch.cuda.synchronize()
    assert torch.equal(back[:, :, ids], p[:, :, ids]) and not back[:, :, [0, 1, 3]].any()


@pytest.mark.cuda
@needs_cupy
def test_cuda_kernel_moves_only_valid_tokens_of_partial_pages_per_layer_list():
    p = pools(layers=3, num_pages=20, page_size=64, heads=4, head_dim=64, dtype=torch.bfloat16, device="cuda")
    layers = list(p.unbind(0))  # vLLM-style list of per-layer [2, num_pages, page_size, H, D]
    ids, lens = [5, 6, 11, 0], [64, 17, 0, 3]
    slot = torch.zeros(3, 2, sum(lens), 4, 64, dtype=torch.bfloat16).pin_memory()
    _kernel_run(plan_layer_copies(layers, [slot], [ids], [lens], to_slot=True))
    torch.cuda.synchronize()
    assert torch.equal(slot, packed_reference(p, ids, lens).cpu())
    back = torch.zeros_like(p)
    _kernel_run(plan_layer_copies(list(back.unbind(0)), [slot], [ids], [lens], to_slot=False))
    torch.cuda.synchronize()
    assert torch.equal(back[:, :, 6, :17], p[:, :, 6, :17]) and not back[:, :, 6, 17:].any()


@pytest.mark.cuda
@needs_cupy
def test_cuda_copy_fragments_handles_unaligned_and_large_fragments():
    # odd offsets force the byte path, an 8-aligned one the 8-byte path, a 300 KB one several chunks
    src = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    base_s, base_d = src.data_ptr(), dst.data_ptr()
    frags = [(1, 3, 77), (1000, 5000, 4096), (8, 200, 24), (100_000, 600_000, 300_000), (50, 9000, 0)]
    copy_fragments([base_s + s for s, _, _ in frags], [base_d + d for _, d, _ in frags], [n for *_, n in frags],
                   config=CopyKernelConfig(chunk_bytes=4096))
    torch.cuda.synchronize()
    expected = torch.zeros_like(src)
    for s, d, n in frags:
        expected[d:d + n] = src[s:s + n]
    assert torch.equal(dst, expected)
