"""Head-sharded ranks under torch.distributed (gloo, 2 and 4 real processes vs one plain rank): compression
statistics all-reduced so every rank keeps the same tokens as one unsharded rank (keep_ratio 1.0 and
0.25), the plan digest check fails loudly on divergence, and a shard missing on one rank drops the
chunk on every rank (against a real redis-server); the sharded video backend gives one rank's
latents."""
import json
import os
import subprocess
import sys
import uuid

import pytest
import torch

from worldkv_connector.remote.servers import free_port

def check_rank_records(records):
    """Compression keeps the unsharded tokens on every rank; a divergent plan fails on every rank;
    a shard lost on the last rank drops the chunk on every rank (rank 0's own read was fine)."""
    for rec in records:
        for ratio, kept in (("1.0", 48), ("0.25", 24)):
            got = rec[f"keep{ratio}"]
            assert got["kept"] == kept
            assert got["same_on_all_ranks"] and got["equal_unsharded"] and got["kv_equal_unsharded"], (ratio, got)
        assert "differs from rank 0's" in rec["divergence"]
        assert rec["committed"] == [True, True, True]
        assert rec["mask"] == [True, False, True]  # dropped on every rank, whichever rank lost it
        assert rec["bit_exact"]
    assert records[0]["own_read"] == [True, True, True]  # rank 0 read its shard fine: the minimum dropped it
    assert records[-1]["own_read"] == [True, False, True] and records[-1]["misses"] == 2  # reported by both reads


ENGINE_WORKER = os.path.join(os.path.dirname(__file__), "engine_worker.py")


def run_engine_ranks(out, size, remote=None):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    arg = json.dumps(remote or {})
    procs = [subprocess.Popen([sys.executable, ENGINE_WORKER, str(r), str(size), str(port), str(out), arg], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(max(size, 1))]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank")
    run_engine_ranks(out, 0)  # the plain engine: all heads in one process
    return out


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_engine_gives_the_latents_of_one_rank(one_rank, tmp_path, redis_server, size):
    """fp32, keep_ratio 1.0 and 0.25: the same retrieval and the same latents on every rank as one
    rank; and the rank checks in the same processes (check_rank_records)."""
    from safetensors.torch import load_file

    run_engine_ranks(tmp_path, size, redis_server.remote_config(f"r{uuid.uuid4().hex[:8]}"))
    check_rank_records([json.loads((tmp_path / f"checks{size}_{r}.json").read_text()) for r in range(size)])
    ref = json.loads((one_rank / "rec0_0.json").read_text())
    assert any(ref["0.25"]["retrieved"]) and ref["0.25"]["kept"] < ref["1.0"]["kept"]  # retrieval and compression ran
    for keep in ("1.0", "0.25"):
        want = load_file(one_rank / f"lat0_0_{keep}.safetensors")["latents"]
        for r in range(size):
            rec = json.loads((tmp_path / f"rec{size}_{r}.json").read_text())
            assert rec[keep] == ref[keep]
            rem = rec["remote"]  # each rank wrote its shards, rank 0 committed, a new engine resumed them
            assert rem["commits"] == (5 if r == 0 else 0) and rem["resumed"] == rem["written"] == list(range(5))
            assert rem["bit_exact"] and rem["base"] == 5
            assert rem["retrieved"][0] and max(rem["retrieved"][0]) < 5  # the first resumed chunk retrieves written ones
            got = load_file(tmp_path / f"lat{size}_{r}_{keep}.safetensors")["latents"]
            assert torch.allclose(got, want, rtol=0, atol=1e-5), (keep, r, (got - want).abs().max().item())
