"""The pinned FastVideo imports and runs its three causal world models on the CPU (with the
test-tree shims): CausalWan (Self-Forcing / CausVid), Matrix-Game-2 (with its keyboard and mouse
action caches) and LingBot-World v2 causal-fast, each two chunks through its own rolling cache."""
from __future__ import annotations

import pytest
import torch

import fastvideo_tiny as tiny

FT = 4  # tokens per latent frame of the tiny models (4x4 latents, 2x2 patches)


def _dense_cache(layers: int, frames: int, heads: int, head_dim: int, rows: int = 1) -> list[dict]:
    # FastVideo's own per-layer cache layout: k, v [B, tokens, H, D] + end indices
    return [{"k": torch.zeros(rows, frames, heads, head_dim), "v": torch.zeros(rows, frames, heads, head_dim),
             "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])} for _ in range(layers)]


def test_fastvideo_is_the_pinned_release():
    import fastvideo
    from importlib.metadata import version

    assert version("fastvideo") == "0.2.1"
    assert torch.__version__.startswith("2.13.0")
    assert fastvideo.__file__


def test_cpu_attention_routes_to_fastvideo_sdpa():
    from fastvideo.platforms import current_platform

    assert current_platform.get_attn_backend_cls(None, 64, torch.float32).endswith("sdpa.SDPABackend")


def test_causal_wan_two_chunks(fastvideo_dist):
    from fastvideo.forward_context import set_forward_context

    m = tiny.tiny_causal_wan()
    kv = _dense_cache(2, 6 * FT, 2, 16)
    xc = [{"is_init": False} for _ in range(2)]
    outs = []
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for c in range(2):
            x = torch.randn(1, 4, 3, 4, 4)
            outs.append(m(x, torch.randn(1, 8, 16), torch.full((1, 1), 500), kv_cache=kv, crossattn_cache=xc,
                          current_start=c * 3 * FT, start_frame=c * 3))
    assert outs[1].shape == (1, 4, 3, 4, 4) and torch.isfinite(outs[1]).all()
    assert int(kv[0]["local_end_index"]) == 6 * FT  # both chunks are in FastVideo's cache


def test_matrixgame2_two_chunks_with_action_caches(fastvideo_dist):
    from fastvideo.forward_context import set_forward_context

    m = tiny.tiny_matrixgame2(local_attn_size=9)
    ac = m.action_config
    ah = ac["heads_num"]
    kv = _dense_cache(2, 9 * FT, 2, 16)
    kb = _dense_cache(2, 9, ah, ac["keyboard_hidden_dim"] // ah)
    ms = _dense_cache(2, 9, ah, ac["mouse_hidden_dim"] // ah, rows=FT)
    img = torch.randn(1, 4, 6, 4, 4)
    keys, mouse = torch.randn(1, 21, 4), torch.randn(1, 21, 2)
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for c in range(2):
            x = torch.cat([torch.randn(1, 4, 3, 4, 4), img[:, :, 3 * c:3 * c + 3]], 1)
            end = 1 + 4 * (3 * c + 2)
            out = m(x, None, torch.full((1, 3), 500), encoder_hidden_states_image=torch.randn(1, 4, 16),
                    mouse_cond=mouse[:, :end], keyboard_cond=keys[:, :end], kv_cache=kv, kv_cache_mouse=ms,
                    kv_cache_keyboard=kb, crossattn_cache=[{"is_init": False} for _ in range(2)],
                    current_start=c * 3 * FT, start_frame=c * 3, num_frame_per_block=3)
    assert out.shape == (1, 4, 3, 4, 4) and torch.isfinite(out).all()
    assert int(kb[0]["local_end_index"]) == 6 and int(ms[0]["local_end_index"]) == 6  # one action token per frame


def test_lingbot2_two_chunks_with_camera(fastvideo_dist):
    from fastvideo.forward_context import set_forward_context

    m = tiny.tiny_lingbot2()
    kv = _dense_cache(2, 18 * FT, 2, 16)
    xc = [{"k": torch.zeros(1, 8, 2, 16), "v": torch.zeros(1, 8, 2, 16), "is_init": torch.tensor([0])}
          for _ in range(2)]
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for c in range(2):
            out = m(torch.randn(1, 4, 3, 4, 4), torch.randn(1, 8, 16), torch.full((1,), 500.0), seq_len=3 * FT,
                    y=[torch.randn(4, 3, 4, 4)], dit_cond_dict={"c2ws_plucker_emb": [torch.randn(1, 384, 3, 4, 4)]},
                    kv_cache=kv, crossattn_cache=xc, current_start=c * 3 * FT, frame_seqlen=FT)
    assert out[0].shape == (4, 3, 4, 4) and torch.isfinite(out[0]).all()
    assert int(kv[0]["local_end_index"]) == 6 * FT


@pytest.mark.parametrize("name", ["CausalWanTransformer3DModel", "CausalMatrixGame2WanModel",
                                  "LingBotWorld2CausalFastTransformer3DModel"])
def test_models_are_registered_in_fastvideo(name):
    from fastvideo.models.registry import ModelRegistry

    assert name in ModelRegistry.get_supported_archs()
