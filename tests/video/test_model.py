"""CausalWanDiT: an independent Wan reference, causality across chunks, shapes, dtypes, camera
conditioning and the ModelConfig contract. Attention runs through a small dense attn_fn that keeps
every committed chunk's K/V (the engine's paged cache is tested elsewhere)."""
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import numpy as np

from worldkv_connector.integration.video.camera import camera_tokens, default_intrinsics, plucker_rays, relative_camera
from worldkv_connector.integration.video.model import CausalWanDiT
from worldkv_connector.integration.video.models import build_model
from worldkv_connector.integration.video.model_config import MODEL_CONFIGS, ModelConfig, get_model_config
from worldkv_connector.rope import rotate_temporal

TINY = get_model_config("tiny")
FPC = TINY.frames_per_chunk


class DenseKV:
    """attn_fn over [committed chunks | current chunk]; the clean pass (commit=True) appends K/V."""

    def __init__(self):
        self.k, self.v = defaultdict(list), defaultdict(list)
        self.commit = False
        self.calls = []

    def __call__(self, layer, q, k, v):
        self.calls.append((layer, tuple(q.shape), q.dtype, k.clone(), v.clone()))
        keys = torch.cat(self.k[layer] + [k], dim=1)
        values = torch.cat(self.v[layer] + [v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        if self.commit:
            self.k[layer].append(k)
            self.v[layer].append(v)
        return out.transpose(1, 2)


def _inputs(cfg=TINY, b=2, f=FPC, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=g)
    ctx = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g)
    return x, ctx


def _yaw_poses(b, f, start_deg, step_deg=2.0, shift=0.0):
    poses = torch.eye(4).repeat(b, f, 1, 1)
    for i in range(f):
        a = math.radians(start_deg + step_deg * i)
        poses[:, i, 0, 0], poses[:, i, 0, 2] = math.cos(a), math.sin(a)
        poses[:, i, 2, 0], poses[:, i, 2, 2] = -math.sin(a), math.cos(a)
        poses[:, i, 0, 3] = shift
    return poses


def _rollout(model, noises, ctx, sigmas=(1.0, 0.5), cams=None):
    """Few-step flow-matching rollout, one chunk per entry of ``noises``; returns the clean chunks."""
    kv = DenseKV()
    out = []
    b = noises[0].shape[0]
    for i, x in enumerate(noises):
        offset = torch.full((b,), i * FPC, dtype=torch.int64)
        cam = {} if cams is None else {"c2w": cams[i]}
        kv.commit = False
        for j, s in enumerate(sigmas):
            nxt = sigmas[j + 1] if j + 1 < len(sigmas) else 0.0
            vel = model(x, torch.full((b,), s), ctx, offset, kv, **cam)
            x = x + (nxt - s) * vel  # Euler step of dx/dsigma = v
        kv.commit = True  # clean pass at t = 0 writes the chunk's K/V
        model(x, torch.zeros(b), ctx, offset, kv, **cam)
        out.append(x)
    return out


# --- an independent float64 reference of Wan's forward ------------------------------------------
def _rope_ref(x, frame, rows, cols):
    d = x.shape[-1]
    groups = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    angles = []
    for g, pos in zip(groups, (frame, rows.expand_as(frame), cols.expand_as(frame))):
        angles.append(pos.double()[..., None] / 10000.0 ** (torch.arange(0, g, 2, dtype=torch.float64) / g))
    freqs = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, -1))[:, :, None, :]
    return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * freqs).flatten(-2)


