"""The manifest of a saved bank (``manifest.json``): how keys are written as JSON, reading and
checking a manifest, and checking that it fits a config and a KV shape (see ``persist``'s module
docstring for the layout of a saved bank).

Keys are serialised as JSON: tuples become lists (keys are hashable, so they never hold lists and
the reverse mapping is exact), ``bytes`` become ``{"bytes": hex}``; str, int, float, bool and None
stay as they are. Any other key type is refused with a ``ValueError`` naming the key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import torch

from worldkv_connector.bank.files import bank_dir
from worldkv_connector.checks import check_int
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.shapes import KVShape

__all__ = ["MANIFEST", "FORMAT", "FORMAT_VERSION", "encode_key", "decode_key", "read_manifest", "shape_record",
           "check_compat", "manifest_shape"]

MANIFEST = "manifest.json"
FORMAT = "worldkv-bank"
FORMAT_VERSION = 1
_SHAPE_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "dtype", "frame_tokens")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # KVShape.dtype names


# --- keys ------------------------------------------------------------------------------------------
def encode_key(key: Hashable) -> Any:
    """JSON-able form of a bank key (tuples -> lists, bytes -> {"bytes": hex})."""
    if key is None or isinstance(key, (str, bool, int, float)):
        return key
    if isinstance(key, tuple):
        return [encode_key(k) for k in key]
    if isinstance(key, bytes):
        return {"bytes": key.hex()}
    raise ValueError(f"bank key {key!r} of type {type(key).__name__} cannot be saved: "
                     "keys must be str, int, float, bool, None, bytes or tuples of those")


def decode_key(data: Any) -> Hashable:
    """Inverse of ``encode_key``."""
    if isinstance(data, list):
        return tuple(decode_key(d) for d in data)
    if isinstance(data, dict):
        if set(data) != {"bytes"} or not isinstance(data["bytes"], str):
            raise ValueError(f"saved key {data!r} is not a valid encoded key")
        return bytes.fromhex(data["bytes"])
    return data


def shape_record(kv_shape: KVShape) -> dict:
    return {f: getattr(kv_shape, f) for f in _SHAPE_FIELDS}


# --- read and check -------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the bank saved in directory ``path``, after checking its format and version.
    FileNotFoundError if there is none; ValueError if it is not a WorldKV bank manifest."""
    file = bank_dir(path, create=False) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no saved bank here ({MANIFEST} not found)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: format={manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file}: version: saved {manifest.get('version')!r}, expected {FORMAT_VERSION}")
    for name, kind in (("entries", list), ("kv_shape", dict), ("data_file", str), ("fingerprint", str)):
        if not isinstance(manifest.get(name), kind):
            raise ValueError(f"{file}: field {name!r} is missing or not a {kind.__name__}")
    shape = manifest["kv_shape"]
    for name in ("num_layers", "num_kv_heads", "head_dim", "frame_tokens"):
        value = shape.get(name)
        check_int(f"{file}: kv_shape.{name}", value, 1)
    if shape.get("dtype") not in _DTYPES:
        raise ValueError(f"{file}: kv_shape.dtype={shape.get('dtype')!r}: expected one of {sorted(set(_DTYPES))}")
    seen: dict = {}
    names: set = set()
    for i, rec in enumerate(manifest["entries"]):
        _check_record(file, i, rec, shape)
        try:
            key = decode_key(rec["key"])
            hash(key)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{file}: entry #{i} ({rec.get('name')!r}) key {rec['key']!r} is not a valid key ({exc})") from None
        if key in seen:
            raise ValueError(f"{file}: entries #{seen[key]} and #{i} have the same key {key!r}")
        if rec["name"] in names:
            raise ValueError(f"{file}: entry #{i}: name {rec['name']!r} is used twice")
        seen[key] = i
        names.add(rec["name"])
    if Path(manifest["data_file"]).name != manifest["data_file"]:
        raise ValueError(f"{file}: data_file {manifest['data_file']!r} must be a plain file name")
    return manifest


_RECORD = {"name": str, "num_tokens": int, "nbytes": int, "has_indices": bool, "sha256": str, "meta": dict}


def _check_record(file: Path, i: int, rec: Any, shape: dict) -> None:
    if not isinstance(rec, dict) or "key" not in rec:
        raise ValueError(f"{file}: entry #{i} is not a record with a key")
    for name, kind in _RECORD.items():
        value = rec.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{file}: entry #{i} ({rec.get('name')!r}) field {name!r}={value!r}: expected {kind.__name__}")
    label = f"{file}: entry #{i} ({rec['name']!r})"
    if rec["num_tokens"] < 1:
        raise ValueError(f"{label}: num_tokens={rec['num_tokens']}: expected >= 1")
    itemsize = torch.empty((), dtype=_DTYPES[shape["dtype"]]).element_size()
    want = 2 * shape["num_layers"] * rec["num_tokens"] * shape["num_kv_heads"] * shape["head_dim"] * itemsize
    if rec["nbytes"] != want:
        raise ValueError(f"{label}: nbytes={rec['nbytes']} does not match num_tokens={rec['num_tokens']} and the "
                         f"kv_shape ({want} bytes)")
    pose = rec.get("pose")
    if pose is not None:
        try:
            arr = np.asarray(pose, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{label}: pose is not a numeric array") from None
        if arr.ndim not in (2, 3) or arr.shape[-2:] != (4, 4):
            raise ValueError(f"{label}: pose of shape {list(arr.shape)}, expected [4, 4] or [F, 4, 4]")
        if not np.isfinite(arr).all():
            raise ValueError(f"{label}: pose holds NaN or inf: not a finite number")


def check_compat(manifest: dict, config: WorldKVConfig, kv_shape: KVShape) -> None:
    if manifest["fingerprint"] != config.fingerprint():
        raise ValueError(f"fingerprint: saved {manifest['fingerprint']}, expected {config.fingerprint()} "
                         "(the bank was saved with different frames_per_chunk/keep_ratio/pooled/page_size)")
    want = shape_record(kv_shape)
    for name in _SHAPE_FIELDS:
        saved = manifest["kv_shape"].get(name)
        if saved != want[name]:
            extra = manifest.get("extra") if isinstance(manifest.get("extra"), dict) else {}
            saved_model = extra.get("model") if isinstance(extra.get("model"), str) else None
            if saved_model is not None and saved_model == kv_shape.name:  # same model, other dtype or layout
                why = f"the bank was saved for {saved_model!r} with another KV {name} (e.g. another --dtype)"
            else:
                model = f" ({saved_model!r})" if saved_model is not None else ""
                why = f"the bank was saved for another model{model} than {kv_shape.name!r}, whose KV it cannot hold"
            raise ValueError(f"kv_shape.{name}: saved {saved!r}, expected {want[name]!r}: {why}")


def manifest_shape(manifest: dict) -> KVShape:
    """The KV shape a manifest declares (checked by read_manifest), to verify tensors against."""
    s = manifest["kv_shape"]
    name = (manifest.get("extra") or {}).get("kv_shape") if isinstance(manifest.get("extra"), dict) else None
    return KVShape(name=str(name or "saved"), num_layers=s["num_layers"], num_kv_heads=s["num_kv_heads"],
                   head_dim=s["head_dim"], dtype=s["dtype"], frame_tokens=s["frame_tokens"])
