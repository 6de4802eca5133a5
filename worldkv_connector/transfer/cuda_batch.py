"""``cuMemcpyBatchAsync`` through the CUDA driver API (ctypes; cuda-python when installed).

The function pointer comes from ``cuGetProcAddress`` (cuda-python's ``cuda.bindings.driver`` if
importable, else ``libcuda`` through ctypes), asked for the ABI that matches the driver version
(``select_abi``):

- CUDA 12.8 / 12.9 (``PFN_cuMemcpyBatchAsync_v12080``): ``(dsts, srcs, sizes, count, attrs,
  attrsIdxs, numAttrs, failIdx, hStream)``, exported as ``cuMemcpyBatchAsync``;
- CUDA 13.x (``PFN_cuMemcpyBatchAsync_v13000``): the same without ``failIdx``, exported as
  ``cuMemcpyBatchAsync_v2`` (``cuda.h`` maps the plain name onto it).

``CUmemcpyAttributes`` (srcAccessOrder, srcLocHint, dstLocHint, flags: 24 bytes) is the same in
both. A two-copy self-test on the device proves the binding before real data goes through it; any
failure means the loop path.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worldkv_connector.transfer.runs import Run

__all__ = ["BatchMemcpy", "BatchAbi", "select_abi", "resolve_batch_memcpy"]

logger = logging.getLogger(__name__)


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):  # CUmemcpyAttributes (cuda.h, 12.8+)
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _MemLocation),
                ("dstLocHint", _MemLocation), ("flags", ctypes.c_uint)]


_SRC_ACCESS_ORDER_STREAM = 1  # read the source in stream order, i.e. after the wait on compute
_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1
_SIZE_MAX = ctypes.c_size_t(-1).value  # failIdx when the error is not about one copy


@dataclass(frozen=True)
class BatchAbi:
    """Which ``cuMemcpyBatchAsync`` to bind: the version asked of ``cuGetProcAddress``, whether
    that ABI has the ``failIdx`` out-pointer, and the exported symbol of that ABI (the fallback
    when ``cuGetProcAddress`` itself is unavailable)."""

    proc_version: int
    has_fail_idx: bool
    symbol: str


def select_abi(driver_version: int | None) -> BatchAbi | None:
    """The ABI for a driver of ``driver_version`` (``cuDriverGetVersion``: 1000 * major + 10 * minor),
    or None below 12.8, where the function does not exist. A driver serves the ABI of its own
    major version; 12.8 and 12.9 share one."""
    if driver_version is None or driver_version < 12080:
        return None
    if driver_version >= 13000:
        return BatchAbi(13000, False, "cuMemcpyBatchAsync_v2")
    return BatchAbi(12080, True, "cuMemcpyBatchAsync")


class BatchMemcpy:
    """A resolved ``cuMemcpyBatchAsync``. The CUDA 12.8 ABI takes a ``failIdx`` out-pointer before
    the stream; CUDA 13 dropped it. Calling one ABI as the other would pass a host pointer as the
    stream, so the ABI is fixed by the version asked of ``cuGetProcAddress``."""

    def __init__(self, fn_ptr: int, has_fail_idx: bool) -> None:
        # dsts, srcs, sizes (CUdeviceptr* / size_t*), count, attrs, attrsIdxs, numAttrs
        argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        if has_fail_idx:
            argtypes.append(ctypes.c_void_p)  # size_t *failIdx (12.8 only)
        argtypes.append(ctypes.c_void_p)  # CUstream hStream (never the legacy NULL stream)
        self._fn = ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(fn_ptr)
        self.has_fail_idx = has_fail_idx
        # one attribute entry applies to every copy of the batch (attrsIdxs = [0])
        self._attrs = _MemcpyAttributes(srcAccessOrder=_SRC_ACCESS_ORDER_STREAM, flags=_FLAG_PREFER_OVERLAP_WITH_COMPUTE)
        self._attr_idx = ctypes.c_size_t(0)

    def copy(self, runs: list[Run], stream: Any) -> None:
        table = np.asarray([r[:3] for r in runs], dtype=np.uint64).reshape(-1, 3)
        self.copy_arrays(table[:, 0], table[:, 1], table[:, 2], stream)

    def copy_arrays(self, src: np.ndarray, dst: np.ndarray, size: np.ndarray, stream: Any) -> None:
        """One batch of ``size[i]`` bytes from ``src[i]`` to ``dst[i]`` (addresses, [F] ints) on ``stream``."""
        # descriptor arrays: the driver reads them during the call and does not keep them
        src, dst, size = (np.ascontiguousarray(a, dtype=np.uint64) for a in (src, dst, size))
        count = int(size.shape[0])
        if count == 0:
            return
        head = (dst.ctypes.data, src.ctypes.data, size.ctypes.data, count,
                ctypes.addressof(self._attrs), ctypes.addressof(self._attr_idx), 1)
        fail = ctypes.c_size_t(_SIZE_MAX)
        if self.has_fail_idx:
            err = self._fn(*head, ctypes.addressof(fail), stream.cuda_stream)
        else:
            err = self._fn(*head, stream.cuda_stream)
        if err != 0:
            where = f" (failIdx {fail.value})" if self.has_fail_idx and fail.value != _SIZE_MAX else ""
            raise RuntimeError(f"cuMemcpyBatchAsync of {count} runs failed with CUresult {err}{where}")


def _code(err: Any) -> int:
    return int(getattr(err, "value", err))


def _libcuda() -> Any:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _driver_version() -> int | None:
    try:
        from cuda.bindings import driver  # optional: cuda-python

        err, version = driver.cuDriverGetVersion()
        if _code(err) == 0:
            return int(version)
    except Exception:  # noqa: BLE001 - not installed or too old: fall back to ctypes
        pass
    lib = _libcuda()
    version = ctypes.c_int(0)
    if lib is not None and lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
        return version.value
    return None


def _proc_address(abi: BatchAbi) -> int | None:
    symbol, version = b"cuMemcpyBatchAsync", abi.proc_version
    try:
        from cuda.bindings import driver

        res = driver.cuGetProcAddress(symbol, version, 0)
        if _code(res[0]) == 0 and int(res[1]):
            return int(res[1])
    except Exception:  # noqa: BLE001
        pass
    lib = _libcuda()
    if lib is None:
        return None
    get = getattr(lib, "cuGetProcAddress_v2", None)
    if get is not None:
        get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                        ctypes.POINTER(ctypes.c_int)]
        ptr, status = ctypes.c_void_p(), ctypes.c_int(0)
        if get(symbol, ctypes.byref(ptr), version, 0, ctypes.byref(status)) == 0 and ptr.value:
            return ptr.value
    # last resort: the exported symbol of the wanted ABI
    fn = getattr(lib, abi.symbol, None)
    return ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else None


def _self_test(batch: BatchMemcpy, device: torch.device) -> bool:
    """Two crossed 128-byte copies on the device: proves the ABI before real data goes through."""
    src = torch.arange(256, device=device).to(torch.uint8)
    dst = torch.zeros(256, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # src/dst are written on the current stream
    sp, dp = src.data_ptr(), dst.data_ptr()
    batch.copy([(sp, dp + 128, 128, 0, 0), (sp + 128, dp, 128, 1, 1)], stream)
    stream.synchronize()
    return bool(torch.equal(dst[128:], src[:128]) and torch.equal(dst[:128], src[128:]))


def resolve_batch_memcpy(device: torch.device, required: bool) -> BatchMemcpy | None:
    """The batch copy for this driver, or None (loop path). ``required`` turns None into an error."""
    version = _driver_version()
    why = None
    batch = None
    abi = select_abi(version)
    if abi is None:
        why = f"needs CUDA driver >= 12.8, found {version}"
    else:
        ptr = _proc_address(abi)
        if not ptr:
            why = f"cuMemcpyBatchAsync ({abi.symbol}) not found in driver {version}"
        else:
            batch = BatchMemcpy(ptr, abi.has_fail_idx)
            try:
                ok = _self_test(batch, device)
            except Exception as exc:  # noqa: BLE001
                ok, why = False, f"self-test raised {exc}"
            if not ok:
                why, batch = why or "self-test copied wrong bytes", None
    if batch is None:
        if required:
            raise RuntimeError(f"batch_dma=True but batched DMA is unavailable: {why}")
        logger.info("batched DMA unavailable (%s): copies use the per-run loop", why)
    return batch
