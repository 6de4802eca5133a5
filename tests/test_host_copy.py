"""The CPU engine's compiled copy loop (csrc/host_copy.c) against torch references: random runs split
across threads, the streaming-store path, concurrent callers, a forked child, bad input, and the
per-run fallback of an install without a compiler."""
from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
import torch

from worldkv_connector.transfer import fragments
from worldkv_connector.transfer.fragments import host_copy_runs

MIB = 1 << 20


def _random_runs(rng: np.random.Generator, src: torch.Tensor, dst: torch.Tensor, count: int, max_bytes: int):
    """``count`` runs at random offsets: disjoint within dst (as the planner guarantees), sources
    may repeat. Returns (src_off, dst_off, sizes) as int64 arrays."""
    sizes = rng.integers(0, max_bytes, count)
    sizes[rng.random(count) < 0.1] = 0  # empty runs are legal
    room = dst.numel() - int(sizes.sum())
    assert room >= 0
    gaps = np.diff(np.sort(rng.integers(0, room + 1, count + 1)))  # [count] random spacing, sum <= room
    dst_off = np.cumsum(np.concatenate([[0], sizes[:-1]])) + np.cumsum(gaps)  # runs in address order
    order = rng.permutation(count)  # copy order unrelated to the address order
    src_off = rng.integers(0, src.numel() - sizes + 1)
    return src_off[order], dst_off[order], sizes[order]


def _expected(src: torch.Tensor, dst: torch.Tensor, src_off, dst_off, sizes) -> torch.Tensor:
    out = dst.clone()
    for s, d, n in zip(src_off.tolist(), dst_off.tolist(), sizes.tolist()):
        out[d:d + n] = src[s:s + n]
    return out


def _copy(src, dst, src_off, dst_off, sizes, threads):
    host_copy_runs((src.data_ptr() + src_off).astype(np.uint64), (dst.data_ptr() + dst_off).astype(np.uint64),
                   sizes.astype(np.uint64), threads)


def test_this_install_runs_the_compiled_loop():
    assert fragments.HOST_COPY == "compiled", (
        "csrc/host_copy.c was not built (no C compiler at install?): the CPU engine falls back to one "
        "ctypes.memmove per run")


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("max_kib,count", [(3, 400), (96, 64), (700, 24)])
def test_random_runs_match_a_torch_reference(threads, max_kib, count):
    # totals from ~0.6 MB (threads split a few runs) to ~8 MB (many parts per thread)
    rng = np.random.default_rng(threads * 1000 + max_kib)
    src = torch.randint(0, 256, (16 * MIB,), dtype=torch.uint8)
    dst = torch.randint(0, 256, (count * max_kib * 1024 * 2 + 4096,), dtype=torch.uint8)
    runs = _random_runs(rng, src, dst, count, max_kib * 1024)
    want = _expected(src, dst, *runs)
    _copy(src, dst, *runs, threads)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("stream", [True, False])
def test_streaming_and_cached_stores_copy_the_same_bytes(threads, stream):
    # the store kind is chosen per job by its size against STREAM_MIN_BYTES (the cache's); force each
    lib = fragments._host_copy
    rng = np.random.default_rng(threads + 10 * stream)
    src = torch.randint(0, 256, (16 * MIB,), dtype=torch.uint8)
    dst = torch.randint(0, 256, (12 * MIB,), dtype=torch.uint8)
    src_off, dst_off, sizes = _random_runs(rng, src, dst, 40, 300 * 1024)
    src_off[0], sizes[0] = 1, 251  # short and unaligned runs take the vector loop's head and tail paths
    want = _expected(src, dst, src_off, dst_off, sizes)
    lib.copy_runs((src.data_ptr() + src_off).astype(np.uint64), (dst.data_ptr() + dst_off).astype(np.uint64),
                  sizes.astype(np.uint64), threads, 0 if stream else 1 << 62)
    assert torch.equal(dst, want)


def test_streaming_threshold_follows_the_last_level_cache():
    import subprocess

    lib = fragments._host_copy
    assert lib.STREAM_MIN_BYTES >= 4 * MIB
    try:
        l3 = int(subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True, timeout=10).stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        pytest.skip("getconf LEVEL3_CACHE_SIZE is not available here")
    if l3 <= 0:
        pytest.skip("the last-level cache size is not reported here")
    assert lib.STREAM_MIN_BYTES == max(4 * MIB, l3 // 4 * 3)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_sizes_of_one_layer_repeat_over_every_layers_runs(monkeypatch, compiled, threads):
    # a step's layers share one layer's run sizes: src/dst hold L x R addresses, sizes R
    rng = np.random.default_rng(threads)
    layers, count = 4, 12
    src = torch.randint(0, 256, (8 * MIB,), dtype=torch.uint8)
    dst = torch.randint(0, 256, (layers * count * 64 * 1024 * 2,), dtype=torch.uint8)
    src_off, dst_off, sizes = _random_runs(rng, src, dst, layers * count, 64 * 1024)
    sizes = np.tile(sizes[:count], layers)  # the same R sizes in every layer
    dst_off = np.concatenate([[0], np.cumsum(sizes[:-1])]) + np.arange(layers * count) * 7  # disjoint again
    src_off = np.minimum(src_off, src.numel() - sizes)
    want = _expected(src, dst, src_off, dst_off, sizes)
    if not compiled:
        monkeypatch.setattr(fragments, "_host_copy", None)
    host_copy_runs((src.data_ptr() + src_off).astype(np.uint64), (dst.data_ptr() + dst_off).astype(np.uint64),
                   sizes[:count].astype(np.uint64), threads)
    assert torch.equal(dst, want)
    with pytest.raises(ValueError, match="a multiple of sizes' length"):
        host_copy_runs(np.zeros(5, dtype=np.uint64), np.zeros(5, dtype=np.uint64), np.zeros(2, dtype=np.uint64))


def test_one_large_run_is_split_between_threads_at_odd_offsets():
    src = torch.randint(0, 256, (12 * MIB + 77,), dtype=torch.uint8)
    dst = torch.zeros(12 * MIB + 99, dtype=torch.uint8)
    n = 12 * MIB - 5  # not a multiple of any part or vector size, at unaligned addresses
    _copy(src, dst, np.array([3]), np.array([7]), np.array([n]), 4)
    assert torch.equal(dst[7:7 + n], src[3:3 + n])
    assert not dst[:7].any() and not dst[7 + n:].any()  # nothing written outside the run


def test_concurrent_callers_each_get_their_copies():
    # one caller holds the helper pool; the others copy on their own thread instead of waiting
    rng = np.random.default_rng(7)
    src = torch.randint(0, 256, (8 * MIB,), dtype=torch.uint8)
    jobs = []
    for _ in range(4):
        dst = torch.zeros(6 * MIB, dtype=torch.uint8)
        runs = _random_runs(rng, src, dst, 40, 128 * 1024)
        jobs.append((dst, runs, _expected(src, dst, *runs)))
    errors: list[BaseException] = []

    def work(dst, runs):
        try:
            for _ in range(20):
                _copy(src, dst, *runs, 2)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(dst, runs)) for dst, runs, _ in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    for dst, _, want in jobs:
        assert torch.equal(dst, want)


