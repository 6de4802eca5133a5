"""Scheduler half of the vLLM connector: ids and bookkeeping only, no tensors (STYLE §5).

Its ``SlotDirectory`` lists the blocks the workers' banks hold, keyed ``(namespace, block_hash)``
with vLLM's chained block hashes; it answers ``get_num_new_matched_tokens`` from it and turns each
scheduler step into a :class:`WorldKVConnectorMetadata` (loads: bank key -> block id; stores: block
id -> bank key and slot; the keys evicted or spilled to free those slots; the spilled keys this
step loads with the slot each comes back into). It decides the slots, spills and victims of every
worker's bank (vLLM's ``prepare_store`` pattern; all banks have the same ``num_slots``, see
``connector._bank_layout``), with a disk tier too, and the workers only copy and report; a planned
load pins its keys until every worker reported its copy over. Workers report completed stores,
and entries they lost (a failed copy, a missing entry, a damaged spill file), through
:class:`WorldKVWorkerMetadata`; a key is offered as a hit only once every worker confirmed its
store, and a key one worker lost is evicted on all of them.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from worldkv_connector.bank.directory import SlotDirectory

if TYPE_CHECKING:  # pragma: no cover - type names only
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["BlockTransfer", "WorldKVConnectorMetadata", "WorldKVWorkerMetadata", "WorldKVScheduler", "bank_key"]

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handler prints these lines
_LOG_EVERY = 100  # finished requests between two INFO lines of bank hits

BankKey = Hashable  # (namespace: str, block_hash: bytes)


def request_namespace(request: Any) -> str:
    """Tenant namespace of a request's bank keys: its cache salt and LoRA adapter. vLLM already
    folds both into its block hashes; keying by them as well makes "different salts never share"
    a property of this connector, not of the hash function."""
    salt = getattr(request, "cache_salt", None) or ""
    lora = getattr(request, "lora_request", None)
    lora_name = getattr(lora, "lora_name", "") if lora is not None else ""
    return f"salt={salt}|lora={lora_name}"


def bank_key(namespace: str, block_hash: Any) -> BankKey:
    return (namespace, bytes(block_hash))


@dataclass
class BlockTransfer:
    """One request's copies in one step: ``keys[i]`` <-> vLLM block ``block_ids[i]``."""

    req_id: str
    keys: list[BankKey]
    block_ids: list[int]
    # stores: the bank slot of each key, decided by the scheduler half (None: a hand-built plan, which
    # the worker's local planner fills in; a None slot there is no room)
    slots: list[int | None] | None = None


@dataclass
class WorldKVConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step (plan once, run per layer: STYLE §9)."""

    loads: list[BlockTransfer] = field(default_factory=list)
    stores: list[BlockTransfer] = field(default_factory=list)
    # requests preempted this step: their blocks may be overwritten, so pending stores are flushed
    preempted_req_ids: set[str] = field(default_factory=set)
    # finished requests whose block frees wait for their stores (request_finished returned True)
    deferred_req_ids: set[str] = field(default_factory=set)
    # the slot decisions, applied in this order before the step's copies: entries to free (either
    # tier), entries to spill to the disk tier, spilled entries to bring back into the named slots
    evicted: list[BankKey] = field(default_factory=list)
    spilled: list[BankKey] = field(default_factory=list)
    restores: list[tuple[BankKey, int]] = field(default_factory=list)
    bank_slots: int | None = None  # the directory's num_slots: each worker checks its bank agrees


@dataclass
class WorldKVWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: which keys became loadable and which are gone."""

    stored: Counter = field(default_factory=Counter)  # key -> workers that finished its store
    lost: set = field(default_factory=set)  # keys evicted, dropped, failed or missing on a worker
    loaded: Counter = field(default_factory=Counter)  # key -> loads of it that ended (copied or failed)

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "WorldKVWorkerMetadata":
        assert isinstance(other, WorldKVWorkerMetadata)
        return WorldKVWorkerMetadata(stored=self.stored + other.stored, lost=self.lost | other.lost,
                                     loaded=self.loaded + other.loaded)


@dataclass
class _ReqState:
    request: Any
    namespace: str
    block_ids: list[int] = field(default_factory=list)
    num_local_tokens: int = 0  # local prefix-cache hit passed to get_num_new_matched_tokens
    next_store: int = 0  # first block index not yet considered for a store
    unconfirmed: set = field(default_factory=set)  # keys whose store no worker confirmed yet
    finished: bool = False


