"""Facts and verdicts of ``make gpu-check`` (see gpu_check.py): device facts, the JUnit and
compute-sanitizer readers, and the table of the GPU targets (issue "GPU verification").

Standard library only at import time: the driver loads this file before the package is installed.
A target is ``met`` or ``not met`` only when its figure clears the goal by more than ``NOISE``
(3 %); closer than that it is ``within noise`` (rerun, more repeats), and without a figure it is
``not measured`` with the reason.
"""
from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

__all__ = ["device_facts", "read_junit", "read_memcheck", "target_rows", "format_table", "NOISE"]

NOISE = 0.03
_SMI_FIELDS = ("name", "driver_version", "memory.total", "pcie.link.gen.current", "pcie.link.gen.max",
               "pcie.link.width.current", "pcie.link.width.max", "compute_cap")


def _smi(out_dir: Path) -> dict:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"nvidia_smi": None, "why": "nvidia-smi not found on PATH"}
    facts: dict = {"nvidia_smi": smi}
    try:
        text = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
        (out_dir / "nvidia-smi.txt").write_text(text)
        q = subprocess.run([smi, f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        gpus = [dict(zip(_SMI_FIELDS, (v.strip() for v in line.split(",")))) for line in q.stdout.splitlines()
                if line.strip()]
        facts["gpus"] = gpus
        # the link trains down when idle: the max figures are the slot's, current ones may read lower
    except (OSError, subprocess.SubprocessError) as exc:
        facts["why"] = f"nvidia-smi failed: {exc}"
    return facts


def _driver_cuda_version() -> int | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    return v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 else None


def _python_facts() -> dict:
    facts: dict = {}
    try:
        import torch

        facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if facts["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            facts.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                         sms=p.multi_processor_count, devices=torch.cuda.device_count())
    except Exception as exc:  # noqa: BLE001 - record, never fail the facts part
        facts.update(cuda_available=False, torch_error=repr(exc))
    for mod in ("triton", "cupy", "numpy", "safetensors"):
        try:
            facts[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            facts[mod] = None
    return facts


def device_facts(out_dir: Path) -> dict:
    """nvidia-smi (name, driver, PCIe gen/width), the driver's CUDA version, torch/triton/cupy."""
    v = _driver_cuda_version()
    tools = {t: shutil.which(t) for t in ("nvcc", "compute-sanitizer", "ncu")}
    return {**_smi(out_dir), "driver_cuda": f"{v // 1000}.{v % 1000 // 10}" if v else None, **_python_facts(),
            "tools": tools}


def read_junit(path: Path) -> dict | None:
    """Counts of a pytest JUnit report: tests, failures, errors, skipped, passed, and failing ids."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_ids"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None][:50]
    return counts


def read_memcheck(path: Path) -> int | None:
    """compute-sanitizer's error count (its ``ERROR SUMMARY: N errors`` line), None if absent."""
    if not path.exists():
        return None
    found = re.findall(r"ERROR SUMMARY:\s+(\d+)\s+error", path.read_text(errors="replace"))
    return sum(int(n) for n in found) if found else None


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _verdict(measured: float | None, op: str, goal: float) -> str:
    if measured is None:
        return "not measured"
    margin = measured / goal - 1.0 if op == ">=" else 1.0 - measured / goal
    if abs(margin) <= NOISE:
        return "within noise"
    return "met" if margin > 0 else "not met"


def _bench_target(data: dict | None, prefix: str) -> float | None:
    for t in (data or {}).get("targets", []):
        if t.get("name", "").startswith(prefix):
            return t.get("measured")
    return None


def target_rows(out_dir: Path, parts: dict[str, dict]) -> list[dict]:
    """One row per issue target: name, goal, measured, verdict, source file (or why not measured)."""
    rows: list[dict] = []

    def add(name: str, op: str, goal: float, measured: float | None, source: str, why: str = "") -> None:
        part = parts.get(source.split(".")[0], {})
        status = part.get("why") or part.get("status", "not run")
        note = why or ("" if measured is not None else f"part {source.split('.')[0]}: {status}")
        rows.append({"target": name, "goal": f"{op} {goal:g}", "measured": measured,
                     "verdict": _verdict(measured, op, goal), "source": source, "note": note})

    for what in ("offload", "reinsert"):
        data = _load(out_dir / f"{what}.json")
        add(f"{what} wan-1.3b / one contiguous pinned copy", ">=", 0.9,
            _bench_target(data, f"{what} ours / contiguous"), f"{what}.json")
        add(f"{what} / per-fragment cudaMemcpyAsync loop at 16 KiB", ">=", 5.0,
            _bench_target(data, f"{what} ours / per-fragment loop"), f"{what}.json")
    ov = _load(out_dir / "overlap.json")
    add("overlap: step with offload + reinsert / without", "<=", 1.03, (ov or {}).get("ratio"), "overlap.json")
    comp = (_load(out_dir / "e2e.json") or {}).get("comparisons", {})
    add("e2e wan-1.3b: worldkv / full KV chunks/s at chunk 40", ">=", 2.5,
        comp.get("worldkv_vs_full_last_window"), "e2e.json")
    add("e2e wan-1.3b: reference-style / worldkv step time (CPU bank)", ">=", 1.5,
        comp.get("reference_style_over_worldkv_step_time"), "e2e.json")
    junit = read_junit(out_dir / "cuda-tests.xml")
    if junit and junit["tests"]:
        bad = junit["failures"] + junit["errors"]
        add("every cuda test passes (failed + errors)", "<=", 0, None, "cuda-tests.xml")
        rows[-1].update(measured=bad, verdict="met" if bad == 0 and junit["passed"] else "not met",
                        note=f"{junit['passed']} passed, {bad} failed, {junit['skipped']} skipped")
    else:
        add("every cuda test passes", "<=", 0, None, "cuda-tests.xml")
    errors = read_memcheck(out_dir / "memcheck.log")
    add("compute-sanitizer memcheck errors", "<=", 0, None, "memcheck.log")
    if errors is not None:
        ran = parts.get("memcheck", {}).get("status") in ("ok", "failed")
        rows[-1].update(measured=errors, verdict="met" if errors == 0 and ran else "not met", note="")
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of ``target_rows``."""
    head = ("target", "goal", "measured", "verdict", "source / note")
    body = [(r["target"], r["goal"], "-" if r["measured"] is None else f"{r['measured']:.3g}", r["verdict"],
             r["source"] + (f" ({r['note']})" if r["note"] else "")) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
