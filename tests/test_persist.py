"""Saving and loading a bank: round trips, atomic replacement, verification before insertion, CLI."""
import json
import os

import numpy as np
import pytest
import torch

from worldkv_connector.bank import Bank
from worldkv_connector.cli import main
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.bank.persist import (
    LOCK,
    MANIFEST, decode_key, encode_key, load_bank, read_manifest, save_bank, verify_bank,
)
from worldkv_connector.shapes import KVShape, get_preset

SHAPE = get_preset("tiny")  # 2 layers x 2 heads x 16 dim, fp32, 16 tokens/frame
CONFIG = WorldKVConfig(keep_ratio=0.25, bank_bytes=8 * SHAPE.chunk_bytes(24))
KEPT = CONFIG.kept_tokens(SHAPE.frame_tokens)  # 24


def fresh(shape=SHAPE, config=CONFIG, **kw):
    return Bank.for_shape(shape, config, **kw)


def fill(bank, keys, tokens=KEPT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for i, key in enumerate(keys):
        idx = torch.arange(tokens).expand(bank.num_layers, tokens) + i
        pose = np.eye(4) if i % 2 else np.stack([np.eye(4)] * 3)  # [4, 4] and [F, 4, 4]
        bank.reserve(key, tokens, indices=idx if i % 3 else None, pose=pose, meta={"i": i, "tag": f"c{i}"})
        bank.view(key).copy_(torch.randn(bank.view(key).shape, generator=gen).to(bank.dtype))
        bank.mark_ready(key)


def same_entries(a, b, keys):
    for key in keys:
        ea, eb = a.get(key), b.get(key)
        assert eb is not None and eb.ready and eb.num_tokens == ea.num_tokens and eb.meta == ea.meta
        assert torch.equal(a.read_payload(key), b.read_payload(key))
        assert (ea.indices is None) == (eb.indices is None)
        if ea.indices is not None:
            assert torch.equal(ea.indices, eb.indices)
        assert np.allclose(np.asarray(ea.pose), eb.pose)


def test_keys_round_trip_through_json():
    for key in [("s0", 3), "plain", 7, ("vllm", b"\x00\xffhash"), (("nested", 1), None, 2.5, True)]:
        assert decode_key(json.loads(json.dumps(encode_key(key)))) == key
    with pytest.raises(ValueError, match=r"bank key frozenset\(\{1\}\) of type frozenset cannot be saved"):
        encode_key(frozenset({1}))


def test_round_trip(tmp_path):
    keys = [("s0", 0), ("s0", 1), ("s0", 2), ("vllm", b"\x01\x02"), "loose"]
    src = fresh()
    fill(src, keys)
    src.reserve(("s0", 9), KEPT)  # a store still in flight: not saved
    manifest = save_bank(src, tmp_path / "bank", config=CONFIG, kv_shape=SHAPE, extra={"note": "t"})
    assert sorted(os.listdir(tmp_path / "bank")) == sorted([LOCK, MANIFEST, manifest["data_file"]])
    m = read_manifest(tmp_path / "bank")
    assert m == manifest and m["fingerprint"] == CONFIG.fingerprint() and m["extra"] == {"note": "t"}
    assert m["kv_shape"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "fp32", "frame_tokens": 16}
    assert [decode_key(r["key"]) for r in m["entries"]] == keys
    assert m["total_bytes"] == 5 * SHAPE.chunk_bytes(KEPT) and verify_bank(tmp_path / "bank") == []

    dst = fresh()
    assert load_bank(tmp_path / "bank", dst, config=CONFIG, kv_shape=SHAPE) == keys
    same_entries(src, dst, keys)
    assert dst.bytes_used == 5 * SHAPE.chunk_bytes(KEPT) and ("s0", 9) not in dst


def test_session_filter_bf16_and_spilled_entries(tmp_path):
    shape = KVShape("bf", num_layers=2, num_kv_heads=1, head_dim=8, frame_tokens=4, dtype="bf16")
    config = CONFIG.replace(bank_bytes=2 * shape.chunk_bytes(6))
    # two slots and a disk tier: three of the five entries spill to disk
    src = Bank.for_shape(shape, config.replace(bank_dir=str(tmp_path / "spill"), disk_bytes=1 << 20))
    keys = [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("b", 1)]
    fill(src, keys, tokens=6)
    assert src.stats()["disk_entries"] == 3
    save_bank(src, tmp_path / "a", session_id="a", config=config, kv_shape=shape)
    dst = Bank.for_shape(shape, config.replace(bank_bytes=4 * shape.chunk_bytes(6)))
    assert load_bank(tmp_path / "a", dst, config=config, kv_shape=shape) == [("a", 0), ("a", 1), ("a", 2)]
    same_entries(src, dst, [("a", 0), ("a", 1), ("a", 2)])
    assert dst.view(("a", 0)).dtype == torch.bfloat16


def test_saving_again_replaces_atomically(tmp_path, monkeypatch):
    bank = fresh()
    fill(bank, [("s", 0), ("s", 1)])
    first = save_bank(bank, tmp_path, config=CONFIG, kv_shape=SHAPE)
    fill(bank, [("s", 2)], seed=1)
    second = save_bank(bank, tmp_path, config=CONFIG, kv_shape=SHAPE)
    assert second["data_file"] != first["data_file"]
    assert sorted(os.listdir(tmp_path)) == sorted([LOCK, MANIFEST, second["data_file"]])  # old data gone, no temp files

    import safetensors.torch

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    fill(bank, [("s", 3)], seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_bank(bank, tmp_path, config=CONFIG, kv_shape=SHAPE)
    # the crash left the previous bank whole, and no stray files
    assert sorted(os.listdir(tmp_path)) == sorted([LOCK, MANIFEST, second["data_file"]])
    assert verify_bank(tmp_path) == [] and len(read_manifest(tmp_path)["entries"]) == 3


def test_save_refuses_bad_input(tmp_path):
    bank = fresh()
    bank.reserve("a", KEPT, meta={"t": torch.zeros(1)})
    bank.mark_ready("a")
    with pytest.raises(ValueError, match="bank key 'a': meta is not JSON-serialisable"):
        save_bank(bank, tmp_path, config=CONFIG, kv_shape=SHAPE)
    with pytest.raises(ValueError, match="bank num_layers=2 does not match kv_shape.num_layers=4"):
        save_bank(bank, tmp_path, config=CONFIG, kv_shape=get_preset("small"))
    with pytest.raises(ValueError, match="extra is not JSON-serialisable"):
        save_bank(bank, tmp_path, config=CONFIG, kv_shape=SHAPE, extra={"x": object()})
    assert not (tmp_path / MANIFEST).exists()


@pytest.fixture
def saved(tmp_path):
    bank = fresh()
    fill(bank, [("s", i) for i in range(4)])
    return tmp_path / "bank", save_bank(bank, tmp_path / "bank", config=CONFIG, kv_shape=SHAPE)


def loaded_nothing(bank):
    return len(bank) == 0 and bank.bytes_used == 0 and bank.free_slots == bank.num_slots


@pytest.mark.parametrize("field,value,saved_value", [
    ("num_layers", 3, 2), ("num_kv_heads", 4, 2), ("head_dim", 8, 16), ("frame_tokens", 8, 16), ("dtype", "fp16", "fp32"),
])
def test_shape_mismatch_names_field_saved_and_expected(saved, field, value, saved_value):
    path, _ = saved
    shape = KVShape(**{**SHAPE.__dict__, field: value})
    with pytest.raises(ValueError, match=f"kv_shape.{field}: saved {saved_value!r}, expected {value!r}"):
        load_bank(path, fresh(), config=CONFIG, kv_shape=shape)


def test_fingerprint_mismatch(saved):
    path, manifest = saved
    other = CONFIG.replace(keep_ratio=0.5)
    bank = fresh(config=other)
    with pytest.raises(ValueError, match=f"fingerprint: saved {manifest['fingerprint']}, expected {other.fingerprint()}"):
        load_bank(path, bank, config=other, kv_shape=SHAPE)
    assert loaded_nothing(bank)


def flip_byte_of(path, manifest, name):
    """Flip one byte inside tensor ``name`` of the data file (located through its header)."""
    data = path / manifest["data_file"]
    with open(data, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        start, end = json.loads(fh.read(n))[name]["data_offsets"]
        pos = 8 + n + (start + end) // 2
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x40]))


