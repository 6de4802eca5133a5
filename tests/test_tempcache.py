"""TempCache merging keeps attention mass; the compression registry names its choices."""
import math

import pytest
import torch

from worldkv_connector.compression import COMPRESSIONS, compress_chunk, get_compression, tempcache_chunk
from worldkv_connector.config import WorldKVConfig, kept_tokens_per_chunk
from worldkv_connector.kernels.paged_attention import paged_attention_torch
from worldkv_connector.registry import Registry


def _paged(k: torch.Tensor, v: torch.Tensor, page_size: int = 8):
    """k, v: [N, H, D] -> pools [P, page_size, H, D], block table, page lens (one row)."""
    n, h, d = k.shape
    pages = -(-n // page_size)
    kp, vp = torch.zeros(pages, page_size, h, d), torch.zeros(pages, page_size, h, d)
    kp.view(-1, h, d)[:n], vp.view(-1, h, d)[:n] = k, v
    lens = torch.tensor([[min(page_size, n - i * page_size) for i in range(pages)]], dtype=torch.int32)
    return kp, vp, torch.arange(pages, dtype=torch.int32)[None], lens


def test_a_key_with_count_c_attends_like_c_identical_keys():
    torch.manual_seed(0)
    h, d, c = 2, 16, 5
    others = torch.randn(6, h, d)
    dup = torch.randn(1, h, d)
    q = torch.randn(1, 3, h, d)
    vals = torch.randn(6 + c, h, d)
    k_full = torch.cat([others, dup.expand(c, h, d)])
    ref = paged_attention_torch(q, *_paged(k_full, vals))
    # merged: one key for the c duplicates, mean value, bias log c
    k_m = torch.cat([others, dup])
    v_m = torch.cat([vals[:6], vals[6:].mean(0, keepdim=True)])
    kp, vp, bt, pl = _paged(k_m, v_m)
    bias = torch.zeros(kp.shape[:2])
    bias.view(-1)[6] = math.log(c)
    out = paged_attention_torch(q, kp, vp, bt, pl, logit_bias=bias)
    assert torch.allclose(out, ref, atol=1e-5)
    pruned = paged_attention_torch(q, kp, vp, bt, pl)  # the same key without its count loses mass
    assert not torch.allclose(pruned, ref, atol=1e-3)


def test_tempcache_chunk_of_repeated_frames_is_exact_at_equal_storage():
    torch.manual_seed(1)
    ft, frames, h, d = 6, 3, 2, 16
    anchor = torch.randn(1, ft, h, d)
    k = anchor.repeat(1, frames, 1, 1)  # every frame repeats the anchor, shifted (a pan)
    k = k[:, list(range(ft)) + [ft + (i + 2) % ft for i in range(ft)] + [2 * ft + (i + 4) % ft for i in range(ft)]]
    v = torch.randn(1, ft * frames, h, d)
    out = tempcache_chunk(k, v, frame_tokens=ft, keep_ratio=0.25)
    pruned = compress_chunk(k, v, frame_tokens=ft, keep_ratio=0.25)
    assert out.k.shape == pruned.k.shape  # the same budget as novelty pruning
    assert out.k.shape[1] == kept_tokens_per_chunk(ft, frames, 0.25)
    assert float(out.counts.sum()) == ft * frames and bool((out.counts >= 1).all())
    q = torch.randn(1, 4, h, d)
    ref = paged_attention_torch(q, *_paged(k[0], v[0]))
    kp, vp, bt, pl = _paged(out.k[0], out.v[0])
    bias = torch.zeros(kp.shape[:2])
    bias.view(-1)[: out.counts.shape[1]] = out.counts[0].log()
    assert torch.allclose(paged_attention_torch(q, kp, vp, bt, pl, logit_bias=bias), ref, atol=1e-5)


def test_tempcache_keeps_novel_tokens_and_is_identity_at_keep_ratio_one():
    torch.manual_seed(2)
    k, v = torch.randn(2, 36, 2, 8), torch.randn(2, 36, 2, 8)
    full = tempcache_chunk(k, v, frame_tokens=12, keep_ratio=1.0)
    assert torch.equal(full.k, k) and torch.equal(full.counts, torch.ones(2, 36))
    single = tempcache_chunk(k[0], v[0], frame_tokens=12, keep_ratio=0.5)
    assert single.k.shape == (kept_tokens_per_chunk(12, 3, 0.5), 2, 8) and single.counts.dim() == 1
    assert torch.equal(single.indices[:12], torch.arange(12))


def test_registry_rejects_unknown_names_clearly():
    assert COMPRESSIONS.names() == ["novelty", "tempcache"]
    assert get_compression("novelty") is compress_chunk
    with pytest.raises(ValueError, match=r"unknown compression 'zip': choose one of \['novelty', 'tempcache'\]"):
        get_compression("zip")
    with pytest.raises(ValueError, match="WorldKVConfig.compression='zip' is not allowed"):
        WorldKVConfig(compression="zip")
    reg = Registry("policy")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(object)
    assert "a" in reg and len(reg) == 1


def test_fingerprint_separates_merged_banks_and_keeps_novelty_unchanged():
    assert WorldKVConfig(compression="tempcache").fingerprint() != WorldKVConfig().fingerprint()
    assert WorldKVConfig(compression="novelty").fingerprint() == WorldKVConfig().fingerprint()


def test_engine_with_tempcache_puts_log_counts_into_the_retrieved_pages():
    from worldkv_connector.integration.video.engine import VideoEngine

    seen = []
    with VideoEngine(model="tiny", attention_window="sliding", kv_connector="worldkv", page_size=16,
                     num_denoising_steps=1, kv_connector_config='{"compression": "tempcache"}') as engine:
        engine.add_session("s", trajectory="R_L90", num_chunks=10, seed=0)
        while engine.has_unfinished_sessions():
            for r in engine.step():
                bias = engine.connector.logit_bias["blocks.0"]
                seen.append((r.retrieved, float(bias.max())))
    retrieved = [b for ids, b in seen if ids]
    assert retrieved and max(retrieved) > 0.5  # a merged key of count >= 2 was in the window
    assert all(b >= 0 for _, b in seen)


def test_a_merged_entry_without_its_counts_is_a_load_error_not_wrong_attention():
    from worldkv_connector.integration.video.engine import VideoEngine

    with VideoEngine(model="tiny", attention_window="sliding", kv_connector="worldkv", page_size=16,
                     num_denoising_steps=1, kv_connector_config='{"compression": "tempcache"}') as engine:
        engine.add_session("s", trajectory="R_L90", num_chunks=12, seed=0)
        for _ in range(5):
            engine.step()
        bank = engine.connector.worker.bank
        for key in list(bank.keys()):  # as if restored from a bank saved without the counts
            bank.get(key).counts = None
        before = engine.connector.metrics()["load_errors"]
        while engine.has_unfinished_sessions():
            engine.step()
        assert engine.connector.metrics()["load_errors"] > before
