"""World Compression: novelty scores against the anchor centroid and the kept-token selection."""
import math

import pytest
import torch

from worldkv_connector.compression import CompressedChunk, compress_chunk, novelty_scores, select_kept
from worldkv_connector.config import kept_tokens_per_chunk
from worldkv_connector.shapes import get_preset


def _chunk_with_novel(ft: int, frames: int, novel: dict[int, list[int]], heads: int = 2, dim: int = 4):
    """Keys where every token is the anchor direction except ``novel[frame]`` token offsets, which
    point elsewhere; ``novel`` tokens get decreasing similarity in list order."""
    base = torch.zeros(heads * dim)
    base[0] = 1.0
    k = base.repeat(frames * ft, 1)
    for f, offsets in novel.items():
        for rank, off in enumerate(offsets):
            # rotate away from the anchor; later entries in the list rotate further (more novel)
            angle = 0.3 + 0.2 * rank
            k[f * ft + off] = 0
            k[f * ft + off, 0] = math.cos(angle)
            k[f * ft + off, 1] = math.sin(angle)
    return k.view(frames * ft, heads, dim)


def test_scores_match_cosine_reference():
    torch.manual_seed(0)
    k = torch.randn(3, 24, 2, 4)  # [L, T, H, D], ft = 8
    scores = novelty_scores(k, 8)
    assert scores.shape == (3, 16) and scores.dtype == torch.float32
    flat = k.reshape(3, 24, 8)
    centroid = flat[:, :8].mean(1)
    ref = torch.nn.functional.cosine_similarity(flat[:, 8:], centroid[:, None], dim=-1)
    torch.testing.assert_close(scores, ref)
    # unbatched form
    torch.testing.assert_close(novelty_scores(k[1], 8), ref[1])


def test_known_novel_tokens_are_kept_per_frame():
    ft, frames = 8, 3
    novel = {1: [5, 2], 2: [7, 0]}
    k = _chunk_with_novel(ft, frames, novel)
    out = compress_chunk(k, k.clone(), frame_tokens=ft, keep_ratio=0.25, pooled=False)  # 2 per frame
    expected = list(range(ft)) + [ft + 2, ft + 5, 2 * ft + 0, 2 * ft + 7]
    assert out.indices.tolist() == expected
    torch.testing.assert_close(out.k, k[expected])
    torch.testing.assert_close(out.v, k[expected])


def test_pooled_budget_differs_from_per_frame():
    ft, frames = 8, 3
    # all four novel tokens are in frame 1; frame 2 is a copy of the anchor
    k = _chunk_with_novel(ft, frames, {1: [1, 3, 4, 6]})
    per_frame = compress_chunk(k, k, frame_tokens=ft, keep_ratio=0.25, pooled=False)
    pooled = compress_chunk(k, k, frame_tokens=ft, keep_ratio=0.25, pooled=True)
    anchor = list(range(ft))
    assert pooled.indices.tolist() == anchor + [ft + 1, ft + 3, ft + 4, ft + 6]
    # per-frame keeps only the 2 most novel of frame 1 (offsets 6, 4 rotate furthest) and then
    # two tied tokens of frame 2: the lowest indices win the tie
    assert per_frame.indices.tolist() == anchor + [ft + 4, ft + 6, 2 * ft + 0, 2 * ft + 1]
    assert pooled.k.shape == per_frame.k.shape == (kept_tokens_per_chunk(ft, frames, 0.25), 2, 4)


def test_ties_break_towards_lower_index():
    scores = torch.zeros(1, 8)  # frames = 2, ft = 8: every non-anchor token ties
    idx = select_kept(scores, 8, 2, 0.25, pooled=True)
    assert idx.tolist() == [list(range(8)) + [8, 9]]


@pytest.mark.parametrize("pooled", [True, False])
def test_identity_at_keep_ratio_one(pooled):
    torch.manual_seed(1)
    k, v = torch.randn(2, 12, 2, 4), torch.randn(2, 12, 2, 4)
    out = compress_chunk(k, v, frame_tokens=4, keep_ratio=1.0, pooled=pooled)
    assert out.indices.tolist() == [list(range(12))] * 2
    assert torch.equal(out.k, k) and torch.equal(out.v, v)


@pytest.mark.parametrize("pooled", [True, False])
def test_order_preserved_and_layers_independent(pooled):
    torch.manual_seed(2)
    k, v = torch.randn(4, 48, 2, 8), torch.randn(4, 48, 2, 8)
    out = compress_chunk(k, v, frame_tokens=16, keep_ratio=0.25, pooled=pooled)
    idx = out.indices
    assert idx.dtype == torch.int64
    assert torch.all(idx[:, 1:] > idx[:, :-1])  # strictly ascending
    assert torch.equal(idx[:, :16], torch.arange(16).expand(4, 16))
    for layer in range(4):
        assert torch.equal(out.k[layer], k[layer, idx[layer]])
        assert torch.equal(out.v[layer], v[layer, idx[layer]])
        # each layer picks its own tokens: compare with compressing that layer alone
        alone = compress_chunk(k[layer], v[layer], frame_tokens=16, keep_ratio=0.25, pooled=pooled)
        assert torch.equal(alone.indices, idx[layer])
    assert not all(torch.equal(idx[0], idx[i]) for i in range(1, 4))


