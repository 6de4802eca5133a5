"""Safetensors checkpoints of CausalWanDiT in Wan's original key layout.

Keys: ``patch_embedding.*``, ``text_embedding.{0,2}.*``, ``time_embedding.{0,2}.*``,
``time_projection.1.*``, ``blocks.{i}.self_attn.{q,k,v,o}.*``, ``blocks.{i}.self_attn.norm_{q,k}.weight``,
``blocks.{i}.cross_attn.*``, ``blocks.{i}.norm3.*``, ``blocks.{i}.ffn.{0,2}.*``, ``blocks.{i}.modulation``,
``head.head.*``, ``head.modulation``; camera-conditioned configs add ``blocks.{i}.cam_injector.*``.
A checkpoint is one ``.safetensors`` file or a directory of shards (Wan ships
``diffusion_pytorch_model-0000N-of-0000M.safetensors``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worldkv_connector.integration.video.model import CausalWanDiT

__all__ = ["save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 20  # keys listed per kind in an error message before "... and N more"


def save_checkpoint(model: CausalWanDiT, path: str | os.PathLike) -> None:
    """Write every parameter of ``model`` (its dtype, moved to the CPU) to one safetensors file;
    the model config is stored as JSON in the file's metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "model_config": json.dumps(model.config.to_dict())})


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in checkpoint directory {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return [path]


def _listing(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {kind}: {shown}{more}"


def load_checkpoint(model: CausalWanDiT, path: str | os.PathLike, prefix: str = "") -> CausalWanDiT:
    """Load weights into ``model`` in place (cast to each parameter's dtype and device) and return it.

    ``prefix`` is stripped from checkpoint keys (e.g. ``"model."`` for wrapped training checkpoints;
    keys without it are unexpected). Every key is checked before any weight is copied: missing,
    unexpected and mis-shaped keys raise one ValueError listing all of them.
    """
    files = _files(Path(path))
    expected = model.state_dict()
    where: dict[str, tuple[Path, str]] = {}  # model key -> (file, checkpoint key)
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for ck in f.keys():
                key = ck[len(prefix):] if prefix and ck.startswith(prefix) else (None if prefix else ck)
                if key is None or key not in expected:
                    unexpected.append(ck)
                    continue
                shape = tuple(f.get_slice(ck).get_shape())
                if shape != tuple(expected[key].shape):
                    mis_shaped.append(f"{ck} {shape} (expected {tuple(expected[key].shape)})")
                    continue
                where[key] = (file, ck)
    missing = [k for k in expected if k not in where and not any(m.startswith(prefix + k + " ") for m in mis_shaped)]
    problems = [
        _listing(kind, items)
        for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
        if items
    ]
    if problems:
        raise ValueError(f"checkpoint {path} does not match model {model.config.name!r}: " + "; ".join(problems))
    # copy file by file so at most one shard's tensors are read at a time
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key, (file, ck) in where.items():
        by_file.setdefault(file, []).append((key, ck))
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for key, ck in keys:
                    expected[key].copy_(f.get_tensor(ck))
    logger.info("loaded %d tensors from %s into %s", len(where), path, model.config.name)
    return model
