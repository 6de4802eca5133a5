"""Save, kill, load: a bank saved mid-rollout by a process that is then killed loads into a new
process bit-identically, is re-indexed by pose, and the session with the saved id resumes it
(chunk ids continue); a corrupted byte or another model's shape is refused with the bank unchanged."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.bank.persist import MANIFEST, read_manifest

PS = 20
TRAJ = "R_L_R_L60"
SAVE_AT, RESUME = 9, 8  # chunks before the save; chunks of the resumed session

COMMON = textwrap.dedent(f"""
    import json, os, signal, sys
    import torch
    from safetensors.torch import save_file
    from worldkv_connector.integration.video import VideoEngine
    from worldkv_connector.retrieval.trajectory import trajectory_poses

    torch.set_num_threads(1)
    out = sys.argv[1]

    def make():
        cfg = dict(keep_ratio=0.5, retrieval_chunks=3, hot_chunks=3, bank_bytes=1 << 22)
        return VideoEngine(model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6, page_size={PS},
                           kv_cache_memory=0.004, num_denoising_steps=1, kv_connector="worldkv",
                           kv_connector_config=json.dumps(cfg))
""")

# rolls out, saves mid-rollout, records what it saved, keeps generating and is killed (no close)
WRITER = COMMON + textwrap.dedent(f"""
    engine = make()
    engine.add_session("a", trajectory="{TRAJ}", num_chunks=40, seed=7)
    for _ in range({SAVE_AT}):
        engine.step()
    bank = engine.connector.worker.bank
    engine.connector.save_bank(os.path.join(out, "bank"), session_id="a")
    save_file({{f"{{k[1]}}": bank.view(k).clone() for k in bank.keys()}}, os.path.join(out, "saved.safetensors"))
    engine.step()
    engine.step()
    os.kill(os.getpid(), signal.SIGKILL)
""")

# a new process: load, resume session "a" where the camera was, record what was retrieved and
# the K/V that reached the pages of the retrieved saved chunks
READER = COMMON + textwrap.dedent(f"""
    engine = make()
    conn = engine.connector
    conn.retain_finished_sessions = True
    keys = conn.load_bank(os.path.join(out, "bank"))
    frames = trajectory_poses("{TRAJ}")[{SAVE_AT} * 3:]  # latent frames, as the writer's trajectory
    engine.add_session("a", poses=frames, num_chunks={RESUME}, seed=8)
    engine.add_session("z", poses=frames, num_chunks={RESUME}, seed=8)  # another id: a new world
    base = conn.scheduler.chunk_base("a")
    kv = engine.runner.kv_caches
    tensors, record = {{}}, {{"loaded": [k[1] for k in keys], "base": base, "steps": []}}
    while engine.has_unfinished_sessions():
        results = {{r.session_id: r.retrieved for r in engine.step()}}
        record["steps"].append(results)
        for cid, pages in conn.scheduler.resident_chunks("a").items():
            if cid >= base or f"pages.{{cid}}" in tensors:
                continue
            n = conn.worker.bank.get(("a", cid)).num_tokens
            # pages in window order, the last one partial: [L, 2, n, H, D] as the bank holds it
            layers = [kv[name][:, list(pages)].flatten(1, 2)[:, :n] for name in conn.worker.layer_names]
            tensors[f"pages.{{cid}}"] = torch.stack(layers).contiguous()
            tensors[f"bank.{{cid}}"] = conn.worker.bank.view(("a", cid)).contiguous()
    engine.drain()
    record["bank_keys"] = sorted(list(k) for k in conn.worker.bank.keys())
    save_file(tensors, os.path.join(out, "resumed.safetensors"))
    with open(os.path.join(out, "record.json"), "w") as fh:
        json.dump(record, fh)
    engine.close()
