"""``worldkv bank``: save, load, inspect and verify a persisted world memory (a saved bank).

    worldkv bank save PATH --model tiny --trajectory R_L_R_L_R_L90 --num-chunks 8
    worldkv bank info PATH
    worldkv bank verify PATH          # exit 0 when every checksum matches, 1 otherwise
    worldkv bank load PATH --model tiny

``save`` rolls a trajectory out and saves the chunks it banked. With ``--source engine`` it runs the
video backend with the WorldKV connector (real model KV, random weights unless ``--checkpoint``);
``--source synthetic`` compresses random K/V per chunk through the core (``compress_chunk`` + a
``Bank``), which needs no model; ``auto`` (default) uses the engine when the WorldKV connector is
installed and says so when it falls back.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

__all__ = ["register"]

logger = logging.getLogger(__name__)

DEFAULT_TRAJECTORY = "R_L_R_L_R_L90"
_MiB = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bank", help="save, load, inspect and verify a saved world memory (bank)",
                       description="Persisted banks: a directory with manifest.json and one safetensors file.")
    what = p.add_subparsers(dest="bank_command", metavar="ACTION", required=True)

    info = what.add_parser("info", help="print a saved bank's manifest summary",
                           description="Print entries, bytes, KV shape and config fingerprint of a saved bank.")
    info.add_argument("path", metavar="PATH", help="directory of the saved bank")
    info.add_argument("--entries", action="store_true", help="also list every entry (key, tokens, bytes, sha256)")
    info.set_defaults(func=_info)

    verify = what.add_parser("verify", help="check every entry's checksum (exit 0 intact, 1 damaged)",
                             description="Recompute every entry's sha256 and compare with the manifest.")
    verify.add_argument("path", metavar="PATH", help="directory of the saved bank")
    verify.set_defaults(func=_verify)

    save = what.add_parser("save", help="roll a trajectory out and save the banked chunks",
                           description="Roll out a camera trajectory and save the chunks the WorldKV bank holds.")
    save.add_argument("path", metavar="PATH", help="directory to write (created; a bank saved there is replaced)")
    _model_arguments(save, saving=True)
    save.add_argument("--trajectory", default=DEFAULT_TRAJECTORY,
                      help=f"revisit trajectory spec (default {DEFAULT_TRAJECTORY})")
    save.add_argument("--num-chunks", type=int, default=8, help="chunks to generate (default 8)")
    save.add_argument("--session-id", default="s0", help="session id of the rollout; bank keys are (id, chunk) (default s0)")
    save.add_argument("--seed", type=int, default=0, help="seed of the weights / synthetic K/V and the noise (default 0)")
    save.add_argument("--source", choices=("auto", "engine", "synthetic"), default="auto",
                      help="engine: video backend + WorldKV connector; synthetic: random K/V compressed through "
                      "the core, no model; auto: engine when the connector is available (default auto)")
    save.add_argument("--device", default="cpu", help="device of the engine rollout: cpu, cuda or cuda:N (default cpu)")
    save.add_argument("--checkpoint", metavar="PATH.safetensors", help="model weights for the engine rollout "
                      "(default: random weights from --seed)")
    save.set_defaults(func=_save)

    load = what.add_parser("load", help="load a saved bank into a fresh bank and print what it holds",
                           description="Verify a saved bank against a model's KV shape and a connector config, "
                           "load it into a fresh bank and list its entries.")
    load.add_argument("path", metavar="PATH", help="directory of the saved bank")
    _model_arguments(load)
    load.set_defaults(func=_load)


def _model_arguments(p: argparse.ArgumentParser, *, saving: bool = False) -> None:
    p.add_argument("--model", default="tiny",
                   help="model whose KV shape the bank holds: tiny, small, wan-1.3b, matrix-game-2, lingbot-fast "
                   "(default tiny)")
    if saving:
        p.add_argument("--kv-connector-config", metavar="JSON",
                       help="WorldKV connector config of the rollout as JSON (default: the defaults, with bank_bytes "
                       "sized to hold every chunk); its fingerprint is recorded in the bank")
    else:
        p.add_argument("--kv-connector-config", metavar="JSON",
                       help="WorldKV connector config as JSON, as given to the engine (default: the defaults); "
                       "its fingerprint (frames_per_chunk, keep_ratio, pooled, page_size) must match the bank's")


def _kv_shape(model: str):
    from worldkv_connector.integration.video.model_config import get_model_config

    return get_model_config(model).kv_shape()


def _check_bank_path(path: str, *, saving: bool = False) -> None:
    """A bank path must name a directory: not empty, not an existing file (and, to save, free of a
    concurrent saver: checked again under the lock when the save writes)."""
    if not path or not path.strip():
        raise ValueError(f"PATH {path!r}: expected a bank directory")
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"PATH {path}: is a file, expected a bank directory")
    if saving:
        from worldkv_connector.bank.persist import bank_lock

        with bank_lock(path):  # a second concurrent saver fails here, before its rollout
            pass


# --- info / verify ------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    from worldkv_connector.bank.persist import decode_key, read_manifest

    _check_bank_path(args.path)
    m = read_manifest(args.path)
    data = Path(args.path) / m["data_file"]
    s = m["kv_shape"]
    rows = [
        ("format", f"{m['format']} v{m['version']}"),
        ("entries", str(len(m["entries"]))),
        ("payload", f"{m.get('total_bytes', 0) / _MiB:.3f} MiB"),
        ("data file", f"{m['data_file']} ({data.stat().st_size / _MiB:.3f} MiB)" if data.is_file() else f"{m['data_file']} (MISSING)"),
        ("kv shape", f"{s.get('num_layers')} layers x {s.get('num_kv_heads')} heads x {s.get('head_dim')} dim, "
                     f"{s.get('dtype')}, {s.get('frame_tokens')} tokens/frame"),
        ("fingerprint", m["fingerprint"]),
        ("session", str(m.get("session_id"))),
    ]
    for k, v in sorted((m.get("extra") or {}).items()):
        rows.append((f"extra {k}", json.dumps(v)))
    width = max(len(k) for k, _ in rows)
    print(f"worldkv bank: {args.path}")
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.entries:
        print(f"{'key':<24} {'tokens':>6} {'bytes':>10}  sha256")
        for rec in m["entries"]:
            print(f"{str(decode_key(rec['key'])):<24} {rec['num_tokens']:>6} {rec['nbytes']:>10}  {rec['sha256'][:16]}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from worldkv_connector.bank.persist import read_manifest, verify_bank

    _check_bank_path(args.path)
    try:
        n = len(read_manifest(args.path)["entries"])  # no bank here: FileNotFoundError, exit 2
    except ValueError as exc:  # the manifest itself is damaged: the same report as a bad entry
        print(f"DAMAGED: {exc}")
        print(f"FAILED: {args.path}: the manifest is not valid")
        return 1
    problems = verify_bank(args.path)
    if not problems:
        print(f"OK: {args.path}: all {n} entries match their sha256")
        return 0
    for problem in problems:
        print(f"DAMAGED: {problem}")
    print(f"FAILED: {args.path}: {len(problems)} problem(s) in {n} entries")
    return 1


# --- save -----------------------------------------------------------------------------------------
def _save(args: argparse.Namespace) -> int:
    from worldkv_connector.config import WorldKVConfig
    from worldkv_connector.retrieval.trajectory import trajectory_poses

    if not isinstance(args.num_chunks, int) or args.num_chunks < 1:
        raise ValueError(f"--num-chunks {args.num_chunks}: expected an int >= 1")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed}: expected an int >= 0")
    if not args.session_id:
        raise ValueError("--session-id: expected a non-empty string")
    from worldkv_connector.integration.video.engine_args import MAX_CHUNKS

    if args.num_chunks > MAX_CHUNKS:
        raise ValueError(f"--num-chunks {args.num_chunks}: allowed at most {MAX_CHUNKS}")
    _check_bank_path(args.path, saving=True)
    config = WorldKVConfig.from_json(args.kv_connector_config)
    shape = _kv_shape(args.model)  # bad inputs fail before anything runs
    if "bank_bytes" not in json.loads(args.kv_connector_config or "{}"):
        # room for every chunk of the rollout (and the retrieval window) and no more
        slots = max(args.num_chunks, config.retrieval_chunks + 1)
        config = config.replace(bank_bytes=slots * shape.chunk_bytes(config.kept_tokens(shape.frame_tokens)))
    frames = trajectory_poses(args.trajectory)  # video frames resampled to latent frames
    source = args.source
    if source == "auto":
        source = "engine" if _connector_available() else "synthetic"
        if source == "synthetic":
            print("note: the WorldKV connector is not available in this build: saving a synthetic rollout "
                  "(random K/V compressed through the core)")
    extra = {"source": source, "model": args.model, "trajectory": args.trajectory,
             "num_chunks": args.num_chunks, "seed": args.seed}
    if source == "engine":
        manifest = _save_engine(args, config, frames, extra)
    else:
        manifest = _save_synthetic(args, config, shape, frames, extra)
    print(f"saved {len(manifest['entries'])} entries ({manifest['total_bytes'] / _MiB:.3f} MiB) of session "
          f"{args.session_id!r} to {args.path} (source {source}, fingerprint {manifest['fingerprint']})")
    return 0


def _connector_available() -> bool:
    from worldkv_connector.connector.api import get_connector_class

    try:
        get_connector_class("worldkv")
    except ValueError:
        return False
    return True


def _save_synthetic(args, config, shape, frames: np.ndarray, extra: dict) -> dict:
    from worldkv_connector.bank import Bank
    from worldkv_connector.compression import compress_chunk
    from worldkv_connector.bank.persist import save_bank
    from worldkv_connector.retrieval.poses import chunk_poses

    kept = config.kept_tokens(shape.frame_tokens)
    poses = chunk_poses(frames, shape.frames_per_chunk, args.num_chunks)  # [C, F, 4, 4]
    gen = torch.Generator().manual_seed(args.seed)
    tokens = shape.frames_per_chunk * shape.frame_tokens
    # one slot per chunk, no disk tier: the rollout is what gets saved
    sized = config.replace(bank_bytes=max(config.bank_bytes, args.num_chunks * shape.chunk_bytes(kept)), bank_dir=None)
    with Bank.for_shape(shape, sized) as bank:
        for c in range(args.num_chunks):
            # k, v: [L, T, H, D] fp32 noise, cast to the model's KV dtype
            k, v = (torch.randn(shape.num_layers, tokens, shape.num_kv_heads, shape.head_dim, generator=gen)
                    .to(shape.torch_dtype) for _ in range(2))
            cc = compress_chunk(k, v, frame_tokens=shape.frame_tokens, keep_ratio=config.keep_ratio, pooled=config.pooled)
            key = (args.session_id, c)
            bank.reserve(key, cc.num_tokens, indices=cc.indices, pose=poses[c], meta={"chunk_index": c})
            view = bank.view(key)  # [L, 2, T', H, D]
            view[:, 0].copy_(cc.k)
            view[:, 1].copy_(cc.v)
            bank.mark_ready(key)
        return save_bank(bank, args.path, session_id=args.session_id, config=config, kv_shape=shape, extra=extra)


def _save_engine(args, config, frames: np.ndarray, extra: dict) -> dict:
    from worldkv_connector.integration.video.engine import VideoEngine
    from worldkv_connector.integration.video.engine_args import EngineArgs

    engine_args = EngineArgs(model=args.model, device=args.device, seed=args.seed, checkpoint=args.checkpoint,
                             kv_connector="worldkv", kv_connector_config=config.to_json())
    sid = args.session_id
    with VideoEngine(engine_args) as engine:
        connector = engine.connector
        if not hasattr(connector, "save_bank"):
            raise ValueError("the WorldKV connector of this build cannot save its bank: use --source synthetic")
        # the session's entries must outlive its end, which would otherwise free them
        connector.retain_finished_sessions = True
        engine.add_session(sid, poses=frames, num_chunks=args.num_chunks, seed=args.seed)
        engine.run()
        # waits for the stores in flight; entries carry their frame poses for retrieval on resume
        manifest = connector.save_bank(args.path, session_id=sid, extra=extra)
    if not manifest["entries"]:
        raise ValueError(f"the rollout banked no chunk of session {sid!r}: nothing was saved worth loading")
    return manifest


# --- load -----------------------------------------------------------------------------------------
def _load(args: argparse.Namespace) -> int:
    from worldkv_connector.bank import Bank
    from worldkv_connector.config import WorldKVConfig
    from worldkv_connector.bank.persist import load_bank, read_manifest

    _check_bank_path(args.path)
    manifest = read_manifest(args.path)
    config = WorldKVConfig.from_json(args.kv_connector_config)
    shape = _kv_shape(args.model)
    if "bank_bytes" in json.loads(args.kv_connector_config or "{}"):
        sized = config.replace(bank_dir=None)  # the capacity asked for: load refuses a bank that does not fit
    else:
        n = max(1, len(manifest["entries"]))
        sized = config.replace(bank_bytes=n * shape.chunk_bytes(config.kept_tokens(shape.frame_tokens)), bank_dir=None)
    with Bank.for_shape(shape, sized) as bank:
        keys = load_bank(args.path, bank, config=config, kv_shape=shape)
        print(f"loaded {len(keys)} entries ({bank.bytes_used / _MiB:.3f} MiB) from {args.path} into a "
              f"{args.model} bank of {bank.num_slots} slots x {bank.slot_bytes} B")
        print(f"{'key':<24} {'tokens':>6} {'bytes':>10}  {'position (x, y, z)':<28} meta")
        for key in keys:
            e = bank.get(key)
            pos = "-"
            if e.pose is not None:
                t = np.asarray(e.pose).reshape(-1, 4, 4)[:, :3, 3].mean(axis=0)
                pos = "(" + ", ".join(f"{x:.2f}" for x in t) + ")"
            print(f"{str(key):<24} {e.num_tokens:>6} {e.nbytes:>10}  {pos:<28} {json.dumps(e.meta)}")
    return 0
