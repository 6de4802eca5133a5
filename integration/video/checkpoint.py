"""Checkpoints of the backend's models in the upstream (Wan original) key layout.

Keys: ``patch_embedding.*``, ``text_embedding.{0,2}.*``, ``time_embedding.{0,2}.*``,
``time_projection.1.*``, ``blocks.{i}.self_attn.{q,k,v,o}.*``, ``blocks.{i}.self_attn.norm_{q,k}.weight``,
``blocks.{i}.cross_attn.*``, ``blocks.{i}.norm3.*``, ``blocks.{i}.ffn.{0,2}.*``, ``blocks.{i}.modulation``,
``head.head.*``, ``head.modulation``; Matrix-Game-2 adds ``img_emb.proj.*`` and
``blocks.{i}.action_model.*``, LingBot-World ``patch_embedding_wancamctrl.*`` and
``blocks.{i}.cam_{injector,scale,shift}_layer.*`` (see the model files).

Files read:
- ``.safetensors``, or a directory of ``.safetensors`` shards (Wan ships
  ``diffusion_pytorch_model-0000N-of-0000M.safetensors``);
- ``.pt`` / ``.pth`` state dicts, read with ``torch.load(weights_only=True)`` (no code runs). Training
  checkpoints nest the weights (Self-Forcing / CausVid: ``generator`` and ``generator_ema``): ``key``
  selects the entry (dots walk nested dicts); without it a file whose top level is not tensors must
  hold exactly one dict of tensors.
``prefix`` is stripped from every key (``model.`` in Self-Forcing's checkpoints); the diffusers / FastVideo
layout is converted on load (``checkpoint_layouts.py``; ``layout="auto"`` detects it).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worldkv_connector.integration.video.checkpoint_layouts import convert_keys

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "match_checkpoint", "CHECKPOINT_SUFFIXES"]

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
_MAX_LISTED = 20  # keys listed per kind in an error message before "... and N more"


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write every parameter of ``model`` (its dtype, moved to the CPU) to one safetensors file;
    the model config is stored as JSON in the file's metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "model_config": json.dumps(model.config.to_dict())})


# --- reading ---------------------------------------------------------------------------------------

class _Entry:
    """One tensor of a checkpoint: its shape now, its data on demand."""

    __slots__ = ("shape", "load")

    def __init__(self, shape: tuple[int, ...], load: Callable[[], torch.Tensor]):
        self.shape, self.load = shape, load


def _safetensors_entries(files: list[Path], shown: str) -> dict[str, _Entry]:
    out: dict[str, _Entry] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():
                    shape = tuple(f.get_slice(k).get_shape())
                    out[k] = _Entry(shape, lambda file=file, k=k: _read_one(file, k))
        except Exception as exc:  # safetensors raises its own error kinds for a damaged header
            raise ValueError(f"checkpoint {shown}: {file.name} is not a readable safetensors file "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return out


def _read_one(file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _torch_entries(path: Path, key: str | None) -> dict[str, _Entry]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped: read them whole
            raise ValueError(f"checkpoint {path}: torch.load(weights_only=True) failed "
                             f"({str(exc).splitlines()[0]})") from None
        obj = _plain_torch_load(path)
    except Exception as exc:  # pickle and zip errors of a file that is not a torch checkpoint
        raise ValueError(f"checkpoint {path}: not a torch checkpoint readable with weights_only=True "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    where = "the file"
    if key:
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                have = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"--checkpoint-key {key!r}: no entry {part!r} in {where} of {path} (it has {have})")
            obj, where = obj[part], f"entry {part!r}"
    elif not _is_state_dict(obj):
        nested = [k for k, v in obj.items() if _is_state_dict(v)] if isinstance(obj, dict) else []
        if len(nested) != 1:
            have = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"checkpoint {path}: the top level is not a state dict; choose its entry with "
                             f"--checkpoint-key (entries: {have})")
        logger.info("checkpoint %s: using its only state dict, entry %r", path, nested[0])
        obj = obj[nested[0]]
    if not _is_state_dict(obj):
        raise ValueError(f"checkpoint {path}: {where} is not a dict of tensors ({type(obj).__name__})")
    return {k: _Entry(tuple(v.shape), lambda v=v: v) for k, v in obj.items()}


def _plain_torch_load(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path}: not a torch checkpoint readable with weights_only=True "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict[str, _Entry]:
    """The tensors of a checkpoint file or shard directory, by checkpoint key (shapes read, data lazy)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in checkpoint directory {p}")
        if key:
            raise ValueError(f"--checkpoint-key {key!r}: only .pt/.pth files have nested entries ({p} is a directory)")
        return _safetensors_entries(files, str(p))
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"checkpoint {p}: expected a {', '.join(CHECKPOINT_SUFFIXES)} file or a directory of "
                         f".safetensors shards")
    if p.suffix == ".safetensors":
        if key:
            raise ValueError(f"--checkpoint-key {key!r}: only .pt/.pth files have nested entries ({p.name})")
        return _safetensors_entries([p], str(p))
    return _torch_entries(p, key)