def _reference(sd, cfg, x, t, ctx, offset, cache):
    """Wan2.1 forward of one chunk in float64, attending to ``cache[layer]`` = (K, V) of earlier chunks."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda p, z: z @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    ln = lambda z: (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + cfg.eps)  # noqa: E731
    rms = lambda z, w: z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + cfg.eps) * w  # noqa: E731
    b, f = x.shape[:2]
    gh, gw, hd, nh = cfg.grid_height, cfg.grid_width, cfg.head_dim, cfg.num_heads
    patches = x.double().reshape(b, f, cfg.in_channels, gh, 2, gw, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f * gh * gw, -1)
    h = patches @ sd["patch_embedding.weight"].reshape(cfg.dim, -1).T + sd["patch_embedding.bias"]
    half = cfg.freq_dim // 2
    ang = (t.double() * 1000)[:, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", torch.cat([ang.cos(), ang.sin()], 1))))
    e0 = lin("time_projection.1", F.silu(e)).view(b, 6, cfg.dim)
    ctx = torch.cat([ctx.double(), ctx.new_zeros(b, cfg.text_len - ctx.shape[1], cfg.text_dim).double()], 1)
    c = lin("text_embedding.2", F.gelu(lin("text_embedding.0", ctx), approximate="tanh"))
    frame = (offset[:, None] + torch.arange(f)).repeat_interleave(gh * gw, 1)
    rows = torch.arange(gh).repeat_interleave(gw).repeat(f)
    cols = torch.arange(gw).repeat(gh * f)

    def attend(q, k, v):  # [B, T, H, D] x [B, S, H, D]
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(b, q.shape[1], -1)

    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        m = (sd[p + "modulation"] + e0).unbind(1)
        y = ln(h) * (1 + m[1][:, None]) + m[0][:, None]
        q = rms(lin(p + "self_attn.q", y), sd[p + "self_attn.norm_q.weight"]).view(b, -1, nh, hd)
        k = rms(lin(p + "self_attn.k", y), sd[p + "self_attn.norm_k.weight"]).view(b, -1, nh, hd)
        v = lin(p + "self_attn.v", y).view(b, -1, nh, hd)
        q, k = _rope_ref(q, frame, rows, cols), _rope_ref(k, frame, rows, cols)
        pk, pv = cache.get(i, (k[:, :0], v[:, :0]))
        h = h + lin(p + "self_attn.o", attend(q, torch.cat([pk, k], 1), torch.cat([pv, v], 1))) * m[2][:, None]
        cache.setdefault("new", {})[i] = (torch.cat([pk, k], 1), torch.cat([pv, v], 1))
        y = ln(h) * sd[p + "norm3.weight"] + sd[p + "norm3.bias"]
        cq = rms(lin(p + "cross_attn.q", y), sd[p + "cross_attn.norm_q.weight"]).view(b, -1, nh, hd)
        ck = rms(lin(p + "cross_attn.k", c), sd[p + "cross_attn.norm_k.weight"]).view(b, -1, nh, hd)
        cv = lin(p + "cross_attn.v", c).view(b, -1, nh, hd)
        h = h + lin(p + "cross_attn.o", attend(cq, ck, cv))
        y = ln(h) * (1 + m[4][:, None]) + m[3][:, None]
        h = h + lin(p + "ffn.2", F.gelu(lin(p + "ffn.0", y), approximate="tanh")) * m[5][:, None]
    shift, scale = (sd["head.modulation"] + e[:, None]).unbind(1)
    out = lin("head.head", ln(h) * (1 + scale[:, None]) + shift[:, None])
    out = out.view(b, f, gh, gw, 2, 2, cfg.out_channels).permute(0, 1, 6, 2, 4, 3, 5)
    return out.reshape(b, f, cfg.out_channels, cfg.latent_height, cfg.latent_width)


@torch.no_grad()
def test_matches_independent_wan_reference_with_history():
    model = build_model(TINY, seed=3)
    sd = model.state_dict()
    x1, ctx = _inputs(seed=1)
    x2, _ = _inputs(seed=2)
    short_ctx = ctx[:, :5]  # shorter than text_len: zero-padded like Wan
    kv, cache = DenseKV(), {}
    offsets = [torch.tensor([0, 0]), torch.tensor([3, 3])]
    t = torch.tensor([0.7, 0.2])
    for x, off in zip((x1, x2), offsets):
        kv.commit = True
        got = model(x, t, short_ctx, off, kv)
        ref = _reference(sd, TINY, x, t, short_ctx, off, cache)
        torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=2e-4)
        cache = dict(cache.pop("new"))


@torch.no_grad()
def test_shapes_and_attn_fn_contract():
    model = build_model(TINY)
    x, ctx = _inputs()
    kv = DenseKV()
    out = model(x, torch.rand(2), ctx, torch.tensor([0, 6]), kv)
    assert out.shape == x.shape and out.dtype == torch.float32
    t_tokens = FPC * TINY.frame_tokens
    assert [c[0] for c in kv.calls] == list(range(TINY.num_layers))
    assert all(c[1] == (2, t_tokens, TINY.num_heads, TINY.head_dim) and c[2] == torch.float32 for c in kv.calls)
    # a single latent frame (F=1) works too
    out1 = model(x[:, :1], torch.rand(2), ctx, torch.tensor([0, 6]), DenseKV())
    assert out1.shape == (2, 1, TINY.in_channels, TINY.latent_height, TINY.latent_width)


@torch.no_grad()
def test_keys_are_cached_after_rope_at_absolute_positions():
    """Layer-0 keys of the same chunk at frame 0 and at frame 6 differ by a temporal rotation of 6."""
    model = build_model(TINY)
    x, ctx = _inputs(b=1)
    kv0, kv6 = DenseKV(), DenseKV()
    y0 = model(x, torch.zeros(1), ctx, torch.tensor([0]), kv0)
    y6 = model(x, torch.zeros(1), ctx, torch.tensor([6]), kv6)
    k0, k6 = kv0.calls[0][3], kv6.calls[0][3]
    assert not torch.allclose(k0, k6)
    torch.testing.assert_close(rotate_temporal(k0[0], 6), k6[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv0.calls[0][4], kv6.calls[0][4])  # values carry no position
    # a lone chunk only sees relative positions: its output does not depend on its absolute offset
    torch.testing.assert_close(y0, y6, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_causal_across_chunks():
    model = build_model(TINY, seed=1)
    noises = [_inputs(seed=10 + i)[0] for i in range(3)]
    ctx = _inputs()[1]
    two = _rollout(model, noises[:2], ctx)
    three = _rollout(model, noises, ctx)
    # generating chunk 3 does not change chunks 1 and 2
    torch.testing.assert_close(three[0], two[0])
    torch.testing.assert_close(three[1], two[1])
    # changing chunk 1 changes chunk 2 (it attends to chunk 1's cached K/V)
    changed = _rollout(model, [noises[0] + 1.0, noises[1]], ctx)
    assert (changed[1] - two[1]).abs().max() > 1e-3
    # without the cache (fresh attn_fn) chunk 2 comes out differently: history matters
    alone = _rollout(model, [noises[1]], ctx)[0]
    assert (alone - two[1]).abs().max() > 1e-3


@torch.no_grad()
def test_batch_rows_are_independent():
    model = build_model(TINY)
    x, ctx = _inputs()
    t, off = torch.tensor([0.3, 0.9]), torch.tensor([0, 12])
    full = model(x, t, ctx, off, DenseKV())
    row1 = model(x[1:], t[1:], ctx[1:], off[1:], DenseKV())
    torch.testing.assert_close(full[1:], row1, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_deterministic_per_seed():
    x, ctx = _inputs()
    args = (x, torch.full((2,), 0.5), ctx, torch.tensor([0, 0]))
    a = build_model(TINY, seed=7)(*args, DenseKV())
    b = build_model(TINY, seed=7)(*args, DenseKV())
    c = build_model(TINY, seed=8)(*args, DenseKV())
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@torch.no_grad()
def test_timestep_and_context_condition_the_output():
    model = build_model(TINY)
    x, ctx = _inputs()
    off = torch.tensor([0, 0])
    base = model(x, torch.full((2,), 0.5), ctx, off, DenseKV())
    assert (model(x, torch.full((2,), 0.1), ctx, off, DenseKV()) - base).abs().max() > 1e-3
    assert (model(x, torch.full((2,), 0.5), ctx * -1, off, DenseKV()) - base).abs().max() > 1e-3


@torch.no_grad()
def test_bf16_runs_on_cpu_close_to_fp32():
    ref = build_model(TINY, seed=4)
    half = CausalWanDiT(TINY.replace(dtype="bf16"))
    half.load_state_dict(ref.state_dict())  # same weights, rounded to bf16
    x, ctx = _inputs()
    args = (torch.full((2,), 0.4), ctx, torch.tensor([0, 3]))
    kv = DenseKV()
    out = half(x.bfloat16(), *args, kv)
    assert out.dtype == torch.bfloat16 and all(c[2] == torch.bfloat16 for c in kv.calls)
    want = ref(x, *args, DenseKV())
    rel = (out.float() - want).norm() / want.norm()
    assert rel < 0.05, rel


@torch.no_grad()
def test_lingbot_camera_conditioning_changes_output():
    cfg = get_model_config("tiny-lingbot")
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, FPC, 16, cfg.latent_height, cfg.latent_width, generator=g)
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    args = (x, torch.full((2,), 0.5), ctx, torch.tensor([0, 0]))
    a = model(*args, DenseKV(), c2w=_yaw_poses(2, FPC, 0.0))
    assert (model(*args, DenseKV(), c2w=_yaw_poses(2, FPC, 90.0)) - a).abs().max() > 1e-3
    assert (model(*args, DenseKV(), c2w=_yaw_poses(2, FPC, 0.0, shift=2.0)) - a).abs().max() > 1e-3
    torch.testing.assert_close(model(*args, DenseKV(), c2w=_yaw_poses(2, FPC, 0.0)), a)
    assert (model(*args, DenseKV()) - a).abs().max() > 1e-3  # no camera: no modulation
    with pytest.raises(ValueError, match="c2w"):
        model(*args, DenseKV(), c2w=torch.eye(4).repeat(2, 1, 1, 1))


def test_plucker_rays_geometry():
    pose = _yaw_poses(1, 2, 0.0, step_deg=90.0)
    pose[0, 1, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    k = default_intrinsics(4, 6, 90.0)[None]
    rays = plucker_rays(pose, 4, 6, k)  # [1, 2, 4, 6, 6]: (origin, direction) as LingBot-World
    o, d = rays[..., :3], rays[..., 3:]
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(1, 2, 4, 6))
    torch.testing.assert_close(o[0, 0], torch.zeros(4, 6, 3))
    torch.testing.assert_close(o[0, 1], torch.tensor([1.0, 2.0, 3.0]).expand(4, 6, 3))
    # identity pose looks along +z; the 90-degree yawed frame looks along +x
    assert d[0, 0, ..., 2].min() > 0.5 and d[0, 1, ..., 0].min() > 0.5
    tokens = camera_tokens(pose, 2, 2, (1, 2, 2))  # 16x16 pixels, one token per frame
    assert tokens.shape == (1, 2, 6 * 64 * 4)
    rel = relative_camera(np.stack([np.eye(4), _np_pose(30.0, (0, 0, 2.0)), _np_pose(60.0, (0, 0, 4.0))]))
    np.testing.assert_allclose(rel[0], np.eye(4))
    np.testing.assert_allclose(np.linalg.norm(rel[:, :3, 3], axis=1).max(), 1.0)  # normalised
    with pytest.raises(ValueError, match="c2w"):
        plucker_rays(torch.eye(4).repeat(1, 1, 1), 4, 4, k)


def _np_pose(yaw, t):
    from worldkv_connector.retrieval.poses import yaw_matrix

    p = np.eye(4)
    p[:3, :3], p[:3, 3] = yaw_matrix(yaw), t
    return p


def test_bad_inputs_raise():
    model = build_model(TINY)
    x, ctx = _inputs()
    t, off, kv = torch.rand(2), torch.tensor([0, 0]), DenseKV()
    with pytest.raises(ValueError, match="x: expected"):
        model(x[:, :, :4], t, ctx, off, kv)
    with pytest.raises(ValueError, match="t: expected"):
        model(x, torch.rand(3), ctx, off, kv)
    with pytest.raises(ValueError, match="context"):
        model(x, t, ctx[..., :5], off, kv)
    with pytest.raises(ValueError, match="text_len"):
        model(x, t, torch.randn(2, TINY.text_len + 1, TINY.text_dim), off, kv)
    with pytest.raises(ValueError, match="frame_offset"):
        model(x, t, ctx, off.float(), kv)
    with pytest.raises(ValueError, match="attn_fn"):
        model(x, t, ctx, off, lambda i, q, k, v: q[:, :1])


def test_named_configs_and_derived_sizes():
    with pytest.raises(ValueError, match="nope") as err:
        get_model_config("nope")
    for name in ("tiny", "small", "wan-1.3b", "matrix-game-2", "lingbot-fast"):
        assert name in str(err.value)
        assert MODEL_CONFIGS[name].num_kv_heads == MODEL_CONFIGS[name].num_heads
    assert get_model_config("tiny").frame_tokens == 16 and get_model_config("small").frame_tokens == 64
    wan = get_model_config("wan-1.3b")
    assert wan.frame_tokens == 1560 and wan.dim == 1536 and wan.dtype == "bf16"
    assert wan.kv_shape().chunk_bytes() == 862617600
    assert 1.3e9 < wan.num_params() < 1.5e9  # Wan2.1-T2V-1.3B has about 1.42B parameters
    mg = get_model_config("matrix-game-2")
    assert mg.frame_tokens == 880 and mg.family == "matrix-game-2" and mg.kv_shape().chunk_bytes() == 486604800
    assert 1.5e9 < mg.num_params() < 1.7e9  # Wan-1.3B I2V (1.42B + image embedding) + the action module of 15 blocks
    lb = get_model_config("lingbot-fast")
    assert lb.frame_tokens == 1560 and lb.dim == 5120 and lb.kv_shape().chunk_bytes() == 3833856000
    # one Wan2.2-A14B expert (14.3B) + LingBot's camera layers (4 dim x dim Linears per block: 4.2B)
    assert 18e9 < lb.num_params() < 19e9


@pytest.mark.parametrize("name", ["tiny", "small", "tiny-mg2", "tiny-lingbot"])
def test_num_params_matches_built_model(name):
    cfg = get_model_config(name)
    assert sum(p.numel() for p in build_model(cfg).parameters()) == cfg.num_params()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"dim": 30}, "dim"),
        ({"latent_height": 7}, "latent_height"),
        ({"latent_width": 9}, "latent_width"),
        ({"head_dim": 15, "dim": 30}, "head_dim"),
        ({"num_kv_heads": 1}, "num_kv_heads"),
        ({"patch_size": (2, 2, 2)}, "patch_size"),
        ({"dtype": "fp8"}, "dtype"),
        ({"num_layers": 0}, "num_layers"),
        ({"freq_dim": 31}, "freq_dim"),
        ({"camera_fov_degrees": 200.0}, "camera_fov_degrees"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        TINY.replace(**changes)


def test_config_roundtrip_dict():
    cfg = get_model_config("matrix-game-2")
    assert ModelConfig(**cfg.to_dict()) == cfg


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_matches_cpu_reference():
    cpu = build_model(TINY, seed=6)
    gpu = CausalWanDiT(cpu.config, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x, ctx = _inputs(cpu.config)
    t, off = torch.tensor([0.2, 0.9]), torch.tensor([0, 9])
    want = cpu(x, t, ctx, off, DenseKV())
    got = gpu(x.cuda(), t.cuda(), ctx.cuda(), off.cuda(), DenseKV())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)
    # random init on the GPU is deterministic per seed too
    a, b = build_model(TINY, seed=1, device="cuda"), build_model(TINY, seed=1, device="cuda")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_reuse_conditioning_builds_tables_once_per_step_and_matches_fresh_calls(monkeypatch):
    import worldkv_connector.integration.video.models.world as world_mod

    cfg = get_model_config("world")
    model = build_model(cfg)
    x, ctx = _inputs(cfg, b=1)
    t, off = torch.full((1,), 0.5), torch.tensor([3])
    cam = _yaw_poses(1, cfg.frames_per_chunk, 10.0, shift=0.5)
    fresh = model(x, t, ctx, off, DenseKV(), cam=cam)
    fresh_moved = model(x, t, ctx, off + 1, DenseKV(), cam=_yaw_poses(1, cfg.frames_per_chunk, 40.0))
    calls = {"rays": 0, "rope": 0}
    rays, rope = world_mod.world_rays, model._rope
    monkeypatch.setattr(world_mod, "world_rays", lambda *a: (calls.__setitem__("rays", calls["rays"] + 1), rays(*a))[1])
    monkeypatch.setattr(model, "_rope", lambda *a: (calls.__setitem__("rope", calls["rope"] + 1), rope(*a))[1])
    with model.reuse_conditioning():
        for _ in range(3):  # same poses and offsets (as new but equal tensors): built once, same output
            assert torch.equal(model(x, t, ctx, off.clone(), DenseKV(), cam=cam.clone()), fresh)
        assert calls == {"rays": 1, "rope": 1}
        moved = model(x, t, ctx, off + 1, DenseKV(), cam=_yaw_poses(1, cfg.frames_per_chunk, 40.0))
        assert torch.equal(moved, fresh_moved) and calls == {"rays": 2, "rope": 2}
        bad = cam.clone()
        bad[0, 0, 0, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):  # never served from the cache
            model(x, t, ctx, off, DenseKV(), cam=bad)
    assert model._memo is None
    model(x, t, ctx, off, DenseKV(), cam=cam)  # outside the scope every call builds its tables
    assert calls == {"rays": 4, "rope": 3}  # the NaN call raised before its RoPE tables
