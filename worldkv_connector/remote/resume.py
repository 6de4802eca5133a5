"""Resume a session, or join a shared world, from the remote tier (``WorldKVConnector.resume_remote``).

``resume_remote(connector, session_id)``: this engine becomes the session's writer (refused with
``RemoteWriterError`` while another engine holds it), reads the session's commit records, copies
each committed chunk's shard into a host slot (zero-copy into the registered slab where the store
allows) and indexes it by pose, so the session's retrieval finds chunks another engine wrote and
its new chunk ids continue after them (``WorldKVScheduler.adopt``).

``resume_remote(connector, session_id, source=other)``: join a shared world: ``other``'s committed
chunks (written by another engine, which may still be running) become retrieval candidates of the
fresh local session ``session_id``; the local session's own chunks are written under its own id.

A chunk whose shard is missing or fails its checksum is a miss: it is left out (reported by the
tier's ``stats()`` / ``miss_log``), and when this engine is the session's writer its objects are
removed so the id can be written again cleanly. Chunks that do not fit the host bank are left in the
remote store (logged); the host tier is a cache of what this engine retrieves.
"""
from __future__ import annotations

import logging

import torch

from worldkv_connector.retrieval.poses import validate_poses

__all__ = ["resume_remote", "TierIO"]

logger = logging.getLogger(__name__)


def _tier(connector):
    tier = connector.worker.bank.remote
    if tier is None:
        raise ValueError("resume_remote: the connector config has no 'remote' tier; set remote: "
                         '{"backend": "mooncake"|"redis", "address": "host:port", ...}')
    return tier


class TierIO:
    """How ``resume_remote`` talks to the store for one rank (head-sharded ranks pass
    ``worldkv_connector.ranks.ShardedRemote``, which has the same methods and agrees across ranks)."""

    def __init__(self, tier) -> None:
        self.tier = tier

    def acquire_writer(self, session: str) -> None:
        self.tier.acquire_writer(session)

    def committed(self, session: str):
        return self.tier.committed(session)

    def read_chunks(self, records, outs, also_ok=None):
        ok = self.tier.get_shards(records, outs)
        return ok if also_ok is None else [a and b for a, b in zip(ok, also_ok)]

    def drop_chunk(self, session: str, chunk: int) -> None:
        self.tier.drop_chunk(session, chunk)


def resume_remote(connector, session_id: str, *, source: str | None = None, io=None) -> list[tuple[str, int]]:
    """Bring ``source``'s (default: ``session_id``'s) committed chunks into the connector as
    retrieval candidates of ``session_id``. Call it before the session's first step. Returns the
    bank keys adopted. ``ValueError`` (``RemoteWriterError``) when another engine writes
    ``session_id`` or the session already ran here. ``io``: default ``TierIO(the bank's tier)``."""
    for name, value in (("session_id", session_id), ("source", source)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"resume_remote {name}={value!r}: expected a str")
    tier = _tier(connector)
    if connector.scheduler.known_session(session_id):
        raise ValueError(f"resume_remote: session {session_id!r} already ran in (or was loaded into) this connector; "
                         "resume it once, before its first step")
    io = TierIO(tier) if io is None else io
    io.acquire_writer(session_id)
    src = session_id if source is None else source
    if source is not None and io.committed(session_id):
        raise ValueError(f"resume_remote: session {session_id!r} already has chunks of its own in the remote tier; "
                         "join a world with a fresh session id, or resume this one without source")
    records = io.committed(src)
    bank, fpc = connector.worker.bank, connector.config.frames_per_chunk
    want = [bank.num_layers, 2, None, bank.num_kv_heads, bank.head_dim]
    usable = []
    for rec in records:
        shape_ok = len(rec.shard_shape) == 5 and all(w is None or w == g for w, g in zip(want, rec.shard_shape))
        if not shape_ok or not 1 <= rec.num_tokens <= bank.slot_tokens or rec.num_tokens != rec.shard_shape[2]:
            tier.report_miss(src, rec.chunk, f"shard shape {rec.shard_shape} does not fit this bank "
                       f"[{bank.num_layers}, 2, <= {bank.slot_tokens}, {bank.num_kv_heads}, {bank.head_dim}]")
            continue
        try:
            poses = validate_poses(rec.poses, f"chunk {rec.chunk} pose")
        except (ValueError, TypeError):
            poses = None
        if poses is None or poses.shape[0] != fpc:
            tier.report_miss(src, rec.chunk, "commit record has no usable pose")
            continue
        usable.append((rec, poses))
    room = bank.free_slots
    if len(usable) > room:
        logger.warning("resume_remote: %d committed chunk(s) of %r, the host bank has room for %d; the oldest "
                       "%d stay in the remote store only", len(usable), src, room, len(usable) - room)
        usable = usable[len(usable) - room:]
    keys, outs, staged, ix_ok = [], [], [], []
    for rec, poses in usable:
        ix = tier.get_indices(rec, bank.num_layers)
        key = (session_id, rec.chunk)
        meta = {"remote": src, **({"first_frame": rec.first_frame} if rec.first_frame is not None else {})}
        entry = bank.reserve(key, rec.num_tokens, indices=ix, pose=poses, meta=meta)
        if entry is None:
            break
        view = bank.view(key)  # [L, 2, T, H, D]
        out = view if view.is_contiguous() else torch.empty(view.shape, dtype=view.dtype)
        keys.append((rec, poses, key))
        outs.append(out)
        staged.append(view)
        ix_ok.append(rec.indices_sha is None or ix is not None)  # a kept-ids miss is counted by the tier
    ok = io.read_chunks([k[0] for k in keys], outs, ix_ok)
    adopted = []
    for good, (rec, poses, key), out, view in zip(ok, keys, outs, staged):
        if not good:
            bank.free(key)
            if source is None:
                io.drop_chunk(src, rec.chunk)
            continue
        if out is not view:
            view.copy_(out)
        bank.mark_ready(key)
        connector.scheduler.adopt(session_id, rec.chunk, rec.num_tokens, poses, rec.first_frame,
                                  slot=bank.get(key).slot)
        adopted.append(key)
    connector.worker.metrics.set_bank(bank.stats())
    logger.info("resumed %d of %d committed chunk(s) of %r from the remote tier (%s) into session %r; "
                "chunk ids continue from %d", len(adopted), len(records), src, tier.backend.name, session_id,
                connector.scheduler.chunk_base(session_id))
    return adopted
