"""The training command learns, is reproducible, and the shipped weights are the ones the manifest names."""
import json

import torch

from worldkv_connector.cli import main
from worldkv_connector.world.train import TrainConfig, sha256_file, train
from worldkv_connector.world.weights import shipped_manifest, shipped_weights


def test_a_few_steps_reduce_the_loss_and_repeat_exactly():
    tc = TrainConfig(steps=24, batch=4, warmup=2, log_every=6, seed=3)
    _, record = train(tc)
    curve = [loss for _, loss in record["loss_curve"]]
    assert len(curve) == 4 and curve[-1] < 0.8 * curve[0]
    _, again = train(TrainConfig(steps=3, batch=2, warmup=1, log_every=3, seed=3))
    _, twice = train(TrainConfig(steps=3, batch=2, warmup=1, log_every=3, seed=3))
    assert again["final_loss"] == twice["final_loss"]


def test_train_command_writes_weights_and_manifest(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert main(["train", "world", "--out", str(out), "--steps", "2", "--batch", "2", "--log-every", "1"]) == 0
    text = capsys.readouterr().out
    assert "step     2/2" in text and "final loss" in text
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["sha256"] == sha256_file(out) and manifest["steps"] == 2
    assert manifest["world_version"] == "panorama-v1" and manifest["train"]["seed"] == 0


def test_train_command_refuses_bad_flags(tmp_path, capsys):
    assert main(["train", "world", "--out", str(tmp_path / "w.pt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["train", "world", "--out", str(tmp_path / "w.safetensors"), "--steps", "0"]) == 2
    assert "TrainConfig.steps=0" in capsys.readouterr().err


def test_shipped_weights_match_their_manifest_and_load_into_the_engine():
    manifest = shipped_manifest()
    path = shipped_weights()
    assert sha256_file(path) == manifest["sha256"]
    for key in ("model_config", "train", "world", "steps", "final_loss", "loss_curve"):
        assert key in manifest
    assert path.stat().st_size < 2 << 20
    from worldkv_connector.integration.video.checkpoint import load_checkpoint
    from worldkv_connector.integration.video.models import build_model
    from worldkv_connector.integration.video.model_config import get_model_config

    model = build_model(get_model_config("world"), seed=123)
    load_checkpoint(model, path)
    from safetensors.torch import load_file

    ref = load_file(str(path))
    assert torch.equal(model.state_dict()["blocks.0.self_attn.q.weight"], ref["blocks.0.self_attn.q.weight"])
