"""The test servers start on 127.0.0.1, answer a raw client, and stop."""
import redis
import torch
from mooncake.store import MooncakeDistributedStore


def test_redis_server_answers_and_stops(private_redis):
    client = redis.Redis.from_url(f"redis://{private_redis.address}/0", socket_timeout=5)
    assert client.set("k", b"v") and client.get("k") == b"v"
    client.close()
    private_redis.stop()
    assert not private_redis.proc.alive


def test_mooncake_cluster_answers_and_stops(private_mooncake):
    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", private_mooncake.metadata_server, 0, 16 << 20, "tcp", "", private_mooncake.address)
    assert rc == 0
    data = torch.arange(1 << 16, dtype=torch.uint8)
    out = torch.zeros_like(data)
    assert store.register_buffer(data.data_ptr(), data.numel()) == 0
    assert store.register_buffer(out.data_ptr(), out.numel()) == 0
    assert store.batch_put_from(["k"], [data.data_ptr()], [data.numel()]) == [0]
    assert store.batch_get_into(["k"], [out.data_ptr()], [out.numel()]) == [data.numel()]
    assert torch.equal(out, data)
    store.close()
    private_mooncake.stop()
    assert not private_mooncake.master.alive and not any(s.alive for s in private_mooncake.stores)
