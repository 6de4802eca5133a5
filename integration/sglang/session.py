"""One SGLang cache list (one request or realtime session) driven through the WorldKV connector.

SGLang keeps a dense ``[B, cache_size, H, D]`` K/V per transformer block and asks each block's cache
for the visible window. Here every block's K/V lives in a paged pool (``[2, num_pages, page_size,
H, D]`` per block, shared by all sessions of one :class:`WorldKVRuntime`), and a
:class:`WorldKVSession` plays the engine of ``worldkv_connector/connector/api.py`` for its session:

- first block call of a new chunk -> :meth:`WorldKVSession.begin_chunk`: ask the connector which
  banked chunks to put back, allocate their pages, plan the step (loads, the write-through store of
  this chunk, the chunk leaving the recent window), start the loads;
- every block call -> :meth:`WorldKVSession.attend`: wait for that block's loads, write the chunk's
  K/V into its pages, return ``sink | retrieved | recent | current`` gathered from the pages (a
  chunk whose load failed is left out); during the clean pass it also hands the block to the store;
- end of the clean pass -> :meth:`WorldKVSession.end_chunk`: the chunk joins the sink or the recent
  window, the oldest recent chunk leaves it (its pages stay held until its store ended), finished
  copies are collected;
- :meth:`WorldKVSession.close` at session end frees what the session holds; its bank entries go
  once its stores ended.
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import torch

from worldkv_connector.integration.video.block_manager import CONNECTOR_OWNER, EVICTED_OWNER, BlockManager, ChunkBlocks
from worldkv_connector.connector.api import (
    AttentionMetadata, ChunkRequest, CommittedChunk, ForwardContext, SchedulerOutput,
)

__all__ = ["WorldKVSession"]

logger = logging.getLogger(__name__)



class WorldKVSession:
    """The window bookkeeping of one SGLang session (batch size 1).

    runtime: the :class:`~worldkv_connector.integration.sglang.runtime.WorldKVRuntime` that owns the
    connector, the page allocator and the pools. session_id: the connector's id of the session.
    """

    def __init__(self, runtime, session_id: str):
        self.rt = runtime
        self.session_id = session_id
        self.fpc = runtime.frames_per_chunk
        self.chunk_tokens = runtime.chunk_tokens
        self.sink: list[int] = []
        self.recent: collections.deque[int] = collections.deque()
        self.next_chunk = 0
        self.closed = False
        self.poses: np.ndarray | None = None  # [F, 4, 4] absolute camera-to-world per latent frame
        self._step: dict | None = None  # the open chunk step
        self.peak_pages = 0
        runtime.bm.add_session(session_id)

    # --- window -------------------------------------------------------------------------------
    def _victim(self, chunk: int) -> int | None:
        if len(self.sink) < self.rt.sink_chunks:
            return None
        if len(self.recent) + 1 <= self.rt.recent_chunks:
            return None
        return self.recent[0] if self.recent else chunk

    def _frame_poses(self, chunk: int) -> np.ndarray:
        """[fpc, 4, 4] camera-to-world of the chunk's latent frames (the last known pose holds)."""
        if self.poses is None or len(self.poses) == 0:
            return np.repeat(np.eye(4)[None], self.fpc, axis=0)
        idx = np.minimum(np.arange(chunk * self.fpc, (chunk + 1) * self.fpc), len(self.poses) - 1)
        return self.poses[idx].astype(np.float64)

    @property
    def in_step(self) -> bool:
        return self._step is not None

    def begin_chunk(self, chunk: int) -> None:
        """Plan the step that generates ``chunk`` (called by the first block of its first pass)."""
        if self.closed:
            raise RuntimeError(f"worldkv session {self.session_id!r} is closed")
        if chunk != self.next_chunk:
            raise ValueError(
                f"worldkv session {self.session_id!r}: chunk {chunk} started, expected chunk {self.next_chunk} "
                "(chunks must be generated in order; a restart must reset the cache)"
            )
        rt, bm, sid = self.rt, self.rt.bm, self.session_id
        ps = bm.page_size
        poses = self._frame_poses(chunk)
        req = ChunkRequest(sid, chunk, chunk * self.fpc, poses, rt.frame_tokens, ps)
        table = bm.table(sid)
        computed = sum(table[c].num_tokens for c in self.sink + list(self.recent))
        rt.connector.get_num_new_matched_tokens(req, computed)
        rt.free_connector_pages(req.release_pages, "release_pages")
        block_ids, externals = [], []
        for ext in req.external:
            if ext.needs_load:
                ext.page_ids = bm.allocate(ext.num_pages(ps), CONNECTOR_OWNER)
                block_ids.append(list(ext.page_ids))
            externals.append((ext.chunk_id, ChunkBlocks(tuple(ext.page_ids), ext.num_tokens)))
        rt.connector.update_state_after_alloc(req, block_ids, sum(e.num_tokens for e in req.external if e.needs_load))
        cur = bm.append_chunk(sid, chunk, self.chunk_tokens)
        done = CommittedChunk(sid, chunk, list(cur.page_ids), self.chunk_tokens, poses.copy())
        victim = self._victim(chunk)
        evicted = []
        if victim is not None:
            vb = table[victim] if victim != chunk else cur
            evicted.append(CommittedChunk(sid, victim, list(vb.page_ids), vb.num_tokens, self._frame_poses(victim)))
        step = rt.next_step()
        meta = rt.connector.build_connector_meta(SchedulerOutput(step, [req], [done], evicted=evicted))
        segments = ([("sink", c, table[c]) for c in self.sink] + [("external", c, b) for c, b in externals]
                    + [("recent", c, table[c]) for c in self.recent] + [("current", chunk, cur)])
        attn = self._attn_metadata(segments, cur, done)
        rt.connector.bind_connector_metadata(meta)
        rt.connector.start_load_kv(ForwardContext(step, [req], attn, rt.kv_caches))
        self._step = {"chunk": chunk, "segments": segments, "current": cur, "victim": victim, "attn": attn,
                      "retrieved": [c for c, _ in externals], "dropped": set()}
        self.peak_pages = max(self.peak_pages, bm.num_used)

    def _attn_metadata(self, segments, cur: ChunkBlocks, done: CommittedChunk) -> AttentionMetadata:
        ps = self.rt.bm.page_size
        pages = [p for _, _, b in segments for p in b.page_ids]
        lens = [n for _, _, b in segments for n in b.page_lens(ps)]
        dev = self.rt.device
        slots = [p * ps + o for p, n in zip(cur.page_ids, cur.page_lens(ps)) for o in range(n)]
        return AttentionMetadata(
            block_table=torch.tensor([pages], dtype=torch.int32, device=dev),
            page_lens=torch.tensor([lens], dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor([slots], dtype=torch.int64, device=dev),
            session_ids=[self.session_id], committed=[done],
        )

    # --- per block ------------------------------------------------------------------------------
    def _gather(self, pool: torch.Tensor, blocks: ChunkBlocks, heads: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """pool: [2, P, page_size, H, D] -> (k, v) [n, h, D] of the chunk's valid tokens."""
        kv = pool[:, list(blocks.page_ids)].flatten(1, 2)[:, : blocks.num_tokens]
        if heads is not None:
            kv = kv[:, :, heads]
        return kv[0], kv[1]

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor, heads: slice | None,
               clean: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's K/V of block ``layer`` and return its window.

        key, value: [1, chunk_tokens, h, D] (h = the heads of ``heads``, all cache heads when None).
        Returns (k, v) [1, N, h, D]: sink | retrieved (failed loads left out) | recent | current.
        """
        st, rt = self._step, self.rt
        name = f"blocks.{layer}"
        rt.connector.wait_for_layer_load(name)
        failed = rt.connector.get_block_ids_with_load_errors()
        if failed:
            for kind, cid, b in st["segments"]:
                if kind == "external" and cid not in st["dropped"] and failed.intersection(b.page_ids):
                    st["dropped"].add(cid)
                    logger.warning("worldkv: load of chunk %d of %s failed; it is left out of the window",
                                   cid, self.session_id)
        pool = rt.kv_caches[name]
        slots = st["attn"].slot_mapping[0]  # [chunk_tokens] flat slot of each current token
        flat = pool.view(2, -1, *pool.shape[3:])  # [2, num_pages * page_size, H, D], shares memory
        if heads is None:
            flat[0, slots] = key[0]
            flat[1, slots] = value[0]
        else:
            flat[0, slots, heads] = key[0]
            flat[1, slots, heads] = value[0]
        ks, vs = [], []
        for kind, cid, b in st["segments"]:
            if kind == "external" and cid in st["dropped"]:
                continue
            k, v = self._gather(pool, b, heads)
            ks.append(k), vs.append(v)
        if clean:
            st["attn"].is_clean_pass = True
            rt.connector.save_kv_layer(name, pool, st["attn"])
        return torch.cat(ks)[None], torch.cat(vs)[None]

    # --- end of the step ------------------------------------------------------------------------
    def end_chunk(self) -> list[int]:
        """After the clean pass: commit the chunk, evict, collect finished copies. Returns the
        chunk ids that were in the window as retrieved chunks (after load-error drops)."""
        st, rt = self._step, self.rt
        if st is None:
            return []
        rt.connector.wait_for_save()
        rt.connector.clear_connector_metadata()
        chunk = st["chunk"]
        (self.sink if len(self.sink) < rt.sink_chunks else self.recent).append(chunk)
        victim = st["victim"]
        if victim is not None:
            self.recent.remove(victim)
            rt.bm.remove_chunk(self.session_id, victim, to_owner=EVICTED_OWNER)
        self.next_chunk += 1
        self._step = None
        rt.poll()
        return [c for c in st["retrieved"] if c not in st["dropped"]]

    def close(self) -> None:
        """Session end: the connector releases the session's hot set; its bank entries go once its
        stores ended (the connector's session-end path)."""
        if self.closed:
            return
        if self._step is not None:  # aborted mid-chunk: its store ends unbanked (not every layer saved)
            self.rt.connector.wait_for_save()
            self.rt.connector.clear_connector_metadata()
            self._step = None
        self.closed = True
        self.rt.end_session(self.session_id)
