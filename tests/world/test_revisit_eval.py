"""`worldkv eval revisit` on a short rollout: the JSON has the issue's schema, pairs are real revisits."""
import json

import numpy as np

from worldkv_connector.cli import main
from worldkv_connector.world.panorama import yaw_pose
from worldkv_connector.world.revisit import revisit_pairs


def test_revisit_pairs_skip_the_sink_and_the_recent_window():
    yaws = [0, 0, 0, 90, 90, 90, 180, 180, 180, 270, 270, 270, 90, 90, 90, 0, 0, 0, 180, 180, 180]
    poses = np.stack([yaw_pose(y + 2 * (i % 3)) for i, y in enumerate(yaws)])
    pairs = revisit_pairs(poses, 3, sink_chunks=1, recent_chunks=2, yaw_tolerance_degrees=1.0, position_tolerance=0.01)
    # chunk 4 revisits chunk 1 and chunk 6 revisits chunk 2 (both before the recent window);
    # chunk 5 revisits the sink, which every mode keeps: no memory test
    assert (12, 3) in pairs and (13, 4) in pairs and (18, 6) in pairs
    assert all(j // 3 != 5 for j, _ in pairs)
    assert all(i // 3 >= 1 and i // 3 < j // 3 - 2 for j, i in pairs)


def test_eval_revisit_short_rollout_json_schema_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "revisit", "--num-chunks", "9", "--trajectories", "glance", "--num-denoising-steps", "2",
               "--modes", "full,sliding,worldkv,worldkv@1.0,tempcache", "--observe", "first-visits",
               "--json", str(out), "--plot", str(png), "--quiet", "--threads", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "acceptance (this run):" in text and "tempcache" in text
    assert ", 2 thread(s)," in text  # the count the rollouts ran with, not the one restored after
    doc = json.loads(out.read_text())
    assert doc["num_chunks"] == 9
    # the shipped weights by their place in the package, not this machine's install path
    assert doc["checkpoint_file"] == "worldkv_connector/world/weights/world-v2.safetensors"
    for key in ("revisit_psnr_db", "chunks_per_s", "revisit_ssim", "revisit_psnr_gt_db", "bank_peak_bytes",
                "peak_resident_kv_bytes"):
        assert set(doc[key]) == {"full", "sliding", "worldkv", "worldkv@1.0", "tempcache"}
    assert all(isinstance(v, float) for v in doc["revisit_psnr_db"].values())
    assert all(v > 0 for v in doc["chunks_per_s"].values())
    assert doc["bank_peak_bytes"]["full"] == 0 and doc["bank_peak_bytes"]["worldkv"] > 0
    # equal storage: the merged and the pruned banks hold the same bytes
    assert doc["bank_peak_bytes"]["tempcache"] == doc["bank_peak_bytes"]["worldkv"]
    assert doc["bank_peak_bytes"]["worldkv@1.0"] > doc["bank_peak_bytes"]["worldkv"]
    assert png.stat().st_size > 1000


def test_eval_revisit_refuses_unknown_modes_and_trajectories(capsys):
    assert main(["eval", "revisit", "--modes", "full,magic"]) == 2
    assert "mode 'magic'" in capsys.readouterr().err
    assert main(["eval", "revisit", "--trajectories", "moon"]) == 2
    assert "trajectory 'moon'" in capsys.readouterr().err


def test_observed_chunks_land_exactly_on_the_ground_truth():
    import torch

    from worldkv_connector.world.panorama import PanoramaWorld
    from worldkv_connector.world.revisit import RevisitConfig, _engine_args, _rollout
    from worldkv_connector.world.trajectories import revisit_poses
    from worldkv_connector.world.weights import shipped_weights

    poses = revisit_poses("glance", 3, 3)
    truth_frames = PanoramaWorld(5).render(poses, 12, 45.0)
    truth = {0: truth_frames[0:3], 2: truth_frames[6:9]}
    args = _engine_args(RevisitConfig(num_denoising_steps=2), "full", str(shipped_weights()), 12, 45.0)
    out = _rollout(args, poses, 3, 0, truth)["latents"]
    assert torch.allclose(out[0:3], truth[0], atol=1e-4) and torch.allclose(out[6:9], truth[2], atol=1e-4)
    assert not torch.allclose(out[3:6], truth_frames[3:6], atol=1e-2)  # chunk 1 is generated
