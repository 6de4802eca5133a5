"""RemoteTier: chunks of a world in a remote store, one immutable object per chunk per rank.

Keys (``q(session)`` percent-encodes the session id)::

    {namespace}/{model fingerprint}/{world}/{q(session)}/writer            the session's writer record
    {namespace}/{model fingerprint}/{world}/{q(session)}/c{chunk:08d}.r{rank}  K/V shard of one rank
    {namespace}/{model fingerprint}/{world}/{q(session)}/c{chunk:08d}.ix   kept token ids (rank 0)
    {namespace}/{model fingerprint}/{world}/{q(session)}/c{chunk:08d}.commit   the commit record

The model fingerprint keeps engines of another model or compression apart; a shard is one rank's
K/V of the chunk as raw bytes (``records``: the commit record, the fingerprint, the checksums).

The commit record (JSON: poses, first frame, tokens, shard shape and dtype, one sha256 per shard and
one for the token ids) is written last, by rank 0, once every shard is in: a chunk is a candidate
only once committed. A read checks the shard's size and sha256 against the record; a missing,
short or damaged shard is a miss (counted in ``stats()["misses"]``, logged, the chunk left out),
never wrong bytes in the window.

Writers: a session has at most one writer. ``acquire_writer`` creates the writer record (create if
absent); a second engine is refused with ``RemoteWriterError`` naming the holder. ``end_session``
releases it and removes the session's objects unless ``persist``.

Checksums are computed on hash threads while the transfers run (hashlib and the store clients
release the GIL; measured for Mooncake's batch calls): a put hashes every shard while the batch
transfers and returns the digests once both are done (the commit record is written after that), a
read fetches group g+1 while group g is verified and reports a shard only once verified, so a batch
costs about max(transfer, hash) plus one group's hash, instead of their sum, where the machine has a
core free for it. Where it has none (the transfer is CPU copies on a busy machine) the hash's CPU
time adds to the transfer's.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence
from urllib.parse import quote

import numpy as np
import torch

from worldkv_connector.checks import check_int
from worldkv_connector.remote.backends import MISSING, RemoteBackend, make_backend
from worldkv_connector.remote.config import RemoteConfig
from worldkv_connector.remote.records import ChunkRecord, RemoteWriterError, dtype_name, model_fingerprint, sha256_hex

__all__ = ["RemoteTier"]

logger = logging.getLogger(__name__)

_PROBE = 64  # commit records read per round when listing a session
_MAX_CHUNKS = 1 << 20  # bound of a session listing
_GROUP_BYTES = 8 << 20  # a read group: large enough that a batched call's round trips do not dominate
_MAX_GROUPS = 16


def _groups(idx: list[int], outs: Sequence[torch.Tensor]) -> list[list[int]]:
    """Split ``idx`` into consecutive read groups of about ``_GROUP_BYTES`` (at most ``_MAX_GROUPS``)."""
    if not idx:
        return []
    total = sum(t.numel() * t.element_size() for t in outs)
    n = max(1, min(len(idx), _MAX_GROUPS, total // _GROUP_BYTES))
    size = -(-len(idx) // n)
    return [idx[g : g + size] for g in range(0, len(idx), size)]


class RemoteTier:
    """The remote tier of a bank (see the module docstring).

    config: the validated ``RemoteConfig``; fingerprint: ``model_fingerprint(kv_shape, config)``;
    rank / num_ranks: this process's shard of the heads. backend: an already connected backend
    (default: ``make_backend(config)``, which raises ``RemoteError`` when it cannot connect).
    """

    def __init__(self, config: RemoteConfig, *, fingerprint: str, rank: int = 0, num_ranks: int = 1,
                 backend: RemoteBackend | None = None) -> None:
        num_ranks = check_int("RemoteTier num_ranks", num_ranks, lo=1)
        rank = check_int("RemoteTier rank", rank, 0, num_ranks - 1)
        self.config = config
        self.fingerprint = fingerprint
        self.rank, self.num_ranks = rank, num_ranks
        self.backend = backend if backend is not None else make_backend(config)
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._writing: set[str] = set()  # sessions whose writer record we hold
        self._refused: set[str] = set()  # sessions refused to us (logged once)
        self._started: set[str] = set()  # sessions whose start record we wrote
        # checksum threads: one per two cores, at most 4 (a shard's sha256 is one thread's work)
        self._hasher = ThreadPoolExecutor(max(1, min(4, (os.cpu_count() or 2) // 2)), thread_name_prefix="wkv-remote-sha")
        self.counters = {"puts": 0, "put_failures": 0, "commits": 0, "gets": 0, "misses": 0, "missing": 0,
                         "corrupt": 0, "bytes_put": 0, "bytes_got": 0, "writes_refused": 0, "removed": 0}
        self.miss_log: deque[tuple[str, int, str]] = deque(maxlen=64)  # (session, chunk, reason), newest last
        self._closed = False

    @classmethod
    def from_config(cls, config, kv_shape, *, rank: int = 0, num_ranks: int = 1) -> "RemoteTier | None":
        """The tier ``config.remote`` asks for (None when it is unset)."""
        if config.remote is None:
            return None
        return cls(RemoteConfig.from_value(config.remote), fingerprint=model_fingerprint(kv_shape, config),
                   rank=rank, num_ranks=num_ranks)

    # --- keys ----------------------------------------------------------------------------------
    def session_prefix(self, session: str) -> str:
        c = self.config
        return f"{c.namespace}/{self.fingerprint}/{c.world}/{quote(session, safe='')}/"

    def shard_key(self, session: str, chunk: int, rank: int | None = None) -> str:
        return f"{self.session_prefix(session)}c{chunk:08d}.r{self.rank if rank is None else rank}"

    def _key(self, session: str, chunk: int, what: str) -> str:
        return f"{self.session_prefix(session)}c{chunk:08d}.{what}"

    # --- writers -------------------------------------------------------------------------------
    def acquire_writer(self, session: str) -> None:
        """Become the session's only writer, or raise ``RemoteWriterError`` naming the holder."""
        if session in self._writing:
            return
        key = self.session_prefix(session) + "writer"
        record = json.dumps({"writer": self.writer_id, "since_unix": time.time()}).encode()
        if not self.backend.put_if_absent(key, record):
            held = self.backend.get_blob(key)
            if held is None:  # not created and not there: the store did not answer
                logger.warning("remote tier: cannot take the writer record of session %r (store unreachable); "
                               "its chunks stay in this engine until it answers", session)
                return
            holder = json.loads(held).get("writer", "?") if held else "?"
            if holder == self.writer_id:
                self._writing.add(session)
                return
            if not self.config.takeover:
                raise RemoteWriterError(
                    f"session {session!r} of world {self.config.world!r} is being written by another engine "
                    f"(writer {holder}); two writers of one session are refused. End it there first, or set "
                    "remote.takeover=true if that engine died without releasing it")
            logger.warning("taking over session %r of world %r from writer %s", session, self.config.world, holder)
            self.backend.remove([key])
            if not self.backend.put_if_absent(key, record):
                raise RemoteWriterError(f"session {session!r}: could not take the writer record over from {holder}")
        self._writing.add(session)

    def release_writer(self, session: str) -> None:
        if session in self._writing:
            self._writing.discard(session)
            self.backend.remove([self.session_prefix(session) + "writer"])

    def mark_start(self, session: str, chunk: int) -> None:
        """Record the session's first chunk id (once; a resumed or joined session starts past 0),
        so ``committed`` knows where to look."""
        if session not in self._started:
            self._started.add(session)
            self.backend.put_if_absent(self.session_prefix(session) + "start", str(chunk).encode())

    def _start(self, session: str) -> int:
        data = self.backend.get_blob(self.session_prefix(session) + "start")
        try:
            return max(0, int(data)) if data else 0
        except ValueError:
            return 0

    def drop_chunk(self, session: str, chunk: int) -> int:
        """Remove every object of one chunk (all ranks' shards, ids, commit record): a chunk that
        missed on resume, so its id can be written again cleanly. Returns objects removed."""
        keys = [self._key(session, chunk, "commit"), self._key(session, chunk, "ix")]
        keys += [self.shard_key(session, chunk, r) for r in range(self.num_ranks)]
        return self.backend.remove(keys)

    def holds_writer(self, session: str) -> bool:
        return session in self._writing

    # --- writes --------------------------------------------------------------------------------
    def put_shards(self, items: Sequence[tuple[str, int, torch.Tensor]]) -> list[str | None]:
        """Write this rank's shards ``(session, chunk, payload [L, 2, T, H_rank, D] CPU)``.
        Returns each shard's sha256 (None where the put failed)."""
        payloads = [p if p.is_contiguous() else p.contiguous() for _, _, p in items]
        hashes = [self._hasher.submit(sha256_hex, p) for p in payloads]  # overlaps the transfer
        ok = self.backend.put_tensors([self.shard_key(s, c) for s, c, _ in items], payloads)
        out = []
        for good, fut, p in zip(ok, hashes, payloads):
            digest = fut.result()
            self.counters["puts" if good else "put_failures"] += 1
            if good:
                self.counters["bytes_put"] += p.numel() * p.element_size()
            out.append(digest if good else None)
        return out

    def commit(self, record: ChunkRecord, indices: torch.Tensor | None = None) -> bool:
        """Write the kept token ids (if any) and then the commit record (rank 0, after every rank's
        shard is in). False when a write failed: the chunk is then not a candidate anywhere."""
        if indices is not None:
            ix = indices.detach().to("cpu", torch.int64).contiguous()
            record.indices_sha = sha256_hex(ix)
            if not self.backend.put_tensors([self._key(record.session, record.chunk, "ix")], [ix])[0]:
                return False
        ok = self.backend.put_blob(self._key(record.session, record.chunk, "commit"), record.to_bytes())
        self.counters["commits"] += ok
        return ok

    def make_record(self, session: str, chunk: int, payload: torch.Tensor, shards: list[str], *,
                    poses=None, first_frame: int | None = None) -> ChunkRecord:
        return ChunkRecord(session=session, chunk=chunk, num_tokens=int(payload.shape[2]),
                           shard_shape=list(payload.shape), dtype=dtype_name(payload.dtype), num_ranks=self.num_ranks,
                           shards=shards, poses=None if poses is None else np.asarray(poses, dtype=np.float64).tolist(),
                           first_frame=first_frame, indices_sha=None, writer=self.writer_id)

    def write_chunk(self, session: str, chunk: int, payload: torch.Tensor, *, poses=None,
                    first_frame: int | None = None, indices: torch.Tensor | None = None) -> bool:
        """One rank's whole chunk (``num_ranks == 1``): the writer record, the shard, then the commit.
        False (logged once per session) when another engine writes the session or a write failed."""
        if self.num_ranks != 1:
            raise ValueError("write_chunk is for one rank; sharded ranks go through worldkv_connector.ranks")
        if not self.try_writer(session):
            return False
        self.mark_start(session, chunk)
        digest = self.put_shards([(session, chunk, payload)])[0]
        if digest is None:
            return False
        rec = self.make_record(session, chunk, payload, [digest], poses=poses, first_frame=first_frame)
        return self.commit(rec, indices)

    def write_entry(self, key, entry, payload: torch.Tensor) -> bool:
        """Write-through of a bank entry that just became ready (``Bank.mark_ready``): chunk keys
        ``(session, chunk_id)`` of a one-rank connector are written with their pose, first frame and
        kept ids; other keys (vLLM blocks), entries that came from this tier, and sharded ranks
        (``worldkv_connector.ranks`` writes those) are left alone. Never raises for store trouble."""
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int)):
            return False
        if entry.meta.get("remote") or self.num_ranks != 1:
            return False
        first = entry.meta.get("first_frame")
        return self.write_chunk(key[0], key[1], payload, poses=entry.pose, first_frame=first, indices=entry.indices)

    def try_writer(self, session: str) -> bool:
        """``acquire_writer`` that reports a refusal (once per session) instead of raising."""
        try:
            self.acquire_writer(session)
            return session in self._writing
        except RemoteWriterError as exc:
            self.counters["writes_refused"] += 1
            if session not in self._refused:
                self._refused.add(session)
                logger.error("remote tier: %s; its chunks stay in this engine only", exc)
            return False

    # --- reads ---------------------------------------------------------------------------------
    def committed(self, session: str) -> list[ChunkRecord]:
        """The session's commit records, by chunk id (probing ids from its start record until a
        round of ``_PROBE`` ids holds none). Unreadable records are misses."""
        out: list[ChunkRecord] = []
        start = self._start(session)
        for lo in range(start, _MAX_CHUNKS, _PROBE):
            blobs = self.backend.get_blobs([self._key(session, c, "commit") for c in range(lo, lo + _PROBE)])
            found = 0
            for cid, data in zip(range(lo, lo + _PROBE), blobs):
                if data is None:
                    continue
                found += 1
                try:
                    rec = ChunkRecord.from_bytes(data)
                except (ValueError, TypeError, KeyError) as exc:
                    self.report_miss(session, cid, f"unreadable commit record ({exc})")
                    continue
                if rec.session != session or rec.chunk != cid:
                    self.report_miss(session, cid, "commit record names another chunk")
                    continue
                out.append(rec)
            if not found:
                break
        return out

    def get_shards(self, records: Sequence[ChunkRecord], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Read this rank's shard of each committed chunk into ``outs`` (``[L, 2, T, H_rank, D]``,
        CPU, contiguous, the record's dtype). False where it is a miss (missing, wrong size or a
        failed sha256 check; counted and logged); such an ``out`` holds garbage."""
        ok = [False] * len(records)
        todo = []
        for i, (rec, out) in enumerate(zip(records, outs)):
            if list(out.shape) != rec.shard_shape or dtype_name(out.dtype) != rec.dtype or rec.num_ranks != self.num_ranks:
                self.report_miss(rec.session, rec.chunk, f"shard {rec.shard_shape} {rec.dtype} x{rec.num_ranks} ranks, this "
                           f"rank reads {list(out.shape)} {dtype_name(out.dtype)} x{self.num_ranks}")
            else:
                todo.append(i)
        # pipelined: the checksums of one group run on the hash threads while the main thread
        # fetches the next group (the store clients release the GIL), so only the last group's hash
        # is not hidden; a shard counts as read only once its sha256 matched the commit record
        checks = {}
        for idx in _groups(todo, [outs[i] for i in todo]):
            keys = [self.shard_key(records[i].session, records[i].chunk) for i in idx]
            codes = self.backend.get_tensors(keys, [outs[i] for i in idx])
            self.counters["gets"] += len(idx)
            for i, n in zip(idx, codes):
                rec = records[i]
                if n < 0:
                    self.report_miss(rec.session, rec.chunk, "shard missing" if n == MISSING else f"shard unreadable (code {n})")
                    continue
                checks[i] = self._hasher.submit(sha256_hex, outs[i])
        for i, fut in checks.items():
            rec = records[i]
            if fut.result() != rec.shards[self.rank]:
                self.report_miss(rec.session, rec.chunk, "shard failed its sha256 check (corrupted)", corrupt=True)
                continue
            ok[i] = True
            self.counters["bytes_got"] += outs[i].numel() * outs[i].element_size()
        return ok

    def get_indices(self, rec: ChunkRecord, num_layers: int) -> torch.Tensor | None:
        """The chunk's kept token ids ``[L, T]`` int64 (None if it has none; raises nothing: a miss
        is None with ``report_miss`` counted, check ``rec.indices_sha``)."""
        if rec.indices_sha is None:
            return None
        out = torch.empty(num_layers, rec.num_tokens, dtype=torch.int64)
        n = self.backend.get_tensors([self._key(rec.session, rec.chunk, "ix")], [out])[0]
        if n < 0 or sha256_hex(out) != rec.indices_sha:
            self.report_miss(rec.session, rec.chunk, "kept token ids missing or corrupted", corrupt=n >= 0)
            return None
        return out

    def report_miss(self, session: str, chunk: int, reason: str, *, corrupt: bool = False) -> None:
        """Count and log a chunk left out (``stats()["misses"]``, ``miss_log``)."""
        self.counters["misses"] += 1
        self.counters["corrupt" if corrupt else "missing"] += 1
        self.miss_log.append((session, chunk, reason))
        logger.warning("remote tier miss: session %r chunk %d: %s; left out of the window", session, chunk, reason)

    # --- lifetime ------------------------------------------------------------------------------
    def end_session(self, session: str) -> int:
        """The session ended here: remove its objects unless ``persist`` (only its writer does),
        then release its writer record. Returns objects removed."""
        removed = 0
        if session in self._writing and not self.config.persist:
            removed = self.backend.remove_prefix(self.session_prefix(session))
            self.counters["removed"] += removed
            self._writing.discard(session)  # the writer record went with the prefix
        self.release_writer(session)
        return removed

    def stats(self) -> dict:
        return {"backend": self.backend.name, "world": self.config.world, "rank": self.rank,
                "num_ranks": self.num_ranks, **self.counters}

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release every writer record held, then disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for session in list(self._writing):
            self.release_writer(session)
        self._hasher.shutdown(wait=True)
        self.backend.close()
