"""What the remote tier stores about a chunk: its commit record, the model fingerprint, checksums.

The model fingerprint hashes the KV shape and the config knobs that change what a chunk holds, so
engines of another model or compression never read each other's chunks. A shard is the chunk's
``[num_layers, 2, num_tokens, heads_of_rank, head_dim]`` K/V in the bank dtype, as raw bytes; the
commit record (``ChunkRecord``, JSON) names every shard's shape, dtype and sha256.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

__all__ = ["ChunkRecord", "RemoteWriterError", "model_fingerprint", "sha256_hex", "dtype_name"]


class RemoteWriterError(ValueError):
    """Another engine holds the session's writer record."""


def model_fingerprint(kv_shape, config) -> str:
    """Hash of the KV shape and of the config knobs that change a banked chunk."""
    shape = {f: getattr(kv_shape, f) for f in ("num_layers", "num_kv_heads", "head_dim", "dtype", "frame_tokens")}
    blob = json.dumps({"shape": shape, "config": config.fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ChunkRecord:
    """The commit record of one chunk (JSON in the store)."""

    session: str
    chunk: int
    num_tokens: int
    shard_shape: list[int]  # [L, 2, T, H_rank, D] of each rank's shard
    dtype: str
    num_ranks: int
    shards: list[str]  # sha256 hex of each rank's shard
    poses: list | None  # [frames_per_chunk, 4, 4] camera-to-world
    first_frame: int | None
    indices_sha: str | None
    writer: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChunkRecord":
        rec = cls(**json.loads(data))
        if not (isinstance(rec.shards, list) and len(rec.shards) == rec.num_ranks and len(rec.shard_shape) == 5):
            raise ValueError("inconsistent commit record")
        return rec


def sha256_hex(t: torch.Tensor) -> str:
    """sha256 of a contiguous CPU tensor's bytes, as hex."""
    return hashlib.sha256(memoryview(t.view(torch.uint8).reshape(-1).numpy())).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the record's dtype field)."""
    return str(dtype).removeprefix("torch.")
