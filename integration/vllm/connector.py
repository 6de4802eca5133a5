"""``WorldKVConnector``: the WorldKV bank as a vLLM ``KVConnectorBase_V1`` plugin.

Under vLLM (language models) the connector is a lossless prefix-KV offloader: every full block a
request computes is copied into the core's bank (pinned host memory when CUDA is present), keyed
by vLLM's block hash within the request's namespace (cache salt, LoRA). A later request whose
prefix hashes are banked gets them back as a connector hit instead of recomputing them.
Compression and pose retrieval are off: LLM prefix KV must be exact (DESIGN §4).

Loads are asynchronous by default (``load_async``): the request waits in
``WAITING_FOR_REMOTE_KVS`` while its blocks are copied; on the CPU the copy engine runs the copy
synchronously inside ``start_load_kv`` and reports it finished in the same step. With
``"load_async": false`` the blocks are copied in ``start_load_kv`` before the forward instead.
A block that cannot be loaded (its bank entry was evicted or dropped after the scheduler counted
it, or the copy failed) is reported through ``get_block_ids_with_load_errors``; vLLM then
recomputes it or fails the request per ``kv_load_failure_policy`` ("recompute" recommended).

Usage::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "WorldKVConnector",
        "kv_connector_module_path": "worldkv_connector.integration.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"bank_bytes": 8589934592}}'
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from worldkv_connector.bank.layout import BankLayout
from worldkv_connector.config import AUTO_BANK_SHARE, WorldKVConfig

from .scheduler import WorldKVConnectorMetadata, WorldKVScheduler
from .worker import WorldKVWorker

if TYPE_CHECKING:  # pragma: no cover - type names only
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["WorldKVConnector", "VLLMConnectorConfig", "WorldKVConnectorStats", "vllm_bank_bytes"]

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handler prints these lines

# WorldKVConfig keys that only mean something to the video backend (poses, windows, compression
# layout); accepted so one JSON can serve both hosts, and ignored here
_VIDEO_ONLY_KEYS = (
    "retrieval_chunks", "sink_frames", "recent_frames", "frames_per_chunk", "policy", "fov_degrees",
    "fov_near", "fov_far", "pooled", "rope_correction", "hot_chunks", "copy_kernel_threshold_bytes",
)
_VLLM_KEYS = {"load_async": bool}
_MiB = 1 << 20
_FALLBACK_BANK_BYTES = 8 << 30  # bank_bytes where the machine cannot say how much memory it has


@dataclass(frozen=True)
class VLLMConnectorConfig:
    """``kv_connector_extra_config``: the core's :class:`WorldKVConfig` keys plus ``load_async``.

    Used core keys: ``bank`` ("cpu" or "gpu"), ``bank_bytes``, ``eviction``, and ``bank_dir`` /
    ``disk_bytes`` (a disk tier that full-bank victims spill to). ``keep_ratio`` must stay 1.0
    and ``page_size`` (if given) must equal vLLM's block size. Without ``bank_bytes`` the default
    is :func:`vllm_bank_bytes` (the same number in vLLM's scheduler and worker processes).
    """

    core: WorldKVConfig = field(default_factory=WorldKVConfig)
    load_async: bool = True

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None, *, block_size: int,
                          gpu_memory_utilization: float = 0.9) -> "VLLMConnectorConfig":
        extra = dict(extra or {})
        if "bank_bytes" not in extra:
            extra["bank_bytes"] = vllm_bank_bytes(extra.get("bank", "cpu"), gpu_memory_utilization)
        own = {}
        for name, typ in _VLLM_KEYS.items():
            if name in extra:
                value = extra.pop(name)
                if not isinstance(value, typ):
                    raise ValueError(
                        f"kv_connector_extra_config.{name}={value!r} has the wrong type: expected "
                        f"{typ.__name__}, got {type(value).__name__}"
                    )
                own[name] = value
        if "keep_ratio" in extra and extra["keep_ratio"] != 1.0:
            raise ValueError(
                f"kv_connector_extra_config.keep_ratio={extra['keep_ratio']!r} is not allowed under vLLM: "
                "prefix KV must be exact, so compression is off (allowed: 1.0)"
            )
        if "page_size" in extra and extra["page_size"] != block_size:
            raise ValueError(
                f"kv_connector_extra_config.page_size={extra['page_size']!r} does not match vLLM's "
                f"block_size={block_size}: allowed {block_size} (or leave it out)"
            )
        core = WorldKVConfig.from_dict({**extra, "keep_ratio": 1.0, "page_size": block_size})
        ignored = sorted(k for k in extra if k in _VIDEO_ONLY_KEYS)
        if ignored:
            logger.info("WorldKV connector under vLLM ignores video-backend keys %s", ignored)
        return cls(core=core, **own)


@dataclass
class WorldKVConnectorStats(KVConnectorStats):
    """Counters of one logging interval (summed over workers and the scheduler).

    Keys: hit_tokens, hit_requests (scheduler); load_blocks/tokens/bytes/s,
    store_blocks/tokens/bytes/s, load_error_blocks, store_error_blocks, store_skipped_blocks,
    evictions (workers).
    """

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "WorldKVConnectorStats":
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out = dict(self.data)
        for kind in ("load", "store"):
            secs = out.get(f"{kind}_s", 0.0)
            if secs > 0:
                out[f"{kind}_GBps"] = round(out.get(f"{kind}_bytes", 0) / secs / 1e9, 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


def _block_size(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> tuple[int, Any]:
    """vLLM's block size and the one KV cache group's spec; ValueError for setups we do not serve."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if not vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("WorldKVConnector needs enable_prefix_caching=True: vLLM's block hashes key the bank")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ValueError(f"WorldKVConnector supports one full-attention KV cache group, got {kinds}")
    spec = groups[0].kv_cache_spec
    if getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None):
        raise ValueError("WorldKVConnector does not support sliding-window or chunked attention caches")
    hash_bs = kv_cache_config.hash_block_size or spec.block_size
    if hash_bs != spec.block_size or vllm_config.parallel_config.decode_context_parallel_size != 1:
        raise ValueError(
            f"WorldKVConnector needs one block hash per KV block: hash_block_size={hash_bs}, "
            f"block_size={spec.block_size}, decode_context_parallel_size="
            f"{vllm_config.parallel_config.decode_context_parallel_size} (allowed: equal sizes, dcp 1)"
        )
    return spec.block_size, spec


