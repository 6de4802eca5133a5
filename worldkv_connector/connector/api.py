"""The engine <-> KV connector contract of the video flavour, and the connector registry.

The contract belongs to the core: hosts (``integration/video``, ``integration/fastvideo``,
``integration/sglang``) import it from here and drive a connector through it.

This is the video flavour of vLLM's ``KVConnectorBase_V1``: the same method names and call order,
with one *request* = one session's next chunk step (3 latent frames). Per engine step:

scheduler side (ids and bookkeeping, no tensors)
  1. ``get_num_new_matched_tokens(request, num_computed_tokens)`` for every running session: the
     connector picks the chunks to put back into the window, in window order, as
     ``request.external`` (each an :class:`ExternalChunk`), and may list pages it gives back in
     ``request.release_pages``. It returns ``(tokens to load into NEW pages, load_is_async)``.
     The engine frees ``release_pages`` at once, before allocating this step's new pages (they are
     not in this step's window; on CUDA a load into a reused page is ordered after the compute
     that last read it), so the connector's hot set is a hard page bound.
  2. The engine allocates pages for every ``needs_load`` external chunk (``ceil(num_tokens /
     page_size)`` pages, last one partial) and calls ``update_state_after_alloc(request, block_ids,
     num_external_tokens)``; ``block_ids[i]`` are the pages of the i-th ``needs_load`` chunk, and
     the engine has already written them into that chunk's ``page_ids``.
  3. ``build_connector_meta(SchedulerOutput)``: the step's plan (loads, stores, RoPE deltas).
     ``SchedulerOutput.committed`` lists the chunks whose clean pass (t=0) runs this step.

worker side (tensors, streams)
  4. ``bind_connector_metadata(meta)``, then ``start_load_kv(forward_context)`` before the first
     forward of the step: enqueue the loads (host -> device copies into the new pages).
  5. In every attention layer, on every pass (denoising passes and the clean pass), the engine calls
     ``wait_for_layer_load("blocks.{i}")`` before the layer reads pages; then it asks
     ``get_block_ids_with_load_errors()`` and drops any external chunk touching a failed page from
     the rest of the step's window (a failed load never becomes wrong attention).
  6. Clean pass only: after a layer wrote the chunk's K/V into its pages, ``save_kv_layer(name,
     kv_caches[name], attn_metadata)``; at the end of the clean pass ``wait_for_save()`` (which must
     not block on copies). Then ``clear_connector_metadata()``.
  7. After the step: ``get_finished(finished_sessions)``; ``take_pages_to_free()``; the engine frees
     the pages returned by ``take_pages_to_free``.

Window of a request (the block table the attention layer reads, in this order):
``sink pages | external pages (request.external, in order) | recent pages | current chunk pages``.
Retrieved chunks sit *after the sink, before the recent window* (not as a prefix of the sequence):
the sink is the start of the world, the recent window is the immediate past.

Eviction with a connector: when a chunk leaves the engine's recent window its pages are NOT freed;
they stay allocated (the connector may keep them hot and put them back as resident externals with
``needs_load=False``) until ``take_pages_to_free()`` returns them (write-through: never before the
chunk's store completed). A chunk leaving at the end of a step is announced in that step's
``SchedulerOutput.evicted``. Pages the engine allocated for ``needs_load`` chunks belong to the
connector's hot set until it lists them in ``release_pages`` (or returns them from
``take_pages_to_free``). When a session ends, ``request_finished`` gets the pages still in its table
(sink + recent); with ``False`` the engine frees them at once, so the connector must not return
them again. Pages the connector returns that it does not hold are ignored with a warning.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from worldkv_connector.shapes import KVShape

__all__ = [
    "ExternalChunk",
    "ChunkRequest",
    "CommittedChunk",
    "SchedulerOutput",
    "EngineView",
    "ForwardContext",
    "AttentionMetadata",
    "ConnectorWindow",
    "VideoKVConnector",
    "register_connector",
    "get_connector_class",
    "create_connector",
    "registered_connectors",
]

logger = logging.getLogger(__name__)


# --- scheduler-side records (ids, poses, page ids; no tensors) ----------------------------------
@dataclass
class ExternalChunk:
    """A chunk the connector puts in the window between the sink and the recent window."""

    chunk_id: int  # the connector's id of the chunk (for the WorldKV connector: the source chunk index)
    num_tokens: int  # tokens per layer it holds (a compressed chunk holds fewer than a full chunk)
    page_ids: list[int] = field(default_factory=list)  # resident: set by the connector; new: by the engine
    needs_load: bool = True  # True: pages are new this step and the worker must load them

    def num_pages(self, page_size: int) -> int:
        return -(-self.num_tokens // page_size)


@dataclass
class ChunkRequest:
    """One session's next chunk step."""

    session_id: str
    chunk_index: int  # index of the chunk being generated in its session
    first_frame: int  # absolute latent frame of the chunk's first frame (= chunk_index * frames_per_chunk)
    frame_poses: np.ndarray  # [frames_per_chunk, 4, 4] float64 camera-to-world of the new chunk's frames
    frame_tokens: int  # tokens per latent frame
    page_size: int  # tokens per page
    external: list[ExternalChunk] = field(default_factory=list)  # set by get_num_new_matched_tokens
    release_pages: list[int] = field(default_factory=list)  # pages the connector gives back this step


