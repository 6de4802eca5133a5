"""The ``cuMemcpyBatchAsync`` binding without a GPU: the ABI chosen per driver version, and the
arguments as the driver would receive them (a ctypes callback stands in for the driver function)."""
import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from worldkv_connector.transfer import cuda_batch
from worldkv_connector.transfer.cuda_batch import BatchMemcpy, select_abi


@pytest.mark.parametrize("version, expected", [
    (None, None), (11080, None), (12060, None), (12070, None),
    (12080, (12080, True, "cuMemcpyBatchAsync")), (12090, (12080, True, "cuMemcpyBatchAsync")),
    (13000, (13000, False, "cuMemcpyBatchAsync_v2")), (13020, (13000, False, "cuMemcpyBatchAsync_v2")),
])
def test_abi_follows_the_driver_version(version, expected):
    abi = select_abi(version)
    assert (abi and (abi.proc_version, abi.has_fail_idx, abi.symbol)) == expected


def test_attribute_struct_matches_cuda_h():
    # CUmemcpySrcAccessOrder (4) + two CUmemLocation {type, id} (8 each) + unsigned flags (4)
    assert ctypes.sizeof(cuda_batch._MemcpyAttributes) == 24
    assert cuda_batch._MemcpyAttributes.flags.offset == 20


def _fake_driver(has_fail_idx: bool, result: int = 0, fail_at: int | None = None):
    """A C-callable stand-in for the driver function of one ABI; records what it was passed."""
    seen: dict = {}
    args = [ctypes.c_void_p] * 3 + [ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    args += [ctypes.c_void_p] * (2 if has_fail_idx else 1)

    def fn(dsts, srcs, sizes, count, attrs, attr_idxs, num_attrs, *rest):
        read = lambda ptr: list((ctypes.c_uint64 * count).from_address(ptr))  # noqa: E731
        a = cuda_batch._MemcpyAttributes.from_address(attrs)
        seen.update(dsts=read(dsts), srcs=read(srcs), sizes=read(sizes), count=count, num_attrs=num_attrs,
                    attr_idx=ctypes.c_size_t.from_address(attr_idxs).value, order=a.srcAccessOrder, flags=a.flags,
                    stream=rest[-1], nargs=7 + len(rest))
        if has_fail_idx:
            seen["fail_idx_in"] = ctypes.c_size_t.from_address(rest[0]).value
            if fail_at is not None:
                ctypes.c_size_t.from_address(rest[0]).value = fail_at
        return result

    cb = ctypes.CFUNCTYPE(ctypes.c_int, *args)(fn)
    return cb, ctypes.cast(cb, ctypes.c_void_p).value, seen


@pytest.mark.parametrize("has_fail_idx", [True, False])
def test_arguments_reach_the_driver_in_abi_order(has_fail_idx):
    cb, ptr, seen = _fake_driver(has_fail_idx)
    batch = BatchMemcpy(ptr, has_fail_idx)
    stream = SimpleNamespace(cuda_stream=0xABC0)
    batch.copy([(100, 200, 16, 0, 0), (300, 400, 32, 1, 1)], stream)
    assert seen["srcs"] == [100, 300] and seen["dsts"] == [200, 400] and seen["sizes"] == [16, 32]
    assert seen["count"] == 2 and seen["num_attrs"] == 1 and seen["attr_idx"] == 0
    assert seen["order"] == 1 and seen["flags"] == 1  # stream order; prefer overlap with compute
    assert seen["stream"] == 0xABC0, "the stream must be the last argument of either ABI"
    assert seen["nargs"] == (9 if has_fail_idx else 8)
    if has_fail_idx:
        assert seen["fail_idx_in"] == cuda_batch._SIZE_MAX
    del cb


def test_errors_name_the_result_and_the_failing_copy():
    cb, ptr, _ = _fake_driver(True, result=1, fail_at=1)
    with pytest.raises(RuntimeError, match=r"CUresult 1 \(failIdx 1\)"):
        BatchMemcpy(ptr, True).copy_arrays(np.array([1, 2]), np.array([3, 4]), np.array([8, 8]),
                                           SimpleNamespace(cuda_stream=1))
    cb13, ptr13, _ = _fake_driver(False, result=1)
    with pytest.raises(RuntimeError, match=r"CUresult 1$"):
        BatchMemcpy(ptr13, False).copy_arrays(np.array([1]), np.array([3]), np.array([8]),
                                              SimpleNamespace(cuda_stream=1))
    del cb, cb13


def test_empty_batch_calls_nothing():
    cb, ptr, seen = _fake_driver(False)
    BatchMemcpy(ptr, False).copy_arrays(np.array([]), np.array([]), np.array([]), SimpleNamespace(cuda_stream=1))
    assert seen == {}
    del cb


def test_resolve_without_a_new_enough_driver(monkeypatch):
    monkeypatch.setattr(cuda_batch, "_driver_version", lambda: 12060)
    assert cuda_batch.resolve_batch_memcpy(torch.device("cpu"), required=False) is None
    with pytest.raises(RuntimeError, match="needs CUDA driver >= 12.8, found 12060"):
        cuda_batch.resolve_batch_memcpy(torch.device("cpu"), required=True)


def test_resolve_asks_for_the_abi_of_the_driver(monkeypatch):
    asked = []
    monkeypatch.setattr(cuda_batch, "_driver_version", lambda: 13010)
    monkeypatch.setattr(cuda_batch, "_proc_address", lambda abi: asked.append(abi) or None)
    with pytest.raises(RuntimeError, match="cuMemcpyBatchAsync_v2"):
        cuda_batch.resolve_batch_memcpy(torch.device("cpu"), required=True)
    assert asked == [select_abi(13010)] and not asked[0].has_fail_idx


@pytest.mark.cuda
def test_the_real_driver_binding_passes_its_self_test():
    batch = cuda_batch.resolve_batch_memcpy(torch.device("cuda"), required=True)
    assert batch.has_fail_idx == (cuda_batch._driver_version() < 13000)
