"""RoPE delta: rotating a retrieved chunk's temporal RoPE channels in its pages, in place, matches
the torch reference, touches nothing else, and equals re-encoding at the shifted position."""
import importlib.util

import pytest
import torch

from worldkv_connector.kernels.rope_delta import rope_delta_, rope_delta_torch, temporal_channels

HAS_ROPE = importlib.util.find_spec("worldkv_connector.rope") is not None
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def pool(shape=(6, 8, 2, 32), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def args(ids, deltas, lens, device="cpu"):
    return tuple(torch.tensor(x, device=device) for x in (ids, deltas, lens))


def test_temporal_channel_split_follows_the_wan_convention():
    assert [temporal_channels(d) for d in (16, 32, 64, 128)] == [8, 12, 24, 44]
    with pytest.raises(ValueError, match="head_dim"):
        temporal_channels(15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 8, 2, 32), (2, 6, 8, 2, 64), (5, 16, 3, 16)])
def test_kernel_matches_reference(dtype, shape):
    k = pool(shape, dtype)
    ids, deltas, lens = args([4, 1, 3, 0], [5, -3, 1000, 2], [shape[-3], 3, 0, 1])
    out = rope_delta_(k.clone(), ids, deltas, lens)
    ref = rope_delta_torch(k.clone(), ids, deltas, lens)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_only_temporal_channels_of_valid_tokens_of_listed_pages_change():
    k = pool((6, 8, 2, 32))
    before = k.clone()
    ids, deltas, lens = args([4, 1, 3], [7, 7, 7], [8, 3, 0])
    assert rope_delta_(k, ids, deltas, lens) is k  # in place
    dt = temporal_channels(32)
    changed = (k != before).any(dim=(-2,))  # [num_pages, page_size, D]
    assert changed[4, :, :dt].all() and changed[1, :3, :dt].all()
    assert not changed[..., dt:].any()  # height/width channels untouched
    assert not changed[1, 3:].any() and not changed[3].any()  # past valid length, zero-length page
    assert not changed[[0, 2, 5]].any()  # pages not listed


def test_rotation_preserves_pair_norms_and_inverts():
    k = pool((3, 8, 2, 64))
    ids, deltas, lens = args([0, 2], [13, -40], [8, 5])
    rotated = rope_delta_(k.clone(), ids, deltas, lens)
    dt = temporal_channels(64)
    pair_norm = lambda x: x[..., :dt].unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(rotated), pair_norm(k), atol=1e-5, rtol=1e-5)
    back = rope_delta_(rotated, ids, -deltas, lens)
    torch.testing.assert_close(back, k, atol=1e-5, rtol=1e-5)


def test_zero_delta_and_empty_list_are_identities():
    k = pool()
    assert torch.equal(rope_delta_(k.clone(), *args([1, 2], [0, 0], [8, 8])), k)
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(rope_delta_(k.clone(), empty, empty, empty), k)


@pytest.mark.skipif(not HAS_ROPE, reason="worldkv_connector.rope (the model's RoPE) is not present yet")
def test_agrees_with_the_model_rope_module():
    from worldkv_connector.rope import apply_rope, rotate_temporal

    k = pool((4, 8, 2, 32))
    ids, deltas, lens = args([3, 0], [6, -2], [8, 8])
    out = rope_delta_(k.clone(), ids, deltas, lens)
    torch.testing.assert_close(out[ids], rotate_temporal(k[ids], deltas), atol=1e-5, rtol=1e-5)
    # scenario: keys cached at frame 10 and moved by +6 equal keys encoded at frame 16
    x = torch.randn(1, 8, 2, 32)
    rows, cols = torch.arange(8) // 4, torch.arange(8) % 4
    cached = apply_rope(x, torch.full((1, 8), 10), rows, cols)[0]  # one page of 8 tokens
    moved = rope_delta_(cached.unsqueeze(0).clone(), *args([0], [6], [8]))[0]
    torch.testing.assert_close(moved, apply_rope(x, torch.full((1, 8), 16), rows, cols)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda k: rope_delta_(k, *args([6], [1], [8])), "page_ids"),
        (lambda k: rope_delta_(k, *args([-1], [1], [8])), "page_ids"),
        (lambda k: rope_delta_(k, *args([1, 1], [1, 2], [8, 8])), "distinct"),
        (lambda k: rope_delta_(k, *args([1], [1], [9])), "page_size"),
        (lambda k: rope_delta_(k, torch.tensor([1]), torch.tensor([1.5]), torch.tensor([8])), "int32 or int64"),
        (lambda k: rope_delta_(k, *args([1, 2], [1], [8, 8])), "equal lengths"),
        (lambda k: rope_delta_(k[0], *args([1], [1], [8])), "k_pool"),
        (lambda k: rope_delta_(k.int(), *args([1], [1], [8])), "dtype"),
        (lambda k: rope_delta_(torch.randn(6, 8, 2, 15), *args([1], [1], [8])), "head_dim"),
        (lambda k: rope_delta_(torch.randn(6, 8, 32, 2).transpose(2, 3), *args([1], [1], [8])), "contiguous"),
        (lambda k: rope_delta_(k, *args([1], [1], [8], device="meta")), "device"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(pool())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_all_layers_match_reference(dtype):
    k = pool((3, 32, 64, 12, 128), dtype, device="cuda")
    ids, deltas, lens = args([5, 0, 31, 17], [3, -9, 240, 1], [64, 64, 17, 0], device="cuda")
    out = rope_delta_(k.clone(), ids, deltas, lens)
    ref = rope_delta_torch(k.clone(), ids, deltas, lens)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.cuda
def test_cuda_validate_false_matches():
    k = pool((16, 64, 4, 64), torch.bfloat16, device="cuda")
    ids, deltas, lens = args([2, 9], [4, 4], [64, 30], device="cuda")
    out = rope_delta_(k.clone(), ids, deltas, lens, validate=False)
    ref = rope_delta_torch(k.clone(), ids, deltas, lens)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
