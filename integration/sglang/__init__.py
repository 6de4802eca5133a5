"""WorldKV inside SGLang Diffusion (``sglang.multimodal_gen``): a plugin that gives its causal video
models (CausalWan, LingBot-World) a WorldKV world memory.

Enable with ``SGLANG_PLUGINS=worldkv`` and configure with ``WORLDKV_CONFIG`` (the same JSON as
``--kv-connector-config``); see ``plugin.py``. Importing this package does not import sglang.
"""
from worldkv_connector.integration.sglang.plugin import register

__all__ = ["register"]
