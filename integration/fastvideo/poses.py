"""Camera poses of FastVideo's world models, per latent frame, for WorldKV retrieval.

- LingBot-World v2 reads absolute camera-to-world poses (``poses.npy``, one per video frame) and
  resamples them to latent frames (the VAE's temporal stride 4) before making its Plücker
  conditioning; ``lingbot_latent_poses`` does the same resampling but keeps them absolute.
- Matrix-Game-2 only has actions: keyboard ``[T, 4]`` (W, S, A, D) and mouse ``[T, 2]`` (pitch,
  yaw) per video frame; ``matrixgame2_latent_poses`` integrates them into poses
  (``worldkv_connector.retrieval.integrate_actions``, the paper's action-based retrieval).
- CausalWan (Self-Forcing / CausVid) has no camera: every chunk gets the identity unless the
  user gives poses.

Latent frame ``j`` covers video frames ``1 + 4(j-1) .. 4j`` (frame 0 alone for ``j = 0``); its
pose is the camera after its last video frame.
"""
from __future__ import annotations

import numpy as np

from worldkv_connector.retrieval.poses import validate_poses
from worldkv_connector.retrieval.trajectory import integrate_actions

__all__ = ["matrixgame2_latent_poses", "lingbot_latent_poses", "VAE_STRIDE"]

VAE_STRIDE = 4  # video frames per latent frame (after the first)


def _as_2d(name: str, a, width: int) -> np.ndarray:
    arr = np.asarray(a.detach().float().cpu() if hasattr(a, "detach") else a, dtype=np.float64)
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            raise ValueError(f"{name}: batch size {arr.shape[0]}; the WorldKV adapter runs one session (batch 1)")
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != width or not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite [T, {width}] (or [1, T, {width}]), got {arr.shape}")
    return arr


def matrixgame2_latent_poses(keyboard, mouse, num_latent: int, *, yaw_speed: float = 20.0,
                             pitch_speed: float = 20.0, move_speed: float = 1.0 / 24) -> np.ndarray:
    """keyboard: [T, 4] (W, S, A, D); mouse: [T, 2] (pitch, yaw) per video frame (a leading batch
    dim of 1 is allowed). Returns [num_latent, 4, 4] float64 camera-to-world (the first camera at
    the identity). A latent frame past the actions holds the last pose."""
    kb = _as_2d("keyboard_cond", keyboard, 4)
    ms = _as_2d("mouse_cond", mouse, 2)
    if kb.shape[0] != ms.shape[0]:
        raise ValueError(f"keyboard_cond has {kb.shape[0]} frames, mouse_cond {ms.shape[0]}: expected equal")
    actions = {"forward": kb[:, 0] - kb[:, 1], "strafe": kb[:, 3] - kb[:, 2], "pitch": ms[:, 0], "yaw": ms[:, 1]}
    poses = integrate_actions(actions, move_speed=move_speed, yaw_speed=yaw_speed, pitch_speed=pitch_speed)
    idx = [min(VAE_STRIDE * j + 1, len(poses) - 1) for j in range(num_latent)]
    return poses[idx]


def lingbot_latent_poses(c2ws, chunk_size: int = 3) -> np.ndarray:
    """c2ws: [N, 4, 4] absolute camera-to-world per video frame (LingBot's ``poses.npy``, already
    cut to the generated frames). Returns [L, 4, 4] per latent frame, L = the latent frames LingBot
    conditions on (``(N - 1) // 4 + 1`` rounded down to whole chunks), resampled like LingBot's
    own pipeline (linear translation, spherical rotation) but absolute."""
    from fastvideo.models.dits.lingbotworld2.cam_utils import interpolate_camera_poses

    c2ws = validate_poses(np.asarray(c2ws, dtype=np.float64), "poses.npy")
    n = len(c2ws)
    lat = (n - 1) // VAE_STRIDE + 1
    lat -= lat % chunk_size
    if lat < chunk_size:
        raise ValueError(f"poses.npy: {n} video frames give {lat} latent frames, fewer than one chunk ({chunk_size})")
    out = interpolate_camera_poses(src_indices=np.linspace(0, n - 1, n), src_rot_mat=c2ws[:, :3, :3],
                                   src_trans_vec=c2ws[:, :3, 3], tgt_indices=np.linspace(0, n - 1, lat))
    return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float64)