""")


def run_script(tmp_path, name, text):
    script = tmp_path / f"{name}.py"
    script.write_text(text)
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)


def make_engine(model="tiny"):
    cfg = dict(keep_ratio=0.5, retrieval_chunks=3, hot_chunks=3, bank_bytes=1 << 22)
    return VideoEngine(model=model, attention_window="sliding", sink_frames=3, recent_frames=6, page_size=PS,
                       kv_cache_memory=0.004, num_denoising_steps=1, kv_connector="worldkv",
                       kv_connector_config=json.dumps(cfg))


def test_saved_mid_rollout_killed_and_resumed_in_a_new_process_is_bit_identical(tmp_path):
    w = run_script(tmp_path, "writer", WRITER)
    assert w.returncode == -signal.SIGKILL, w.stderr[-2000:]  # killed, not closed
    saved = load_file(tmp_path / "saved.safetensors")
    assert sorted(int(k) for k in saved) == list(range(SAVE_AT))  # every chunk committed before the save
    assert read_manifest(tmp_path / "bank")["session_id"] == "a"

    r = run_script(tmp_path, "reader", READER)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    resumed = load_file(tmp_path / "resumed.safetensors")
    assert record["loaded"] == list(range(SAVE_AT)) and record["base"] == SAVE_AT
    # the first resumed chunk has only the saved world to retrieve from: re-indexed by pose
    assert len(record["steps"][0]["a"]) == 3 and max(record["steps"][0]["a"]) < SAVE_AT
    retrieved_saved = {cid for step in record["steps"] for cid in step["a"] if cid < SAVE_AT}
    assert len(retrieved_saved) >= 3
    assert {k.split(".")[1] for k in resumed} == {str(c) for c in retrieved_saved}
    for cid in retrieved_saved:  # bank and the pages attention read: bit-identical to what was saved
        assert torch.equal(resumed[f"bank.{cid}"], saved[str(cid)])
        assert torch.equal(resumed[f"pages.{cid}"], saved[str(cid)])
    for t, step in enumerate(record["steps"]):  # another session id never sees the saved world
        assert all(cid < t for cid in step["z"]), f"session z retrieved {step['z']} at its chunk {t}"
    # chunk ids continue after the saved ones: the resumed chunk c is banked as SAVE_AT + c
    keys = {tuple(k) for k in record["bank_keys"]}
    assert {("a", SAVE_AT + c) for c in range(RESUME)} <= keys
    assert {("a", c) for c in range(SAVE_AT)} <= keys and {("z", c) for c in range(RESUME)} <= keys


@pytest.fixture
def saved_bank(tmp_path):
    with make_engine() as engine:
        engine.add_session("a", trajectory=TRAJ, num_chunks=10, seed=0)
        for _ in range(6):
            engine.step()
        manifest = engine.connector.save_bank(tmp_path / "bank", session_id="a")
    assert len(manifest["entries"]) == 6
    return tmp_path / "bank", manifest


def assert_untouched(engine):
    conn = engine.connector
    assert len(conn.worker.bank) == 0 and conn.worker.bank.bytes_used == 0
    assert len(conn.scheduler.index) == 0 and conn.scheduler.sessions() == []


def test_corrupted_byte_is_refused_and_the_bank_stays_usable(saved_bank):
    path, manifest = saved_bank
    data = path / manifest["data_file"]
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0x10  # one bit of the last entry's payload
    data.write_bytes(bytes(raw))
    with make_engine() as engine:
        with pytest.raises(ValueError, match="sha256 mismatch: the saved data is corrupted"):
            engine.connector.load_bank(path)
        assert_untouched(engine)
        raw[-100] ^= 0x10  # repaired: the same engine loads it and runs on
        data.write_bytes(bytes(raw))
        assert len(engine.connector.load_bank(path)) == 6
        engine.add_session("a", trajectory=TRAJ, num_chunks=2, seed=0)
        (r,) = engine.step()
        assert r.retrieved and max(r.retrieved) < 6  # retrieved from the loaded world


def test_other_model_shape_or_config_is_refused_naming_the_mismatch(saved_bank):
    path, _ = saved_bank
    with make_engine("small") as engine:
        with pytest.raises(ValueError, match=r"kv_shape.num_layers: saved 2, expected 4: the bank was saved for "
                                             r"another model \('tiny'\)"):
            engine.connector.load_bank(path)
        assert_untouched(engine)
    manifest = read_manifest(path)
    manifest["entries"][0]["pose"] = None  # an entry without a pose cannot be re-indexed
    (path / MANIFEST).write_text(json.dumps(manifest))
    with make_engine() as engine:
        with pytest.raises(ValueError, match=r"entry 'e0' \(key \('a', 0\)\): no camera pose"):
            engine.connector.load_bank(path)
        assert_untouched(engine)


def test_load_after_the_session_started_is_refused(saved_bank):
    path, _ = saved_bank
    with make_engine() as engine:
        engine.add_session("a", trajectory=TRAJ, num_chunks=3, seed=0)
        engine.step()
        with pytest.raises(ValueError, match="session 'a' already ran"):
            engine.connector.load_bank(path)
        assert len(engine.connector.worker.bank) == 1 and engine.connector.scheduler.chunk_base("a") == 0
        with pytest.raises(FileNotFoundError, match="no saved bank here"):
            engine.connector.load_bank(path.parent / "nothing")
