"""The bank's sizes, validated once: what one slot holds and how many slots the capacity gives.

A slot has the layout ``[num_layers, 2, slot_tokens, num_kv_heads, head_dim]`` (2 = K, V); an entry
of ``num_tokens`` tokens uses the first ``num_tokens`` rows of each (layer, K/V) run.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from worldkv_connector.bank.slab import TIERS
from worldkv_connector.checks import check_int

__all__ = ["BankLayout"]


def _positive_int(name: str, value: Any) -> int:
    return check_int(f"Bank {name}", value, 1)


@dataclass(frozen=True)
class BankLayout:
    """The shape of a bank's slots and its capacity (``ValueError`` naming the field when invalid);
    the derived sizes are computed once."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    slot_tokens: int
    capacity_bytes: int
    tier: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "slot_tokens", "capacity_bytes"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"Bank dtype={self.dtype!r}: expected a floating torch.dtype")
        if self.tier not in TIERS:
            raise ValueError(f"Bank tier={self.tier!r}: choose one of {list(TIERS)}")
        if self.slot_bytes > self.capacity_bytes:
            raise ValueError(f"chunk of {self.slot_bytes} bytes is larger than the whole bank of "
                             f"{self.capacity_bytes} bytes: raise bank_bytes")

    @cached_property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @cached_property
    def token_bytes(self) -> int:
        """One token of K (or V) of one layer."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    @cached_property
    def slot_bytes(self) -> int:
        return self.entry_bytes(self.slot_tokens)

    @cached_property
    def num_slots(self) -> int:
        return self.capacity_bytes // self.slot_bytes

    def entry_bytes(self, num_tokens: int) -> int:
        return 2 * self.num_layers * num_tokens * self.token_bytes

    def slab_shape(self) -> tuple[int, ...]:
        """``[num_slots, num_layers, 2, slot_tokens, H, D]``."""
        return (self.num_slots, self.num_layers, 2, self.slot_tokens, self.num_kv_heads, self.head_dim)

    def payload_shape(self, num_tokens: int) -> tuple[int, ...]:
        """``[num_layers, 2, num_tokens, H, D]``: one entry's K/V."""
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def check_tokens(self, num_tokens: Any) -> None:
        check_int("num_tokens", num_tokens, 1, self.slot_tokens)

    def kept_indices(self, indices: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
        """Kept token ids ``[L, num_tokens]`` (or ``[num_tokens]``), any int dtype and device, as CPU
        int64; ``ValueError`` on another shape."""
        if indices is None:
            return None
        if not isinstance(indices, torch.Tensor) or indices.ndim not in (1, 2) or indices.shape[-1] != num_tokens:
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices must be [{self.num_layers}, {num_tokens}] token ids, got {got}")
        if indices.ndim == 2 and indices.shape[0] != self.num_layers:
            raise ValueError(f"indices must be [{self.num_layers}, {num_tokens}] token ids, got {tuple(indices.shape)}")
        return indices.detach().to("cpu", torch.int64)
