"""Transfer benchmarks (`worldkv bench offload|reinsert|overlap|compress`): each runs once on the tiny
preset through the real CLI and its JSON is checked for the figures it promises (not for speed);
the paged layout they time is checked against the page-gather reference."""
import json

import pytest
import torch

from worldkv_connector.bench.common import check_preset, measure_many, target
from worldkv_connector.bench.paged import PagedLayout, cpu_target_shape
from worldkv_connector.cli import main
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.shapes import get_preset
from worldkv_connector.transfer import TransferEngine

FAST = ["--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--threads", "1"]
TINY = get_preset("tiny")
CFG = WorldKVConfig()


def gather_pages_torch(pool, page_ids, page_lens):
    """[*lead, N, H, D]: the first page_lens[i] tokens of page page_ids[i] of pool
    [*lead, num_pages, page_size, H, D], page after page (the reference of a paged gather)."""
    parts = [pool[..., int(p), :int(n), :, :] for p, n in zip(page_ids.tolist(), page_lens.tolist())]
    return torch.cat(parts, dim=-3)


def bench(tmp_path, name, *extra):
    path = tmp_path / f"{name}.json"
    assert main(["bench", name, *FAST, "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def check_sweep_point(p, tokens, chunks):
    pages = -(-tokens // p["page_size"])
    assert p["fragments"] == chunks * TINY.num_layers * 2 * pages
    assert p["bytes"] == chunks * TINY.chunk_bytes(tokens)
    assert p["path"] == "cpu-sync" and 1 <= p["runs"] <= p["fragments"]
    assert set(p["gbps"]) == {"contiguous", "ours", "pairs", "loop", "reference"}
    assert all(v > 0 for v in p["gbps"].values())
    assert p["ratio_to_contiguous"]["contiguous"] == pytest.approx(1.0)
    assert p["ratio_to_contiguous"]["ours"] == pytest.approx(p["gbps"]["ours"] / p["gbps"]["contiguous"])


def test_offload_reports_every_baseline_and_the_cpu_target(tmp_path, capsys):
    plot = tmp_path / "offload.png"
    out = bench(tmp_path, "offload", "--page-sizes", "16,64", "--chunks", "2", "--plot", str(plot))
    assert out["bench"] == "offload" and out["preset"] == "tiny" and out["device"] == "cpu" and out["threads"] == 1
    assert [p["page_size"] for p in out["sweep"]] == [16, 64]
    for p in out["sweep"]:
        check_sweep_point(p, TINY.chunk_tokens, 2)
    comp = out["compressed"]
    assert comp["kept_tokens"] == CFG.kept_tokens(TINY.frame_tokens) < comp["tokens"] == TINY.chunk_tokens
    assert comp["moved_bytes"] == TINY.chunk_bytes(comp["kept_tokens"])
    assert set(comp["effective_gbps"]) == {"contiguous", "ours", "reference"}
    # the CPU target is measured on a layout whose page is a wan-1.3b page of K (192 KiB)
    cpu = out["cpu_target_point"]
    assert cpu["page_bytes"] == 192 * 1024 == get_preset("wan-1.3b").page_bytes(64)
    targets = {t["name"]: t for t in out["targets"]}
    cpu_target = targets["paged gather / contiguous copy at 192 KiB fragments (CPU)"]
    assert cpu_target["met"] == (cpu["ratio_to_contiguous"]["ours"] >= 0.8)
    gpu_targets = [t for t in out["targets"] if t["note"].startswith("GPU")]
    assert len(gpu_targets) == 2 and all(t["met"] is None for t in gpu_targets)  # no GPU: not checkable
    assert out["engine_paths"]["cpu-sync"] > 0 and out["engine_paths"]["sm-kernel"] == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "ours/loop" in text and "targets" in text and "n/a here" in text


def test_reinsert_reports_sweep_and_hot_set_steady_state(tmp_path):
    out = bench(tmp_path, "reinsert", "--page-sizes", "16", "--k", "3", "--changed", "1", "--steps", "3")
    kept = CFG.kept_tokens(TINY.frame_tokens)
    assert out["kept_tokens"] == kept and out["k"] == 3
    check_sweep_point(out["sweep"][0], kept, 3)
    steady = out["steady_state"]
    assert steady["all"]["bytes_per_step"] == 3 * TINY.chunk_bytes(kept)
    # the hot set moves only the changed chunk; the reference moves all k every step
    assert steady["hot"]["bytes_vs_all"] == pytest.approx(1 / 3)
    assert steady["reference"]["bytes_vs_all"] == pytest.approx(1.0)
    assert all(steady[n]["time_s"] > 0 for n in ("all", "hot", "reference"))
    assert out["cpu_target_point"]["page_bytes"] == 192 * 1024


def test_overlap_reports_ratio_honestly_on_cpu(tmp_path, capsys):
    out = bench(tmp_path, "overlap", "--load-chunks", "2")
    ms = out["time_ms"]
    assert out["model"] == "tiny" and out["overlaps"] is False
    assert out["ratio"] == pytest.approx(ms["with"] / ms["alone"])
    assert out["serial_ratio"] == pytest.approx((ms["alone"] + ms["transfers"]) / ms["alone"])
    kept = CFG.kept_tokens(TINY.frame_tokens)
    assert out["moved_bytes"] == 3 * TINY.chunk_bytes(kept)  # 1 store + 2 loads
    window = (CFG.sink_chunks + CFG.recent_chunks) * TINY.chunk_tokens + CFG.retrieval_chunks * kept
    assert out["window_tokens"] == window
    assert out["targets"][0]["met"] is None
    assert "Overlap needs CUDA streams" in capsys.readouterr().out


def test_compress_reports_kept_tokens_and_ratio(tmp_path):
    out = bench(tmp_path, "compress")
    (row,) = out["presets"]
    assert row["preset"] == "tiny" and row["compress_impl"] == "torch"
    assert (row["tokens"], row["kept_tokens"]) == (TINY.chunk_tokens, CFG.kept_tokens(TINY.frame_tokens))
    assert row["compressed_bytes"] == TINY.chunk_bytes(row["kept_tokens"])
    assert row["compress_over_copy"] == pytest.approx(row["time_ms"]["compress"] / row["time_ms"]["copy"])
    half = bench(tmp_path, "compress", "--keep-ratio", "0.5")["presets"][0]
    assert half["kept_tokens"] == CFG.replace(keep_ratio=0.5).kept_tokens(TINY.frame_tokens) > row["kept_tokens"]


@pytest.mark.parametrize("argv, message", [
    (["offload", "--preset", "wan-1.3b", "--device", "cpu"], "--preset wan-1.3b: not allowed on the CPU"),
    (["compress", "--preset", "tiny", "lingbot-fast-sp4", "--device", "cpu"], "--preset lingbot-fast-sp4: not allowed"),
    (["offload", "--preset", "tiny", "--device", "cpu", "--page-sizes", "16,x"], "--page-sizes='16,x'"),
    (["offload", "--preset", "tiny", "--device", "cpu", "--chunks", "0"], "--chunks=0 is out of range"),
    (["reinsert", "--preset", "tiny", "--device", "cpu", "--k", "2", "--changed", "3"], "--changed=3 must be <= --k=2"),
    (["overlap", "--preset", "tiny", "--device", "cpu", "--repeats", "0"], "--repeats=0 is out of range"),
    (["overlap", "--preset", "tiny", "--device", "cpu", "--threads", "0"], "--threads=0 is out of range"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_device_without_gpu_is_an_error(capsys):
    assert main(["bench", "compress", "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_gpu_presets_are_allowed_only_with_cuda():
    assert check_preset(None, torch.device("cpu")).name == "tiny"
    assert check_preset("small", torch.device("cpu")).name == "small"
    assert check_preset("lingbot-fast-sp4", torch.device("cuda")).num_kv_heads == 10  # no allocation happens
    assert cpu_target_shape(64).page_bytes(64) == 192 * 1024


@pytest.mark.parametrize("to_bank", [True, False])
def test_layout_pairs_move_exactly_the_chunk_pages(to_bank):
    """What the benchmarks time is the right copy: bank slot == the chunk's pages gathered in order."""
    layout = PagedLayout(TINY, 16, 40, 3, torch.device("cpu"))  # 3 pages per chunk, the last one partial
    layout.pools.copy_(torch.randn_like(layout.pools))
    assert sorted(i for ids in layout.page_ids for i in ids) == list(range(9))
    assert layout.page_ids != [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # scattered, as after a while of serving
    if not to_bank:  # load: fill the bank, then check the pages got it
        for c in range(3):
            layout.bank.view(c).copy_(torch.randn_like(layout.bank.view(c)))
    with TransferEngine() as eng:
        job = eng.submit("store" if to_bank else "load", *layout.pairs([2, 0], to_bank=to_bank))
    assert job.error is None and job.nbytes == 2 * TINY.chunk_bytes(40)
    lens = torch.tensor([16, 16, 8])
    for c in (0, 2):
        ids = torch.tensor(layout.page_ids[c])
        for layer in range(TINY.num_layers):
            pages = gather_pages_torch(layout.pools[layer], ids, lens)  # [2, 40, H, D]
            assert torch.equal(pages, layout.bank.view(c)[layer])
    layout.close()


def test_interleaved_timing_and_targets():
    calls = []
    times = measure_many({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"),
                         warmup=1, repeats=3, flush_bytes=1024)
    assert calls == ["a", "b"] * 4  # warm-up round, then a b a b a b
    assert times["a"].repeats == 3 and 0 <= times["a"].min_s <= times["a"].median_s <= times["a"].max_s
    assert target("x", 0.95, ">=", 0.9, applies=True)["met"] is True
    assert target("x", 1.2, "<=", 1.05, applies=True)["met"] is False
    assert target("x", 1.0, "<=", 1.05, applies=False)["met"] is None
