"""World Compression kernels (novelty scores, gather into the staging buffer) against the torch
reference ``worldkv_connector.compression``: same scores, same kept tokens, same bytes."""
import pytest
import torch

from worldkv_connector.compression import compress_chunk, novelty_scores
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.kernels.compress import compress_chunk_kernel, gather_rows_triton, novelty_scores_triton
from worldkv_connector.shapes import get_preset


def chunk(layers=2, frame_tokens=12, frames=3, heads=2, head_dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (layers, frames * frame_tokens, heads, head_dim)
    k = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    v = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_novelty_scores_match_reference(dtype):
    k, _ = chunk(dtype=dtype)
    torch.testing.assert_close(novelty_scores_triton(k, 12), novelty_scores(k, 12), atol=1e-5, rtol=1e-5)


def test_novelty_scores_with_wide_rows_and_near_duplicates():
    # H*D = 512 spans two channel blocks; frame 1 repeats the anchor (score ~1), frame 2 is new
    k, _ = chunk(layers=1, frame_tokens=4, heads=4, head_dim=128)
    k[:, 4:8] = k[:, 0:4].mean(dim=1, keepdim=True)
    scores = novelty_scores_triton(k, 4)
    torch.testing.assert_close(scores, novelty_scores(k, 4), atol=1e-5, rtol=1e-5)
    assert torch.all(scores[0, :4] > 0.999) and torch.all(scores[0, 4:].abs() < 0.5)


def test_all_zero_keys_score_zero_not_nan():
    k = torch.zeros(1, 8, 2, 16)
    scores = novelty_scores_triton(k, 4)
    assert torch.equal(scores, torch.zeros(1, 4)) and torch.equal(scores, novelty_scores(k, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_ratio,pooled", [(0.25, True), (0.25, False), (0.5, True), (1.0, True), (1.0, False)])
def test_compress_chunk_kernel_keeps_the_reference_tokens(dtype, keep_ratio, pooled):
    k, v = chunk(dtype=dtype, seed=3)
    staging, indices = compress_chunk_kernel(k, v, frame_tokens=12, keep_ratio=keep_ratio, pooled=pooled)
    ref = compress_chunk(k, v, frame_tokens=12, keep_ratio=keep_ratio, pooled=pooled)
    assert torch.equal(indices, ref.indices)
    assert staging.is_contiguous() and staging.shape == (2, 2, ref.num_tokens, 2, 16)
    assert torch.equal(staging[:, 0], ref.k) and torch.equal(staging[:, 1], ref.v)


def test_staging_size_follows_the_config_and_the_preset():
    shape, cfg = get_preset("tiny"), WorldKVConfig(keep_ratio=0.25)
    k, v = chunk(layers=shape.num_layers, frame_tokens=shape.frame_tokens, frames=shape.frames_per_chunk,
                 heads=shape.num_kv_heads, head_dim=shape.head_dim)
    staging, indices = compress_chunk_kernel(k, v, frame_tokens=shape.frame_tokens, keep_ratio=cfg.keep_ratio)
    # keep_ratio 0.25 stores exactly half a chunk, anchor first
    assert staging.shape[2] == cfg.kept_tokens(shape.frame_tokens) == shape.chunk_tokens // 2
    assert torch.equal(indices[:, : shape.frame_tokens], torch.arange(shape.frame_tokens).expand(shape.num_layers, -1))
    assert staging.element_size() * staging.numel() == shape.chunk_bytes(cfg.kept_tokens(shape.frame_tokens))


def test_compress_into_a_reused_staging_buffer():
    k, v = chunk()
    out = torch.full((2, 2, 18, 2, 16), float("nan"))  # 12 anchor + 2 x ceil(0.25 * 12)
    staging, _ = compress_chunk_kernel(k, v, frame_tokens=12, keep_ratio=0.25, out=out)
    assert staging is out and not torch.isnan(out).any()


def test_gather_rows_any_order_and_repeats():
    k, v = chunk(layers=2, frame_tokens=5, frames=2)
    idx = torch.tensor([[9, 0, 0, 4, 7], [1, 2, 3, 8, 8]], dtype=torch.int32)
    out = torch.empty(2, 2, 5, 2, 16)
    gather_rows_triton(k, v, idx, out)
    rows = torch.arange(2)[:, None]
    assert torch.equal(out[:, 0], k[rows, idx.long()]) and torch.equal(out[:, 1], v[rows, idx.long()])


def test_gather_rows_from_strided_layer_views():
    kv = torch.randn(2, 2, 10, 2, 16)  # a [L, 2, T, H, D] cache: k and v are strided views
    k, v = kv[:, 0], kv[:, 1]
    idx = torch.tensor([[0, 5, 9], [2, 3, 4]])
    out = gather_rows_triton(k, v, idx, torch.empty(2, 2, 3, 2, 16))
    assert torch.equal(out, kv[torch.arange(2)[:, None, None], torch.arange(2)[None, :, None], idx[:, None, :]])


def test_gather_rows_with_no_kept_tokens():
    k, v = chunk(layers=2, frame_tokens=4, frames=1)
    out = gather_rows_triton(k, v, torch.zeros(2, 0, dtype=torch.int64), torch.empty(2, 2, 0, 2, 16))
    assert out.shape == (2, 2, 0, 2, 16)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda k, v: novelty_scores_triton(k[0], 12), "4-d"),
        (lambda k, v: novelty_scores_triton(k[:, :30], 12), "multiple of frame_tokens"),
        (lambda k, v: novelty_scores_triton(k.int(), 12), "dtype"),
        (lambda k, v: novelty_scores_triton(k.transpose(2, 3), 12), "contiguous"),
        (lambda k, v: compress_chunk_kernel(k, v, frame_tokens=12, keep_ratio=0.0), "keep_ratio"),
        (lambda k, v: compress_chunk_kernel(k, v, frame_tokens=0, keep_ratio=0.5), "frame_tokens"),
        (lambda k, v: compress_chunk_kernel(k, v.half(), frame_tokens=12, keep_ratio=0.5), "dtype"),
        (lambda k, v: compress_chunk_kernel(k, v, frame_tokens=12, keep_ratio=0.25,
                                            out=torch.empty(2, 2, 23, 2, 16)), "out: expected shape"),
        (lambda k, v: gather_rows_triton(k, v, torch.tensor([[0, 36], [0, 1]]),
                                         torch.empty(2, 2, 2, 2, 16)), "token ids"),
        (lambda k, v: gather_rows_triton(k, v, torch.zeros(2, 2, dtype=torch.int64),
                                         torch.empty(2, 2, 2, 16, 2).transpose(3, 4)), "contiguous"),
        (lambda k, v: gather_rows_triton(k, v, torch.zeros(2, 2, dtype=torch.int64, device="meta"),
                                         torch.empty(2, 2, 2, 2, 16)), "device"),
        (lambda k, v: gather_rows_triton(k, v, torch.zeros(2, 2), torch.empty(2, 2, 2, 2, 16)), "int32/int64"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    k, v = chunk()
    with pytest.raises(ValueError, match=match):
        call(k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("keep_ratio,pooled", [(0.25, True), (0.5, False), (1.0, True)])
def test_cuda_compress_matches_reference(dtype, keep_ratio, pooled):
    # model-shaped heads (12 x 128) with a short frame so the test stays fast
    k, v = chunk(layers=3, frame_tokens=88, heads=12, head_dim=128, dtype=dtype, device="cuda", seed=7)
    torch.testing.assert_close(novelty_scores_triton(k, 88), novelty_scores(k, 88), atol=1e-4, rtol=1e-4)
    staging, indices = compress_chunk_kernel(k, v, frame_tokens=88, keep_ratio=keep_ratio, pooled=pooled)
    ref = compress_chunk(k, v, frame_tokens=88, keep_ratio=keep_ratio, pooled=pooled)
    assert torch.equal(indices, ref.indices)
    assert torch.equal(staging[:, 0], ref.k) and torch.equal(staging[:, 1], ref.v)


@pytest.mark.cuda
def test_cuda_gather_rows_matches_indexing():
    k, v = chunk(layers=2, frame_tokens=64, heads=4, head_dim=64, dtype=torch.bfloat16, device="cuda")
    idx = torch.randint(0, k.shape[1], (2, 50), device="cuda")
    out = gather_rows_triton(k, v, idx, torch.empty(2, 2, 50, 4, 64, dtype=torch.bfloat16, device="cuda"))
    rows = torch.arange(2, device="cuda")[:, None]
    assert torch.equal(out[:, 0], k[rows, idx]) and torch.equal(out[:, 1], v[rows, idx])
