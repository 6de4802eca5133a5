"""Copy plans: validate (src, dst) pairs and merge the ones adjacent in memory into runs.

Batched DMA collapses for fragments under about 28 KiB and every descriptor costs CPU time
(DESIGN §2), so pairs whose bytes follow each other in both source and destination memory (pages of
one pool, rows of one bank slot) are merged into one run before anything is copied.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["merge_runs", "plan_runs", "check_pairs", "check_and_plan", "copy_runs", "Run"]

# A run: (src_ptr, dst_ptr, nbytes, first_pair, last_pair).
Run = tuple[int, int, int, int, int]


def check_pairs(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> None:
    if len(srcs) != len(dsts):
        raise ValueError(f"srcs and dsts must pair up: got {len(srcs)} srcs and {len(dsts)} dsts")
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        if not isinstance(s, torch.Tensor) or not isinstance(d, torch.Tensor):
            raise ValueError(f"pair {i}: expected tensors, got {type(s).__name__} -> {type(d).__name__}")
        if s.dtype != d.dtype:
            raise ValueError(f"pair {i}: dtype mismatch, src {s.dtype} vs dst {d.dtype}")
        if s.numel() != d.numel():
            raise ValueError(f"pair {i}: numel mismatch, src {s.numel()} vs dst {d.numel()}")
        if not s.is_contiguous():
            raise ValueError(f"pair {i}: src of shape {tuple(s.shape)} stride {s.stride()} is not contiguous")
        if not d.is_contiguous():
            raise ValueError(f"pair {i}: dst of shape {tuple(d.shape)} stride {d.stride()} is not contiguous")


def plan_runs(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> list[Run]:
    runs: list[Run] = []
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        n = s.numel() * s.element_size()
        if n == 0:
            continue
        sp, dp = s.data_ptr(), d.data_ptr()
        if runs:
            rs, rd, rn, first, _ = runs[-1]
            # merge only when both sides continue exactly where the previous pair ended
            if rs + rn == sp and rd + rn == dp:
                runs[-1] = (rs, rd, rn + n, first, i)
                continue
        runs.append((sp, dp, n, i, i))
    return runs


class _BadPair(Exception):
    """Internal: a pair failed the fast checks; ``check_pairs`` then names what is wrong."""


def check_and_plan(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> list[Run]:
    """``check_pairs`` + ``plan_runs`` in one pass. Submissions carry thousands of pairs (layers x
    K/V x pages x chunks) and this loop is Python, so it does the fewest tensor calls per pair."""
    if len(srcs) != len(dsts):
        check_pairs(srcs, dsts)
    runs: list[Run] = []
    rs = rd = rn = 0
    first = -1
    try:
        for i, (s, d) in enumerate(zip(srcs, dsts)):
            n = s.nbytes
            # equal dtype and equal byte size is equal numel
            if s.dtype != d.dtype or n != d.nbytes or not s.is_contiguous() or not d.is_contiguous():
                raise _BadPair
            if n == 0:
                continue
            sp, dp = s.data_ptr(), d.data_ptr()
            # merge only when both sides continue exactly where the previous pair ended
            if first >= 0 and rs + rn == sp and rd + rn == dp:
                rn += n
                last = i
                continue
            if first >= 0:
                runs.append((rs, rd, rn, first, last))
            rs, rd, rn, first, last = sp, dp, n, i, i
    except (_BadPair, AttributeError, TypeError):
        check_pairs(srcs, dsts)  # raises the precise ValueError
        raise
    if first >= 0:
        runs.append((rs, rd, rn, first, last))
    return runs


def merge_runs(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    """``(src_ptr, dst_ptr, nbytes)`` runs, adjacent pairs merged (src end == next src start AND
    dst end == next dst start), in submission order; empty pairs are dropped.

    srcs, dsts: equal-length sequences of contiguous tensors, pairwise equal numel and dtype, any
    device. Pure: reads pointers only.
    """
    return [(sp, dp, n) for sp, dp, n, _, _ in check_and_plan(srcs, dsts)]


def _flat_view(t: torch.Tensor, ptr: int, numel: int, dtype: torch.dtype, item: int) -> torch.Tensor:
    """1-d ``dtype`` view of ``numel`` elements at ``ptr`` inside ``t``'s storage, on ``t``'s device."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=dtype, device=t.device).set_(storage, (ptr - storage.data_ptr()) // item, (numel,))


def _same_storage(ts: Sequence[torch.Tensor], first: int, last: int) -> bool:
    base = ts[first].untyped_storage().data_ptr()
    return all(ts[i].untyped_storage().data_ptr() == base for i in range(first + 1, last + 1))


def _copy_pairs(srcs: list[torch.Tensor], dsts: list[torch.Tensor], non_blocking: bool) -> None:
    """dsts[i] <- srcs[i]. One ``_foreach_copy_`` call (the per-pair loop runs in C++: a Python
    ``copy_`` per page costs about as much as copying a 16 KiB page); pairs that agree only in
    numel, not in shape, make it refuse, and then each pair is copied through flat views."""
    if not srcs:
        return
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        try:
            foreach(dsts, srcs, non_blocking=non_blocking)
            return
        except RuntimeError:
            pass  # e.g. shapes differ; a real failure raises again below
    for src, dst in zip(srcs, dsts):
        if src.shape == dst.shape:
            dst.copy_(src, non_blocking=non_blocking)
        else:
            dst.view(-1).copy_(src.view(-1), non_blocking=non_blocking)


def copy_runs(runs: list[Run], srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor], non_blocking: bool) -> None:
    """Copy every run: a merged run as one flat copy, a run that crosses allocations pair by pair."""
    src_list: list[torch.Tensor] = []
    dst_list: list[torch.Tensor] = []
    for sp, dp, n, first, last in runs:
        if first == last:
            src_list.append(srcs[first])
            dst_list.append(dsts[first])
        elif _same_storage(srcs, first, last) and _same_storage(dsts, first, last):
            src, dst = srcs[first], dsts[first]
            item = src.element_size()
            offsets = (sp - src.untyped_storage().data_ptr(), dp - dst.untyped_storage().data_ptr(), n)
            # the pairs' dtype when both ranges align to it (torch's CPU copy of uint8 is markedly
            # slower than of wider types), else bytes; the same on both sides, or copy_ would convert
            dtype = src.dtype if all(x % item == 0 for x in offsets) else torch.uint8
            item = item if dtype == src.dtype else 1
            src_list.append(_flat_view(src, sp, n // item, dtype, item))
            dst_list.append(_flat_view(dst, dp, n // item, dtype, item))
        else:
            src_list.extend(srcs[i] for i in range(first, last + 1))
            dst_list.extend(dsts[i] for i in range(first, last + 1))
    _copy_pairs(src_list, dst_list, non_blocking)
