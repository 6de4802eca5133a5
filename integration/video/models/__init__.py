"""The model classes of the video backend, chosen by a ModelConfig's ``family``.

``build_model_on(name, device)`` builds a named config's model without initialising its weights (e.g.
on the ``meta`` device, to read its key layout); ``build_model`` builds it with random weights.
"""
from __future__ import annotations

import logging

import torch

from worldkv_connector.integration.video.layers import init_weights_
from worldkv_connector.integration.video.model_config import ModelConfig, get_model_config

__all__ = ["model_class", "build_model", "build_model_on"]

logger = logging.getLogger(__name__)


def model_class(config: ModelConfig) -> type[torch.nn.Module]:
    """The nn.Module class of a config's family (``wan``, ``matrix-game-2``, ``lingbot``, ``world``)."""
    family = getattr(config, "family", "wan")
    if family == "matrix-game-2":
        from worldkv_connector.integration.video.models.matrix_game2 import MatrixGame2DiT

        return MatrixGame2DiT
    if family == "lingbot":
        from worldkv_connector.integration.video.models.lingbot import LingBotWorldDiT

        return LingBotWorldDiT
    if family == "world":
        from worldkv_connector.integration.video.models.world import WorldDiT

        return WorldDiT
    from worldkv_connector.integration.video.model import CausalWanDiT

    return CausalWanDiT


def build_model(config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The config family's model (CausalWanDiT, MatrixGame2DiT, LingBotWorldDiT) with random weights, deterministic per (seed, device type), in ``config.dtype``,
    in eval mode with gradients off (the backend is inference-only). Parameters are created directly
    on ``device`` in the target dtype, so real-size configs never hold an fp32 copy."""
    dev = torch.device(device)
    model = model_class(config)(config, device=dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    init_weights_(model, gen)
    model.eval().requires_grad_(False)
    logger.info("built %s: %s params, %s on %s", config.name, _human_count(config.num_params()), config.dtype, dev)
    return model


def build_model_on(name: str | ModelConfig, device: str | torch.device = "meta") -> torch.nn.Module:
    config = get_model_config(name) if isinstance(name, str) else name
    return model_class(config)(config, device=device)


def example_inputs(config: ModelConfig, frames: int, randn) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Inputs of one forward of batch 1 for benchmarks: (x, context, extra kwargs), drawn with
    ``randn(*size)`` (which fixes device and dtype). Actions are zero, the camera is the identity."""
    c = config
    lat = c.out_channels if c.family != "wan" else c.in_channels
    x = randn(1, frames, lat, c.latent_height, c.latent_width)
    extra: dict = {}
    if c.family == "matrix-game-2":
        context = randn(1, c.image_len, c.image_dim)
        pad = c.action.pad_frames
        extra["keyboard"] = randn(1, frames, pad, c.action.keyboard_dim_in) * 0
        extra["mouse"] = randn(1, frames, pad, c.action.mouse_dim_in) * 0
    else:
        context = randn(1, c.text_len, c.text_dim)
    if c.family in ("matrix-game-2", "lingbot"):
        extra["cond"] = randn(1, frames, 20, c.latent_height, c.latent_width) * 0
    if c.family == "world":
        extra["cam"] = torch.eye(4, device=x.device).expand(1, frames, 4, 4).contiguous()
    if c.family == "lingbot":
        extra["c2w"] = torch.eye(4, device=x.device).expand(1, frames, 4, 4).contiguous()
    return x, context, extra


def _human_count(n: int) -> str:
    """1234 -> '1.2K', 1_300_000_000 -> '1.30B' (for logs)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)
