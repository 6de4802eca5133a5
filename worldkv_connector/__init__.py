"""worldkv-connector: persistent world memory for autoregressive video diffusion world models.

Entry points (one screen):

- ``WorldKVConfig``: every knob, validated; built from the engine flag's JSON.
- ``KVShape`` / ``PRESETS``: KV shapes of the supported models.

More names are added here as the core grows (pose index, compression, bank, transfer engine).
"""
from worldkv_connector.config import WorldKVConfig, kept_tokens_per_chunk
from worldkv_connector.shapes import PRESETS, KVShape, get_preset

__all__ = ["WorldKVConfig", "kept_tokens_per_chunk", "KVShape", "PRESETS", "get_preset"]
__version__ = "0.1.0"
