"""RemoteConfig: the connector config's ``remote`` object, validated with errors naming the key.

JSON form (the ``remote`` key of ``--kv-connector-config``)::

    {"backend": "mooncake", "address": "127.0.0.1:50051", "metadata_server": "http://127.0.0.1:8080/metadata",
     "namespace": "prod", "world": "island", "persist": true}

``backend``: ``mooncake`` (Mooncake Store; ``address`` is the master's RPC address) or ``redis``
(Redis or Valkey; ``address`` is ``host:port`` or a ``redis://`` URL). ``namespace`` and ``world``
prefix every key (with the model's KV fingerprint, the session, the chunk and the rank).
``persist``: keep a session's objects when it ends (a world others resume or join); by default a
session's objects are removed when it ends.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["RemoteConfig", "BACKENDS"]

BACKENDS = ("mooncake", "redis")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOSTPORT = re.compile(r"^[A-Za-z0-9_.-]+:\d{1,5}$")


@dataclass(frozen=True)
class RemoteConfig:
    """Where the remote tier lives and how keys are named (see the module docstring)."""

    backend: str
    address: str
    namespace: str = "worldkv"
    world: str = "default"
    persist: bool = False
    metadata_server: str | None = None  # mooncake: the transfer metadata server (default http://<master host>:8080/metadata)
    protocol: str = "tcp"  # mooncake transfer protocol: "tcp" or "rdma"
    rdma_devices: str = ""  # mooncake: RDMA devices, comma separated (protocol "rdma")
    local_buffer_bytes: int = 64 << 20  # mooncake: the client's local transfer buffer
    timeout_s: float = 5.0  # redis: socket timeout of one request
    takeover: bool = False  # take a session's writer record from a writer that did not release it

    def __post_init__(self) -> None:
        types = {"backend": str, "address": str, "namespace": str, "world": str, "persist": bool,
                 "metadata_server": (str, type(None)), "protocol": str, "rdma_devices": str,
                 "local_buffer_bytes": int, "timeout_s": (int, float), "takeover": bool}
        for name, want in types.items():
            value = getattr(self, name)
            bad_bool = isinstance(value, bool) and want in (int, (int, float))
            if bad_bool or not isinstance(value, want):
                raise ValueError(f"WorldKVConfig.remote.{name}={value!r} has the wrong type: expected "
                                 f"{_type_names(want)}, got {type(value).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"WorldKVConfig.remote.backend={self.backend!r} is not allowed: choose one of {list(BACKENDS)}")
        addr = self.address
        ok = bool(_HOSTPORT.match(addr)) or (self.backend == "redis" and addr.startswith(("redis://", "rediss://", "unix://")))
        if not ok or (":" in addr and _HOSTPORT.match(addr) and not 1 <= int(addr.rsplit(":", 1)[1]) <= 65535):
            allowed = "host:port" + (" or a redis:// URL" if self.backend == "redis" else "")
            raise ValueError(f"WorldKVConfig.remote.address={addr!r} is not valid: expected {allowed}")
        for name in ("namespace", "world"):
            value = getattr(self, name)
            if not _NAME.match(value):
                raise ValueError(f"WorldKVConfig.remote.{name}={value!r} is not valid: expected 1-64 characters "
                                 "of A-Z a-z 0-9 _ . -")
        if self.metadata_server is not None and not self.metadata_server.startswith(("http://", "etcd://", "P2PHANDSHAKE")):
            raise ValueError(f"WorldKVConfig.remote.metadata_server={self.metadata_server!r} is not valid: expected "
                             "an http:// or etcd:// address, or P2PHANDSHAKE")
        if self.protocol not in ("tcp", "rdma"):
            raise ValueError(f"WorldKVConfig.remote.protocol={self.protocol!r} is not allowed: choose one of ['tcp', 'rdma']")
        if not 1 << 20 <= self.local_buffer_bytes <= 1 << 40:
            raise ValueError(f"WorldKVConfig.remote.local_buffer_bytes={self.local_buffer_bytes} is out of range: "
                             f"allowed {1 << 20} <= local_buffer_bytes <= {1 << 40}")
        if not math.isfinite(self.timeout_s) or not 0.01 <= self.timeout_s <= 600:
            raise ValueError(f"WorldKVConfig.remote.timeout_s={self.timeout_s!r} is out of range: allowed 0.01 <= timeout_s <= 600")

    @property
    def metadata_address(self) -> str:
        """The mooncake metadata server (the explicit one, or the master host's port 8080)."""
        if self.metadata_server is not None:
            return self.metadata_server
        return f"http://{self.address.rsplit(':', 1)[0]}:8080/metadata"

    @classmethod
    def from_value(cls, data: Any) -> "RemoteConfig":
        """From the JSON object (a mapping) or an existing RemoteConfig."""
        if isinstance(data, RemoteConfig):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"WorldKVConfig.remote={data!r} has the wrong type: expected a JSON object like "
                             '{"backend": "mooncake", "address": "host:port", "namespace": "..."}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorldKVConfig.remote key(s) {unknown}: allowed keys are {sorted(known)}")
        missing = [k for k in ("backend", "address") if k not in data]
        if missing:
            raise ValueError(f"WorldKVConfig.remote is missing {missing}: 'backend' ({list(BACKENDS)}) and 'address' are required")
        return cls(**dict(data))

    def to_dict(self) -> dict:
        return asdict(self)


def _type_names(want) -> str:
    ts = want if isinstance(want, tuple) else (want,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in ts)
