"""Tiny random Wan VAEs and umT5 encoders, written by the tests in the layouts users have.

``to_original_layout`` renames a diffusers ``AutoencoderKLWan`` state dict to the Wan2.1 release's
keys (the inverse of diffusers' ``convert_wan_vae_to_diffusers``, for Wan2.1's block structure);
the tests check that diffusers' converter maps it back exactly, so the ``.pth`` they load is what
that converter expects of the real file.
"""
import re

import pytest
import torch

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
        "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
        "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
_TOP = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
        "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}


def _residual(tail: str) -> str:
    return _RES.get(tail, tail)


def to_original_layout(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        new = _TOP.get(key)
        if new is None:
            side, rest = key.split(".", 1)  # encoder / decoder
            if rest.startswith(("conv_in.", "conv_out.", "norm_out.")):
                new = rest.replace("conv_in.", "conv1.").replace("norm_out.", "head.0.").replace("conv_out.", "head.2.")
            elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
                new = f"middle.{2 * int(m[1])}.{_residual(m[2])}"
            elif m := re.match(r"mid_block\.attentions\.0\.(.+)", rest):
                new = f"middle.1.{m[1]}"
            elif m := re.match(r"down_blocks\.(\d+)\.(.+)", rest):
                new = f"downsamples.{m[1]}.{_residual(m[2])}"
            elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
                new = f"upsamples.{4 * int(m[1]) + int(m[2])}.{_residual(m[3])}"
            elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
                new = f"upsamples.{4 * int(m[1]) + 3}.{m[2]}"
            else:
                raise KeyError(f"no Wan2.1 name for {key}")
            new = f"{side}.{new}"
        out[new] = value
    return out


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights big enough that every layer changes its input (fresh ones are near identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


@pytest.fixture(scope="session")
def tiny_vae():
    from diffusers import AutoencoderKLWan

    return randomize(AutoencoderKLWan(**TINY_VAE)).eval()


@pytest.fixture(scope="session")
def vae_dir(tiny_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "wan_vae"
    tiny_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vae_pth(tiny_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae_pth") / "Wan2.1_VAE.pth"
    torch.save(to_original_layout(tiny_vae.state_dict()), path)
    return path


TINY_TEXT_DIM = 32  # the tiny backend model's text_dim


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory):
    """A tiny umT5 encoder with a word-level tokenizer (T5-style: </s> appended, <pad> id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "room", "with", "blue", "door", "walk", "forward", "the"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    cfg = UMT5Config(vocab_size=len(words), d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = UMT5EncoderModel(cfg).eval()
    path = tmp_path_factory.mktemp("umt5") / "umt5"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
