"""worldkv generate --save-bank / --resume-bank: a world continues from a saved bank."""
import json

from worldkv_connector.cli import main
from worldkv_connector.bank.persist import read_manifest

COMMON = ["generate", "--model", "tiny", "--num-denoising-steps", "1", "--no-progress",
          "--kv-connector", "worldkv", "--kv-connector-config", '{"keep_ratio": 0.5}']


def test_save_then_resume_continues_the_world(tmp_path, capsys):
    bank_dir = tmp_path / "bank"
    assert main(COMMON + ["--trajectory", "R90", "--num-chunks", "8", "--save-bank", str(bank_dir)]) == 0
    manifest = read_manifest(bank_dir)
    saved = {tuple(e["key"]) for e in manifest["entries"]}
    assert len(saved) == 8 and {k[0] for k in saved} == {"s0"}

    out = tmp_path / "resumed.json"
    assert main(COMMON + ["--trajectory", "L90", "--num-chunks", "6", "--resume-bank", str(bank_dir),
                          "--json", str(out)]) == 0
    assert "resumed 8 banked chunk(s)" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    retrieved = {c for r in records for c in r["retrieved"]}
    # the resumed session looks back on the saved chunks (ids 0..7) as well as its own (numbered 8+)
    assert retrieved & set(range(8)), retrieved


def test_resume_errors_are_one_line(tmp_path, capsys):
    assert main(COMMON + ["--num-chunks", "2", "--resume-bank", str(tmp_path / "missing")]) == 2
    assert "no such bank directory" in capsys.readouterr().err
    bank_dir = tmp_path / "bank"
    assert main(COMMON + ["--trajectory", "R30", "--num-chunks", "5", "--save-bank", str(bank_dir)]) == 0
    capsys.readouterr()
    # another model shape: refused, naming the mismatch
    other = ["generate", "--model", "small", "--num-denoising-steps", "1", "--no-progress", "--num-chunks", "2",
             "--kv-connector", "worldkv", "--kv-connector-config", '{"keep_ratio": 0.5}',
             "--resume-bank", str(bank_dir)]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "error" in err and ("frame_tokens" in err or "num_layers" in err or "shape" in err), err
    # without a connector there is no bank to save
    assert main(["generate", "--model", "tiny", "--num-chunks", "2", "--no-progress",
                 "--save-bank", str(tmp_path / "x")]) == 2
    assert "--kv-connector worldkv" in capsys.readouterr().err
