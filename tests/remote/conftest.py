"""Real servers for the remote-tier tests: ``mooncake_master`` (with its HTTP metadata server), store
servers (``mooncake_client`` processes contributing memory) and ``redis-server``, all on 127.0.0.1
with free ports (``worldkv_connector.remote.servers``), started per test module or per test and always
stopped (terminate, then kill, bounded waits).

``make test`` installs the binaries (``make setup-remote``). A missing binary fails the tests with
the command to run: these tests must run, never skip.
"""
from __future__ import annotations

import tempfile

import pytest

from worldkv_connector.remote.servers import start_mooncake, start_redis


def _start(fn, prefix):
    d = tempfile.TemporaryDirectory(prefix=prefix)
    try:
        return d, fn(d.name)
    except FileNotFoundError as exc:
        d.cleanup()
        pytest.fail(str(exc), pytrace=False)
    except BaseException:
        d.cleanup()
        raise


def _serve(fn, prefix):
    d, server = _start(fn, prefix)
    try:
        yield server
    finally:
        server.stop()
        d.cleanup()


@pytest.fixture(scope="module")
def mooncake_cluster():
    """A master and one store server for the module (stopped afterwards)."""
    yield from _serve(start_mooncake, "wkv-mooncake-")


@pytest.fixture(scope="module")
def redis_server():
    """A redis-server for the module (stopped afterwards)."""
    yield from _serve(start_redis, "wkv-redis-")


@pytest.fixture(params=["mooncake", "redis"])
def remote_server(request):
    """Each backend in turn (the module-scoped servers)."""
    return request.getfixturevalue("mooncake_cluster" if request.param == "mooncake" else "redis_server")


@pytest.fixture
def private_mooncake():
    """A cluster of its own (for tests that kill servers)."""
    yield from _serve(start_mooncake, "wkv-mooncake-")


@pytest.fixture
def private_redis():
    yield from _serve(start_redis, "wkv-redis-")
