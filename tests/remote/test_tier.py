"""The remote tier against real servers (Mooncake Store and Redis): bit-exact round trips, commit
records, misses on missing or corrupted shards, writer records, session removal."""
import uuid

import numpy as np
import pytest
import torch

from worldkv_connector.config import WorldKVConfig
from worldkv_connector.remote import RemoteConfig, RemoteError, RemoteTier, RemoteWriterError
from worldkv_connector.remote.backends import make_backend

POSES = np.broadcast_to(np.eye(4), (3, 4, 4)).copy()


def _tier(server, **extra) -> RemoteTier:
    cfg = RemoteConfig.from_value(server.remote_config(f"t{uuid.uuid4().hex[:8]}", **extra))
    return RemoteTier(cfg, fingerprint="fp")


def _payload(dtype, seed, tokens=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, tokens, 3, 8, generator=g).to(dtype)  # [L, 2, T, H, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(remote_server, dtype):
    tier = _tier(remote_server)
    try:
        chunks = {c: _payload(dtype, c) for c in range(3)}
        ix = torch.arange(2 * 40, dtype=torch.int64).reshape(2, 40)
        for c, p in chunks.items():
            assert tier.write_chunk("s", c, p, poses=POSES, first_frame=3 * c, indices=ix)
        recs = tier.committed("s")
        assert [r.chunk for r in recs] == [0, 1, 2] and recs[1].first_frame == 3
        outs = [torch.empty_like(chunks[r.chunk]) for r in recs]
        assert tier.get_shards(recs, outs) == [True] * 3
        for r, out in zip(recs, outs):
            assert torch.equal(out.view(torch.uint8), chunks[r.chunk].view(torch.uint8))
        assert torch.equal(tier.get_indices(recs[0], 2), ix)
        assert tier.stats()["misses"] == 0
    finally:
        tier.end_session("s")
        tier.close()


def test_zero_copy_from_a_registered_buffer(mooncake_cluster):
    """Shards inside registered memory go through batch_put_from / batch_get_into."""
    tier = _tier(mooncake_cluster)
    try:
        slab = torch.randn(2, 2, 2, 64, 2, 8)
        tier.backend.register(slab)
        assert tier.put_shards([("s", 0, slab[0])])[0] is not None
        out = torch.zeros_like(slab)
        tier.backend.register(out)
        rec = tier.make_record("s", 0, slab[0], [tier.put_shards([("s", 1, slab[1])])[0]])
        rec.chunk = 1
        assert tier.commit(rec)
        assert tier.get_shards(tier.committed("s"), [out[1]]) == [True]
        assert torch.equal(out[1], slab[1])
    finally:
        tier.end_session("s")
        tier.close()


def test_uncommitted_chunk_is_not_a_candidate(remote_server):
    tier = _tier(remote_server)
    try:
        tier.acquire_writer("s")
        assert tier.put_shards([("s", 0, _payload(torch.float32, 0))])[0] is not None  # shard, no commit
        assert tier.committed("s") == []
    finally:
        tier.end_session("s")
        tier.close()


def test_corrupted_shard_is_a_reported_miss(remote_server):
    tier = _tier(remote_server)
    try:
        good, bad = _payload(torch.float32, 1), _payload(torch.float32, 2)
        assert tier.write_chunk("s", 0, good, poses=POSES) and tier.write_chunk("s", 1, good, poses=POSES)
        key = tier.shard_key("s", 1)
        assert tier.backend.remove([key]) == 1
        assert tier.backend.put_tensors([key], [bad]) == [True]  # same size, other bytes
        recs = tier.committed("s")
        outs = [torch.empty_like(good) for _ in recs]
        assert tier.get_shards(recs, outs) == [True, False]
        st = tier.stats()
        assert st["misses"] == 1 and st["corrupt"] == 1
        assert tier.miss_log[-1][:2] == ("s", 1) and "sha256" in tier.miss_log[-1][2]
    finally:
        tier.end_session("s")
        tier.close()


