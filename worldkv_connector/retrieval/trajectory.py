"""Camera trajectories: the revisit grammar (``"R_L_R_L90"``) and keyboard/mouse action
integration, both giving camera-to-world poses in the convention of ``poses``.

numpy only, like ``poses``.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from worldkv_connector.retrieval.poses import (
    VAE_TEMPORAL_STRIDE, _positive, pitch_matrix, resample_video_poses, validate_poses, yaw_matrix, yaw_pitch_degrees,
)

__all__ = ["parse_trajectory", "trajectory_poses", "integrate_actions", "TRAJECTORY_OPS"]

TRAJECTORY_OPS = "RLWSAD_"
FRAME_CONVENTIONS = ("video", "latent")
DEFAULT_HOLD_FRAMES = 18  # the reference's published runs hold 18 video frames per "_"


# --- trajectory grammar -------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, float | None]:
    """Split ``spec`` into its ops and its trailing number, with errors naming the position."""
    allowed = f"allowed ops are {' '.join(TRAJECTORY_OPS)} followed by an optional positive number (degrees)"
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"trajectory spec must be a non-empty string, got {spec!r}: {allowed}")
    num_start = len(spec)
    while num_start > 0 and (spec[num_start - 1].isdigit() or spec[num_start - 1] == "."):
        num_start -= 1
    ops, number = spec[:num_start], spec[num_start:]
    for pos, ch in enumerate(ops):
        if ch in TRAJECTORY_OPS:
            continue
        if ch.isdigit() or ch == ".":
            raise ValueError(
                f"trajectory {spec!r}: number at position {pos} ({ch!r}) is in the middle; "
                f"the degree amount may only come last ({allowed})"
            )
        if ch == "-" and pos == num_start - 1 and number:
            raise ValueError(f"trajectory {spec!r}: negative amount at position {pos} ({ch!r}): {allowed}")
        raise ValueError(f"trajectory {spec!r}: unknown op {ch!r} at position {pos}: {allowed}")
    if not ops:
        raise ValueError(f"trajectory {spec!r} has no ops: {allowed}")
    if not number:
        return ops, None
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"trajectory {spec!r}: bad number {number!r} at position {num_start}: {allowed}") from None
    if not amount > 0 or not math.isfinite(amount):
        raise ValueError(f"trajectory {spec!r}: amount {number!r} at position {num_start} must be > 0: {allowed}")
    return ops, amount


def parse_trajectory(
    spec: str,
    *,
    deg_per_frame: float = 2.0,
    move_frames: int = 24,
    move_distance: float = 1.0,
    hold_frames: int = DEFAULT_HOLD_FRAMES,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Camera-to-world poses of a revisit trajectory such as ``"R_L_R_L_R_L90"``, one per **video**
    frame (the WorldKV reference's unit; ``trajectory_poses`` resamples them to latent frames).

    Grammar: ops from ``R L W S A D _`` followed by an optional number, the rotation amount in
    degrees used by every ``R``/``L`` (default 90).

    - ``R`` / ``L``: yaw right / left about the world vertical by the amount, in
      ``ceil(amount / deg_per_frame)`` equal steps (90 deg at 2 deg/frame = 45 frames).
    - ``W`` / ``S`` / ``A`` / ``D``: move ``move_distance`` along the camera's forward / back /
      left / right axis in ``move_frames`` equal steps.
    - ``_``: hold the pose for ``hold_frames`` frames.

    Frame counting: frame 0 is ``start`` (identity when omitted) and every op appends one pose
    per step, the op's last frame landing exactly on its target; so
    ``F = 1 + sum(frames of each op)``, e.g. ``"R90"`` gives 46 poses, ``"R_L90"`` gives 109
    (``hold_frames`` 18) and ``"R_L_R_L_R_L90"`` gives 361 = 4 * 90 + 1.

    start: optional [4, 4] camera-to-world pose. Returns [F, 4, 4] float64.
    Raises ``ValueError`` naming the position and character of bad grammar.
    """
    _positive("deg_per_frame", deg_per_frame, integer=False)
    _positive("move_frames", move_frames, integer=True)
    _positive("move_distance", move_distance, integer=False)
    _positive("hold_frames", hold_frames, integer=True)
    ops, amount = _split_spec(spec)
    amount = 90.0 if amount is None else amount
    pose = np.eye(4) if start is None else validate_poses(np.asarray(start)[None], "start")[0]

    out = [pose]
    rot_steps = max(1, math.ceil(amount / deg_per_frame - 1e-9))
    for op in ops:
        base = out[-1]
        if op in "RL":
            sign = 1.0 if op == "R" else -1.0
            for i in range(1, rot_steps + 1):
                p = base.copy()
                p[:3, :3] = yaw_matrix(sign * amount * i / rot_steps) @ base[:3, :3]
                out.append(p)
        elif op in "WSAD":
            axis = {"W": 2, "S": 2, "A": 0, "D": 0}[op]
            sign = 1.0 if op in "WD" else -1.0
            direction = sign * base[:3, axis]  # camera z (forward) or x (right), in world
            for i in range(1, move_frames + 1):
                p = base.copy()
                p[:3, 3] = base[:3, 3] + direction * (move_distance * i / move_frames)
                out.append(p)
        else:  # "_"
            out.extend(base.copy() for _ in range(hold_frames))
    return np.stack(out)


