"""The SGLang Diffusion plugin (entry point ``worldkv`` of group ``sglang.multimodal_gen.plugins``).

``register()`` runs in every SGLang worker and HTTP process that selects it
(``SGLANG_PLUGINS=worldkv``) and registers hooks; SGLang applies them before serving:

- REPLACE ``CausalDMDDenoisingStage._allocate_causal_kv_cache`` and the LingBot-World stage's
  override: the stage gets :class:`WorldKVCausalKVCache` blocks (one per transformer block);
- AROUND ``_update_causal_context_cache`` (both stages): the clean pass; it marks the pass so the
  blocks hand their K/V to the connector's write-through store, then ends the chunk step;
- AROUND LingBot-World's ``_prepare_lingbot_world_condition`` and ``_actions_to_c2ws``: the
  absolute camera-to-world matrices its actions integrate to become the chunks' poses;
- BEFORE ``RealtimeCausalDiTState.dispose``: a realtime session's end ends its WorldKV session
  (hot pages back, bank entries freed once its stores ended).
"""
from __future__ import annotations

import contextvars
import logging

import numpy as np
import torch

from worldkv_connector.integration.sglang.runtime import CacheGeometry, PluginSettings, WorldKVRuntime

__all__ = ["register", "get_runtime", "reset_runtimes", "TARGETS"]

logger = logging.getLogger(__name__)

_STAGES = "sglang.multimodal_gen.runtime.pipelines_core.stages"
_CAUSAL = f"{_STAGES}.causal_denoising.CausalDMDDenoisingStage"
_LINGBOT = f"{_STAGES}.model_specific_stages.lingbot_world.lingbot_world_causal_denoising.LingBotWorldCausalDMDDenoisingStage"
_LB_CONFIG = "sglang.multimodal_gen.configs.pipeline_configs.lingbot_world"
TARGETS = {
    "allocate": (f"{_CAUSAL}._allocate_causal_kv_cache", f"{_LINGBOT}._allocate_causal_kv_cache"),
    "clean_pass": (f"{_CAUSAL}._update_causal_context_cache", f"{_LINGBOT}._update_causal_context_cache"),
    "condition": (f"{_LB_CONFIG}._prepare_lingbot_world_condition",),
    "c2ws": (f"{_LB_CONFIG}._actions_to_c2ws",),
    "dispose": ("sglang.multimodal_gen.runtime.realtime.states.causal.RealtimeCausalDiTState.dispose",),
}

_RUNTIMES: dict[CacheGeometry, WorldKVRuntime] = {}  # one per model shape in this process
_SETTINGS: list[PluginSettings] = []
_CONDITION_BATCH: contextvars.ContextVar = contextvars.ContextVar("worldkv_condition_batch", default=None)


def settings() -> PluginSettings:
    if not _SETTINGS:
        _SETTINGS.append(PluginSettings.from_env())
    return _SETTINGS[0]


def get_runtime(geometry: CacheGeometry) -> WorldKVRuntime:
    rt = _RUNTIMES.get(geometry)
    if rt is None:
        rt = _RUNTIMES[geometry] = WorldKVRuntime(geometry, settings())
    return rt


def reset_runtimes() -> None:
    """Close every runtime and forget the settings (tests; a worker keeps its runtimes)."""
    for rt in _RUNTIMES.values():
        rt.close()
    _RUNTIMES.clear()
    _SETTINGS.clear()


