"""Load path of the worker half: copy retrieved chunks from the bank into their new pages, one job
per layer, and (``rope_correction``) move resident chunks' keys in time.

RoPE correction rotates a chunk's keys from their original position to the step's target, every
time: a chunk whose pages already hold rotated keys (``RopeDelta.reload``) first gets its K rows
copied back from the bank (in the same per-layer job), so rotations never accumulate in bf16.

``begin_step`` pins the step's bank entries, plans every layer's (bank rows -> page) copies once
as address arrays (``transfer.plan_layer_copies``: chunk x K/V x page fragments, contiguous runs
merged) and enqueues one job per layer (``TransferEngine.submit_layers``), so layer ``i``'s copy
overlaps the compute of earlier layers; ``wait_layer`` orders the compute stream after that layer's
job only. A retrieved chunk of T'
tokens fills its pages in order: page ``i`` gets rows ``[i*page_size, (i+1)*page_size)``, the last
page partial. A failed load (job error, missing entry, exception) marks the chunk's pages as load
errors for the engine, which then leaves the chunk out of the step's window.
"""
from __future__ import annotations

import logging

import torch

from worldkv_connector.bank import Bank
from worldkv_connector.connector.meta import ChunkKey, LoadSpec, RopeDelta
from worldkv_connector.metrics import ConnectorMetrics
from worldkv_connector.transfer import PagePools, TransferEngine, TransferJob, page_lens_of, plan_layer_copies

__all__ = ["LoadPath"]

logger = logging.getLogger(__name__)


