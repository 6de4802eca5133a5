"""`worldkv generate` and `worldkv bench e2e` through worldkv_connector.cli.main."""
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from worldkv_connector.cli import main
from worldkv_connector.connector.api import ExternalChunk, VideoKVConnector, register_connector


@register_connector("keep-evicted-test")
class KeepEvictedConnector(VideoKVConnector):
    """Keeps evicted chunks resident and puts the oldest back with ``needs_load=False`` (no copies)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.kept = {}  # (session, chunk) -> pages, in eviction order

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        for (sid, cid), pages in self.kept.items():
            if sid == request.session_id:
                request.external.append(ExternalChunk(cid, self.engine_config.chunk_tokens, list(pages), False))
                break
        return 0, False

    def build_connector_meta(self, scheduler_output):
        for ch in scheduler_output.evicted:
            self.kept[(ch.session_id, ch.chunk_id)] = ch.page_ids

    def request_finished(self, session_id, block_ids):
        self.done = [k for k in self.kept if k[0] == session_id]
        return False, None

    def take_pages_to_free(self):
        out = [p for k in getattr(self, "done", []) for p in self.kept.pop(k)]
        self.done = []
        return out

    def metrics(self):
        return {"bank_bytes": 0, "kept_chunks": len(self.kept)}


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_writes_json_plot_and_latents(tmp_path, capsys):
    js, png, st = tmp_path / "run.json", tmp_path / "run.png", tmp_path / "lat.safetensors"
    rc, out, err = run_cli(
        capsys, "generate", "--model", "tiny", "--trajectory", "R_L_R_L_R_L90", "--num-chunks", "5",
        "--sessions", "2", "--num-denoising-steps", "1", "--kv-cache-memory", "0.01",
        "--json", str(js), "--plot", str(png), "--output", str(st),
    )
    assert rc == 0, err
    assert "chunks/s (last quarter)" in out and "resident KV, peak" in out and "pages, peak / total" in out
    assert "generate: 100%" in err  # the progress bar goes to stderr
    data = json.loads(js.read_text())
    recs = data["records"]
    assert len(recs) == 10 and {r["session"] for r in recs} == {"s0", "s1"}
    r = recs[0]
    assert {"index", "step_seconds", "resident_kv_bytes", "pose", "retrieved"} <= set(r)
    assert np.asarray(r["pose"]).shape == (4, 4) and r["retrieved"] == [] and r["step_seconds"] > 0
    assert data["summary"]["chunks"] == 10 and data["summary"]["peak_pages"] == 8  # 2 x (sink 1 + recent 2 + 1)
    assert png.stat().st_size > 1000
    lat = load_file(str(st))
    assert set(lat) == {"s0", "s1"} and tuple(lat["s0"].shape) == (5, 3, 16, 8, 8)


def test_generate_with_a_connector_records_retrieved_chunks(tmp_path, capsys):
    js = tmp_path / "run.json"
    rc, out, err = run_cli(
        capsys, "generate", "--model", "tiny", "--num-chunks", "6", "--num-denoising-steps", "1",
        "--kv-cache-memory", "0.01", "--kv-connector", "keep-evicted-test", "--no-progress", "--json", str(js),
    )
    assert rc == 0, err
    assert "bank" in out and "connector kept_chunks" in out
    recs = json.loads(js.read_text())["records"]
    # chunk 1 leaves the window when chunk 3 commits (announced in that step's scheduler output)
    assert [r["retrieved"] for r in recs] == [[], [], [], [], [1], [1]]


def test_generate_from_a_poses_file(tmp_path, capsys):
    poses = np.repeat(np.eye(4)[None], 7, axis=0)
    poses[:, 2, 3] = np.linspace(0, 1, 7)
    path = tmp_path / "poses.npy"
    np.save(path, poses)
    js = tmp_path / "r.json"
    rc, _, err = run_cli(capsys, "generate", "--poses", str(path), "--num-denoising-steps", "1",
                         "--kv-cache-memory", "0.01", "--no-progress", "--json", str(js))
    assert rc == 0, err
    recs = json.loads(js.read_text())["records"]
    assert len(recs) == 3  # 7 frames -> 3 chunks, the last holding the final pose
    assert recs[2]["pose"][2][3] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nope"], "unknown model config 'nope'"),
        (["--trajectory", "R_Q90"], "unknown op 'Q'"),
        (["--kv-connector", "nope"], "unknown --kv-connector 'nope'"),
        (["--attention-window", "full", "--kv-cache-memory", "0.0002", "--num-chunks", "24"], "raise --kv-cache-memory"),
        (["--kv-cache-memory", "0.000001"], "raise --kv-cache-memory"),
        (["--sink-frames", "4"], "multiple of the chunk size"),
        (["--poses", "missing.npy"], "no such file"),
        (["--sessions", "0"], "--sessions 0"),
    ],
)
def test_bad_inputs_exit_nonzero_with_one_line(capsys, argv, message):
    rc, out, err = run_cli(capsys, "generate", "--no-progress", "--num-chunks", "2", *argv)
    assert rc == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("worldkv generate: error:")]
    assert len(errors) == 1 and message in errors[0]


def test_poses_of_the_wrong_shape(tmp_path, capsys):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((5, 3, 3)))
    rc, _, err = run_cli(capsys, "generate", "--poses", str(path), "--no-progress")
    assert rc == 2 and "Traceback" not in err and "shape [F, 4, 4]" in err


def test_bench_e2e_reports_windows_per_mode(tmp_path, capsys):
    js = tmp_path / "e2e.json"
    rc, out, err = run_cli(capsys, "bench", "e2e", "--preset", "tiny", "--num-chunks", "6", "--window", "3",
                           "--num-denoising-steps", "1", "--kv-cache-memory", "0.01", "--json", str(js))
    assert rc == 0, err
    assert "full ch/s" in out and "sliding ch/s" in out and "1 denoising steps" in out
    data = json.loads(js.read_text())
    full, sliding = data["runs"]["full"], data["runs"]["sliding"]
    assert len(full["step_seconds"]) == 6 and len(data["window_chunks_per_s"]["full"]) == 2
    page = full["metrics"]["page_bytes"]
    assert full["resident_kv_bytes"] == [page * (i + 1) for i in range(6)]
    assert sliding["resident_kv_bytes"][3:] == [page * 4] * 3
    rc, _, err = run_cli(capsys, "bench", "e2e", "--modes", "full,warp")
    assert rc == 2 and "unknown ['warp']" in err
