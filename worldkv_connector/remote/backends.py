"""The remote tier's stores: Mooncake Store and Redis/Valkey behind one small interface.

A backend moves bytes; it knows nothing of chunks. Tensors are contiguous CPU tensors (any dtype,
moved as their raw bytes); blobs are small ``bytes`` (records). Per-object results are return
values, never exceptions: ``put_tensors`` gives one bool per key, ``get_tensors`` the bytes read
per key or a negative code (``MISSING``, ``BAD_SIZE``, ``FAILED``), so a dead server turns into
misses. Only construction raises (``RemoteError``: cannot connect).

Mooncake: a client that contributes no memory (``global_segment_size`` 0; store servers own the
capacity, and data put by an embedding client would vanish with it). Tensors inside memory
registered with ``register`` move zero-copy (``batch_put_from`` / ``batch_get_into``); others are
copied through the client. A put of an existing key keeps the old value (objects are immutable);
a remove right after a read can be refused while the read's lease lasts, so removes retry
(bounded).
"""
from __future__ import annotations

import logging
import re
import socket
import time
from typing import Sequence

import torch

from worldkv_connector.remote.config import RemoteConfig

__all__ = ["RemoteBackend", "RemoteError", "MooncakeBackend", "RedisBackend", "make_backend", "MISSING", "BAD_SIZE", "FAILED"]

logger = logging.getLogger(__name__)

MISSING, BAD_SIZE, FAILED = -1, -2, -3