@dataclass
class CommittedChunk:
    """A chunk whose clean pass runs this step: its K/V lands in ``page_ids`` during that pass."""

    session_id: str
    chunk_id: int  # chunk index in its session
    page_ids: list[int]
    num_tokens: int  # tokens per layer (a whole chunk: frames_per_chunk * frame_tokens)
    frame_poses: np.ndarray  # [frames_per_chunk, 4, 4] camera-to-world


@dataclass
class SchedulerOutput:
    step: int  # engine step number (one step = one chunk of every running session)
    requests: list[ChunkRequest]
    committed: list[CommittedChunk]
    # chunks that leave the engine's recent window at the end of this step (after the clean pass);
    # from then on their pages are held for the connector until take_pages_to_free returns them.
    # Announced in the same step so the connector can bank and keep them without a step of delay
    # (an addition to vLLM's contract; with recent_frames=0 the committed chunk itself leaves).
    evicted: list[CommittedChunk] = field(default_factory=list)


# --- what the engine tells a connector about itself ---------------------------------------------
@dataclass(frozen=True)
class EngineView:
    """The engine settings a connector may read (passed as ``engine_config``)."""

    model: str
    num_layers: int
    frames_per_chunk: int
    frame_tokens: int
    page_size: int
    num_pages: int
    sink_frames: int
    recent_frames: int
    attention_window: str  # "full" or "sliding"
    dtype: str

    @property
    def sink_chunks(self) -> int:
        return self.sink_frames // self.frames_per_chunk

    @property
    def recent_chunks(self) -> int:
        return self.recent_frames // self.frames_per_chunk

    @property
    def chunk_tokens(self) -> int:
        return self.frames_per_chunk * self.frame_tokens


# --- worker-side records (passed to start_load_kv / save_kv_layer) --------------------------------
@dataclass
class AttentionMetadata:
    """Per-step attention plan, built once and reused by every layer (STYLE §9).

    block_table: [B, max_pages] int32 and page_lens: [B, max_pages] int32 on the KV device
    (window order sink | external | recent | current; unused entries have length 0).
    slot_mapping: [B, T] int64 flat slot (page * page_size + offset) of each current-chunk token.
    committed: row -> the CommittedChunk whose K/V the clean pass writes (rows in batch order).
    """

    block_table: torch.Tensor
    page_lens: torch.Tensor
    slot_mapping: torch.Tensor
    session_ids: list[str]
    committed: list[CommittedChunk]
    is_clean_pass: bool = False
    timestep: torch.Tensor | None = None  # [B] fp32 sigma of this pass


@dataclass
class ForwardContext:
    """What ``start_load_kv`` sees: the step's requests and the attention plan."""

    step: int
    requests: list[ChunkRequest]
    attn_metadata: AttentionMetadata
    kv_caches: dict[str, torch.Tensor]


class ConnectorWindow(NamedTuple):
    """The attention window a connector's config defines (``VideoKVConnector.window_frames``).
    ``source`` names it in the engine's errors; ``defaults``: the keys the config left out."""

    sink_frames: int
    recent_frames: int
    source: str = "the connector's window"
    defaults: frozenset[str] = frozenset()


