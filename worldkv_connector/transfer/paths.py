"""Copy-path choice: which mechanism moves one job's merged runs.

Paths (DESIGN §2):
- ``dma-batch``: the copy engines through one ``cuMemcpyBatchAsync``. Fast for large runs, but it
  collapses to 4-7 GB/s when fragments are under about 28 KiB.
- ``sm-kernel``: one CUDA kernel walks the descriptor table (``worldkv_connector.transfer.cuda_copy``) and
  reads/writes mapped pinned host memory directly. It wins for many small fragments, at the price
  of a few SMs, so it is only chosen below the threshold.
- ``dma-loop``: one async ``copy_`` per run; the fallback (old driver, pageable host memory).
- ``cpu-sync``: no CUDA, synchronous ``copy_`` per run.

The decision is per job, on the median merged-run size, so one outlier (a partial last page) does
not flip a job of large pages to the kernel. The threshold is
``WorldKVConfig.copy_kernel_threshold_bytes``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from worldkv_connector.checks import check_int
from worldkv_connector.registry import Registry
from worldkv_connector.transfer.runs import Run

__all__ = ["PATHS", "PathOptions", "choose_path", "median_run_bytes", "host_device_pointers", "kernel_fragments"]

logger = logging.getLogger(__name__)

# the paths by name, each with what it is (``choose_path`` picks one per job; job.path holds its name)
PATHS: Registry[str] = Registry("copy path")
PATHS.register("cpu-sync")("no CUDA: one synchronous copy_ per run")
PATHS.register("dma-batch")("the copy engines through one cuMemcpyBatchAsync (pinned host memory)")
PATHS.register("dma-loop")("one async copy_ per run (old driver, pageable host memory)")
PATHS.register("sm-kernel")("one CUDA kernel over the descriptor table (mapped pinned host memory, small runs)")
DEFAULT_KERNEL_THRESHOLD = 28 * 1024  # DESIGN §2: batched DMA collapses under ~28 KiB fragments


@dataclass(frozen=True)
class PathOptions:
    """What an engine can use. device_type: "cpu" or "cuda"; batch_dma: ``cuMemcpyBatchAsync``
    resolved; sm_kernel: the copy kernel can run (CUDA + CuPy); kernel_threshold_bytes: median run
    size under which the kernel is preferred (0 = never)."""

    device_type: str
    batch_dma: bool = False
    sm_kernel: bool = False
    kernel_threshold_bytes: int = DEFAULT_KERNEL_THRESHOLD

    def __post_init__(self) -> None:
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"PathOptions.device_type={self.device_type!r}: choose one of ['cpu', 'cuda']")
        t = check_int("kernel_threshold_bytes", self.kernel_threshold_bytes, 0, 1 << 40)
        object.__setattr__(self, "kernel_threshold_bytes", t)
        if self.device_type == "cpu" and (self.batch_dma or self.sm_kernel):
            raise ValueError("PathOptions: batch_dma and sm_kernel need device_type='cuda'")


def median_run_bytes(sizes: Sequence[int]) -> float:
    """Median of the merged-run sizes in bytes (0.0 for no runs)."""
    return float(np.median(np.asarray(sizes, dtype=np.float64))) if len(sizes) else 0.0


def choose_path(run_sizes: Sequence[int], options: PathOptions, *, host_pinned: bool, host_mapped: bool) -> str:
    """The copy path for one job.

    run_sizes: bytes of each merged run. host_pinned: every host-side tensor is page-locked (the
    DMA engines need it); host_mapped: every host-side tensor is mapped into the device address
    space (the kernel dereferences it). Jobs with no host side pass True for both.
    """
    if options.device_type == "cpu":
        return "cpu-sync"
    small = median_run_bytes(run_sizes) < options.kernel_threshold_bytes
    if len(run_sizes) and small and options.sm_kernel and host_mapped:
        return "sm-kernel"
    if options.batch_dma and host_pinned:
        return "dma-batch"
    return "dma-loop"


def _storage_base(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def host_device_pointers(tensors: Sequence[torch.Tensor]) -> dict[int, int | None]:
    """Device address of every distinct host storage among ``tensors`` (None: not mapped).

    Asks CUDA (through CuPy) for the pointer's attributes: pageable memory has no device pointer,
    pinned memory under unified addressing maps to itself. Device tensors are skipped.
    """
    out: dict[int, int | None] = {}
    runtime = None
    for t in tensors:
        if t.device.type != "cpu":
            continue
        base = _storage_base(t)
        if base in out:
            continue
        if runtime is None:
            import cupy  # only reached when the kernel path is possible, i.e. CuPy imported before

            runtime = cupy.cuda.runtime
        try:
            dev = int(runtime.pointerGetAttributes(base).devicePointer) or None
        except Exception:  # noqa: BLE001 - older runtimes raise for pageable memory
            dev = None
        out[base] = dev
    return out


def kernel_fragments(runs: list[Run], srcs, dsts, mapping: dict[int, int | None]):
    """``(src, dst, sizes)`` device addresses of ``runs`` for the copy kernel.

    Host addresses are translated through ``mapping`` (storage base -> device base). A run that
    spans several storages is split back into its pairs, since each storage translates on its own.
    """
    src_out: list[int] = []
    dst_out: list[int] = []
    sizes: list[int] = []

    def addr(t: torch.Tensor, ptr: int) -> int:
        if t.device.type != "cpu":
            return ptr
        base = _storage_base(t)
        return mapping[base] + (ptr - base)

    for sp, dp, n, first, last in runs:
        s0, d0 = srcs[first], dsts[first]
        one_storage = all(
            _storage_base(srcs[i]) == _storage_base(s0) and _storage_base(dsts[i]) == _storage_base(d0)
            for i in range(first + 1, last + 1)
        )
        if one_storage:
            src_out.append(addr(s0, sp))
            dst_out.append(addr(d0, dp))
            sizes.append(n)
            continue
        for i in range(first, last + 1):
            s, d = srcs[i], dsts[i]
            nbytes = s.numel() * s.element_size()
            if nbytes:
                src_out.append(addr(s, s.data_ptr()))
                dst_out.append(addr(d, d.data_ptr()))
                sizes.append(nbytes)
    return src_out, dst_out, sizes