def test_missing_shard_is_a_reported_miss(remote_server):
    tier = _tier(remote_server)
    try:
        p = _payload(torch.float32, 3)
        assert tier.write_chunk("s", 0, p, poses=POSES)
        tier.backend.remove([tier.shard_key("s", 0)])
        recs = tier.committed("s")
        assert tier.get_shards(recs, [torch.empty_like(p)]) == [False]
        assert tier.stats()["missing"] == 1 and "missing" in tier.miss_log[-1][2]
    finally:
        tier.end_session("s")
        tier.close()


def test_second_writer_is_refused_until_the_first_releases(remote_server):
    ns = f"w{uuid.uuid4().hex[:8]}"
    a = RemoteTier(RemoteConfig.from_value(remote_server.remote_config(ns, persist=True)), fingerprint="fp")
    b = RemoteTier(RemoteConfig.from_value(remote_server.remote_config(ns, persist=True)), fingerprint="fp")
    try:
        a.acquire_writer("s")
        with pytest.raises(RemoteWriterError, match="two writers of one session are refused"):
            b.acquire_writer("s")
        assert not b.write_chunk("s", 0, _payload(torch.float32, 0), poses=POSES)  # write-through: refused, counted
        assert b.stats()["writes_refused"] == 1
        a.close()  # releases
        b.acquire_writer("s")
    finally:
        b.backend.remove_prefix(f"{ns}/")
        a.close()
        b.close()


def test_session_end_removes_its_objects_unless_persist(remote_server):
    tier, keep = _tier(remote_server), _tier(remote_server, persist=True)
    try:
        for t in (tier, keep):
            assert t.write_chunk("s", 0, _payload(torch.float32, 0), poses=POSES)
        assert tier.end_session("s") >= 2 and tier.committed("s") == []
        keep.end_session("s")
        assert [r.chunk for r in keep.committed("s")] == [0]
    finally:
        keep.backend.remove_prefix(keep.session_prefix("s"))
        tier.close()
        keep.close()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"remote.backend='s3'"):
        WorldKVConfig(remote={"backend": "s3", "address": "h:1"})
    with pytest.raises(ValueError, match=r"remote.address='nohost'"):
        WorldKVConfig(remote={"backend": "mooncake", "address": "nohost"})
    with pytest.raises(ValueError, match=r"remote is missing \['address'\]"):
        WorldKVConfig(remote={"backend": "redis"})
    with pytest.raises(ValueError, match=r"unknown WorldKVConfig.remote key"):
        WorldKVConfig(remote={"backend": "redis", "address": "h:1", "bucket": "x"})
    with pytest.raises(ValueError, match=r"remote.persist='yes' has the wrong type"):
        WorldKVConfig(remote={"backend": "redis", "address": "h:1", "persist": "yes"})


def test_unreachable_server_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(RemoteError, match=f"cannot reach Redis/Valkey at 127.0.0.1:{port}"):
        make_backend(RemoteConfig(backend="redis", address=f"127.0.0.1:{port}", timeout_s=1.0))


def test_master_killed_writes_and_reads_fail_over_bounded(private_mooncake):
    """Mooncake's master gone mid-run: puts fail at once, listings come back empty (misses), within
    the client's RPC timeouts; nothing hangs."""
    import time

    tier = _tier(private_mooncake, persist=True)
    try:
        assert tier.write_chunk("s", 0, _payload(torch.float32, 0), poses=POSES)
        private_mooncake.master.stop(kill=True)
        t0 = time.monotonic()
        assert not tier.write_chunk("s", 1, _payload(torch.float32, 1), poses=POSES)
        assert tier.committed("s") == []
        tier.end_session("s")
        assert time.monotonic() - t0 < 60
        assert tier.stats()["put_failures"] == 1 and tier.stats()["commits"] == 1
    finally:
        tier.close()