class WorldKVScheduler:
    """Bookkeeping of the bank on the scheduler side.

    block_size: vLLM's block size, one bank slot. num_workers: workers that each hold a bank
    shard (a key is loadable once all of them stored it). load_async: report hits as asynchronous
    loads (the request waits in WAITING_FOR_REMOTE_KVS) or as synchronous ones (loaded in
    ``start_load_kv`` before the forward). stores_in_flight: whether the worker's copies can
    outlive the step that issued them (CUDA); when False (CPU copies are synchronous) a finished
    request never needs its block frees deferred. num_slots / eviction / disk_bytes / entry_bytes:
    each worker's bank (its slots, its policy, its disk tier's capacity, 0 for none, and the payload
    bytes of an entry: see ``SlotDirectory``), decided here.
    """

    def __init__(self, *, block_size: int, num_workers: int, load_async: bool, stores_in_flight: bool,
                 num_slots: int, eviction: str = "lru", disk_bytes: int = 0, entry_bytes=None) -> None:
        self.block_size = block_size
        self.num_workers = num_workers
        self.load_async = load_async
        self.stores_in_flight = stores_in_flight
        self._reqs: dict[str, _ReqState] = {}
        # ready: every worker holds the key
        self.directory = SlotDirectory(num_slots, eviction, disk_bytes=disk_bytes, entry_bytes=entry_bytes)
        self._evicted: list[BankKey] = []  # victims for the next metadata
        self._loaded: Counter = Counter()  # key -> workers that ended a load of it, toward num_workers
        self._pending: Counter = Counter()  # key -> store confirmations so far
        self._owner: dict[BankKey, str] = {}  # key -> request whose store is unconfirmed
        self._loads: list[BlockTransfer] = []
        self._deferred: set[str] = set()  # deferred requests not yet sent to the worker
        self._awaiting_send: set[str] = set()  # deferred requests awaiting finished_sending
        self.totals = Counter()  # cumulative: hit_tokens, hit_requests, deferred_frees
        self._interval = Counter()

    # --- lookups -------------------------------------------------------------------------------
    def _state(self, request: "Request") -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(request, request_namespace(request))
        return st

    def on_new_request(self, request: "Request") -> None:
        self._state(request)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        """Whole blocks past ``num_computed_tokens`` (block aligned) whose keys every worker holds,
        stopping at the first miss and never covering the last prompt token (vLLM must compute at
        least one token to sample from)."""
        st = self._state(request)
        st.num_local_tokens = num_computed_tokens
        bs = self.block_size
        hashes = request.block_hashes
        limit = min(len(hashes), max(0, request.num_tokens - 1) // bs)
        start = num_computed_tokens // bs
        n = start
        while n < limit and self.is_ready(bank_key(st.namespace, hashes[n])):
            n += 1
        hit = (n - start) * bs
        return hit, (self.load_async and hit > 0)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        st = self._state(request)
        bs = self.block_size
        start, count = st.num_local_tokens // bs, num_external_tokens // bs
        block_ids = blocks.get_block_ids()[0]
        keys = [bank_key(st.namespace, h) for h in request.block_hashes[start : start + count]]
        self._loads.append(BlockTransfer(request.request_id, keys, list(block_ids[start : start + count])))
        for key in keys:
            self.directory.pin(key)  # no victim until every worker's copy is over; a hit (LRU)
        for c in (self.totals, self._interval):
            c["hit_tokens"] += num_external_tokens
            c["hit_requests"] += 1

    # --- per step ------------------------------------------------------------------------------
    def build_connector_meta(self, so: "SchedulerOutput") -> WorldKVConnectorMetadata:
        # spilled blocks this step loads come back first; one that finds no slot is read straight
        # from its file by the workers (the directory's victims are never blocks a load pins)
        restores, evicted = self.directory.prepare_restores([k for load in self._loads for k in load.keys])
        self._evicted.extend(evicted)
        stores: list[BlockTransfer] = []
        preempted = set(so.preempted_req_ids or ())
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan_stores(st, new.num_computed_tokens, so.num_scheduled_tokens.get(new.req_id, 0), stores)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # a resumed request gets a fresh block table; stores restart from the top, and keys
                # the bank already holds are skipped
                st.block_ids, st.next_store = list(new_ids[0]) if new_ids else [], 0
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan_stores(st, cached.num_computed_tokens[i], so.num_scheduled_tokens.get(req_id, 0), stores)
        meta = WorldKVConnectorMetadata(
            loads=self._loads, stores=stores, preempted_req_ids=preempted,
            deferred_req_ids=self._deferred, evicted=self._evicted, spilled=self.directory.take_spilled(),
            restores=restores, bank_slots=self.directory.num_slots,
        )
        self._awaiting_send |= self._deferred
        self._loads, self._deferred, self._evicted = [], set(), []
        return meta

    def _plan_stores(self, st: _ReqState, computed: int, scheduled: int, out: list[BlockTransfer]) -> None:
        """Store every full block whose KV exists after this step and that the bank lacks."""
        hashes = st.request.block_hashes
        # a rollback (failed load truncated by vLLM, preemption) recomputes blocks from `computed` on
        st.next_store = min(st.next_store, computed // self.block_size)
        full = min((computed + scheduled) // self.block_size, len(hashes), len(st.block_ids))
        keys, ids, slots = [], [], []
        for i in range(st.next_store, full):
            key = bank_key(st.namespace, hashes[i])
            if key in self.directory or key in self._owner:
                continue  # banked already, or a store of it is in flight
            got = self.directory.prepare_store(key, self.block_size)
            if got is None:  # no room now (every slot pinned or in flight): skip, not an error
                self.totals["store_skipped_blocks"] += 1
                continue
            self._evicted.extend(got[1])
            keys.append(key)
            ids.append(st.block_ids[i])
            slots.append(got[0])
            self._owner[key] = st.request.request_id
            st.unconfirmed.add(key)
        st.next_store = max(st.next_store, full)
        if keys:
            out.append(BlockTransfer(st.request.request_id, keys, ids, slots))

    def update_connector_output(self, out: "KVConnectorOutput") -> None:
        meta = out.kv_connector_worker_meta
        if isinstance(meta, WorldKVWorkerMetadata):
            for key, n in meta.stored.items():
                self._pending[key] += n
                if self._pending[key] >= self.num_workers:
                    del self._pending[key]
                    self.directory.complete_store(key, True, self.block_size)
                    self._confirm(key)
            for key in meta.lost:
                # one worker lost its shard: the block is no longer loadable anywhere, and the
                # others free theirs (a key pinned by a load goes when its copy is over)
                self._pending.pop(key, None)
                self._drop(key)
                self._confirm(key)
            for key, n in meta.loaded.items():
                self._loaded[key] += n
                while self._loaded[key] >= self.num_workers:  # one planned load ended on every worker
                    self._loaded[key] -= self.num_workers
                    if self.directory.unpin(key, every=False):
                        self._evicted.append(key)
                if not self._loaded[key]:
                    del self._loaded[key]
        for req_id in out.finished_sending or ():
            self._awaiting_send.discard(req_id)
            self._reqs.pop(req_id, None)

    def _drop(self, key: BankKey) -> None:
        if self.directory.remove([key]):
            self._evicted.append(key)

    def _confirm(self, key: BankKey) -> None:
        req_id = self._owner.pop(key, None)
        st = self._reqs.get(req_id) if req_id is not None else None
        if st is not None:
            st.unconfirmed.discard(key)
            waiting = req_id in self._awaiting_send or req_id in self._deferred
            if st.finished and not st.unconfirmed and not waiting:
                self._reqs.pop(req_id, None)

    def log_totals(self) -> None:
        """Log the bank hits so far (at INFO: every ``_LOG_EVERY`` finished requests and at shutdown)."""
        c = self.totals
        logger.info("WorldKV: %d request(s) finished; %d bank hit(s) loaded %d tokens; %d block(s) banked and ready",
                    c["finished_requests"], c["hit_requests"], c["hit_tokens"], self.num_ready)

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        """Defer the block frees while this request's stores may still be reading its blocks."""
        self.totals["finished_requests"] += 1
        if self.totals["finished_requests"] % _LOG_EVERY == 0:
            self.log_totals()
        st = self._reqs.get(request.request_id)
        if st is None:
            return False, None
        st.finished = True
        if self.stores_in_flight and st.unconfirmed:
            self._deferred.add(request.request_id)
            self.totals["deferred_frees"] += 1
            return True, None
        if not st.unconfirmed:
            self._reqs.pop(request.request_id, None)
        return False, None

    def has_pending_work(self) -> bool:
        """Deferred frees need more engine steps to be released."""
        return bool(self._deferred or self._awaiting_send)

    def reset(self) -> bool:
        """Evict every ready entry no planned load pins (every tier), on every worker."""
        for key in [k for k in self.directory.ready_keys() if not self.directory.get(k).pins]:
            self._drop(key)
        return True

    def take_interval_stats(self) -> dict[str, int]:
        out, self._interval = dict(self._interval), Counter()
        return out

    def is_ready(self, key: BankKey) -> bool:
        return self.directory.ready_tokens(key) is not None

    @property
    def num_ready(self) -> int:
        return sum(1 for _ in self.directory.ready_keys())
