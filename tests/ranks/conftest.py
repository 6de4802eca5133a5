"""A real redis-server on 127.0.0.1 (free port) for the rank tests, started once and always stopped."""
import tempfile

import pytest

from worldkv_connector.remote.servers import start_redis


@pytest.fixture(scope="module")
def redis_server():
    with tempfile.TemporaryDirectory(prefix="wkv-redis-ranks-") as d:
        try:
            server = start_redis(d)
        except FileNotFoundError as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield server
        finally:
            server.stop()
