"""Prompt conditioning: precomputed embeddings from a file, or umT5 through transformers.

``load_prompt_embeds(path)`` reads a safetensors file holding ``prompt_embeds`` (or its one
tensor) of shape [L, D] or [1, L, D]. ``PromptEncoder`` runs the umT5 encoder from a local
directory (a transformers ``UMT5EncoderModel`` folder with its tokenizer, or a diffusers Wan
pipeline folder with ``text_encoder/`` and ``tokenizer/``) the way diffusers' ``WanPipeline``
does: the prompt cleaned, padded to ``text_len`` tokens, encoded with the attention mask, the
hidden states past the prompt's length zeroed. Both return [L, text_dim] fp32 on the CPU, the
``context`` a session of the video backend takes.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_prompt_embeds", "PromptEncoder", "check_context"]


def check_context(embeds: torch.Tensor, text_dim: int, text_len: int, model: str, flag: str) -> torch.Tensor:
    """[L, text_dim] fp32 CPU from [L, D] or [1, L, D]; ValueError naming ``flag`` and the model."""
    if embeds.dim() == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.dim() != 2:
        raise ValueError(f"{flag}: expected prompt embeddings [L, {text_dim}] or [1, L, {text_dim}], "
                         f"got {list(embeds.shape)}")
    if not embeds.is_floating_point():
        raise ValueError(f"{flag}: expected a floating-point tensor, got {embeds.dtype}")
    length, dim = embeds.shape
    if dim != text_dim:
        raise ValueError(f"{flag}: embedding width {dim}, but model {model} takes text_dim {text_dim}")
    if not 1 <= length <= text_len:
        raise ValueError(f"{flag}: {length} tokens, but model {model} takes 1..{text_len}")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"{flag}: the embeddings hold NaN or inf")
    return embeds.detach().to("cpu", torch.float32).contiguous()


def load_prompt_embeds(path: str | Path) -> torch.Tensor:
    """The tensor of a safetensors file: key ``prompt_embeds``, or the file's only tensor."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompt-embeds {path}: no such file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"--prompt-embeds {path}: not a safetensors file ({exc})") from None
    if "prompt_embeds" in tensors:
        return tensors["prompt_embeds"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"--prompt-embeds {path}: {len(tensors)} tensors ({sorted(tensors)[:4]}); "
                     "name the one to use prompt_embeds")


def _parts(path: Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) of a transformers folder or a diffusers pipeline folder."""
    if (path / "text_encoder" / "config.json").is_file():
        tok = path / "tokenizer" if (path / "tokenizer").is_dir() else path / "text_encoder"
        return path / "text_encoder", tok
    if (path / "config.json").is_file():
        return path, path
    raise ValueError(f"--text-encoder {path}: expected a transformers folder (config.json and tokenizer files) "
                     "or a Wan pipeline folder with text_encoder/ and tokenizer/")


class PromptEncoder:
    """umT5 from a local folder. ``encode(prompt)`` -> [text_len, D] fp32 CPU (zeros past the prompt)."""

    def __init__(self, path: str | Path, text_len: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"--text-encoder {path}: no such directory")
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError as exc:
            raise ValueError(f"--text-encoder needs transformers (pip install transformers==5.23.0): {exc}") from None
        enc_dir, tok_dir = _parts(p)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--text-encoder {path}: no usable tokenizer in {tok_dir.name}/ ({exc})") from None
        self.model = UMT5EncoderModel.from_pretrained(str(enc_dir), local_files_only=True).to(device, dtype).eval()
        self.text_len = text_len
        self.hidden_size = int(self.model.config.d_model)

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"--prompt {prompt!r}: expected a non-empty text")
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tok = self.tokenizer([prompt_clean(prompt)], padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        hidden = self.model(tok.input_ids.to(device), tok.attention_mask.to(device)).last_hidden_state[0]
        n = int(tok.attention_mask[0].gt(0).sum())
        out = torch.zeros(self.text_len, hidden.shape[-1], dtype=torch.float32)
        out[:n] = hidden[:n].float().cpu()
        return out
