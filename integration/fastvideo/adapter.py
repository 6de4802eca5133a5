"""Turning WorldKV on in FastVideo: one call, on a ``VideoGenerator`` or on a pipeline.

``enable_worldkv(generator_or_pipeline, config)``:

- a ``VideoGenerator`` (workers are spawned processes that build their own pipeline): the
  install runs in every worker through ``generator.executor.collective_rpc(install_in_worker,
  kwargs=...)``; ``install_in_worker`` is an importable function, so the workers import this
  package and patch ``worker.pipeline``;
- a pipeline (``ComposedPipelineBase``) or one denoising stage built in this process: patched here.

Stages it knows (FastVideo 0.2.1): ``CausalDMDDenosingStage`` (CausalWan / Self-Forcing; also its
``CausalDenoisingStage`` subclass), ``MatrixGame2CausalDenoisingStage`` (``forward`` and
``streaming_reset / streaming_step / streaming_clear``) and
``LingBotWorld2CausalFastGenerationStage``. Each stage's cache allocation returns WorldKV window
dicts (``binding.py``); a stage call (or a streaming session, up to ``streaming_clear``) is one
world, whose bank entries are freed when it ends. ``disable_worldkv`` undoes it all.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from worldkv_connector.integration.fastvideo.binding import WorldKVBinding
from worldkv_connector.integration.fastvideo.config import FastVideoWorldKVConfig
from worldkv_connector.integration.fastvideo.models import spec_for
from worldkv_connector.integration.fastvideo.poses import lingbot_latent_poses

__all__ = ["enable_worldkv", "disable_worldkv", "install_in_worker", "worldkv_binding", "supported_stages"]

logger = logging.getLogger(__name__)

_ATTR = "_worldkv_binding"
_SAVED = "_worldkv_saved_methods"
_PATCHED = ("_initialize_kv_cache", "_initialize_action_kv_cache", "_initialize_self_kv_cache", "forward",
            "streaming_reset", "streaming_clear")
_STAGES = ("CausalDMDDenosingStage", "CausalDenoisingStage", "MatrixGame2CausalDenoisingStage",
           "LingBotWorld2CausalFastGenerationStage")


def supported_stages() -> tuple[str, ...]:
    return _STAGES


def _config(config, overrides: dict) -> FastVideoWorldKVConfig:
    if config is None:
        return FastVideoWorldKVConfig(**overrides)
    if isinstance(config, dict):
        return FastVideoWorldKVConfig(**{**config, **overrides})
    if isinstance(config, FastVideoWorldKVConfig):
        return dataclasses.replace(config, **overrides) if overrides else config
    raise TypeError(f"enable_worldkv: config must be a FastVideoWorldKVConfig, a dict or None, got "
                    f"{type(config).__name__}")


def _kind_of(stage) -> str | None:
    for cls in type(stage).__mro__:
        if cls.__name__ in _STAGES:
            return cls.__name__
    return None


def _stages_of(target) -> list:
    if _kind_of(target) is not None:
        return [target]
    stages = getattr(target, "stages", None)
    if stages is None:
        raise TypeError(f"enable_worldkv: {type(target).__name__} is neither a VideoGenerator, a FastVideo pipeline "
                        f"nor one of the stages {list(_STAGES)}")
    found = [s for s in stages if _kind_of(s) is not None]
    if not found:
        raise ValueError(f"enable_worldkv: {type(target).__name__} has no causal stage WorldKV supports "
                         f"(stages: {[type(s).__name__ for s in stages]}; supported: {list(_STAGES)})")
    return found


def enable_worldkv(target, config: FastVideoWorldKVConfig | dict | None = None, **overrides):
    """Install WorldKV. ``target``: a ``fastvideo.VideoGenerator``, a pipeline or a causal stage.
    Returns the bindings (in-process) or the workers' summaries (``VideoGenerator``)."""
    cfg = _config(config, overrides)  # bad settings fail here, before any worker is touched
    executor = getattr(target, "executor", None)
    if executor is not None and hasattr(executor, "collective_rpc"):
        return executor.collective_rpc(install_in_worker, kwargs={"config": dataclasses.asdict(cfg)})
    return [_install_stage(stage, cfg) for stage in _stages_of(target)]


def install_in_worker(worker, config: dict) -> dict:
    """Runs inside each FastVideo worker (``collective_rpc``): patches ``worker.pipeline``."""
    bindings = enable_worldkv(worker.pipeline, FastVideoWorldKVConfig(**config))
    return {"pid": os.getpid(), "stages": [b.spec.kind for b in bindings]}


