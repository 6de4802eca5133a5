"""The remote tier under head-sharded ranks: one object per chunk per rank, committed by rank 0.

Writing a chunk: every rank puts its own shard (``RemoteTier.put_shards``); the ranks gather the
shards' sha256 (None where a put failed); only if every rank's put succeeded does rank 0 write the
commit record (with all ranks' digests) and the kept ids, and the outcome is broadcast, so every
rank agrees whether the chunk is banked.

Reading chunks: rank 0 lists the session's commit records and broadcasts them (it decides what
exists); each rank reads and checks its own shard; the success masks are all-reduced (minimum), so
a chunk whose shard is missing or corrupt on any rank is dropped on every rank, never attended to
with some heads missing.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from worldkv_connector.ranks.group import RankGroup
from worldkv_connector.remote.records import ChunkRecord, RemoteWriterError
from worldkv_connector.remote.tier import RemoteTier

__all__ = ["ShardedRemote"]

logger = logging.getLogger(__name__)


class ShardedRemote:
    """``tier``: this rank's ``RemoteTier`` (``rank``/``num_ranks`` matching ``group``)."""

    def __init__(self, tier: RemoteTier, group: RankGroup) -> None:
        if tier.rank != group.rank or tier.num_ranks != group.size:
            raise ValueError(f"RemoteTier rank {tier.rank}/{tier.num_ranks} does not match the group's "
                             f"{group.rank}/{group.size}")
        self.tier, self.group = tier, group

    def write_chunk(self, session: str, chunk: int, shard: torch.Tensor, *, poses=None, first_frame: int | None = None,
                    indices: torch.Tensor | None = None) -> bool:
        """shard: ``[L, 2, T, H/N, D]`` CPU, this rank's heads. True on every rank iff committed."""
        ok = True
        if self.group.rank == 0:
            ok = self.tier.try_writer(session)  # rank 0 holds the session's writer record
        ok = self.group.all_min([ok])[0]
        digest = self.tier.put_shards([(session, chunk, shard)])[0] if ok else None
        digests = self.group.gather(digest)
        committed = False
        if self.group.rank == 0 and all(d is not None for d in digests):
            self.tier.mark_start(session, chunk)
            rec = self.tier.make_record(session, chunk, shard, list(digests), poses=poses, first_frame=first_frame)
            committed = self.tier.commit(rec, indices)
        committed = bool(self.group.broadcast(committed))
        if not committed:
            logger.warning("chunk %d of session %r not committed (shard puts per rank: %s)", chunk, session,
                           [d is not None for d in digests])
        return committed

    def committed(self, session: str) -> list[ChunkRecord]:
        """Rank 0's list of the session's commit records, on every rank."""
        recs = self.tier.committed(session) if self.group.rank == 0 else None
        return self.group.broadcast(recs)

    def read_chunks(self, records: Sequence[ChunkRecord], outs: Sequence[torch.Tensor],
                    also_ok: Sequence[bool] | None = None) -> list[bool]:
        """Read this rank's shard of each record into ``outs`` (``[L, 2, T, H/N, D]``). The mask is
        the same on every rank: False where any rank missed (or had ``also_ok`` False)."""
        mine = self.tier.get_shards(records, outs)
        if also_ok is not None:
            mine = [a and b for a, b in zip(mine, also_ok)]
        return self.group.all_min(mine)

    def acquire_writer(self, session: str) -> None:
        """Rank 0 takes the session's writer record; a refusal is raised on every rank."""
        err = None
        if self.group.rank == 0:
            try:
                self.tier.acquire_writer(session)
            except ValueError as exc:
                err = str(exc)
        err = self.group.broadcast(err)
        if err is not None:
            raise RemoteWriterError(err)

    def drop_chunk(self, session: str, chunk: int) -> None:
        """Rank 0 removes every rank's objects of a chunk that missed."""
        if self.group.rank == 0:
            self.tier.drop_chunk(session, chunk)
