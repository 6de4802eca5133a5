"""The rank checks of the gloo tests, run inside every rank of engine_worker.py: compression keeps
the same tokens on every rank as one unsharded rank, a divergent plan fails loudly, and a shard
missing on the last rank drops the chunk on every rank (remote tier on a real redis-server)."""
import torch

from worldkv_connector.compression import compress_chunk
from worldkv_connector.ranks import PlanDivergenceError, ShardedRemote, sharded_compress_chunk


def checks(group, remote):
    rank, size = group.rank, group.size
    L, FT, F, H, D = 2, 16, 3, 4, 8
    record = {"rank": rank}

    # compression: every rank keeps the same tokens, equal to the unsharded choice
    g = torch.Generator().manual_seed(0)
    k = torch.randn(L, F * FT, H, D, generator=g)  # the full heads, the same on every rank
    v = torch.randn(L, F * FT, H, D, generator=g)
    heads = group.head_shard(H)
    for ratio in (1.0, 0.25):
        cc = sharded_compress_chunk(k[:, :, heads], v[:, :, heads], frame_tokens=FT, keep_ratio=ratio, pooled=True,
                                    group=group)
        ref = compress_chunk(k, v, frame_tokens=FT, keep_ratio=ratio, pooled=True)
        ids = group.gather(cc.indices.tolist())
        full_k = torch.cat([torch.tensor(x) for x in group.gather(cc.k.tolist())], dim=2)  # heads back together
        record[f"keep{ratio}"] = {
            "same_on_all_ranks": all(x == ids[0] for x in ids),
            "equal_unsharded": cc.indices.tolist() == ref.indices.tolist(),
            "kv_equal_unsharded": bool(torch.equal(full_k, ref.k)),
            "kept": cc.indices.shape[1],
        }

    # plan digest: the same plan passes; rank-dependent plans fail loudly on every rank
    group.check_plan(0, {"loads": [("s", 1), ("s", 4)], "stores": [("s", 7)]})
    try:
        group.check_plan(1, {"loads": [("s", 1 + (rank == size - 1))]})
        record["divergence"] = None
    except PlanDivergenceError as exc:
        record["divergence"] = str(exc)

    # remote tier per rank: a shard missing on the last rank drops the chunk on every rank
    if remote is not None:
        from worldkv_connector.remote import RemoteConfig, RemoteTier

        tier = RemoteTier(RemoteConfig.from_value(remote), fingerprint="ranks", rank=rank, num_ranks=size)
        sharded = ShardedRemote(tier, group)
        shards = {c: torch.randn(L, 2, FT, H // size, D, generator=torch.Generator().manual_seed(10 * c + rank))
                  for c in range(3)}
        poses = torch.eye(4).expand(3, 4, 4).numpy()
        record["committed"] = [sharded.write_chunk("s", c, shards[c], poses=poses) for c in range(3)]
        if rank == size - 1:
            tier.backend.remove([tier.shard_key("s", 1)])  # this rank's shard of chunk 1 is lost
        group.all_min([True])  # barrier: the removal happened before anyone reads
        recs = sharded.committed("s")
        outs = [torch.empty_like(shards[r.chunk]) for r in recs]
        record["own_read"] = tier.get_shards(recs, outs)
        record["mask"] = sharded.read_chunks(recs, outs)
        record["bit_exact"] = all(torch.equal(o, shards[r.chunk]) for r, o, m in zip(recs, outs, record["mask"]) if m)
        record["misses"] = tier.stats()["misses"]
        group.all_min([True])
        if rank == 0:
            tier.end_session("s")
        tier.close()

    return record
