"""Save a bank to a directory and load it back, verified before anything is inserted.

Layout of a saved bank (a directory)::

    manifest.json          format, version, config fingerprint, KV shape, one record per entry
    kv-<token>.safetensors per entry i: "e{i}.kv" [L, 2, T_i, H, D] (bank dtype) and, when the
                           entry has kept token ids, "e{i}.indices" [L, T_i] int64

Keys are serialised as JSON (``manifest.encode_key``); reading and checking the manifest is
``manifest``'s part, the files and the saver's lock are ``files``'.

Writes are atomic: the data file gets a fresh name, is written to a temporary file and renamed;
the manifest (which names the data file) is written the same way last, so it is the commit point.
A crash leaves either the old bank or the new one, never a mix; the previous data file is deleted
after the new manifest is in place.

``load_bank`` checks the format, the config fingerprint, the KV shape and every entry's sha256
before it reserves a single slot, so a mismatched, truncated or corrupted bank raises
``ValueError`` and leaves the target bank unchanged. ``read_manifest`` checks the whole manifest
(fields, unique keys, dtype and shape, finite poses) for ``verify_bank`` and ``load_bank`` alike.

Concurrency: ``save_bank`` holds an advisory lock (``flock`` on ``.lock`` in the directory, which
records the holder's pid) while it writes; a second saver gets ``BankLockedError`` ("locked by pid
N") at once instead of racing. Under the lock a save (or a load that can take it) deletes what a
killed save left behind: ``.*.tmp-*`` files and data files the manifest does not name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Hashable

import numpy as np
import torch

from worldkv_connector.bank.bank import Bank
from worldkv_connector.bank.files import LOCK, BankLockedError, bank_lock
from worldkv_connector.bank.files import bank_dir as _bank_dir
from worldkv_connector.bank.files import clean_stale as _clean_stale
from worldkv_connector.bank.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, check_compat, decode_key, encode_key,
                                             manifest_shape, read_manifest, shape_record)
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.shapes import KVShape

__all__ = ["save_bank", "load_bank", "read_manifest", "verify_bank", "encode_key", "decode_key", "MANIFEST",
           "FORMAT_VERSION", "BankLockedError", "bank_lock", "LOCK"]

logger = logging.getLogger(__name__)


def _current_data_file(p: Path) -> set[str]:
    try:
        return {read_manifest(p)["data_file"]}
    except (ValueError, FileNotFoundError):
        return set()


# --- helpers ---------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def _digest(kv: torch.Tensor, indices: torch.Tensor | None) -> str:
    h = hashlib.sha256(_tensor_bytes(kv))
    if indices is not None:
        h.update(_tensor_bytes(indices))
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (same directory, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # the data must be on disk before the name points at it
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_bank_shape(bank: Bank, kv_shape: KVShape) -> None:
    got = {"num_layers": bank.num_layers, "num_kv_heads": bank.num_kv_heads, "head_dim": bank.head_dim,
           "dtype": bank.dtype}
    want = {"num_layers": kv_shape.num_layers, "num_kv_heads": kv_shape.num_kv_heads,
            "head_dim": kv_shape.head_dim, "dtype": kv_shape.torch_dtype}
    for name in got:
        if got[name] != want[name]:
            raise ValueError(f"bank {name}={got[name]} does not match kv_shape.{name}={want[name]}")


# --- save ------------------------------------------------------------------------------------------
def save_bank(
    bank: Bank,
    path: str | os.PathLike,
    *,
    session_id: str | None = None,
    config: WorldKVConfig,
    kv_shape: KVShape,
    extra: dict | None = None,
) -> dict:
    """Write ``bank``'s ready entries (or only those whose key is ``(session_id, ...)``) to the
    directory ``path`` (created if needed; a bank saved there before is replaced atomically).

    Entries still being written (not ready) are skipped. Spilled (disk tier) entries are read
    back from their files. Returns the manifest that was written.
    """
    _check_bank_shape(bank, kv_shape)
    if extra is not None:
        try:
            json.dumps(extra)
        except TypeError as exc:
            raise ValueError(f"extra is not JSON-serialisable: {exc}") from None
    with bank_lock(path) as out:
        return _save_locked(bank, out, session_id, config, kv_shape, extra)


def _save_locked(bank: Bank, out: Path, session_id, config: WorldKVConfig, kv_shape: KVShape, extra) -> dict:
    _clean_stale(out, _current_data_file(out))
    keys = [k for k in bank.keys()
            if session_id is None or (isinstance(k, tuple) and len(k) > 0 and k[0] == session_id)]
    tensors: dict[str, torch.Tensor] = {}
    records = []
    skipped = 0
    for key in keys:
        entry = bank.get(key)
        if entry is None or not entry.ready:
            skipped += 1
            continue
        name = f"e{len(records)}"
        kv = bank.read_payload(key)  # [L, 2, T, H, D], CPU
        tensors[f"{name}.kv"] = kv
        if entry.indices is not None:
            tensors[f"{name}.indices"] = entry.indices.contiguous()
        try:
            meta = json.loads(json.dumps(entry.meta))
        except TypeError as exc:
            raise ValueError(f"bank key {key!r}: meta is not JSON-serialisable ({exc})") from None
        records.append({
            "name": name,
            "key": encode_key(key),
            "num_tokens": entry.num_tokens,
            "nbytes": entry.nbytes,
            "has_indices": entry.indices is not None,
            "pose": None if entry.pose is None else np.asarray(entry.pose, dtype=np.float64).tolist(),
            "meta": meta,
            "sha256": _digest(kv, entry.indices),
        })
    if skipped:
        logger.info("save_bank skipped %d entries still being written", skipped)

    previous = next(iter(_current_data_file(out)), None)
    data_file = f"kv-{secrets.token_hex(8)}.safetensors"
    from safetensors.torch import save_file

    _atomic_write(out / data_file, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": config.fingerprint(),
        "kv_shape": shape_record(kv_shape),
        "config": config.to_dict(),
        "session_id": session_id,
        "created_unix": time.time(),
        "data_file": data_file,
        "entries": records,
        "total_bytes": sum(r["nbytes"] for r in records),
        "extra": extra or {},
    }
    text = json.dumps(manifest, indent=1, sort_keys=True)
    _atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    if previous and previous != data_file and (out / previous).is_file():
        (out / previous).unlink()  # only after the new manifest committed
    logger.info("saved %d bank entries (%d bytes) to %s", len(records), manifest["total_bytes"], out)
    return manifest


def _damaged_names(data: Path) -> str:
    """Which tensors of an unreadable safetensors file lie past its end (for the error message)."""
    try:
        size = data.stat().st_size
        with open(data, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        return "its header is unreadable"
    past = sorted({name.split(".")[0] for name, info in header.items()
                   if isinstance(info, dict) and 8 + n + info.get("data_offsets", [0, 0])[1] > size})
    return f"entries {past} lie past the end of the file" if past else "the header does not match the data"


def _open_data(path: Path, manifest: dict):
    from safetensors import safe_open

    data = path / manifest["data_file"]
    if not data.is_file():
        raise ValueError(f"{path}: data file {manifest['data_file']} is missing")
    try:
        return safe_open(str(data), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{data.name} is truncated or corrupted ({_damaged_names(data)}; {exc})") from None


def _verified(f, rec: dict, kv_shape: KVShape | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(kv, indices)`` of one manifest record read from the open file ``f``, after checking
    shape and checksum. ValueError naming the entry on any problem."""
    label = f"entry {rec.get('name')!r} (key {rec.get('key')!r})"
    try:
        names = set(f.keys())
        if f"{rec['name']}.kv" not in names or (rec["has_indices"] and f"{rec['name']}.indices" not in names):
            raise ValueError(f"{label}: its tensors are missing from the data file")
        kv = f.get_tensor(f"{rec['name']}.kv")
        indices = f.get_tensor(f"{rec['name']}.indices") if rec["has_indices"] else None
    except KeyError as exc:
        raise ValueError(f"{label}: field {exc} missing from the manifest record") from None
    except ValueError:
        raise
    except Exception as exc:  # bytes past the end of a truncated file
        raise ValueError(f"{label}: cannot be read ({exc}): truncated or corrupted") from None
    if kv.ndim != 5 or kv.shape[1] != 2 or kv.shape[2] != rec["num_tokens"]:
        raise ValueError(f"{label}: tensor shape {tuple(kv.shape)} does not match num_tokens={rec['num_tokens']}")
    if kv_shape is not None:
        want = (kv_shape.num_layers, 2, rec["num_tokens"], kv_shape.num_kv_heads, kv_shape.head_dim)
        if tuple(kv.shape) != want or kv.dtype != kv_shape.torch_dtype:
            raise ValueError(f"{label}: tensor {tuple(kv.shape)} {kv.dtype}, expected {want} {kv_shape.torch_dtype}")
    if _digest(kv, indices) != rec.get("sha256"):
        raise ValueError(f"{label}: sha256 mismatch: the saved data is corrupted")
    return kv, indices


