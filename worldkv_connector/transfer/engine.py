"""The transfer engine: every bank <-> page copy is a job on a pooled stream (STYLE §6).

A job is a list of (src, dst) tensor pairs. Pairs whose bytes follow each other in both source and
destination memory are merged into one run first: batched DMA collapses for fragments under about
28 KiB and every descriptor costs CPU time, so fewer, larger runs are what makes PCIe bandwidth
reachable (DESIGN §2). On CUDA each job then picks its path (``paths.choose_path``) from the median
run size: below ``kernel_threshold_bytes`` the SM copy kernel (``worldkv_connector.transfer.cuda_copy``, when
CuPy is there and the host memory is mapped), otherwise one ``cuMemcpyBatchAsync`` (driver >= 12.8),
else a loop of async copies. On the CPU the copies run synchronously and a job is done when
``submit`` returns. ``submit_plan`` takes a ``FragmentPlan`` of addresses planned with numpy and
``submit_layers`` a step's ``plan_layer_copies`` plan, one job per layer (the connector's load
path); ``submit`` takes tensor pairs (a few large copies, the per-page baseline of ``bench connector``).
Completion is polled with ``event.query()``, never waited on unless asked. The engine is not
thread-safe: one worker thread drives it.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from worldkv_connector.checks import check_int
from worldkv_connector.transfer import cuda_copy
from worldkv_connector.transfer.cuda_batch import BatchMemcpy, resolve_batch_memcpy
from worldkv_connector.transfer.fragments import (
    FragmentPlan, copy_runs_by_view, host_copy_runs, merge_fragment_arrays, translate_runs,
)
from worldkv_connector.transfer.layer_plan import LayerPlans
from worldkv_connector.transfer.paths import (
    DEFAULT_KERNEL_THRESHOLD, PATHS, PathOptions, choose_path, host_device_pointers, kernel_fragments,
    median_run_bytes,
)
from worldkv_connector.transfer.runs import check_and_plan, copy_runs, Run

__all__ = ["TransferEngine", "TransferJob"]

logger = logging.getLogger(__name__)

KINDS = ("store", "load")


@dataclass(eq=False)
class TransferJob:
    """One submitted copy. ``nbytes`` is the payload; ``num_fragments`` the runs after merging.

    ``finished_at`` is when the engine observed completion (``submit`` on the CPU; ``poll``/``wait``
    on CUDA). Once a job has been reported its events go back to the pool: waiting on them later is
    harmless (it can only wait for a later point) but no longer needed.
    """

    job_id: int
    kind: str
    nbytes: int
    num_fragments: int
    path: str  # "cpu-sync" | "dma-batch" | "dma-loop" | "sm-kernel" (see paths.py)
    tag: Any = None
    stream: Any = None
    start_event: Any = None
    end_event: Any = None
    error: str | None = None
    submitted_at: float = 0.0
    finished_at: float | None = None
    num_pairs: int = 0  # fragments before merging
    _finished: bool = field(default=False, repr=False)
    # holds the source and destination tensors alive until the copy has run: the caller may drop
    # a staging buffer right after submit, and its memory must not be reused under the DMA
    _keep: tuple = field(default=(), repr=False)

    def done(self) -> bool:
        if self._finished or self.end_event is None:
            return True
        return bool(self.end_event.query())


class TransferEngine:
    """Runs copy jobs between the bank and KV pages.

    device: where the pages live; "cpu" copies synchronously. num_streams: copy streams pooled on
    CUDA (jobs round-robin over them). batch_dma: use ``cuMemcpyBatchAsync``; None = when the
    driver has it (CUDA >= 12.8), True = require it. sm_kernel: use the SM copy kernel for jobs of
    small runs; None = when CUDA and CuPy are there, True = require it. kernel_threshold_bytes:
    median merged-run size under which a job takes the kernel (``WorldKVConfig.
    copy_kernel_threshold_bytes``; 0 = never).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        num_streams: int = 2,
        batch_dma: bool | None = None,
        sm_kernel: bool | None = None,
        kernel_threshold_bytes: int = DEFAULT_KERNEL_THRESHOLD,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"TransferEngine device={device!r}: expected 'cpu' or a cuda device")
        self.num_streams = check_int("TransferEngine num_streams", num_streams, 1, 64)
        # validates the threshold before any CUDA resource is made
        self.options = PathOptions(self.device.type, kernel_threshold_bytes=kernel_threshold_bytes)
        kernel = False
        self._ids = itertools.count(1)
        self._inflight: list[TransferJob] = []
        self._reported: list[TransferJob] = []  # finished, not yet returned by poll()
        self._events: list[Any] = []
        self._streams: list[Any] = []
        self._next_stream = 0
        self._batch: BatchMemcpy | None = None
        self._warned = False
        self._closed = False
        self._stats = {"bytes_stored": 0, "bytes_loaded": 0, "jobs": 0, "store_jobs": 0, "load_jobs": 0,
                       "fragments": 0, "merged_fragments": 0, "errors": 0, "busy_s": 0.0}
        self._paths = dict.fromkeys(PATHS, 0)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"TransferEngine device={device!r} needs CUDA: torch.cuda.is_available() is False")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._streams = [torch.cuda.Stream(self.device) for _ in range(num_streams)]
            if batch_dma is not False:
                self._batch = resolve_batch_memcpy(self.device, required=bool(batch_dma))
            if sm_kernel is not False:
                kernel = cuda_copy.available()
                if sm_kernel and not kernel:
                    raise RuntimeError("sm_kernel=True but the SM copy kernel needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)")
        elif batch_dma:
            raise ValueError("TransferEngine batch_dma=True needs a cuda device (cuMemcpyBatchAsync is a CUDA API)")
        elif sm_kernel:
            raise ValueError("TransferEngine sm_kernel=True needs a cuda device (the copy kernel runs on the GPU)")
        self.options = PathOptions(self.device.type, batch_dma=self._batch is not None, sm_kernel=kernel,
                                   kernel_threshold_bytes=kernel_threshold_bytes)
        # the path of jobs made of large runs; small-run jobs may take "sm-kernel" (job.path says)
        self._cpu = self.device.type == "cpu"
        self.path = "cpu-sync" if self._cpu else ("dma-batch" if self._batch else "dma-loop")

    @classmethod
    def for_config(cls, config: Any, device: str | torch.device = "cpu", **kwargs: Any) -> "TransferEngine":
        """An engine whose kernel threshold is ``config.copy_kernel_threshold_bytes`` (a WorldKVConfig)."""
        return cls(device, kernel_threshold_bytes=config.copy_kernel_threshold_bytes, **kwargs)

    # --- submission ----------------------------------------------------------------------------
    def submit(self, kind: str, srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor], *,
               after: "torch.cuda.Event | None" = None, tag: Any = None) -> TransferJob:
        """Start copying ``srcs[i]`` into ``dsts[i]`` for every i.

        kind: "store" (pages -> bank) or "load" (bank -> pages). srcs, dsts: contiguous tensors,
        pairwise equal numel and dtype, on the CPU or the engine's device. after: on CUDA, an event
        on the compute stream the copy must wait for (default: everything queued on the current
        stream so far). Returns the job; on the CPU it is already done.
        """
        if self._closed:
            raise RuntimeError("the transfer engine is closed")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: choose one of {list(KINDS)}")
        runs = check_and_plan(srcs, dsts)
        if self.device.type == "cuda":
            for i, (s, d) in enumerate(zip(srcs, dsts)):
                for side, t in (("src", s), ("dst", d)):
                    if t.device.type != "cpu" and t.device != self.device:
                        raise ValueError(f"pair {i}: {side} is on {t.device}, expected cpu or {self.device}")
        job = self._new_jobs(kind, sum(r[2] for r in runs), len(runs), len(srcs), (tag,))[0]
        if self.device.type == "cpu":
            self._run_host([job], copy_runs, runs, srcs, dsts, non_blocking=False)
        else:
            self._run_cuda(job, runs, srcs, dsts, after)
        return job

    def submit_plan(self, kind: str, plan: FragmentPlan, *, after: "torch.cuda.Event | None" = None,
                    tag: Any = None) -> TransferJob:
        """Start the copies of a ``FragmentPlan`` (addresses planned with numpy, e.g. by
        ``plan_layer_copies``): the fast way to submit thousands of page fragments. Same ``kind``,
        ``after`` and result as :meth:`submit`; the plan's tensors are kept alive until it ran."""
        if self._closed:
            raise RuntimeError("the transfer engine is closed")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: choose one of {list(KINDS)}")
        if not isinstance(plan, FragmentPlan):
            raise ValueError(f"plan: expected a FragmentPlan (see transfer.fragments), got {type(plan).__name__}")
        for base, device in plan.storages:
            if device.type != "cpu" and device != self.device:
                raise ValueError(f"plan: memory at {base:#x} is on {device}, expected cpu or {self.device}")
        if self._cpu:
            # host memory only (checked above): the planner's merged runs
            runs = (plan.src, plan.dst, plan.sizes) if plan.merged else merge_fragment_arrays(plan)[:3]
            job = self._new_jobs(kind, plan.nbytes, int(runs[2].shape[0]), plan.num_fragments, (tag,))[0]
            self._run_host([job], host_copy_runs, *runs)
            return job
        src, dst, sizes, head = merge_fragment_arrays(plan)
        job = self._new_jobs(kind, plan.nbytes, int(sizes.shape[0]), plan.num_fragments, (tag,))[0]
        stream = self._begin_cuda(job, plan.keep, after)
        try:
            host = [t for t in plan.keep if t.device.type == "cpu"]
            job.path, mapping = self._decide(sizes.tolist(), host)
            if job.path == "sm-kernel":
                try:
                    cuda_copy.copy_fragments(*translate_runs(plan, src, dst, head, mapping), sizes, stream=stream)
                except Exception as exc:  # noqa: BLE001 - e.g. NVRTC failed: DMA still moves the bytes
                    job.path = self._kernel_failed(exc, sizes.tolist(), host)
            if job.path == "dma-batch":
                self._batch.copy_arrays(src, dst, sizes, stream)
            elif job.path == "dma-loop":
                with torch.cuda.stream(stream):
                    copy_runs_by_view(plan, src, dst, sizes, head, non_blocking=True)
        except Exception as exc:  # noqa: BLE001 - reported on the job (connector's load-error API)
            self._fail(job, exc)
        self._end_cuda(job, stream)
        return job

    def submit_layers(self, kind: str, plans: LayerPlans, *, tags: Sequence[Any] | None = None) -> list[TransferJob]:
        """A step's copies (``plan_layer_copies``): one job per layer as from ``submit_plan(kind, plans.layer(l),
        tag=tags[l])``, which runs on CUDA; on the CPU (done inside submit anyway) all layers take one call."""
        if not isinstance(plans, LayerPlans):
            raise ValueError(f"plans: expected LayerPlans (see transfer.plan_layer_copies), got {type(plans).__name__}")
        tags = [None] * plans.num_layers if tags is None else list(tags)
        if len(tags) != plans.num_layers:
            raise ValueError(f"tags: expected one per layer ({plans.num_layers}), got {len(tags)}")
        if not self._cpu or self._closed or kind not in KINDS:  # CUDA, or submit_plan raises the error
            jobs: list[TransferJob] = []
            try:
                for layer, tag in enumerate(tags):
                    jobs.append(self.submit_plan(kind, plans.layer(layer), tag=tag))
            except Exception:
                for job in jobs:  # raising: no job of the step is left in flight unaccounted
                    self.wait(job)
                raise
            return jobs
        for base, device in plans.storages[0]:  # every storage of the step (see LayerPlans)
            if device.type != "cpu":
                raise ValueError(f"plans: memory at {base:#x} is on {device}, expected cpu")
        jobs = self._new_jobs(kind, plans.layer_bytes, plans.num_runs, plans.num_pairs, tags)
        self._run_host(jobs, host_copy_runs, plans.src, plans.dst, plans.sizes)  # [L, R] addresses, one layer's sizes
        return jobs

    def _run_host(self, jobs: list[TransferJob], copy: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``copy(*args, **kwargs)`` now (the CPU path: host runs or tensor pairs) and finish
        ``jobs``; a failure is reported on each of them, never raised mid-step."""
        t0 = time.perf_counter()
        try:
            copy(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported on the jobs
            for job in jobs:
                self._fail(job, exc)
        self._stats["busy_s"] += time.perf_counter() - t0
        for job in jobs:
            self._finish(job)

    def _new_jobs(self, kind: str, nbytes: int, runs: int, pairs: int, tags: Sequence[Any]) -> list[TransferJob]:
        """A job record per tag, each of ``runs`` merged copies (``pairs`` before merging), accounted as submitted."""
        now, path, ids = time.perf_counter(), self.path, self._ids
        jobs = [TransferJob(next(ids), kind, nbytes, runs, path, tag, submitted_at=now, num_pairs=pairs) for tag in tags]
        s, n = self._stats, len(jobs)
        s["jobs"] += n
        s["store_jobs" if kind == "store" else "load_jobs"] += n
        s["bytes_stored" if kind == "store" else "bytes_loaded"] += nbytes * n
        s["fragments"] += pairs * n
        s["merged_fragments"] += runs * n
        return jobs

    def _fail(self, job: TransferJob, exc: BaseException) -> None:
        job.error = f"{type(exc).__name__}: {exc}"
        self._stats["errors"] += 1
        # logged once per engine at warning level: a failing link would otherwise flood the log
        log = logger.debug if self._warned else logger.warning
        log("transfer job %d (%s, %d bytes) failed: %s", job.job_id, job.kind, job.nbytes, job.error)
        self._warned = True

    def _event(self) -> Any:
        return self._events.pop() if self._events else torch.cuda.Event(enable_timing=True)

    def _begin_cuda(self, job: TransferJob, keep: tuple, after: Any) -> Any:
        """Pick the job's stream, order it after compute, record the start event. Returns the stream."""
        stream = self._streams[self._next_stream]
        self._next_stream = (self._next_stream + 1) % len(self._streams)
        job.stream = stream
        job._keep = keep
        if after is None:
            # a store must not read pages compute is still writing, and a load must not overwrite
            # pages compute still reads: order the copy after all work queued on the caller's stream
            marker = self._event()
            marker.record(torch.cuda.current_stream(self.device))
            stream.wait_event(marker)
            self._events.append(marker)  # the wait captured the record: the event is free again
        else:
            stream.wait_event(after)
        job.start_event, job.end_event = self._event(), self._event()
        job.start_event.record(stream)
        return stream

    def _end_cuda(self, job: TransferJob, stream: Any) -> None:
        job.end_event.record(stream)
        self._inflight.append(job)

    def _run_cuda(self, job: TransferJob, runs: list[Run], srcs, dsts, after: Any) -> None:
        stream = self._begin_cuda(job, (tuple(srcs), tuple(dsts)), after)
        try:
            job.path = self._choose(runs, srcs, dsts, stream)
            if job.path == "dma-batch" and runs:
                self._batch.copy(runs, stream)
            elif job.path == "dma-loop" and runs:
                with torch.cuda.stream(stream):
                    copy_runs(runs, srcs, dsts, non_blocking=True)
        except Exception as exc:  # noqa: BLE001 - reported on the job (connector's load-error API)
            self._fail(job, exc)
        self._end_cuda(job, stream)

    def _decide(self, sizes: list[int], host: list[torch.Tensor]) -> tuple[str, dict | None]:
        """The job's path and, for the kernel, the device addresses of its host storages."""
        pinned = self._can_batch(host, [])
        mapped, mapping = False, None
        # the pointer query costs a driver call per host storage: only ask when the kernel could win
        if self.options.sm_kernel and sizes and median_run_bytes(sizes) < self.options.kernel_threshold_bytes:
            mapping = host_device_pointers(host)
            mapped = all(v is not None for v in mapping.values())
        return choose_path(sizes, self.options, host_pinned=pinned, host_mapped=mapped), mapping

    def _kernel_failed(self, exc: BaseException, sizes: list[int], host: list[torch.Tensor]) -> str:
        logger.warning("SM copy kernel failed (%s: %s): using DMA from now on", type(exc).__name__, exc)
        self.options = PathOptions("cuda", batch_dma=self.options.batch_dma, sm_kernel=False,
                                   kernel_threshold_bytes=self.options.kernel_threshold_bytes)
        return choose_path(sizes, self.options, host_pinned=self._can_batch(host, []), host_mapped=False)

    def _choose(self, runs: list[Run], srcs, dsts, stream: Any) -> str:
        """Pick the job's path; runs the kernel path itself (it can fail over to DMA here)."""
        sizes = [r[2] for r in runs]
        host = [t for t in itertools.chain(srcs, dsts) if t.device.type == "cpu"]
        path, mapping = self._decide(sizes, host)
        if path == "sm-kernel":
            try:
                cuda_copy.copy_fragments(*kernel_fragments(runs, srcs, dsts, mapping), stream=stream)
            except Exception as exc:  # noqa: BLE001 - e.g. NVRTC failed: DMA still moves the bytes
                path = self._kernel_failed(exc, sizes, host)
        return path

    @staticmethod
    def _can_batch(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> bool:
        # the DMA engines need page-locked host memory; pageable tensors take the loop path, where
        # torch stages them correctly
        seen: set[int] = set()
        for t in itertools.chain(srcs, dsts):
            if t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    if not t.is_pinned():
                        return False
                    seen.add(ptr)
        return True

    # --- completion ----------------------------------------------------------------------------
    def _finish(self, job: TransferJob) -> None:
        job._finished = True
        job.finished_at = time.perf_counter()
        job._keep = ()
        self._paths[job.path] += 1
        if job.start_event is not None and job.end_event is not None:
            self._stats["busy_s"] += job.start_event.elapsed_time(job.end_event) / 1e3
            self._events += [job.start_event, job.end_event]
        self._reported.append(job)

    def poll(self) -> list[TransferJob]:
        """Jobs that finished since the last poll, by job id. Never waits."""
        still = []
        for job in self._inflight:
            if job.done():
                self._finish(job)
            else:
                still.append(job)
        self._inflight = still
        out, self._reported = sorted(self._reported, key=lambda j: j.job_id), []
        return out

    def wait(self, job: TransferJob) -> None:
        """Block until ``job`` is done (it is still reported by the next ``poll``)."""
        if job in self._inflight:
            job.end_event.synchronize()
            self._inflight.remove(job)
            self._finish(job)

    def wait_all(self) -> None:
        for job in list(self._inflight):
            self.wait(job)

    def pending(self) -> int:
        """Jobs submitted whose completion has not been observed yet."""
        return len(self._inflight)

    def stats(self) -> dict:
        out = dict(self._stats)
        out["paths"] = dict(self._paths)
        out["pending"] = len(self._inflight)
        out["batch_dma"] = self._batch is not None
        out["sm_kernel"] = self.options.sm_kernel
        out["kernel_threshold_bytes"] = self.options.kernel_threshold_bytes
        return out

    def close(self) -> None:
        """Wait for every job, then drop the pooled streams and events. Idempotent."""
        if self._closed:
            return
        self.wait_all()
        self._closed = True
        self._streams, self._events = [], []

    def __enter__(self) -> "TransferEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
