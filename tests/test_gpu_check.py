"""``make gpu-check``: the dry run of the whole plan (so the command cannot rot), the plan's sizing,
the timeouts, and the verdicts read from bench JSON, JUnit and compute-sanitizer output."""
import json
import subprocess
import sys
from pathlib import Path

from worldkv_connector.bench import gpu_check
from worldkv_connector.bench.gpu_check import Part, build_plan, run_plan
from worldkv_connector.bench.gpu_check_report import read_junit, read_memcheck, target_rows

SCRIPT = Path(gpu_check.__file__)


def test_dry_run_runs_the_plan_with_every_gpu_part_skipped(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-P", str(SCRIPT), "--out", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every GPU part was skipped" in proc.stdout
    res = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = {p["name"]: p for p in res["parts"]}
    assert res["dry_run"] and list(parts)[:3] == ["facts", "install", "plan"]
    assert parts["facts"]["status"] == "ok" and (tmp_path / "device.json").exists()
    # the plan check parsed every bench command line with worldkv's own parser
    assert parts["plan"]["status"] == "ok"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["problems"] == [] and {"offload", "reinsert", "overlap", "e2e", "compress"} <= set(plan["parsed"])
    # memcheck's test selection was collected (exit 5 would mean no cuda tests are left there)
    assert parts["memcheck"]["status"] == "ok" and "collected" in parts["memcheck"]["why"]
    for name in ("cuda-tests", "offload", "reinsert", "overlap", "e2e", "compress"):
        assert parts[name]["status"] == "skipped" and "dry run" in parts[name]["why"], parts[name]
    assert {r["verdict"] for r in res["targets"]} == {"not measured"} and len(res["targets"]) == 9
    assert "offload wan-1.3b / one contiguous pinned copy" in (tmp_path / "summary.txt").read_text()


def test_the_plan_is_sized_for_the_issue(tmp_path):
    plan = {p.name: p for p in build_plan("python3", tmp_path)}
    e2e = plan["e2e"].argv
    assert e2e[e2e.index("--num-chunks") + 1] == "40" and e2e[e2e.index("--preset") + 1] == "wan-1.3b"
    assert e2e[e2e.index("--dtype") + 1] == "bf16"
    assert set(e2e[e2e.index("--modes") + 1].split(",")) == {"full", "sliding", "worldkv", "reference-style"}
    token_bytes = 12 * 128 * 2  # one wan-1.3b token of one layer's K
    pages = [int(x) for x in gpu_check.WAN_PAGE_SIZES.split(",")]
    assert min(pages) * token_bytes <= 8 << 10 and max(pages) * token_bytes >= 2 << 20
    assert any(abs(p * token_bytes - (16 << 10)) <= 2 << 10 for p in pages)  # the 16 KiB target point
    assert all(p.timeout_s > 0 for p in plan.values())
    assert sum(p.timeout_s for p in plan.values() if p.name not in ("install", "connector")) <= 720
    assert "--json" in plan["offload"].argv and plan["install"].argv[-2:] == ["-e", str(gpu_check.REPO)]


def test_a_missing_bench_is_skipped_with_a_note(tmp_path):
    (tmp_path / "worldkv_connector" / "bench").mkdir(parents=True)
    (tmp_path / "worldkv_connector" / "bench" / "offload.py").write_text("")
    plan = {p.name: p for p in build_plan("python3", tmp_path / "out", repo=tmp_path)}
    assert plan["offload"].skip == ""
    assert "bench connector` does not exist" in plan["connector"].skip


def test_a_hanging_part_is_killed_at_its_timeout_and_the_rest_still_run(tmp_path):
    (tmp_path / "hang.json").write_text("{}")  # left by an earlier run
    parts = [Part("hang", [sys.executable, "-c", "import time; time.sleep(60)"], 1, gpu=False, outputs=("hang.json",)),
             Part("after", [sys.executable, "-c", "print('ran')"], 20, gpu=False),
             Part("gpu-only", [sys.executable, "-c", "raise SystemExit(3)"], 20)]
    res = run_plan(parts, tmp_path, dry=True, budget_s=60, say=lambda *a, **k: None)
    status = {p["name"]: p["status"] for p in res["parts"]}
    assert status == {"hang": "timed out after 1 s", "after": "ok", "gpu-only": "skipped"}
    assert "ran" in (tmp_path / "logs" / "after.log").read_text()
    assert not (tmp_path / "hang.json").exists() and "hang.json" not in res["files"]


def test_verdicts_from_bench_json_junit_and_sanitizer(tmp_path):
    def targets(what, measured):
        return {"targets": [{"name": f"{what} ours / contiguous pinned copy", "measured": measured},
                            {"name": f"{what} ours / per-fragment loop at 16 KiB", "measured": 7.0}]}
    (tmp_path / "offload.json").write_text(json.dumps(targets("offload", 0.95)))
    (tmp_path / "reinsert.json").write_text(json.dumps(targets("reinsert", 0.80)))
    (tmp_path / "overlap.json").write_text(json.dumps({"ratio": 1.02}))  # within 3 % of 1.03
    (tmp_path / "e2e.json").write_text(json.dumps({"comparisons": {"worldkv_vs_full_last_window": 3.1,
                                                                   "reference_style_over_worldkv_step_time": 1.2}}))
    (tmp_path / "cuda-tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
        '<testcase classname="t" name="c"/></testsuite></testsuites>')
    (tmp_path / "memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    parts = {"memcheck": {"status": "ok"}}
    rows = {r["target"]: r for r in target_rows(tmp_path, parts)}
    v = {k: r["verdict"] for k, r in rows.items()}
    assert v["offload wan-1.3b / one contiguous pinned copy"] == "met"
    assert v["reinsert wan-1.3b / one contiguous pinned copy"] == "not met"
    assert v["overlap: step with offload + reinsert / without"] == "within noise"
    assert v["e2e wan-1.3b: worldkv / full KV chunks/s at chunk 40"] == "met"
    assert v["e2e wan-1.3b: reference-style / worldkv step time (CPU bank)"] == "not met"
    assert v["every cuda test passes (failed + errors)"] == "not met"
    assert v["compute-sanitizer memcheck errors"] == "met"
    assert read_junit(tmp_path / "cuda-tests.xml")["failed_ids"] == ["t::b"]
    (tmp_path / "memcheck.log").write_text("========= Invalid __global__ read\n========= ERROR SUMMARY: 2 errors\n")
    assert read_memcheck(tmp_path / "memcheck.log") == 2
    assert read_memcheck(tmp_path / "absent.log") is None


def test_the_summary_reads_what_the_benches_write(tmp_path, capsys):
    """Tiny CPU runs of the benches the plan runs: every bench-fed target row finds its figure, so a
    renamed target or field cannot turn a GPU figure into "not measured" unnoticed."""
    from worldkv_connector.cli import main

    common = ("--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--threads", "1")
    runs = {"offload": ("--page-sizes", "16", "--chunks", "1"), "reinsert": ("--page-sizes", "16", "--k", "2",
                                                                         "--steps", "2"), "overlap": ()}
    for what, extra in runs.items():
        assert main(["bench", what, *common, *extra, "--json", str(tmp_path / f"{what}.json")]) == 0
    assert main(["bench", "e2e", "--preset", "tiny", "--num-chunks", "4", "--window", "2",
                 "--json", str(tmp_path / "e2e.json")]) == 0
    capsys.readouterr()
    rows = target_rows(tmp_path, {})
    fed = [r for r in rows if r["source"].endswith(".json")]
    assert len(fed) == 7 and all(isinstance(r["measured"], float) for r in fed), fed