@pytest.mark.parametrize("keep_ratio,fraction", [(0.25, 1 / 2), (0.5, 2 / 3)])
def test_budget_half_and_two_thirds(keep_ratio, fraction):
    shape = get_preset("tiny")  # frame_tokens divisible by 4
    ft, frames = shape.frame_tokens, shape.frames_per_chunk
    k = torch.randn(shape.num_layers, ft * frames, shape.num_kv_heads, shape.head_dim)
    for pooled in (True, False):
        out = compress_chunk(k, k, frame_tokens=ft, keep_ratio=keep_ratio, pooled=pooled)
        assert out.num_tokens == ft * frames * fraction == kept_tokens_per_chunk(ft, frames, keep_ratio)


def test_per_frame_budget_is_exact():
    torch.manual_seed(3)
    ft, frames = 10, 4
    scores = torch.randn(2, (frames - 1) * ft)
    idx = select_kept(scores, ft, frames, 0.25, pooled=False)  # ceil(2.5) = 3 per frame
    assert idx.shape == (2, ft + 3 * 3)
    for f in range(1, frames):
        in_frame = ((idx >= f * ft) & (idx < (f + 1) * ft)).sum(dim=1)
        assert in_frame.tolist() == [3, 3]
    # and they are the three lowest scores of that frame
    frame1 = scores[0, :ft]
    assert sorted((idx[0, ft:ft + 3] - ft).tolist()) == sorted(frame1.argsort()[:3].tolist())


def test_bf16_input_keeps_dtype_and_matches_fp32_selection():
    torch.manual_seed(4)
    k = torch.randn(2, 24, 2, 8).to(torch.bfloat16)
    v = torch.randn(2, 24, 2, 8).to(torch.bfloat16)
    out = compress_chunk(k, v, frame_tokens=8, keep_ratio=0.5)
    assert out.k.dtype == out.v.dtype == torch.bfloat16 and out.k.device == k.device
    ref = compress_chunk(k.float(), v.float(), frame_tokens=8, keep_ratio=0.5)
    assert torch.equal(out.indices, ref.indices)  # scores are computed in fp32 either way
    assert torch.equal(out.k.float(), ref.k)


def test_single_frame_chunk_is_the_anchor():
    k = torch.randn(1, 4, 1, 2)
    out = compress_chunk(k, k, frame_tokens=4, keep_ratio=0.25)
    assert isinstance(out, CompressedChunk) and out.indices.tolist() == [[0, 1, 2, 3]]


def test_zero_keys_give_finite_scores():
    k = torch.zeros(16, 1, 4)
    assert torch.isfinite(novelty_scores(k, 8)).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep_ratio=0.0), "keep_ratio=0.0"),
        (dict(keep_ratio=1.5), "keep_ratio=1.5"),
        (dict(keep_ratio=float("nan")), "keep_ratio=nan"),
        (dict(keep_ratio=0.5, frame_tokens=5), "multiple of frame_tokens=5"),
        (dict(keep_ratio=0.5, frame_tokens=0), "frame_tokens=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    k = torch.randn(2, 12, 2, 4)
    kwargs = {"frame_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        compress_chunk(k, k, **kwargs)


def test_bad_tensors():
    k = torch.randn(2, 12, 2, 4)
    with pytest.raises(ValueError, match="same shape"):
        compress_chunk(k, k[:, :8], frame_tokens=4, keep_ratio=0.5)
    with pytest.raises(ValueError, match="share dtype"):
        compress_chunk(k, k.double(), frame_tokens=4, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"\[L, T, H, D\]"):
        compress_chunk(k[0, 0], k[0, 0], frame_tokens=4, keep_ratio=0.5)
    with pytest.raises(ValueError, match="float dtype"):
        novelty_scores(torch.ones(8, 1, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expected \\(frames - 1\\) \\* frame_tokens = 8"):
        select_kept(torch.zeros(2, 7), 4, 3, 0.5, True)


@pytest.mark.cuda
def test_cuda_matches_cpu_reference():
    torch.manual_seed(5)
    k, v = torch.randn(2, 48, 2, 16), torch.randn(2, 48, 2, 16)
    ref = compress_chunk(k, v, frame_tokens=16, keep_ratio=0.25)
    out = compress_chunk(k.cuda().half(), v.cuda().half(), frame_tokens=16, keep_ratio=0.25)
    assert out.k.is_cuda and out.k.dtype == torch.float16
    ref16 = compress_chunk(k.half(), v.half(), frame_tokens=16, keep_ratio=0.25)
    assert torch.equal(out.indices.cpu(), ref16.indices)
    assert torch.equal(out.k.cpu(), ref16.k) and torch.equal(out.v.cpu(), ref16.v)
    assert ref.k.shape == out.k.shape