class LoadPath:
    """Bank -> page loads and RoPE deltas of one worker; not thread-safe."""

    def __init__(self, bank: Bank, metrics: ConnectorMetrics, *, page_size: int, device: torch.device) -> None:
        self.bank = bank
        self.metrics = metrics
        self.page_size = page_size
        self.device = device
        self.error_pages: set[int] = set()  # pages of this step's failed loads
        self.failed: list[ChunkKey] = []  # since the last collect
        self.done: list[ChunkKey] = []
        self._layer_jobs: dict[int, TransferJob] = {}
        self._jobs: dict[int, list[LoadSpec]] = {}  # job id -> loads it copies
        self._outstanding: dict[ChunkKey, int] = {}  # key -> its load jobs not yet observed done (= its pins)
        self._ropes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rotated: set[int] = set()
        self.resident_indices: dict[ChunkKey, torch.Tensor] = {}  # kept ids of chunks in the hot set
        self._pools: PagePools | None = None
        # merging compressions: per layer [num_pages, page_size] fp32 logit bias of every page slot
        self.logit_bias: dict[str, torch.Tensor] | None = None
        self.require_counts = False  # merged entries must bring their counts (else wrong attention mass)

    # --- per step -------------------------------------------------------------------------------
    def begin_step(self, loads: list[LoadSpec], ropes: list[RopeDelta], layer_names: list[str],
                   kv_caches: dict[str, torch.Tensor], transfer: TransferEngine) -> None:
        """Enqueue this step's loads (one job per layer) and plan its RoPE deltas."""
        self.error_pages = set()
        self._layer_jobs, self._rotated = {}, set()
        live: list[LoadSpec] = []
        bad: list[LoadSpec] = []
        for spec in loads:
            entry = self.bank.get(spec.key)
            if entry is None or not entry.ready or entry.num_tokens != spec.num_tokens or (
                    self.require_counts and entry.counts is None):
                # evicted or rewritten since it was planned: never load stale rows; a merged entry without
                # its counts (e.g. from a bank saved without them) would attend with the wrong mass
                bad.append(spec)
                self.metrics.load_errors += 1
                continue
            self.bank.touch(spec.key)  # a retrieval: young end of LRU
            if entry.indices is not None:
                self.resident_indices[spec.key] = entry.indices
            live.append(spec)
        k_only = [False] * len(live)
        for r in ropes:
            if not r.reload:
                continue
            # the pages hold keys already rotated away from their original position: restore K
            # from the bank copy so the step's rotation starts from the original (no bf16 drift)
            spec = LoadSpec(r.key, r.page_ids, sum(r.page_lens))
            entry = self.bank.get(r.key)
            if entry is None or not entry.ready or entry.num_tokens != spec.num_tokens:
                bad.append(spec)  # the original is gone: the chunk leaves the window, never drifts
                self.metrics.load_errors += 1
                continue
            live.append(spec)
            k_only.append(True)
        if live and self.logit_bias is not None:
            self._write_bias(live, layer_names)
        if live:
            self._submit(live, bad, layer_names, kv_caches, transfer, k_only)
        for spec in bad:
            self.error_pages.update(spec.page_ids)
            self.failed.append(spec.key)
            self.resident_indices.pop(spec.key, None)
        if bad:
            # one warning per step, not per layer: the engine drops these chunks from the window
            logger.warning("KV load failed for chunk(s) %s: left out of this step's window", [s.key for s in bad])
        self._ropes = None
        if ropes:
            pages = [p for r in ropes for p in r.page_ids]
            lens = [n for r in ropes for n in r.page_lens]
            deltas = [r.delta for r in ropes for _ in r.page_ids]
            self._ropes = tuple(torch.tensor(x, dtype=torch.int64, device=self.device) for x in (pages, deltas, lens))

    def _submit(self, live: list[LoadSpec], bad: list[LoadSpec], layer_names: list[str],
                kv_caches: dict[str, torch.Tensor], transfer: TransferEngine, k_only: list[bool]) -> None:
        """Plan the step's copies once (address arrays, all layers) and submit one job per layer.
        k_only[i]: copy only the K rows of live[i] (a RoPE restore of a resident chunk)."""
        try:
            plans = plan_layer_copies(
                self._page_pools(layer_names, kv_caches), [self.bank.view(spec.key) for spec in live],
                [spec.page_ids for spec in live], [page_lens_of(spec.num_tokens, self.page_size) for spec in live],
                to_slot=False, k_only=k_only,
            )
        except Exception as exc:  # noqa: BLE001 - e.g. a page id outside the pool: load errors, not a failed step
            self.metrics.load_errors += 1
            bad.extend(live)
            logger.debug("loads could not be planned: %s: %s", type(exc).__name__, exc)
            return
        keys = [spec.key for spec in live]
        pin, outstanding = self.bank.pin, self._outstanding
        try:
            # one job per layer; each waits for all work queued on the compute stream, so it never
            # overwrites pages an earlier kernel still reads
            jobs = transfer.submit_layers("load", plans, tags=[("load", layer) for layer in range(len(layer_names))])
        except Exception as exc:  # noqa: BLE001 - reported as load errors, never fails the step
            self.metrics.load_errors += len(layer_names)  # no jobs: record_job will not count them
            bad.extend(s for s in live if s not in bad)
            logger.debug("loads could not be submitted: %s: %s", type(exc).__name__, exc)
            return
        for layer, job in enumerate(jobs):
            for key in keys:
                # one pin per job reading the entry (it must not be evicted or reused under the
                # copy); added, not reset: a job of an earlier step may still read it
                pin(key)
                outstanding[key] = outstanding.get(key, 0) + 1
            self._jobs[job.job_id] = live
            self._layer_jobs[layer] = job
            if job.error is not None:
                bad.extend(s for s in live if s not in bad)

    def _write_bias(self, live: list[LoadSpec], layer_names: list[str]) -> None:
        """log(count) of each loaded token into its page slots (0 for unmerged chunks: pages are reused)."""
        ps = self.page_size
        for spec in live:
            counts = self.bank.get(spec.key).counts  # [L, T'] fp32 or None
            for layer, name in enumerate(layer_names):
                bias = self.logit_bias[name]
                row = None if counts is None else counts[layer].log().to(bias.device)
                for i, page in enumerate(spec.page_ids):
                    n = min(ps, spec.num_tokens - i * ps)
                    if row is None:
                        bias[page, :n] = 0.0
                    else:
                        bias[page, :n] = row[i * ps : i * ps + n]

    def _page_pools(self, layer_names: list[str], kv_caches: dict[str, torch.Tensor]) -> PagePools:
        """The registered pools, checked once and reused while the same tensors are registered."""
        pools = [kv_caches[name] for name in layer_names]
        if self._pools is None or len(self._pools.layers) != len(pools) \
                or any(a is not b for a, b in zip(self._pools.layers, pools)):
            self._pools = PagePools(pools)
        return self._pools

    def wait_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        """Order the compute stream after layer ``layer``'s load, then apply the step's RoPE deltas
        to that layer's K pages (once per step). kv_layer: [2, num_pages, page_size, H, D]."""
        job = self._layer_jobs.pop(layer, None)
        if job is not None and job.end_event is not None and not job.done():
            # the attention kernels must see the loaded rows: a device-side wait, the host runs on
            # (a CPU job has no event: its copy ran at submit, even if its report is held back)
            torch.cuda.current_stream(self.device).wait_event(job.end_event)
        if self._ropes is not None and layer not in self._rotated:
            self._rotated.add(layer)
            pages, deltas, lens = self._ropes
            if kv_layer.device.type == "cuda":
                from worldkv_connector.kernels.rope_delta import rope_delta_

                rope_delta_(kv_layer[0], pages, deltas, lens, validate=False)
            else:
                from worldkv_connector.kernels.rope_delta import rope_delta_torch

                rope_delta_torch(kv_layer[0], pages, deltas, lens)

    # --- completion -----------------------------------------------------------------------------
    def on_job(self, job: TransferJob) -> None:
        """A load job finished: drop its pins; a key is done once no job of its reads it."""
        for spec in self._jobs.pop(job.job_id, ()):
            if job.error is not None and spec.key not in self.failed:
                self.failed.append(spec.key)
                self.resident_indices.pop(spec.key, None)
            if spec.key in self.bank:
                self.bank.unpin(spec.key)
            n = self._outstanding.get(spec.key, 0) - 1
            if n > 0:
                self._outstanding[spec.key] = n
                continue
            self._outstanding.pop(spec.key, None)
            if spec.key not in self.failed:
                self.done.append(spec.key)

    def collect(self) -> tuple[list[ChunkKey], list[ChunkKey]]:
        """(loads done, loads failed) since the last call."""
        done, failed = self.done, self.failed
        self.done, self.failed = [], []
        return done, failed

    def release(self, keys: list[ChunkKey]) -> None:
        """Chunks that left the hot set: forget their kept ids."""
        for key in keys:
            self.resident_indices.pop(key, None)