def test_corrupted_entry_is_named_and_nothing_is_loaded(saved):
    path, manifest = saved
    flip_byte_of(path, manifest, "e2.kv")
    flip_byte_of(path, manifest, "e1.indices")
    problems = verify_bank(path)
    assert len(problems) == 2 and "entry 'e1'" in problems[0] and "entry 'e2'" in problems[1]
    assert all("sha256 mismatch" in p for p in problems)
    bank = fresh()
    fill(bank, ["resident"])
    with pytest.raises(ValueError, match=r"entry 'e1' \(key \['s', 1\]\): sha256 mismatch"):
        load_bank(path, bank, config=CONFIG, kv_shape=SHAPE)
    assert list(bank.keys()) == ["resident"] and bank.free_slots == bank.num_slots - 1  # unchanged


def test_truncated_file_names_the_lost_entries(saved):
    path, manifest = saved
    data = path / manifest["data_file"]
    with open(data, "r+b") as fh:
        fh.truncate(os.path.getsize(data) - SHAPE.chunk_bytes(KEPT) // 2)
    bank = fresh()
    with pytest.raises(ValueError, match=r"truncated or corrupted \(entries \['e3'\] lie past the end"):
        load_bank(path, bank, config=CONFIG, kv_shape=SHAPE)
    assert loaded_nothing(bank)
    assert "truncated" in verify_bank(path)[0]


def test_conflicts_and_room_are_checked_before_inserting(saved, tmp_path):
    path, _ = saved
    bank = fresh()
    fill(bank, [("s", 2)])
    with pytest.raises(ValueError, match=r"entry 'e2': key \('s', 2\) is already in the bank"):
        load_bank(path, bank, config=CONFIG, kv_shape=SHAPE)
    assert list(bank.keys()) == [("s", 2)]
    small = fresh(config=CONFIG.replace(bank_bytes=3 * SHAPE.chunk_bytes(KEPT)))
    with pytest.raises(ValueError, match="the saved bank has 4 entries but the bank has 3 free slots"):
        load_bank(path, small, config=CONFIG, kv_shape=SHAPE)
    assert loaded_nothing(small)
    narrow = fresh(slot_tokens=KEPT - 1)
    with pytest.raises(ValueError, match="num_tokens=24 does not fit the bank's slots of 23 tokens"):
        load_bank(path, narrow, config=CONFIG, kv_shape=SHAPE)


def test_bad_manifests(saved, tmp_path):
    path, manifest = saved
    with pytest.raises(FileNotFoundError, match="no saved bank here"):
        read_manifest(tmp_path / "nowhere")
    cases = [
        ({**manifest, "version": 99}, "version: saved 99, expected 1"),
        ({**manifest, "format": "other"}, "format='other', expected 'worldkv-bank'"),
        ({**manifest, "data_file": "../x.safetensors"}, "must be a plain file name"),
        ({**manifest, "entries": [{"key": 1, "name": "e0"}]}, "entry #0 .* field 'num_tokens'=None"),
    ]
    for bad, msg in cases:
        (path / MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            load_bank(path, fresh(), config=CONFIG, kv_shape=SHAPE)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(path)
    (path / MANIFEST).write_text(json.dumps(manifest))
    os.unlink(path / manifest["data_file"])
    with pytest.raises(ValueError, match="data file .* is missing"):
        load_bank(path, fresh(), config=CONFIG, kv_shape=SHAPE)


# --- the `worldkv bank` command ------------------------------------------------------------------
def test_cli_save_info_verify_load(tmp_path, capsys):
    path = str(tmp_path / "b")
    assert main(["bank", "save", path, "--source", "synthetic", "--num-chunks", "3", "--trajectory", "W_S90"]) == 0
    assert "saved 3 entries" in capsys.readouterr().out
    assert main(["bank", "info", path, "--entries"]) == 0
    out = capsys.readouterr().out
    assert "entries           3" in out and "2 layers x 2 heads x 16 dim, fp32" in out and "('s0', 2)" in out
    assert main(["bank", "verify", path]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["bank", "load", path, "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "loaded 3 entries" in out and "('s0', 1)" in out
    # the camera walked forward (W): the chunks were saved with their poses
    assert read_manifest(path)["entries"][2]["pose"] != read_manifest(path)["entries"][0]["pose"]

    assert main(["bank", "load", path, "--model", "small"]) == 2
    assert "kv_shape.num_layers: saved 2, expected 4" in capsys.readouterr().err
    assert main(["bank", "load", path, "--kv-connector-config", '{"keep_ratio": 0.5}']) == 2
    assert "fingerprint: saved" in capsys.readouterr().err
    m = read_manifest(path)
    flip_byte_of(tmp_path / "b", m, "e0.kv")
    assert main(["bank", "verify", path]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED: entry 'e0'" in out and "FAILED" in out
    assert main(["bank", "verify", str(tmp_path / "none")]) == 2
    assert "no saved bank here" in capsys.readouterr().err
    assert main(["bank", "save", path, "--source", "synthetic", "--num-chunks", "0"]) == 2
    assert main(["bank", "save", path, "--source", "synthetic", "--trajectory", "Q"]) == 2


def test_cli_save_from_the_engine(tmp_path, capsys):
    from worldkv_connector.connector.api import get_connector_class

    try:
        get_connector_class("worldkv")
    except ValueError as exc:
        pytest.skip(f"the WorldKV connector is not available: {exc}")
    path = str(tmp_path / "e")
    assert main(["bank", "save", path, "--source", "engine", "--num-chunks", "2", "--trajectory", "W_S90"]) == 0
    assert "source engine" in capsys.readouterr().out
    m = read_manifest(path)
    assert [decode_key(r["key"]) for r in m["entries"]] == [("s0", 0), ("s0", 1)]
    poses = [np.asarray(r["pose"]) for r in m["entries"]]
    assert all(p.shape == (3, 4, 4) for p in poses) and not np.allclose(poses[0], poses[1])  # walked forward
    assert m["extra"]["source"] == "engine" and verify_bank(path) == []
    assert main(["bank", "load", path]) == 0 and "loaded 2 entries" in capsys.readouterr().out
