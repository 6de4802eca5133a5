"""SM-driven copy engine: the CUDA C++ fragment-copy kernel of ``csrc/paged_copy.cu``, via CuPy.

For transfers made of many small fragments (one per layer, K/V and page; compressed chunks leave
partial pages), per-fragment DMA descriptors are slow (DESIGN §2). Here one kernel walks a
descriptor table ``(src, dst, nbytes)`` and copies between the paged pools and mapped pinned host
memory directly (unified addressing), with 16-byte accesses where aligned and a grid capped to a
few SMs so the model keeps its compute.

The source is compiled at run time with CuPy's NVRTC (no build step, no torch ABI coupling) and
cached per device. Importing this module never fails: without CUDA or CuPy, ``available()`` is
False and the copy functions raise ``RuntimeError``. Planning (``plan_page_fragments``,
``merge_fragments``) is plain numpy and runs anywhere.

Host layouts: ``gather_to_host`` writes ``[L, 2, P, page_size, H, D]`` (whole pages, page order of
``page_ids``) or, with ``page_lens``, the packed ``[L, 2, N, H, D]`` (``N = sum(page_lens)``, the
first ``page_lens[i]`` tokens of each page, like ``kernels.page_copy``); ``scatter_from_host`` reads
the same layouts.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from worldkv_connector.addresses import as_u64, run_heads
from worldkv_connector.csrc import read_source

__all__ = [
    "CopyKernelConfig",
    "available",
    "copy_fragments",
    "gather_to_host",
    "scatter_from_host",
    "plan_page_fragments",
    "merge_fragments",
    "host_shape",
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
        if not isinstance(self.sm_share, int) or not 1 <= self.sm_share <= 1024:
            raise ValueError(
                f"CopyKernelConfig.sm_share={self.sm_share!r} is out of range: allowed 1 <= sm_share <= 1024"
            )
        if self.threads not in (32, 64, 128, 256, 512, 1024):
            raise ValueError(f"CopyKernelConfig.threads={self.threads!r}: choose one of 32, 64, 128, 256, 512, 1024")
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 16 or self.chunk_bytes % 16:
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


def _pool_planes(pools) -> tuple[np.ndarray, int, torch.Tensor]:
    """Base byte address of every (layer, K/V) plane, the page stride in bytes, and a sample plane.

    pools: [L, 2, num_pages, page_size, H, D] tensor, or a sequence of L per-layer
    [2, num_pages, page_size, H, D] tensors (same shape, dtype, device).
    """
    if isinstance(pools, torch.Tensor):
        if pools.dim() != 6 or pools.shape[1] != 2:
            raise ValueError(f"pools: expected [L, 2, num_pages, page_size, H, D], got {tuple(pools.shape)}")
        layers = list(pools.unbind(0))
    else:
        layers = list(pools)
    if not layers or not all(isinstance(t, torch.Tensor) for t in layers):
        raise ValueError("pools: expected a stacked tensor or a non-empty sequence of per-layer tensors")
    first = layers[0]
    for i, t in enumerate(layers):
        if t.dim() != 5 or t.shape[0] != 2 or t.shape != first.shape:
            raise ValueError(
                f"pools[{i}]: expected [2, num_pages, page_size, H, D] like pools[0] {tuple(first.shape)}, "
                f"got {tuple(t.shape)}"
            )
        if t.dtype != first.dtype or t.device != first.device or t.stride() != first.stride():
            raise ValueError(
                f"pools[{i}]: dtype/device/strides {t.dtype}/{t.device}/{t.stride()} differ from pools[0]'s "
                f"{first.dtype}/{first.device}/{first.stride()}"
            )
    _, _, page_size, heads, head_dim = first.shape
    if first.stride()[2:] != (heads * head_dim, head_dim, 1):
        # each page must be one contiguous run of page_size * H * D elements
        raise ValueError(
            f"pools: expected contiguous pages (strides (..., {heads * head_dim}, {head_dim}, 1)), got {first.stride()}"
        )
    item = first.element_size()
    bases = np.array([[t.data_ptr(), t.data_ptr() + t.stride(0) * item] for t in layers], dtype=np.uint64)
    return bases.reshape(-1), first.stride(1) * item, first


def host_shape(pools, num_pages: int | None = None, page_lens=None) -> tuple[int, ...]:
    """Shape of the host buffer for ``num_pages`` whole pages, or for the packed ``page_lens`` tokens."""
    bases, _, plane = _pool_planes(pools)
    layers, (page_size, heads, head_dim) = bases.size // 2, tuple(plane.shape[2:])
    if page_lens is not None:
        return (layers, 2, int(as_u64("page_lens", page_lens).sum()), heads, head_dim)
    if num_pages is None:
        raise ValueError("host_shape: give num_pages (whole pages) or page_lens (packed tokens)")
    return (layers, 2, int(num_pages), page_size, heads, head_dim)


def plan_page_fragments(pools, page_ids, host_ptr: int, page_lens=None, *, to_host: bool = True):
    """Copy descriptors between the listed pages of every layer and a host buffer (see module doc).

    pools: [L, 2, num_pages, page_size, H, D] tensor or sequence of [2, num_pages, page_size, H, D];
    page_ids: [P] ints (host values, decided when the step was planned); host_ptr: device-accessible
    address of the host buffer; page_lens: optional [P] valid tokens per page (packed layout).
    Returns merged uint64 ``(src, dst, sizes)``; ``to_host=False`` swaps source and destination.
    """
    bases, page_stride, plane = _pool_planes(pools)
    num_pages, page_size, heads, head_dim = plane.shape[1:]
    ids = as_u64("page_ids", page_ids)
    if ids.size and int(ids.max()) >= num_pages:
        raise ValueError(f"page_ids: expected ids in [0, {num_pages}), got max {int(ids.max())}")
    row = heads * head_dim * plane.element_size()  # bytes of one token
    src = bases[:, None] + ids[None, :] * np.uint64(page_stride)  # [planes, P]
    if page_lens is None:
        sizes = np.full(src.shape, page_size * row, dtype=np.uint64)
        slots = np.arange(src.size, dtype=np.uint64).reshape(src.shape)  # whole-page slot per fragment
        dst = np.uint64(host_ptr) + slots * np.uint64(page_size * row)
    else:
        lens = as_u64("page_lens", page_lens)
        if lens.shape != ids.shape:
            raise ValueError(f"page_lens: expected shape {ids.shape} (page_ids'), got {lens.shape}")
        if lens.size and int(lens.max()) > page_size:
            raise ValueError(
                f"page_lens: every value must lie in [0, page_size={page_size}], got max {int(lens.max())}"
            )
        total = lens.sum(dtype=np.uint64)
        first = np.cumsum(lens, dtype=np.uint64) - lens  # packed row of each page's first token
        plane_ids = np.arange(bases.size, dtype=np.uint64)[:, None]
        sizes = np.broadcast_to(lens * np.uint64(row), src.shape)
        dst = np.uint64(host_ptr) + (plane_ids * total + first[None, :]) * np.uint64(row)
    src, dst, sizes = src.reshape(-1), dst.reshape(-1), np.ascontiguousarray(sizes).reshape(-1)
    if not to_host:
        src, dst = dst, src
    return merge_fragments(src, dst, sizes)


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
    if max_blocks is not None and (not isinstance(max_blocks, int) or max_blocks < 1):
        raise ValueError(f"max_blocks={max_blocks!r}: expected a positive int")
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


def _host_address(host_buf: torch.Tensor) -> int:
    """Device-accessible address of a pinned host tensor (equal to the host address under UVA)."""
    if host_buf.device.type != "cpu" or not host_buf.is_pinned():
        raise ValueError(f"host_buf: expected a pinned (page-locked) CPU tensor, got device {host_buf.device}, "
                         f"pinned={host_buf.device.type == 'cpu' and host_buf.is_pinned()}")
    ptr = host_buf.data_ptr()
    get_attrs = getattr(_cupy().cuda.runtime, "pointerGetAttributes", None)
    if get_attrs is None:
        return ptr
    dev_ptr = get_attrs(ptr).devicePointer
    if not dev_ptr:
        raise ValueError("host_buf: pinned memory is not mapped into the device address space")
    return int(dev_ptr)


def _host_transfer(pools, page_ids, host_buf, page_lens, to_host, stream, max_blocks, config) -> int:
    if not available():
        raise RuntimeError("gather_to_host/scatter_from_host need a CUDA device and CuPy")
    _, _, plane = _pool_planes(pools)
    if plane.device.type != "cuda":
        raise ValueError(f"pools: expected cuda tensors, got {plane.device}")
    if not isinstance(host_buf, torch.Tensor):
        raise ValueError(f"host_buf: expected a pinned CPU tensor, got {type(host_buf).__name__}")
    if host_buf.dtype != plane.dtype:
        raise ValueError(f"host_buf: expected dtype {plane.dtype} (the pools'), got {host_buf.dtype}")
    if not host_buf.is_contiguous():
        raise ValueError(f"host_buf: expected a contiguous tensor, got strides {host_buf.stride()}")
    ids = as_u64("page_ids", page_ids)
    shape = host_shape(pools, ids.size, page_lens)
    need = int(np.prod(shape))
    if host_buf.numel() < need:
        raise ValueError(f"host_buf: expected at least {need} elements (layout {shape}), got {host_buf.numel()}")
    stream, device = _stream_device(stream)
    if plane.device.index != device:
        raise ValueError(f"stream: expected a stream of {plane.device} (the pools'), got cuda:{device}")
    src, dst, sizes = plan_page_fragments(pools, ids, _host_address(host_buf), page_lens, to_host=to_host)
    return copy_fragments(src, dst, sizes, stream=stream, max_blocks=max_blocks, config=config)


def gather_to_host(pools, page_ids, host_buf: torch.Tensor, page_lens=None, *, stream=None,
                   max_blocks: int | None = None, config: CopyKernelConfig | None = None) -> int:
    """Copy the listed pages of every layer (K and V) into pinned host memory, asynchronously.

    pools: [L, 2, num_pages, page_size, H, D] cuda tensor or sequence of [2, num_pages, page_size, H, D];
    page_ids: [P] ints; host_buf: pinned contiguous CPU tensor of the pools' dtype holding at least
    ``host_shape(...)`` elements; page_lens: optional [P] valid tokens (packed layout). The data is in
    host_buf once ``stream`` (default: current) reaches this point: synchronize or record an event
    before reading it. Returns the bytes enqueued.
    """
    return _host_transfer(pools, page_ids, host_buf, page_lens, True, stream, max_blocks, config)


def scatter_from_host(host_buf: torch.Tensor, pools, page_ids, page_lens=None, *, stream=None,
                      max_blocks: int | None = None, config: CopyKernelConfig | None = None) -> int:
    """Copy a host buffer (layout of :func:`gather_to_host`) into the listed pages, asynchronously.

    Same arguments as :func:`gather_to_host`; page ids must be distinct. With ``page_lens`` only
    the first ``page_lens[i]`` tokens of each page are written. Returns the bytes enqueued.
    """
    ids = as_u64("page_ids", page_ids)
    if np.unique(ids).size != ids.size:
        raise ValueError("page_ids: expected distinct ids for a scatter (two writers to one page race)")
    return _host_transfer(pools, ids, host_buf, page_lens, False, stream, max_blocks, config)
