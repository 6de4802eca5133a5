"""`worldkv bench connector` on the tiny and small presets: the JSON schema, the step structure
(one new chunk per step for load_1, six for load_6) and bad flags; figures, not speed."""
import json

import pytest

from worldkv_connector.cli import main


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_connector_bench_writes_the_schema_and_moves_the_planned_chunks(tmp_path, capsys, preset):
    js = tmp_path / "c.json"
    rc = main(["bench", "connector", "--preset", preset, "--device", "cpu", "--steps", "4", "--warmup", "2",
               "--json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "shrunk: copies cost almost nothing" in out and "per-page pairs ms" in out
    data = json.loads(js.read_text())
    assert data["preset"] == preset and data["layers"] == {"tiny": 2, "small": 4}[preset]
    for field in ("host_ms", "baseline_host_ms"):
        assert set(data[field]) == {"load_1", "load_6", "store_1"}
        assert all(v > 0 for v in data[field].values())
    assert data["detail"]["load_1"]["ours"]["chunks_loaded_per_step"] == 1
    assert data["detail"]["load_6"]["ours"]["chunks_loaded_per_step"] == 6
    assert data["detail"]["load_6"]["baseline"]["chunks_loaded_per_step"] == 6


def test_connector_bench_refuses_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "connector", "--preset", "nope"])
    capsys.readouterr()
    assert main(["bench", "connector", "--device", "cpu", "--steps", "0"]) == 2
    assert "--steps=0 is out of range: allowed 1 <= steps <= 100000" in capsys.readouterr().err
