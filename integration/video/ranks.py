"""The video backend with attention heads sharded over ranks (tensor parallel), one connector per rank.

``shard_engine(engine, group)`` turns a built ``VideoEngine`` (same arguments and seeds on every
rank, so the replicated weights and inputs agree) into this rank's part of a head-sharded run:

- the paged KV pools and the connector hold only this rank's ``H / N`` heads
  (``[2, num_pages, page_size, H/N, D]``); page ids, the block manager and the scheduler are the same
  on every rank;
- ``ShardedAttention`` (the runner's ``attn_fn``) slices this rank's heads of q, k, v, runs the paged
  attention on the rank's pools (loads, stores and compression see only those heads) and all-gathers
  the heads of the output, so the rest of the model sees the full attention output;
- ``RankedConnector`` is the WorldKV connector with the rank hooks: each step's plan is checked
  against rank 0's by digest (``PlanDivergenceError`` before any copy), compression statistics are
  all-reduced (``ranks.compression``: every rank keeps the same tokens), store results are
  all-reduced by minimum (a chunk banked on only some ranks is no candidate anywhere; with a
  ``remote`` tier the chunks banked everywhere are written through per rank) and load-error
  pages are united over ranks (a chunk whose load failed on any rank leaves every rank's window).

The projections are replicated, not split (the tiny test models gain nothing from it); what the
connector sees is exactly a head-sharded rank's KV. Store results are reduced per poll, which is
step-aligned with synchronous copies (the CPU path); on CUDA the ranks' polls must be aligned too.
With a ``remote`` config each rank writes its own shard of every chunk banked on all ranks and rank 0
commits it (``ranks.remote.ShardedRemote``); ``resume_remote`` reads each rank's shards and drops a
chunk missing on any rank everywhere.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from worldkv_connector.connector.connector import WorldKVConnector
from worldkv_connector.connector.meta import StoreResult
from worldkv_connector.ranks.compression import sharded_compress_chunk
from worldkv_connector.ranks.group import RankGroup
from worldkv_connector.ranks.remote import ShardedRemote
from worldkv_connector.remote.resume import resume_remote
from worldkv_connector.remote.tier import RemoteTier

__all__ = ["shard_engine", "ShardedAttention", "RankedConnector", "plan_summary"]


def plan_summary(meta) -> tuple:
    """The parts of a step's plan every rank must share (ids and pages, no tensors)."""
    return (meta.step, [(s.key, s.page_ids, s.num_tokens) for s in meta.loads],
            [(s.key, s.page_ids, s.num_tokens) for s in meta.stores],
            [(r.key, r.page_ids, r.delta) for r in meta.rope_deltas], list(meta.released), list(meta.finished_sessions))


