"""RankGroup: the collectives the connector's ranks need, over a torch.distributed process group.

A sharded model (tensor parallel over heads, or Ulysses sequence parallel, whose attention also
holds a head shard per rank) runs one connector per rank, each banking and loading only its own
heads. The ranks must agree on everything else:

- **the plan**: rank 0 decides retrieval and ``broadcast`` sends its plan to every rank;
- **the plan digest**: ``check_plan(step, plan)`` compares a sha256 of each rank's plan and raises
  ``PlanDivergenceError`` naming the ranks that differ, before any copy runs;
- **success masks**: ``all_min(mask)`` (logical and over ranks), so a chunk whose store or load
  failed on any rank is dropped on all of them;
- **statistics**: ``all_sum(t)`` (e.g. the compression's partial dot products and norms, so every
  rank keeps the same tokens).

Works on any backend (gloo on the CPU, NCCL on GPUs: tensors go to ``device``). One group per
connector; not thread-safe, like the process group.
"""
from __future__ import annotations

import hashlib
import pickle
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["RankGroup", "PlanDivergenceError", "plan_digest"]


class PlanDivergenceError(RuntimeError):
    """The ranks' per-step plans differ: continuing would attend to different chunks per head shard."""


def plan_digest(plan: Any) -> bytes:
    """sha256 of a plan (any picklable object of plain values: ids, tuples, lists, dicts)."""
    return hashlib.sha256(pickle.dumps(plan, protocol=4)).digest()


class RankGroup:
    """rank / size of this process in ``group`` (default: the world group, which must be
    initialised); ``device``: where collective tensors live (cpu for gloo)."""

    def __init__(self, group=None, *, device: str | torch.device = "cpu") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("RankGroup needs torch.distributed initialised (dist.init_process_group) first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = torch.device(device)

    def head_shard(self, num_heads: int) -> slice:
        """This rank's contiguous slice of ``num_heads`` heads (``num_heads`` divisible by the size)."""
        if num_heads % self.size:
            raise ValueError(f"num_heads={num_heads} is not divisible by {self.size} ranks")
        n = num_heads // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    # --- collectives ---------------------------------------------------------------------------
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (others pass anything, e.g. None)."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_min(self, mask: Sequence[bool]) -> list[bool]:
        """Element-wise AND over ranks (the minimum of 0/1): True only where every rank succeeded.
        Every rank must pass a mask of the same length."""
        t = torch.tensor([1 if m else 0 for m in mask], dtype=torch.int32, device=self.device)
        length = torch.tensor([t.numel()], dtype=torch.int64, device=self.device)
        lo, hi = length.clone(), length.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        if lo.item() != hi.item():
            raise PlanDivergenceError(f"success masks of {lo.item()} to {hi.item()} entries across ranks: the ranks "
                                      "disagree on what the step moved")
        if t.numel():
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return [bool(x) for x in t.tolist()]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (returned; ``t`` is not modified). Every rank gets identical values."""
        out = t.detach().to(self.device, copy=True).contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(t.device)

    def check_plan(self, step: int, plan: Any) -> bytes:
        """Raise ``PlanDivergenceError`` unless every rank's ``plan`` for ``step`` has the same digest.
        Returns the digest."""
        mine = plan_digest(plan)
        digests = self.gather(mine)
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise PlanDivergenceError(f"step {step}: the plan of rank(s) {bad} differs from rank 0's "
                                      f"(digests {[d.hex()[:12] for d in digests]}); the ranks would attend to "
                                      "different chunks")
        return mine
