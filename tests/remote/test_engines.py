"""Worlds across engines through the remote tier, against real servers: a writer engine exits and a
new process resumes its session (bit-identical chunks, ids continue, retrieval finds them); a
second writer of one session is refused; a fresh session joins another engine's world; a server
killed mid-run turns remote reads and writes into misses and the run completes."""
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
from safetensors.torch import load_file

from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.retrieval.trajectory import parse_trajectory
from worldkv_connector.remote import RemoteWriterError

PS = 20
TRAJ = "R_L_R_L60"
WRITE, RESUME = 9, 6  # chunks of the writer; chunks of the resumed session


def _config(remote: dict) -> str:
    return json.dumps(dict(keep_ratio=0.5, retrieval_chunks=3, hot_chunks=3, bank_bytes=1 << 22, remote=remote))


def make_engine(remote: dict) -> VideoEngine:
    return VideoEngine(model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6, page_size=PS,
                       kv_cache_memory=0.004, num_denoising_steps=1, kv_connector="worldkv",
                       kv_connector_config=_config(remote))


COMMON = textwrap.dedent(f"""
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from worldkv_connector.integration.video import VideoEngine
    from worldkv_connector.retrieval.trajectory import parse_trajectory

    torch.set_num_threads(1)
    out, remote = sys.argv[1], json.loads(sys.argv[2])
    cfg = dict(keep_ratio=0.5, retrieval_chunks=3, hot_chunks=3, bank_bytes=1 << 22, remote=remote)
    engine = VideoEngine(model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6, page_size={PS},
                         kv_cache_memory=0.004, num_denoising_steps=1, kv_connector="worldkv",
                         kv_connector_config=json.dumps(cfg))
    conn = engine.connector
    conn.retain_finished_sessions = True
""")

# writes session "a" through to the remote tier, records what it banked, and exits
WRITER = COMMON + textwrap.dedent(f"""
    engine.add_session("a", trajectory="{TRAJ}", num_chunks={WRITE}, seed=7)
    engine.run()
    engine.drain()
    bank = conn.worker.bank
    save_file({{str(k[1]): bank.view(k).clone() for k in bank.keys()}}, os.path.join(out, "written.safetensors"))
    json.dump(bank.remote.stats(), open(os.path.join(out, "writer.json"), "w"))
    engine.close()
""")

# a new process resumes "a" from the remote tier where the camera was and records what it retrieved
READER = COMMON + textwrap.dedent(f"""
    keys = conn.resume_remote("a")
    bank = conn.worker.bank
    loaded = {{str(k[1]): bank.view(k).clone() for k in keys}}
    engine.add_session("a", poses=parse_trajectory("{TRAJ}")[{WRITE} * 3:], num_chunks={RESUME}, seed=8)
    steps = [{{r.session_id: r.retrieved for r in engine.step()}} for _ in range({RESUME})]
    engine.drain()
    save_file(loaded, os.path.join(out, "loaded.safetensors"))
    record = {{"loaded": sorted(int(k[1]) for k in keys), "base": conn.scheduler.chunk_base("a"), "steps": steps,
              "remote": bank.remote.stats()}}
    json.dump(record, open(os.path.join(out, "reader.json"), "w"))
    engine.close()
""")


def run_script(tmp_path, name, text, remote):
    script = tmp_path / f"{name}.py"
    script.write_text(text)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), str(tmp_path), json.dumps(remote)], env=env,
                          capture_output=True, text=True, timeout=240)


def _ns():
    return f"e{uuid.uuid4().hex[:8]}"


