"""Scheduler of the video backend (pure Python: ids, poses and page bookkeeping, no device work).

One engine step generates the next chunk of every running session. Per step the scheduler builds
each session's window ``[sink | external | recent | current]`` from its block table, asks the
connector (if any) which chunks to put back, allocates pages, and after the step commits the
chunks, evicts what left the recent window and frees what may be freed.

Trajectory frames map to latent frames 1:1 (frame ``f`` of the trajectory is the camera of latent
frame ``f``; the VAE's 4x temporal compression is outside this engine), and a trajectory shorter
than the rollout holds its last pose.
"""
from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from worldkv_connector.integration.video.attention import Segment, WindowPlan
from worldkv_connector.integration.video.block_manager import (
    CONNECTOR_OWNER, EVICTED_OWNER, BlockManager, ChunkBlocks, KVCacheOutOfPages,
)
from worldkv_connector.connector.api import (
    ChunkRequest, CommittedChunk, SchedulerOutput, VideoKVConnector,
)
from worldkv_connector.integration.video.model_runner import RowInput

__all__ = ["Session", "ChunkResult", "StepBatch", "Scheduler", "CONNECTOR_OWNER", "EVICTED_OWNER", "session_pages",
           "kv_shortage_message"]

logger = logging.getLogger(__name__)



def _parked(session_id: str) -> str:
    return f"__finished__:{session_id}"  # pages of a finished session the connector asked to keep


def session_pages(num_chunks: int, *, window: str, sink_chunks: int, recent_chunks: int, chunk_pages: int,
                  hot_pages: int = 0) -> int:
    """Most KV pages one session holds at once: its window (every chunk for ``full``; sink + recent
    for ``sliding``) plus the chunk being generated, plus ``hot_pages``, the pages a connector's
    hot set of retrieved chunks may hold for it (a hard bound: released hot pages are freed before
    a step allocates its loads)."""
    if window == "full":
        return num_chunks * chunk_pages
    return min(num_chunks, sink_chunks + recent_chunks + 1) * chunk_pages + hot_pages


def kv_shortage_message(need_pages: int, have_pages: int, page_bytes: int, *, window: str, sessions: int,
                        hot_pages: int) -> str:
    """The error for a KV cache smaller than a run needs: the exact budget and the flags that apply."""
    gib = need_pages * page_bytes / (1 << 30)
    digits = max(4, 4 - math.floor(math.log10(gib)) if gib > 0 else 4)
    at_least = math.ceil(gib * 10 ** digits) / 10 ** digits  # rounded up: this value is enough
    alternatives = []
    if window == "full":
        alternatives.append("--attention-window sliding")
    if sessions > 1:
        alternatives.append("fewer --sessions")
    if hot_pages:
        alternatives.append("a smaller hot_chunks in --kv-connector-config")
    alt = f" (or {', '.join(alternatives)})" if alternatives else ""
    return (f"KV cache too small: the run holds up to {need_pages} pages at once ({gib:.4g} GiB with "
            f"--attention-window {window}{', the connector hot set' if hot_pages else ''}), the cache has "
            f"{have_pages} pages; raise --kv-cache-memory to at least {at_least:g}{alt}")


@dataclass
class ChunkResult:
    """One generated chunk."""

    session_id: str
    chunk_index: int
    latents: torch.Tensor  # [F, C, Hl, Wl] fp32, CPU
    pose: np.ndarray  # [4, 4] the chunk's mean camera-to-world (mean translation, mean rotation matrix)
    retrieved: list[int]  # chunk ids a connector put in the window (after load-error drops)
    step_seconds: float  # wall time of the engine step that produced it
    resident_kv_bytes: int  # KV bytes allocated on the device during that step
    finished: bool  # last chunk of its session
    step: int = 0  # engine step that produced it (sessions in one step share it)
    # per-layer attention recall (EngineArgs.eval_attention_recall; integration/video/recall.py), else None
    attention_recall: list[float] | None = None

    @property
    def attention_recall_mean(self) -> float | None:
        return None if not self.attention_recall else sum(self.attention_recall) / len(self.attention_recall)


