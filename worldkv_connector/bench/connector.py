"""``worldkv bench connector``: host time of one connector step (scheduler half + worker half: plan,
submit, poll; not the model) at a model's true page structure.

Cases: ``load_1`` (the hot set changes by one chunk: a turning camera's steady state), ``load_6``
(every retrieved chunk is new) and ``store_1`` (the bank copies of one committed chunk; the
compression kernels are compute, measured by ``bench compress``, and left out). Each step runs the
connector's own code: ``WorldKVScheduler`` (pose query, hot set, metadata), the engine's
``BlockManager`` for the loaded chunks' pages, ``WorldKVWorker`` (``start_load_kv``, every layer's
``wait_for_layer_load``, ``poll``) and, for stores, ``StorePath.begin_step`` / ``submit_layer`` /
``end_step``. The baseline, measured in the same run, is the per-page tensor-pair submission the
connector used before (one pair per layer, K/V and page through ``TransferEngine.submit``); it lives
only here. On the CPU the preset's layers, page size and kept tokens are kept and the heads shrunk
to 1 x 2 so the copies cost almost nothing (``--real-bytes`` keeps the real heads; default on CUDA).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import numpy as np
import torch

from worldkv_connector.bench.common import cpu_threads, print_table
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector.load import LoadPath
from worldkv_connector.connector.meta import StoreResult, StoreSpec, WorkerReport
from worldkv_connector.connector.scheduler import WorldKVScheduler
from worldkv_connector.connector.store import StorePath
from worldkv_connector.connector.worker import WorldKVWorker
from worldkv_connector.integration.video.block_manager import BlockManager
from worldkv_connector.connector.api import ChunkRequest, CommittedChunk, SchedulerOutput
from worldkv_connector.shapes import KVShape, get_preset

HELP = "host time of one connector step (plan, submit, poll) for load_1, load_6 and store_1"
PRESETS = ("tiny", "small", "wan-1.3b", "matrix-game-2", "lingbot-fast")
CASES = ("load_1", "load_6", "store_1")
BANKED = 24  # chunks in the bank, 15 degrees of yaw apart
SESSION = "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="wan-1.3b", help="model page structure (default wan-1.3b)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--real-bytes", action=argparse.BooleanOptionalAction, default=None,
                        help="real head sizes (default: on with CUDA; on the CPU heads shrink to 1 x 2)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per case (median; default 40)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def _yaw_poses(deg: float, frames: int) -> np.ndarray:
    """[frames, 4, 4] camera-to-world poses looking along yaw ``deg`` from the origin."""
    a = math.radians(deg)
    pose = np.eye(4)
    pose[0, 0], pose[0, 2], pose[2, 0], pose[2, 2] = math.cos(a), math.sin(a), -math.sin(a), math.cos(a)
    return np.repeat(pose[None], frames, axis=0)


class _PairsLoadPath(LoadPath):
    """Baseline only: the per-page tensor-pair submission (one pair per layer, K/V, page)."""

    def _submit(self, live, bad, layer_names, kv_caches, transfer, k_only=None):
        ps = self.page_size
        views = [self.bank.view(spec.key) for spec in live]
        for layer, name in enumerate(layer_names):
            pool = kv_caches[name]
            srcs, dsts = [], []
            for spec, view in zip(live, views):
                for kv in (0, 1):
                    for i, page in enumerate(spec.page_ids):
                        n = min(ps, spec.num_tokens - i * ps)
                        srcs.append(view[layer, kv, i * ps:i * ps + n])
                        dsts.append(pool[kv, page, :n])
            job = transfer.submit("load", srcs, dsts, tag=("load", layer))
            for spec in live:
                self.bank.pin(spec.key)
                self._outstanding[spec.key] = self._outstanding.get(spec.key, 0) + 1
            self._jobs[job.job_id] = live
            self._layer_jobs[layer] = job


class _Rig:
    """A scheduler half, a worker half and a block manager over one session's banked chunks."""

    def __init__(self, shape: KVShape, device: torch.device, *, baseline: bool) -> None:
        cfg = WorldKVConfig(retrieval_chunks=6, hot_chunks=6, page_size=64)
        self.shape, self.cfg, self.device = shape, cfg, device
        self.kept = cfg.kept_tokens(shape.frame_tokens)
        self.pages_per_chunk = cfg.pages_per_chunk(shape.frame_tokens)
        slots = BANKED + 8
        cfg = dataclasses.replace(cfg, bank_bytes=slots * shape.chunk_bytes(self.kept))
        self.cfg = cfg
        self.worker = WorldKVWorker(cfg, shape, page_size=cfg.page_size, device=device)
        if baseline:
            self.worker.loads = _PairsLoadPath(self.worker.bank, self.worker.metrics, page_size=cfg.page_size,
                                               device=device)
        self.scheduler = WorldKVScheduler(cfg, frame_tokens=shape.frame_tokens, page_size=cfg.page_size, kv_shape=shape)
        chunk_pages = -(-shape.chunk_tokens // cfg.page_size)
        num_pages = 2 * 6 * self.pages_per_chunk + 4 * chunk_pages
        self.bm = BlockManager(num_pages, cfg.page_size)
        caches = {f"blocks.{i}": torch.zeros(2, num_pages, cfg.page_size, shape.num_kv_heads, shape.head_dim,
                                             dtype=shape.torch_dtype, device=device) for i in range(shape.num_layers)}
        self.worker.register_kv_caches(caches)
        fpc = shape.frames_per_chunk
        bank = self.worker.bank
        for cid in range(BANKED):
            key = (SESSION, cid)
            bank.reserve(key, self.kept, indices=torch.arange(self.kept).expand(shape.num_layers, -1).contiguous())
            bank.view(key).fill_(float(cid % 7))
            bank.mark_ready(key)
            self.scheduler.adopt(SESSION, cid, self.kept, _yaw_poses(cid * 360.0 / BANKED, fpc), cid * fpc,
                                 slot=bank.get(key).slot)
        self.chunk_index = 0
        self.step = 0
        self.loaded: list[int] = []  # chunks loaded per step

    def load_step(self, yaw: float) -> None:
        """One step of the connector for a request looking along ``yaw`` (nothing committed)."""
        s, fpc = self.scheduler, self.shape.frames_per_chunk
        c = self.chunk_index
        req = ChunkRequest(SESSION, c, c * fpc, _yaw_poses(yaw, fpc), self.shape.frame_tokens, self.cfg.page_size)
        s.get_num_new_matched_tokens(req, 0)
        if req.release_pages:
            self.bm.release(req.release_pages, "hot")
        block_ids = [self.bm.allocate(e.num_pages(self.cfg.page_size), "hot", contiguous=True)
                     for e in req.external if e.needs_load]
        s.update_state_after_alloc(req, block_ids, 0)
        meta = s.build_connector_meta(SchedulerOutput(self.step, [req], []))
        self.worker.bind(meta)
        self.worker.start_load_kv()
        for name in self.worker.layer_names:
            self.worker.wait_for_layer_load(name)
        s.update_connector_output(self.worker.poll())
        self.worker.bind(None)
        self.loaded.append(len(meta.loads))
        self.chunk_index += 1
        self.step += 1

    def close(self) -> None:
        self.worker.close()


def _store_setup(rig: _Rig):
    """Pages of one committed chunk and its compressed rows (the compression's output)."""
    shape, ps = rig.shape, rig.cfg.page_size
    pages = rig.bm.allocate(-(-shape.chunk_tokens // ps), "store", contiguous=True)
    k = torch.zeros(1, rig.kept, shape.num_kv_heads, shape.head_dim, dtype=shape.torch_dtype, device=rig.device)
    ids = torch.arange(rig.kept, device=rig.device).unsqueeze(0)
    return pages, k, k.clone(), ids


def _store_ours(rig: _Rig, pages, k, v, ids, cid: int) -> None:
    """Scheduler metadata for one committed chunk, the store path's bank-side plan, one
    ``submit_layer`` per layer, end of the clean pass, poll and index update."""
    s, w = rig.scheduler, rig.worker
    meta = s.build_connector_meta(SchedulerOutput(rig.step, [], [_committed(rig, pages, cid)]))
    w.bind(meta)
    w.start_load_kv()
    for layer in range(rig.shape.num_layers):
        w.stores.submit_layer(layer, k, v, ids, w.transfer)
    w.wait_for_save()
    s.update_connector_output(w.poll())
    w.bind(None)


def _store_pairs(rig: _Rig, pages, k, v, ids, cid: int) -> None:
    """Baseline: the same step with the chunk's pages copied as per-page tensor pairs."""
    s, w = rig.scheduler, rig.worker
    meta = s.build_connector_meta(SchedulerOutput(rig.step, [], [_committed(rig, pages, cid)]))
    spec = meta.stores[0]
    entry = w.bank.reserve(spec.key, rig.kept)
    view = w.bank.view(spec.key)
    ps = rig.cfg.page_size
    for layer, name in enumerate(w.layer_names):
        pool = w.kv_caches[name]
        srcs, dsts = [], []
        for kv in (0, 1):
            for i, page in enumerate(pages):
                n = min(ps, rig.kept - i * ps)
                if n <= 0:
                    break
                srcs.append(pool[kv, page, :n])
                dsts.append(view[layer, kv, i * ps:i * ps + n])
        w.transfer.submit("store", srcs, dsts, tag=("store", layer))
    w.transfer.poll()
    w.bank.mark_ready(spec.key)
    s.update_connector_output(WorkerReport(stores=[_ok(spec, entry)]))


def _ok(spec: StoreSpec, entry) -> StoreResult:
    return StoreResult(spec.key, True, entry.num_tokens)


def _committed(rig: _Rig, pages, cid: int) -> CommittedChunk:
    return CommittedChunk(SESSION, cid, list(pages), rig.shape.chunk_tokens, _yaw_poses(0.0, rig.shape.frames_per_chunk))


def _forget_store(rig: _Rig, cid: int) -> None:
    """Untimed: drop the stored chunk again so every timed store finds the same bank."""
    key = (SESSION, cid)
    if key in rig.worker.bank:
        rig.worker.bank.free(key)
    rig.scheduler.update_connector_output(WorkerReport(evicted=[key]))


def _time_case(case: str, shape: KVShape, device: torch.device, baseline: bool, steps: int, warmup: int) -> dict:
    rig = _Rig(shape, device, baseline=baseline)
    times = []
    try:
        if case.startswith("load"):
            step_deg = 360.0 / BANKED
            for i in range(warmup + steps):
                # load_1: turn one chunk's yaw per step; load_6: jump half a turn (a disjoint top-6)
                yaw = 7.5 + (i * step_deg if case == "load_1" else (i % 2) * 180.0)
                t0 = time.perf_counter()
                rig.load_step(yaw)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            loads = rig.loaded[warmup:]
        else:
            pages, k, v, ids = _store_setup(rig)
            run = _store_pairs if baseline else _store_ours
            for i in range(warmup + steps):
                cid = BANKED + 100 + i
                t0 = time.perf_counter()
                run(rig, pages, k, v, ids, cid)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                _forget_store(rig, cid)
            loads = [0]
        errors = rig.worker.metrics.load_errors + rig.worker.metrics.store_errors
    finally:
        rig.close()
    if errors:
        raise RuntimeError(f"bench connector {case}: {errors} copy error(s); the figures would be meaningless")
    ms = [t * 1e3 for t in times]
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2],
            "chunks_loaded_per_step": statistics.median(loads)}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
    for flag, lo in (("steps", 1), ("warmup", 0), ("threads", 1)):
        value = getattr(args, flag)
        if not lo <= value <= 100_000:
            raise ValueError(f"--{flag}={value} is out of range: allowed {lo} <= {flag} <= 100000")
    real = device.type == "cuda" if args.real_bytes is None else args.real_bytes
    true = get_preset(args.preset)
    shape = true if real else dataclasses.replace(true, name=f"{true.name}-shrunk", num_kv_heads=1, head_dim=2)
    kept = WorldKVConfig(page_size=64).kept_tokens(true.frame_tokens)
    bank_bytes = (BANKED + 8) * shape.chunk_bytes(kept)
    if device.type == "cpu" and bank_bytes > 4 << 30:
        raise ValueError(f"--real-bytes with --preset {args.preset} on the CPU needs a {bank_bytes / 2**30:.1f} GiB "
                         "bank: drop --real-bytes (heads shrunk) or use a GPU")
    print(f"bench connector: {true.name}, {true.num_layers} layers, {kept} kept tokens = "
          f"{-(-kept // 64)} pages of 64 per chunk; heads {shape.num_kv_heads} x {shape.head_dim}"
          + ("" if real else " (shrunk: copies cost almost nothing, the figure is host time)") + f", {device}")
    host, base, detail = {}, {}, {}
    with cpu_threads(argparse.Namespace(threads=args.threads)):
        for case in CASES:
            ours = _time_case(case, shape, device, False, args.steps, args.warmup)
            pairs = _time_case(case, shape, device, True, args.steps, args.warmup)
            host[case], base[case] = ours["median_ms"], pairs["median_ms"]
            detail[case] = {"ours": ours, "baseline": pairs}
    rows = [(c, detail[c]["ours"]["chunks_loaded_per_step"], host[c], detail[c]["ours"]["p25_ms"],
             detail[c]["ours"]["p75_ms"], base[c], base[c] / host[c]) for c in CASES]
    print_table(f"connector host time per step ({true.name}, median of {args.steps} steps)",
                ("case", "loads/step", "ours ms", "p25", "p75", "per-page pairs ms", "x faster"), rows)
    return {"preset": true.name, "layers": true.num_layers, "device": device.type, "real_bytes": real,
            "heads": [shape.num_kv_heads, shape.head_dim], "kept_tokens": kept, "host_ms": host,
            "baseline_host_ms": base, "detail": detail}