def verify_bank(path: str | os.PathLike) -> list[str]:
    """Check every entry of a saved bank against its checksum without loading it into a bank.
    Returns the problems found (empty when the bank is intact); each names the entry or file."""
    p = Path(path)
    try:
        manifest = read_manifest(p)
        handle = _open_data(p, manifest)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    shape = manifest_shape(manifest)
    with handle as f:
        for rec in manifest["entries"]:  # keep going after a bad entry: report every damaged one
            try:
                _verified(f, rec, shape)
            except ValueError as exc:
                problems.append(str(exc))
    return problems


# --- load ------------------------------------------------------------------------------------------
def load_bank(path: str | os.PathLike, bank: Bank, *, config: WorldKVConfig, kv_shape: KVShape) -> list[Hashable]:
    """Insert the bank saved in ``path`` into ``bank``; returns the keys inserted, in saved order.

    Verifies first (format, fingerprint, KV shape, every entry's checksum, that no key is already
    in ``bank`` and that enough slots are free); any problem raises ``ValueError`` (naming the
    field or entry) with ``bank`` unchanged. Entries are inserted ready, with pose, meta and indices.
    """
    p = _bank_dir(path, create=False)
    manifest = read_manifest(p)
    try:  # a load that can take the lock clears what a killed save left; a save in progress keeps its files
        with bank_lock(p):  # the manifest read again under the lock: a save may have landed since
            _clean_stale(p, _current_data_file(p))
    except (BankLockedError, OSError, ValueError):
        pass
    check_compat(manifest, config, kv_shape)
    _check_bank_shape(bank, kv_shape)
    keys = []
    for rec in manifest["entries"]:
        key = decode_key(rec["key"])
        if key in bank:
            raise ValueError(f"entry {rec['name']!r}: key {key!r} is already in the bank")
        if not 1 <= rec["num_tokens"] <= bank.slot_tokens:
            raise ValueError(f"entry {rec['name']!r}: num_tokens={rec['num_tokens']} does not fit the bank's "
                             f"slots of {bank.slot_tokens} tokens")
        keys.append(key)
    if len(set(keys)) != len(keys):
        raise ValueError(f"{p}: the manifest lists a key twice")
    if len(keys) > bank.free_slots:
        raise ValueError(f"the saved bank has {len(keys)} entries but the bank has {bank.free_slots} free slots: "
                         "raise bank_bytes or free entries first")
    inserted: list[Hashable] = []
    with _open_data(p, manifest) as f:
        for rec in manifest["entries"]:  # every checksum before any insert; one tensor at a time
            _verified(f, rec, kv_shape)
        try:
            for key, rec in zip(keys, manifest["entries"]):
                # read and checked again: the file could have changed since the first pass
                kv, indices = _verified(f, rec, kv_shape)
                entry = bank.reserve(key, rec["num_tokens"], indices=indices, pose=rec["pose"], meta=rec["meta"])
                if entry is None:  # cannot happen with enough free slots; kept as a guard
                    raise ValueError(f"entry {rec['name']!r}: no free slot")
                inserted.append(key)
                bank.view(key).copy_(kv)
                bank.mark_ready(key)
        except BaseException:
            for key in inserted:  # never half-loaded
                bank.free(key)
            raise
    logger.info("loaded %d bank entries from %s", len(keys), p)
    return keys
