"""KV shapes of the models users run (DESIGN §2), shared by the bank, the benchmarks and the
video backend's model configs. Sizes are derived from these fields, never hard-coded."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from worldkv_connector.checks import check_int

__all__ = ["KVShape", "PRESETS", "get_preset"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class KVShape:
    """What one model's KV cache looks like, per latent frame and per layer."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    frame_tokens: int  # tokens per latent frame
    dtype: str = "bf16"  # "bf16", "fp16" or "fp32"
    frames_per_chunk: int = 3

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "frame_tokens", "frames_per_chunk"):
            object.__setattr__(self, field, check_int(f"KVShape.{field}", getattr(self, field), lo=1))
        if self.dtype not in _DTYPES:
            raise ValueError(f"KVShape.dtype={self.dtype!r}: choose one of {sorted(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def chunk_tokens(self) -> int:
        return self.frame_tokens * self.frames_per_chunk

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    def chunk_bytes(self, tokens: int | None = None) -> int:
        """K+V bytes of one chunk over all layers (``tokens`` per layer, default the whole chunk)."""
        tokens = self.chunk_tokens if tokens is None else tokens
        return 2 * self.num_layers * tokens * self.token_bytes

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of one layer's K (a transfer fragment)."""
        return page_size * self.token_bytes


PRESETS: dict[str, KVShape] = {
    p.name: p
    for p in (
        KVShape("tiny", num_layers=2, num_kv_heads=2, head_dim=16, frame_tokens=16, dtype="fp32"),
        KVShape("small", num_layers=4, num_kv_heads=4, head_dim=32, frame_tokens=64, dtype="fp32"),
        KVShape("wan-1.3b", num_layers=30, num_kv_heads=12, head_dim=128, frame_tokens=1560),
        KVShape("matrix-game-2", num_layers=30, num_kv_heads=12, head_dim=128, frame_tokens=880),
        KVShape("lingbot-fast", num_layers=40, num_kv_heads=40, head_dim=128, frame_tokens=1560),
        # LingBot-World-Fast at sequence-parallel 4: each GPU holds a quarter of the heads
        KVShape("lingbot-fast-sp4", num_layers=40, num_kv_heads=10, head_dim=128, frame_tokens=1560),
    )
}


def get_preset(name: str) -> KVShape:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}") from None
