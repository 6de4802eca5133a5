"""Matrix-Game-2 action inputs: the ``--actions`` file format and the camera poses its keyboard and mouse
inputs integrate to (what the connector retrieves by: the paper's action-based retrieval). numpy only."""
from __future__ import annotations

import numpy as np

from worldkv_connector.retrieval.poses import VAE_TEMPORAL_STRIDE, _positive, resample_video_poses
from worldkv_connector.retrieval.trajectory import integrate_actions

__all__ = ["MOUSE_DEGREES", "action_poses", "load_actions"]

MOUSE_DEGREES = 20.0  # degrees per unit of Matrix-Game-2's mouse input (its UI's 0.1 per frame = 2 deg/frame)


def _action_arrays(keyboard, mouse) -> tuple[np.ndarray, np.ndarray]:
    kb = np.asarray(keyboard, dtype=np.float64)
    ms = np.asarray(mouse, dtype=np.float64)
    if kb.ndim != 2 or kb.shape[1] != 4 or kb.shape[0] < 1:
        raise ValueError(f"keyboard actions must have shape [N, 4] (W, S, A, D per video frame), got {list(kb.shape)}")
    if ms.shape != (kb.shape[0], 2):
        raise ValueError(f"mouse actions must have shape [{kb.shape[0]}, 2] (pitch, yaw per video frame), got {list(ms.shape)}")
    for name, arr in (("keyboard", kb), ("mouse", ms)):
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            raise ValueError(f"{name} actions[{int(np.argmax(bad))}] contain NaN or inf")
    return kb, ms


def action_poses(keyboard, mouse, *, mouse_degrees: float = MOUSE_DEGREES, move_speed: float = 1.0 / 24,
                 temporal_stride: int = VAE_TEMPORAL_STRIDE, frames_per_chunk: int = 3) -> np.ndarray:
    """Latent-frame camera poses of Matrix-Game-2 actions, for pose retrieval (the paper's action-based
    retrieval).

    keyboard: [N, 4] per video frame (W, S, A, D, 0/1); mouse: [N, 2] per video frame (pitch, yaw; yaw
    positive right, pitch positive up), ``mouse_degrees`` degrees per unit. Video frame 0 is the start
    pose and action ``i`` moves the camera from frame ``i`` to ``i + 1`` (``integrate_actions``); the N
    video-frame poses are resampled to latent frames and cut to whole chunks like ``trajectory_poses``.
    Returns [L, 4, 4] float64.
    """
    kb, ms = _action_arrays(keyboard, mouse)
    _positive("mouse_degrees", mouse_degrees, integer=False)
    video = integrate_actions({"forward": kb[:, 0] - kb[:, 1], "strafe": kb[:, 3] - kb[:, 2],
                               "yaw": ms[:, 1] * mouse_degrees, "pitch": ms[:, 0] * mouse_degrees},
                              move_speed=move_speed)[: kb.shape[0]]
    latent = resample_video_poses(video, temporal_stride)
    whole = max(1, latent.shape[0] // frames_per_chunk) * frames_per_chunk
    return latent[:whole] if latent.shape[0] >= whole else latent


def load_actions(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an actions file: ``.npy`` float [N, 6] per video frame ``(W, S, A, D, mouse_pitch, mouse_yaw)``,
    or ``.json`` ``{"keyboard": [[W, S, A, D], ...], "mouse": [[pitch, yaw], ...]}`` (N entries each).
    Returns (keyboard [N, 4], mouse [N, 2]) float64. Errors name the file and what is allowed."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--actions {path}: no such file")
    if p.suffix == ".npy":
        try:
            arr = np.load(str(p), allow_pickle=False)
        except Exception as exc:  # numpy raises several kinds for a file that is not an .npy array
            raise ValueError(f"--actions {path}: not a numpy .npy array ({exc})") from None
        if arr.ndim != 2 or arr.shape[1] != 6:
            raise ValueError(f"--actions {path}: expected [N, 6] (W, S, A, D, mouse_pitch, mouse_yaw) per video "
                             f"frame, got {list(arr.shape)}")
        return _action_arrays(arr[:, :4], arr[:, 4:])
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--actions {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or set(data) - {"keyboard", "mouse"} or "keyboard" not in data:
            raise ValueError(f"--actions {path}: expected an object with keys 'keyboard' ([N, 4]) and 'mouse' ([N, 2])")
        kb = data["keyboard"]
        return _action_arrays(kb, data.get("mouse", np.zeros((len(kb), 2))))
    raise ValueError(f"--actions {path}: expected a .npy or .json file")