def disable_worldkv(target) -> None:
    """Undo ``enable_worldkv`` (ends open sessions, frees the bank, restores FastVideo's methods)."""
    executor = getattr(target, "executor", None)
    if executor is not None and hasattr(executor, "collective_rpc"):
        executor.collective_rpc(_disable_in_worker)
        return
    for stage in _stages_of(target):
        binding = getattr(stage, _ATTR, None)
        if binding is None:
            continue
        binding.uninstall()
        saved = stage.__dict__.pop(_SAVED, {})
        for name in _PATCHED:
            if name in saved:
                stage.__dict__[name] = saved[name]  # an instance override that was there before
            else:
                stage.__dict__.pop(name, None)  # back to the class's method
        delattr(stage, _ATTR)


def _disable_in_worker(worker) -> None:
    disable_worldkv(worker.pipeline)


def worldkv_binding(stage_or_pipeline) -> WorldKVBinding:
    """The binding of an enabled stage (or of a pipeline's first enabled stage): metrics, poses."""
    for stage in _stages_of(stage_or_pipeline):
        b = getattr(stage, _ATTR, None)
        if b is not None:
            return b
    raise ValueError("worldkv_binding: WorldKV is not enabled on this stage or pipeline")


def _install_stage(stage, cfg: FastVideoWorldKVConfig) -> WorldKVBinding:
    if getattr(stage, _ATTR, None) is not None:
        raise ValueError(f"enable_worldkv: already enabled on {type(stage).__name__} (disable_worldkv first)")
    kind = _kind_of(stage)
    if getattr(stage, "transformer_2", None) is not None:
        raise ValueError(f"enable_worldkv: {type(stage).__name__} has two transformers (Wan MoE); not supported")
    spec = spec_for(stage.transformer, cfg.model)
    binding = WorldKVBinding(stage.transformer, spec, cfg)
    binding.install()
    setattr(stage, _ATTR, binding)
    setattr(stage, _SAVED, {n: stage.__dict__[n] for n in _PATCHED if n in stage.__dict__})

    if kind == "LingBotWorld2CausalFastGenerationStage":
        stage._initialize_self_kv_cache = lambda batch_size, kv_size, dtype, device: binding.new_caches(
            batch_size, dtype, device)
    else:
        stage._initialize_kv_cache = lambda batch_size, dtype, device: binding.new_caches(batch_size, dtype, device)
    if kind == "MatrixGame2CausalDenoisingStage":
        stage._initialize_action_kv_cache = lambda batch_size, dtype, device: binding.new_action_caches()
        orig_reset, orig_clear = stage.streaming_reset, stage.streaming_clear

        def streaming_reset(batch, fastvideo_args):
            return orig_reset(batch, fastvideo_args)  # its cache allocation starts the world

        def streaming_clear():
            binding.end_session()  # the world ends: pages and bank entries go
            return orig_clear()

        stage.streaming_reset, stage.streaming_clear = streaming_reset, streaming_clear

    orig_forward = stage.forward

    def forward(batch, fastvideo_args):
        if kind == "LingBotWorld2CausalFastGenerationStage":
            binding.set_latent_poses(_lingbot_poses(batch, fastvideo_args))
        try:
            return orig_forward(batch, fastvideo_args)
        finally:
            binding.end_session()  # one stage call is one world

    stage.forward = forward
    logger.info("worldkv: enabled on %s (%s), window %d chunks", type(stage).__name__, spec.kind, cfg.window_chunks)
    return binding


def _lingbot_poses(batch, fastvideo_args) -> np.ndarray:
    """Absolute latent-frame c2w of a LingBot-World v2 call, from ``<action_path>/poses.npy`` (the
    file its stage reads), cut to the frames it generates."""
    action_path = getattr(batch, "action_path", None)
    if action_path is None:
        raise ValueError("LingBot World 2 causal-fast requires `action_path` (with poses.npy)")
    c2ws = np.load(os.path.join(action_path, "poses.npy"))
    frame_num = ((int(batch.num_frames) - 1) // 4) * 4 + 1
    len_c2ws = ((len(c2ws) - 1) // 4) * 4 + 1
    chunk = int(fastvideo_args.pipeline_config.dit_config.arch_config.chunk_size)
    return lingbot_latent_poses(c2ws[:min(frame_num, len_c2ws)], chunk)
