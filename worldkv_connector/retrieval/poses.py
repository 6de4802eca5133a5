"""Camera poses: validation, chunk means, headings and interpolation (video -> latent frames).

Convention (everything in this package): a pose is a **camera-to-world** 4x4 matrix
``[[R, t], [0, 0, 0, 1]]`` in float64 numpy, with the **OpenCV camera axes**: x right, y down,
z forward. The columns of ``R`` are the camera's axes in world coordinates and ``t`` is the
camera centre. World "up" is ``-y``, so yaw turns about the world y axis and the identity pose
looks along world +z with a level horizon.

Angles: yaw is positive to the right (forward turns towards +x), pitch is positive upwards
(forward turns towards -y). Both are in degrees in the public API.

The scheduler half of the connector holds poses, not tensors, so this module is numpy only.
Trajectories from a spec and from actions are in ``trajectory``.
"""
from __future__ import annotations

import math

import numpy as np

from worldkv_connector.checks import check_int

__all__ = [
    "validate_poses",
    "chunk_mean_pose",
    "chunk_poses",
    "pose_for_frames",
    "resample_video_poses",
    "interpolate_poses",
    "yaw_pitch_degrees",
    "yaw_matrix",
    "pitch_matrix",
    "VAE_TEMPORAL_STRIDE",
]

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
    # one pass for the usual case (every frame a pose); the per-frame checks name the first bad
    # frame when anything is off
    if not np.isfinite(arr).all():
        bad = ~np.isfinite(arr).all(axis=(1, 2))
        raise ValueError(f"{name}[{int(np.argmax(bad))}] contains NaN or inf")
    rot = arr[:, :3, :3]
    det = np.linalg.det(rot)
    err = np.abs(np.swapaxes(rot, 1, 2) @ rot - _EYE3).max(axis=(1, 2))
    if not (np.abs(arr[:, 3, :] - _BOTTOM).max() <= atol and err.max() <= atol and np.abs(det - 1.0).max() <= atol):
        _first_bad_frame(arr, err, det, name, atol)
    return arr


_EYE3 = np.eye(3)
_BOTTOM = np.array([0.0, 0.0, 0.0, 1.0])


def _first_bad_frame(arr: np.ndarray, err: np.ndarray, det: np.ndarray, name: str, atol: float) -> None:
    """Raise the ``ValueError`` of ``validate_poses`` for the first frame that is not a pose.
    arr: finite; err: [F] max |R^T R - I|; det: [F] det(R)."""
    bad = np.abs(arr[:, 3, :] - _BOTTOM).max(axis=1) > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}[{i}] bottom row must be [0, 0, 0, 1], got {arr[i, 3].tolist()}")
    bad = err > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name}[{i}] rotation block is not orthonormal (max |R^T R - I| = {err[i]:.3g} > {atol}): "
            "shear or scale is not a camera pose"
        )
    i = int(np.argmax(np.abs(det - 1.0) > atol))
    raise ValueError(f"{name}[{i}] rotation block has det {det[i]:.6g}, expected +1 (a reflection is not a pose)")


def chunk_mean_pose(poses) -> tuple[np.ndarray, np.ndarray]:
    """Mean pose of a chunk's frames, as the WorldKV reference computes it.

    poses: [F, 4, 4] float (already valid). Returns ``(t [3], R [3, 3])`` float64: the mean
    translation and the element-wise mean of the rotation matrices. ``R`` is deliberately *not*
    re-orthonormalised: the retrieval score of the reference uses this matrix as is.
    """
    arr = np.asarray(poses, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (4, 4) or arr.shape[0] < 1:
        raise ValueError(f"poses must have shape [F, 4, 4] with F >= 1, got {list(arr.shape)}")
    n = arr.shape[0]  # sum / n: the arithmetic of np.mean, without its Python wrapper
    return arr[:, :3, 3].sum(axis=0) / n, arr[:, :3, :3].sum(axis=0) / n


def pose_for_frames(traj, num_frames: int) -> np.ndarray:
    """A trajectory fitted to a rollout of ``num_frames`` frames.

    traj: [F, 4, 4]. Returns [num_frames, 4, 4] float64: the first ``num_frames`` poses, or, when
    the trajectory is shorter than the rollout, the trajectory followed by its last pose held.
    """
    arr = validate_poses(traj, "traj")
    num_frames = check_int("num_frames", num_frames, 1)
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
    frames_per_chunk = check_int("frames_per_chunk", frames_per_chunk, 1)
    arr = validate_poses(poses)
    if num_chunks is None:
        num_chunks = -(-arr.shape[0] // frames_per_chunk)
    else:
        num_chunks = check_int("num_chunks", num_chunks, 1)
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


def _positive(name: str, value, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive {'int' if integer else 'number'}")



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
