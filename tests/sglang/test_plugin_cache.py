"""The WorldKV cache block on its own: head-sharded writes (``cache_head_start``) and bad input."""
import pytest
import torch

import harness
from worldkv_connector.integration.sglang.runtime import PluginSettings

pytestmark = pytest.mark.sglang

T = harness.FPC * harness.FRAME_TOKENS


def caches(stage, heads=harness.H):
    return stage._allocate_causal_kv_cache(batch_size=1, kv_cache_size=T * 8, num_attention_heads=heads,
                                           attention_head_dim=harness.D, dtype=torch.float32, device="cpu",
                                           sink_tokens=T)


def test_cache_head_start_writes_and_reads_one_head_slice(hooks, worldkv):
    """A rank holding head 1 of 2 (tensor/sequence parallel) sees the same window as SGLang's cache."""
    import types

    worldkv(keep_ratio=1.0, sink_frames=3, recent_frames=6)
    model = harness.tiny_causal_wan()
    ours = caches(harness.make_stage(model, sink_frames=3, window_frames=24))[0]
    base_stage = harness.make_stage(model, sink_frames=3, window_frames=24)
    base_stage._allocate_causal_kv_cache = types.MethodType(hooks, base_stage)
    theirs = caches(base_stage)[0]
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        for head in (0, 1):  # each rank writes its own head
            k, v = torch.randn(1, T, 1, harness.D, generator=g), torch.randn(1, T, 1, harness.D, generator=g)
            a = ours.update_and_get_attention_kv(key=k, value=v, current_chunk_start=c * T, cache_head_start=head)
            b = theirs.update_and_get_attention_kv(key=k, value=v, current_chunk_start=c * T, cache_head_start=head)
            assert a.k.shape == b.k.shape == (1, (c + 1) * T, 1, harness.D)
            torch.testing.assert_close(a.k, b.k, rtol=0, atol=0)
            torch.testing.assert_close(a.v, b.v, rtol=0, atol=0)
        ours.group.end_chunk()
    with pytest.raises(ValueError, match="cache_head_start"):
        ours.update_and_get_attention_kv(key=k, value=v, current_chunk_start=3 * T)


def test_bad_writes_are_refused_before_work(hooks, worldkv):
    worldkv(keep_ratio=1.0)
    cache = caches(harness.make_stage(harness.tiny_causal_wan(), sink_frames=3, window_frames=24))[0]
    kv = torch.zeros(2, T, harness.H, harness.D)
    with pytest.raises(ValueError, match="batch size 1"):
        cache.update_and_get_attention_kv(key=kv, value=kv, current_chunk_start=0)
    kv = torch.zeros(1, T - 1, harness.H, harness.D)
    with pytest.raises(ValueError, match="whole chunks"):
        cache.update_and_get_attention_kv(key=kv, value=kv, current_chunk_start=0)
    kv = torch.zeros(1, T, harness.H, harness.D)
    with pytest.raises(ValueError, match="expected chunk 0"):
        cache.update_and_get_attention_kv(key=kv, value=kv, current_chunk_start=2 * T)


@pytest.mark.parametrize("env,match", [
    ({"WORLDKV_CONFIG": "{not json"}, "WORLDKV_CONFIG"),
    ({"WORLDKV_CONFIG": '{"keep_ratio": 7}'}, "keep_ratio"),
    ({"WORLDKV_CONFIG": '{"no_such_key": 1}'}, "no_such_key"),
    ({"WORLDKV_MAX_SESSIONS": "zero"}, "WORLDKV_MAX_SESSIONS"),
    ({"WORLDKV_MAX_SESSIONS": "0"}, "WORLDKV_MAX_SESSIONS"),
    ({"WORLDKV_POSELESS": "maybe"}, "WORLDKV_POSELESS"),
])
def test_bad_environment_names_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        PluginSettings.from_env(env)


def test_quantised_kv_cache_is_refused(hooks, worldkv):
    from types import SimpleNamespace

    worldkv()
    stage = harness.make_stage(harness.tiny_causal_wan(), sink_frames=3, window_frames=24, lingbot=True)
    stage._kv_quant_args = SimpleNamespace(enabled=True)
    with pytest.raises(ValueError, match="quantisation"):
        caches(stage)


@pytest.mark.parametrize("head_dim", [12, 128])
def test_rope_correction_matches_sglang_rope(head_dim):
    """The connector's ``rope_correction`` moves banked keys in time with ``rotate_temporal``; on
    SGLang's own RoPE (CausalWan: Wan split, interleaved pairs) that equals roping at the new frame."""
    from sglang.multimodal_gen.runtime.layers.rotary_embedding import _apply_rotary_emb, get_rotary_pos_embed

    from worldkv_connector.rope import rotate_temporal

    harness.shims.init_single_process_parallel()
    heads, frames, hh, ww = 2, 3, 2, 2
    hidden = heads * head_dim
    d = head_dim
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    x = torch.randn(1, frames * hh * ww, heads, head_dim, generator=torch.Generator().manual_seed(0))

    def rope(start_frame):
        cos, sin = get_rotary_pos_embed((frames, hh, ww), hidden, heads, dims, dtype=torch.float64,
                                        rope_theta=10000, start_frame=start_frame)
        return _apply_rotary_emb(x, cos.float(), sin.float(), is_neox_style=False)

    for start, delta in [(9, -6), (30, -24), (3, 12)]:
        torch.testing.assert_close(rotate_temporal(rope(start)[0], delta), rope(start + delta)[0], rtol=0, atol=1e-4)
