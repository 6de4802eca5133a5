"""Test support shipped with the package (fault injection): failing and slow transfers, damaged and lost bank entries.

``FaultyTransferEngine`` wraps a ``TransferEngine`` with the same API (``submit``, ``submit_plan``
and the connector's ``submit_layers``, one draw per job from one sequence). A job chosen to fail is submitted to the inner engine with no copy pairs, so it gets a real job id and completes through the
normal ``poll`` path, but **no data is copied** (the destination keeps whatever it held) and
``job.error`` says the fault was injected; ``job.nbytes`` still reports the bytes that were asked
for. Not copying (rather than copying garbage) is the realistic failure of a DMA that never ran,
and it lets a test check that stale destination bytes never reach attention. ``delay_polls=N``
holds every job back for N polls after the inner engine saw it complete: the (N+1)-th ``poll``
reports it, and ``job.done()`` stays False until its last held-back poll, which moves completions later
against compute.

``corrupt_entry`` and ``drop_entry`` damage one bank entry in the way a checksum or a presence
check detects. Every wrapper keeps counters (``faults``) so a test can compare what was injected
with what the system under test reported.
"""
from __future__ import annotations

import os
import random
from typing import Any, Callable, Hashable, Sequence

import torch

from worldkv_connector.bank import Bank
from worldkv_connector.checks import check_int
from worldkv_connector.transfer.engine import TransferEngine, TransferJob
from worldkv_connector.transfer.fragments import FragmentPlan

__all__ = ["FaultyTransferEngine", "submit_each_layer", "corrupt_entry", "drop_entry", "INJECTED"]

INJECTED = "injected fault"  # prefix of job.error for injected failures


class _DelayedJob(TransferJob):
    """A job whose completion the fault wrapper holds back: ``done()`` is False until released."""

    def done(self) -> bool:
        if getattr(self, "_fault_polls_left", 0) > 0:
            return False
        return super().done()


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"FaultyTransferEngine {name}={value!r} is out of range: allowed 0 <= {name} <= 1")
    return float(value)


def submit_each_layer(submit_plan: Callable[..., TransferJob], kind: str, plans: Any, *,
                      tags: Sequence[Any] | None = None) -> list[TransferJob]:
    """``submit_layers``'s jobs made by one ``submit_plan(kind, plans.layer(l), tag=tags[l])`` call
    per layer: for a test double that changes what one plan's job does and so must see every layer."""
    tags = [None] * plans.num_layers if tags is None else list(tags)
    return [submit_plan(kind, plans.layer(layer), tag=tag) for layer, tag in enumerate(tags)]


