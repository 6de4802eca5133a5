"""The Wan VAE through diffusers: both checkpoint layouts load, streaming decode equals decoding the
whole latent video, and the first-frame encode is the upstream pipeline's."""
import pytest
import torch

from worldkv_connector.integration.video.vae import (
    StreamingDecoder, denormalize, detect_layout, encode_first_frame, load_wan_vae, normalize,
)


def _latents(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 16, frames, 4, 4, generator=torch.Generator().manual_seed(seed))


def _whole(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.decode(denormalize(vae, z)).sample


def test_streaming_decode_equals_whole_video_decode(tiny_vae):
    z = _latents(12)  # four chunks of 3 latent frames
    whole = _whole(tiny_vae, z)
    assert whole.shape == (1, 3, 4 * 12 - 3, 32, 32)
    dec = StreamingDecoder(tiny_vae)
    chunks = [dec.decode(z[:, :, i:i + 3]) for i in range(0, 12, 3)]
    assert [c.shape[2] for c in chunks] == [9, 12, 12, 12]
    streamed = torch.cat(chunks, dim=2)
    assert (streamed - whole).abs().max().item() <= 1e-5
    assert dec.latent_frames == 12 and dec.video_frames == 45
    # the cache is what makes it equal: chunks decoded without it start a new video each time
    fresh = torch.cat([StreamingDecoder(tiny_vae).decode(z[:, :, i:i + 3]) for i in range(0, 12, 3)], dim=2)
    assert fresh.shape != whole.shape or (fresh - whole).abs().max().item() > 1e-2


def test_diffusers_folder_and_pipeline_folder_load_the_same_weights(tiny_vae, vae_dir, tmp_path):
    a = load_wan_vae(vae_dir)
    pipe = tmp_path / "pipeline"
    (pipe / "vae").mkdir(parents=True)
    for f in vae_dir.iterdir():
        (pipe / "vae" / f.name).write_bytes(f.read_bytes())
    b = load_wan_vae(pipe)
    for m in (a, b):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in tiny_vae.state_dict().items())


def test_the_wan21_release_layout_loads_through_diffusers_converter(tiny_vae, vae_pth):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = torch.load(vae_pth, weights_only=True)
    assert detect_layout(original) == "original" and "decoder.upsamples.3.resample.1.weight" in original
    # the test's renaming is exactly the inverse of diffusers' converter
    back = convert_wan_vae_to_diffusers(original)
    assert set(back) == set(tiny_vae.state_dict())
    vae = load_wan_vae(vae_pth)
    z = _latents(6, seed=3)
    assert torch.equal(_whole(vae, z), _whole(tiny_vae, z))


def test_bad_vae_paths_fail_with_the_flag_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--vae .*no such file"):
        load_wan_vae(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.json"):
        load_wan_vae(tmp_path)
    junk = tmp_path / "junk.pth"
    torch.save({"layer.weight": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="not a Wan VAE state dict"):
        load_wan_vae(junk)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_wan_vae(text)
    with pytest.raises(ValueError, match="expected a diffusers directory or a .pth"):
        load_wan_vae(_touch(tmp_path / "vae.bin"))


def _touch(path):
    path.write_bytes(b"")
    return path


def test_streaming_decoder_checks_the_latent_shape(tiny_vae):
    with pytest.raises(ValueError, match=r"expected \[B, 16, F, h, w\]"):
        StreamingDecoder(tiny_vae).decode(torch.zeros(1, 4, 3, 4, 4))


def test_first_frame_encode_matches_encoding_a_video_that_starts_with_it(tiny_vae):
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    lat = encode_first_frame(tiny_vae, img)
    assert lat.shape == (16, 1, 4, 4)
    video = torch.cat([img[:, None], torch.zeros(3, 4, 32, 32)], dim=1)[None]  # [1, 3, 5, H, W] (I2V style)
    with torch.inference_mode():
        raw = tiny_vae.encode(video).latent_dist.mode()  # [1, 16, 2, 4, 4]
    whole = normalize(tiny_vae, raw)
    assert (whole[0, :, :1] - lat).abs().max().item() <= 1e-5
    assert torch.allclose(denormalize(tiny_vae, whole), raw, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_first_frame(tiny_vae, torch.zeros(3, 30, 32))
