"""`worldkv demo` through worldkv_connector.cli.main on a short revisit trajectory."""
import json

from worldkv_connector.cli import main


def test_demo_prints_both_tables_and_writes_the_plot_and_json(tmp_path, capsys):
    png, js = tmp_path / "out" / "demo.png", tmp_path / "demo.json"
    # R_L_R_L90 in video frames (the reference's convention): 19 chunks of 24 degrees; chunks 14-18
    # return to the yaws of earlier chunks outside the recent window
    rc = main(["demo", "--model", "tiny", "--trajectory", "R_L_R_L90", "--num-chunks", "19", "--num-denoising-steps", "1",
               "--no-progress", "--plot", str(png), "--json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "worldkv run, per chunk" in out and "retrieved" in out
    assert "verdict: yes - every revisit (5 chunks) retrieved at least one of its first-visit chunks" in out
    assert "comparison" in out and "recall@revisit" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["full"], ["sliding"], ["worldkv"])}
    assert set(rows) == {"full", "sliding", "worldkv"}
    assert rows["full"][5] == "1.000"  # full attention holds everything
    assert png.stat().st_size > 1000  # the folder was created
    data = json.loads(js.read_text())
    assert set(data["modes"]) == {"full", "sliding", "worldkv"}
    assert data["verdict"]["revisit_chunks"] == [14, 15, 16, 17, 18] and data["verdict"]["all_retrieved"]
    wkv = data["modes"]["worldkv"]
    assert len(wkv["records"]) == 19 and wkv["records"][14]["retrieved"]
    assert {"yaw_degrees", "bank_bytes", "compression_ratio", "attention_recall"} <= set(wkv["records"][5])
    assert wkv["records"][-1]["bank_bytes"] >= wkv["records"][-2]["bank_bytes"] > 0  # not the freed bank
    assert wkv["records"][5]["compression_ratio"] == 2.0  # default keep_ratio 0.25 stores half a chunk
    s = {m: data["modes"][m]["summary"] for m in data["modes"]}
    assert s["full"]["attention_recall_mean"] == 1.0
    assert s["sliding"]["attention_recall_revisit_mean"] < s["worldkv"]["attention_recall_revisit_mean"] < 1.0
    assert s["worldkv"]["bank_peak_bytes"] > 0 and s["sliding"]["bank_peak_bytes"] is None
    assert s["full"]["peak_resident_kv_bytes"] > s["worldkv"]["peak_resident_kv_bytes"] > s["sliding"]["peak_resident_kv_bytes"]


def test_demo_bad_inputs(tmp_path, capsys):
    for argv, message in ((["--plot", str(tmp_path / "x.jpg")], "expected a .png path"),
                          (["--num-chunks", "0"], "--num-chunks 0"),
                          (["--trajectory", "R_Q90"], "unknown op 'Q'")):
        rc = main(["demo", "--no-progress", *argv])
        _, err = capsys.readouterr()
        assert rc == 2 and message in err and "Traceback" not in err
