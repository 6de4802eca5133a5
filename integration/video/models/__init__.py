"""The model classes of the video backend, chosen by a ModelConfig's ``family``.

``build_model_on(name, device)`` builds a named config's model without initialising its weights (e.g.
on the ``meta`` device, to read its key layout); ``build_model`` (model.py) builds it with random weights.
"""
from __future__ import annotations

import torch

from worldkv_connector.integration.video.model_config import ModelConfig, get_model_config

__all__ = ["model_class", "build_model_on"]


def model_class(config: ModelConfig) -> type[torch.nn.Module]:
    """The nn.Module class of a config's family (``wan``, ``matrix-game-2``, ``lingbot``)."""
    family = getattr(config, "family", "wan")
    if family == "matrix-game-2":
        from worldkv_connector.integration.video.models.matrix_game2 import MatrixGame2DiT

        return MatrixGame2DiT
    if family == "lingbot":
        from worldkv_connector.integration.video.models.lingbot import LingBotWorldDiT

        return LingBotWorldDiT
    from worldkv_connector.integration.video.model import CausalWanDiT

    return CausalWanDiT


def build_model_on(name: str | ModelConfig, device: str | torch.device = "meta") -> torch.nn.Module:
    config = get_model_config(name) if isinstance(name, str) else name
    return model_class(config)(config, device=device)
