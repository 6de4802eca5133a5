"""``make gpu-check``: every CUDA test and GPU benchmark as one prepared, time-boxed run.

A lent GPU machine gives about 15 minutes, its start included, and one command at most 10; this
runs the whole verification in about 6. The plan, in order, each part a subprocess under its own
timeout (its process group is killed when it runs over) and all of them under ``--budget-s``:

  facts      nvidia-smi, driver CUDA, PCIe gen/width, torch/triton/cupy -> device.json
  install    ``pip install --no-deps --no-build-isolation -e .`` into this Python (on failure: a
             symlinked PYTHONPATH tree that maps kernels/, integration/, csrc/ as setup.py does)
  plan       every bench command line parsed by ``worldkv``'s own parser, every test path present
  cuda-tests every ``cuda``-marked test -> cuda-tests.xml (JUnit)
  memcheck   compute-sanitizer memcheck over the copy-kernel and batched-DMA tests -> memcheck.log
  offload, reinsert, overlap, e2e, compress, connector   ``worldkv bench ... --json`` at wan-1.3b
  summary    the table of the issue's targets (met / not met / within noise / not measured) and
             the paths of the JSON files -> gpu-check.json, summary.txt

Without CUDA (or with ``--dry-run``) the same plan runs with every GPU part skipped and saying so;
``facts`` and ``plan`` still run, so the command cannot rot (tests/test_gpu_check.py).
Output goes to ``--out``, else ``$OUT``, else ``out/gpu-check/``.

Run it as a script, ``python3 -P worldkv_connector/bench/gpu_check.py``: standard library only at
import time, because it runs before the package is installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Part", "build_plan", "run_plan", "main"]

REPO = Path(__file__).resolve().parents[2]
MAPPED = {"kernels": "kernels", "integration": "integration", "csrc": "csrc"}  # as setup.py's package_dir
# Wan-1.3B: 3 KiB per token of one layer's K, so these pages are 6 KiB .. 2 MiB fragments; 5 tokens
# is the ~16 KiB point of the per-fragment-loop target (1-token pages would add ~40 s for 3 KiB)
WAN_PAGE_SIZES = "2,5,21,85,341,683"
MEMCHECK_TESTS = ("tests/kernels/test_cuda_copy.py", "tests/test_transfer.py", "tests/test_transfer_paths.py",
                  "tests/test_cuda_batch.py")


def _sibling(name: str):
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _sibling("gpu_check_report")


@dataclass
class Part:
    """One step of the plan. ``argv`` runs on a GPU run; ``dry_argv`` (if any) instead on a dry run,
    else a GPU part is skipped there. ``skip`` set at plan time means: skipped, and why."""

    name: str
    argv: list[str]
    timeout_s: int
    gpu: bool = True
    dry_argv: list[str] | None = None
    outputs: tuple[str, ...] = ()
    skip: str = ""
    result: dict = field(default_factory=dict)


def _bench(py: str, out: Path, what: str, *flags: str) -> list[str]:
    return [py, "-m", "worldkv_connector.cli", "bench", what, *flags, "--json", str(out / f"{what}.json")]


def build_plan(py: str, out: Path, repo: Path = REPO) -> list[Part]:
    """The parts in run order, with the flags sized so the whole fits about 6 minutes on an H200."""
    me = [py, "-P", str(Path(__file__).resolve())]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda"]
    wan = ("--preset", "wan-1.3b", "--device", "cuda")
    parts = [
        Part("facts", [*me, "--facts", str(out / "device.json")], 30, gpu=False, outputs=("device.json",)),
        Part("install", [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(repo)], 120),
        Part("plan", [*me, "--check-plan", str(out / "plan.json")], 60, gpu=False),
        Part("cuda-tests", [*pytest, f"--junitxml={out / 'cuda-tests.xml'}", "tests", "integration"], 110,
             outputs=("cuda-tests.xml",)),
        Part("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--report-api-errors", "no",
                          "--log-file", str(out / "memcheck.log"), *pytest,
                          f"--junitxml={out / 'memcheck-tests.xml'}", *MEMCHECK_TESTS], 120,
             dry_argv=[py, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                       *MEMCHECK_TESTS], outputs=("memcheck.log", "memcheck-tests.xml")),
        Part("offload", _bench(py, out, "offload", *wan, "--page-sizes", WAN_PAGE_SIZES, "--chunks", "1",
                               "--repeats", "3", "--warmup", "1"), 60, outputs=("offload.json",)),
        Part("reinsert", _bench(py, out, "reinsert", *wan, "--page-sizes", WAN_PAGE_SIZES, "--k", "2",
                                "--steps", "4", "--repeats", "3", "--warmup", "1"), 60, outputs=("reinsert.json",)),
        Part("overlap", _bench(py, out, "overlap", *wan, "--repeats", "5", "--warmup", "2"), 45,
             outputs=("overlap.json",)),
        # triton attention: the torch reference would materialise [12, 4680, 187k] fp32 scores at chunk 40;
        # 48 GiB of pages hold 40 full-KV chunks (32 GiB) whatever an earlier mode left allocated
        Part("e2e", _bench(py, out, "e2e", "--preset", "wan-1.3b", "--device", "cuda", "--dtype", "bf16",
                           "--num-chunks", "40", "--window", "8", "--attention-backend", "triton",
                           "--kv-cache-memory", "48",
                           "--modes", "full,sliding,worldkv,reference-style"), 170, outputs=("e2e.json",)),
        Part("compress", _bench(py, out, "compress", *wan, "--repeats", "5"), 40, outputs=("compress.json",)),
        Part("connector", _bench(py, out, "connector", *wan), 60, outputs=("connector.json",)),
    ]
    for p in parts:
        if p.argv[:4] == [py, "-m", "worldkv_connector.cli", "bench"]:
            what = p.argv[4]
            if not (repo / "worldkv_connector" / "bench" / f"{what}.py").exists():
                p.skip = f"`worldkv bench {what}` does not exist on this branch"
    return parts


def _stage_pythonpath(repo: Path) -> str:
    """A tree whose ``worldkv_connector`` links the package's entries plus kernels/, integration/,
    csrc/ (setup.py's package_dir), for running without an install. Outside $OUT: links do not
    travel back from the device."""
    root = Path(tempfile.mkdtemp(prefix="worldkv-stage-"))
    pkg = root / "worldkv_connector"
    pkg.mkdir()
    for entry in (repo / "worldkv_connector").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        if not (pkg / name).exists():
            (pkg / name).symlink_to(repo / folder)
    return str(root)


def _resolve(argv: list[str]) -> list[str] | None:
    """argv with its program found on PATH or in the CUDA toolkit's bin; None if absent."""
    exe = shutil.which(argv[0]) or next((str(p) for p in (Path("/usr/local/cuda/bin") / argv[0],) if p.exists()), None)
    return [exe, *argv[1:]] if exe else None


def _run(part: Part, argv: list[str], timeout: float, env: dict, out: Path) -> dict:
    (out / "logs").mkdir(exist_ok=True)
    log = out / "logs" / f"{part.name}.log"
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(argv) + "\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: pytest workers, sanitizer children
            proc.wait()
            rc, status = None, f"timed out after {timeout:.0f} s"
    return {"status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": str(log)}


def run_plan(parts: list[Part], out: Path, *, dry: bool | None = None, budget_s: float,
             only: set[str] | None = None, say=print) -> dict:
    """Run the plan; returns the results dict written to ``gpu-check.json``. ``dry=None``: decided
    by the ``facts`` part (a dry run when torch sees no CUDA device)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stages: list[str] = []
    try:
        return _run_parts(parts, out, dry, budget_s, only, say, env, stages)
    finally:
        for stage in stages:
            shutil.rmtree(stage, ignore_errors=True)


def _run_parts(parts, out, dry, budget_s, only, say, env, stages) -> dict:
    t0 = time.monotonic()
    for i, p in enumerate(parts, 1):
        left = budget_s - (time.monotonic() - t0)
        argv = p.dry_argv if dry and p.dry_argv else p.argv
        if p.skip:
            p.result = {"status": "skipped", "why": p.skip}
        elif only is not None and p.name not in only and p.name != "facts":
            p.result = {"status": "skipped", "why": "not in --only"}
        elif dry and p.gpu and not p.dry_argv:
            p.result = {"status": "skipped", "why": "dry run: no CUDA device" if p.name != "install" else
                        "dry run: the package runs from a PYTHONPATH tree instead"}
        elif left < 5:
            p.result = {"status": "skipped", "why": f"out of the {budget_s:.0f} s budget"}
        elif (resolved := _resolve(argv)) is None:
            p.result = {"status": "skipped", "why": f"{argv[0]} not found"}
        else:
            say(f"[gpu-check] {i}/{len(parts)} {p.name} (timeout {min(p.timeout_s, left):.0f} s)", flush=True)
            for name in p.outputs:  # a part that fails this time must not report an earlier run's file
                (out / name).unlink(missing_ok=True)
            p.result = _run(p, resolved, min(p.timeout_s, left), env, out)
            if argv is p.dry_argv:
                p.result["why"] = "dry run: the GPU command was not run; its test selection was collected"
        if p.name == "facts" and dry is None:
            facts = _read_json(out / "device.json")
            dry = not facts.get("cuda_available")
            say(f"[gpu-check]   device: {facts.get('device') or 'no CUDA device'}, driver CUDA "
                f"{facts.get('driver_cuda')}, torch {facts.get('torch')}", flush=True)
        if p.name == "install" and p.result["status"] != "ok":
            # not installed (dry run, or pip failed): the parts import the package from a linked tree
            stages.append(_stage_pythonpath(REPO))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [stages[-1], env.get("PYTHONPATH")]))
            p.result["fallback"] = f"PYTHONPATH={env['PYTHONPATH']}"
        say(f"[gpu-check]   {p.name}: {p.result['status']}"
            + (f" in {p.result['seconds']} s" if "seconds" in p.result else "")
            + (f" ({p.result['why']})" if "why" in p.result else ""), flush=True)
    statuses = {p.name: p.result for p in parts}
    rows = report.target_rows(out, statuses)
    files = {name: str(out / name) for p in parts for name in p.outputs if (out / name).exists()}
    results = {"dry_run": dry, "seconds": round(time.monotonic() - t0, 1), "budget_s": budget_s,
               "parts": [{"name": p.name, "argv": shlex.join(p.argv), **p.result} for p in parts],
               "targets": rows, "files": files}
    (out / "gpu-check.json").write_text(json.dumps(results, indent=2))
    table = report.format_table(rows)
    (out / "summary.txt").write_text(table + "\n")
    say("\n" + table)
    say("\nfiles: " + ", ".join(f"{k} -> {v}" for k, v in files.items()))
    if dry:
        say("dry run (no CUDA device, or --dry-run): every GPU part was skipped (facts and the plan check ran); "
            "on a GPU machine `make gpu-check` runs them all")
    return results


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_plan(path: Path) -> int:
    """Parse every bench command of the plan with ``worldkv``'s parser; check the test paths."""
    from worldkv_connector.cli import build_parser

    parser, problems, checked = build_parser(), [], []
    for p in build_plan(sys.executable, Path("out")):
        if p.skip:
            continue
        if "worldkv_connector.cli" in p.argv:
            args = p.argv[p.argv.index("worldkv_connector.cli") + 1:]
            try:
                parser.parse_args(args)
                checked.append(p.name)
            except SystemExit:
                problems.append(f"{p.name}: worldkv rejects {shlex.join(args)}")
        for a in p.argv:
            if a.startswith("tests/") and not (REPO / a).exists():
                problems.append(f"{p.name}: {a} does not exist")
    path.write_text(json.dumps({"parsed": checked, "problems": problems}, indent=2))
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (default: $OUT if set, else out/gpu-check)")
    ap.add_argument("--dry-run", action="store_true", help="skip every GPU part even where CUDA is present")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock budget of the whole run; parts left over are skipped (default 420)")
    ap.add_argument("--only", help="comma-separated parts to run (e.g. e2e,memcheck for a rerun)")
    ap.add_argument("--print-plan", action="store_true", help="print the parts, their timeouts and commands, and exit")
    ap.add_argument("--facts", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--check-plan", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.facts:
        facts = report.device_facts(Path(args.facts).parent)
        Path(args.facts).write_text(json.dumps(facts, indent=2))
        print(json.dumps({k: facts.get(k) for k in ("device", "driver_cuda", "torch", "cuda_available")}))
        return 0
    if args.check_plan:
        return check_plan(Path(args.check_plan))
    if args.budget_s <= 0:
        ap.error(f"--budget-s {args.budget_s}: must be > 0")
    out = Path(args.out or os.environ.get("OUT") or REPO / "out" / "gpu-check")
    parts = build_plan(sys.executable, out)
    if args.print_plan:
        for p in parts:
            print(f"{p.name:<11} {p.timeout_s:>4} s  {'GPU' if p.gpu else 'any'}  "
                  + (f"skipped: {p.skip}" if p.skip else shlex.join(p.argv)))
        print(f"budget {args.budget_s:.0f} s; output {out}")
        return 0
    only = set(args.only.split(",")) if args.only else None
    unknown = sorted((only or set()) - {p.name for p in parts})
    if unknown:
        ap.error(f"--only {args.only}: unknown parts {unknown}; choose from {[p.name for p in parts]}")
    results = run_plan(parts, out, dry=True if args.dry_run else None, budget_s=args.budget_s, only=only)
    failed = [p["name"] for p in results["parts"] if p["status"] not in ("ok", "skipped")]
    if failed:
        print(f"gpu-check: parts that failed or timed out: {', '.join(failed)} (logs in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
