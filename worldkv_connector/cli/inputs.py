"""Bounds on ``worldkv generate``'s inputs, checked before anything is allocated.

Each check raises ``ValueError`` naming the flag, the value and the limit: the trajectory length
(counted from the spec without building it), the size of a ``--poses`` file (read from its header
first), and the chunks of a run against ``MAX_CHUNKS`` and against the host memory that what the
run keeps (latents with ``--output``, records with ``--json``) would take.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from worldkv_connector.machine import available_host_memory

__all__ = ["MAX_TRAJECTORY_FRAMES", "trajectory_frames", "load_poses", "check_run_size"]

MAX_TRAJECTORY_FRAMES = 1_000_000  # 128 MB of float64 poses (checking them takes a few times that)
_RECORD_BYTES = 600  # JSON text of one per-chunk record, with the pose (measured: about 450)
_ROT_DEG_PER_FRAME, _MOVE_FRAMES, _HOLD_FRAMES = 2.0, 24, 12  # poses.parse_trajectory's defaults


def trajectory_frames(spec: str) -> int | None:
    """Poses ``parse_trajectory(spec)`` would build (with its default step sizes), counted without
    building them; None when the spec is malformed (``parse_trajectory`` then names the problem)."""
    if not isinstance(spec, str) or not spec:
        return None
    end = len(spec)
    while end > 0 and (spec[end - 1].isdigit() or spec[end - 1] == "."):
        end -= 1
    ops, number = spec[:end], spec[end:]
    try:
        amount = float(number) if number else 90.0
    except ValueError:
        return None
    if not ops or not math.isfinite(amount) or amount <= 0 or any(ch not in "RLWSAD_" for ch in ops):
        return None
    rot = max(1, math.ceil(amount / _ROT_DEG_PER_FRAME - 1e-9))
    return 1 + sum(rot if ch in "RL" else _MOVE_FRAMES if ch in "WSAD" else _HOLD_FRAMES for ch in ops)


def check_trajectory(spec: str) -> None:
    if spec == "":
        raise ValueError("--trajectory '': expected a trajectory spec such as R_L_R_L_R_L90 (or leave the flag out)")
    frames = trajectory_frames(spec)
    if frames is not None and frames > MAX_TRAJECTORY_FRAMES:
        raise ValueError(f"--trajectory {spec}: makes {frames} poses, allowed at most {MAX_TRAJECTORY_FRAMES} "
                         "(use --num-chunks to make a shorter trajectory last longer: its last pose is held)")


def load_poses(path: str) -> np.ndarray:
    """The array of a ``--poses`` .npy file, after checking its header: [F, 4, 4] with F bounded."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--poses {path}: no such file")
    limit = MAX_TRAJECTORY_FRAMES * 16 * 8 + 4096
    size = p.stat().st_size
    if size > limit:
        raise ValueError(f"--poses {path}: the file has {size} bytes, allowed at most {limit} "
                         f"({MAX_TRAJECTORY_FRAMES} float64 poses [4, 4])")
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header only
        shape = tuple(header.shape)
        del header
    except Exception as exc:  # numpy raises several kinds for a file that is not an .npy array
        raise ValueError(f"--poses {path}: not a numpy .npy array ({exc})") from None
    if len(shape) != 3 or shape[1:] != (4, 4):
        raise ValueError(f"--poses {path} must have shape [F, 4, 4], got {list(shape)}")
    if shape[0] > MAX_TRAJECTORY_FRAMES:
        raise ValueError(f"--poses {path}: {shape[0]} poses, allowed at most {MAX_TRAJECTORY_FRAMES}")
    return np.load(path, allow_pickle=False)


def check_run_size(total_chunks: int, *, latent_bytes_per_chunk: int, keep_latents: bool, keep_records: bool) -> None:
    """Refuse a run whose kept results (latents with --output, records with --json) would not fit
    in half of the host memory available now."""
    per_chunk = (latent_bytes_per_chunk if keep_latents else 0) + (_RECORD_BYTES if keep_records else 0)
    avail = available_host_memory()
    if not per_chunk or avail is None:
        return
    need = total_chunks * per_chunk
    if need > avail // 2:
        what = " and ".join(w for w, on in (("latents (--output)", keep_latents), ("records (--json)", keep_records)) if on)
        raise ValueError(f"--num-chunks: {total_chunks} chunks would keep {need / (1 << 30):.3g} GiB of {what} in "
                         f"memory, more than half of the {avail / (1 << 30):.3g} GiB available; generate fewer chunks "
                         "or leave --output out")
