"""ModelRunner: the only part of the video backend that touches devices. It owns the model, the
paged KV pools (one ``[2, num_pages, page_size, H, D]`` tensor per layer) and runs one engine step:
N denoising passes and the clean pass of one chunk for every row of the batch.

``attention`` (a PagedAttention) is what the model's layers call; a benchmark or a test may swap in
an object with the same interface between steps (``reference_attention.py``). With
``eval_attention_recall`` each step wraps it in a ``RecallProbe`` (integration/video/recall.py)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from worldkv_connector.integration.video.attention import PagedAttention, WindowPlan
from worldkv_connector.connector.api import ChunkRequest, ForwardContext, VideoKVConnector
from worldkv_connector.integration.video.engine_args import EngineArgs
from worldkv_connector.integration.video.kv_cache import PagedKVCache
from worldkv_connector.integration.video.model_config import ModelConfig
from worldkv_connector.integration.video.recall import RecallProbe, RecallTracker
from worldkv_connector.integration.video.sampling import FlowMatchSchedule
from worldkv_connector.integration.video.session_inputs import SessionInputs

__all__ = ["ModelRunner", "RowInput", "resolve_device"]

logger = logging.getLogger(__name__)

_GiB = 1 << 30


def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch.cuda.is_available() is False on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: choose cpu or cuda[:N]")
    return dev


@dataclass
class RowInput:
    """One batch row of a step: a session's next chunk."""

    session_id: str
    chunk_index: int
    first_frame: int  # absolute latent frame of the chunk's first frame
    seed: int
    frame_poses: np.ndarray  # [F, 4, 4] camera-to-world
    context: torch.Tensor | None  # [Lc, text_dim] prompt embedding; None: the null prompt (zeros)


def _chunk_generator(seed: int, chunk_index: int) -> torch.Generator:
    # noise of a chunk depends only on (session seed, chunk index): identical across window modes,
    # batch compositions and devices (drawn on the CPU)
    return torch.Generator().manual_seed((seed * 1_000_003 + chunk_index) % (1 << 63))


