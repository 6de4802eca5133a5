"""Copy plans: validate (src, dst) pairs and merge the ones adjacent in memory into runs.

Batched DMA collapses for fragments under about 28 KiB and every descriptor costs CPU time
(DESIGN §2), so pairs whose bytes follow each other in both source and destination memory (pages of
one pool, rows of one bank slot) are merged into one run before anything is copied.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["merge_runs", "plan_runs", "check_pairs", "copy_runs", "Run"]

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


def merge_runs(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    """``(src_ptr, dst_ptr, nbytes)`` runs, adjacent pairs merged (src end == next src start AND
    dst end == next dst start), in submission order; empty pairs are dropped.

    srcs, dsts: equal-length sequences of contiguous tensors, pairwise equal numel and dtype, any
    device. Pure: reads pointers only.
    """
    check_pairs(srcs, dsts)
    return [(sp, dp, n) for sp, dp, n, _, _ in plan_runs(srcs, dsts)]


def _byte_view(t: torch.Tensor, ptr: int, nbytes: int) -> torch.Tensor:
    """uint8 view of ``[ptr, ptr + nbytes)`` inside ``t``'s storage, on ``t``'s device."""
    storage = t.untyped_storage()
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(storage, ptr - storage.data_ptr(), (nbytes,))


def _same_storage(ts: Sequence[torch.Tensor], first: int, last: int) -> bool:
    base = ts[first].untyped_storage().data_ptr()
    return all(ts[i].untyped_storage().data_ptr() == base for i in range(first + 1, last + 1))


def copy_runs(runs: list[Run], srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor], non_blocking: bool) -> None:
    """One ``copy_`` per merged run; a run that crosses allocations is copied pair by pair."""
    for sp, dp, n, first, last in runs:
        if first == last:
            dsts[first].view(-1).copy_(srcs[first].view(-1), non_blocking=non_blocking)
        elif _same_storage(srcs, first, last) and _same_storage(dsts, first, last):
            _byte_view(dsts[first], dp, n).copy_(_byte_view(srcs[first], sp, n), non_blocking=non_blocking)
        else:
            for i in range(first, last + 1):
                dsts[i].view(-1).copy_(srcs[i].view(-1), non_blocking=non_blocking)
