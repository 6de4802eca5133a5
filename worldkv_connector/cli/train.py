"""``worldkv train world``: train the world model on the procedural panorama world (worldkv_connector/world)
and write its safetensors weights plus a manifest (config, seed, steps, final loss, sha256)."""
from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    from worldkv_connector.world.train import TrainConfig
    from worldkv_connector.world.trajectories import TrajectoryConfig

    d = TrainConfig()
    parser = sub.add_parser("train", help="train a model (world: the world model on the panorama world)",
                            description="Train a model from scratch, reproducibly (config, seed, world version).")
    what = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = what.add_parser("world", help="the world model on the panorama world",
                        description="Flow matching with teacher forcing (clean stream + query stream, full context). "
                        "Prints the loss curve; writes OUT.safetensors and OUT.json.")
    p.add_argument("--out", required=True, metavar="PATH", help="weights file to write (.safetensors); the manifest "
                   "goes beside it with .json")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"trajectories per step (default {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate, cosine decay (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights and data (default {d.seed})")
    p.add_argument("--trajectory-chunks", type=int, default=TrajectoryConfig().chunks,
                   help=f"chunks per training trajectory (default {TrajectoryConfig().chunks}); longer trajectories "
                   "teach the model to pick its memory out of longer contexts")
    p.add_argument("--model", default=d.model, help=f"named model config (default {d.model})")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"steps per loss line (default {d.log_every})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; more is slower on 2 cores)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from worldkv_connector.integration.video.model_config import get_model_config
    from worldkv_connector.world.train import TrainConfig, save_trained, train
    from worldkv_connector.world.trajectories import TrajectoryConfig

    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r}: expected a path ending in .safetensors")
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected >= 1")
    tc = TrainConfig(model=args.model, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                     log_every=args.log_every, warmup=min(TrainConfig().warmup, max(0, args.steps // 10)))
    torch.set_num_threads(args.threads)
    print(f"training {tc.model} on the panorama world: {tc.steps} steps, batch {tc.batch} x {args.trajectory_chunks} "
          f"chunks, seed {tc.seed}, "
          f"{args.threads} thread(s)", flush=True)

    def on_log(step: int, loss: float, elapsed: float) -> None:
        eta = elapsed / step * (tc.steps - step)
        print(f"step {step:5d}/{tc.steps}  loss {loss:.4f}  {elapsed:7.1f} s  eta {eta:6.0f} s", flush=True)

    traj = TrajectoryConfig(chunks=args.trajectory_chunks, frames_per_chunk=get_model_config(tc.model).frames_per_chunk)
    model, record = train(tc, traj=traj, on_log=on_log)
    manifest = save_trained(model, record, args.out)
    print(f"final loss {record['final_loss']:.4f} after {tc.steps} steps in {record['train_seconds']} s; "
          f"wrote {args.out} and {manifest}", file=sys.stdout)
    return 0
