"""Contact sheet of the revisit eval: one row per mode; each tile stacks a first-visit frame above its
revisit (and the ground truth when the run observed it), two pairs per trajectory, latent channels
0-2 shown as RGB."""
from __future__ import annotations

import numpy as np
import torch

from worldkv_connector.world.image_metrics import DATA_RANGE

__all__ = ["to_rgb", "write_contact_sheet"]

PAIRS_PER_TRAJECTORY = 2


def to_rgb(frame: torch.Tensor) -> np.ndarray:
    """frame: [C, H, W] latent (C >= 3) -> [H, W, 3] float in [0, 1] (channels 0-2, +-DATA_RANGE/2)."""
    x = frame[:3].float().permute(1, 2, 0).numpy()
    return np.clip(x / DATA_RANGE + 0.5, 0.0, 1.0)


def write_contact_sheet(path: str, report: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, per in report["samples"].items() if per]
    if not modes:
        raise ValueError("no revisit pair in this run: nothing to plot (use more chunks)")
    trajs = list(report["trajectories"])
    first = next(iter(report["samples"][modes[0]].values()))
    kinds = ["first", "revisit"] + (["truth"] if first["truth"] is not None else [])
    cols = len(trajs) * PAIRS_PER_TRAJECTORY
    fig, axes = plt.subplots(len(modes), cols, figsize=(1.6 * cols, 0.55 * len(kinds) * len(modes) + 1.0),
                             squeeze=False)
    for r, mode in enumerate(modes):
        for t, traj in enumerate(trajs):
            s = report["samples"][mode].get(traj)
            for p in range(PAIRS_PER_TRAJECTORY):
                ax = axes[r][t * PAIRS_PER_TRAJECTORY + p]
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and p == 0:
                    ax.set_title(traj, fontsize=8, loc="left")
                if t == 0 and p == 0:
                    ax.set_ylabel(mode, fontsize=7, rotation=0, ha="right", va="center")
                if s is None or p >= len(s["first"]):
                    ax.axis("off")
                    continue
                parts = []
                for k in kinds:  # stacked vertically, a white row between them
                    parts += [to_rgb(s[k][p]), np.ones((1, s[k][p].shape[-1], 3))]
                ax.imshow(np.concatenate(parts[:-1], axis=0), interpolation="nearest")
    fig.suptitle(f"{title}; each tile, top to bottom: {', '.join(kinds)}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