class RankedConnector(WorldKVConnector):
    """The WorldKV connector of one head-sharded rank (see the module docstring).
    kv_shape: this rank's shard (``num_kv_heads`` = H / N)."""

    def __init__(self, engine_config, kv_shape, connector_config_json, device, *, group: RankGroup) -> None:
        super().__init__(engine_config, kv_shape, connector_config_json, device)
        self.group = group
        self.sharded = None
        bank = self.worker.bank
        if bank.remote is not None:  # this rank's own tier: one object per chunk per rank
            old = bank.remote
            bank.attach_remote(RemoteTier(old.config, fingerprint=old.fingerprint, rank=group.rank, num_ranks=group.size))
            self.sharded = ShardedRemote(bank.remote, group)
        cfg = self.config
        stores = self.worker.stores

        def compress(k: torch.Tensor, v: torch.Tensor):
            # k, v: [B, T, H/N, D] (B chunks of one layer); scores over all ranks' heads
            cc = sharded_compress_chunk(k, v, frame_tokens=stores.frame_tokens, keep_ratio=cfg.keep_ratio,
                                        pooled=cfg.pooled, group=group)
            return cc.k, cc.v, cc.indices

        stores.compress_fn = compress  # hook 1 (StorePath.compress_fn)
        poll = self.worker.poll

        def ranked_poll():
            report = poll()
            ok = group.all_min([r.ok for r in report.stores])  # banked on every rank, or on none
            dropped = [r.key for r, good in zip(report.stores, ok) if r.ok and not good]
            for key in dropped:  # banked here but not on another rank: never a candidate
                if key in self.worker.bank:
                    self.worker.bank.free(key)
            report.stores = [r if good == r.ok else StoreResult(r.key, False, 0) for r, good in zip(report.stores, ok)]
            if self.sharded is not None:
                for r in report.stores:  # the same chunks in the same order on every rank
                    if r.ok:
                        self._write_through(r.key)
            return report

        self.worker.poll = ranked_poll  # hook 2 (WorldKVWorker.poll, wrapped)

    def _write_through(self, key) -> None:
        entry, bank = self.worker.bank.get(key), self.worker.bank
        self.sharded.write_chunk(key[0], key[1], bank.view(key), poses=entry.pose,
                                 first_frame=entry.meta.get("first_frame"), indices=entry.indices)

    def resume_remote(self, session_id: str, *, source: str | None = None):
        """``WorldKVConnector.resume_remote`` with every rank reading its own shards and agreeing
        (rank 0 lists and holds the writer record; a chunk missing on any rank is left out on all)."""
        self._check_open()
        if self.sharded is None:
            raise ValueError("resume_remote: the connector config has no 'remote' tier")
        return resume_remote(self, session_id, source=source, io=self.sharded)

    def build_connector_meta(self, scheduler_output):
        meta = super().build_connector_meta(scheduler_output)
        self.group.check_plan(meta.step, plan_summary(meta))  # loud on divergence, before any copy
        return meta

    def get_block_ids_with_load_errors(self) -> set[int]:
        mine = sorted(super().get_block_ids_with_load_errors())
        return {p for pages in self.group.gather(mine) for p in pages}


class ShardedAttention:
    """``attn_fn(layer_idx, q, k, v)`` of one rank: its heads through ``inner`` (a
    ``PagedAttention`` on the rank's pools), then the output heads all-gathered.
    q, k, v: ``[B, T, H, D]``; returns ``[B, T, H, D]``."""

    def __init__(self, inner, group: RankGroup, heads: slice) -> None:
        self.__dict__["inner"] = inner
        self.__dict__["group"] = group
        self.__dict__["heads"] = heads

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.heads
        out = self.inner(layer_idx, q[:, :, s], k[:, :, s], v[:, :, s]).contiguous()  # [B, T, H/N, D]
        parts = [torch.empty_like(out) for _ in range(self.group.size)]
        dist.all_gather(parts, out, group=self.group.group)
        return torch.cat(parts, dim=2)

    # the runner drives the step through the inner attention (begin_step, set_pass, connector, ...)
    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


def shard_engine(engine, group: RankGroup) -> None:
    """Make ``engine`` (a ``VideoEngine`` with the WorldKV connector, no session run yet) this
    rank's part of a head-sharded run (see the module docstring)."""
    from worldkv_connector.integration.video.attention import PagedAttention
    from worldkv_connector.integration.video.kv_cache import PagedKVCache

    if not isinstance(engine.connector, WorldKVConnector):
        raise ValueError("shard_engine needs an engine built with kv_connector='worldkv'")
    if engine.has_unfinished_sessions():
        raise ValueError("shard_engine: call it before adding sessions")
    runner, full = engine.runner, engine.model_config.kv_shape()
    heads = group.head_shard(full.num_kv_heads)
    shape = dataclasses.replace(full, num_kv_heads=full.num_kv_heads // group.size)
    view, cfg_json = engine.connector.engine_config, engine.args.kv_connector_config
    engine.connector.close()
    runner.kv_cache.close()
    runner.kv_cache = PagedKVCache(shape, runner.page_size, runner.num_pages, runner.device)
    runner.kv_caches = runner.kv_cache.layers  # "blocks.{i}" -> [2, num_pages, page_size, H/N, D]
    runner.kv_shape = shape
    runner.attention = ShardedAttention(PagedAttention(runner.kv_caches, engine.args.attention_backend), group, heads)
    connector = RankedConnector(view, shape, cfg_json, runner.device, group=group)
    runner.bind_connector(connector)
    engine.connector = connector
    engine.scheduler.connector = connector
