"""Scheduler half of the WorldKV connector: ids, poses, page ids and bookkeeping only (no tensors).

Per step and session it scores the banked chunks against the new chunk's pose (``PoseIndex`` with
the configured policy), picks ``retrieval_chunks`` of them and plans:

- **loads** for chosen chunks that are not resident. Retrieved chunks stay in a per-session hot
  set of at most ``hot_chunks`` chunks between steps, so consecutive steps copy only the chunks
  that changed. Hot chunks that are neither chosen nor among the most recently used go back to
  the engine through ``request.release_pages`` (the engine frees those after the step, so within
  a step a session may hold up to ``hot_chunks`` + the step's new loads).
- **stores** for every committed chunk (write-through: every chunk is banked, not only evicted
  ones), each with its bank slot and the entries evicted (or, with a disk tier, spilled) to free
  it, decided here by the ``SlotDirectory`` (vLLM's ``prepare_store``: the worker only copies and
  reports). A planned load pins its entry until the worker reports it, so no victim is an entry a
  load was planned for. A chunk becomes a retrieval candidate only once its store completed.
- **restores** of spilled chunks this step loads (a load, or a RoPE reload of the original keys):
  the directory names the slot each comes back into, before any store takes one.
- **frees** of evicted chunks' pages, only after their store ended (``take_pages_to_free``).
- **RoPE deltas** (``rope_correction``): each resident chunk's current temporal position is
  tracked; when its target moves, the worker rotates it from its original position (reloading
  the original K rows from the bank when the pages hold rotated ones), never by accumulating
  deltas on bf16 pages.

Window order of the retrieved chunks: ascending original chunk index (so the retrieved part of the
window reads in the order the world was generated, and a chunk kept across steps keeps its
relative place). Sink and recent chunks are never candidates.

Eviction timing: the engine announces a chunk leaving its recent window in the same step's
``SchedulerOutput.evicted``; its pages wait in ``_awaiting`` until its store ended and are then
returned by ``take_pages_to_free`` (write-through: never before).

Session end: ``request_finished`` returns the hot set at once and makes the session's bank entries
the directory's first victims; once the session's last store ended, ``take_ended_sessions`` hands
it to the facade, which forgets it here (``forget_session``: index and directory entries, state)
and frees its bank entries in the worker. Nothing per chunk outlives its bank entry, so the
bookkeeping is bounded by the bank and the windows, not by the rollout length.

Resumed sessions (``adopt``, from ``WorldKVConnector.load_bank``): loaded chunks keep their saved
chunk ids and a session's ``base`` becomes one past the largest of them; the engine's chunk ``c`` of
that session is then chunk id ``base + c`` here and in the bank, so ids continue the saved world.
Window exclusions and RoPE targets stay in the engine's chunk/frame numbering.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from worldkv_connector.bank.directory import SlotDirectory
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector.meta import ChunkKey, LoadSpec, RopeDelta, StoreSpec, WorkerReport, WorldKVMetadata
from worldkv_connector.retrieval import PoseIndex
from worldkv_connector.connector.api import ChunkRequest, ExternalChunk, SchedulerOutput
from worldkv_connector.metrics import ConnectorMetrics
from worldkv_connector.shapes import KVShape

__all__ = ["WorldKVScheduler"]

logger = logging.getLogger(__name__)


@dataclass
class _Resident:
    """A retrieved chunk held in pages of the connector's hot set."""

    page_ids: tuple[int, ...]
    num_tokens: int
    position: int  # latent frame its first frame's keys currently sit at (temporal RoPE)
    last_used: int  # step it was last in a window
    valid: bool = True  # False once its load failed: the pages hold no usable K/V


@dataclass
class _Session:
    resident: dict[int, _Resident] = field(default_factory=dict)  # hot set
    finished: bool = False
    base: int = 0  # chunk id of the engine's chunk 0 (> 0 for a resumed session)
    # loaded chunks: chunk id -> latent frame their keys were written at (own chunks: (id - base) * fpc)
    origin: dict[int, int] = field(default_factory=dict)


