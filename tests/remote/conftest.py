"""Real servers for the remote-tier tests: ``mooncake_master`` (with its HTTP metadata server), store
servers (``mooncake_client`` processes contributing memory) and ``redis-server``, all on 127.0.0.1
with free ports, started per test module and always stopped (terminate, then kill, bounded waits).

``make test`` installs the binaries (``make setup-remote``). A missing binary fails the tests with
the command to run: these tests must run, never skip.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

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
        pytest.fail(f"{name} is not installed: run `make setup-remote` (make test does it)", pytrace=False)
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


def start_mooncake(workdir: str, *, stores: int = 1, segment: str = "256 MB") -> MooncakeCluster:
    rpc, meta, metrics = free_port(), free_port(), free_port()
    master = _Proc("mooncake_master", [
        _binary("mooncake_master"), f"-rpc_port={rpc}", "-rpc_address=127.0.0.1",
        "-enable_http_metadata_server=true", "-http_metadata_server_host=127.0.0.1",
        f"-http_metadata_server_port={meta}", "-metrics_host=127.0.0.1", f"-metrics_port={metrics}",
        # short read leases, so a session's keys can be removed right after a test read them
        "-default_kv_lease_ttl=50",
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


def start_redis(workdir: str) -> RedisServer:
    port = free_port()
    proc = _Proc("redis-server", [
        _binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", workdir, "--protected-mode", "yes", "--maxmemory", "512mb",
    ], os.path.join(workdir, "redis.log"), port)
    server = RedisServer(proc)
    try:
        proc.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def mooncake_cluster():
    """A master and one store server for the module (stopped afterwards)."""
    with tempfile.TemporaryDirectory(prefix="wkv-mooncake-") as d:
        cluster = start_mooncake(d)
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def redis_server():
    """A redis-server for the module (stopped afterwards)."""
    with tempfile.TemporaryDirectory(prefix="wkv-redis-") as d:
        server = start_redis(d)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(params=["mooncake", "redis"])
def remote_server(request):
    """Each backend in turn (the module-scoped servers)."""
    return request.getfixturevalue("mooncake_cluster" if request.param == "mooncake" else "redis_server")


@pytest.fixture
def private_mooncake():
    """A cluster of its own (for tests that kill servers)."""
    with tempfile.TemporaryDirectory(prefix="wkv-mooncake-") as d:
        cluster = start_mooncake(d)
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture
def private_redis():
    with tempfile.TemporaryDirectory(prefix="wkv-redis-") as d:
        server = start_redis(d)
        try:
            yield server
        finally:
            server.stop()