def _listing(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {kind}: {shown}{more}"


def _prefix_hint(keys: list[str]) -> str:
    heads = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(heads) == 1 and len(keys) > 1 and all("." in k for k in keys):
        return f" (every key starts with {next(iter(heads)) + '.'!r}: try --checkpoint-prefix {next(iter(heads))}.)"
    return ""


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, prefix: str = "", key: str | None = None,
                    layout: str = "auto") -> torch.nn.Module:
    """Load weights into ``model`` in place (cast to each parameter's dtype and device) and return it.

    ``prefix`` is stripped from checkpoint keys (keys without it are unexpected); ``key`` selects a
    nested entry of a ``.pt`` file; ``layout``: ``auto``, ``wan`` or ``diffusers`` (checkpoint_layouts.py).
    Every key is checked before any weight is copied: missing, unexpected and mis-shaped keys raise one
    ValueError listing all of them.
    """
    entries = read_checkpoint(path, key)
    expected = model.state_dict()
    where, used = match_checkpoint(entries, {k: tuple(v.shape) for k, v in expected.items()}, model.config.name,
                                   str(path), prefix, layout)
    with torch.no_grad():
        for wk, ck in where.items():
            expected[wk].copy_(entries[ck].load())  # one tensor at a time
    logger.info("loaded %d tensors from %s (%s layout) into %s", len(where), path, used, model.config.name)
    return model


def match_checkpoint(entries: dict[str, _Entry], expected: dict[str, tuple[int, ...]], model_name: str, shown: str,
                     prefix: str = "", layout: str = "auto") -> tuple[dict[str, str], str]:
    """Pair a checkpoint's keys with a model's: returns ({model key: checkpoint key}, layout used), or
    raises one ValueError listing every missing, unexpected and mis-shaped key."""
    unexpected = [k for k in entries if prefix and not k.startswith(prefix)]
    stripped = [k for k in entries if not prefix or k.startswith(prefix)]
    wan, used = convert_keys([k[len(prefix):] for k in stripped], layout)  # wan key -> stripped key
    where: dict[str, str] = {}  # model key -> checkpoint key
    mis_shaped: list[str] = []
    for wk, sk in wan.items():
        ck = prefix + sk
        if wk not in expected:
            unexpected.append(ck)
        elif entries[ck].shape != expected[wk]:
            mis_shaped.append(f"{ck} {entries[ck].shape} (expected {expected[wk]})")
            where[wk] = ""  # present, wrong shape: not also missing
        else:
            where[wk] = ck
    missing = [k for k in expected if k not in where]
    problems = [
        _listing(kind, items)
        for kind, items in (("missing", missing), ("unexpected", sorted(unexpected)), ("mis-shaped", mis_shaped))
        if items
    ]
    if problems:
        hint = _prefix_hint(list(entries)) if unexpected and not prefix else ""
        raise ValueError(f"checkpoint {shown} ({used} layout) does not match model {model_name!r}: "
                         + "; ".join(problems) + hint)
    return where, used
