"""A vLLM-like engine for causal video DiTs with a paged KV cache and a KV connector plug-in point.

Entry points: ``VideoEngine`` (driven like vLLM's ``LLM``), ``EngineArgs`` and the model configs
(``get_model_config``). The connector contract it drives (``VideoKVConnector``,
``register_connector``) lives in the core, ``worldkv_connector.connector.api``.
Submodules are imported lazily, so importing one does not build a model.
"""
from __future__ import annotations

import importlib

__all__ = [
    "VideoEngine",
    "EngineArgs",
    "ChunkResult",
    "get_model_config",
]

_WHERE = {
    "VideoEngine": "engine",
    "EngineArgs": "engine_args",
    "ChunkResult": "scheduler",
    "get_model_config": "model_config",
}


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