# --- hooks -------------------------------------------------------------------------------------
def allocate_causal_kv_cache(stage, *, batch_size, kv_cache_size, num_attention_heads, attention_head_dim, dtype,
                             device, use_int_indices=False, sink_tokens=0, global_sink_tokens=0,
                             attention_window_size=None, allow_growth=False):
    """REPLACE of ``_allocate_causal_kv_cache``: one WorldKV cache block per transformer block."""
    from worldkv_connector.integration.sglang.cache import CacheGroup, WorldKVCausalKVCache

    kv_quant = getattr(stage, "_kv_quant_args", None)
    if kv_quant is not None and getattr(kv_quant, "enabled", False):
        raise ValueError("worldkv plugin: KV cache quantisation (QVG packed KV) is not supported; turn one of them off")
    if global_sink_tokens:
        raise ValueError(f"worldkv plugin: global_sink_tokens={global_sink_tokens} (multi-shot sinks) is not supported")
    model = "lingbot_world" if type(stage).__name__.startswith("LingBot") else "causal_wan"
    geometry = CacheGeometry(model, int(stage.num_transformer_blocks), int(num_attention_heads),
                             int(attention_head_dim), int(stage.num_token_per_frame), int(stage.num_frames_per_block),
                             int(sink_tokens), int(kv_cache_size), dtype, torch.device(device))
    if allow_growth:
        logger.info("worldkv: SGLang asked for a growing cache; the WorldKV window stays bounded instead")
    group = CacheGroup(get_runtime(geometry))
    return [WorldKVCausalKVCache(group=group, layer=i, batch_size=batch_size, num_heads=num_attention_heads,
                                 head_dim=attention_head_dim, cache_size=kv_cache_size, sink_tokens=sink_tokens,
                                 dtype=dtype, device=device)
            for i in range(geometry.num_layers)]


def _group_of(kv_cache):
    first = kv_cache[0] if kv_cache else None
    return getattr(first, "group", None)


def clean_pass(original, stage, *args, **kwargs):
    """AROUND ``_update_causal_context_cache``: the clean pass stores; then the chunk step ends."""
    group = _group_of(kwargs.get("kv_cache"))
    if group is None:
        return original(stage, *args, **kwargs)
    group.clean = True
    try:
        out = original(stage, *args, **kwargs)
    finally:
        group.clean = False
    group.end_chunk()
    return out


def prepare_condition(original, *args, **kwargs):
    """AROUND LingBot-World's condition: remember the batch while its actions become poses."""
    token = _CONDITION_BATCH.set(kwargs.get("batch"))
    try:
        return original(*args, **kwargs)
    finally:
        _CONDITION_BATCH.reset(token)


def actions_to_c2ws(original, *args, **kwargs):
    """AROUND ``_actions_to_c2ws``: keep the absolute camera-to-world of every latent frame."""
    c2ws = original(*args, **kwargs)
    batch = _CONDITION_BATCH.get()
    if batch is not None and getattr(batch, "extra", None) is not None and len(c2ws) > 1:
        from worldkv_connector.integration.sglang.cache import POSES_KEY

        batch.extra[POSES_KEY] = np.stack(c2ws[1:])  # [0] is the origin before the first action
    return c2ws


def dispose_state(state, *args, **kwargs):
    """BEFORE ``RealtimeCausalDiTState.dispose``: end the session's WorldKV session."""
    group = _group_of(getattr(state, "kv_cache", None))
    if group is not None:
        group.close()
    return None


def register() -> None:
    """Entry point: register the hooks (SGLang applies them; nothing is imported here)."""
    from sglang.multimodal_gen.runtime.platforms.plugins import HookType, plugin_hook

    settings()  # a bad WORLDKV_* value fails at startup, naming the variable
    for target in TARGETS["allocate"]:
        plugin_hook(target, HookType.REPLACE)(allocate_causal_kv_cache)
    for target in TARGETS["clean_pass"]:
        plugin_hook(target, HookType.AROUND)(clean_pass)
    plugin_hook(TARGETS["condition"][0], HookType.AROUND)(prepare_condition)
    plugin_hook(TARGETS["c2ws"][0], HookType.AROUND)(actions_to_c2ws)
    plugin_hook(TARGETS["dispose"][0], HookType.BEFORE)(dispose_state)
    logger.info("worldkv plugin registered (%d hooks)", sum(len(t) for t in TARGETS.values()))
