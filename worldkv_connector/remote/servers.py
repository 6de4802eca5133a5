"""Local Mooncake Store and Redis servers on 127.0.0.1 (free ports), for tests, benchmarks and trials.

``start_mooncake(dir)`` starts ``mooncake_master`` (with its HTTP metadata server) and store servers
(``mooncake_client`` processes that contribute memory: data put by a client that only embeds a
segment vanishes when it exits, so the store servers are separate processes). ``start_redis(dir)``
starts ``redis-server`` without persistence. Each returns a handle whose ``remote_config(namespace)``
is the connector's ``remote`` config and whose ``stop()`` terminates the processes (then kills them;
every wait is bounded). Logs go to files in ``dir``.

Mooncake's transfer engine also opens data ports of its own choosing; the RPC, metadata and
metrics ports are bound to 127.0.0.1.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ["MooncakeCluster", "RedisServer", "start_mooncake", "start_redis", "free_port"]

_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting; log:\n{_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {_START_TIMEOUT_S} s; log:\n{_tail(log)}")


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return "(no log)"


def _binary(name: str) -> str:
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.path.exists(here) else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: run `make setup-remote` (make test does it)")
    return found


@dataclass
class _Proc:
    name: str
    argv: list[str]
    log: str
    port: int
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        fh = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            fh.close()
        _wait_port(self.port, self.proc, self.name, self.log)

    def stop(self, kill: bool = False) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        if kill:
            p.kill()
        else:
            p.terminate()
        try:
            p.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=_STOP_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class MooncakeCluster:
    """A master and ``len(stores)`` store servers. ``remote_config(namespace)`` is the connector's
    ``remote`` config for it; ``kill_stores()`` kills every store server (data gone)."""

    master: _Proc
    stores: list[_Proc] = field(default_factory=list)
    metadata_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.master.port}"

    @property
    def metadata_server(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    def remote_config(self, namespace: str, **extra) -> dict:
        return {"backend": "mooncake", "address": self.address, "metadata_server": self.metadata_server,
                "namespace": namespace, **extra}

    def kill_stores(self) -> None:
        for s in self.stores:
            s.stop(kill=True)

    def stop(self) -> None:
        for s in self.stores:
            s.stop()
        self.master.stop()


@dataclass
class RedisServer:
    proc: _Proc

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proc.port}"

    def remote_config(self, namespace: str, **extra) -> dict:
        return {"backend": "redis", "address": self.address, "namespace": namespace, **extra}

    def kill(self) -> None:
        self.proc.stop(kill=True)

    def stop(self) -> None:
        self.proc.stop()


def start_mooncake(workdir: str, *, stores: int = 1, segment: str = "256 MB", lease_ms: int = 5000) -> MooncakeCluster:
    """A master and ``stores`` store servers of ``segment`` each (e.g. "256 MB"); ``lease_ms``: read lease."""
    rpc, meta, metrics = free_port(), free_port(), free_port()
    master = _Proc("mooncake_master", [
        _binary("mooncake_master"), f"-rpc_port={rpc}", "-rpc_address=127.0.0.1",
        "-enable_http_metadata_server=true", "-http_metadata_server_host=127.0.0.1",
        f"-http_metadata_server_port={meta}", "-metrics_host=127.0.0.1", f"-metrics_port={metrics}",
        # a read lease must outlast the transfer (LEASE_EXPIRED otherwise); removes skip leases
        f"-default_kv_lease_ttl={lease_ms}",
    ], os.path.join(workdir, "master.log"), rpc)
    cluster = MooncakeCluster(master, metadata_port=meta)
    try:
        master.start()
        _wait_port(meta, master.proc, "mooncake metadata server", master.log)
        for i in range(stores):
            port = free_port()
            store = _Proc(f"mooncake_client[{i}]", [
                _binary("mooncake_client"), f"-master_server_address={cluster.address}",
                f"-metadata_server={cluster.metadata_server}", f"-global_segment_size={segment}",
                "-host=127.0.0.1", f"-port={port}", "-protocol=tcp",
            ], os.path.join(workdir, f"store{i}.log"), port)
            cluster.stores.append(store)
            store.start()
        time.sleep(0.3)  # the store's segment mounts on the master after its port opens
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_redis(workdir: str, *, maxmemory: str = "512mb") -> RedisServer:
    """A redis-server without persistence, LRU over ``maxmemory``."""
    port = free_port()
    proc = _Proc("redis-server", [
        _binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", workdir, "--protected-mode", "yes", "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru",
    ], os.path.join(workdir, "redis.log"), port)
    server = RedisServer(proc)
    try:
        proc.start()
    except BaseException:
        server.stop()
        raise
    return server
