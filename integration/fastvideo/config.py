"""``FastVideoWorldKVConfig``: what a FastVideo user sets to turn WorldKV on (one dataclass,
validated in ``__post_init__``)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from worldkv_connector.checks import check_int
from worldkv_connector.config import WorldKVConfig

__all__ = ["FastVideoWorldKVConfig", "MODELS"]

# model families the adapter knows (``"auto"`` picks one from the pipeline's transformer class)
MODELS = ("auto", "causal_wan", "matrixgame2", "lingbot2")


@dataclass
class FastVideoWorldKVConfig:
    """The WorldKV window replacing FastVideo's rolling cache: ``[sink | retrieved | recent | current]``.

    connector: ``WorldKVConfig`` keys (dict or JSON), e.g. ``{"retrieval_chunks": 6, "keep_ratio": 0.25}``;
      its ``sink_frames`` / ``recent_frames`` / ``page_size`` must equal the fields below if given.
    sink_frames, recent_frames: latent frames of the sink and of the sliding recent window
      (multiples of the model's 3 frames per chunk).
    page_size: tokens per KV page of the adapter's paged pool.
    kv_pool_bytes: bytes of the paged pool on the model's device (sink + recent + current +
      retrieved chunks must fit: the window is checked against it when a session starts);
      None sizes it for exactly that window.
    context_noise: timestep of the clean pass (FastVideo's ``pipeline_config.context_noise``): a
      transformer call at this timestep commits the chunk (write-through store to the bank).
    yaw_speed, pitch_speed, move_speed: Matrix-Game-2 action integration (degrees per mouse unit
      per video frame, world units per video frame of W/S/A/D), see ``poses.integrate_actions``.
    model: one of ``MODELS``.
    """

    connector: dict | str | None = None
    sink_frames: int = 3
    recent_frames: int = 6
    page_size: int = 64
    kv_pool_bytes: int | None = None
    context_noise: float = 0.0
    yaw_speed: float = 20.0
    pitch_speed: float = 20.0
    move_speed: float = 1.0 / 24
    model: str = "auto"
    frames_per_chunk: int = field(default=3, repr=False)

    def __post_init__(self) -> None:
        for name in ("sink_frames", "recent_frames"):
            v = check_int(f"FastVideoWorldKVConfig.{name}", getattr(self, name), lo=0)
            if v % self.frames_per_chunk:
                raise ValueError(f"FastVideoWorldKVConfig.{name}={v!r}: expected a multiple of "
                                 f"{self.frames_per_chunk} (frames per chunk)")
            setattr(self, name, v)
        if self.sink_frames < self.frames_per_chunk:
            raise ValueError(f"FastVideoWorldKVConfig.sink_frames={self.sink_frames}: the WorldKV window needs a sink "
                             f"of at least one chunk ({self.frames_per_chunk} frames)")
        self.page_size = check_int("FastVideoWorldKVConfig.page_size", self.page_size, 1, 4096)
        if self.kv_pool_bytes is not None:  # None: sized for the window
            self.kv_pool_bytes = check_int("FastVideoWorldKVConfig.kv_pool_bytes", self.kv_pool_bytes, lo=1)
        for name in ("context_noise", "yaw_speed", "pitch_speed", "move_speed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"FastVideoWorldKVConfig.{name}={v!r}: expected a finite number")
        if self.model not in MODELS:
            raise ValueError(f"FastVideoWorldKVConfig.model={self.model!r}: choose one of {list(MODELS)}")
        if isinstance(self.connector, str):
            try:
                self.connector = json.loads(self.connector) if self.connector.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"FastVideoWorldKVConfig.connector: not JSON ({exc})") from None
        if self.connector is None:
            self.connector = {}
        if not isinstance(self.connector, dict):
            raise TypeError(f"FastVideoWorldKVConfig.connector: expected a dict or JSON str, got "
                            f"{type(self.connector).__name__}")
        self.worldkv_config()  # bad connector keys fail here, before any model work

    def worldkv_config(self) -> WorldKVConfig:
        """The connector's config, with the window keys of this config (must agree if both given)."""
        given = dict(self.connector)
        for key in ("sink_frames", "recent_frames", "page_size", "frames_per_chunk"):
            if key in given and given[key] != getattr(self, key):
                raise ValueError(f"FastVideoWorldKVConfig.connector[{key!r}]={given[key]!r} disagrees with "
                                 f"{key}={getattr(self, key)!r}: give it once")
            given[key] = getattr(self, key)
        return WorldKVConfig.from_json(json.dumps(given))

    def connector_json(self) -> str:
        return self.worldkv_config().to_json()

    @property
    def window_chunks(self) -> int:
        """Chunks the attention window holds at most: sink + retrieved + recent + current."""
        c = self.worldkv_config()
        return (self.sink_frames + self.recent_frames) // self.frames_per_chunk + c.retrieval_chunks + 1

    def pool_chunks(self) -> int:
        """Chunks the default paged pool holds: the window, the connector's hot set beside it and
        one evicted chunk whose store is in flight."""
        c = self.worldkv_config()
        return self.window_chunks + c.hot_chunks + 1
