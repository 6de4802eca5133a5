"""Camera poses: validation, chunk means, revisit trajectories and action integration.

Convention (everything in this package): a pose is a **camera-to-world** 4x4 matrix
``[[R, t], [0, 0, 0, 1]]`` in float64 numpy, with the **OpenCV camera axes**: x right, y down,
z forward. The columns of ``R`` are the camera's axes in world coordinates and ``t`` is the
camera centre. World "up" is ``-y``, so yaw turns about the world y axis and the identity pose
looks along world +z with a level horizon.

Angles: yaw is positive to the right (forward turns towards +x), pitch is positive upwards
(forward turns towards -y). Both are in degrees in the public API.

The scheduler half of the connector holds poses, not tensors, so this module is numpy only.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = [
    "validate_poses",
    "chunk_mean_pose",
    "chunk_poses",
    "pose_for_frames",
    "parse_trajectory",
    "trajectory_poses",
    "resample_video_poses",
    "interpolate_poses",
    "integrate_actions",
    "yaw_pitch_degrees",
    "yaw_matrix",
    "pitch_matrix",
    "TRAJECTORY_OPS",
]

TRAJECTORY_OPS = "RLWSAD_"
FRAME_CONVENTIONS = ("video", "latent")
DEFAULT_HOLD_FRAMES = 18  # the reference's published runs hold 18 video frames per "_"
VAE_TEMPORAL_STRIDE = 4  # Wan VAE: 4n+1 video frames <-> n+1 latent frames


def _axis_rotation(degrees, i: int, j: int, sign: float) -> np.ndarray:
    a = np.radians(np.asarray(degrees, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(a.shape + (3, 3))
    k = 3 - i - j  # the rotation axis
    out[..., k, k] = 1.0
    out[..., i, i] = c
    out[..., j, j] = c
    out[..., i, j] = sign * s
    out[..., j, i] = -sign * s
    return out


def yaw_matrix(degrees) -> np.ndarray:
    """Rotation about world y (down): positive turns forward (+z) towards +x (right).
    degrees: scalar -> [3, 3], or [N] -> [N, 3, 3]."""
    return _axis_rotation(degrees, 0, 2, 1.0)


def pitch_matrix(degrees) -> np.ndarray:
    """Rotation about camera x (right): positive turns forward (+z) towards -y (up).
    degrees: scalar -> [3, 3], or [N] -> [N, 3, 3]."""
    return _axis_rotation(degrees, 1, 2, -1.0)


def validate_poses(poses, name: str = "poses", *, atol: float = 1e-4) -> np.ndarray:
    """Check camera-to-world poses and return them as a float64 copy.

    poses: [F, 4, 4] (F >= 1), any real dtype, numpy array or anything ``np.asarray`` takes.
    Rejects (``ValueError`` naming ``name`` and the first bad frame): a wrong shape, NaN/inf,
    a bottom row other than [0, 0, 0, 1], a 3x3 block that is not a rotation
    (``|R^T R - I| > atol`` or ``det(R) != +1``, i.e. shear, scale or a reflection).
    """
    try:
        arr = np.array(poses, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric [F, 4, 4] array: {exc}") from None
    if arr.ndim != 3 or arr.shape[1:] != (4, 4) or arr.shape[0] < 1:
        raise ValueError(f"{name} must have shape [F, 4, 4] with F >= 1, got {list(arr.shape)}")
    bad = ~np.isfinite(arr).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{name}[{int(np.argmax(bad))}] contains NaN or inf")
    bad = np.abs(arr[:, 3, :] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=1) > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}[{i}] bottom row must be [0, 0, 0, 1], got {arr[i, 3].tolist()}")
    rot = arr[:, :3, :3]
    err = np.abs(np.swapaxes(rot, 1, 2) @ rot - np.eye(3)).max(axis=(1, 2))
    bad = err > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name}[{i}] rotation block is not orthonormal (max |R^T R - I| = {err[i]:.3g} > {atol}): "
            "shear or scale is not a camera pose"
        )
    det = np.linalg.det(rot)
    bad = np.abs(det - 1.0) > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}[{i}] rotation block has det {det[i]:.6g}, expected +1 (a reflection is not a pose)")
    return arr


def chunk_mean_pose(poses) -> tuple[np.ndarray, np.ndarray]:
    """Mean pose of a chunk's frames, as the WorldKV reference computes it.

    poses: [F, 4, 4] float (already valid). Returns ``(t [3], R [3, 3])`` float64: the mean
    translation and the element-wise mean of the rotation matrices. ``R`` is deliberately *not*
    re-orthonormalised: the retrieval score of the reference uses this matrix as is.
    """
    arr = np.asarray(poses, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (4, 4) or arr.shape[0] < 1:
        raise ValueError(f"poses must have shape [F, 4, 4] with F >= 1, got {list(arr.shape)}")
    return arr[:, :3, 3].mean(axis=0), arr[:, :3, :3].mean(axis=0)


def pose_for_frames(traj, num_frames: int) -> np.ndarray:
    """A trajectory fitted to a rollout of ``num_frames`` frames.

    traj: [F, 4, 4]. Returns [num_frames, 4, 4] float64: the first ``num_frames`` poses, or, when
    the trajectory is shorter than the rollout, the trajectory followed by its last pose held.
    """
    arr = validate_poses(traj, "traj")
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}: expected an int >= 1")
    if arr.shape[0] >= num_frames:
        return arr[:num_frames].copy()
    pad = np.repeat(arr[-1:], num_frames - arr.shape[0], axis=0)
    return np.concatenate([arr, pad], axis=0)


def chunk_poses(poses, frames_per_chunk: int = 3, num_chunks: int | None = None) -> np.ndarray:
    """Split per-frame poses into chunks: chunk ``c`` holds frames ``[c*fpc, (c+1)*fpc)``.

    poses: [F, 4, 4]. Returns [C, frames_per_chunk, 4, 4] float64 with
    ``C = num_chunks`` or, when omitted, ``ceil(F / frames_per_chunk)``. Frames missing at the end
    (a trajectory shorter than the rollout) repeat the last pose; extra frames are dropped.
    """
    if not isinstance(frames_per_chunk, int) or isinstance(frames_per_chunk, bool) or frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk={frames_per_chunk!r}: expected an int >= 1")
    arr = validate_poses(poses)
    if num_chunks is None:
        num_chunks = -(-arr.shape[0] // frames_per_chunk)
    elif not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks!r}: expected an int >= 1 or None")
    fitted = pose_for_frames(arr, num_chunks * frames_per_chunk)
    return fitted.reshape(num_chunks, frames_per_chunk, 4, 4)


def yaw_pitch_degrees(poses) -> tuple[np.ndarray, np.ndarray]:
    """Heading of each pose. poses: [F, 4, 4]. Returns ``(yaw [F], pitch [F])`` in degrees:
    yaw in (-180, 180], 0 = looking along world +z, positive = right; pitch positive = up."""
    arr = np.asarray(poses, dtype=np.float64)
    fwd = arr[:, :3, 2]  # camera z axis in world
    yaw = np.degrees(np.arctan2(fwd[:, 0], fwd[:, 2]))
    pitch = np.degrees(np.arcsin(np.clip(-fwd[:, 1], -1.0, 1.0)))
    return yaw, pitch


# --- trajectory grammar -------------------------------------------------------------------


def _positive(name: str, value, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive {'int' if integer else 'number'}")


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


# --- video frames -> latent frames ---------------------------------------------------------


def _rot_log(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector [3] of a rotation [3, 3] (angle in [0, pi])."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if angle < 1e-9:
        return axis / 2.0
    if math.pi - angle < 1e-6:  # near pi the antisymmetric part vanishes: axis from R + I
        m = (r + np.eye(3)) / 2.0
        a = m[:, int(np.argmax(np.diag(m)))]
        return angle * a / np.linalg.norm(a)
    return angle * axis / (2.0 * math.sin(angle))


def _rot_exp(w: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(w))
    if angle < 1e-12:
        return np.eye(3)
    k = w / angle
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * kx + (1.0 - math.cos(angle)) * (kx @ kx)


def interpolate_poses(poses, positions) -> np.ndarray:
    """Poses at fractional frame positions: translation linear, rotation slerp (geodesic).

    poses: [F, 4, 4] valid camera-to-world; positions: [N] floats in [0, F - 1]. Returns [N, 4, 4].
    """
    arr = validate_poses(poses)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 1 or not np.isfinite(pos).all() or (pos < 0).any() or (pos > arr.shape[0] - 1).any():
        raise ValueError(f"positions must be [N] finite floats in [0, {arr.shape[0] - 1}], got {pos.tolist()[:8]}")
    out = np.empty((pos.shape[0], 4, 4))
    for n, x in enumerate(pos):
        i = min(int(math.floor(x)), arr.shape[0] - 2) if arr.shape[0] > 1 else 0
        s = x - i
        if arr.shape[0] == 1 or s <= 1e-12:
            out[n] = arr[i]
            continue
        a, b = arr[i], arr[i + 1]
        out[n] = np.eye(4)
        out[n, :3, :3] = a[:3, :3] @ _rot_exp(s * _rot_log(a[:3, :3].T @ b[:3, :3]))
        out[n, :3, 3] = (1.0 - s) * a[:3, 3] + s * b[:3, 3]
    return out


def resample_video_poses(video_poses, temporal_stride: int = VAE_TEMPORAL_STRIDE) -> np.ndarray:
    """Video-frame poses -> latent-frame poses as the WorldKV reference resamples them.

    video_poses: [N, 4, 4]. The VAE maps ``4n+1`` video frames to ``n+1`` latent frames, so
    ``L = (N - 1) // temporal_stride + 1`` latent frames sit evenly over the whole trajectory, at
    video positions ``j * (N - 1) / (L - 1)`` (exactly ``4j`` when ``N = 4n+1``); between two
    video frames the translation is interpolated linearly and the rotation by slerp.
    Returns [L, 4, 4] float64.
    """
    _positive("temporal_stride", temporal_stride, integer=True)
    arr = validate_poses(video_poses, "video_poses")
    n = arr.shape[0]
    latent = (n - 1) // temporal_stride + 1
    if latent == 1:
        return arr[:1].copy()
    return interpolate_poses(arr, np.linspace(0.0, n - 1.0, latent))


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

