"""Contact sheet of the revisit eval: for each mode, first-visit frames above their revisits (and the
ground truth when the run observed it), latent channels 0-2 shown as RGB."""
from __future__ import annotations

import numpy as np
import torch

from worldkv_connector.world.image_metrics import DATA_RANGE

__all__ = ["to_rgb", "write_contact_sheet"]


def to_rgb(frame: torch.Tensor) -> np.ndarray:
    """frame: [C, H, W] latent (C >= 3) -> [H, W, 3] float in [0, 1] (channels 0-2, +-DATA_RANGE/2)."""
    x = frame[:3].float().permute(1, 2, 0).numpy()
    return np.clip(x / DATA_RANGE + 0.5, 0.0, 1.0)


def write_contact_sheet(path: str, report: dict, title: str) -> None:
    """One row per (mode, trajectory): first visit | revisit [| truth] pairs of up to 4 revisit pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(mode, traj, s) for mode, per in report["samples"].items() for traj, s in per.items()]
    if not rows:
        raise ValueError("no revisit pair in this run: nothing to plot (use more chunks)")
    kinds = ["first", "revisit"] + (["truth"] if rows[0][2]["truth"] is not None else [])
    cols = max(len(s["first"]) for _, _, s in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 0.9 * len(kinds) * len(rows) + 0.6), squeeze=False)
    for r, (mode, traj, s) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(s["first"]):
                continue
            parts = []
            for k in kinds:  # kinds stacked vertically, a white row between them
                parts += [to_rgb(s[k][c]), np.ones((1, s[k][c].shape[-1], 3))]
            stack = np.concatenate(parts[:-1], axis=0)
            ax.imshow(stack, interpolation="nearest")
            if c == 0:
                ax.set_title(f"{mode} / {traj}", fontsize=7, loc="left")
    fig.suptitle(f"{title}\nper tile, top to bottom: {', '.join(kinds)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