def test_writer_exits_and_another_process_resumes(remote_server, tmp_path):
    remote = remote_server.remote_config(_ns(), persist=True)
    w = run_script(tmp_path, "writer", WRITER, remote)
    assert w.returncode == 0, w.stderr[-3000:]
    written = load_file(tmp_path / "written.safetensors")
    assert json.loads((tmp_path / "writer.json").read_text())["commits"] == WRITE

    r = run_script(tmp_path, "reader", READER, remote)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "reader.json").read_text())
    loaded = load_file(tmp_path / "loaded.safetensors")
    assert rec["loaded"] == list(range(WRITE)) and rec["base"] == WRITE  # ids continue
    for cid, t in loaded.items():  # the other engine's chunks, bit-identical
        assert torch.equal(t, written[cid])
    assert rec["remote"]["misses"] == 0
    # the first resumed chunk has only the other engine's world to retrieve from
    assert len(rec["steps"][0]["a"]) == 3 and max(rec["steps"][0]["a"]) < WRITE
    # the resumed chunks were written through too (the reader is the session's writer now)
    assert rec["remote"]["commits"] == RESUME


def test_second_writer_refused_and_a_fresh_session_joins_the_world(redis_server):
    remote = redis_server.remote_config(_ns(), persist=True)
    poses = parse_trajectory(TRAJ)
    with make_engine(remote) as a, make_engine(remote) as b:
        a.add_session("world", poses=poses, num_chunks=12, seed=1)
        for _ in range(6):
            a.step()
        with pytest.raises(RemoteWriterError, match="being written by another engine"):
            b.connector.resume_remote("world")
        # joining: B's fresh session retrieves A's committed chunks while A keeps writing
        keys = b.connector.resume_remote("visitor", source="world")
        assert keys and {k[0] for k in keys} == {"visitor"}
        joined = {k[1] for k in keys}
        b.add_session("visitor", poses=poses[9:], num_chunks=3, seed=2)
        first = {r.session_id: r.retrieved for r in b.step()}["visitor"]
        assert first and set(first) <= joined
        a.run()
        b.run()
        a.drain()
        b.drain()
        assert a.connector.worker.bank.remote.stats()["writes_refused"] == 0
        assert b.connector.worker.bank.remote.stats()["commits"] == 3  # its own chunks, under its own id
        b.connector.worker.bank.remote.backend.remove_prefix(f"{remote['namespace']}/")


def test_server_killed_mid_run_gives_misses_and_the_run_completes(private_redis):
    remote = private_redis.remote_config(_ns(), persist=True)
    with make_engine(remote) as a, make_engine(remote) as b:
        a.add_session("a", trajectory=TRAJ, num_chunks=10, seed=3)
        for _ in range(4):
            a.step()
        private_redis.kill()
        a.run()  # its writes fail: the chunks stay banked in this engine only
        a.drain()
        st = a.connector.worker.bank.remote.stats()
        assert st["commits"] == 4 and st["put_failures"] > 0 and len(a.results("a")) == 10
        assert b.connector.resume_remote("a", source=None) == []  # nothing readable: misses, no error
        b.add_session("a", trajectory=TRAJ, num_chunks=3, seed=3)
        b.run()
        b.drain()
        assert len(b.results("a")) == 3


def test_store_server_killed_resume_fails_over_to_misses(private_mooncake):
    remote = private_mooncake.remote_config(_ns(), persist=True)
    with make_engine(remote) as engine:
        engine.add_session("a", trajectory=TRAJ, num_chunks=6, seed=4)
        engine.run()
        engine.drain()
    with make_engine(remote) as engine:
        private_mooncake.kill_stores()  # the data is gone; the master still answers
        keys = engine.connector.resume_remote("a")
        engine.add_session("a", trajectory=TRAJ, num_chunks=4, seed=5)
        engine.run()
        engine.drain()
        assert keys == [] and len(engine.results("a")) == 4


def test_resume_without_a_remote_tier_is_a_clear_error():
    cfg = json.dumps(dict(keep_ratio=0.5, retrieval_chunks=3, hot_chunks=3, bank_bytes=1 << 22))
    with VideoEngine(model="tiny", attention_window="sliding", page_size=PS, kv_cache_memory=0.004,
                     num_denoising_steps=1, kv_connector="worldkv", kv_connector_config=cfg) as engine:
        with pytest.raises(ValueError, match="has no 'remote' tier"):
            engine.connector.resume_remote("a")
