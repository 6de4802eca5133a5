"""``WorldKVHost``: the engine side of the connector contract for one FastVideo denoising stage.

FastVideo keeps dense per-layer caches and no paged pool, so the adapter brings its own: a paged
pool (``PagedKVCache``, ``[2, num_pages, page_size, H, D]`` per layer), the video backend's block
manager and scheduler (window bookkeeping, eviction, page freeing), and the WorldKV connector
(scheduler and worker halves, driven only through the contract in ``worldkv_connector.connector.api``).

Per chunk (one FastVideo block of ``frames_per_chunk`` latent frames) the call order is the video
engine's: ``begin_chunk`` (retrieval by pose, page allocation, loads enqueued), then for every
layer of the first pass ``layer_window`` (waits for that layer's loads, drops a chunk whose load
failed, gathers ``sink | retrieved | recent`` from the pages), and on the clean pass
``commit_layer`` (the chunk's K/V into its pages, then the connector's write-through store);
``end_chunk`` ends the clean pass (``wait_for_save``), commits, evicts and frees pages whose store
finished. ``end_session`` frees the session's pages and, once its stores ended, its bank entries.
One session at a time, batch size 1.
"""
from __future__ import annotations

import logging
import uuid

import numpy as np
import torch

from worldkv_connector.connector import WorldKVConnector
from worldkv_connector.integration.fastvideo.config import FastVideoWorldKVConfig
from worldkv_connector.integration.video.attention import Segment, write_current_kv
from worldkv_connector.integration.video.block_manager import BlockManager
from worldkv_connector.connector.api import EngineView, ForwardContext
from worldkv_connector.integration.video.engine import mean_pose_matrix
from worldkv_connector.integration.video.kv_cache import PagedKVCache
from worldkv_connector.integration.video.scheduler import Scheduler, Session, StepBatch
from worldkv_connector.shapes import KVShape

__all__ = ["WorldKVHost"]

logger = logging.getLogger(__name__)


