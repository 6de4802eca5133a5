"""The Wan VAE (diffusers' ``AutoencoderKLWan``): loading, streaming decode, first-frame encode.

``load_wan_vae(path)`` reads either layout:

- diffusers: a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a
  pipeline directory with them under ``vae/``);
- the original Wan2.1 release: ``Wan2.1_VAE.pth`` (or the same keys in a ``.safetensors`` file),
  converted with diffusers' own ``convert_wan_vae_to_diffusers``; the architecture is Wan2.1's
  (``AutoencoderKLWan``'s defaults) with the width read from the weights.

``StreamingDecoder`` decodes a rollout chunk by chunk. The VAE is causal in time: diffusers decodes
one latent frame at a time, carrying each causal convolution's last input frames (its feature
cache) to the next. The streaming decoder keeps that cache across chunks, so the frames of the
chunks, concatenated, are the frames of decoding the whole latent video at once
(tests/video/test_vae.py checks this to 1e-5 in fp32). The first latent frame gives 1 video frame,
each later one 4 (the temporal stride): ``F`` latent frames are ``4 F - 3`` video frames.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

__all__ = ["load_wan_vae", "StreamingDecoder", "encode_first_frame", "detect_layout", "denormalize", "normalize"]

logger = logging.getLogger(__name__)

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as exc:
        raise ValueError(f"--vae needs diffusers (pip install diffusers==0.42.1): {exc}") from None
    return AutoencoderKLWan


def detect_layout(state_dict: dict) -> str:
    """"original" (Wan2.1 release keys), "diffusers", or ValueError for neither."""
    if "decoder.conv1.weight" in state_dict and "conv2.weight" in state_dict:
        return "original"
    if "decoder.conv_in.weight" in state_dict and "post_quant_conv.weight" in state_dict:
        return "diffusers"
    sample = sorted(state_dict)[:4]
    raise ValueError(f"--vae: not a Wan VAE state dict (keys start {sample}; expected the Wan2.1 release's "
                     "decoder.conv1.* / conv2.* or diffusers' decoder.conv_in.* / post_quant_conv.*)")


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - several kinds for a file that is not a checkpoint
        raise ValueError(f"--vae {path}: not a torch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"--vae {path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _from_file(path: Path, cls):
    sd = _read_state_dict(path)
    if detect_layout(sd) == "original":
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        sd = convert_wan_vae_to_diffusers(sd)
    base_dim = int(sd["encoder.conv_in.weight"].shape[0])
    z_dim = int(sd["post_quant_conv.weight"].shape[0])
    if z_dim != 16:
        raise ValueError(f"--vae {path}: z_dim {z_dim} from the weights; a single-file Wan VAE must be Wan2.1's "
                         "(z_dim 16): give a diffusers directory with its config.json instead")
    vae = cls(base_dim=base_dim, z_dim=z_dim)
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"--vae {path}: weights do not fit AutoencoderKLWan(base_dim={base_dim}): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return vae


def load_wan_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The Wan VAE from ``path`` (module docstring: either layout), in eval mode on ``device``."""
    cls = _autoencoder_class()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--vae {path}: no such file or directory")
    if p.is_dir():
        sub = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (sub / "config.json").is_file():
            raise ValueError(f"--vae {path}: a directory needs diffusers' config.json (in it or in vae/)")
        config = json.loads((sub / "config.json").read_text())
        if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
            raise ValueError(f"--vae {path}: config.json is a {config['_class_name']}, expected AutoencoderKLWan")
        if not any((sub / w).is_file() for w in _DIFFUSERS_WEIGHTS):
            raise ValueError(f"--vae {path}: no {' or '.join(_DIFFUSERS_WEIGHTS)} beside config.json")
        vae = cls.from_pretrained(str(sub), local_files_only=True)
    elif p.suffix in (".pth", ".pt", ".ckpt", ".safetensors"):
        vae = _from_file(p, cls)
    else:
        raise ValueError(f"--vae {path}: expected a diffusers directory or a .pth/.pt/.safetensors file")
    return vae.to(device=device, dtype=dtype).eval()


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(1, z, 1, 1, 1)
    return mean, std


def denormalize(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> VAE latents, as diffusers' Wan pipelines do before ``vae.decode``:
    ``latents * std + mean`` per channel. latents: [B, C, F, h, w]."""
    mean, std = _stats(vae, latents)
    return latents * std + mean


def normalize(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> model latents (the inverse of ``denormalize``). latents: [B, C, F, h, w]."""
    mean, std = _stats(vae, latents)
    return (latents - mean) / std


class StreamingDecoder:
    """Decode one video's latents chunk by chunk with the causal cache kept between chunks.

    ``decode(latents)``: latents [B, C, F, h, w] (model space: ``denormalize`` is applied unless
    ``normalized=False``), on any device; returns video frames [B, 3, T, H, W] in [-1, 1] on the
    VAE's device, with T = 4 F - 3 for the first chunk and 4 F after. Not thread-safe; one
    instance per video.
    """

    def __init__(self, vae, *, normalized: bool = True) -> None:
        self.vae = vae
        self.normalized = normalized
        self._cache: list = [None] * sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())
        self.latent_frames = 0
        self.video_frames = 0

    @property
    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if latents.dim() != 5 or latents.shape[1] != vae.config.z_dim:
            raise ValueError(f"latents: expected [B, {vae.config.z_dim}, F, h, w], got {list(latents.shape)}")
        p = self._param
        z = latents.to(device=p.device, dtype=p.dtype)
        if self.normalized:
            z = denormalize(vae, z)
        x = vae.post_quant_conv(z)  # kernel 1 in time: no state
        frames = []
        for i in range(x.shape[2]):
            idx = [0]  # each frame walks the decoder's causal convs in the same order
            frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=idx,
                                      first_chunk=self.latent_frames == 0))
            self.latent_frames += 1
        out = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        out = out.clamp(-1.0, 1.0)
        self.video_frames += out.shape[2]
        return out


@torch.inference_mode()
def encode_first_frame(vae, image: torch.Tensor) -> torch.Tensor:
    """The VAE latent of a first frame, as diffusers' Wan image-to-video pipeline encodes it (mode
    of the posterior, then ``normalize``). image: [3, H, W] in [-1, 1]; returns [C, 1, H/8, W/8]
    (model space) on the VAE's device. The causal encoder codes the first frame on its own, so
    this equals the first latent frame of encoding a video that starts with ``image``."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected [3, H, W], got {list(image.shape)}")
    ratio = vae.spatial_compression_ratio
    if image.shape[1] % ratio or image.shape[2] % ratio:
        raise ValueError(f"image: height and width must be multiples of {ratio}, got {list(image.shape[1:])}")
    p = next(vae.parameters())
    x = image.to(device=p.device, dtype=p.dtype)[None, :, None]  # [1, 3, 1, H, W]
    latent = vae.encode(x).latent_dist.mode()
    return normalize(vae, latent)[0]
