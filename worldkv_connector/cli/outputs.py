"""Outputs of ``worldkv generate``: checked before the run, written as it goes, never lost.

``RunOutputs`` takes the paths of ``--json``, ``--plot`` and ``--output``. Before any work it creates
their parent directories and checks each can be written (the JSON file is written at once, empty
and marked incomplete). During the run it keeps only what the outputs need: compact per-step
timings for the summary, the per-chunk records as JSON text when ``--json`` asks for them, and the
first session's step times for ``--plot``. The JSON file is rewritten atomically every few seconds
and when the run ends, however it ends (finished, interrupted, failed), with ``"complete"`` and
``"stopped"`` saying which. Disk errors raise ``OutputError`` naming the flag and the path.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

__all__ = ["OutputError", "RunOutputs", "StepStats", "chunk_record", "summarize", "summary_table", "prepare_path"]

REWRITE_SECONDS = 2.0  # the JSON file is rewritten at most this often while the run goes


class OutputError(ValueError):
    """An output cannot be written (missing permission, full disk, a directory in the way)."""


def prepare_path(flag: str, path: str, suffix: str | None = None) -> Path:
    """Check an output path before the run: suffix, not a directory, parent created and writable."""
    if not path:
        raise OutputError(f"{flag} {path!r}: expected a file path")
    if suffix is not None and not path.endswith(suffix):
        raise OutputError(f"{flag} {path}: expected a {suffix} path")
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{flag} {path}: is a directory, expected a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot create its directory {p.parent} ({exc.strerror or exc})") from None
    if not os.access(p.parent, os.W_OK):
        raise OutputError(f"{flag} {path}: the directory {p.parent} is not writable")
    return p


def write_atomic(flag: str, path: Path, write) -> None:
    """``write(file_object)`` into a temporary file beside ``path``, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OutputError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None


def chunk_record(r) -> dict:
    """The JSON record of one ChunkResult."""
    rec = {
        "session": r.session_id, "index": r.chunk_index, "step": r.step,
        "step_seconds": r.step_seconds, "resident_kv_bytes": r.resident_kv_bytes,
        "pose": np.asarray(r.pose).tolist(), "retrieved": [int(c) for c in r.retrieved],
    }
    if r.attention_recall is not None:
        rec["attention_recall"] = list(r.attention_recall)
        rec["attention_recall_mean"] = r.attention_recall_mean
    return rec


