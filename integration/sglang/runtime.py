"""``WorldKVRuntime``: one WorldKV connector, page allocator and paged K/V pool per model shape in a
process (an SGLang worker), shared by every session of that model; and the plugin's settings.

Settings come from the environment, read when the plugin builds its first cache:

- ``WORLDKV_CONFIG``: the connector's JSON, the same keys as ``--kv-connector-config``
  (``WorldKVConfig``: retrieval_chunks, keep_ratio, sink_frames, recent_frames, hot_chunks, ...).
  ``sink_frames`` / ``recent_frames`` left out take SGLang's own window (its sink and cache size).
- ``WORLDKV_MAX_SESSIONS`` (default 4): sessions that may run at once; sizes the page pool.
- ``WORLDKV_POSELESS`` (default ``off``): what a model without a camera (CausalWan) retrieves:
  ``off`` = nothing (the window is SGLang's sink + recent), ``static`` = every chunk has the
  identity pose, so the retrieval keeps the ``retrieval_chunks`` oldest banked chunks.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from dataclasses import dataclass

import torch

from worldkv_connector.checks import check_int
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.integration.sglang.session import WorldKVSession
from worldkv_connector.integration.video.block_manager import BlockManager
from worldkv_connector.connector.api import EngineView, create_connector
from worldkv_connector.shapes import KVShape

__all__ = ["PluginSettings", "WorldKVRuntime", "CacheGeometry"]

logger = logging.getLogger(__name__)

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_POSELESS = ("off", "static")


@dataclass(frozen=True)
class PluginSettings:
    """The plugin's environment, validated (``ValueError`` names the variable and the value)."""

    config_json: str | None = None
    max_sessions: int = 4
    poseless: str = "off"

    def __post_init__(self) -> None:
        if self.config_json is not None:
            try:
                json.loads(self.config_json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"WORLDKV_CONFIG={self.config_json!r}: not JSON ({exc})") from None
            WorldKVConfig.from_json(self.config_json)  # names a bad key or value
        check_int("WORLDKV_MAX_SESSIONS", self.max_sessions, lo=1)
        if self.poseless not in _POSELESS:
            raise ValueError(f"WORLDKV_POSELESS={self.poseless!r}: expected one of {_POSELESS}")

    @classmethod
    def from_env(cls, environ=None) -> "PluginSettings":
        env = os.environ if environ is None else environ
        raw = env.get("WORLDKV_MAX_SESSIONS", "4")
        try:
            max_sessions = int(raw)
        except ValueError:
            raise ValueError(f"WORLDKV_MAX_SESSIONS={raw!r}: expected an int >= 1") from None
        return cls(env.get("WORLDKV_CONFIG") or None, max_sessions, env.get("WORLDKV_POSELESS", "off"))


@dataclass(frozen=True)
class CacheGeometry:
    """What SGLang's stage asks of one cache list (from ``_allocate_causal_kv_cache``)."""

    model: str
    num_layers: int
    num_heads: int  # heads held by the cache (all of them on this rank)
    head_dim: int
    frame_tokens: int
    frames_per_chunk: int
    sink_tokens: int
    cache_size: int  # SGLang's own window in tokens (sink + rolling part)
    dtype: torch.dtype
    device: torch.device


