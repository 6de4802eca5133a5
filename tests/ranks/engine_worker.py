"""One rank of the gloo tests (run as a script by test_ranks.py): argv = rank, size, port, out dir,
remote config JSON. size 0: the plain one-rank engine. A rank first runs rank_checks.checks, then
for keep_ratio 1.0 and 0.25 rolls out a revisit trajectory and saves the latents and what each
step retrieved."""
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from worldkv_connector.integration.video import VideoEngine

rank, size, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
remote = json.loads(sys.argv[5])
torch.set_num_threads(1)
group = None
if size:
    from worldkv_connector.ranks import RankGroup
    from worldkv_connector.integration.video.ranks import shard_engine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    group = RankGroup()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from rank_checks import checks

    checks_record = checks(group, remote)
    json.dump(checks_record, open(os.path.join(out, f"checks{size}_{rank}.json"), "w"))
record = {}
for keep in (1.0, 0.25):
    cfg = dict(keep_ratio=keep, retrieval_chunks=2, hot_chunks=2, bank_bytes=1 << 24, sink_frames=3, recent_frames=3)
    engine = VideoEngine(model="small", attention_window="sliding", page_size=64, kv_cache_memory=0.004,
                         num_denoising_steps=1, kv_connector="worldkv", kv_connector_config=json.dumps(cfg),
                         dtype="fp32")
    if group is not None:
        shard_engine(engine, group)
    engine.add_session("a", trajectory="R_L24", num_chunks=6, seed=3)
    retrieved = []
    while engine.has_unfinished_sessions():
        retrieved += [r.retrieved for r in engine.step()]
    engine.drain()
    save_file({"latents": torch.stack(engine.results("a")).contiguous()},
              os.path.join(out, f"lat{size}_{rank}_{keep}.safetensors"))
    record[str(keep)] = {"retrieved": retrieved, "kept": engine.connector.worker.stores.kept}
    engine.close()
if size and remote:
    # the remote tier per rank: a writer run, then a resumed run of the same session
    def remote_engine():
        cfg = dict(keep_ratio=0.25, retrieval_chunks=2, hot_chunks=2, bank_bytes=1 << 24, sink_frames=3,
                   recent_frames=3, remote=dict(remote, persist=True))
        e = VideoEngine(model="small", attention_window="sliding", page_size=64, kv_cache_memory=0.004,
                        num_denoising_steps=1, kv_connector="worldkv", kv_connector_config=json.dumps(cfg), dtype="fp32")
        shard_engine(e, group)
        e.connector.retain_finished_sessions = True
        return e

    engine = remote_engine()
    engine.add_session("w", trajectory="R_L24", num_chunks=5, seed=4)
    engine.run()
    engine.drain()
    bank = engine.connector.worker.bank
    written = {k[1]: bank.view(k).clone() for k in bank.keys()}
    commits = bank.remote.stats()["commits"]
    engine.close()
    engine = remote_engine()
    keys = engine.connector.resume_remote("w")
    bank = engine.connector.worker.bank
    record["remote"] = {"commits": commits, "written": sorted(written), "resumed": sorted(k[1] for k in keys),
                        "bit_exact": all(torch.equal(bank.view(k), written[k[1]]) for k in keys),
                        "base": engine.connector.scheduler.chunk_base("w")}
    engine.add_session("w", trajectory="R_L24", num_chunks=2, seed=5)
    record["remote"]["retrieved"] = [r.retrieved for r in engine.step()]
    engine.run()
    engine.drain()
    engine.connector.worker.bank.remote.backend.remove_prefix(engine.connector.worker.bank.remote.session_prefix("w"))
    engine.close()
json.dump(record, open(os.path.join(out, f"rec{size}_{rank}.json"), "w"))
if size:
    dist.destroy_process_group()