class WorldKVHost:
    """Paged pool + block manager + scheduler + WorldKV connector for one model on one device.

    kv_shape: the model's self-attention KV (layers, heads, head_dim, tokens per latent frame, dtype).
    """

    def __init__(self, config: FastVideoWorldKVConfig, kv_shape: KVShape, device: torch.device | str):
        self.config = config
        self.kv_shape = kv_shape
        self.device = torch.device(device)
        ps = config.page_size
        self.chunk_tokens = kv_shape.chunk_tokens
        self.chunk_pages = -(-self.chunk_tokens // ps)
        page_bytes = PagedKVCache.page_bytes_of(kv_shape, ps)
        need = config.pool_chunks() * self.chunk_pages
        num_pages = need if config.kv_pool_bytes is None else config.kv_pool_bytes // page_bytes
        if num_pages < need:
            raise ValueError(
                f"FastVideoWorldKVConfig.kv_pool_bytes={config.kv_pool_bytes}: holds {num_pages} pages, the window "
                f"needs {need} ({config.pool_chunks()} chunks of {self.chunk_pages} pages of {page_bytes} bytes); "
                f"give at least {need * page_bytes} or None"
            )
        self.pool = PagedKVCache(kv_shape, ps, num_pages, self.device)
        view = EngineView(
            model=kv_shape.name, num_layers=kv_shape.num_layers, frames_per_chunk=kv_shape.frames_per_chunk,
            frame_tokens=kv_shape.frame_tokens, page_size=ps, num_pages=num_pages, sink_frames=config.sink_frames,
            recent_frames=config.recent_frames, attention_window="sliding", dtype=kv_shape.dtype,
        )
        self.connector = WorldKVConnector(view, kv_shape, config.connector_json(), self.device)
        self.connector.register_kv_caches(self.pool.layers)
        self.bm = BlockManager(num_pages, ps, memory_flag="FastVideoWorldKVConfig.kv_pool_bytes")
        self.scheduler = Scheduler(
            self.bm, frames_per_chunk=kv_shape.frames_per_chunk, frame_tokens=kv_shape.frame_tokens,
            attention_window="sliding", sink_frames=config.sink_frames, recent_frames=config.recent_frames,
            page_bytes=page_bytes, connector=self.connector,
        )
        self.session_id: str | None = None
        self._step = 0
        self._batch: StepBatch | None = None
        self._meta = None
        self._seen_errors: set[int] = set()
        self.retrieved_log: list[list[int]] = []  # per chunk of the session: retrieved chunk ids
        self._closed = False

    # --- sessions -------------------------------------------------------------------------------
    def start_session(self, session_id: str | None = None) -> str:
        """Begin a new world (ends the previous one first)."""
        self._check_open()
        if self.session_id is not None:
            self.end_session()
        sid = session_id or f"fastvideo-{uuid.uuid4().hex[:12]}"
        fpc = self.kv_shape.frames_per_chunk
        placeholder = np.repeat(np.eye(4)[None], fpc, axis=0)  # [F, 4, 4]: one chunk, replaced per chunk
        self.scheduler.add_session(Session(sid, placeholder, 1, fpc, seed=0, keep_results=False))
        self.session_id = sid
        self.retrieved_log = []
        return sid

    @property
    def session(self) -> Session:
        if self.session_id is None:
            raise RuntimeError("WorldKVHost: no session (start_session was not called)")
        return self.scheduler.sessions[self.session_id]

    @property
    def next_chunk(self) -> int:
        return self.session.next_chunk

    def end_session(self) -> None:
        """Free the session's pages and (once its stores ended) its bank entries."""
        if self.session_id is None:
            return
        if self._batch is not None:
            self._abort_chunk()
        sid = self.session_id
        self.scheduler.end_session(sid)
        self.scheduler.poll()
        self.scheduler.sessions.pop(sid, None)
        self.session_id = None

    # --- one chunk ------------------------------------------------------------------------------
    def begin_chunk(self, frame_poses: np.ndarray) -> list[Segment]:
        """Plan the next chunk (frame_poses: [F, 4, 4] camera-to-world of its latent frames): pick
        the chunks to retrieve, allocate, enqueue the loads. Returns the window segments."""
        self._check_open()
        if self._batch is not None:
            raise RuntimeError("WorldKVHost.begin_chunk: the previous chunk's clean pass has not run")
        s = self.session
        fpc = self.kv_shape.frames_per_chunk
        poses = np.asarray(frame_poses, dtype=np.float64)
        if poses.shape != (fpc, 4, 4) or not np.isfinite(poses).all():
            raise ValueError(f"frame_poses: expected finite [{fpc}, 4, 4], got {poses.shape}")
        c = s.next_chunk
        # the session stays 'running': one placeholder chunk past the one being generated
        s.frame_poses = np.concatenate([s.frame_poses[: c * fpc], poses, poses])
        s.total_chunks = c + 2
        self._step += 1
        batch = self.scheduler.schedule(self._step)
        if batch is None or len(batch.sessions) != 1:
            raise RuntimeError("WorldKVHost: expected exactly one running session")
        self._batch = batch
        self.connector.bind_connector_metadata(batch.connector_meta)
        self._meta = batch.plan.to_metadata(self.device)
        self._seen_errors = set()
        # loads start before the first layer; each layer waits for its own (layer_window)
        self.connector.start_load_kv(ForwardContext(self._step, batch.requests, self._meta, self.pool.layers))
        return list(batch.plan.rows[0])

    def window(self) -> list[Segment]:
        """The current chunk's window segments (after load-error drops), current last."""
        return list(self._require_batch().plan.rows[0])

    def layer_window(self, layer: int, k_out: torch.Tensor, v_out: torch.Tensor) -> tuple[int, list[int]]:
        """Wait for ``layer``'s loads and copy its window ``sink | retrieved | recent`` into
        ``k_out``/``v_out`` ([1, >= W, H, D], the window dict's buffers) at [0, W).
        Returns (W tokens, chunk ids in window order)."""
        batch = self._require_batch()
        name = f"blocks.{layer}"
        self.connector.wait_for_layer_load(name)
        errors = set(self.connector.get_block_ids_with_load_errors() or ()) - self._seen_errors
        if errors:
            self._seen_errors |= errors
            dropped = batch.plan.drop_external(errors)
            if dropped:
                logger.warning("worldkv: KV load failed for pages %s; dropped %s from this chunk's window",
                               sorted(errors), dropped)
        kv = self.pool.layers[name]
        pos, ids = 0, []
        for seg in batch.plan.rows[0][:-1]:
            for p, n in zip(seg.page_ids, seg.page_lens):
                k_out[0, pos:pos + n] = kv[0, p, :n]
                v_out[0, pos:pos + n] = kv[1, p, :n]
                pos += n
            ids.append(seg.chunk_id)
        return pos, ids

    def commit_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Clean pass of ``layer``: k, v [1, chunk_tokens, H, D] post-RoPE go into the chunk's pages
        and the connector stores them (compressed, write-through)."""
        self._require_batch()
        name = f"blocks.{layer}"
        kv = self.pool.layers[name]
        write_current_kv(kv, k, v, self._meta.slot_mapping)
        self._meta.is_clean_pass = True
        # after the write: the store reads the committed chunk's pages of this layer
        self.connector.save_kv_layer(name, kv, self._meta)

    def end_chunk(self) -> list[int]:
        """End of the clean pass: commit, evict (banked before pages are reused), free what the
        connector hands back. Returns the chunk ids that were retrieved into this chunk's window."""
        batch = self._require_batch()
        self.connector.wait_for_save()
        self.connector.clear_connector_metadata()
        retrieved = batch.plan.external_ids(0)
        self.scheduler.finish(batch, torch.zeros(1, 0), 0.0, self.resident_kv_bytes(), mean_pose_matrix)
        self._batch = None
        self._meta = None
        self.retrieved_log.append(retrieved)
        return retrieved

    def _abort_chunk(self) -> None:
        # a chunk that never reached its clean pass: nothing of it is stored
        self.connector.clear_connector_metadata()
        self.scheduler.finish(self._batch, torch.zeros(1, 0), 0.0, self.resident_kv_bytes(), mean_pose_matrix)
        self._batch = None
        self._meta = None

    # --- diagnostics ------------------------------------------------------------------------------
    def resident_kv_bytes(self) -> int:
        """Bytes of the paged pool's pages in use (device KV of sink, recent, current, hot set)."""
        return self.bm.num_used * self.pool.page_bytes

    def metrics(self) -> dict:
        out = dict(self.connector.metrics())
        out.update(pool_pages=self.bm.num_pages, pool_pages_used=self.bm.num_used,
                   pool_bytes=self.pool.total_bytes, resident_kv_bytes=self.resident_kv_bytes())
        return out

    def _require_batch(self) -> StepBatch:
        if self._batch is None:
            raise RuntimeError("WorldKVHost: no chunk in progress (begin_chunk was not called)")
        return self._batch

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("WorldKVHost is closed")

    def close(self) -> None:
        if self._closed:
            return
        self.end_session()
        self.connector.close()
        self.scheduler.release_everything()
        self.pool.close()
        self._closed = True
