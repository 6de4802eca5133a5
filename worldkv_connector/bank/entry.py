"""The bookkeeping record of one banked chunk/block, shared by the bank, its eviction policies and
its disk tier (its payload lives in the bank's slab)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np
import torch

__all__ = ["BankEntry", "BankKey"]

BankKey = Hashable


@dataclass
class BankEntry:
    """Bookkeeping of one banked chunk/block (the payload lives in the bank's slab)."""

    key: BankKey
    slot: int  # -1 while the entry is on the disk tier
    num_tokens: int
    nbytes: int  # payload bytes: 2 * L * num_tokens * H * D * itemsize
    tier: str  # the bank's tier ("cpu"/"gpu") or "disk"
    ready: bool = False  # False while its store is in flight; only ready entries are evictable
    pins: int = 0  # in-flight transfers reading or writing it; pinned entries are never freed
    last_used: int = 0  # logical clock of the last reserve/touch
    indices: torch.Tensor | None = None  # kept token ids [L, num_tokens], CPU int64
    counts: torch.Tensor | None = None  # tokens merged into each kept one [L, num_tokens] fp32 (tempcache); None: 1
    pose: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
