"""The disk tier: bank entries spilled from a full host tier, one checksummed file per entry.

The disk tier is a spill cache, not persistence (that is ``persist.save_bank``): it lives in a fresh
subdirectory of ``bank_dir`` created per bank (so two engines sharing ``bank_dir`` never collide)
and removed when the bank closes or is garbage collected. Each entry is one file

    magic "WKVSPIL1" (8 bytes) | sha256 of the payload (32 bytes) | payload

written to a temporary name and renamed into place, so a crash mid-write never leaves a file that
reads back as valid. The payload is the entry's ``[num_layers, 2, num_tokens, H, D]`` K/V in the
bank dtype, contiguous. Reads verify the digest against the one recorded at write time: a damaged
or missing file raises ``DiskTierError``, never returns wrong bytes.

The tier has a byte capacity (payload bytes) and its own LRU order: when a spill does not fit,
the least recently used files the bank allows (``can_evict``) are dropped to make room.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from worldkv_connector.checks import check_int
from worldkv_connector.config import WorldKVConfig

__all__ = ["DiskTier", "DiskTierConfig", "DiskTierError", "NotResidentError", "DISK"]

logger = logging.getLogger(__name__)

_MAGIC = b"WKVSPIL1"
_HEADER = len(_MAGIC) + 32


class DiskTierError(RuntimeError):
    """A spilled entry's file is missing, truncated or does not match its checksum."""


@dataclass(frozen=True)
class DiskTierConfig:
    """Where spilled entries go (``path``: an existing or creatable directory) and how many payload
    bytes they may take (``capacity_bytes`` >= 1)."""

    path: str
    capacity_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ValueError(f"DiskTierConfig.path={self.path!r}: expected a non-empty directory path")
        cap = self.capacity_bytes
        check_int("DiskTierConfig.capacity_bytes", cap, 1, 1 << 52)


@dataclass
class _File:
    name: str
    nbytes: int
    digest: bytes


def _tensor_bytes(payload: torch.Tensor) -> bytes:
    # any float dtype (bf16 included) as raw bytes: reinterpret the contiguous CPU copy as uint8
    return payload.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


