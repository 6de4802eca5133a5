"""``WorldKVConnector``: the WorldKV connector of the video backend, a thin facade over its halves.

Selected with ``--kv-connector worldkv`` (``VideoEngine(kv_connector="worldkv",
kv_connector_config='{"retrieval_chunks": 6, "keep_ratio": 0.25}')``). The JSON is a
``WorldKVConfig``; the window keys must agree with the engine (see :func:`resolve_config`).
The scheduler half (``WorldKVScheduler``: ids, poses, page bookkeeping) and the worker half
(``WorldKVWorker``: bank, copies, tensors) are separate objects cut along the process boundary,
as in vLLM's offloading connector; here they share a process and ``get_finished`` hands the
worker's report to the scheduler half.

Lifecycle and reliability hooks (beyond vLLM's method names):

- Session end: once a finished session's stores all ended, ``get_finished`` frees its bank
  entries and index entries (its pages went back to the engine already). Set
  ``retain_finished_sessions = True`` to keep them (for ``save_bank`` after the run, or
  diagnostics); retained entries are still reclaimed first when a live session needs room.
- ``save_bank(path, session_id=None)`` / ``load_bank(path)``: persist and resume the world memory
  (``connector/resume.py``); ``load_bank`` goes after construction and before the resumed
  session's first step.
- ``wrap_transfer(fn)``: put a wrapper (e.g. ``testing.FaultyTransferEngine``) around the transfer
  engine; ``transfer=`` in the constructor replaces it outright.
- ``close()`` (also on ``with`` exit and from ``VideoEngine.close``) waits for the copies and
  closes the transfer engine and the bank.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import torch

from worldkv_connector.config import AUTO_BANK_SHARE, WorldKVConfig
from worldkv_connector.connector.meta import ChunkKey
from worldkv_connector.connector.resume import load_connector_bank, save_connector_bank
from worldkv_connector.connector.scheduler import WorldKVScheduler
from worldkv_connector.connector.worker import WorldKVWorker
from worldkv_connector.connector.api import (
    AttentionMetadata, ChunkRequest, ConnectorWindow, EngineView, ForwardContext, SchedulerOutput, VideoKVConnector,
    register_connector,
)
from worldkv_connector.metrics import ConnectorMetrics
from worldkv_connector.remote.resume import resume_remote
from worldkv_connector.shapes import KVShape
from worldkv_connector.transfer import TransferEngine

__all__ = ["WorldKVConnector", "resolve_config"]

logger = logging.getLogger(__name__)

# config keys that must equal the engine's value: (config key, EngineView attribute, engine flag)
_ENGINE_KEYS = (
    ("sink_frames", "sink_frames", "--sink-frames"),
    ("recent_frames", "recent_frames", "--recent-frames"),
    ("frames_per_chunk", "frames_per_chunk", "the model's frames per chunk"),
    ("page_size", "page_size", "--page-size"),
)


def resolve_config(connector_config_json: str | None, engine: EngineView, kv_shape: KVShape) -> WorldKVConfig:
    """Parse ``--kv-connector-config`` and reconcile it with the engine.

    Keys given in the JSON that the engine also sets (sink_frames, recent_frames, frames_per_chunk,
    page_size) must equal the engine's values (``ValueError`` naming both); keys left out take the
    engine's values. The engine must use the sliding window (the connector sits between its sink
    and recent window). Bad keys or values raise ``ValueError`` naming the key.
    """
    config = WorldKVConfig.from_json(connector_config_json)
    given = json.loads(connector_config_json) if connector_config_json and connector_config_json.strip() else {}
    changes = {}
    for key, attr, flag in _ENGINE_KEYS:
        ours, theirs = getattr(config, key), getattr(engine, attr)
        if key in given and ours != theirs:
            raise ValueError(
                f"--kv-connector-config {key}={ours} disagrees with the engine's {flag} {theirs}: "
                f"give the same value to both (or leave {key} out of the connector config)"
            )
        changes[key] = theirs
    if engine.attention_window != "sliding":
        raise ValueError(
            f"--attention-window {engine.attention_window!r}: the worldkv connector needs 'sliding' "
            "(retrieved chunks sit between the sink and the recent window)"
        )
    if (kv_shape.num_layers, kv_shape.frame_tokens) != (engine.num_layers, engine.frame_tokens):
        raise ValueError(
            f"KV shape {kv_shape.name!r} ({kv_shape.num_layers} layers, {kv_shape.frame_tokens} tokens/frame) does not "
            f"match the engine ({engine.num_layers} layers, {engine.frame_tokens} tokens/frame)"
        )
    return config.replace(**changes)


def _check_bank_size(config: WorldKVConfig, kv_shape: KVShape, frame_tokens: int, auto: bool) -> None:
    """A bank that cannot hold ``retrieval_chunks + 1`` chunks retrieves less than asked: refuse it."""
    slot = kv_shape.chunk_bytes(config.kept_tokens(frame_tokens))
    slots = config.bank_bytes // slot
    need = config.retrieval_chunks + 1
    if slots < need:
        given = "the default bank_bytes" if auto else "bank_bytes"
        raise ValueError(
            f"{given}={config.bank_bytes} holds {slots} chunk(s) of {slot} bytes, but retrieval_chunks="
            f"{config.retrieval_chunks} needs at least retrieval_chunks + 1 = {need}: raise bank_bytes to at least "
            f"{need * slot} (or lower retrieval_chunks)"
        )


@register_connector("worldkv")
class WorldKVConnector(VideoKVConnector):
    """WorldKV world memory: pose-indexed, compressed, write-through bank of committed chunks,
    reinserted as pages between the sink and the recent window."""

    def __init__(self, engine_config: EngineView, kv_shape: KVShape, connector_config_json: str | None, device,
                 *, transfer: TransferEngine | None = None):
        super().__init__(engine_config, kv_shape, connector_config_json, device)
        self.config = resolve_config(connector_config_json, engine_config, kv_shape)
        auto = "bank_bytes" not in (json.loads(connector_config_json) if (connector_config_json or "").strip() else {})
        _check_bank_size(self.config, kv_shape, engine_config.frame_tokens, auto)
        # the scheduler half decides the bank's slots from the same shape and config the bank is sized by
        self.scheduler = WorldKVScheduler(self.config, frame_tokens=engine_config.frame_tokens,
                                          page_size=engine_config.page_size, kv_shape=kv_shape)
        self.worker = WorldKVWorker(self.config, kv_shape, page_size=engine_config.page_size, device=self.device,
                                    transfer=transfer)
        slots = self.scheduler.directory.num_slots
        if slots != self.worker.bank.num_slots:
            raise RuntimeError(f"the scheduler half sized the bank at {slots} slots, the worker's bank has "
                               f"{self.worker.bank.num_slots}")
        # False: a finished session's bank and index entries go once its stores ended
        self.retain_finished_sessions = False
        self._closed = False
        bank = self.worker.bank
        logger.info(
            "worldkv: retrieval_chunks=%d keep_ratio=%g policy=%s; bank (%s) holds %d chunks of %.3g MiB "
            "(bank_bytes %.3g GiB%s)", self.config.retrieval_chunks, self.config.keep_ratio, self.config.policy,
            self.config.bank, bank.num_slots, bank.slot_bytes / (1 << 20), bank.capacity_bytes / (1 << 30),
            f", the default: {AUTO_BANK_SHARE:.0%} of {'free device' if self.config.bank == 'gpu' else 'available host'} "
            "memory" if auto else "",
        )

    # --- scheduler side -------------------------------------------------------------------------
    @classmethod
    def window_frames(cls, connector_config_json: str | None) -> ConnectorWindow:
        """The window of the ``WorldKVConfig`` (3 sink and 6 recent frames when left out)."""
        config = WorldKVConfig.from_json(connector_config_json)
        given = json.loads(connector_config_json) if (connector_config_json or "").strip() else {}  # valid: parsed
        defaults = frozenset(k for k in ("sink_frames", "recent_frames") if k not in given)
        return ConnectorWindow(config.sink_frames, config.recent_frames, "--kv-connector-config", defaults)

    @classmethod
    def hot_pages(cls, connector_config_json: str | None, page_size: int, frame_tokens: int) -> int:
        config = WorldKVConfig.from_json(connector_config_json).replace(page_size=page_size)
        return config.hot_chunks * config.pages_per_chunk(frame_tokens)

    def get_num_new_matched_tokens(self, request: ChunkRequest, num_computed_tokens: int) -> tuple[int, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: ChunkRequest, block_ids: list[list[int]],
                                 num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, session_id: str, block_ids: list[int]) -> tuple[bool, dict | None]:
        return self.scheduler.request_finished(session_id, block_ids)

    def take_pages_to_free(self) -> list[int]:
        return self.scheduler.take_pages_to_free()

    # --- worker side ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, meta: object) -> None:
        super().bind_connector_metadata(meta)
        self.worker.bind(meta)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self.worker.bind(None)

    def start_load_kv(self, forward_context: ForwardContext) -> None:
        self.worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata) -> None:
        if attn_metadata is not None and not attn_metadata.is_clean_pass:
            return  # only the clean pass (t = 0) writes the K/V that is committed
        self.worker.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set) -> tuple[set | None, set | None]:
        """Poll the copies; hand the report to the scheduler half. Returns (store keys that ended
        and finished sessions whose stores all ended, load keys that completed)."""
        done, loads_done = self.collect(finished_req_ids)
        return (done or None), (set(loads_done) or None)

    def collect(self, finished_req_ids: set | None = None) -> tuple[set, list[ChunkKey]]:
        """Poll the worker's copies and hand the report to the scheduler half: completed stores
        become ready entries, ended sessions are released. Returns (store keys that ended and
        finished sessions whose stores all ended, load keys that completed)."""
        report = self.worker.poll()
        self.scheduler.update_connector_output(report)
        done = self.scheduler.finished(finished_req_ids)
        for sid in self.scheduler.take_ended_sessions():
            if not self.retain_finished_sessions:
                # after the last store ended: nothing writes its entries any more
                self.scheduler.forget_session(sid)
                self.worker.end_session(sid)
                if self.worker.bank.remote is not None:  # its remote objects go too, unless the world persists
                    self.worker.bank.remote.end_session(sid)
        return done, report.loads_done

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_error_pages()

    # --- diagnostics ----------------------------------------------------------------------------
    @property
    def logit_bias(self) -> dict[str, torch.Tensor] | None:
        """Per layer [num_pages, page_size] fp32 attention logit bias of each page slot (``log`` of the
        tokens a merged key stands for) when the compression merges (tempcache); None otherwise."""
        return self.worker.logit_bias

    def kept_indices(self, session_id: str, chunk_id: int) -> torch.Tensor | None:
        """Kept token ids [L, T'] (CPU int64, ascending, anchor first) of a banked or resident
        chunk: which of its ``frames_per_chunk * frame_tokens`` tokens the window holds. None once
        the chunk left both the bank and the hot set."""
        return self.worker.kept_indices((session_id, chunk_id))

    def drop_session(self, session_id: str) -> int:
        """Free a finished session's bank entries now instead of leaving them to bank eviction."""
        return len(self.worker.drop_session(session_id))

    # --- persistence and hooks ------------------------------------------------------------------
    def save_bank(self, path: str | os.PathLike, session_id: str | None = None, *, extra: dict | None = None) -> dict:
        """Save the banked chunks (every session's, or ``session_id``'s) to the directory ``path``,
        after the stores in flight landed. Call it between engine steps. Returns the manifest."""
        self._check_open()
        return save_connector_bank(self, path, session_id, extra=extra)

    def load_bank(self, path: str | os.PathLike) -> list[ChunkKey]:
        """Load a bank saved by ``save_bank`` and index its chunks by pose, so a session with a
        saved session's id retrieves them (its new chunk ids continue after the saved ones). Call
        it after construction, before that session's first step. ``ValueError`` with nothing
        changed on a bad or mismatched bank (corrupted bytes, other model shape or config)."""
        self._check_open()
        return load_connector_bank(self, path)

    def resume_remote(self, session_id: str, *, source: str | None = None) -> list[ChunkKey]:
        """Resume ``session_id`` (or, with ``source``, join the shared world of that session) from the
        config's remote tier: see ``worldkv_connector.remote.resume``. Call it before the session's
        first step. ``ValueError`` when another engine writes ``session_id``."""
        self._check_open()
        return resume_remote(self, session_id, source=source)

    def wrap_transfer(self, wrap: Callable[[TransferEngine], Any]) -> Any:
        """Replace the transfer engine by ``wrap(current)``, e.g. ``lambda t: FaultyTransferEngine(t,
        fail_loads=0.05)``; the wrapper must poll the engine it wraps (jobs in flight stay
        visible). Call it between steps. Returns the wrapper; ``close`` closes it."""
        self._check_open()
        self.worker.transfer = wrap(self.worker.transfer)
        return self.worker.transfer

    def _merged_metrics(self) -> ConnectorMetrics:
        if not self.worker.bank.closed:
            self.worker.metrics.set_bank(self.worker.bank.stats())
        return ConnectorMetrics().merge(self.scheduler.metrics).merge(self.worker.metrics)

    def metrics(self) -> dict:
        """Counters (bytes stored/loaded, jobs, hits, misses, errors, copy paths), the compression
        ratio and the bank gauges (``bank_bytes``, ``bank_entries``), plus connector state."""
        out = self._merged_metrics().as_dict()
        bank = self.worker.bank
        out.update(
            bank_capacity_bytes=bank.capacity_bytes,
            bank_evictions=bank.evictions,
            held_pages=self.scheduler.held_pages(),
            pending_stores=self.scheduler.pending_stores(),
        )
        return out

    def metrics_prometheus(self) -> str:
        """Prometheus text exposition of the counters (names prefixed ``worldkv_``)."""
        return self._merged_metrics().to_prometheus()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the WorldKV connector is closed")

    def close(self) -> None:
        """Wait for every copy, close the transfer engine and the bank. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.worker.close()

    def __enter__(self) -> "WorldKVConnector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
