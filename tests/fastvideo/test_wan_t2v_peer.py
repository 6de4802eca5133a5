"""Wan T2V (Self-Forcing / CausVid) against its peers with identical random weights in the upstream
layout: the first chunk equals diffusers 0.42.1's ``WanTransformer3DModel`` (bidirectional over the
chunk, as a causal model's first chunk is), and every pass of the paged engine over several chunks
(full and sink + sliding window) equals FastVideo 0.2.1's ``CausalWanTransformer3DModel`` with its own
rolling KV cache, to relative L2 <= 1e-4 in fp32. The weights go to diffusers through diffusers' own
converter and on to FastVideo through its own name mapping."""
from __future__ import annotations

import pytest
import torch

from worldkv_connector.integration.video.checkpoint import save_checkpoint
from worldkv_connector.integration.video.models import build_model
from worldkv_connector.integration.video.model_config import get_model_config

from test_world_models_peer import TOL, _cache, _engine, _to_fastvideo_names, rel_l2

TINY = get_model_config("tiny")
FT = TINY.frame_tokens


def _dense(layer, q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _diffusers_sd(sd):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers({k: v.clone() for k, v in sd.items()})


def test_first_chunk_equals_diffusers_wan():
    from diffusers import WanTransformer3DModel

    c = TINY
    model = build_model(c, seed=3)
    peer = WanTransformer3DModel(patch_size=c.patch_size, num_attention_heads=c.num_heads,
                                 attention_head_dim=c.head_dim, in_channels=c.in_channels,
                                 out_channels=c.out_channels, text_dim=c.text_dim, freq_dim=c.freq_dim,
                                 ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", eps=c.eps).float().eval()
    missing, unexpected = peer.load_state_dict(_diffusers_sd(model.state_dict()), strict=False)
    assert not unexpected and not [k for k in missing if "rope" not in k], (missing, unexpected)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, c.in_channels, c.latent_height, c.latent_width, generator=g)
    ctx = torch.randn(1, c.text_len, c.text_dim, generator=g)
    with torch.no_grad():
        for sigma in (1.0, 0.6, 0.0):
            t = torch.tensor([sigma])
            ours = model(x, t, ctx, torch.tensor([0]), _dense)
            theirs = peer(x.permute(0, 2, 1, 3, 4), t * 1000.0, ctx, return_dict=False)[0]
            assert rel_l2(ours, theirs.permute(0, 2, 1, 3, 4)) <= TOL


@pytest.mark.parametrize("window", ["full", "sliding"])
def test_engine_passes_equal_fastvideo_causal_wan(fastvideo_dist, window, tmp_path):
    from fastvideo.configs.models.dits import WanVideoConfig
    from fastvideo.forward_context import set_forward_context
    from fastvideo.models.dits.causal_wanvideo import CausalWanTransformer3DModel

    c = TINY
    model = build_model(c, seed=4)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(model, path)
    prompt = torch.randn(c.text_len, c.text_dim, generator=torch.Generator().manual_seed(1))
    engine, rec = _engine("tiny", path, window, trajectory="R_L30", num_chunks=5, context=prompt)
    engine.close()
    cfg = WanVideoConfig()
    a = cfg.arch_config
    a.num_attention_heads, a.attention_head_dim = c.num_heads, c.head_dim
    a.in_channels, a.out_channels, a.text_dim = c.in_channels, c.out_channels, c.text_dim
    a.ffn_dim, a.freq_dim, a.num_layers, a.text_len = c.ffn_dim, c.freq_dim, c.num_layers, c.text_len
    a.local_attn_size, a.sink_size = (30, 0) if window == "full" else (12, 3)
    a.__post_init__()
    fv = CausalWanTransformer3DModel(cfg, {}).float().eval()
    fv.load_state_dict(_to_fastvideo_names(model.state_dict(), a.param_names_mapping), strict=True)
    frames = 30 if window == "full" else 12
    kv = _cache(c.num_layers, frames * FT, c.num_heads, c.head_dim)
    xc = [{"is_init": False} for _ in range(c.num_layers)]
    errs = []
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for x, t, ctx, f0, _, ours in rec.calls:
            out = fv(x.permute(0, 2, 1, 3, 4), ctx, torch.full((1, 3), float(t[0]) * 1000.0), kv_cache=kv,
                     crossattn_cache=xc, current_start=f0 * FT, start_frame=f0)
            errs.append(rel_l2(ours, out.permute(0, 2, 1, 3, 4)))
    assert max(errs) <= TOL, errs
    if window == "sliding":
        assert int(kv[0]["global_end_index"]) == 15 * FT and int(kv[0]["local_end_index"]) == 12 * FT