class RemoteError(RuntimeError):
    """The remote store cannot be reached or set up."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _as_bytes(t: torch.Tensor) -> memoryview:
    # raw bytes of a contiguous CPU tensor of any dtype (bf16 included), no copy
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


class RemoteBackend:
    """Interface (see the module docstring). ``raw`` is the underlying client (for benchmarks)."""

    name = "?"
    raw: object = None
    _failures = 0

    def _warn(self, msg: str, *args) -> None:
        # the first failure at WARNING, later ones at DEBUG: a dead server must not flood the log
        self._failures += 1
        (logger.warning if self._failures == 1 else logger.debug)(msg + ("" if self._failures > 1 else
                                                                         " (further failures are logged at DEBUG)"), *args)

    def register(self, t: torch.Tensor) -> None:
        """Make ``t``'s memory (contiguous CPU) eligible for zero-copy transfers (no-op by default)."""

    def put_tensors(self, keys: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[bool]:
        raise NotImplementedError

    def get_tensors(self, keys: Sequence[str], outs: Sequence[torch.Tensor]) -> list[int]:
        raise NotImplementedError

    def put_blob(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        raise NotImplementedError

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist. True when this call created it."""
        raise NotImplementedError

    def get_blob(self, key: str) -> bytes | None:
        raise NotImplementedError

    def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get_blob(k) for k in keys]

    def remove(self, keys: Sequence[str]) -> int:
        raise NotImplementedError

    def remove_prefix(self, prefix: str) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


# --- Mooncake Store --------------------------------------------------------------------------------
def _local_ip(host: str, port: int) -> str:
    """The local address that reaches ``host`` (what peers use to reach this client)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class MooncakeBackend(RemoteBackend):
    name = "mooncake"

    def __init__(self, config: RemoteConfig) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:
            raise RemoteError("remote backend 'mooncake' needs the mooncake-transfer-engine package "
                              f"(mooncake-transfer-engine-non-cuda on CPU machines): {exc}") from None
        host, port = config.address.rsplit(":", 1)
        self.raw = MooncakeDistributedStore()
        rc = self.raw.setup(_local_ip(host, int(port)), config.metadata_address, 0, config.local_buffer_bytes,
                            config.protocol, config.rdma_devices, config.address)
        if rc != 0:
            raise RemoteError(f"Mooncake Store setup failed (code {rc}) for master {config.address}, "
                              f"metadata server {config.metadata_address}: is mooncake_master running there?")
        self._regions: list[tuple[int, int]] = []

    def register(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"register: expected a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
        ptr, n = t.data_ptr(), _nbytes(t)
        if self._registered(ptr, n):
            return
        rc = self.raw.register_buffer(ptr, n)
        if rc != 0:
            self._warn("Mooncake register_buffer of %d bytes failed (code %d): transfers copy instead", n, rc)
            return
        self._regions.append((ptr, ptr + n))

    def _registered(self, ptr: int, n: int) -> bool:
        return any(lo <= ptr and ptr + n <= hi for lo, hi in self._regions)

    def _split(self, tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
        fast, slow = [], []
        for i, t in enumerate(tensors):
            ok = t.device.type == "cpu" and t.is_contiguous() and self._registered(t.data_ptr(), _nbytes(t))
            (fast if ok else slow).append(i)
        return fast, slow

    def put_tensors(self, keys, tensors):
        out = [False] * len(keys)
        fast, slow = self._split(tensors)
        try:
            if fast:
                rcs = self.raw.batch_put_from([keys[i] for i in fast], [tensors[i].data_ptr() for i in fast],
                                              [_nbytes(tensors[i]) for i in fast])
                for i, rc in zip(fast, rcs):
                    out[i] = rc == 0
            for i in slow:
                out[i] = self.raw.put(keys[i], _as_bytes(tensors[i].contiguous())) == 0
        except Exception as exc:  # noqa: BLE001 - a failed put is a result
            self._warn("Mooncake put failed: %s: %s", type(exc).__name__, exc)
        return out

    def get_tensors(self, keys, outs):
        res = [FAILED] * len(keys)
        fast, slow = self._split(outs)
        try:
            if fast:
                rcs = self.raw.batch_get_into([keys[i] for i in fast], [outs[i].data_ptr() for i in fast],
                                              [_nbytes(outs[i]) for i in fast])
                for i, rc in zip(fast, rcs):
                    if rc == -707:  # LEASE_EXPIRED: the read outlasted its lease; once more
                        rc = self.raw.batch_get_into([keys[i]], [outs[i].data_ptr()], [_nbytes(outs[i])])[0]
                    res[i] = self._code(rc, _nbytes(outs[i]))
            for i in slow:
                data = self.raw.get(keys[i])
                if not data:
                    res[i] = MISSING
                elif len(data) != _nbytes(outs[i]):
                    res[i] = BAD_SIZE
                else:
                    outs[i].view(torch.uint8).reshape(-1).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    res[i] = len(data)
        except Exception as exc:  # noqa: BLE001 - a failed get is a miss
            self._warn("Mooncake get failed: %s: %s", type(exc).__name__, exc)
        return res

    @staticmethod
    def _code(rc: int, want: int) -> int:
        if rc == want:
            return rc
        if rc == -704:  # OBJECT_NOT_FOUND
            return MISSING
        if rc >= 0 or rc == -600:  # a different size, or the buffer is too small for the object
            return BAD_SIZE
        return FAILED

    def put_blob(self, key, data, *, overwrite=False):
        try:
            return (self.raw.upsert(key, data) if overwrite else self.raw.put(key, data)) == 0
        except Exception as exc:  # noqa: BLE001
            self._warn("Mooncake put of %r failed: %s", key, exc)
            return False

    def put_if_absent(self, key, data):
        # a put of an existing key keeps the old value: put, then read back who won
        try:
            if self.raw.is_exist(key) == 1:
                return False
            self.raw.put(key, data)
            return bytes(self.raw.get(key)) == bytes(data)
        except Exception as exc:  # noqa: BLE001
            self._warn("Mooncake put_if_absent of %r failed: %s", key, exc)
            return False

    def get_blob(self, key):
        try:
            data = self.raw.get(key)
        except Exception as exc:  # noqa: BLE001
            self._warn("Mooncake get of %r failed: %s", key, exc)
            return None
        return bytes(data) if data else None

    def get_blobs(self, keys):
        # one existence round trip first: most probed keys of a listing are absent
        try:
            there = self.raw.batch_is_exist(list(keys)) if keys else []
        except Exception as exc:  # noqa: BLE001
            self._warn("Mooncake batch_is_exist failed: %s: %s", type(exc).__name__, exc)
            return [None] * len(keys)
        return [self.get_blob(k) if e == 1 else None for k, e in zip(keys, there)]

    def remove(self, keys):
        if not keys:
            return 0
        # force: skip read leases (a reader racing a removal fails its sha256 check: a miss)
        try:
            return sum(rc == 0 for rc in self.raw.batch_remove(list(keys), True))
        except Exception as exc:  # noqa: BLE001
            self._warn("Mooncake remove failed: %s: %s", type(exc).__name__, exc)
            return 0

    def remove_prefix(self, prefix):
        pattern = "^" + re.escape(prefix)
        try:
            return max(0, self.raw.remove_by_regex(pattern, True))
        except Exception as exc:  # noqa: BLE001
            self._warn("Mooncake remove_by_regex(%r) failed: %s", pattern, exc)
            return 0

    def close(self):
        for lo, _ in self._regions:
            try:
                self.raw.unregister_buffer(lo)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._regions = []
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001
            pass


# --- Redis / Valkey --------------------------------------------------------------------------------
class RedisBackend(RemoteBackend):
    name = "redis"

    def __init__(self, config: RemoteConfig) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise RemoteError(f"remote backend 'redis' needs the redis package (with hiredis): {exc}") from None
        self._redis = redis
        kw = dict(socket_timeout=config.timeout_s, socket_connect_timeout=config.timeout_s, retry=Retry(NoBackoff(), 0))
        addr = config.address
        if "://" in addr:
            self.raw = redis.Redis.from_url(addr, **kw)
        else:
            host, port = addr.rsplit(":", 1)
            self.raw = redis.Redis(host=host, port=int(port), **kw)
        try:
            self.raw.ping()
        except redis.RedisError as exc:
            raise RemoteError(f"cannot reach Redis/Valkey at {addr}: {exc}") from None

    def _guard(self, what: str, fn, default):
        try:
            return fn()
        except self._redis.RedisError as exc:
            self._warn("Redis %s failed: %s: %s", what, type(exc).__name__, exc)
            return default

    def put_tensors(self, keys, tensors):
        def run():
            pipe = self.raw.pipeline(transaction=False)
            for k, t in zip(keys, tensors):
                pipe.set(k, _as_bytes(t.contiguous()))
            return [bool(r) for r in pipe.execute()]
        return self._guard("put", run, [False] * len(keys))

    def get_tensors(self, keys, outs):
        def run():
            pipe = self.raw.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            res = []
            for data, out in zip(pipe.execute(), outs):
                if data is None:
                    res.append(MISSING)
                elif len(data) != _nbytes(out):
                    res.append(BAD_SIZE)
                else:
                    out.view(torch.uint8).reshape(-1).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    res.append(len(data))
            return res
        return self._guard("get", run, [FAILED] * len(keys))

    def put_blob(self, key, data, *, overwrite=False):
        return bool(self._guard("set", lambda: self.raw.set(key, data, nx=not overwrite), False))

    def put_if_absent(self, key, data):
        return bool(self._guard("set nx", lambda: self.raw.set(key, data, nx=True), False))

    def get_blob(self, key):
        return self._guard("get", lambda: self.raw.get(key), None)

    def get_blobs(self, keys):
        if not keys:
            return []
        return self._guard("mget", lambda: self.raw.mget(list(keys)), [None] * len(keys))

    def remove(self, keys):
        if not keys:
            return 0
        return int(self._guard("del", lambda: self.raw.delete(*keys), 0))

    def remove_prefix(self, prefix):
        glob = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"

        def run():
            n = 0
            batch = []
            for key in self.raw.scan_iter(match=glob, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    n += self.raw.delete(*batch)
                    batch = []
            if batch:
                n += self.raw.delete(*batch)
            return n
        return int(self._guard("remove_prefix", run, 0))

    def close(self):
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001
            pass


_REGISTRY = {"mooncake": MooncakeBackend, "redis": RedisBackend}


def make_backend(config: RemoteConfig) -> RemoteBackend:
    """The backend ``config.backend`` names, connected (``RemoteError`` if it cannot be reached)."""
    return _REGISTRY[config.backend](config)
