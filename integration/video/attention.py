"""Attention of the video backend over the paged KV cache.

Each batch row (one session) reads its window ``[sink | external | recent | current]`` in place from
the pages listed in its block table, with a valid-token count per page: no K/V is concatenated. The
current chunk's K/V is written into its own pages first, on every pass: denoising passes overwrite
it, and the clean pass (t = 0) leaves the committed K/V there.

``WindowPlan`` is the step's plan in Python (segments of pages per row); it is turned into tensors
once per step (``AttentionMetadata``) and reused by every layer and every pass (STYLE §9).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from worldkv_connector.connector.api import AttentionMetadata, CommittedChunk, VideoKVConnector

__all__ = ["Segment", "WindowPlan", "PagedAttention", "select_attention_backend", "ATTENTION_BACKENDS"]

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("torch", "triton")
# kinds of window segments, in window order
SEGMENT_ORDER = ("sink", "external", "recent", "current")


def select_attention_backend(name: str) -> Callable[..., torch.Tensor]:
    """The paged attention function of a backend, signature
    ``fn(q [B,Tq,Hq,D], k_pool, v_pool [num_pages,page_size,Hkv,D], block_table, page_lens [B,P] int,
    *, validate=True) -> [B,Tq,Hq,D]`` (``validate=False``: tables already value-checked this step).
    ``triton`` is imported lazily so the engine runs where the kernel is not built."""
    if name == "torch":
        from worldkv_connector.kernels.paged_attention import paged_attention_torch

        return paged_attention_torch
    if name == "triton":
        try:
            module = importlib.import_module("worldkv_connector.kernels.paged_attention")
            return getattr(module, "paged_attention")
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                "--attention-backend triton needs worldkv_connector.kernels.paged_attention.paged_attention, "
                f"which is not available here ({exc}); use --attention-backend torch"
            ) from None
    raise ValueError(f"--attention-backend {name!r}: choose one of {list(ATTENTION_BACKENDS)}")


@dataclass
class Segment:
    """Consecutive window entries of one chunk: its pages and the valid tokens of each page."""

    kind: str  # "sink", "external", "recent" or "current"
    chunk_id: int
    page_ids: list[int]
    page_lens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.page_lens)


@dataclass
class WindowPlan:
    """The window of every row of the step, in window order, plus the current chunk's slots."""

    page_size: int
    rows: list[list[Segment]] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)
    committed: list[CommittedChunk] = field(default_factory=list)

    def add_row(self, session_id: str, segments: list[Segment], committed: CommittedChunk) -> None:
        ranks = [SEGMENT_ORDER.index(s.kind) for s in segments]
        if ranks != sorted(ranks) or not segments or segments[-1].kind != "current":
            raise ValueError(f"window of {session_id!r} is not ordered sink|external|recent|current: "
                             f"{[s.kind for s in segments]}")
        self.rows.append(segments)
        self.session_ids.append(session_id)
        self.committed.append(committed)

    def external_ids(self, row: int) -> list[int]:
        return [s.chunk_id for s in self.rows[row] if s.kind == "external"]

    def drop_external(self, bad_pages: set[int]) -> list[tuple[str, int]]:
        """Remove every external chunk with a page in ``bad_pages``; returns (session, chunk) dropped."""
        dropped = []
        for sid, segments in zip(self.session_ids, self.rows):
            keep = []
            for s in segments:
                if s.kind == "external" and bad_pages.intersection(s.page_ids):
                    dropped.append((sid, s.chunk_id))
                else:
                    keep.append(s)
            segments[:] = keep
        return dropped

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """block_table, page_lens: [B, max_pages] int32 on ``device`` (padding: page 0, length 0)."""
        ids = [[p for s in row for p in s.page_ids] for row in self.rows]
        lens = [[n for s in row for n in s.page_lens] for row in self.rows]
        width = max(1, max(map(len, ids), default=0))
        bt = torch.zeros(len(ids), width, dtype=torch.int32)
        pl = torch.zeros(len(ids), width, dtype=torch.int32)
        for r, (i, n) in enumerate(zip(ids, lens)):
            bt[r, : len(i)] = torch.tensor(i, dtype=torch.int32)
            pl[r, : len(n)] = torch.tensor(n, dtype=torch.int32)
        return bt.to(device), pl.to(device)

    def slot_mapping(self, device: torch.device) -> torch.Tensor:
        """[B, T] int64: flat slot (page * page_size + offset) of each token of the current chunk."""
        rows = []
        for segments in self.rows:
            cur = segments[-1]
            slots = [p * self.page_size + o for p, n in zip(cur.page_ids, cur.page_lens) for o in range(n)]
            rows.append(slots)
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"current chunks of one batch must have equal token counts, got {[len(r) for r in rows]}")
        return torch.tensor(rows, dtype=torch.int64).to(device)

    def to_metadata(self, device: torch.device) -> AttentionMetadata:
        bt, pl = self.tables(device)
        return AttentionMetadata(
            block_table=bt, page_lens=pl, slot_mapping=self.slot_mapping(device),
            session_ids=list(self.session_ids), committed=list(self.committed),
        )


