"""Connector counters: what was moved, retrieved and compressed, for logs and Prometheus.

Plain integers updated by the connector (no locks: one worker thread owns a ``ConnectorMetrics``);
workers' metrics are combined with ``merge``. ``to_prometheus`` renders the text exposition with
every name prefixed ``worldkv_``; ``collector()`` plugs live values into a server's registry.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

__all__ = ["ConnectorMetrics"]

# (field, help) of the monotonically increasing counters
_COUNTERS = (
    ("bytes_stored", "Bytes copied from KV pages into the bank"),
    ("bytes_loaded", "Bytes copied from the bank into KV pages"),
    ("store_jobs", "Store (pages -> bank) transfer jobs"),
    ("load_jobs", "Load (bank -> pages) transfer jobs"),
    ("retrieval_hits", "Retrieved chunks already resident on the GPU (no copy needed)"),
    ("retrieval_misses", "Retrieved chunks that had to be loaded from the bank"),
    ("chunks_banked", "Chunks written to the bank"),
    ("tokens_before_compression", "Tokens per layer of banked chunks before compression"),
    ("tokens_after_compression", "Tokens per layer of banked chunks after compression"),
    ("load_errors", "Failed load jobs"),
    ("store_errors", "Failed store jobs"),
)
# (field, help) of the gauges: current values, summed over workers by merge()
_GAUGES = (
    ("bank_bytes", "Bytes held by the bank"),
    ("bank_entries", "Entries held by the bank"),
    ("bank_peak_bytes", "Most bytes the bank has held (sessions' entries are freed when they end)"),
)


@dataclass
class ConnectorMetrics:
    """Counters of one connector worker (gauges: ``bank_bytes``, ``bank_entries``)."""

    bytes_stored: int = 0
    bytes_loaded: int = 0
    store_jobs: int = 0
    load_jobs: int = 0
    retrieval_hits: int = 0
    retrieval_misses: int = 0
    chunks_banked: int = 0
    tokens_before_compression: int = 0
    tokens_after_compression: int = 0
    load_errors: int = 0
    store_errors: int = 0
    bank_bytes: int = 0
    bank_entries: int = 0
    bank_peak_bytes: int = 0  # high-water mark of bank_bytes
    copy_paths: dict[str, int] = field(default_factory=dict)  # transfer jobs per copy path
    # registries this object's collector is registered with (so repeated exports don't clash)
    _registries: Any = field(default_factory=weakref.WeakSet, init=False, repr=False, compare=False)

    # --- derived ---------------------------------------------------------------------------------
    @property
    def compression_ratio(self) -> float:
        """Tokens before over tokens after compression (2.0 = the bank holds twice the history);
        1.0 before anything was banked."""
        if self.tokens_after_compression == 0:
            return 1.0
        return self.tokens_before_compression / self.tokens_after_compression

    @property
    def retrieval_hit_rate(self) -> float:
        total = self.retrieval_hits + self.retrieval_misses
        return self.retrieval_hits / total if total else 0.0

    # --- updates ---------------------------------------------------------------------------------
    def record_chunk(self, tokens_before: int, tokens_after: int) -> None:
        """One chunk banked with ``tokens_before`` tokens per layer compressed to ``tokens_after``."""
        if not 0 < tokens_after <= tokens_before:
            raise ValueError(
                f"record_chunk: expected 0 < tokens_after <= tokens_before, got {tokens_after} and {tokens_before}"
            )
        self.chunks_banked += 1
        self.tokens_before_compression += tokens_before
        self.tokens_after_compression += tokens_after

    def record_job(self, job: Any) -> None:
        """Account one finished ``TransferJob`` (kind, nbytes, path, error)."""
        if job.kind not in ("store", "load"):
            raise ValueError(f"record_job: job.kind={job.kind!r}, expected 'store' or 'load'")
        if job.kind == "store":
            self.store_jobs += 1
            self.bytes_stored += job.nbytes
            self.store_errors += job.error is not None
        else:
            self.load_jobs += 1
            self.bytes_loaded += job.nbytes
            self.load_errors += job.error is not None
        self.copy_paths[job.path] = self.copy_paths.get(job.path, 0) + 1

    def set_bank(self, stats: dict) -> None:
        """Refresh the bank gauges from ``Bank.stats()``."""
        self.bank_bytes, self.bank_entries = int(stats["bytes_used"]), int(stats["entries"])
        self.bank_peak_bytes = max(self.bank_peak_bytes, self.bank_bytes)

    def merge(self, other: "ConnectorMetrics") -> "ConnectorMetrics":
        """Add ``other``'s counters (and gauges) into this one, e.g. over workers. Returns self."""
        if not isinstance(other, ConnectorMetrics):
            raise TypeError(f"merge: expected ConnectorMetrics, got {type(other).__name__}")
        for name, _ in _COUNTERS + _GAUGES:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for path, n in other.copy_paths.items():
            self.copy_paths[path] = self.copy_paths.get(path, 0) + n
        return self

    # --- export ----------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["copy_paths"] = dict(self.copy_paths)
        out["compression_ratio"] = self.compression_ratio
        out["retrieval_hit_rate"] = self.retrieval_hit_rate
        return out

    def collector(self) -> "_Collector":
        """A prometheus_client collector reading this object's live values at each scrape."""
        return _Collector(self)

    def to_prometheus(self, registry: Any = None) -> str:
        """Prometheus text exposition of these metrics (names prefixed ``worldkv_``).

        registry: a ``prometheus_client.CollectorRegistry`` to register with (once) and render;
        None renders from a fresh registry, so repeated calls never clash.
        """
        from prometheus_client import CollectorRegistry, generate_latest

        if registry is None:
            registry = CollectorRegistry()
        if registry not in self._registries:
            registry.register(self.collector())
            self._registries.add(registry)
        return generate_latest(registry).decode("utf-8")


class _Collector:
    def __init__(self, metrics: ConnectorMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self._m
        for name, help_text in _COUNTERS:
            yield CounterMetricFamily(f"worldkv_{name}", help_text, value=getattr(m, name))
        for name, help_text in _GAUGES:
            yield GaugeMetricFamily(f"worldkv_{name}", help_text, value=getattr(m, name))
        yield GaugeMetricFamily("worldkv_compression_ratio", "Tokens before / after compression", value=m.compression_ratio)
        paths = CounterMetricFamily("worldkv_copy_jobs", "Transfer jobs per copy path", labels=["path"])
        for path, n in sorted(m.copy_paths.items()):
            paths.add_metric([path], n)
        yield paths

    def describe(self) -> Iterator[Any]:
        # names are known up front: lets the registry detect clashes without a collect()
        return self.collect()