class WorldKVScheduler:
    """Retrieval planning and page bookkeeping of one engine (one scheduler process).

    config: the resolved ``WorldKVConfig`` (window equal to the engine's). frame_tokens: tokens per
    latent frame; page_size: the engine's tokens per page. kv_shape: the model's KV shape, which sizes
    the bank: the ``directory`` decides the bank's slots, spills and evictions from it and ``config``
    as ``Bank.for_shape`` sizes the worker's bank.
    """

    def __init__(self, config: WorldKVConfig, *, frame_tokens: int, page_size: int, kv_shape: KVShape) -> None:
        self.config = config
        self.frame_tokens = frame_tokens
        self.page_size = page_size
        self.fpc = config.frames_per_chunk
        self.chunk_tokens = self.fpc * frame_tokens
        self.index = PoseIndex.from_config(config)
        self.directory = SlotDirectory.for_shape(kv_shape, config)
        self._warned = False
        self.metrics = ConnectorMetrics()
        self._sessions: dict[str, _Session] = {}
        self._step = 0
        # per-step plan, filled by get_num_new_matched_tokens / update_state_after_alloc
        self._loads: list[LoadSpec] = []
        self._ropes: list[RopeDelta] = []
        self._released: list[ChunkKey] = []
        self._finished: list[str] = []
        # stores: key -> frame poses [F, 4, 4] until the store ends
        self._store_pending: dict[ChunkKey, np.ndarray] = {}
        self._stores_ended: set[ChunkKey] = set()  # since the last get_finished
        # evicted chunks whose pages wait for their store to end
        self._awaiting: dict[ChunkKey, tuple[int, ...]] = {}
        self._free_now: list[int] = []  # pages to return at the next take_pages_to_free
        self._waiting_sessions: set[str] = set()  # finished sessions whose stores are still running
        self._ending: set[str] = set()  # finished sessions not yet handed out by take_ended_sessions

    # --- helpers --------------------------------------------------------------------------------
    def _session(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions[session_id] = _Session()
        return s

    def _position(self, s: _Session, cid: int) -> int:
        """Latent frame the chunk's keys were written at (banked keys keep their positions)."""
        pos = s.origin.get(cid)
        return (cid - s.base) * self.fpc if pos is None else pos

    def _page_lens(self, num_tokens: int) -> tuple[int, ...]:
        n = -(-num_tokens // self.page_size)
        return tuple([self.page_size] * (n - 1) + [num_tokens - self.page_size * (n - 1)])

    def window_excluded(self, chunk_index: int) -> range | list[int]:
        """Chunk ids in the sink or the recent window of the chunk ``chunk_index`` (never retrieved)."""
        sink = min(self.config.sink_chunks, chunk_index)
        recent_start = max(self.config.sink_chunks, chunk_index - self.config.recent_chunks)
        return list(range(sink)) + list(range(recent_start, chunk_index))

    # --- engine hooks (scheduler side) ----------------------------------------------------------
    def get_num_new_matched_tokens(self, request: ChunkRequest, num_computed_tokens: int) -> tuple[int, bool]:
        """Fill ``request.external`` (window order: ascending chunk index) and ``request.release_pages``.
        Returns (tokens the engine must allocate pages for, False: loads finish within the step)."""
        if request.page_size != self.page_size or request.frame_tokens != self.frame_tokens:
            raise ValueError(
                f"request of {request.session_id!r}: page_size {request.page_size} / frame_tokens "
                f"{request.frame_tokens}, the connector was built for {self.page_size} / {self.frame_tokens}"
            )
        s = self._session(request.session_id)
        c = request.chunk_index
        k = self.config.retrieval_chunks
        excluded = [s.base + e for e in self.window_excluded(c)]  # engine chunk index -> chunk id
        chosen = self.index.query(request.session_id, request.frame_poses, k, excluded) if k else []
        chosen.sort()  # window order: ascending original chunk index (see module docstring)
        externals, new_tokens = [], 0
        for cid in chosen:
            r = s.resident.get(cid)
            if r is not None and r.valid:
                self.metrics.retrieval_hits += 1
                r.last_used = self._step
                externals.append(ExternalChunk(cid, r.num_tokens, list(r.page_ids), needs_load=False))
            else:
                self.metrics.retrieval_misses += 1
                n = self.directory.ready_tokens((request.session_id, cid))
                if n is None:  # the index lists only banked chunks: never plan a load of a gone one
                    logger.warning("chunk %s is indexed but not banked: not retrieved", (request.session_id, cid))
                    continue
                externals.append(ExternalChunk(cid, n, [], needs_load=True))
                new_tokens += n
        # hot set: the chosen chunks plus the most recently used others, at most hot_chunks
        keep = set(chosen)
        others = sorted(
            (cid for cid, r in s.resident.items() if cid not in keep and r.valid
             and self.directory.ready_tokens((request.session_id, cid)) is not None),
            key=lambda cid: (-s.resident[cid].last_used, cid),
        )
        keep.update(others[: max(0, self.config.hot_chunks - len(chosen))])
        release = []
        for cid in [cid for cid in s.resident if cid not in keep or not s.resident[cid].valid]:
            r = s.resident.pop(cid)
            release.extend(r.page_ids)
            self._released.append((request.session_id, cid))
        request.external = externals
        request.release_pages = release
        return new_tokens, False

    def update_state_after_alloc(self, request: ChunkRequest, block_ids: list[list[int]],
                                 num_external_tokens: int) -> None:
        """Record the pages the engine allocated for the ``needs_load`` chunks; plan their loads and
        the RoPE deltas of this request's window."""
        s = self._session(request.session_id)
        fresh = [e for e in request.external if e.needs_load]
        if len(block_ids) != len(fresh):
            raise ValueError(
                f"update_state_after_alloc: {len(block_ids)} page lists for {len(fresh)} chunks to load "
                f"(session {request.session_id!r}, chunk {request.chunk_index})"
            )
        for ext, pages in zip(fresh, block_ids):
            if len(pages) != ext.num_pages(self.page_size):
                raise ValueError(
                    f"chunk {ext.chunk_id} of {ext.num_tokens} tokens needs {ext.num_pages(self.page_size)} pages, "
                    f"the engine allocated {len(pages)}"
                )
            key = (request.session_id, ext.chunk_id)
            # banked keys sit at their original absolute positions
            s.resident[ext.chunk_id] = _Resident(tuple(pages), ext.num_tokens, self._position(s, ext.chunk_id),
                                                 self._step)
            self._loads.append(LoadSpec(key, tuple(pages), ext.num_tokens))
            self.directory.pin(key)  # no victim until the worker reports the load; a retrieval (LRU)
        if self.config.rope_correction and request.external:
            # retrieved chunks sit contiguously just before the recent window (which starts at the
            # first frame after the sink when the rollout is still short)
            c = request.chunk_index
            recent_start = max(self.config.sink_chunks, c - self.config.recent_chunks) * self.fpc
            m = len(request.external)
            for j, ext in enumerate(request.external):
                r = s.resident[ext.chunk_id]
                target = recent_start - (m - j) * self.fpc
                if target != r.position:
                    key = (request.session_id, ext.chunk_id)
                    origin = self._position(s, ext.chunk_id)
                    # from the original keys every time (reload them if the pages hold rotated ones)
                    self._ropes.append(RopeDelta(key, r.page_ids, self._page_lens(r.num_tokens), target - origin,
                                                 reload=r.position != origin))
                    if r.position != origin:  # the reload reads the bank entry: no victim until reported
                        self.directory.pin(key, touch=False)
                    r.position = target

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> WorldKVMetadata:
        """The step's plan: loads, stores of every committed chunk, RoPE deltas, hot-set releases."""
        self._step = scheduler_output.step
        for ev in scheduler_output.evicted:
            self._awaiting[(ev.session_id, self._session(ev.session_id).base + ev.chunk_id)] = tuple(ev.page_ids)
        # spilled entries this step's loads and RoPE reloads read come back first (SlotDirectory.prepare_restores)
        restores, evicted = self.directory.prepare_restores(
            [spec.key for spec in self._loads] + [r.key for r in self._ropes if r.reload])
        for sid, cid in evicted:
            self._drop_banked(sid, cid)
        stores = []
        for cc in scheduler_output.committed:
            key = (cc.session_id, self._session(cc.session_id).base + cc.chunk_id)
            poses = np.asarray(cc.frame_poses, dtype=np.float64)
            got = self._prepare_store(key, cc.num_tokens)
            if got is None:
                continue
            slot, victims = got
            evicted.extend(victims)
            self._store_pending[key] = poses
            stores.append(StoreSpec(key, tuple(cc.page_ids), cc.num_tokens, poses, cc.chunk_id * self.fpc, slot))
        meta = WorldKVMetadata(self._step, self._loads, stores, self._ropes, self._released, self._finished, evicted,
                               self.directory.take_spilled(), restores)
        self._loads, self._ropes, self._released, self._finished = [], [], [], []
        return meta

    def _prepare_store(self, key: ChunkKey, num_tokens: int) -> tuple[int, list[ChunkKey]] | None:
        """The directory's ``(slot, victims)`` for ``key``'s store, the victims dropped from the
        index (spilled ones stay candidates). None when it is not banked (no room, or already
        banked): it ends at once, as a failed store (its pages are freed without waiting for a copy)."""
        try:
            got = self.directory.prepare_store(key, num_tokens)
            why = "the bank has no free slot (every entry is pinned or being written)"
        except ValueError as exc:
            got, why = None, str(exc)
        if got is None:
            self.metrics.store_errors += 1
            # the first failure is a warning; repeats are debug so a full bank cannot flood the log
            (logger.debug if self._warned else logger.warning)("chunk %s not banked: %s", key, why)
            self._warned = True
            self._stores_ended.add(key)
            return None
        for sid, cid in got[1]:
            self._drop_banked(sid, cid)
        return got

    def _drop_banked(self, sid: str, cid: int) -> None:
        """A banked chunk left the bank: it is no retrieval candidate any more."""
        self.index.remove(sid, cid)
        s = self._sessions.get(sid)
        if s is not None:
            s.origin.pop(cid, None)

    def request_finished(self, session_id: str, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Session ended. Its hot set goes back at the next ``take_pages_to_free``; True asks the
        engine to keep ``block_ids`` until the session's stores ended (``finished_sessions``)."""
        s = self._session(session_id)
        s.finished = True
        self._finished.append(session_id)
        self.directory.finish_session(session_id)  # its entries stay while there is room
        self._ending.add(session_id)
        for cid, r in s.resident.items():
            self._free_now.extend(r.page_ids)
            self._released.append((session_id, cid))
        s.resident.clear()
        wait = any(key[0] == session_id for key in self._store_pending)
        if wait:
            self._waiting_sessions.add(session_id)
        return wait, None

    def take_ended_sessions(self) -> list[str]:
        """Finished sessions whose stores all ended, each returned once (sorted)."""
        if not self._ending:
            return []
        pending = {key[0] for key in self._store_pending}
        out = sorted(sid for sid in self._ending if sid not in pending)
        self._ending.difference_update(out)
        return out

    def forget_session(self, session_id: str) -> int:
        """Drop a session's index entries, directory entries and state (the worker frees its bank
        entries: ``WorldKVWorker.end_session``). Returns how many chunks it had indexed. Its stores
        must have ended."""
        if any(key[0] == session_id for key in self._store_pending):
            raise ValueError(f"forget_session({session_id!r}): its stores are still in flight")
        self._ending.discard(session_id)
        self.directory.remove_session(session_id)  # a pinned entry goes once its load is reported
        s = self._sessions.pop(session_id, None)
        if s is not None:
            for r in s.resident.values():  # a live session being dropped: its hot pages go back
                self._free_now.extend(r.page_ids)
        return self.index.remove_session(session_id)

    def known_session(self, session_id: str) -> bool:
        """True once the session ran a step (or was adopted) and was not forgotten."""
        return session_id in self._sessions

    def adopt(self, session_id: str, chunk_id: int, num_tokens: int, frame_poses, first_frame: int | None,
              slot: int | None = None) -> None:
        """Index a chunk loaded into the bank from a saved bank (``load_bank``) or the remote tier:
        it becomes a retrieval candidate of ``session_id``, whose new chunks get ids after it.
        frame_poses: [frames_per_chunk, 4, 4] camera-to-world; first_frame: latent frame its keys
        were written at (None: ``chunk_id * frames_per_chunk``); slot: the bank slot it was given
        (-1: the bank spilled it to its disk tier)."""
        key = (session_id, chunk_id)
        if key in self.directory:
            raise ValueError(f"adopt: chunk {chunk_id} of session {session_id!r} is already banked")
        self.directory.adopt(key, slot, num_tokens)
        s = self._session(session_id)
        self.index.add(session_id, chunk_id, frame_poses)
        s.origin[chunk_id] = chunk_id * self.fpc if first_frame is None else first_frame
        s.base = max(s.base, chunk_id + 1)

    def take_pages_to_free(self) -> list[int]:
        """Pages of evicted chunks whose store ended, and hot pages of finished sessions."""
        out, self._free_now = self._free_now, []
        for key in [k for k in self._awaiting if k not in self._store_pending]:
            out.extend(self._awaiting.pop(key))
        return out

    # --- worker feedback ------------------------------------------------------------------------
    def update_connector_output(self, report: WorkerReport) -> None:
        """Apply what the worker finished: banked chunks become candidates, entries the bank dropped
        on its own leave the index, reported loads unpin their entries, failed loads leave the hot
        set."""
        for res in report.stores:
            poses = self._store_pending.pop(res.key, None)
            self._stores_ended.add(res.key)
            if poses is None:
                logger.debug("store result for unknown chunk %s ignored", res.key)
                continue
            self.directory.complete_store(res.key, res.ok, res.num_tokens)
            if res.ok and self.directory.ready_tokens(res.key) is not None:
                sid, cid = res.key
                self.index.add(sid, cid, poses)
        for sid, cid in report.evicted:
            self.directory.forget((sid, cid))
            self._drop_banked(sid, cid)
        for key in report.loads_done:
            self.directory.unpin(key)
        for sid, cid in report.loads_failed:
            self.directory.unpin((sid, cid))
            s = self._sessions.get(sid)
            r = None if s is None else s.resident.get(cid)
            if r is not None:
                r.valid = False

    def finished(self, finished_req_ids: set) -> set:
        """Store keys that ended since the last call, plus finished sessions (from
        ``finished_req_ids``) whose stores all ended."""
        out: set = set(self._stores_ended)
        self._stores_ended.clear()
        pending_sessions = {key[0] for key in self._store_pending}
        for sid in list(self._waiting_sessions):
            # reported once, to an engine that is waiting for it
            if sid not in pending_sessions and (finished_req_ids is None or sid in finished_req_ids):
                self._waiting_sessions.discard(sid)
                out.add(sid)
        return out

    # --- introspection --------------------------------------------------------------------------
    def resident_chunks(self, session_id: str) -> dict[int, tuple[int, ...]]:
        """chunk id -> pages of the session's hot set (a copy)."""
        s = self._sessions.get(session_id)
        return {} if s is None else {cid: r.page_ids for cid, r in s.resident.items()}

    def banked_chunks(self, session_id: str) -> list[int]:
        """Chunk ids of the session that are banked and retrievable, ascending."""
        s = self._sessions.get(session_id)
        return [] if s is None else sorted(cid for sid, cid in self.directory.ready_keys() if sid == session_id)

    def pending_stores(self, session_id: str | None = None) -> int:
        """Stores in flight (of one session, or of all)."""
        if session_id is None:
            return len(self._store_pending)
        return sum(1 for key in self._store_pending if key[0] == session_id)

    def chunk_base(self, session_id: str) -> int:
        """Chunk id of the engine's chunk 0 of the session (0 unless it was resumed)."""
        s = self._sessions.get(session_id)
        return 0 if s is None else s.base

    def sessions(self) -> list[str]:
        """Sessions with state here (running, finished and retained, or adopted), sorted."""
        return sorted(self._sessions)

    def held_pages(self) -> int:
        """Pages the connector holds: hot sets, evicted chunks waiting for their store, and pages
        queued to go back."""
        hot = sum(len(r.page_ids) for s in self._sessions.values() for r in s.resident.values())
        return hot + sum(len(p) for p in self._awaiting.values()) + len(self._free_now)
