"""A vLLM-like engine for causal video DiTs with a paged KV cache and a KV connector plug-in point.

Entry points: ``VideoEngine`` (driven like vLLM's ``LLM``), ``EngineArgs``, the connector contract
(``VideoKVConnector``, ``register_connector``) and the model configs (``get_model_config``).
Submodules are imported lazily so ``connector_api`` can be imported without building a model.
"""
from __future__ import annotations

import importlib

__all__ = [
    "VideoEngine",
    "EngineArgs",
    "ChunkResult",
    "get_model_config",
    "VideoKVConnector",
    "register_connector",
]

_WHERE = {
    "VideoEngine": "engine",
    "EngineArgs": "engine_args",
    "ChunkResult": "scheduler",
    "get_model_config": "model_config",
    "VideoKVConnector": "connector_api",
    "register_connector": "connector_api",
}


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