def trajectory_poses(
    spec: str,
    *,
    frames: str = "video",
    frames_per_chunk: int = 3,
    temporal_stride: int = VAE_TEMPORAL_STRIDE,
    **grammar,
) -> np.ndarray:
    """Latent-frame camera poses of a trajectory spec, ready for ``chunk_poses``.

    ``frames="video"`` (the reference's convention): the grammar counts video frames (2 deg per
    frame, W/S/A/D over 24 frames, ``_`` = ``hold_frames``, default 18), resampled to latent frames by
    ``resample_video_poses`` and cut to whole chunks, so ``"R_L_R_L_R_L90"`` (361 video frames, 91
    latent frames) gives 90 latent frames = 30 chunks at 8 degrees per latent frame.
    ``frames="latent"``: the older 1:1 mapping, one grammar frame per latent frame, not cut.
    ``grammar``: keyword arguments of ``parse_trajectory``. Returns [L, 4, 4] float64.
    """
    if frames not in FRAME_CONVENTIONS:
        raise ValueError(f"trajectory frames={frames!r}: choose one of {list(FRAME_CONVENTIONS)}")
    _positive("frames_per_chunk", frames_per_chunk, integer=True)
    poses = parse_trajectory(spec, **grammar)
    if frames == "latent":
        return poses
    latent = resample_video_poses(poses, temporal_stride)
    whole = max(1, latent.shape[0] // frames_per_chunk) * frames_per_chunk
    return latent[:whole] if latent.shape[0] >= whole else latent


# --- action integration -------------------------------------------------------------------

_ACTION_KEYS = ("forward", "strafe", "yaw", "pitch")


def _actions_to_columns(actions) -> np.ndarray:
    """[F, 4] float64 columns (forward, strafe, yaw, pitch) from either accepted form."""
    if isinstance(actions, Mapping):
        unknown = sorted(set(actions) - set(_ACTION_KEYS))
        if unknown or not actions:
            raise ValueError(
                f"actions dict keys {sorted(actions)}: allowed keys are {list(_ACTION_KEYS)} (at least one)"
            )
        cols = {k: np.asarray(v, dtype=np.float64) for k, v in actions.items()}
        for k, v in cols.items():
            if v.ndim != 1:
                raise ValueError(f"actions[{k!r}] must have shape [F], got {list(v.shape)}")
        lengths = {k: v.shape[0] for k, v in cols.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"actions arrays must share one length F, got {lengths}")
        n = next(iter(lengths.values()))
        out = np.stack([cols.get(k, np.zeros(n)) for k in _ACTION_KEYS], axis=1)
    else:
        arr = np.asarray(actions, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 6:
            raise ValueError(f"actions must have shape [F, 6] (W, S, A, D, yaw, pitch), got {list(arr.shape)}")
        out = np.stack([arr[:, 0] - arr[:, 1], arr[:, 3] - arr[:, 2], arr[:, 4], arr[:, 5]], axis=1)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise ValueError(f"actions[{int(np.argmax(bad))}] contains NaN or inf")
    return out


def _horizontal(v: np.ndarray) -> np.ndarray:
    h = np.array([v[0], 0.0, v[2]])
    n = np.linalg.norm(h)
    return h / n if n > 1e-12 else h


def integrate_actions(
    actions,
    start: np.ndarray | None = None,
    *,
    move_speed: float = 1.0 / 24,
    yaw_speed: float = 1.0,
    pitch_speed: float = 1.0,
    max_pitch: float = 89.0,
) -> np.ndarray:
    """Integrate keyboard/mouse actions (as Matrix-Game-2.0-style models take) into poses.

    actions: either ``[F, 6]`` numbers per frame ``(W, S, A, D, yaw, pitch)`` where W/S/A/D are
    0/1 (bools work) and yaw/pitch are mouse deltas, or a dict of ``[F]`` arrays with keys
    ``forward`` (+1 = W, -1 = S), ``strafe`` (+1 = right), ``yaw`` and ``pitch`` (missing keys
    are zero). Per frame: yaw turns ``yaw * yaw_speed`` degrees (positive right) about the world
    vertical, pitch turns ``pitch * pitch_speed`` degrees (positive up), the absolute pitch
    clamped to ``+-max_pitch``; then the camera walks ``move_speed`` world units per unit of
    forward/strafe along its *horizontal* heading (a walking camera, not a flying one).

    start: optional [4, 4] pose (identity when omitted); its roll is kept. Returns
    [F + 1, 4, 4] float64, frame 0 = ``start``, frame ``i + 1`` = after action ``i``.
    """
    for name, value in (("move_speed", move_speed), ("yaw_speed", yaw_speed), ("pitch_speed", pitch_speed)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: expected a finite number")
    if not (isinstance(max_pitch, (int, float)) and 0 <= max_pitch <= 90):
        raise ValueError(f"max_pitch={max_pitch!r}: allowed 0 <= max_pitch <= 90")
    cols = _actions_to_columns(actions)
    pose0 = np.eye(4) if start is None else validate_poses(np.asarray(start)[None], "start")[0]
    # Express every frame relative to the start: R_i = Yaw(dyaw) @ R0 @ Pitch(dpitch). For a
    # roll-free start R0 = Yaw(y0) @ Pitch(p0) this is exactly Yaw(y0 + dyaw) @ Pitch(p0 + dpitch).
    _, p0 = yaw_pitch_degrees(pose0[None])
    p0 = float(p0[0])
    dyaw = dpitch = 0.0
    pos = pose0[:3, 3].copy()
    out = [pose0]
    for fwd, strafe, yaw, pitch in cols:
        dyaw += yaw * yaw_speed
        # clamp the absolute pitch, stored as a delta from the start's pitch
        dpitch = float(np.clip(p0 + dpitch + pitch * pitch_speed, -max_pitch, max_pitch)) - p0
        rot = yaw_matrix(dyaw) @ pose0[:3, :3] @ pitch_matrix(dpitch)
        pos = pos + move_speed * (fwd * _horizontal(rot[:, 2]) + strafe * _horizontal(rot[:, 0]))
        p = np.eye(4)
        p[:3, :3], p[:3, 3] = rot, pos
        out.append(p)
    return np.stack(out)
