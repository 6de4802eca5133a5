"""Wan-style 3D RoPE: the layout contract, rotation properties and the temporal-delta reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldkv_connector.rope import apply_rope, rope_angles, rope_split, rotate_temporal


def _positions(b, t, offset=0):
    frame = torch.arange(t).div(4, rounding_mode="floor")[None, :] + offset + torch.arange(b)[:, None] * 5
    rows = torch.arange(t) % 4 // 2
    cols = torch.arange(t) % 2
    return frame, rows, cols


def _complex_reference(x, frame, rows, cols, theta=10000.0):
    """Wan's formulation: per-group complex multipliers, adjacent channels as (real, imag)."""
    d = x.shape[-1]
    groups = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    angles = []
    for g, pos in zip(groups, (frame, rows.expand_as(frame), cols.expand_as(frame))):
        inv = 1.0 / theta ** (torch.arange(0, g, 2, dtype=torch.float64) / g)
        angles.append(pos.double()[..., None] * inv)
    freqs = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=-1))[:, :, None, :]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).float()


def test_split_follows_wan():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(16) == (8, 4, 4)
    assert rope_split(64) == (24, 20, 20)
    assert sum(rope_split(96)) == 96
    for bad in (0, 7, 15, -2):
        with pytest.raises(ValueError, match="head_dim"):
            rope_split(bad)


def test_angles_formula():
    pos = torch.tensor([0, 1, 7, 1000])
    ang = rope_angles(pos, 8)
    assert ang.shape == (4, 4) and ang.dtype == torch.float32
    for j in range(4):
        torch.testing.assert_close(ang[:, j], pos.float() * 10000.0 ** (-2 * j / 8))
    with pytest.raises(ValueError, match="group_dim"):
        rope_angles(pos, 5)
    with pytest.raises(ValueError, match="positions"):
        rope_angles(pos[None], 8)


def test_apply_rope_matches_complex_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 16)
    frame, rows, cols = _positions(2, 8, offset=11)
    torch.testing.assert_close(apply_rope(x, frame, rows, cols), _complex_reference(x, frame, rows, cols))


def test_apply_rope_preserves_norm_and_dtype():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 2, 32)
    frame, rows, cols = _positions(2, 8, offset=300)
    out = apply_rope(x, frame, rows, cols)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(out, x)
    xb = x.bfloat16()
    outb = apply_rope(xb, frame, rows, cols)
    assert outb.dtype == torch.bfloat16 and outb.shape == xb.shape
    torch.testing.assert_close(outb.float(), out, atol=0.05, rtol=0.02)


def test_zero_positions_is_identity():
    x = torch.randn(1, 4, 2, 16)
    z = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(apply_rope(x, z[None], z, z), x)


@settings(max_examples=25, deadline=None)
@given(shift=st.integers(-500, 500), row_shift=st.integers(0, 40), col_shift=st.integers(0, 40),
       head_dim=st.sampled_from([8, 16, 32, 64]))
def test_relative_position_invariance(shift, row_shift, col_shift, head_dim):
    """q.k depends only on position differences: shifting every position leaves all scores unchanged."""
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(1, 8, 2, head_dim, generator=g)
    k = torch.randn(1, 8, 2, head_dim, generator=g)
    frame, rows, cols = _positions(1, 8, offset=600)
    s0 = torch.einsum("bthd,bshd->bhts", apply_rope(q, frame, rows, cols), apply_rope(k, frame, rows, cols))
    fs, rs, cs = frame + shift, rows + row_shift, cols + col_shift
    s1 = torch.einsum("bthd,bshd->bhts", apply_rope(q, fs, rs, cs), apply_rope(k, fs, rs, cs))
    torch.testing.assert_close(s0, s1, atol=2e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(delta=st.integers(-300, 300), offset=st.integers(0, 2000), head_dim=st.sampled_from([8, 16, 128]))
def test_rotate_temporal_equals_shifted_positions(delta, offset, head_dim):
    g = torch.Generator().manual_seed(delta & 0xFFFF)
    x = torch.randn(2, 8, 2, head_dim, generator=g)
    frame, rows, cols = _positions(2, 8, offset=offset)
    moved = rotate_temporal(apply_rope(x, frame, rows, cols), delta)
    torch.testing.assert_close(moved, apply_rope(x, frame + delta, rows, cols), atol=2e-4, rtol=1e-4)


def test_rotate_temporal_per_token_delta_and_pages():
    torch.manual_seed(2)
    x = torch.randn(1, 8, 2, 16)
    frame, rows, cols = _positions(1, 8, offset=40)
    rotated = apply_rope(x, frame, rows, cols)[0]  # [N, H, D] cached keys
    delta = torch.tensor([-3, -3, 5, 5, 0, 0, 9, 9])
    expect = apply_rope(x, frame + delta[None], rows, cols)[0]
    torch.testing.assert_close(rotate_temporal(rotated, delta), expect, atol=1e-5, rtol=1e-5)
    # pages: [P, page_size, H, D] with one delta per page
    pages = rotated.view(4, 2, 2, 16)
    page_delta = torch.tensor([-3, 5, 0, 9])
    torch.testing.assert_close(rotate_temporal(pages, page_delta).view(8, 2, 16), expect, atol=1e-5, rtol=1e-5)


def test_rotate_temporal_touches_only_temporal_channels_and_inverts():
    torch.manual_seed(3)
    k = torch.randn(5, 2, 16)
    dt = rope_split(16)[0]
    out = rotate_temporal(k, 7)
    torch.testing.assert_close(out[..., dt:], k[..., dt:])
    assert not torch.allclose(out[..., :dt], k[..., :dt])
    torch.testing.assert_close(rotate_temporal(out, -7), k, atol=1e-5, rtol=1e-5)
    assert rotate_temporal(k.bfloat16(), 7).dtype == torch.bfloat16


def test_bad_inputs_raise():
    x = torch.randn(2, 8, 2, 16)
    frame, rows, cols = _positions(2, 8)
    with pytest.raises(ValueError, match="frame_pos"):
        apply_rope(x, frame[:1], rows, cols)
    with pytest.raises(ValueError, match="row_pos"):
        apply_rope(x, frame, rows[:4], cols)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        apply_rope(x[0], frame, rows, cols)
    k = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="prefix"):
        rotate_temporal(k, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="int tensor"):
        rotate_temporal(k, torch.zeros(8))
    with pytest.raises(ValueError, match="delta"):
        rotate_temporal(k, 1.5)


def test_tables_are_reusable_across_layers():
    from worldkv_connector.rope import apply_rope_tables, rope_tables

    torch.manual_seed(4)
    frame, rows, cols = _positions(2, 8, offset=21)
    cos, sin = rope_tables(frame, rows, cols, 16)
    assert cos.shape == (2, 8, 1, 8) and cos.dtype == torch.float32
    for _ in range(2):
        x = torch.randn(2, 8, 3, 16)
        torch.testing.assert_close(apply_rope_tables(x, cos, sin), apply_rope(x, frame, rows, cols))
    with pytest.raises(ValueError, match="do not match"):
        apply_rope_tables(torch.randn(2, 8, 3, 32), cos, sin)
    with pytest.raises(ValueError, match="frame_pos"):
        rope_tables(frame[0], rows, cols, 16)