def write_current_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter the current chunk's K/V into its pages.

    kv_layer: [2, num_pages, page_size, H, D] (pool dtype/device); k, v: [B, T, H, D];
    slot_mapping: [B, T] int64 flat slots on the pool's device.
    """
    _, num_pages, page_size, h, d = kv_layer.shape
    if k.shape[-2:] != (h, d) or k.shape != v.shape or k.shape[:2] != slot_mapping.shape:
        raise ValueError(
            f"k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit pool heads x dim {(h, d)} "
            f"and slot_mapping {tuple(slot_mapping.shape)}"
        )
    slots = slot_mapping.reshape(-1)
    flat = kv_layer.view(2, num_pages * page_size, h, d)  # a view: the write lands in the pool
    flat[0].index_copy_(0, slots, k.reshape(-1, h, d).to(kv_layer.dtype))
    flat[1].index_copy_(0, slots, v.reshape(-1, h, d).to(kv_layer.dtype))


class PagedAttention:
    """The engine's ``attn_fn(layer_idx, q, k, v)`` for one step: binds the step's plan and runs
    every layer and pass of it over the paged pools."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], backend: str = "torch",
                 connector: VideoKVConnector | None = None):
        self.kv_caches = kv_caches
        self.backend_name = backend
        self.backend = select_attention_backend(backend)
        self.connector = connector
        self.plan: WindowPlan | None = None
        self.metadata: AttentionMetadata | None = None
        self.dropped: list[tuple[str, int]] = []  # (session, external chunk) dropped for load errors this step
        self._seen_errors: set[int] = set()
        self._warned_drop = False  # a dropped chunk is logged at WARNING once per run
        # pool geometries (num_pages, page_size) the step's current tables passed the backend's value
        # checks against, with those tables: later layers and passes skip the checks (validate=False)
        self._checked: tuple[torch.Tensor, torch.Tensor, set] | None = None

    def begin_step(self, plan: WindowPlan, device: torch.device) -> AttentionMetadata:
        self.plan = plan
        self.metadata = plan.to_metadata(device)
        self.dropped = []
        self._seen_errors = set()
        self._checked = None
        return self.metadata

    def set_pass(self, timestep: torch.Tensor, clean: bool) -> None:
        """timestep: [B] fp32 sigma of the coming pass; ``clean`` marks the t = 0 commit pass."""
        self.metadata.timestep = timestep
        self.metadata.is_clean_pass = clean

    def end_step(self) -> None:
        self.plan = None
        self.metadata = None
        self._checked = None

    def _apply_load_errors(self) -> None:
        errors = set(self.connector.get_block_ids_with_load_errors() or ())
        new = errors - self._seen_errors
        if not new:
            return
        self._seen_errors |= new
        dropped = self.plan.drop_external(new)
        if dropped:
            # once per run at WARNING (the connector reports the failure itself); DEBUG after that
            log = logger.debug if self._warned_drop else logger.warning
            log("KV load failed for pages %s: dropped %s from this step's window%s", sorted(new), dropped,
                "" if self._warned_drop else " (later drops are logged at DEBUG)")
            self._warned_drop = True
            self.dropped.extend(dropped)
            bt, pl = self.plan.tables(self.metadata.block_table.device)
            self.metadata.block_table, self.metadata.page_lens = bt, pl
            self._checked = None  # new tables: the next layer checks them again

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, T, H, D] post-RoPE, model dtype and device. Returns [B, T, H, D]."""
        meta = self.metadata
        if meta is None:
            raise RuntimeError("PagedAttention called outside a step (begin_step was not called)")
        name = f"blocks.{layer_idx}"
        kv = self.kv_caches[name]
        if self.connector is not None:
            # the pages this layer is about to read must hold the loaded K/V
            self.connector.wait_for_layer_load(name)
            self._apply_load_errors()
        write_current_kv(kv, k, v, meta.slot_mapping)
        if self.connector is not None and meta.is_clean_pass:
            # after the write: the store reads the committed chunk's pages of this layer
            self.connector.save_kv_layer(name, kv, meta)
        bias = getattr(self.connector, "logit_bias", None) if self.connector is not None else None
        # the value checks of the tables (ids in range, lengths in [0, page_size]) run on the first call
        # of the step per pool geometry, inside the backend and in its usual order, and again whenever
        # the tables are replaced (a load error); shape/dtype/device checks run on every call
        bt, pl, geom = meta.block_table, meta.page_lens, (kv.shape[1], kv.shape[2])
        checked = self._checked
        validate = not (checked is not None and checked[0] is bt and checked[1] is pl and geom in checked[2])
        if bias:  # a merging compression: the current chunk's own slots carry no bias (pages are reused)
            bias[name].view(-1).index_fill_(0, meta.slot_mapping.reshape(-1), 0.0)
            out = self.backend(q, kv[0], kv[1], bt, pl, logit_bias=bias[name], validate=validate)
        else:
            out = self.backend(q, kv[0], kv[1], bt, pl, validate=validate)
        if validate:
            if checked is None or checked[0] is not bt or checked[1] is not pl:
                self._checked = checked = (bt, pl, set())
            checked[2].add(geom)
        return out
