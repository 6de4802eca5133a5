"""Where one vLLM block of one layer lives in a registered KV cache tensor: the known layouts as
contiguous byte fragments, detected and checked once at ``register_kv_caches``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockLayout", "detect_layout"]


@dataclass(frozen=True)
class BlockLayout:
    """Where one block of one layer lives in a registered KV tensor, as contiguous fragments.

    name: "cpu" (vLLM's CPU backend, ``[num_blocks, H, block_size, 2 * D]``, each head holding
    its block's K rows then its V rows, so a block is ``[H, 2, T, D]`` in memory), "kv_nhd"
    (``[2, num_blocks, block_size, H, D]``, flash-attention style) or "block_kv_nhd"
    (``[num_blocks, 2, block_size, H, D]``). The two NHD layouts match the bank's
    ``[2, T, H, D]`` per layer exactly; the "cpu" layout is banked in its own byte order (the
    entry's ``meta["layout"]`` says so) because only this connector ever reads it back.
    """

    name: str

    def cache_fragments(self, kv: torch.Tensor, block_id: int) -> list[torch.Tensor]:
        if self.name == "kv_nhd":
            return [kv[0, block_id], kv[1, block_id]]  # [T, H, D] each
        return [kv[block_id]]  # cpu: [H, T, 2D]; block_kv_nhd: [2, T, H, D]

    def block_parts(self, kv: torch.Tensor) -> tuple[int, list[tuple[int, int]], int]:
        """How one block of one layer maps to bytes: ``(block stride, [(offset in the cache tensor,
        offset in the bank's [2, T, H, D] layer view)], bytes per part)``."""
        item = kv.element_size()
        if self.name == "kv_nhd":
            part = kv[0, 0].numel() * item  # one [T, H, D] of K (or V)
            return kv.stride(1) * item, [(0, 0), (kv.stride(0) * item, part)], part
        return kv.stride(0) * item, [(0, 0)], kv[0].numel() * item


def detect_layout(
    kv: torch.Tensor, *, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
) -> BlockLayout:
    """The layout of one registered per-layer KV tensor, checked for contiguous block fragments.

    kv: the tensor vLLM registers for a layer, any float dtype, any device.
    """
    shapes = {
        "cpu": (num_blocks, num_kv_heads, block_size, 2 * head_size),
        "kv_nhd": (2, num_blocks, block_size, num_kv_heads, head_size),
        "block_kv_nhd": (num_blocks, 2, block_size, num_kv_heads, head_size),
    }
    found = [name for name, shape in shapes.items() if tuple(kv.shape) == shape]
    if len(found) != 1:
        raise ValueError(
            f"unsupported vLLM KV cache layout: tensor shape {tuple(kv.shape)} with num_blocks={num_blocks}, "
            f"block_size={block_size}, num_kv_heads={num_kv_heads}, head_size={head_size} matches "
            f"{found or 'none'} of the known layouts {shapes}"
        )
    layout = BlockLayout(found[0])
    for frag in layout.cache_fragments(kv, 0):
        if not frag.is_contiguous():
            raise ValueError(
                f"KV cache layout {layout.name!r}: a block fragment of shape {tuple(frag.shape)} has strides "
                f"{frag.stride()}, not contiguous; the copy engine needs contiguous block fragments"
            )
    return layout
