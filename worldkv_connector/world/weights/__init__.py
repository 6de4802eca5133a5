"""The trained world model shipped with the package: ``world-v2.safetensors`` and its manifest."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["WEIGHTS_NAME", "shipped_weights", "shipped_manifest"]

WEIGHTS_NAME = "world-v2.safetensors"


def shipped_weights() -> Path:
    """Path of the shipped weights; FileNotFoundError if the package was installed without them."""
    path = Path(__file__).with_name(WEIGHTS_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"the trained world model {WEIGHTS_NAME} is missing from {path.parent.name}/; "
                                "reinstall the package or train one with `worldkv train world --out ...`")
    return path


def shipped_manifest() -> dict:
    """The manifest of the shipped weights (config, seed, steps, final loss, sha256...)."""
    return json.loads(shipped_weights().with_suffix(".json").read_text())
