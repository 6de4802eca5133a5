"""``WorldKVCausalKVCache``: SGLang's ``CausalSelfAttentionKVCache`` whose window comes from the
WorldKV connector (imports sglang; loaded by the plugin inside an SGLang process).

One cache object per transformer block, as SGLang allocates them; the blocks of one list share a
:class:`CacheGroup`, which owns the list's current :class:`WorldKVSession`. The dense ``k``/``v``
of the base class are empty placeholders ``[B, 0, H, D]`` (they keep ``num_cache_heads``); the K/V
lives in the runtime's paged pool.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from sglang.multimodal_gen.runtime.layers.kvcache.causal_attention_cache import (
    CausalAttentionKVView, CausalSelfAttentionKVCache,
)

__all__ = ["WorldKVCausalKVCache", "CacheGroup", "POSES_KEY"]

logger = logging.getLogger(__name__)

POSES_KEY = "worldkv_c2ws"  # batch.extra key: [F, 4, 4] absolute camera-to-world per latent frame


class CacheGroup:
    """The blocks of one SGLang cache list: one WorldKV session at a time."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.session = None
        self.clean = False  # inside the clean pass (``_update_causal_context_cache``)
        self.retrieved: list[list[int]] = []  # per committed chunk: retrieved chunk ids (diagnostics)
        self._warned_poseless = False

    def current(self):
        if self.session is None or self.session.closed:
            self.session = self.runtime.new_session()
            self.retrieved = []
        return self.session

    def set_poses(self, forward_batch) -> None:
        extra = getattr(forward_batch, "extra", None) or {}
        poses = extra.get(POSES_KEY)
        if poses is not None:
            self.session.poses = np.asarray(poses, dtype=np.float64)
        elif not self._warned_poseless:
            self._warned_poseless = True
            how = ("retrieval is off (WORLDKV_POSELESS=off)" if self.runtime.config.retrieval_chunks == 0
                   else "every chunk has the identity pose (WORLDKV_POSELESS=static)")
            logger.info("worldkv: %s has no camera poses; %s", self.runtime.geometry.model, how)

    def end_chunk(self) -> None:
        if self.session is not None and self.session.in_step:
            self.retrieved.append(self.session.end_chunk())

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class WorldKVCausalKVCache(CausalSelfAttentionKVCache):
    """One block's view of the WorldKV window. ``update_and_get_attention_kv`` returns
    ``sink | retrieved | recent | current`` (keys roped at their absolute positions)."""

    def __init__(self, *, group: CacheGroup, layer: int, batch_size: int, num_heads: int, head_dim: int,
                 cache_size: int, sink_tokens: int, dtype, device):
        empty = torch.zeros(batch_size, 0, num_heads, head_dim, dtype=dtype, device=device)
        super().__init__(k=empty, v=empty.clone(), global_end_index=torch.zeros(1, dtype=torch.long, device=device),
                         local_end_index=torch.zeros(1, dtype=torch.long, device=device), cache_size=cache_size,
                         sink_tokens=sink_tokens, attention_window_size=cache_size)
        self.group = group
        self.layer = layer

    def reset_indices(self) -> None:
        super().reset_indices()
        if self.layer == 0:  # a new request on this list: the old session ends
            self.group.close()

    def can_direct_current_attention(self, num_new_tokens: int) -> bool:
        return False

    def update_and_get_attention_kv(self, *, key: torch.Tensor, value: torch.Tensor, current_chunk_start: int,
                                    cache_head_start: int | None = None, recent_window_tokens: int | None = None,
                                    debug_name: str = "WorldKV cache") -> CausalAttentionKVView:
        rt = self.group.runtime
        b, n, h, _ = key.shape
        if b != 1:
            raise ValueError(f"{debug_name}: the worldkv plugin runs batch size 1 per cache list, got {b}")
        if n != rt.chunk_tokens or current_chunk_start % rt.chunk_tokens:
            raise ValueError(
                f"{debug_name}: a write of {n} tokens at {current_chunk_start}; the worldkv plugin needs whole "
                f"chunks of {rt.chunk_tokens} tokens ({rt.frames_per_chunk} frames) at chunk boundaries"
            )
        heads = None
        if h != self.num_cache_heads:
            if cache_head_start is None:
                raise ValueError(f"{debug_name}: {h} of {self.num_cache_heads} heads given without cache_head_start")
            heads = slice(cache_head_start, cache_head_start + h)
        session = self.group.current()
        chunk = current_chunk_start // rt.chunk_tokens
        if not session.in_step:
            from sglang.multimodal_gen.runtime.managers.forward_context import get_forward_context_or_none

            ctx = get_forward_context_or_none()
            self.group.set_poses(None if ctx is None else ctx.forward_batch)
            session.begin_chunk(chunk)
        k, v = session.attend(self.layer, key, value, heads, self.group.clean)
        end = current_chunk_start + n
        self.global_end_index_int = end
        return CausalAttentionKVView(k=k, v=v, local_start_index=k.shape[1] - n, local_end_index=k.shape[1],
                                     visible_local_end=k.shape[1], visible_global_end=end)
