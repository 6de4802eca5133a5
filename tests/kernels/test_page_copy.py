"""Page gather/scatter kernels: pack the valid tokens of many pages (one layer, K+V, or every
layer) into one staging buffer and back, matching the torch references byte for byte."""
import pytest
import torch

from worldkv_connector.kernels.page_copy import gather_pages, gather_pages_torch, scatter_pages, scatter_pages_torch


def pool(lead=(), num_pages=6, page_size=8, heads=2, head_dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, num_pages, page_size, heads, head_dim, generator=g).to(dtype=dtype, device=device)


def ids_lens(ids, lens, device="cpu", dtype=torch.int64):
    return torch.tensor(ids, dtype=dtype, device=device), torch.tensor(lens, dtype=dtype, device=device)


@pytest.mark.parametrize("lead", [(), (2,), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_and_scatter_match_references(lead, dtype):
    src = pool(lead, dtype=dtype)
    ids, lens = ids_lens([4, 1, 3, 0], [8, 3, 0, 5])  # full, partial, empty, partial
    staging = gather_pages(src, ids, lens)
    assert staging.shape == (*lead, 16, 2, 16)
    assert torch.equal(staging, gather_pages_torch(src, ids, lens))
    dst, dst_ref = torch.full_like(src, -7.0), torch.full_like(src, -7.0)
    scatter_pages(staging, dst, ids, lens)
    scatter_pages_torch(staging, dst_ref, ids, lens)
    assert torch.equal(dst, dst_ref)


def test_round_trip_moves_only_valid_tokens():
    src = pool((2,))  # one layer's K and V
    ids, lens = ids_lens([5, 2], [8, 3], dtype=torch.int32)
    dst = torch.zeros_like(src)
    scatter_pages(gather_pages(src, ids, lens), dst, ids, lens)
    assert torch.equal(dst[:, 5], src[:, 5]) and torch.equal(dst[:, 2, :3], src[:, 2, :3])
    assert not dst[:, 2, 3:].any() and not dst[:, [0, 1, 3, 4]].any()


def test_gather_into_a_given_buffer_without_validation():
    src = pool((3, 2), page_size=20)  # page_size 20: two token blocks per page, second partial
    ids, lens = ids_lens([0, 5, 2], [20, 17, 1])
    out = torch.empty(3, 2, 38, 2, 16)
    assert gather_pages(src, ids, lens, out, validate=False) is out
    assert torch.equal(out, gather_pages_torch(src, ids, lens))


def test_strided_plane_views_and_empty_lists():
    kv = pool((2, 2))  # [L, 2, ...]; the K planes are a strided view
    k_planes = kv[:, 0]
    ids, lens = ids_lens([3, 1], [2, 8])
    assert torch.equal(gather_pages(k_planes, ids, lens), gather_pages_torch(k_planes, ids, lens))
    empty = torch.zeros(0, dtype=torch.int64)
    assert gather_pages(kv, empty, empty).shape == (2, 2, 0, 2, 16)
    assert torch.equal(scatter_pages(torch.empty(2, 2, 0, 2, 16), kv.clone(), empty, empty), kv)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: gather_pages(p, *ids_lens([6], [1])), "page_ids"),
        (lambda p: gather_pages(p, *ids_lens([0], [9])), "page_size"),
        (lambda p: gather_pages(p, *ids_lens([0, 1], [1]) ), "page_lens"),
        (lambda p: gather_pages(p[0, 0], *ids_lens([0], [1])), "pool"),
        (lambda p: gather_pages(p, torch.tensor([0.0]), torch.tensor([1])), "int32/int64"),
        (lambda p: gather_pages(p, *ids_lens([0], [1], device="meta")), "device"),
        (lambda p: gather_pages(p, *ids_lens([0, 1], [2, 2]), torch.empty(3, 2, 16)), "N = sum"),
        (lambda p: gather_pages(p, *ids_lens([0], [2]), torch.empty(2, 2, 16, dtype=torch.float16)), "dtype"),
        (lambda p: gather_pages(p.transpose(-1, -2).contiguous().transpose(-1, -2), *ids_lens([0], [2])), "contiguous"),
        (lambda p: scatter_pages(torch.empty(4, 2, 16), p, *ids_lens([1, 1], [2, 2])), "distinct"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(pool())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_all_layers_round_trip(dtype):
    src = pool((4, 2), num_pages=50, page_size=64, heads=12, head_dim=128, dtype=dtype, device="cuda")
    ids, lens = ids_lens([7, 8, 9, 40, 3], [64, 64, 21, 0, 64], device="cuda")
    staging = gather_pages(src, ids, lens)
    assert torch.equal(staging, gather_pages_torch(src, ids, lens))
    dst, dst_ref = torch.zeros_like(src), torch.zeros_like(src)
    scatter_pages(staging, dst, ids, lens, validate=False)
    assert torch.equal(dst, scatter_pages_torch(staging, dst_ref, ids, lens))
