"""VideoEngine: the vLLM-like entry point of the video backend.

    engine = VideoEngine(model="tiny", attention_window="sliding")
    engine.add_session("a", trajectory="R_L_R_L_R_L90", num_chunks=24, seed=1)
    engine.run()
    latents = engine.results("a")          # list of [F, C, Hl, Wl] per chunk

One ``step()`` generates the next chunk (N denoising passes + the clean pass) of every running
session in one batched forward per pass; each session has its own block table, trajectory and seed.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch

from worldkv_connector.integration.video.block_manager import BlockManager
from worldkv_connector.connector.api import (
    ConnectorWindow, EngineView, VideoKVConnector, create_connector, get_connector_class,
)
from worldkv_connector.integration.video.engine_args import (
    DEFAULT_RECENT_FRAMES, DEFAULT_SINK_FRAMES, MAX_CHUNKS, EngineArgs,
)
from worldkv_connector.integration.video.kv_cache import PagedKVCache
from worldkv_connector.integration.video.model_config import get_model_config
from worldkv_connector.integration.video.model_runner import ModelRunner
from worldkv_connector.integration.video.scheduler import (
    ChunkResult, Scheduler, Session, kv_shortage_message, session_pages,
)
from worldkv_connector.integration.video.block_manager import KVCacheOutOfPages
from worldkv_connector.actions import action_poses
from worldkv_connector.checks import check_int
from worldkv_connector.retrieval.poses import chunk_mean_pose, validate_poses
from worldkv_connector.retrieval.trajectory import trajectory_poses

__all__ = ["VideoEngine", "mean_pose_matrix", "resolve_window", "check_kv_capacity"]

logger = logging.getLogger(__name__)

_DRAIN_TIMEOUT_S = 60.0  # longest wait for a connector's outstanding stores when the run ends


def mean_pose_matrix(frame_poses: np.ndarray) -> np.ndarray:
    """[F, 4, 4] camera-to-world -> [4, 4]: mean translation and element-wise mean rotation matrix
    (WorldKV's chunk pose; the rotation is deliberately not re-orthonormalised)."""
    t, r = chunk_mean_pose(frame_poses)
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = r, t
    return out


def _connector_window(connector_cls: type[VideoKVConnector], config_json: str | None) -> ConnectorWindow | None:
    """The window the connector's config asks for (the connector says: ``window_frames``), or None."""
    window = connector_cls.window_frames(config_json)
    if window is None or isinstance(window, ConnectorWindow):
        return window
    return ConnectorWindow(int(window[0]), int(window[1]))


def resolve_window(args: EngineArgs) -> EngineArgs:
    """``args`` with ``sink_frames``/``recent_frames`` filled in. Without a connector (or one whose
    config has no say): the values given, else 3 and 6. With a WorldKV connector its config defines
    the window; a value also given in ``args`` that disagrees raises ``ValueError`` naming both."""
    window = None
    if args.kv_connector:
        # an unknown name fails here, before the model is built
        window = _connector_window(get_connector_class(args.kv_connector), args.kv_connector_config)
    if window is None:
        sink = DEFAULT_SINK_FRAMES if args.sink_frames is None else args.sink_frames
        recent = DEFAULT_RECENT_FRAMES if args.recent_frames is None else args.recent_frames
        return args.replace(sink_frames=sink, recent_frames=recent)
    for key, theirs in zip(("sink_frames", "recent_frames"), window[:2]):
        ours = getattr(args, key)
        if ours is not None and ours != theirs:
            default = " (its default)" if key in window.defaults else ""
            raise ValueError(
                f"{window.source} {key}={theirs}{default} disagrees with the engine's --{key.replace('_', '-')} {ours}: "
                f"with a connector its config defines the window; give the same value to both or leave "
                f"--{key.replace('_', '-')} out"
            )
    return args.replace(sink_frames=window.sink_frames, recent_frames=window.recent_frames)


def _model_config(args: EngineArgs):
    config = get_model_config(args.model)
    if args.dtype is not None and args.dtype != config.dtype:
        config = config.replace(dtype=args.dtype)
    return config


def _hot_pages(args: EngineArgs, frame_tokens: int) -> int:
    """Pages the connector's hot set may hold per session (the connector says: ``hot_pages``)."""
    if not args.kv_connector:
        return 0
    return get_connector_class(args.kv_connector).hot_pages(args.kv_connector_config, args.page_size, frame_tokens)


def check_kv_capacity(args: EngineArgs, session_chunks: list[int]) -> None:
    """Before anything is built: raise ``KVCacheOutOfPages`` (a ValueError) with the exact
    ``--kv-cache-memory`` needed when the sessions (``session_chunks``: chunks of each) cannot all
    fit the paged KV cache at once (window + current chunk + the connector's hot set, per session).
    A no-op when the budget is only known once the model is on the device (auto size on CUDA)."""
    config = _model_config(args)
    args.check_frames(config.frames_per_chunk)
    args = resolve_window(args)
    args.check_frames(config.frames_per_chunk)
    kv_shape = config.kv_shape()
    if args.kv_cache_bytes is not None:
        budget = args.kv_cache_bytes
    elif args.device == "cpu":
        budget = PagedKVCache.auto_budget(torch.device("cpu"))
    else:
        return
    page_bytes = PagedKVCache.page_bytes_of(kv_shape, args.page_size)
    have = int(budget // page_bytes)
    hot = _hot_pages(args, config.frame_tokens)
    chunk_pages = -(-config.frame_tokens * config.frames_per_chunk // args.page_size)
    fpc = config.frames_per_chunk
    need = sum(session_pages(n, window=args.attention_window, sink_chunks=args.sink_frames // fpc,
                             recent_chunks=args.recent_frames // fpc, chunk_pages=chunk_pages, hot_pages=hot)
               for n in session_chunks)
    if need > have:
        raise KVCacheOutOfPages(kv_shortage_message(need, have, page_bytes, window=args.attention_window,
                                                    sessions=len(session_chunks), hot_pages=hot))


def _count(name: str, value, lo: int, hi: int) -> int | None:
    """An integer argument (any integral type, numpy's too) in [lo, hi], or None."""
    return None if value is None else check_int(name, value, lo, hi)


class VideoEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs):
        args = EngineArgs(**kwargs) if args is None else (args.replace(**kwargs) if kwargs else args)
        config = _model_config(args)
        args.check_frames(config.frames_per_chunk)
        args = resolve_window(args)  # from here on sink_frames / recent_frames are ints
        args.check_frames(config.frames_per_chunk)
        self.args = args
        self.model_config = config
        self.runner = ModelRunner(args, config)
        self.block_manager = BlockManager(self.runner.num_pages, args.page_size)
        self.connector: VideoKVConnector | None = None
        if args.kv_connector:
            view = EngineView(
                model=config.name, num_layers=config.num_layers, frames_per_chunk=config.frames_per_chunk,
                frame_tokens=config.frame_tokens, page_size=args.page_size, num_pages=self.runner.num_pages,
                sink_frames=args.sink_frames, recent_frames=args.recent_frames,
                attention_window=args.attention_window, dtype=config.dtype,
            )
            self.connector = create_connector(
                args.kv_connector, view, config.kv_shape(), args.kv_connector_config, self.runner.device
            )
            self.runner.bind_connector(self.connector)
        self.scheduler = Scheduler(
            self.block_manager, frames_per_chunk=config.frames_per_chunk, frame_tokens=config.frame_tokens,
            attention_window=args.attention_window, sink_frames=args.sink_frames,
            recent_frames=args.recent_frames, page_bytes=self.runner.page_bytes, connector=self.connector,
            hot_pages=_hot_pages(args, config.frame_tokens) if self.connector is not None else 0,
        )
        self._last_connector_metrics: dict | None = None  # before the latest session end freed entries
        self._step = 0
        self._chunks = 0
        self._busy_s = 0.0
        self._peak_resident = 0
        self._closed = False

    # --- sessions -----------------------------------------------------------------------------------
    def add_session(self, session_id: str, trajectory: str | None = None, poses: np.ndarray | None = None,
                    num_chunks: int | None = None, seed: int | None = None,
                    context: torch.Tensor | None = None, keep_results: bool = True,
                    inputs: dict | None = None) -> None:
        """Queue a rollout. ``trajectory``: a spec such as ``"R_L_R_L_R_L90"`` in video frames, resampled to
        latent frames as the reference does (``poses.trajectory_poses``); or ``poses``: [F, 4, 4]
        camera-to-world, one per latent frame; neither: a static camera. ``num_chunks`` defaults to
        ``ceil(F / frames_per_chunk)``; a trajectory shorter than the rollout holds its last pose.
        ``seed`` (default EngineArgs.seed) fixes the session's noise. ``context``: [Lc, text_dim] prompt
        embedding (default the null prompt). ``keep_results=False``: the session's ChunkResults (and
        latents) are only returned by ``step()``, not kept for ``results()`` - for long rollouts
        whose memory must not grow with the number of chunks. ``inputs``: the model family's conditioning
        (session_inputs.py; Matrix-Game-2: ``keyboard`` [N, 4] / ``mouse`` [N, 2] per video frame, whose
        integrated poses are the session's camera when neither trajectory nor poses is given)."""
        self._check_open()
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id={session_id!r}: expected a non-empty str")
        if trajectory is not None and poses is not None:
            raise ValueError("give either trajectory or poses, not both")
        if trajectory is not None:
            frames = trajectory_poses(trajectory, frames_per_chunk=self.model_config.frames_per_chunk)  # video frames -> latent
        elif poses is not None:
            frames = validate_poses(poses, "poses")
        elif inputs and "keyboard" in inputs:  # action-conditioned: retrieve by the integrated actions
            frames = action_poses(inputs["keyboard"], inputs.get("mouse", np.zeros((len(inputs["keyboard"]), 2))),
                                  frames_per_chunk=self.model_config.frames_per_chunk)
        else:
            if num_chunks is None:
                raise ValueError("num_chunks is required without a trajectory or poses")
            frames = np.eye(4)[None]
        num_chunks = _count("num_chunks", num_chunks, 1, MAX_CHUNKS)
        seed = _count("seed", self.args.seed if seed is None else seed, 0, 2**63 - 1)
        c = self.model_config
        if context is not None:
            if not isinstance(context, torch.Tensor) or context.dim() != 2 or context.shape[1] != c.text_dim \
                    or not 1 <= context.shape[0] <= c.text_len:
                got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
                raise ValueError(f"context: expected a tensor [Lc <= {c.text_len}, {c.text_dim}], got {got}")
            if not bool(torch.isfinite(context).all()):
                raise ValueError("context: the prompt embedding holds NaN or inf: not a finite number")
        if not isinstance(keep_results, bool):
            raise ValueError(f"keep_results={keep_results!r}: expected a bool")
        fpc = c.frames_per_chunk
        if num_chunks is None:
            num_chunks = -(-frames.shape[0] // fpc)
            if num_chunks > MAX_CHUNKS:
                raise ValueError(f"the trajectory makes {num_chunks} chunks: allowed at most {MAX_CHUNKS}")
        frames = frames[: num_chunks * fpc]  # frames past the rollout are never used
        session = Session(session_id, frames, num_chunks, fpc, seed, context, keep_results=keep_results)
        prepared = self.runner.inputs.prepare(inputs, session.chunk_poses)  # validated before the session exists
        self.scheduler.add_session(session)
        self.runner.inputs.put(session_id, prepared)

    def has_unfinished_sessions(self) -> bool:
        return bool(self.scheduler.running())

    # --- stepping -------------------------------------------------------------------------------------
    def step(self) -> list[ChunkResult]:
        """Generate the next chunk of every running session; returns their ChunkResults."""
        self._check_open()
        start = time.perf_counter()
        batch = self.scheduler.schedule(self._step)
        if batch is None:
            self.scheduler.poll()
            return []
        resident = self.block_manager.num_used * self.runner.page_bytes
        self._peak_resident = max(self._peak_resident, resident)
        ending = any(s.next_chunk + 1 >= s.num_chunks for s in batch.sessions)
        if self.connector is not None:
            self.connector.bind_connector_metadata(batch.connector_meta)
        try:
            latents = self.runner.execute(self._step, batch.rows, batch.plan, batch.requests)
        finally:
            if self.connector is not None:
                self.connector.clear_connector_metadata()
        elapsed = time.perf_counter() - start
        if self.runner.recall is not None:
            # after the timing (the diagnostic is not part of the step) and before finish, which may
            # end sessions and let the connector drop what the window held (kept_indices)
            self.runner.recall.finish_step()
        if ending and self.connector is not None:
            # a session ends in this step: the connector may free its entries as it finishes, so
            # keep what the bank held before (the run summary's "bank before sessions ended")
            self._last_connector_metrics = self.connector.metrics()
        results = self.scheduler.finish(batch, latents, elapsed, resident, mean_pose_matrix)
        for r in results:
            if r.finished:
                self.runner.end_session(r.session_id)  # its conditioning and action caches
        if self.runner.recall is not None:
            for r in results:
                r.attention_recall = self.runner.recall.take(r.session_id, r.chunk_index)
                if r.finished:
                    self.runner.recall.end_session(r.session_id)
        self._step += 1
        self._chunks += len(results)
        self._busy_s += elapsed
        return results

    def run(self, on_result: Callable[[ChunkResult], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict[str, list[torch.Tensor]]:
        """Step until every session finished (or ``should_stop()`` is true after a step: Ctrl-C);
        ``on_result`` sees each ChunkResult (progress bars, streaming). Then waits (bounded) for a
        connector's outstanding stores. Returns session -> latents of the sessions that keep results."""
        running = [s.session_id for s in self.scheduler.running() if s.keep_results]
        while self.has_unfinished_sessions() and not (should_stop is not None and should_stop()):
            for r in self.step():
                if on_result is not None:
                    on_result(r)
        self.drain()
        return {sid: self.results(sid) for sid in running if sid in self.scheduler.sessions}

    def generate(self, sessions: list[dict] | None = None, **session_kwargs) -> dict[str, list[torch.Tensor]]:
        """Add sessions (each a dict of add_session arguments; or one session from the keyword
        arguments, id ``"s0"`` unless given) and run them. Returns session -> latents per chunk."""
        specs = list(sessions or []) or [session_kwargs]
        for i, spec in enumerate(specs):
            spec = dict(spec)
            self.add_session(spec.pop("session_id", f"s{i}"), **spec)
        return self.run()

    def drain(self, timeout_s: float = _DRAIN_TIMEOUT_S) -> None:
        """Poll the connector until finished sessions' pages are released (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        self.scheduler.poll()
        while self.scheduler.has_pending() and time.monotonic() < deadline:
            time.sleep(0.001)
            self.scheduler.poll()
        if self.scheduler.has_pending():
            logger.warning("connector still holds pages of finished sessions after %.0f s", timeout_s)

    # --- results ---------------------------------------------------------------------------------------
    def chunk_results(self, session_id: str) -> list[ChunkResult]:
        try:
            session = self.scheduler.sessions[session_id]
        except KeyError:
            raise ValueError(f"unknown session {session_id!r} (a session added with keep_results=False is "
                             "forgotten when it finishes)") from None
        if not session.keep_results:
            raise ValueError(f"session {session_id!r} was added with keep_results=False: its results "
                             "were only returned by step()")
        return list(session.results)

    def results(self, session_id: str) -> list[torch.Tensor]:
        """Latents of each generated chunk of the session: [F, C, Hl, Wl] fp32 on the CPU."""
        return [r.latents for r in self.chunk_results(session_id)]

    def drop_session(self, session_id: str) -> None:
        """Forget a finished session and its results; its id may then be used again."""
        self.scheduler.drop_session(session_id)

    def metrics(self) -> dict:
        """Engine gauges and counters; ``connector``: the connector's metrics now, and
        ``connector_before_session_end``: as they were just before the latest session ended (a
        connector frees a finished session's bank entries, so "now" may show an empty bank)."""
        bm, page_bytes = self.block_manager, self.runner.page_bytes
        return {
            "model": self.model_config.name,
            "attention_window": self.args.attention_window,
            "steps": self._step,
            "chunks": self._chunks,
            "busy_seconds": self._busy_s,
            "chunks_per_s": self._chunks / self._busy_s if self._busy_s else 0.0,
            "num_pages": bm.num_pages,
            "page_size": bm.page_size,
            "page_bytes": page_bytes,
            "kv_cache_bytes": self.runner.kv_cache_bytes,
            "used_pages": bm.num_used,
            "peak_pages": bm.peak_used,
            "resident_kv_bytes": bm.num_used * page_bytes,
            "peak_resident_kv_bytes": max(self._peak_resident, bm.peak_used * page_bytes),
            "sessions_running": len(self.scheduler.running()),
            "sessions_total": self.scheduler.sessions_total,
            "connector": self.connector.metrics() if self.connector is not None else None,
            "connector_before_session_end": self._last_connector_metrics,
        }

    # --- lifecycle -------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VideoEngine is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.connector is not None:
            self.connector.close()
        self.scheduler.release_everything()
        self.runner.close()

    def __enter__(self) -> "VideoEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