def vllm_bank_bytes(tier: str, gpu_memory_utilization: float) -> int:
    """``bank_bytes`` when the extra config leaves it out: ``AUTO_BANK_SHARE`` of this machine's
    *total* memory (physical host memory for a cpu bank; for a gpu bank, of the share of device 0's
    total memory vLLM leaves unused, ``1 - gpu_memory_utilization``), in whole MiB, at least 64 MiB.

    vLLM builds the connector in its scheduler process and in every worker process; the core's
    default (a share of the memory *free* in the process making the config) could differ between
    them, this one cannot on one machine, so the scheduler half's directory and every worker's bank
    get the same ``num_slots`` (each worker checks it against the metadata's ``bank_slots``)."""
    try:
        if tier == "gpu":
            from vllm.platforms import current_platform

            total = int(current_platform.get_device_total_memory(0) * max(0.0, 1.0 - gpu_memory_utilization))
        else:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except Exception:  # noqa: BLE001 - the machine cannot say: the core's fallback size
        total = None
    if not total:
        return _FALLBACK_BANK_BYTES  # a fixed size: still the same number in every process
    return max(64 * _MiB, int(total * AUTO_BANK_SHARE) // _MiB * _MiB)


def _bank_layout(core: WorldKVConfig, spec: Any, kv_cache_config: "KVCacheConfig", block_size: int) -> BankLayout:
    """The layout of each worker's bank (``WorldKVWorker.register_kv_caches`` builds it from the same
    sizes), for the scheduler half to decide its slots and disk tier."""
    layers = len(kv_cache_config.kv_cache_groups[0].layer_names)
    return BankLayout(layers, spec.num_kv_heads, spec.head_size, spec.dtype, block_size, core.bank_bytes, core.bank)


class WorldKVConnector(KVConnectorBase_V1):
    """Thin facade: the scheduler role delegates to :class:`WorldKVScheduler`, the worker role to
    :class:`WorldKVWorker`. ``stats()`` gives cumulative counters of this process's half."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        block_size, self._spec = _block_size(vllm_config, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.config = VLLMConnectorConfig.from_extra_config(
            extra, block_size=block_size, gpu_memory_utilization=vllm_config.cache_config.gpu_memory_utilization)
        self.scheduler: WorldKVScheduler | None = None
        self.worker: WorldKVWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            layout, core = _bank_layout(self.config.core, self._spec, kv_cache_config, block_size), self.config.core
            self.scheduler = WorldKVScheduler(
                block_size=block_size,
                num_workers=vllm_config.parallel_config.world_size,
                load_async=self.config.load_async,
                # only CUDA copies outlive the step that issued them (the CPU engine is synchronous)
                stores_in_flight=vllm_config.device_config.device_type == "cuda",
                num_slots=layout.num_slots, eviction=core.eviction, entry_bytes=layout.entry_bytes,
                disk_bytes=core.disk_bytes if core.bank_dir is not None else 0,
            )
        else:
            self.worker = WorldKVWorker(self.config.core, block_size=block_size, load_async=self.config.load_async)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped store is only a future miss

    # --- worker side ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.worker is not None:
            self.worker.register_kv_caches(
                kv_caches, num_blocks=self._kv_cache_config.num_blocks,
                num_kv_heads=self._spec.num_kv_heads, head_size=self._spec.head_size,
            )
            bank = self.worker.bank
            if bank is not None:
                logger.info("WorldKV: bank (%s%s) holds %d blocks of %d tokens, %.3g MiB each (bank_bytes %.3g GiB)",
                            bank.tier, ", pinned" if bank.pinned else "", bank.num_slots, bank.slot_tokens,
                            bank.slot_bytes / (1 << 20), bank.capacity_bytes / (1 << 30))

    def _meta(self) -> WorldKVConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, WorldKVConnectorMetadata), type(meta)
        return meta

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, WorldKVConnectorMetadata):
            self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-request jobs finished before any layer reads them

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any
    ) -> None:
        return  # stores are issued in wait_for_save, once the forward wrote every layer

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self.worker is None else self.worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self):
        return None if self.worker is None else self.worker.build_worker_meta()

    def get_kv_connector_stats(self) -> WorldKVConnectorStats | None:
        half = self.worker if self.worker is not None else self.scheduler
        data = half.take_interval_stats() if half is not None else {}
        return WorldKVConnectorStats(data=data) if any(data.values()) else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> WorldKVConnectorStats:
        return WorldKVConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.log_totals()
        if self.worker is not None:
            self.worker.shutdown()

    # --- scheduler side ------------------------------------------------------------------------
    def on_new_request(self, request: "Request") -> None:
        if self.scheduler is not None:
            self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self.scheduler is not None:
            self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler is None:
            return False, None
        return self.scheduler.request_finished(request)

    def has_pending_push_work(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_pending_work()

    def reset_cache(self) -> bool | None:
        return None if self.scheduler is None else self.scheduler.reset()

    # --- introspection -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Cumulative counters of this process's half (worker: bytes, blocks, timings, bank and
        engine stats; scheduler: hit tokens and requests, banked keys)."""
        if self.worker is not None:
            return self.worker.stats()
        assert self.scheduler is not None
        return {**self.scheduler.totals, "ready_keys": self.scheduler.num_ready}
