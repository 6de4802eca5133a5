"""``worldkv generate --vae ... --video/--frames/--contact-sheet/--prompt*/--image`` on the CPU with
tiny random VAE and text-encoder folders: the MP4 is read back, bad inputs fail before work."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from worldkv_connector.cli import main
from worldkv_connector.cli.video_outputs import VideoOutputs, add_video_arguments
from worldkv_connector.cli.video_writers import Mp4Writer, read_mp4
from worldkv_connector.integration.video.model_config import get_model_config
from worldkv_connector.retrieval.trajectory import parse_trajectory


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


GEN = ("generate", "--model", "tiny", "--no-progress", "--threads", "1", "--num-denoising-steps", "1")


def test_generate_writes_a_playable_mp4_and_png_frames(tmp_path, capsys, vae_dir):
    video, frames = tmp_path / "out.mp4", tmp_path / "frames"
    rc, out, err = run_cli(capsys, *GEN, "--num-chunks", "3", "--vae", str(vae_dir), "--video", str(video),
                           "--frames", str(frames), "--fps", "8", "--crf", "10")
    assert rc == 0, err
    expected = 4 * (3 * 3) - 3  # 9 latent frames -> 33 video frames
    back = read_mp4(video)
    assert back.shape == (expected, 64, 64, 3)  # tiny: 8x8 latents, VAE stride 8
    pngs = sorted(frames.glob("s0_frame_*.png"))
    assert len(pngs) == expected
    first = np.asarray(Image.open(pngs[0]))
    assert first.shape == (64, 64, 3) and first.std() > 1  # not a blank frame
    # the MP4 holds the same frames as the PNGs, in order, up to H.264 (compared in luma: yuv420p
    # halves the chroma resolution, which costs much on the random VAE's pixel noise)
    luma = lambda x: x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # noqa: E731
    pngs_y, back_y = luma(np.stack([np.asarray(Image.open(p)) for p in pngs])), luma(back)
    same, shuffled = np.abs(back_y - pngs_y).mean(), np.abs(back_y - pngs_y[::-1]).mean()
    assert same < 6 and same < shuffled / 2, (same, shuffled)
    assert f"wrote {video} ({expected} frames, 8 fps)" in out
    import av

    with av.open(str(video)) as c:
        assert c.streams.video[0].average_rate == 8


def test_an_interrupted_writer_leaves_a_playable_file(tmp_path):
    # a child writes 40 frames and dies without closing the file (as a killed run would)
    path = tmp_path / "cut.mp4"
    code = ("import os, numpy as np\n"
            "from worldkv_connector.cli.video_writers import Mp4Writer\n"
            f"w = Mp4Writer({str(path)!r}, fps=8, crf=20)\n"
            "rng = np.random.default_rng(0)\n"
            "for i in range(5):\n"
            "    w.write(rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    frames = read_mp4(path)
    assert frames.shape[1:] == (32, 32, 3) and 16 <= len(frames) <= 40  # every whole fragment written so far
    w = Mp4Writer(tmp_path / "odd.mp4", fps=8, crf=20)
    with pytest.raises(ValueError, match="even sizes"):
        w.write(np.zeros((1, 33, 32, 3), np.uint8))


def test_the_wan21_pth_layout_drives_the_cli_too(tmp_path, capsys, vae_pth):
    video = tmp_path / "pth.mp4"
    rc, _, err = run_cli(capsys, *GEN, "--num-chunks", "1", "--vae", str(vae_pth), "--video", str(video))
    assert rc == 0, err
    assert read_mp4(video).shape == (9, 64, 64, 3)


@pytest.mark.parametrize("argv, message", [
    (("--video", "x.mp4"), "--video needs --vae PATH"),
    (("--contact-sheet", "x.png"), "--contact-sheet needs --vae PATH"),
    (("--vae", "V", "--video", "x.avi"), "--video x.avi: expected a .mp4 path"),
    (("--vae", "V", "--video", "x.mp4", "--fps", "0"), "--fps 0: expected 1..240"),
    (("--vae", "V", "--video", "x.mp4", "--crf", "60"), "--crf 60: expected 0..51"),
    (("--vae", "V"), "nothing to decode"),
    (("--prompt", "a red room"), "--prompt and --text-encoder go together"),
    (("--prompt", "a", "--prompt-embeds", "e.safetensors", "--text-encoder", "T"), "either --prompt or --prompt-embeds"),
    (("--vae", "V", "--image", "x.png"), "model tiny is not image-conditioned"),
    (("--vae", "missing-vae-dir", "--video", "x.mp4"), "--vae missing-vae-dir: no such file or directory"),
    (("--prompt-embeds", "missing.safetensors"), "--prompt-embeds missing.safetensors: no such file"),
    (("--vae", "V", "--video", "x.mp4", "--vae-device", "gpu0"), "--vae-device 'gpu0': not a torch device"),
    pytest.param(("--vae", "V", "--video", "x.mp4", "--vae-device", "cuda"), "torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_inputs_fail_before_work_with_one_line(capsys, argv, message):
    rc, out, err = run_cli(capsys, *GEN, "--num-chunks", "1", *argv)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert "chunks generated" not in out


def test_a_vae_whose_channels_differ_from_the_model_is_refused(tmp_path, capsys):
    from diffusers import AutoencoderKLWan

    AutoencoderKLWan(base_dim=8, z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(tmp_path / "v4")
    rc, _, err = run_cli(capsys, *GEN, "--num-chunks", "1", "--vae", str(tmp_path / "v4"), "--video", "x.mp4")
    assert rc == 2 and "latent channels 4, but model tiny makes 16" in err


def test_prompt_embeds_become_the_session_context(tmp_path, capsys):
    from safetensors.torch import save_file

    emb = torch.randn(1, 5, 32)
    save_file({"prompt_embeds": emb}, tmp_path / "e.safetensors")
    save_file({"prompt_embeds": torch.randn(5, 31)}, tmp_path / "bad.safetensors")
    args = _args(prompt_embeds=str(tmp_path / "e.safetensors"))
    outputs = VideoOutputs.from_args(args, get_model_config("tiny"))
    assert torch.equal(outputs.session_kwargs(lambda context=None: None)["context"], emb[0])
    rc, _, err = run_cli(capsys, *GEN, "--num-chunks", "1", "--prompt-embeds", str(tmp_path / "bad.safetensors"))
    assert rc == 2 and "embedding width 31, but model tiny takes text_dim 32" in err
    # the prompt changes what is generated; the same prompt, the same latents
    outs = []
    for name, extra in (("a", ("--prompt-embeds", str(tmp_path / "e.safetensors"))), ("b", ()),
                        ("c", ("--prompt-embeds", str(tmp_path / "e.safetensors")))):
        rc, _, err = run_cli(capsys, *GEN, "--num-chunks", "1", "--output", str(tmp_path / f"{name}.safetensors"), *extra)
        assert rc == 0, err
        from safetensors.torch import load_file

        outs.append(load_file(str(tmp_path / f"{name}.safetensors"))["s0"])
    assert torch.equal(outs[0], outs[2]) and not torch.allclose(outs[0], outs[1])


def test_prompt_text_through_the_umt5_encoder(tmp_path, capsys, text_encoder_dir):
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    args = _args(prompt="a red  room ", text_encoder=str(text_encoder_dir))
    ctx = VideoOutputs.from_args(args, get_model_config("tiny")).context
    assert ctx.shape == (8, 32)  # padded to the model's text_len
    assert ctx[:4].abs().sum(dim=1).min() > 0 and not ctx[4:].any()  # 3 words + </s>, zeros after
    # what diffusers' WanPipeline computes for the same prompt with the same encoder
    pipe = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(text_encoder_dir),
                           text_encoder=UMT5EncoderModel.from_pretrained(text_encoder_dir).eval(),
                           _execution_device=torch.device("cpu"))
    with torch.inference_mode():
        ref = WanPipeline._get_t5_prompt_embeds(pipe, "a red  room ", max_sequence_length=8,
                                                device=torch.device("cpu"), dtype=torch.float32)
    assert (ref[0] - ctx).abs().max().item() <= 1e-6
    rc, out, err = run_cli(capsys, *GEN, "--num-chunks", "1", "--prompt", "walk forward",
                           "--text-encoder", str(text_encoder_dir))
    assert rc == 0, err


def test_contact_sheet_pairs_each_revisit_with_its_closest_first_visit(tmp_path):
    poses = parse_trajectory("R_L60")  # latent-frame poses; chunk c holds frames 3c..3c+2
    chunk_poses = []
    for c in range(len(poses) // 3):
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = poses[3 * c:3 * c + 3, :3, :3].mean(0), poses[3 * c:3 * c + 3, :3, 3].mean(0)
        chunk_poses.append(m)
    outputs = VideoOutputs(_args(contact_sheet=str(tmp_path / "sheet.png")), get_model_config("tiny"))
    outputs._stills["s0"] = [(c, np.full((16, 16, 3), c * 10, np.uint8), p) for c, p in enumerate(chunk_poses)]
    engine = SimpleNamespace(scheduler=SimpleNamespace(sink_chunks=1, recent_chunks=2))
    line = outputs.close(engine)[-1]
    assert line.startswith(f"wrote {tmp_path / 'sheet.png'}") and "revisit rows" in line
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    rows = int(line.split("(")[1].split()[0])
    assert rows >= 3 and sheet.shape[0] > rows * 16 and sheet.shape[1] > 32
    none = VideoOutputs(_args(contact_sheet=str(tmp_path / "none.png")), get_model_config("tiny"))
    none._stills["s0"] = [(c, np.zeros((16, 16, 3), np.uint8), np.eye(4)) for c in range(3)]
    assert "no revisit" in none.close(engine)[-1] and not (tmp_path / "none.png").exists()


def _args(**kw) -> SimpleNamespace:
    import argparse

    p = argparse.ArgumentParser()
    add_video_arguments(p)
    a = p.parse_args([])
    for k, v in kw.items():
        setattr(a, k, v)
    a.device, a.no_progress = "cpu", True
    return a