class FaultyTransferEngine:
    """A ``TransferEngine`` look-alike that fails or delays chosen jobs.

    fail_loads / fail_stores: probability that a load / store job fails (seeded by ``seed``).
    fail_jobs: 1-based submission numbers through this wrapper that always fail (equal to job
    ids when the inner engine is fresh). delay_polls: polls each finished job is held back.
    Every submit path of the engine (``submit``, ``submit_plan``, ``submit_layers``) is wrapped and
    draws from one sequence; anything else (``stats``, ``close``, ``device``...) is the inner engine's.
    """

    def __init__(
        self,
        inner: TransferEngine,
        *,
        fail_loads: float = 0.0,
        fail_stores: float = 0.0,
        delay_polls: int = 0,
        seed: int = 0,
        fail_jobs: set[int] | None = None,
    ) -> None:
        self.inner = inner
        self.fail_rate = {"load": _check_rate("fail_loads", fail_loads), "store": _check_rate("fail_stores", fail_stores)}
        self.delay_polls = check_int("FaultyTransferEngine delay_polls", delay_polls, 0, 1_000_000)
        self.fail_jobs = set(fail_jobs or ())
        self._rng = random.Random(seed)
        self._submitted = 0
        self._held: list[_DelayedJob] = []  # finished by the inner engine, not yet reported
        self._unreported: set[int] = set()  # ids of held-back jobs not yet returned by poll
        self.faults = {"failed_loads": 0, "failed_stores": 0, "delayed_jobs": 0}
        self.failed_job_ids: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        # only called for attributes this wrapper does not define: the rest of the engine API. A
        # submit path passed through would get no faults, so one this wrapper lacks is refused.
        if name.startswith("submit"):
            raise AttributeError(f"FaultyTransferEngine does not wrap TransferEngine.{name}: every submit path "
                                 "must draw injected faults, so wrap it here before using it")
        return getattr(self.inner, name)

    def _draw(self, kind: str) -> bool:
        self._submitted += 1
        # draw for every job so the fault pattern depends only on the seed and the submission order
        draw = self._rng.random()
        return self._submitted in self.fail_jobs or draw < self.fail_rate.get(kind, 0.0)

    def _failed(self, kind: str, nbytes: int, after: Any, tag: Any) -> TransferJob:
        job = self.inner.submit(kind, [], [], after=after, tag=tag)
        job.nbytes = nbytes
        job.error = f"{INJECTED}: {kind} job {job.job_id} (submission {self._submitted}) was not copied"
        self.faults["failed_loads" if kind == "load" else "failed_stores"] += 1
        self.failed_job_ids.add(job.job_id)
        return job

    def _held_back(self, job: TransferJob) -> TransferJob:
        if self.delay_polls:
            job.__class__ = _DelayedJob
            job._fault_polls_left = self.delay_polls  # type: ignore[attr-defined]
            self._unreported.add(job.job_id)
            self.faults["delayed_jobs"] += 1
        return job

    def submit(
        self, kind: str, srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor], *, after: Any = None, tag: Any = None
    ) -> TransferJob:
        """As ``TransferEngine.submit``; a failing job copies nothing and carries ``job.error``."""
        if not self._draw(kind):
            return self._held_back(self.inner.submit(kind, srcs, dsts, after=after, tag=tag))
        from worldkv_connector.transfer.runs import check_pairs

        check_pairs(srcs, dsts)  # bad input is still a ValueError, as with the real engine
        return self._held_back(self._failed(kind, sum(s.numel() * s.element_size() for s in srcs), after, tag))

    def submit_plan(self, kind: str, plan: FragmentPlan, *, after: Any = None, tag: Any = None) -> TransferJob:
        """As ``TransferEngine.submit_plan`` (the connector's path); a failing job copies nothing and
        carries ``job.error``. Same draws as :meth:`submit`, in submission order."""
        if not self._draw(kind):
            return self._held_back(self.inner.submit_plan(kind, plan, after=after, tag=tag))
        if not isinstance(plan, FragmentPlan):  # bad input is still a ValueError, as with the real engine
            raise ValueError(f"plan: expected a FragmentPlan (see transfer.fragments), got {type(plan).__name__}")
        return self._held_back(self._failed(kind, plan.nbytes, after, tag))

    def submit_layers(self, kind: str, plans: Any, *, tags: Sequence[Any] | None = None) -> list[TransferJob]:
        """As ``TransferEngine.submit_layers``: one draw per layer, in layer order (as that many
        ``submit_plan`` calls would draw). With no failing layer the inner engine runs the step as
        it would; otherwise each layer is its own job, the chosen ones failed."""
        tags = [None] * plans.num_layers if tags is None else list(tags)
        fails = [self._draw(kind) for _ in range(plans.num_layers)]
        if not any(fails):
            return [self._held_back(job) for job in self.inner.submit_layers(kind, plans, tags=tags)]
        return [self._held_back(self._failed(kind, plans.layer_bytes, None, tag) if fail
                                else self.inner.submit_plan(kind, plans.layer(layer), tag=tag))
                for layer, (fail, tag) in enumerate(zip(fails, tags))]

    def poll(self) -> list[TransferJob]:
        """Jobs whose hold-back ran out on this poll, by job id. Never waits."""
        self._held += self.inner.poll()  # type: ignore[arg-type]
        out, still = [], []
        for job in self._held:
            left = getattr(job, "_fault_polls_left", 0)
            if left <= 0:
                out.append(job)
            else:  # held back for this poll
                job._fault_polls_left = left - 1  # type: ignore[attr-defined]
                still.append(job)
        self._held = still
        self._unreported.difference_update(j.job_id for j in out)
        return sorted(out, key=lambda j: j.job_id)

    def wait(self, job: TransferJob) -> None:
        """Block until ``job`` is done; it is then reported by the next ``poll`` (no hold-back)."""
        self.inner.wait(job)
        job._fault_polls_left = 0  # type: ignore[attr-defined]

    def wait_all(self) -> None:
        self.inner.wait_all()
        for job in self._held:
            job._fault_polls_left = 0  # type: ignore[attr-defined]

    def pending(self) -> int:
        """Jobs submitted whose completion has not been observed yet: with ``delay_polls`` every job
        until ``poll`` reports it (held-back jobs are not observed done), else the inner count."""
        return len(self._unreported) if self.delay_polls else self.inner.pending()

    def __enter__(self) -> "FaultyTransferEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


def corrupt_entry(bank: Bank, key: Hashable, *, seed: int = 0) -> str:
    """Flip one bit of ``key``'s payload where it lies: in its slot (host/GPU tier; detected by
    comparing a checksum taken before, e.g. the one ``save_bank`` records) or in its spill file
    (disk tier; detected by the tier's own sha256 on ``ensure_resident``/``read_payload``).
    Returns the tier that was damaged."""
    entry = bank.get(key)
    if entry is None:
        raise KeyError(f"bank key {key!r} is not in the bank")
    rng = random.Random(seed)
    if entry.tier == "disk":
        path = bank.disk.path_of(key)  # type: ignore[union-attr]
        with open(path, "r+b") as fh:
            size = fh.seek(0, 2)
            pos = rng.randrange(40, size) if size > 40 else 0  # past the header: damage the payload
            fh.seek(pos)
            byte = fh.read(1)
            fh.seek(pos)
            fh.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
        return "disk"
    # the entry's view is strided over its slot; each (layer, K/V) run is contiguous
    run = bank.view(key)[rng.randrange(bank.num_layers), rng.randrange(2)]
    raw = run.view(torch.uint8).view(-1)
    pos = rng.randrange(raw.numel())
    raw[pos] ^= 1 << rng.randrange(8)
    return entry.tier


def drop_entry(bank: Bank, key: Hashable) -> str:
    """Lose ``key`` behind the bank owner's back. Host/GPU tier: removed without telling the evict
    listeners (an index still lists it; ``key in bank`` is False). Disk tier: its spill file is
    deleted (the bank still lists it; ``ensure_resident`` detects it and drops the entry).
    Returns the tier it was on."""
    entry = bank.get(key)
    if entry is None:
        raise KeyError(f"bank key {key!r} is not in the bank")
    if entry.tier == "disk":
        os.unlink(bank.disk.path_of(key))  # type: ignore[union-attr]
        return "disk"
    bank.free(key)  # no listeners are told, as if the memory were lost
    return entry.tier
