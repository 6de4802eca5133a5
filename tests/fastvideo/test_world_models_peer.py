"""Matrix-Game-2.0 and LingBot-World-Fast against FastVideo 0.2.1's implementations (the peer's real code).

With identical random weights written in the upstream layout, this project's models run through the
paged engine (every denoising pass and the clean pass of every chunk, with actions / camera poses),
and each call is replayed on FastVideo's ``CausalMatrixGame2WanModel`` / ``LingBotWorld2CausalFast``
with FastVideo's own rolling KV caches (and, for Matrix-Game-2, its keyboard and mouse caches): every
output must match to relative L2 <= 1e-4 in fp32, full window and sink + sliding window. The weights
go to the peer through diffusers' converter and FastVideo's own name mapping; a state dict the peer
saves loads back through ``worldkv generate --checkpoint``.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.integration.video.checkpoint import load_checkpoint, save_checkpoint
from worldkv_connector.integration.video.models import build_model
from worldkv_connector.integration.video.model_config import get_model_config
from worldkv_connector.retrieval.poses import resample_video_poses
from worldkv_connector.retrieval.trajectory import parse_trajectory

TOL = 1e-4
MG2, LB = get_model_config("tiny-mg2"), get_model_config("tiny-lingbot")
FT = MG2.frame_tokens  # 16 tokens per latent frame


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cache(layers, tokens, heads, dim, rows=1):
    return [{"k": torch.zeros(rows, tokens, heads, dim), "v": torch.zeros(rows, tokens, heads, dim),
             "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])} for _ in range(layers)]


class Recorder:
    """Stands in for the engine's model: records every call (inputs, output) and forwards it."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, context, offsets, attn_fn, **extra):
        out = self.model(x, t, context, offsets, attn_fn, **extra)
        keep = {k: v.clone() for k, v in extra.items() if isinstance(v, torch.Tensor)}
        self.calls.append((x.clone(), t.clone(), context.clone(), int(offsets[0]), keep, out.clone()))
        return out


def _engine(name, path, window, **session):
    kw = dict(attention_window="full") if window == "full" else dict(sink_frames=3, recent_frames=6)
    engine = VideoEngine(model=name, checkpoint=str(path), num_denoising_steps=2, **kw)
    rec = Recorder(engine.runner.model)
    engine.runner.model = rec
    engine.add_session("a", **session)
    engine.run()
    return engine, rec


# --- Matrix-Game-2 -------------------------------------------------------------------------------

def _fastvideo_mg2(local_attn_size, sink_size):
    from fastvideo.configs.models.dits.matrixgame2 import MatrixGame2WanVideoConfig
    from fastvideo.models.dits.matrixgame2.causal_model import CausalMatrixGame2WanModel

    c, a = MG2, MG2.action
    cfg = MatrixGame2WanVideoConfig()
    arch = cfg.arch_config
    arch.num_attention_heads, arch.attention_head_dim = c.num_heads, c.head_dim
    arch.in_channels, arch.out_channels = c.in_channels, c.out_channels
    arch.ffn_dim, arch.freq_dim, arch.num_layers, arch.image_dim = c.ffn_dim, c.freq_dim, c.num_layers, c.image_dim
    arch.local_attn_size, arch.sink_size = local_attn_size, sink_size
    arch.action_config = dict(arch.action_config)
    arch.action_config.update(
        blocks=list(a.blocks), heads_num=a.heads_num, hidden_size=a.hidden_size, img_hidden_size=c.dim,
        keyboard_hidden_dim=a.keyboard_hidden_dim, mouse_hidden_dim=a.mouse_hidden_dim,
        mouse_qk_dim_list=list(a.mouse_qk_dim_list), rope_dim_list=list(a.mouse_qk_dim_list),
        windows_size=a.windows_size, keyboard_dim_in=a.keyboard_dim_in, mouse_dim_in=a.mouse_dim_in,
        rope_theta=a.rope_theta,
    )
    arch.__post_init__()
    return CausalMatrixGame2WanModel(cfg, {}).float().eval(), cfg


