"""SM-driven copy engine: the CUDA C++ fragment-copy kernel of ``csrc/paged_copy.cu``, via CuPy.

For transfers made of many small fragments (one per layer, K/V and page; compressed chunks leave
partial pages), per-fragment DMA descriptors are slow (DESIGN §2). Here one kernel walks a
descriptor table ``(src, dst, nbytes)`` and copies between the paged pools and mapped pinned host
memory directly (unified addressing), with 16-byte accesses where aligned and a grid capped to a
few SMs so the model keeps its compute.

The source is compiled at run time with CuPy's NVRTC (no build step, no torch ABI coupling) and
cached per device. Importing this module never fails: without CUDA or CuPy, ``available()`` is
False and ``copy_fragments`` raises ``RuntimeError``. The descriptor tables come from the transfer
engine (``transfer.plan_layer_copies`` plans, path ``sm-kernel``); ``merge_fragments`` is plain
numpy and runs anywhere.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from worldkv_connector.checks import check_int
from worldkv_connector.transfer.addresses import as_u64, run_heads
from worldkv_connector.csrc import read_source

__all__ = [
    "CopyKernelConfig",
    "available",
    "copy_fragments",
    "merge_fragments",
]

logger = logging.getLogger(__name__)

_SOURCE = "paged_copy.cu"
_KERNEL = "wkv_copy_fragments"
_modules: dict[int, object] = {}  # device index -> compiled kernel function (lazy, per device)
_modules_lock = threading.Lock()


@dataclass(frozen=True)
class CopyKernelConfig:
    """Launch shape of the fragment-copy kernel."""

    sm_share: int = 4  # SMs' worth of blocks the copy may occupy (the model keeps the rest)
    threads: int = 256  # threads per block
    chunk_bytes: int = 64 * 1024  # bytes one block copies per work item

    def __post_init__(self) -> None:
        object.__setattr__(self, "sm_share", check_int("CopyKernelConfig.sm_share", self.sm_share, 1, 1024))
        if self.threads not in (32, 64, 128, 256, 512, 1024):
            raise ValueError(f"CopyKernelConfig.threads={self.threads!r}: choose one of 32, 64, 128, 256, 512, 1024")
        object.__setattr__(self, "chunk_bytes", check_int("CopyKernelConfig.chunk_bytes", self.chunk_bytes, lo=16))
        if self.chunk_bytes % 16:
            raise ValueError(
                f"CopyKernelConfig.chunk_bytes={self.chunk_bytes!r}: expected a positive multiple of 16 (int4 accesses)"
            )


def _cupy():
    try:
        import cupy
    except Exception:  # ImportError, or a CuPy build that fails to load its CUDA libraries
        return None
    return cupy


def available() -> bool:
    """True when a CUDA device is visible to torch and CuPy imports (the kernel can run)."""
    return torch.cuda.is_available() and _cupy() is not None


def _kernel(device: int):
    """The compiled kernel for ``device``, compiled through NVRTC on first use and cached."""
    with _modules_lock:
        fn = _modules.get(device)
        if fn is None:
            cupy = _cupy()
            with cupy.cuda.Device(device):
                module = cupy.RawModule(code=read_source(_SOURCE), options=("-std=c++17",))
                fn = module.get_function(_KERNEL)
            _modules[device] = fn
            logger.info("compiled %s for cuda:%d with NVRTC", _SOURCE, device)
        return fn


def merge_fragments(src, dst, sizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge fragments that continue each other on both sides into one; drop empty fragments.

    src, dst, sizes: [F] integer sequences (addresses and byte counts). Returns uint64 arrays
    ``(src, dst, sizes)`` with the same bytes moved and fewer, larger fragments (pages adjacent in
    the pool and in the host layout become one run).
    """
    src, dst, sizes = as_u64("src", src), as_u64("dst", dst), as_u64("sizes", sizes)
    if not (src.shape == dst.shape == sizes.shape):
        raise ValueError(f"src/dst/sizes: expected equal lengths, got {src.size}, {dst.size}, {sizes.size}")
    keep = sizes > 0
    src, dst, sizes = src[keep], dst[keep], sizes[keep]
    if src.size <= 1:
        return src, dst, sizes
    heads = run_heads(src, dst, sizes)
    return src[heads], dst[heads], np.add.reduceat(sizes, heads).astype(np.uint64)


def _stream_device(stream) -> tuple[torch.cuda.Stream, int]:
    if stream is None:
        stream = torch.cuda.current_stream()
    if not isinstance(stream, torch.cuda.Stream):
        raise ValueError(f"stream: expected a torch.cuda.Stream or None, got {type(stream).__name__}")
    return stream, stream.device.index if stream.device.index is not None else torch.cuda.current_device()


def copy_fragments(src_ptrs, dst_ptrs, sizes, stream=None, max_blocks: int | None = None,
                   config: CopyKernelConfig | None = None) -> int:
    """Copy every fragment ``sizes[i]`` bytes from ``src_ptrs[i]`` to ``dst_ptrs[i]`` with one kernel.

    Addresses must be device-accessible (device memory, or mapped pinned host memory under unified
    addressing); fragments must not overlap. ``stream``: torch.cuda.Stream (default: current); the
    copy is ordered on it and asynchronous to the host. ``max_blocks`` caps the grid (default
    ``config.sm_share`` SMs' worth). Returns the bytes enqueued.
    """
    if not available():
        raise RuntimeError("copy_fragments needs a CUDA device and CuPy (pip install cupy-cuda12x or cupy-cuda13x)")
    config = config or CopyKernelConfig()
    src, dst, nbytes = merge_fragments(src_ptrs, dst_ptrs, sizes)
    if src.size == 0:
        return 0
    if max_blocks is not None:  # None: enough blocks to fill the SM share
        max_blocks = check_int("max_blocks", max_blocks, lo=1)
    stream, device = _stream_device(stream)
    if max_blocks is None:
        props = torch.cuda.get_device_properties(device)
        per_sm = getattr(props, "max_threads_per_multi_processor", 2048) // config.threads
        max_blocks = config.sm_share * max(1, per_sm)
    chunks = (nbytes + np.uint64(config.chunk_bytes - 1)) // np.uint64(config.chunk_bytes)
    starts = np.concatenate(([0], np.cumsum(chunks, dtype=np.uint64))).astype(np.uint64)
    table = np.concatenate((src, dst, nbytes, starts)).view(np.int64)  # layout: see paged_copy.cu
    grid = int(min(max_blocks, int(starts[-1])))
    fn = _kernel(device)
    cupy = _cupy()
    with torch.cuda.device(device), torch.cuda.stream(stream):
        # pinned staging + non_blocking: the upload is ordered on `stream`, before the kernel;
        # torch keeps the pinned block alive until that copy finished
        desc = torch.from_numpy(table).pin_memory().to(device=f"cuda:{device}", non_blocking=True)
        with cupy.cuda.Device(device), cupy.cuda.ExternalStream(stream.cuda_stream):
            args = (np.uint64(desc.data_ptr()), np.int32(src.size), np.uint64(config.chunk_bytes))
            fn((grid,), (config.threads,), args)
    # `desc` was allocated on `stream`, so the caching allocator reuses it only after the kernel
    return int(nbytes.sum())
