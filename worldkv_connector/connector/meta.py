"""Step metadata of the WorldKV connector: what the scheduler half plans, what the worker half runs.

The scheduler half builds one :class:`WorldKVMetadata` per engine step (ids and page numbers only,
no tensors, so it could cross a process boundary as vLLM's connector metadata does). The worker
half turns it into copy descriptors once per step and reuses them for every layer (STYLE §9).
It reports back with one :class:`WorkerReport` per ``get_finished`` call.

A bank key is ``(session_id, chunk_id)``: chunk ids are chunk indices within their session, offset
for a resumed session (``WorldKVConnector.load_bank``): its chunk ``c`` in this run has chunk id
``base + c``, ``base`` being one past the largest chunk id loaded for that session.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ChunkKey", "LoadSpec", "StoreSpec", "RopeDelta", "WorldKVMetadata", "StoreResult", "WorkerReport"]

ChunkKey = tuple[str, int]  # (session_id, chunk_id): the bank key of a chunk


@dataclass(frozen=True)
class LoadSpec:
    """Copy a banked chunk into new pages: page ``i`` receives rows ``[i*page_size, (i+1)*page_size)``
    of every (layer, K/V) run of the entry, the last page partial."""

    key: ChunkKey
    page_ids: tuple[int, ...]
    num_tokens: int  # tokens per layer in the bank entry (= tokens written into the pages)


@dataclass(frozen=True)
class StoreSpec:
    """Bank a chunk committed this step: its clean-pass K/V lands in ``page_ids`` (token order)."""

    key: ChunkKey
    page_ids: tuple[int, ...]
    num_tokens: int  # tokens per layer of the uncompressed chunk (frames_per_chunk * frame_tokens)
    # [frames_per_chunk, 4, 4] float64 camera-to-world: stored with the entry so a saved bank can
    # be re-indexed by pose after load_bank (None: unknown, the entry is not re-indexable)
    frame_poses: np.ndarray | None = field(default=None, compare=False, repr=False)
    first_frame: int = -1  # latent frame its keys were written at (temporal RoPE), -1: unknown
    # the bank slot the scheduler half chose (``SlotDirectory.prepare_store``); None only in a plan
    # made without a scheduler half (a worker driven on its own plans it locally: ``connector.local``)
    slot: int | None = None


@dataclass(frozen=True)
class RopeDelta:
    """Rotate the temporal RoPE channels of a resident chunk's K pages by ``delta`` latent frames
    from the keys' *original* position (``rope_correction``). Applied once per layer per step,
    after that layer's loads landed. ``reload``: the pages hold keys already rotated by an earlier
    step, so the worker first copies the original K rows back from the bank (rotations are never
    accumulated on bf16 pages, which drifts)."""

    key: ChunkKey
    page_ids: tuple[int, ...]
    page_lens: tuple[int, ...]  # valid tokens of each page
    delta: int  # target position - original position, in latent frames
    reload: bool = False


@dataclass
class WorldKVMetadata:
    """The plan of one engine step (``build_connector_meta``)."""

    step: int
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    rope_deltas: list[RopeDelta] = field(default_factory=list)
    released: list[ChunkKey] = field(default_factory=list)  # chunks that left the hot set
    finished_sessions: list[str] = field(default_factory=list)  # sessions that ended since the last plan
    # the scheduler half's slot decisions (``SlotDirectory``), applied by the worker in this order
    # before the step's loads and stores: entries evicted (from either tier), entries spilled to the
    # disk tier (their slots are free then), spilled entries this step loads brought back into the
    # named slots; then each store reserves its slot
    evicted: list[ChunkKey] = field(default_factory=list)
    spilled: list[ChunkKey] = field(default_factory=list)
    restores: list[tuple[ChunkKey, int]] = field(default_factory=list)  # (key, slot)

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.rope_deltas or self.released or self.finished_sessions
                    or self.evicted or self.spilled or self.restores)


@dataclass(frozen=True)
class StoreResult:
    """A store that ended: banked (``ok``) or not (failed copy, no room in the bank)."""

    key: ChunkKey
    ok: bool
    num_tokens: int  # tokens per layer in the bank entry (0 when not banked)


@dataclass
class WorkerReport:
    """What the worker half tells the scheduler half after polling its transfer jobs."""

    stores: list[StoreResult] = field(default_factory=list)
    loads_done: list[ChunkKey] = field(default_factory=list)
    loads_failed: list[ChunkKey] = field(default_factory=list)
    evicted: list[ChunkKey] = field(default_factory=list)  # entries the bank dropped on its own (not directed)
