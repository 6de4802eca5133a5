"""Copy descriptors as numpy address arrays: validation and merging of adjacent fragments.

One home for what the transfer engine's fragment plans (``transfer.fragments``) and the CUDA copy
kernels' launcher (``cuda_copy``) both need. Pure numpy: runs anywhere.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_u64", "run_heads"]


def as_u64(name: str, values) -> np.ndarray:
    """A 1-d sequence of non-negative integers (list, numpy array or tensor) as uint64; ``ValueError``
    naming ``name`` otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"{name}: expected non-negative values, got min {int(arr.min())}")
    return arr.astype(np.uint64, copy=False)


def run_heads(src: np.ndarray, dst: np.ndarray, sizes: np.ndarray, *same: np.ndarray) -> np.ndarray:
    """Index of the first fragment of each run: a fragment joins the previous one when it continues
    it on both sides (and, for every array in ``same``, has the same value there, e.g. the same
    storage). src, dst, sizes: [F] uint64. Merged sizes: ``np.add.reduceat(sizes, heads)``."""
    if src.size <= 1:
        return np.arange(src.size)
    continues = (src[1:] == src[:-1] + sizes[:-1]) & (dst[1:] == dst[:-1] + sizes[:-1])
    for key in same:
        continues &= key[1:] == key[:-1]
    return np.flatnonzero(np.concatenate(([True], ~continues)))
