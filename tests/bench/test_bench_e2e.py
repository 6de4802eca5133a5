"""`worldkv bench e2e` on the tiny preset (fields, not speed), and the reference-style data path
against the worldkv connector on the same rollout."""
import json

import pytest

from worldkv_connector.bench import e2e
from worldkv_connector.cli import main
from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.integration.video import reference_attention as reference_style


def test_e2e_runs_all_four_modes_and_reports_the_comparisons(tmp_path, capsys):
    js = tmp_path / "e2e.json"
    rc = main(["bench", "e2e", "--preset", "tiny", "--num-chunks", "12", "--window", "4",
               "--num-denoising-steps", "1", "--kv-cache-memory", "0.01", "--json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    for mode in ("full", "sliding", "worldkv", "reference-style"):
        assert f"{mode} ch/s" in out
    assert "worldkv vs full, last 4 chunks" in out and "target >= 2.0x" in out
    assert "per-step time: worldkv" in out and "same retrieved chunks: yes" in out
    data = json.loads(js.read_text())
    assert data["bench"] == "e2e" and data["config"]["modes"] == "full,sliding,worldkv,reference-style"
    assert set(data["runs"]) == {"full", "sliding", "worldkv", "reference-style"}
    for mode, r in data["runs"].items():
        assert len(r["step_seconds"]) == 12 and len(r["resident_kv_bytes"]) == 12 and len(r["retrieved"]) == 12
        assert len(data["window_chunks_per_s"][mode]) == 3
        s = data["summary"][mode]
        assert {"chunks_per_s", "last_window_chunks_per_s", "last_window_speedup_vs_full", "step_seconds_mean",
                "peak_resident_kv_bytes", "bank_bytes"} <= set(s)
    comp = data["comparisons"]
    assert comp["same_retrieval"] is True
    assert {"worldkv_vs_full_last_window", "worldkv_step_seconds_mean", "reference_style_step_seconds_mean",
            "reference_style_over_worldkv_step_time"} <= set(comp)
    wkv, ref = data["runs"]["worldkv"], data["runs"]["reference-style"]
    assert wkv["retrieved"][-1] and wkv["retrieved"] == ref["retrieved"]
    assert ref["bank_bytes"] > 0 and wkv["bank_bytes"] is not None
    assert data["runs"]["full"]["bank_bytes"] is None


def _latents(mode_attach: bool, cfg: str, num_chunks: int):
    kwargs = dict(model="tiny", num_denoising_steps=1, kv_cache_memory=0.01)
    if mode_attach:
        engine = VideoEngine(attention_window="sliding", **kwargs)
        attn = reference_style.attach(engine, {"kv_connector_config": cfg})
    else:
        engine = VideoEngine(kv_connector="worldkv", kv_connector_config=cfg, **kwargs)
        attn = None
    with engine:
        engine.add_session("a", trajectory="R_L_R_L_R_L90", num_chunks=num_chunks, seed=3)
        engine.run()
        res = engine.chunk_results("a")
        ids = [attn.retrieved("a", r.chunk_index) if attn else r.retrieved for r in res]
        return [r.latents for r in res], ids


@pytest.mark.parametrize("cfg", ['{"bank_bytes": 4194304}', '{"keep_ratio": 0.5, "retrieval_chunks": 3, '
                                  '"hot_chunks": 3, "rope_correction": true, "bank_bytes": 4194304}'])
def test_reference_style_retrieves_the_same_chunks_and_computes_the_same_attention(cfg):
    ours, our_ids = _latents(False, cfg, 14)
    ref, ref_ids = _latents(True, cfg, 14)
    assert our_ids == ref_ids and any(our_ids)
    for a, b in zip(ours, ref):  # same window, same kept tokens, same positions: same output
        assert (a - b).abs().max().item() < 1e-4


def test_reference_style_window_follows_the_config_and_rejects_other_flags():
    r = e2e.run_rollout("reference-style", "tiny", 4, num_denoising_steps=1, kv_cache_memory=0.01,
                        kv_connector_config='{"recent_frames": 3}', warmup_chunks=0)
    assert r["metrics"]["peak_pages"] == 3  # sink 1 + recent 1 + current, one 64-token page each
    with pytest.raises(ValueError, match="--recent-frames 6 disagrees with the WorldKV config's recent_frames=3"):
        e2e.run_rollout("reference-style", "tiny", 2, recent_frames=6, kv_connector_config='{"recent_frames": 3}')
    with pytest.raises(ValueError, match="unknown mode 'warp'"):
        e2e.run_rollout("warp", "tiny", 2)
    assert isinstance(e2e.MODES["reference-style"], e2e.Mode) and e2e.MODES["full"].attach is None


@pytest.mark.cuda
def test_cuda_reference_style_matches_the_worldkv_connector():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparison
    torch.backends.cudnn.allow_tf32 = False
    cfg = '{"bank_bytes": 4194304}'
    runs = {}
    for mode in ("worldkv", "reference-style"):
        runs[mode] = e2e.run_rollout(mode, "tiny", 12, num_denoising_steps=1, device="cuda", kv_cache_memory=0.01,
                                     kv_connector_config=cfg, warmup_chunks=0)
    assert runs["worldkv"]["retrieved"] == runs["reference-style"]["retrieved"]
    assert any(runs["worldkv"]["retrieved"])
