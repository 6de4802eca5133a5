"""worldkv-connector: persistent world memory for autoregressive video diffusion world models.

Entry points (one screen):

- ``WorldKVConfig``: every knob, validated; built from the engine flag's JSON.
- ``KVShape`` / ``PRESETS`` / ``get_preset``: KV shapes of the supported models.
- ``parse_trajectory`` / ``validate_poses`` / ``integrate_actions``: camera poses.
- ``PoseIndex``: banked chunks by camera pose, top-k retrieval per session.
- ``compress_chunk``: key-key novelty pruning of one chunk's K/V.
- ``Bank``: tiered store of chunk entries with a byte capacity.
- ``TransferEngine``: every copy a job (streams, events, merged runs).

The video backend lives in ``worldkv_connector.integration.video``; the connector for it in
``worldkv_connector.connector``; the real-vLLM connector in ``worldkv_connector.integration.vllm``.
"""
from worldkv_connector.bank import Bank
from worldkv_connector.compression import compress_chunk
from worldkv_connector.config import WorldKVConfig, kept_tokens_per_chunk
from worldkv_connector.retrieval import PoseIndex, integrate_actions, parse_trajectory, validate_poses
from worldkv_connector.shapes import PRESETS, KVShape, get_preset
from worldkv_connector.transfer import TransferEngine

__all__ = [
    "WorldKVConfig",
    "kept_tokens_per_chunk",
    "KVShape",
    "PRESETS",
    "get_preset",
    "parse_trajectory",
    "validate_poses",
    "integrate_actions",
    "PoseIndex",
    "compress_chunk",
    "Bank",
    "TransferEngine",
]
__version__ = "0.1.0"
