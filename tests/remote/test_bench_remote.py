"""`worldkv bench remote` through the real CLI against servers it starts itself: the JSON has the
issue's schema and same-run figures for both paths (checked for shape, not speed)."""
import json

import pytest

from worldkv_connector.cli import main

FAST = ["--object-mb", "0.25", "1", "--objects", "2", "--repeats", "2", "--warmup", "0"]


@pytest.mark.parametrize("backend", ["mooncake", "redis"])
def test_bench_remote_json_schema(tmp_path, capsys, backend):
    path = tmp_path / "remote.json"
    assert main(["bench", "remote", "--backend", backend, *FAST, "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["backend"] == backend and out["object_bytes"] == 1 << 18
    for side in ("tier_gbps", "raw_gbps"):
        assert set(out[side]) == {"put", "get"} and all(v > 0 for v in out[side].values())
    assert [r["object_bytes"] for r in out["rows"]] == [1 << 18, 1 << 20]
    assert all(t["met"] is None for t in out["targets"])  # objects under 4 MiB are not a target
    assert "tier/raw" in capsys.readouterr().out


def test_bench_remote_bad_flags_are_one_line_errors(capsys):
    assert main(["bench", "remote", "--backend", "redis", "--objects", "0"]) == 2
    assert "--objects=0 is out of range" in capsys.readouterr().err
    assert main(["bench", "remote", "--backend", "redis", "--metadata-server", "http://h:1/m"]) == 2
    assert "--metadata-server needs --address" in capsys.readouterr().err
