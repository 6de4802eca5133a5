"""Per-session conditioning of the model families beyond the camera poses and the prompt.

- ``matrix-game-2``: ``keyboard`` [N, 4] (W, S, A, D) and ``mouse`` [N, 2] (pitch, yaw) per **video**
  frame (missing frames at the end: no key, no motion), ``image`` [image_len, image_dim] CLIP features
  of the first frame and ``first_latent`` [16, Hl, Wl] its VAE latent (both zeros when not given: a
  random-weight run has no encoder).
- ``lingbot``: the session's poses, relative to its first frame, become Plucker rays (models/lingbot.py);
  ``intrinsics`` [4] (fx, fy, cx, cy in pixels of the latent grid) optionally replaces the default pinhole.
The engine registers a session's inputs when it is added and frees them when it ends.
"""
from __future__ import annotations

import numpy as np
import torch

from worldkv_connector.integration.video.model_config import ModelConfig

__all__ = ["SessionInputs", "INPUT_KEYS"]

INPUT_KEYS = {"wan": (), "world": (), "matrix-game-2": ("keyboard", "mouse", "image", "first_latent"),
              "lingbot": ("intrinsics", "first_latent")}


def _tensor(name: str, value, shape: tuple) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value, dtype=np.float32) if not isinstance(value, torch.Tensor) else value).float()
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        raise ValueError(f"inputs[{name!r}]: expected shape {list(shape)} (None = any), got {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"inputs[{name!r}] contains NaN or inf")
    return t.cpu()


class SessionInputs:
    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._by_session: dict[str, dict] = {}

    def prepare(self, inputs: dict | None, chunk_poses) -> dict:
        """Validate a session's inputs (ValueError naming the key) and return them ready for ``put``.
        chunk_poses: [C, F, 4, 4] the session's camera-to-world poses per chunk and latent frame (an
        array, or the session's lazy ``Session.chunk_poses`` view: ``shape`` and ``[c]``)."""
        c = self.config
        num_chunks = int(chunk_poses.shape[0])
        allowed = INPUT_KEYS[c.family]
        inputs = dict(inputs or {})
        unknown = sorted(set(inputs) - set(allowed))
        if unknown:
            raise ValueError(f"inputs {unknown}: model {c.name!r} ({c.family}) takes {list(allowed) or 'none'}")
        out: dict = {}
        if c.family == "matrix-game-2":
            a = c.action
            need = a.vae_time_compression_ratio * (num_chunks * c.frames_per_chunk - 1) + 1  # video frames
            for name, width in (("keyboard", a.keyboard_dim_in), ("mouse", a.mouse_dim_in)):
                t = _tensor(name, inputs[name], (None, width)) if name in inputs else torch.zeros(0, width)
                if t.shape[0] < need:  # past the given actions: no key pressed, no mouse motion
                    t = torch.cat((t, torch.zeros(need - t.shape[0], width)))
                out[name] = t
            out["image"] = (_tensor("image", inputs["image"], (c.image_len, c.image_dim)) if "image" in inputs
                            else torch.zeros(c.image_len, c.image_dim))
        if c.family in ("matrix-game-2", "lingbot"):  # image-to-video: the first frame's latent
            lat = (c.out_channels, c.latent_height, c.latent_width)
            out["first_latent"] = (_tensor("first_latent", inputs["first_latent"], lat) if "first_latent" in inputs
                                   else torch.zeros(lat))
        if c.family == "lingbot":
            from worldkv_connector.integration.video.camera import relative_camera

            # relative to the first frame, frame to frame, normalised over the whole session (upstream)
            frames = np.concatenate([chunk_poses[i] for i in range(num_chunks)])  # [C * F, 4, 4]
            out["c2w"] = torch.from_numpy(relative_camera(frames)).float()
            if "intrinsics" in inputs:
                out["intrinsics"] = _tensor("intrinsics", inputs["intrinsics"], (4,))
        return out

    def put(self, session_id: str, prepared: dict) -> None:
        self._by_session[session_id] = prepared

    def end_session(self, session_id: str) -> None:
        self._by_session.pop(session_id, None)

    def get(self, session_id: str) -> dict:
        if session_id not in self._by_session:
            raise KeyError(f"no inputs registered for session {session_id!r}")
        return self._by_session[session_id]

    def matrix_game2(self, rows, fpc: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        """(context [B, image_len, image_dim], {cond, keyboard, mouse}) for one step's rows."""
        from worldkv_connector.integration.video.models.action_module import action_windows

        a = self.config.action
        ins = [self.get(r.session_id) for r in rows]
        context = torch.stack([i["image"] for i in ins]).to(device)
        cond = self._cond(rows, ins, fpc)
        kb = torch.stack([action_windows(i["keyboard"], r.first_frame, fpc, a) for r, i in zip(rows, ins)])
        ms = torch.stack([action_windows(i["mouse"], r.first_frame, fpc, a) for r, i in zip(rows, ins)])
        return context, {"cond": cond.to(device), "keyboard": kb.to(device), "mouse": ms.to(device)}

    @staticmethod
    def _cond(rows, ins, fpc: int) -> torch.Tensor:
        """[B, fpc, 20, Hl, Wl]: the rollout's conditioning latent is zero past frame 0, so only a chunk
        holding frame 0 carries the mask and the image latent."""
        from worldkv_connector.integration.video.models.matrix_game2 import first_frame_condition

        out = []
        for r, i in zip(rows, ins):
            chunk = first_frame_condition(i["first_latent"], fpc)
            out.append(chunk if r.first_frame == 0 else torch.zeros_like(chunk))
        return torch.stack(out)

    def lingbot(self, rows, device: torch.device) -> dict:
        """{c2w [B, F, 4, 4] (relative_camera of each session), intrinsics [B, 4] when every row has them}."""
        f = len(rows[0].frame_poses)
        rel = [self.get(r.session_id)["c2w"][r.first_frame: r.first_frame + f] for r in rows]
        intr = [self.get(r.session_id).get("intrinsics") for r in rows]
        out = {"c2w": torch.stack(rel).to(device), "cond": self._cond(rows, [self.get(r.session_id) for r in rows],
                                                                      f).to(device)}
        if all(i is not None for i in intr):
            out["intrinsics"] = torch.stack(intr).to(device)
        return out