class DiskTier:
    """Spilled bank entries, one file each, with a byte capacity and LRU eviction.

    Keys are the bank's keys (any hashable); files are named by a counter, so keys need no
    serialisation here. Not thread-safe: the bank's owner drives it.
    """

    def __init__(self, path: str | os.PathLike, capacity_bytes: int) -> None:
        self.config = DiskTierConfig(str(path), capacity_bytes)
        self.capacity_bytes = capacity_bytes
        os.makedirs(self.config.path, exist_ok=True)
        # our own subdirectory: stale files of another bank or a crashed run are never mistaken for ours
        self.dir = tempfile.mkdtemp(prefix="spill-", dir=self.config.path)
        self._files: OrderedDict[Hashable, _File] = OrderedDict()  # LRU order, oldest first
        self._seq = 0
        self.bytes_used = 0
        self.evictions = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)

    @classmethod
    def from_config(cls, config: WorldKVConfig) -> "DiskTier | None":
        """The tier ``config.bank_dir`` / ``config.disk_bytes`` ask for; None when ``bank_dir`` is unset
        or ``disk_bytes`` is 0."""
        if config.bank_dir is None or config.disk_bytes == 0:
            return None
        return cls(config.bank_dir, config.disk_bytes)

    # --- queries -----------------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __len__(self) -> int:
        return len(self._files)

    def keys(self) -> list[Hashable]:
        """Keys, least recently used first."""
        return list(self._files)

    def nbytes(self, key: Hashable) -> int:
        return self._file(key).nbytes

    def path_of(self, key: Hashable) -> str:
        """The file holding ``key``'s payload (for tools and fault injection)."""
        return os.path.join(self.dir, self._file(key).name)

    def _file(self, key: Hashable) -> _File:
        self._check_open()
        try:
            return self._files[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not on the disk tier") from None

    # --- writes ------------------------------------------------------------------------------------
    def put(
        self, key: Hashable, payload: torch.Tensor, *, can_evict: Callable[[Hashable], bool] = lambda key: True,
        decided: bool = False,
    ) -> tuple[bool, list[Hashable]]:
        """Write ``payload`` (``[L, 2, T, H, D]``, any float dtype, any device) as ``key``.

        When it does not fit, the least recently used keys with ``can_evict(key)`` true are removed
        first. Returns ``(stored, evicted_keys)``; ``stored`` is False when even that would not make
        room (e.g. an entry larger than the whole tier; nothing is evicted then) or when the write
        failed (the keys already evicted for it are still reported).

        decided: the spill was decided by a ``SlotDirectory``, which evicted what the capacity
        needs: nothing is evicted here, and the tier may be over capacity until the step's restores
        (decided beside it) remove their files.
        """
        self._check_open()
        if key in self._files:
            raise ValueError(f"key {key!r} is already on the disk tier")
        data = _tensor_bytes(payload)
        need = len(data)
        victims: list[Hashable] = []
        if not decided and self.bytes_used + need > self.capacity_bytes:
            room = self.capacity_bytes - self.bytes_used
            for k, f in self._files.items():
                if room >= need:
                    break
                if can_evict(k):
                    victims.append(k)
                    room += f.nbytes
            if room < need:
                return False, []
            for k in victims:
                self.remove(k)
                self.evictions += 1
        digest = hashlib.sha256(data).digest()
        self._seq += 1
        name = f"{self._seq:010d}.kv"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
        try:
            # no fsync: the tier does not outlive the process, so only atomicity matters
            with os.fdopen(fd, "wb") as fh:
                fh.write(_MAGIC + digest + data)
            os.replace(tmp, os.path.join(self.dir, name))  # atomic: readers see the whole file or none
        except OSError as exc:  # disk full, permissions: the spill fails, the caller drops the entry
            if os.path.exists(tmp):
                os.unlink(tmp)
            logger.warning("disk tier write of %r (%d bytes) failed: %s", key, need, exc)
            return False, victims
        self._files[key] = _File(name, need, digest)
        self.bytes_used += need
        return True, victims

    def remove(self, key: Hashable) -> bool:
        """Delete ``key``'s file. False if the key is not on the tier (a file already gone is fine)."""
        self._check_open()
        f = self._files.pop(key, None)
        if f is None:
            return False
        self.bytes_used -= f.nbytes
        try:
            os.unlink(os.path.join(self.dir, f.name))
        except FileNotFoundError:
            logger.warning("disk tier file of %r was already gone", key)
        return True

    # --- reads -------------------------------------------------------------------------------------
    def read(self, key: Hashable, out: torch.Tensor) -> None:
        """Copy ``key``'s payload into ``out`` (``[L, 2, T, H, D]``, the payload's dtype and byte size,
        any device, may be strided) after checking the file's checksum. Raises ``DiskTierError``
        when the file is missing, truncated or damaged; ``out`` is then left untouched."""
        f = self._file(key)
        if out.numel() * out.element_size() != f.nbytes:
            raise ValueError(f"out holds {out.numel() * out.element_size()} bytes, key {key!r} has {f.nbytes}")
        path = os.path.join(self.dir, f.name)
        try:
            with open(path, "rb") as fh:
                blob = fh.read()
        except FileNotFoundError:
            raise DiskTierError(f"disk tier file of {key!r} is missing ({f.name})") from None
        if len(blob) != _HEADER + f.nbytes or blob[: len(_MAGIC)] != _MAGIC:
            raise DiskTierError(f"disk tier file of {key!r} is truncated or not a spill file ({len(blob)} bytes, "
                                f"expected {_HEADER + f.nbytes})")
        data = memoryview(blob)[_HEADER:]
        if blob[len(_MAGIC):_HEADER] != f.digest or hashlib.sha256(data).digest() != f.digest:
            raise DiskTierError(f"disk tier file of {key!r} failed its sha256 check: the entry is corrupted")
        src = torch.frombuffer(bytearray(data), dtype=out.dtype).view(out.shape)
        out.copy_(src)
        self._files.move_to_end(key)  # a read is a use

    def touch(self, key: Hashable) -> None:
        self._file(key)
        self._files.move_to_end(key)

    # --- lifetime ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the disk tier is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Delete every spilled file and the tier's directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._files.clear()
        self.bytes_used = 0
        self._finalizer()

    def stats(self) -> dict:
        return {"bytes_used": self.bytes_used, "entries": len(self._files), "capacity_bytes": self.capacity_bytes,
                "evictions": self.evictions, "dir": self.dir}

    def __repr__(self) -> str:
        return f"DiskTier(dir={self.dir!r}, entries={len(self._files)}, bytes_used={self.bytes_used})"


DISK = "disk"  # BankEntry.tier of an entry spilled to the disk tier


class NotResidentError(RuntimeError):
    """The entry's payload is on the disk tier: ``ensure_resident(key)`` first."""