def _child_copy(queue) -> None:
    src = torch.arange(8 * MIB, dtype=torch.int64).to(torch.uint8)
    dst = torch.zeros(8 * MIB, dtype=torch.uint8)
    _copy(src, dst, np.array([0]), np.array([0]), np.array([8 * MIB]), 2)
    queue.put(bool(torch.equal(src, dst)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_a_forked_child_copies_without_the_parents_threads():
    # libgomp's workers do not survive fork (torch's own parallel ops hang in such a child)
    src = torch.randint(0, 256, (8 * MIB,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    _copy(src, dst, np.array([0]), np.array([0]), np.array([8 * MIB]), 2)  # the parent's helpers exist now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_copy, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child hung or died copying with threads"
    assert queue.get(timeout=5) is True


def test_bad_input_is_refused_before_any_byte_moves():
    lib = fragments._host_copy
    a = np.zeros(3, dtype=np.uint64)
    with pytest.raises(ValueError, match="a multiple of sizes' length, got 3, 2, 3 values"):
        lib.copy_runs(a, np.zeros(2, dtype=np.uint64), a, 1)
    with pytest.raises(ValueError, match="got 3, 3, 2 values"):  # 3 runs cannot repeat 2 sizes
        lib.copy_runs(a, a, np.zeros(2, dtype=np.uint64), 1)
    with pytest.raises(ValueError, match="got 3, 3, 0 values"):
        lib.copy_runs(a, a, np.zeros(0, dtype=np.uint64), 1)
    with pytest.raises(ValueError, match="threads=0: expected 1 to"):
        lib.copy_runs(a, a, a, 0)
    with pytest.raises(ValueError, match="stream_min=-2: expected bytes >= 0"):
        lib.copy_runs(a, a, a, 1, -2)
    with pytest.raises(ValueError, match="sizes: expected a contiguous buffer of uint64 values, got 3 bytes"):
        lib.copy_runs(a, a, b"abc", 1)
    with pytest.raises(ValueError, match="not C-contiguous"):  # a strided view has no C buffer
        lib.copy_runs(np.zeros((3, 2), dtype=np.uint64)[:, 0], a, a, 1)


def test_host_copy_runs_makes_strided_and_int64_addresses_contiguous():
    src = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    dst = torch.zeros(4096, dtype=torch.uint8)
    table = np.array([[src.data_ptr() + 100, dst.data_ptr() + 9, 50], [src.data_ptr(), dst.data_ptr() + 1000, 7]],
                     dtype=np.int64)
    host_copy_runs(table[:, 0], table[:, 1], table[:, 2])  # columns: strided int64 views
    assert torch.equal(dst[9:59], src[100:150]) and torch.equal(dst[1000:1007], src[:7])


def test_without_the_compiled_loop_the_fallback_copies_the_same_bytes(monkeypatch):
    rng = np.random.default_rng(3)
    src = torch.randint(0, 256, (2 * MIB,), dtype=torch.uint8)
    dst = torch.zeros(MIB, dtype=torch.uint8)
    runs = _random_runs(rng, src, dst, 50, 8 * 1024)
    want = _expected(src, dst, *runs)
    monkeypatch.setattr(fragments, "_host_copy", None)
    _copy(src, dst, *runs, 2)
    assert torch.equal(dst, want)


def test_a_smaller_openmp_team_than_asked_for_still_copies_every_part():
    # OMP_THREAD_LIMIT=1: libgomp runs the region on one thread though 4 are asked for
    import subprocess
    import sys
    code = ("import numpy as np, torch; from worldkv_connector.transfer.fragments import host_copy_runs\n"
            "src = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8); dst = torch.zeros_like(src)\n"
            "host_copy_runs(np.array([src.data_ptr()], dtype=np.uint64), np.array([dst.data_ptr()], dtype=np.uint64),"
            " np.array([8 << 20], dtype=np.uint64), 4)\n"
            "assert torch.equal(src, dst), 'parts were left uncopied'\n")
    env = {**__import__("os").environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