class ModelRunner:
    def __init__(self, args: EngineArgs, model_config: ModelConfig):
        from worldkv_connector.integration.video.models import build_model

        self.args = args
        self.config = model_config
        self.device = resolve_device(args.device)
        self.kv_shape = model_config.kv_shape()
        if args.kv_cache_bytes is not None:  # a budget too small for one page fails before the model is built
            PagedKVCache.num_pages_for(self.kv_shape, args.page_size, args.kv_cache_bytes)
        self.model = build_model(model_config, seed=args.seed, device=self.device)
        if args.checkpoint:
            from worldkv_connector.integration.video.checkpoint import load_checkpoint

            load_checkpoint(self.model, args.checkpoint, prefix=args.checkpoint_prefix, key=args.checkpoint_key)
        self.page_size = args.page_size
        self.kv_cache = PagedKVCache.from_budget(self.kv_shape, args.page_size, args.kv_cache_bytes, self.device)
        self.num_pages = self.kv_cache.num_pages
        self.kv_caches = self.kv_cache.layers  # "blocks.{i}" -> [2, num_pages, page_size, H, D]
        self.schedule = FlowMatchSchedule(args.num_denoising_steps, float(args.timestep_shift))
        self.attention = PagedAttention(self.kv_caches, args.attention_backend)
        self.connector: VideoKVConnector | None = None
        self.recall: RecallTracker | None = None
        self.inputs = SessionInputs(model_config)  # per-session conditioning beyond poses and prompt
        self.action_store = None
        if model_config.family == "matrix-game-2":
            from worldkv_connector.integration.video.models.action_cache import ActionKVStore

            self.action_store = ActionKVStore()
        if args.eval_attention_recall:
            self.recall = RecallTracker(model_config.num_layers)
        logger.info(
            "KV cache: %d pages x %d tokens (%.3f GiB) on %s", self.num_pages, self.page_size,
            self.kv_cache_bytes / _GiB, self.device,
        )

    # --- sizes ----------------------------------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        """Bytes of one page id over all layers, K and V."""
        return self.kv_cache.page_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.total_bytes

    def bind_connector(self, connector: VideoKVConnector) -> None:
        self.connector = connector
        self.attention.connector = connector
        connector.register_kv_caches(self.kv_caches)
        if self.recall is not None:
            # retrieved chunks count only their kept tokens as held (connectors without it: all)
            self.recall.kept_fn = getattr(connector, "kept_indices", None)

    # --- one step -------------------------------------------------------------------------------
    def _inputs(self, rows: list[RowInput]):
        c = self.config
        fpc = c.frames_per_chunk
        lat = (fpc, c.out_channels, c.latent_height, c.latent_width)  # the noisy latent (MG2 adds its cond)
        gens = [_chunk_generator(r.seed, r.chunk_index) for r in rows]
        offsets = torch.tensor([r.first_frame for r in rows], dtype=torch.int64, device=self.device)
        if c.family == "matrix-game-2":
            context, extra = self.inputs.matrix_game2(rows, fpc, self.device)
            extra["action_attn"] = self.action_store
            return gens, lat, context, extra, offsets
        contexts = []
        for r in rows:
            ctx = r.context if r.context is not None else torch.zeros(1, c.text_dim)
            contexts.append(ctx)
        length = max(x.shape[0] for x in contexts)
        context = torch.zeros(len(rows), length, c.text_dim)
        for i, ctx in enumerate(contexts):
            context[i, : ctx.shape[0]] = ctx
        extra = self.inputs.lingbot(rows, self.device) if c.family == "lingbot" else {}
        if c.family == "world":  # the world model's own camera conditioning: the frames' absolute poses
            extra["cam"] = torch.from_numpy(np.stack([r.frame_poses for r in rows])).float().to(self.device)
        return gens, lat, context.to(self.device), extra, offsets

    @torch.inference_mode()
    def execute(self, step: int, rows: list[RowInput], plan: WindowPlan, requests: list[ChunkRequest]) -> torch.Tensor:
        """Denoise one chunk per row and commit its K/V. Returns the chunks' latents
        [B, F, C, Hl, Wl] fp32 on the CPU (the last x0 prediction of each row)."""
        gens, lat, context, extra, offsets = self._inputs(rows)
        b = len(rows)

        def noise() -> torch.Tensor:
            return torch.stack([torch.randn(lat, generator=g) for g in gens]).to(self.device)

        meta = self.attention.begin_step(plan, self.device)
        if self.action_store is not None:
            self.action_store.begin_step(plan)  # the action caches read the same window as self-attention
        # the recall probe wraps the step's attention only when the diagnostic is on (no cost otherwise)
        attn_fn = self.attention if self.recall is None else RecallProbe(self.attention, self.recall)
        try:
            if self.connector is not None:
                # loads start before the first layer of the first pass; each layer waits for its own
                self.connector.start_load_kv(ForwardContext(step, requests, meta, self.kv_caches))
            x = noise()  # [B, F, C, Hl, Wl] fp32: pure noise at sigma 1
            x0 = x
            sigmas = self.schedule.sigmas
            # every pass of the step has the same offsets and poses: RoPE / camera-ray tables are built once
            with getattr(self.model, "reuse_conditioning", contextlib.nullcontext)():
                for i, s in enumerate(sigmas):
                    t = torch.full((b,), s, dtype=torch.float32, device=self.device)
                    self.attention.set_pass(t, clean=False)
                    v = self.model(x, t, context, offsets, attn_fn, **extra)
                    x0 = self.schedule.predict_x0(x, v, t)
                    if i + 1 < len(sigmas):
                        x = self.schedule.renoise(x0, noise(), torch.full_like(t, sigmas[i + 1]))
                # clean pass at t = 0: its K/V is the one left in the chunk's pages (the commit)
                t0 = torch.zeros(b, dtype=torch.float32, device=self.device)
                self.attention.set_pass(t0, clean=True)
                self.model(x0, t0, context, offsets, attn_fn, **extra)
            if self.connector is not None:
                self.connector.wait_for_save()
            return x0.float().cpu()  # the copy to the CPU also ends the step on CUDA (timings are honest)
        finally:
            self.attention.end_step()
            if self.action_store is not None:
                self.action_store.end_step()

    def end_session(self, session_id: str) -> None:
        """Free a finished session's conditioning and action caches."""
        self.inputs.end_session(session_id)
        if self.action_store is not None:
            self.action_store.end_session(session_id)

    def close(self) -> None:
        self.kv_cache.close()
