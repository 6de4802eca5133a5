"""``worldkv convert``: rewrite a checkpoint in the upstream (Wan original) key layout as one safetensors file.

    worldkv convert diffusion_pytorch_model.safetensors wan.safetensors --model wan-1.3b
    worldkv convert self_forcing_dmd.pt sf.safetensors --checkpoint-key generator_ema --checkpoint-prefix model.

Reads what ``worldkv generate --checkpoint`` reads (safetensors file or shard directory, ``.pt``/``.pth``
via ``torch.load(weights_only=True)``, the diffusers / FastVideo layout); with ``--model`` the keys and
shapes are checked against that model first (one error listing every mismatch), and nothing is written
on a mismatch.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint (.pt, diffusers layout, shards) as one Wan-layout "
                       ".safetensors file", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint: .safetensors, a directory of .safetensors shards, or .pt/.pth")
    p.add_argument("output", help="output .safetensors path (Wan key layout)")
    p.add_argument("--checkpoint-key", metavar="ENTRY", help="entry of a .pt/.pth file holding the weights "
                   "(e.g. generator_ema); default: the file's only state dict")
    p.add_argument("--checkpoint-prefix", metavar="PREFIX", default="", help="prefix stripped from every key "
                   "(e.g. model.); default none")
    p.add_argument("--layout", choices=("auto", "wan", "diffusers"), default="auto",
                   help="key layout of the source (default auto: detected from the key names)")
    p.add_argument("--model", help="named model config whose keys and shapes the result must match "
                   "(default: not checked)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from worldkv_connector.integration.video.checkpoint import match_checkpoint, read_checkpoint
    from worldkv_connector.integration.video.checkpoint_layouts import convert_keys

    if not args.output.endswith(".safetensors"):
        raise ValueError(f"output {args.output}: expected a .safetensors path")
    if Path(args.output).resolve() == Path(args.source).resolve():
        raise ValueError(f"output {args.output}: must differ from the source")
    entries = read_checkpoint(args.source, args.checkpoint_key)
    prefix = args.checkpoint_prefix
    if args.model:
        from worldkv_connector.integration.video.models import build_model_on

        model = build_model_on(args.model, "meta")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        where, used = match_checkpoint(entries, expected, args.model, args.source, prefix, args.layout)
    else:
        if prefix and any(not k.startswith(prefix) for k in entries):
            bad = next(k for k in entries if not k.startswith(prefix))
            raise ValueError(f"--checkpoint-prefix {prefix!r}: key {bad!r} does not start with it")
        wan, used = convert_keys([k[len(prefix):] for k in entries], args.layout)
        where = {wk: prefix + sk for wk, sk in wan.items()}
    tensors = {wk: entries[ck].load().contiguous() for wk, ck in where.items()}
    meta = {"format": "pt", "converted_from": Path(args.source).name, "source_layout": used}
    if args.model:
        meta["model"] = args.model
    save_file(tensors, args.output, metadata=meta)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {args.output}: {len(tensors)} tensors, {total / (1 << 20):.1f} MiB, from the {used} layout "
          f"({json.dumps(Path(args.source).name)})")
    return 0
