"""WorldKV inside FastVideo (0.2.1): CausalWan (Self-Forcing / CausVid), Matrix-Game-2 (with
streaming) and LingBot-World v2 causal-fast get the WorldKV window ``sink | retrieved | recent |
current`` in place of their rolling cache, with one call::

    from worldkv_connector.integration.fastvideo import enable_worldkv
    enable_worldkv(generator, retrieval_chunks=..., ...)  # VideoGenerator, pipeline or stage
"""
from __future__ import annotations

from worldkv_connector.integration.fastvideo.adapter import (
    disable_worldkv, enable_worldkv, install_in_worker, supported_stages, worldkv_binding,
)
from worldkv_connector.integration.fastvideo.binding import WorldKVBinding
from worldkv_connector.integration.fastvideo.config import FastVideoWorldKVConfig
from worldkv_connector.integration.fastvideo.host import WorldKVHost
from worldkv_connector.integration.fastvideo.poses import lingbot_latent_poses, matrixgame2_latent_poses

__all__ = [
    "enable_worldkv",
    "disable_worldkv",
    "install_in_worker",
    "worldkv_binding",
    "supported_stages",
    "FastVideoWorldKVConfig",
    "WorldKVBinding",
    "WorldKVHost",
    "matrixgame2_latent_poses",
    "lingbot_latent_poses",
]