class VideoKVConnector:
    """Base class of video KV connectors. Every hook has a do-nothing default so a connector
    overrides only what it needs. Scheduler and worker halves may live in one object in-process."""

    # --- before the connector is built (the engine sizes its window and cache from these) -----
    @classmethod
    def window_frames(cls, connector_config_json: str | None) -> ConnectorWindow | tuple[int, int] | None:
        """``(sink_frames, recent_frames)`` the connector's config asks for (or a
        :class:`ConnectorWindow`), or None when it has no say; the engine's flags must agree."""
        return None

    @classmethod
    def hot_pages(cls, connector_config_json: str | None, page_size: int, frame_tokens: int) -> int:
        """Pages per session the connector may hold beyond the engine's window (its hot set)."""
        return 0

    def __init__(self, engine_config: EngineView, kv_shape: KVShape, connector_config_json: str | None, device):
        self.engine_config = engine_config
        self.kv_shape = kv_shape
        self.connector_config_json = connector_config_json
        self.device = torch.device(device)
        self._metadata: Any = None

    # --- scheduler side --------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: ChunkRequest, num_computed_tokens: int) -> tuple[int, bool]:
        """Choose the chunks to put back for ``request`` (fill ``request.external`` in window order
        and ``request.release_pages``). ``num_computed_tokens``: tokens already in the session's
        window (sink + recent). Returns (tokens to load into NEW pages, load_is_async). The video
        engine always loads within the step (layer by layer), so ``load_is_async`` is informative."""
        return 0, False

    def update_state_after_alloc(self, request: ChunkRequest, block_ids: list[list[int]], num_external_tokens: int) -> None:
        """``block_ids[i]``: pages allocated for the i-th ``needs_load`` chunk of ``request.external``."""

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object:
        """The step's plan: loads (bank key -> pages), stores (committed pages -> bank key), RoPE deltas."""
        return None

    def request_finished(self, session_id: str, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Session ended; ``block_ids`` are the pages it still holds. True = the engine must wait
        until ``session_id`` appears in the first set of ``get_finished`` before freeing them."""
        return False, None

    def take_pages_to_free(self) -> list[int]:
        """Pages handed over at eviction whose store completed and that the connector no longer uses."""
        return []

    # --- worker side -----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """``"blocks.{i}"`` -> [2, num_pages, page_size, Hkv, D] (K at [0], V at [1]) on the KV device."""

    def bind_connector_metadata(self, meta: object) -> None:
        self._metadata = meta

    def clear_connector_metadata(self) -> None:
        self._metadata = None

    def start_load_kv(self, forward_context: ForwardContext) -> None:
        """Enqueue this step's loads (host -> device copies into new pages), an event per layer."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Block until the loads of ``layer_name`` landed; called before the layer reads pages."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata) -> None:
        """Clean pass only: the layer has written the committed chunks' K/V into their pages."""

    def wait_for_save(self) -> None:
        """End of the clean pass. Must not block on the copies themselves."""

    def get_finished(self, finished_req_ids: set) -> tuple[set | None, set | None]:
        """(stores finished, loads finished); ids are (session_id, chunk_id) or, for a finished
        session that asked the engine to wait, the bare session_id."""
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set()

    def metrics(self) -> dict:
        return {}

    def close(self) -> None:
        pass


# --- registry ---------------------------------------------------------------------------------
_REGISTRY: dict[str, type[VideoKVConnector]] = {}


def register_connector(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_connector("worldkv")`` makes ``--kv-connector worldkv`` pick it."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"connector name {name!r}: expected a non-empty str without ':'")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, VideoKVConnector)):
            raise TypeError(f"register_connector({name!r}): {cls!r} is not a VideoKVConnector subclass")
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_connectors() -> list[str]:
    return sorted(_REGISTRY)


def get_connector_class(name: str) -> type[VideoKVConnector]:
    """Resolve a registered name or a ``module:Class`` path; ``ValueError`` if neither."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"--kv-connector {name!r}: expected a registered name or module:Class")
    if ":" in name:
        mod_name, _, cls_name = name.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ValueError(f"--kv-connector {name!r}: cannot import module {mod_name!r} ({exc})") from None
        cls = getattr(module, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, VideoKVConnector)):
            raise ValueError(f"--kv-connector {name!r}: {cls_name!r} in {mod_name!r} is not a VideoKVConnector subclass")
        return cls
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown --kv-connector {name!r}: choose one of {registered_connectors()} or give module:Class"
        ) from None


def create_connector(
    name: str, engine_config: EngineView, kv_shape: KVShape, connector_config_json: str | None, device
) -> VideoKVConnector:
    cls = get_connector_class(name)
    logger.info("KV connector %s (%s.%s)", name, cls.__module__, cls.__qualname__)
    return cls(engine_config, kv_shape, connector_config_json, device)