class WorldKVRuntime:
    """Connector + pages for one model shape. Sessions get ids ``sglang-<n>``."""

    def __init__(self, geometry: CacheGeometry, settings: PluginSettings):
        g = geometry
        if g.dtype not in _DTYPES:
            raise ValueError(f"KV dtype {g.dtype}: the worldkv plugin supports {sorted(map(str, _DTYPES))}")
        self.geometry, self.settings = g, settings
        self.frames_per_chunk, self.frame_tokens = g.frames_per_chunk, g.frame_tokens
        self.chunk_tokens = g.frames_per_chunk * g.frame_tokens
        given = json.loads(settings.config_json) if settings.config_json else {}
        base = WorldKVConfig.from_json(settings.config_json)
        fpc = g.frames_per_chunk
        # SGLang's window, in whole chunks, unless the connector config sets it
        sink_frames = given.get("sink_frames", -(-g.sink_tokens // (g.frame_tokens * fpc)) * fpc)
        rolling = max(0, g.cache_size - g.sink_tokens - self.chunk_tokens) // self.chunk_tokens
        recent_frames = given.get("recent_frames", rolling * fpc)
        changes = dict(sink_frames=sink_frames, recent_frames=recent_frames, frames_per_chunk=fpc)
        if settings.poseless == "off" and g.model == "causal_wan":
            changes["retrieval_chunks"] = 0
        config = base.replace(**changes)
        self.config = config
        self.sink_chunks, self.recent_chunks = config.sink_chunks, config.recent_chunks
        page_size = config.page_size
        per_chunk = -(-self.chunk_tokens // page_size)
        # each session: window + current chunk + hot set + one evicted chunk waiting for its store
        per_session = (self.sink_chunks + self.recent_chunks + 1 + config.hot_chunks + config.retrieval_chunks + 2)
        num_pages = settings.max_sessions * per_session * per_chunk
        self.device = torch.device(g.device)
        self.bm = BlockManager(num_pages, page_size, memory_flag="WORLDKV_MAX_SESSIONS")
        self.kv_shape = KVShape(g.model, g.num_layers, g.num_heads, g.head_dim, g.frame_tokens, _DTYPES[g.dtype], fpc)
        view = EngineView(model=g.model, num_layers=g.num_layers, frames_per_chunk=fpc, frame_tokens=g.frame_tokens,
                          page_size=page_size, num_pages=num_pages, sink_frames=config.sink_frames,
                          recent_frames=config.recent_frames, attention_window="sliding", dtype=_DTYPES[g.dtype])
        self.connector = create_connector("worldkv", view, self.kv_shape, json.dumps(_as_json(config)), self.device)
        shape = (2, num_pages, page_size, g.num_heads, g.head_dim)
        self.kv_caches = {f"blocks.{i}": torch.zeros(shape, dtype=g.dtype, device=self.device)
                          for i in range(g.num_layers)}
        self.connector.register_kv_caches(self.kv_caches)
        self._steps = itertools.count()
        self._ids = itertools.count()
        self._parked: set[str] = set()
        self.sessions: dict[str, WorldKVSession] = {}
        logger.info("worldkv: %s window sink %d + recent %d frames, retrieval %d chunks, keep_ratio %g, %d pages",
                    g.model, config.sink_frames, config.recent_frames, config.retrieval_chunks, config.keep_ratio,
                    num_pages)

    # --- sessions -------------------------------------------------------------------------------
    def new_session(self) -> WorldKVSession:
        if len([s for s in self.sessions.values() if not s.closed]) >= self.settings.max_sessions:
            raise ValueError(f"worldkv: more than WORLDKV_MAX_SESSIONS={self.settings.max_sessions} sessions at once")
        s = WorldKVSession(self, f"sglang-{next(self._ids)}")
        self.sessions[s.session_id] = s
        return s

    def end_session(self, session_id: str) -> None:
        pages = [p for b in self.bm.table(session_id).values() for p in b.page_ids]
        wait, _ = self.connector.request_finished(session_id, pages)
        if wait:
            self.bm.end_session(session_id, to_owner=f"__finished__:{session_id}")
            self._parked.add(session_id)
        else:
            self.bm.end_session(session_id)
        self.sessions.pop(session_id, None)
        self.poll()

    def next_step(self) -> int:
        return next(self._steps)

    # --- pages ----------------------------------------------------------------------------------
    def free_connector_pages(self, pages, source: str) -> None:
        for p in self.bm.release_connector_pages(pages):
            logger.warning("worldkv: connector %s returned page %d, which it does not hold; ignored", source, p)

    def poll(self) -> None:
        """Collect finished copies: parked sessions' pages and pages the connector gives back."""
        done, _ = self.connector.get_finished(set(self._parked))
        for item in done or ():
            if isinstance(item, str) and item in self._parked:
                self.bm.release_all(f"__finished__:{item}")
                self._parked.discard(item)
        self.free_connector_pages(list(self.connector.take_pages_to_free() or ()), "take_pages_to_free")

    def resident_kv_bytes(self) -> int:
        """K/V bytes of the pages in use (every layer, K and V)."""
        return self.bm.num_used * self.kv_shape.page_bytes(self.bm.page_size) * 2 * self.kv_shape.num_layers

    def close(self) -> None:
        for s in list(self.sessions.values()):
            s.close()
        self.connector.close()


def _as_json(config: WorldKVConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