@dataclass
class Session:
    """One rollout. ``frame_poses``: [P, 4, 4] camera-to-world per latent frame; chunk ``c`` uses
    frames ``[c*F, (c+1)*F)`` and frames past the end hold the last pose, so a long rollout of a
    short trajectory costs no memory per chunk."""

    session_id: str
    frame_poses: np.ndarray  # [P, 4, 4] float64
    total_chunks: int
    frames_per_chunk: int
    seed: int
    context: torch.Tensor | None = None  # [Lc, text_dim]
    next_chunk: int = 0
    sink: list[int] = field(default_factory=list)  # committed chunk ids in the sink
    recent: collections.deque = field(default_factory=collections.deque)  # committed ids, oldest first
    results: list[ChunkResult] = field(default_factory=list)
    keep_results: bool = True  # False: ChunkResults are only returned by step(), not kept (long runs)

    @property
    def num_chunks(self) -> int:
        return self.total_chunks

    def poses_of(self, chunk: int) -> np.ndarray:
        """[F, 4, 4] camera-to-world of chunk ``chunk``'s latent frames (a copy)."""
        if not 0 <= chunk < self.total_chunks:
            raise IndexError(f"chunk {chunk} of session {self.session_id!r}: it has {self.total_chunks}")
        frames = np.arange(chunk * self.frames_per_chunk, (chunk + 1) * self.frames_per_chunk)
        return self.frame_poses[np.minimum(frames, self.frame_poses.shape[0] - 1)].copy()

    @property
    def chunk_poses(self) -> "_ChunkPoses":
        """``chunk_poses[c]``: [F, 4, 4] of chunk c, computed on access (``shape`` [C, F, 4, 4])."""
        return _ChunkPoses(self)


    @property
    def finished(self) -> bool:
        return self.next_chunk >= self.num_chunks


class _ChunkPoses:
    def __init__(self, session: Session) -> None:
        self._s = session
        self.shape = (session.total_chunks, session.frames_per_chunk, 4, 4)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, chunk: int) -> np.ndarray:
        return self._s.poses_of(int(chunk))