def _to_fastvideo_names(wan_sd: dict, mapping: dict) -> dict:
    """Upstream (Wan) keys -> diffusers (diffusers' own converter) -> FastVideo (its param_names_mapping)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    diff = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in wan_sd.items()})
    out = {}
    for k, v in diff.items():
        for pattern, repl in mapping.items():
            if re.match(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        out[k] = v
    return out


def _mg2_actions(n):
    g = np.random.default_rng(3)
    kb = (g.random((n, 4)) < 0.3).astype(np.float32)
    ms = np.zeros((n, 2), np.float32)
    ms[: n // 2, 1], ms[n // 2:, 1] = 0.1, -0.1  # turn right, then back left
    ms[:, 0] = g.normal(0, 0.02, n)
    return kb, ms


@pytest.fixture(scope="module")
def mg2_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("mg2") / "tiny-mg2.safetensors"
    model = build_model(MG2, seed=5)
    with torch.no_grad():  # non-trivial norms and LayerNorm affines (the defaults are ones / zeros)
        for k, p in model.named_parameters():
            if "norm" in k or "img_emb.proj.0" in k or "img_emb.proj.4" in k or "mouse_mlp.3" in k:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))) * 0.1)
    save_checkpoint(model, path)
    return path, model.state_dict()


@pytest.mark.parametrize("window", ["full", "sliding"])
def test_matrix_game2_engine_passes_equal_fastvideo(mg2_weights, fastvideo_dist, window):
    from fastvideo.forward_context import set_forward_context

    path, sd = mg2_weights
    chunks = 5
    kb, ms = _mg2_actions(4 * (3 * chunks - 1) + 1)
    g = torch.Generator().manual_seed(9)
    image, first = torch.randn(MG2.image_len, MG2.image_dim, generator=g), torch.randn(16, 8, 8, generator=g)
    engine, rec = _engine("tiny-mg2", path, window, num_chunks=chunks,
                          inputs={"keyboard": kb, "mouse": ms, "image": image, "first_latent": first})
    engine.close()
    assert len(rec.calls) == chunks * 3  # 2 denoising passes + the clean pass per chunk
    local, sink = (64, 0) if window == "full" else (12, 3)
    fv, cfg = _fastvideo_mg2(local, sink)
    fv.load_state_dict(_to_fastvideo_names(sd, cfg.arch_config.param_names_mapping), strict=True)
    a = MG2.action
    cache_frames = 64 if window == "full" else 12
    kv = _cache(MG2.num_layers, cache_frames * FT, MG2.num_heads, MG2.head_dim)
    kvm = _cache(MG2.num_layers, cache_frames, a.heads_num, a.mouse_hidden_dim // a.heads_num, rows=FT)
    kvk = _cache(MG2.num_layers, cache_frames, a.heads_num, a.keyboard_hidden_dim // a.heads_num)
    xc = [{"is_init": False} for _ in range(MG2.num_layers)]
    kbt, mst = torch.from_numpy(kb)[None], torch.from_numpy(ms)[None]
    errs = []
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for x, t, ctx, f0, extra, ours in rec.calls:
            hidden = torch.cat((x, extra["cond"]), dim=2).permute(0, 2, 1, 3, 4)  # [B, 36, F, H, W]
            end = 1 + 4 * (f0 + 2)
            out = fv(hidden, None, torch.full((1, 3), float(t[0]) * 1000.0), encoder_hidden_states_image=ctx,
                     mouse_cond=mst[:, :end], keyboard_cond=kbt[:, :end], kv_cache=kv, kv_cache_mouse=kvm,
                     kv_cache_keyboard=kvk, crossattn_cache=xc, current_start=f0 * FT, start_frame=f0,
                     num_frame_per_block=3)
            errs.append(rel_l2(ours, out.permute(0, 2, 1, 3, 4)))
    assert max(errs) <= TOL, errs
    assert errs[0] < 1e-5  # the first chunk, before any cache
    if window == "sliding":  # FastVideo's caches rolled (sink kept): the window really slid
        assert int(kv[0]["global_end_index"]) == 15 * FT and int(kv[0]["local_end_index"]) == 12 * FT
        assert int(kvm[0]["global_end_index"]) == 15 and int(kvm[0]["local_end_index"]) == 12


def test_matrix_game2_checkpoint_saved_by_fastvideo_loads_through_generate(mg2_weights, fastvideo_dist, tmp_path,
                                                                            capsys):
    from worldkv_connector.cli import main

    _, sd = mg2_weights
    fv, cfg = _fastvideo_mg2(64, 0)
    fv.load_state_dict(_to_fastvideo_names(sd, cfg.arch_config.param_names_mapping), strict=True)
    peer = tmp_path / "fastvideo-mg2.safetensors"
    save_file({k: v.contiguous() for k, v in fv.state_dict().items()}, str(peer))  # FastVideo's own names
    ours = load_checkpoint(build_model(MG2, seed=99), peer)
    for k, v in sd.items():
        assert torch.equal(ours.state_dict()[k], v), k
    kb, ms = _mg2_actions(4 * 8 + 1)
    actions = tmp_path / "a.npy"
    np.save(actions, np.concatenate((kb, ms[:, :1], ms[:, 1:]), axis=1))
    js = tmp_path / "g.json"
    assert main(["generate", "--model", "tiny-mg2", "--checkpoint", str(peer), "--actions", str(actions),
                 "--num-denoising-steps", "1", "--no-progress", "--json", str(js)]) == 0
    capsys.readouterr()
    assert json.loads(js.read_text())["summary"]["chunks"] == 3  # 33 video frames -> 9 latent -> 3 chunks


# --- LingBot-World ---------------------------------------------------------------------------------

def _fastvideo_lingbot(local_attn_size, sink_size):
    from fastvideo.configs.models.dits.lingbotworld2 import LingBotWorld2CausalFastVideoConfig
    from fastvideo.models.dits.lingbotworld2.causal_fast import LingBotWorld2CausalFastTransformer3DModel

    c = LB
    cfg = LingBotWorld2CausalFastVideoConfig()
    a = cfg.arch_config
    a.dim, a.num_heads, a.in_dim, a.out_dim = c.dim, c.num_heads, c.in_channels, c.out_channels
    a.text_dim, a.ffn_dim, a.freq_dim, a.num_layers, a.text_len = c.text_dim, c.ffn_dim, c.freq_dim, c.num_layers, c.text_len
    a.local_attn_size, a.sink_size, a.chunk_size = local_attn_size, sink_size, 3
    return LingBotWorld2CausalFastTransformer3DModel(cfg, {}).float().eval()


@pytest.fixture(scope="module")
def lingbot_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("lb") / "tiny-lingbot.safetensors"
    model = build_model(LB, seed=6)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "norm" in k:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))) * 0.1)
    save_checkpoint(model, path)
    return path, model.state_dict()


@pytest.mark.parametrize("window", ["full", "sliding"])
def test_lingbot_engine_passes_equal_fastvideo(lingbot_weights, fastvideo_dist, window, tmp_path):
    from fastvideo.forward_context import set_forward_context
    from fastvideo.models.dits.lingbotworld2.cam_utils import prepare_camera_embedding

    path, sd = lingbot_weights
    # 57 video frames (R then W, 4n+1): 15 latent frames = 5 chunks; FastVideo builds its Plucker rays
    # from the same video-frame poses with its own (upstream) camera code
    video = parse_trajectory("RW", deg_per_frame=5.0, move_frames=38)  # 1 + 18 + 38 = 57 frames
    assert resample_video_poses(video).shape[0] == 15
    k480 = np.array([[500.0, 510.0, 416.0, 240.0]], np.float32)  # fx, fy, cx, cy at 832x480
    np.save(tmp_path / "poses.npy", video.astype(np.float32))
    np.save(tmp_path / "intrinsics.npy", np.repeat(k480, len(video), 0))
    plucker, _ = prepare_camera_embedding(str(tmp_path), len(video), 64, 64)  # [1, 384, 15, 8, 8]
    intr = k480[0] * np.array([64 / 832, 64 / 480, 64 / 832, 64 / 480], np.float32)  # the same resize
    g = torch.Generator().manual_seed(4)
    prompt, first = torch.randn(5, LB.text_dim, generator=g), torch.randn(16, 8, 8, generator=g)
    engine, rec = _engine("tiny-lingbot", path, window, poses=resample_video_poses(video), context=prompt,
                          inputs={"intrinsics": intr, "first_latent": first})
    engine.close()
    assert len(rec.calls) == 5 * 3
    local, sink = (-1, 0) if window == "full" else (12, 3)
    fv = _fastvideo_lingbot(local, sink)
    fv.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)  # FastVideo keeps the upstream names
    frames = 64 if window == "full" else 12
    kv = _cache(LB.num_layers, frames * FT, LB.num_heads, LB.head_dim)
    xc = [{"k": torch.zeros(1, LB.text_len, LB.num_heads, LB.head_dim),
           "v": torch.zeros(1, LB.text_len, LB.num_heads, LB.head_dim), "is_init": torch.tensor([0])}
          for _ in range(LB.num_layers)]
    errs = []
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for x, t, ctx, f0, extra, ours in rec.calls:
            out = fv(x.permute(0, 2, 1, 3, 4), ctx[:, :5], torch.full((1,), float(t[0]) * 1000.0), seq_len=3 * FT,
                     y=[extra["cond"][0].permute(1, 0, 2, 3)],
                     dit_cond_dict={"c2ws_plucker_emb": [plucker[:, :, f0:f0 + 3]]}, kv_cache=kv,
                     crossattn_cache=xc, current_start=f0 * FT, frame_seqlen=FT,
                     max_attention_size=frames * FT)
            errs.append(rel_l2(ours, out[0].permute(1, 0, 2, 3)[None]))
    assert max(errs) <= TOL, errs
    if window == "sliding":  # FastVideo's cache rolled (sink kept): the window really slid
        assert int(kv[0]["global_end_index"]) == 15 * FT and int(kv[0]["local_end_index"]) == 12 * FT


def test_lingbot_checkpoint_saved_by_fastvideo_loads_through_generate(lingbot_weights, fastvideo_dist, tmp_path,
                                                                       capsys):
    from worldkv_connector.cli import main

    _, sd = lingbot_weights
    fv = _fastvideo_lingbot(-1, 0)
    fv.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    peer = tmp_path / "fastvideo-lingbot.pt"
    torch.save({"generator_ema": {"model." + k: v for k, v in fv.state_dict().items()}}, str(peer))
    ours = load_checkpoint(build_model(LB, seed=98), peer, key="generator_ema", prefix="model.")
    for k, v in sd.items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert main(["generate", "--model", "tiny-lingbot", "--checkpoint", str(peer), "--checkpoint-key",
                 "generator_ema", "--checkpoint-prefix", "model.", "--trajectory", "R_L30",
                 "--num-denoising-steps", "1", "--no-progress"]) == 0
    assert "chunks generated" in capsys.readouterr().out