class StepStats:
    """What the summary needs, per engine step: (seconds, chunks); and the last resident KV."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.counts: list[int] = []
        self._last_step: int | None = None
        self.chunks = 0
        self.resident_last = 0

    def add(self, step: int, step_seconds: float, resident_kv_bytes: int) -> None:
        if step != self._last_step:
            self._last_step = step
            self.seconds.append(float(step_seconds))
            self.counts.append(0)
        self.counts[-1] += 1
        self.chunks += 1
        self.resident_last = int(resident_kv_bytes)

    @classmethod
    def of_records(cls, records: list[dict]) -> "StepStats":
        stats = cls()
        for r in sorted(records, key=lambda r: r["step"]):
            stats.add(r["step"], r["step_seconds"], r["resident_kv_bytes"])
        return stats


def summarize(records: "list[dict] | StepStats", metrics: dict) -> dict:
    """Summary of a run: chunks/s over all steps and over the last quarter of the steps, memory,
    and the bank (its peak, and what it held before sessions ended and freed their entries)."""
    stats = records if isinstance(records, StepStats) else StepStats.of_records(records)
    secs, counts = stats.seconds, stats.counts
    q = max(1, len(secs) // 4)
    connector = metrics.get("connector") or {}
    before = metrics.get("connector_before_session_end") or connector
    return {
        "chunks": stats.chunks,
        "steps": len(secs),
        "chunks_per_s": sum(counts) / sum(secs) if sum(secs) else 0.0,
        "chunks_per_s_last_quarter": sum(counts[-q:]) / sum(secs[-q:]) if sum(secs[-q:]) else 0.0,
        "resident_kv_bytes_last": stats.resident_last,
        "peak_resident_kv_bytes": metrics["peak_resident_kv_bytes"],
        "peak_pages": metrics["peak_pages"],
        "num_pages": metrics["num_pages"],
        "bank_bytes": connector.get("bank_bytes"),
        "bank_peak_bytes": connector.get("bank_peak_bytes"),
        "bank_bytes_before_session_end": before.get("bank_bytes"),
        "bank_entries_before_session_end": before.get("bank_entries"),
    }


def summary_table(title: str, summary: dict, connector: dict | None) -> str:
    mib = 1 << 20
    lines = [title, "-" * len(title)]
    rows = [
        ("chunks generated", f"{summary['chunks']}"),
        ("chunks/s (all steps)", f"{summary['chunks_per_s']:.2f}"),
        ("chunks/s (last quarter)", f"{summary['chunks_per_s_last_quarter']:.2f}"),
        ("resident KV, last step", f"{summary['resident_kv_bytes_last'] / mib:.2f} MiB"),
        ("resident KV, peak", f"{summary['peak_resident_kv_bytes'] / mib:.2f} MiB"),
        ("pages, peak / total", f"{summary['peak_pages']} / {summary['num_pages']}"),
    ]
    if summary.get("attention_recall_chunks") is not None:
        for key, label in (("attention_recall_mean", "attention recall, past the window"),
                           ("attention_recall_revisit_mean", "attention recall, revisit chunks")):
            value = summary.get(key)
            count = summary["attention_recall_chunks" if key == "attention_recall_mean" else "revisit_chunks"]
            rows.append((label, "n/a (no such chunk)" if value is None else f"{value:.3f} over {count} chunks"))
    if connector is not None:
        before, entries = summary.get("bank_bytes_before_session_end"), summary.get("bank_entries_before_session_end")
        rows.append(("bank before sessions ended", "n/a" if before is None else f"{before / mib:.2f} MiB ({entries} entries)"))
        for key, label in (("bank_peak_bytes", "bank peak"), ("bank_bytes", "bank at the end (after sessions freed)")):
            bank = summary.get(key)
            rows.append((label, "n/a" if bank is None else f"{bank / mib:.2f} MiB"))
        for k, v in sorted(connector.items()):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("bank_bytes", "bank_peak_bytes"):
                rows.append((f"connector {k}", f"{v:.4g}" if isinstance(v, float) else str(v)))
    width = max(len(k) for k, _ in rows)
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _plot(path: Path, index: list[int], step_ms: list[float], resident_mib: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(index, step_ms, color="tab:blue", label="step time")
    ax.set_xlabel("chunk index")
    ax.set_ylabel("step time (ms)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(index, resident_mib, color="tab:red", label="resident KV")
    ax2.set_ylabel("resident KV (MiB)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class RunOutputs:
    """The outputs of one run (see the module docstring). ``json_path`` / ``plot_path``: None for none."""

    def __init__(self, json_path: str | None, plot_path: str | None, header: dict | None = None):
        self.json_path = None if json_path is None else prepare_path("--json", json_path)
        self.plot_path = None if plot_path is None else prepare_path("--plot", plot_path, ".png")
        self.header = dict(header or {})
        self.stats = StepStats()
        self._records: list[str] = []  # JSON text of each record (--json only)
        self._plot_session: str | None = None
        self._plot: tuple[list[int], list[float], list[float]] = ([], [], [])
        self._written = time.monotonic()
        if self.json_path is not None:
            self.write_json({}, {}, complete=False, stopped="running")  # fails now, not after the run

    def add(self, result) -> None:
        """Take one ChunkResult (and rewrite the JSON file when it is due)."""
        self.stats.add(result.step, result.step_seconds, result.resident_kv_bytes)
        if self.json_path is not None:
            self._records.append(json.dumps(chunk_record(result), default=float))
        if self.plot_path is not None:
            if self._plot_session is None:
                self._plot_session = result.session_id
            if result.session_id == self._plot_session:
                self._plot[0].append(result.chunk_index)
                self._plot[1].append(result.step_seconds * 1e3)
                self._plot[2].append(result.resident_kv_bytes / (1 << 20))
        if self.json_path is not None and time.monotonic() - self._written >= REWRITE_SECONDS:
            self.write_json({}, {}, complete=False, stopped="running")

    def write_json(self, summary: dict, metrics: dict, *, complete: bool, stopped: str | None) -> None:
        if self.json_path is None:
            return
        head = dict(self.header, complete=complete, stopped=stopped, summary=summary, metrics=metrics)
        text = json.dumps(head, indent=2, default=float)

        def write(tmp: Path) -> None:
            with open(tmp, "w") as fh:
                fh.write(text[:-2] + ',\n  "records": [\n    ')  # the header object, still open
                fh.write(",\n    ".join(self._records))
                fh.write("\n  ]\n}\n")

        write_atomic("--json", self.json_path, write)
        self._written = time.monotonic()

    def write_plot(self, title: str) -> None:
        if self.plot_path is None or not self._plot[0]:
            return
        try:
            _plot(self.plot_path, *self._plot, title)
        except OSError as exc:
            raise OutputError(f"--plot {self.plot_path}: cannot write ({exc.strerror or exc})") from None


def save_latents(flag: str, path: Path, tensors: dict, metadata: dict) -> None:
    """Save ``{session id: [num_chunks, F, C, Hl, Wl]}`` as safetensors (atomically)."""
    from safetensors.torch import save_file

    write_atomic(flag, path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