@dataclass
class StepBatch:
    step: int
    sessions: list[Session]
    rows: list[RowInput]
    requests: list[ChunkRequest]
    plan: WindowPlan
    victims: list[int | None] = field(default_factory=list)  # per row: chunk leaving the window after the step
    connector_meta: object = None


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, frames_per_chunk: int, frame_tokens: int,
                 attention_window: str, sink_frames: int, recent_frames: int, page_bytes: int,
                 connector: VideoKVConnector | None = None, hot_pages: int = 0):
        self.bm = block_manager
        self.fpc = frames_per_chunk
        self.frame_tokens = frame_tokens
        self.chunk_tokens = frames_per_chunk * frame_tokens
        self.window = attention_window
        self.sink_chunks = sink_frames // frames_per_chunk
        self.recent_chunks = recent_frames // frames_per_chunk
        self.page_bytes = page_bytes
        self.connector = connector
        self.hot_pages = hot_pages  # pages a connector's hot set may hold per session
        # running sessions, and finished ones that keep results until removed (drop_session)
        self.sessions: dict[str, Session] = {}
        self.sessions_total = 0
        self._parked: set[str] = set()

    # --- sessions -------------------------------------------------------------------------------
    def _resident_pages(self, s: Session) -> int:
        """Most pages a session holds at once (window, current chunk and the connector's hot set)."""
        return session_pages(s.num_chunks, window=self.window, sink_chunks=self.sink_chunks,
                             recent_chunks=self.recent_chunks, chunk_pages=self.bm.pages_for(self.chunk_tokens),
                             hot_pages=self.hot_pages if self.connector is not None else 0)

    def add_session(self, session: Session) -> None:
        """Queue a session. A finished session's id may be used again once it was dropped (sessions
        added with keep_results=False are dropped when they finish)."""
        old = self.sessions.get(session.session_id)
        if old is not None:
            state = "is still running" if not old.finished else "finished but keeps its results (drop it first)"
            raise ValueError(f"session id {session.session_id!r} is already in use: it {state}")
        if session.session_id in self._parked:
            raise ValueError(f"session id {session.session_id!r}: its previous run's pages are still held by the "
                             "connector (stores in flight); poll or drain the engine first")
        running = self.running()
        need = self._resident_pages(session) + sum(self._resident_pages(s) for s in running)
        if need > self.bm.num_pages:
            raise KVCacheOutOfPages(kv_shortage_message(
                need, self.bm.num_pages, self.page_bytes, window=self.window, sessions=len(running) + 1,
                hot_pages=self.hot_pages if self.connector is not None else 0))
        self.bm.add_session(session.session_id)
        self.sessions[session.session_id] = session
        self.sessions_total += 1

    def drop_session(self, session_id: str) -> None:
        """Forget a finished session (its results too), so its id can be used again."""
        s = self.sessions.get(session_id)
        if s is None:
            raise ValueError(f"unknown session {session_id!r}")
        if not s.finished:
            raise ValueError(f"session {session_id!r} is still running")
        del self.sessions[session_id]

    def running(self) -> list[Session]:
        return [s for s in self.sessions.values() if not s.finished]

    def has_pending(self) -> bool:
        """Pages still wait on the connector (finished sessions asked to wait)."""
        return bool(self._parked)

    # --- one step -------------------------------------------------------------------------------
    def _victim(self, s: Session, chunk: int) -> int | None:
        """The chunk that leaves the recent window when ``chunk`` commits (sliding window only):
        the oldest recent chunk once the recent window is full (``chunk`` itself if it holds none)."""
        if self.window != "sliding" or len(s.sink) < self.sink_chunks:
            return None
        if len(s.recent) + 1 <= self.recent_chunks:
            return None
        return s.recent[0] if s.recent else chunk

    def _segment(self, kind: str, chunk_id: int, blocks: ChunkBlocks) -> Segment:
        return Segment(kind, chunk_id, list(blocks.page_ids), blocks.page_lens(self.bm.page_size))

    def _externals(self, req: ChunkRequest, computed: int) -> list[Segment]:
        """Ask the connector for the chunks to put back; allocate pages for those it must load."""
        ps = self.bm.page_size
        num_new, _ = self.connector.get_num_new_matched_tokens(req, computed)
        if req.release_pages:  # not in this step's window: their pages serve this step's loads
            self._free_connector_pages(req.release_pages, "release_pages")
        block_ids, segments = [], []
        for ext in req.external:
            if ext.num_tokens < 1:
                raise ValueError(f"connector returned external chunk {ext.chunk_id} with {ext.num_tokens} tokens")
            if ext.needs_load:
                ext.page_ids = self.bm.allocate(ext.num_pages(ps), CONNECTOR_OWNER, contiguous=True)
                block_ids.append(list(ext.page_ids))
            elif len(ext.page_ids) != ext.num_pages(ps) or any(
                not 0 <= p < self.bm.num_pages or self.bm.ref_count(p) == 0 for p in ext.page_ids
            ):
                raise ValueError(
                    f"connector returned resident chunk {ext.chunk_id} with pages {ext.page_ids} that are not "
                    f"{ext.num_pages(ps)} allocated pages of this cache"
                )
            blocks = ChunkBlocks(tuple(ext.page_ids), ext.num_tokens)
            segments.append(self._segment("external", ext.chunk_id, blocks))
        loaded = sum(e.num_tokens for e in req.external if e.needs_load)
        if loaded != num_new:
            logger.debug("connector announced %d new tokens, needs_load chunks hold %d", num_new, loaded)
        self.connector.update_state_after_alloc(req, block_ids, num_new)
        return segments

    def schedule(self, step: int) -> StepBatch | None:
        sessions = self.running()
        if not sessions:
            return None
        plan = WindowPlan(self.bm.page_size)
        rows, requests, committed, victims, evicted = [], [], [], [], []
        for s in sessions:
            c = s.next_chunk
            poses = s.poses_of(c)
            req = ChunkRequest(s.session_id, c, c * self.fpc, poses.copy(), self.frame_tokens, self.bm.page_size)
            table = self.bm.table(s.session_id)
            sink = [self._segment("sink", cid, table[cid]) for cid in s.sink]
            recent = [self._segment("recent", cid, table[cid]) for cid in s.recent]
            external = []
            if self.connector is not None:
                computed = sum(seg.num_tokens for seg in sink + recent)
                external = self._externals(req, computed)
            cur = self.bm.append_chunk(s.session_id, c, self.chunk_tokens)
            done = CommittedChunk(s.session_id, c, list(cur.page_ids), self.chunk_tokens, poses.copy())
            plan.add_row(s.session_id, sink + external + recent + [self._segment("current", c, cur)], done)
            rows.append(RowInput(s.session_id, c, c * self.fpc, s.seed, poses, s.context))
            requests.append(req)
            committed.append(done)
            victim = self._victim(s, c)
            victims.append(victim)
            if victim is not None:
                blocks = self.bm.table(s.session_id)[victim]
                evicted.append(CommittedChunk(s.session_id, victim, list(blocks.page_ids), blocks.num_tokens,
                                              s.poses_of(victim).copy()))
        batch = StepBatch(step, sessions, rows, requests, plan, victims)
        if self.connector is not None:
            out = SchedulerOutput(step, requests, committed, evicted=evicted)
            batch.connector_meta = self.connector.build_connector_meta(out)
        return batch

    def finish(self, batch: StepBatch, latents: torch.Tensor, step_seconds: float, resident_kv_bytes: int,
               mean_pose) -> list[ChunkResult]:
        """Commit the step's chunks, evict, free; returns one ChunkResult per row."""
        results = []
        for row, (s, req) in enumerate(zip(batch.sessions, batch.requests)):
            c = s.next_chunk
            s.next_chunk += 1
            (s.sink if len(s.sink) < self.sink_chunks else s.recent).append(c)
            victim = batch.victims[row]
            if victim is not None:  # announced in this step's SchedulerOutput.evicted
                s.recent.remove(victim)
                self._evict(s, victim)
            result = ChunkResult(
                s.session_id, c, latents[row], mean_pose(s.poses_of(c)), batch.plan.external_ids(row),
                step_seconds, resident_kv_bytes, s.finished, batch.step,
            )
            if s.keep_results:
                s.results.append(result)
            results.append(result)
            if s.finished:
                self._end_session(s)
                if not s.keep_results:  # nothing of it is left to read: its id is free again
                    del self.sessions[s.session_id]
        self.poll()
        return results

    def end_session(self, session_id: str) -> None:
        """End a running session now, after the chunks it generated (a streaming host learns the
        length only at the end): its length is cut to ``next_chunk`` and its pages are freed
        or parked for the connector like those of a session that reached its last chunk. A session
        that already finished is left as it is."""
        s = self.sessions.get(session_id)
        if s is None:
            raise ValueError(f"end_session: unknown session {session_id!r}")
        s.total_chunks = s.next_chunk
        if self.bm.has_session(session_id):
            self._end_session(s)
        self.poll()

    def _evict(self, s: Session, chunk_id: int) -> None:
        if self.connector is None:
            self.bm.remove_chunk(s.session_id, chunk_id)
            return
        # write-through: the connector may still be storing this chunk; it says when to free
        self.bm.remove_chunk(s.session_id, chunk_id, to_owner=EVICTED_OWNER)

    def _end_session(self, s: Session) -> None:
        if self.connector is None:
            self.bm.end_session(s.session_id)
            return
        pages = [p for b in self.bm.table(s.session_id).values() for p in b.page_ids]
        wait, _ = self.connector.request_finished(s.session_id, pages)
        if wait:
            self.bm.end_session(s.session_id, to_owner=_parked(s.session_id))
            self._parked.add(s.session_id)
        else:
            self.bm.end_session(s.session_id)

    def _free_connector_pages(self, pages: list[int], source: str) -> None:
        for p in self.bm.release_connector_pages(pages):
            logger.warning("connector %s returned page %d, which it does not hold; ignored", source, p)

    def poll(self) -> None:
        """Collect what the connector finished: parked sessions and freeable pages."""
        if self.connector is None:
            return
        done_stores, _ = self.connector.get_finished(set(self._parked))
        for item in done_stores or ():
            if isinstance(item, str) and item in self._parked:
                self.bm.release_all(_parked(item))
                self._parked.discard(item)
        self._free_connector_pages(list(self.connector.take_pages_to_free() or ()), "take_pages_to_free")

    def release_everything(self) -> None:
        """Engine shutdown: drop every hold (the connector is closed first)."""
        for sid in list(self.sessions):
            if self.bm.has_session(sid):
                self.bm.end_session(sid)
        for owner in self.bm.owners():
            self.bm.release_all(owner)
        self._parked.clear()
