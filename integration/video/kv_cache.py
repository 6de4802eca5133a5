"""The paged KV cache of the video backend: one ``[2, num_pages, page_size, H, D]`` tensor per layer
(K at index 0, V at index 1), registered to a connector as ``kv_caches["blocks.{i}"]``.

A page id addresses the same slot in every layer (one block table serves all layers, as in vLLM),
so the cache is sized in *page ids*: one page id costs ``2 * num_layers * page_size * H * D *
itemsize`` bytes. The size comes from ``--kv-cache-memory`` (GiB) or, when not given, from the
device: a share of free GPU memory after the model is loaded, or a fixed budget on the CPU.
"""
from __future__ import annotations

import torch

from worldkv_connector.shapes import KVShape

__all__ = ["PagedKVCache", "AUTO_CPU_KV_GIB", "AUTO_CUDA_KV_FRACTION"]

_GiB = 1 << 30
AUTO_CPU_KV_GIB = 0.25  # auto budget on the CPU (tiny/small rollouts need a few MB)
AUTO_CUDA_KV_FRACTION = 0.8  # auto budget on CUDA: this share of free memory after the model


class PagedKVCache:
    def __init__(self, kv_shape: KVShape, page_size: int, num_pages: int, device: torch.device):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages}, page_size={page_size}: expected >= 1")
        self.kv_shape = kv_shape
        self.page_size = page_size
        self.num_pages = num_pages
        self.device = torch.device(device)
        shape = (2, num_pages, page_size, kv_shape.num_kv_heads, kv_shape.head_dim)
        # zeroed so padding slots never hold NaN garbage that a kernel could multiply by a zero weight
        self.layers: dict[str, torch.Tensor] = {
            f"blocks.{i}": torch.zeros(shape, dtype=kv_shape.torch_dtype, device=self.device)
            for i in range(kv_shape.num_layers)
        }

    @staticmethod
    def page_bytes_of(kv_shape: KVShape, page_size: int) -> int:
        """Bytes of one page id over all layers, K and V."""
        return 2 * kv_shape.num_layers * kv_shape.page_bytes(page_size)

    @classmethod
    def from_budget(cls, kv_shape: KVShape, page_size: int, budget_bytes: int | None,
                    device: torch.device) -> "PagedKVCache":
        """Size the cache from ``budget_bytes`` (None: auto for ``device``). Raises ValueError naming
        ``--kv-cache-memory`` when the budget holds no page."""
        device = torch.device(device)
        if budget_bytes is None:
            budget_bytes = cls.auto_budget(device)
        return cls(kv_shape, page_size, cls.num_pages_for(kv_shape, page_size, budget_bytes), device)

    @staticmethod
    def auto_budget(device: torch.device) -> int:
        """The budget without ``--kv-cache-memory``: a share of free GPU memory, or a fixed CPU budget."""
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * AUTO_CUDA_KV_FRACTION)
        return int(AUTO_CPU_KV_GIB * _GiB)

    @classmethod
    def num_pages_for(cls, kv_shape: KVShape, page_size: int, budget_bytes: int) -> int:
        """Page ids that fit ``budget_bytes``; ValueError naming ``--kv-cache-memory`` if none."""
        page_bytes = cls.page_bytes_of(kv_shape, page_size)
        pages = int(budget_bytes // page_bytes)
        if pages < 1:
            raise ValueError(
                f"--kv-cache-memory {budget_bytes / _GiB:.6g} GiB holds no page: one page of {page_size} tokens "
                f"over {kv_shape.num_layers} layers takes {page_bytes} bytes; raise --kv-cache-memory"
            )
        return pages

    @property
    def page_bytes(self) -> int:
        return self.page_bytes_of(self.kv_shape, self.page_size)

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def gather(self, layer: int, page_ids: list[int], page_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid tokens of some pages of one layer, in order: (k, v) each [N, H, D] (copies).
        For tests and debugging; attention reads pages in place."""
        kv = self.layers[f"blocks.{layer}"]
        k = torch.cat([kv[0, p, :n] for p, n in zip(page_ids, page_lens)])
        v = torch.cat([kv[1, p, :n] for p, n in zip(page_ids, page_lens)])
        return k, v

    def close(self) -> None:
        self.layers.clear()
