"""Saving the connector's world memory and resuming from it (``WorldKVConnector.save_bank`` /
``load_bank``), on top of ``worldkv_connector.bank.persist`` (checksummed, all-or-nothing).

Every bank entry the connector writes carries its chunk's frame poses ``[frames_per_chunk, 4, 4]``
and ``meta["first_frame"]`` (the latent frame its keys were written at), so a saved bank can be
re-indexed by pose in a new process. ``load_connector_bank`` checks everything it can before it
touches the bank: keys must be ``(session_id, chunk_id)``, every entry must have a valid pose, no
saved session may already have run in this connector; then ``persist.load_bank`` verifies the
config fingerprint, the KV shape and every checksum, and inserts all entries or none.

Chunk ids of a resumed session continue the saved ones: a session with a saved session's id
retrieves the loaded chunks, and its own chunk ``c`` (the engine's ``chunk_index``) is banked under
chunk id ``base + c``, ``base`` = one past the largest loaded chunk id of that session (see
``WorldKVScheduler.adopt``). A session with another id never sees them.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from worldkv_connector.bank import persist
from worldkv_connector.checks import is_int
from worldkv_connector.connector.meta import ChunkKey
from worldkv_connector.retrieval.poses import validate_poses

__all__ = ["save_connector_bank", "load_connector_bank"]

logger = logging.getLogger(__name__)

_SYNC_TIMEOUT_S = 60.0  # longest wait for stores in flight before saving


def _chunk_key(key) -> bool:
    return (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)
            and isinstance(key[1], int) and not isinstance(key[1], bool) and key[1] >= 0)


def save_connector_bank(connector, path: str | os.PathLike, session_id: str | None = None, *,
                        extra: dict | None = None, timeout_s: float = _SYNC_TIMEOUT_S) -> dict:
    """Flush the stores in flight (bounded by ``timeout_s``), then save the ready entries of every
    session (or of ``session_id``) to the directory ``path``. Returns the manifest written."""
    if session_id is not None and not isinstance(session_id, str):
        raise ValueError(f"save_bank session_id={session_id!r}: expected a str or None")
    deadline = time.monotonic() + timeout_s
    while True:
        connector.worker.transfer.wait_all()  # the data must be in the bank before it is read
        connector.collect()  # completed stores become ready entries
        pending = connector.scheduler.pending_stores(session_id)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.001)
    if pending:
        logger.warning("save_bank: %d store(s) still in flight after %.0f s are not saved", pending, timeout_s)
    info = {"model": connector.engine_config.model, "kv_shape": connector.kv_shape.name}
    info.update(extra or {})
    return persist.save_bank(connector.worker.bank, path, session_id=session_id, config=connector.config,
                             kv_shape=connector.kv_shape, extra=info)


def _check_records(connector, path, manifest: dict) -> list[tuple[ChunkKey, np.ndarray]]:
    fpc = connector.config.frames_per_chunk
    out = []
    for rec in manifest["entries"]:
        key = persist.decode_key(rec["key"])
        label = f"{path}: entry {rec['name']!r} (key {key!r})"
        if not _chunk_key(key):
            raise ValueError(f"{label}: expected a (session_id, chunk_id) key; this bank was not saved by the "
                             "video backend's WorldKV connector")
        if rec.get("pose") is None:
            raise ValueError(f"{label}: no camera pose was saved with it, so it cannot be re-indexed")
        poses = validate_poses(rec["pose"], f"{label} pose")
        if poses.shape[0] != fpc:
            raise ValueError(f"{label}: pose of {poses.shape[0]} frames, chunks here have {fpc}")
        if connector.scheduler.known_session(key[0]):
            raise ValueError(f"{label}: session {key[0]!r} already ran in (or was loaded into) this "
                             "connector; call load_bank once, before the session's first step")
        out.append((key, poses))
    return out


def load_connector_bank(connector, path: str | os.PathLike) -> list[ChunkKey]:
    """Load a saved bank into the connector's bank and index it (see the module docstring).
    ``ValueError`` (naming the entry, field or mismatch) with nothing changed on any problem;
    ``FileNotFoundError`` when ``path`` holds no saved bank. Returns the keys loaded."""
    manifest = persist.read_manifest(path)
    checked = _check_records(connector, path, manifest)
    bank = connector.worker.bank
    keys = persist.load_bank(path, bank, config=connector.config, kv_shape=connector.kv_shape)
    poses = dict(checked)
    for key in keys:
        entry = bank.get(key)
        first = entry.meta.get("first_frame")
        first = first if is_int(first) and first >= 0 else None
        connector.scheduler.adopt(key[0], key[1], entry.num_tokens, poses[key], first, slot=entry.slot)
    connector.worker.metrics.set_bank(bank.stats())
    sessions = sorted({k[0] for k in keys})
    logger.info("resumed %d chunk(s) of session(s) %s from %s; their chunk ids continue from %s", len(keys),
                sessions, path, {s: connector.scheduler.chunk_base(s) for s in sessions})
    return keys
