"""``worldkv bench index``: latency of a pose-index query (top-k over one session's chunks).

The scheduler scores every banked chunk of a session once per chunk step, so this query sits on
the critical path of every step; the targets are < 2 ms for top-6 over 100,000 chunks with the
``pose`` policy, and < 2 ms over 10,000 / < 20 ms over 100,000 with ``fov``. Chunks are random cameras (positions in a cube that grows with the chunk count,
random yaw and a little pitch), three frames each. The baseline, measured in the same run for the
``pose`` policy, is a per-chunk Python loop over a list of chunk labels (the shape of a bank kept
as Python lists); its answer is checked against the index's.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from worldkv_connector.retrieval import POLICIES, PoseIndex
from worldkv_connector.retrieval.poses import pitch_matrix, yaw_matrix

__all__ = ["HELP", "add_arguments", "run", "random_chunk_poses"]

HELP = "pose-index query latency: top-k over N banked chunks per policy (target < 2 ms at 100k, pose)"
TARGET_MS = 2.0
TARGET_CHUNKS = 100_000
# (policy, chunks) -> target median ms (issue targets; printed, never asserted)
TARGETS = {("pose", 100_000): 2.0, ("fov", 10_000): 2.0, ("fov", 100_000): 20.0}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive ints, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=_int_list, default=[1000, 10_000, 100_000], help="chunk counts (comma-separated)")
    p.add_argument("--k", type=int, default=6, help="chunks retrieved per query")
    p.add_argument("--policy", choices=sorted(POLICIES), action="append", help="policy to time (repeatable; default: all)")
    p.add_argument("--repeats", type=int, default=50, help="timed queries per size and policy")
    p.add_argument("--warmup", type=int, default=5, help="untimed queries first")
    p.add_argument(
        "--budget-s",
        type=float,
        default=4.0,
        help="stop timing one (size, policy) after this many seconds, with at least 5 queries timed",
    )
    p.add_argument(
        "--baseline-repeats", type=int, default=3, help="timed per-chunk-loop baseline queries (pose; 0: skip)"
    )
    p.add_argument("--frames-per-chunk", type=int, default=3, help="frames averaged into one chunk pose")
    p.add_argument("--seed", type=int, default=0)


def random_chunk_poses(
    num_chunks: int, frames_per_chunk: int, rng: np.random.Generator, side: float | None = None
) -> np.ndarray:
    """[N, frames_per_chunk, 4, 4] camera-to-world poses: random positions in a cube of ``side``
    (default ``num_chunks ** (1/3)``: about one chunk per unit volume), random yaw, pitch within
    20 deg, and a per-frame yaw jitter so a chunk's mean rotation is not exactly orthonormal."""
    side = max(num_chunks, 1) ** (1.0 / 3.0) if side is None else side
    base = yaw_matrix(rng.uniform(-180.0, 180.0, num_chunks)) @ pitch_matrix(rng.uniform(-20.0, 20.0, num_chunks))
    jitter = yaw_matrix(rng.uniform(-2.0, 2.0, (num_chunks, frames_per_chunk)))  # [N, F, 3, 3]
    out = np.tile(np.eye(4), (num_chunks, frames_per_chunk, 1, 1))
    out[:, :, :3, :3] = jitter @ base[:, None]
    centre = rng.uniform(0.0, side, (num_chunks, 1, 3))
    out[:, :, :3, 3] = centre + rng.normal(0.0, 0.05, (num_chunks, frames_per_chunk, 3))
    return out


def _check(args: argparse.Namespace) -> None:
    for name, lo in (("k", 0), ("repeats", 1), ("warmup", 0), ("baseline_repeats", 0), ("frames_per_chunk", 1)):
        value = getattr(args, name)
        if value < lo:
            raise ValueError(f"--{name.replace('_', '-')}={value}: must be >= {lo}")
    if not args.budget_s > 0:
        raise ValueError(f"--budget-s={args.budget_s}: must be > 0")


def run(args: argparse.Namespace) -> dict:
    _check(args)
    policies = args.policy or sorted(POLICIES)
    rng = np.random.default_rng(args.seed)
    results = []
    for size in args.sizes:
        poses = random_chunk_poses(size, args.frames_per_chunk, rng)
        queries = random_chunk_poses(args.warmup + args.repeats, args.frames_per_chunk, rng, side=size ** (1.0 / 3.0))
        # the scheduler's exclusion set: sink and recent chunks of the session
        exclude = (0, size - 2, size - 1)
        for policy in policies:
            index = PoseIndex(policy)
            index.add_many("bench", range(size), poses)
            for i in range(args.warmup):
                index.query("bench", queries[i], args.k, exclude)
            times = []
            deadline = time.perf_counter() + args.budget_s
            for i in range(args.repeats):
                t0 = time.perf_counter()
                index.query("bench", queries[args.warmup + i], args.k, exclude)
                times.append(time.perf_counter() - t0)
                if len(times) >= 5 and time.perf_counter() > deadline:
                    break
            ms = np.array(times) * 1e3
            row = {
                "chunks": size,
                "policy": policy,
                "k": args.k,
                "repeats": len(times),
                "median_ms": float(np.median(ms)),
                "p90_ms": float(np.percentile(ms, 90)),
                "baseline_ms": None,
                "speedup": None,
            }
            if policy == "pose" and args.baseline_repeats:
                labels = [(cid, *index.mean_pose("bench", cid)) for cid in range(size)]
                base = []
                for i in range(args.baseline_repeats):
                    q = queries[args.warmup + i % args.repeats]
                    t0 = time.perf_counter()
                    want = _loop_query(labels, q, args.k, set(exclude))
                    base.append(time.perf_counter() - t0)
                    got = index.query("bench", q, args.k, exclude)
                    if got != want:
                        raise RuntimeError(f"pose index answer {got} differs from the per-chunk loop's {want}")
                row["baseline_ms"] = float(np.median(base) * 1e3)
                row["speedup"] = row["baseline_ms"] / row["median_ms"]
            results.append(row)
    _print_table(results)
    targets = [{"policy": p, "chunks": c, "median_ms_below": v} for (p, c), v in TARGETS.items()]
    return {"results": results, "target_ms": TARGET_MS, "targets": targets}


def _loop_query(labels: list[tuple[int, np.ndarray, np.ndarray]], query: np.ndarray, k: int, exclude: set) -> list[int]:
    """Baseline: the WorldKV distance chunk by chunk over ``(id, t [3], R [3, 3])`` labels."""
    q_t, q_R = query[:, :3, 3].mean(axis=0), query[:, :3, :3].mean(axis=0)
    ids, trans, rot = [], [], []
    for cid, t, R in labels:
        if cid in exclude:
            continue
        d = t - q_t
        ids.append(cid)
        trans.append(float(d @ d))
        rot.append(math.acos(min(1.0, max(-1.0, (float(np.trace(R.T @ q_R)) - 1.0) / 2.0))))
    mt, mr = max(trans, default=0.0), max(rot, default=0.0)
    dist = [0.5 * (a / mt if mt > 0 else a) + 0.5 * (b / mr if mr > 0 else b) for a, b in zip(trans, rot)]
    return [c for _, c in sorted(zip(dist, ids))[:k]]


def _print_table(results: list[dict]) -> None:
    print(
        f"{'chunks':>8} {'policy':>6} {'k':>3} {'runs':>5} {'median ms':>10} {'p90 ms':>9} "
        f"{'loop ms':>9} {'speedup':>8}  target"
    )
    for r in results:
        target = TARGETS.get((r["policy"], r["chunks"]))
        if target is not None:
            verdict = f"< {target:g} ms {'met' if r['median_ms'] < target else 'MISSED'} (median)"
        else:
            verdict = "-"
        base = "-" if r["baseline_ms"] is None else f"{r['baseline_ms']:.1f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.0f}x"
        print(
            f"{r['chunks']:>8} {r['policy']:>6} {r['k']:>3} {r['repeats']:>5} "
            f"{r['median_ms']:>10.3f} {r['p90_ms']:>9.3f} {base:>9} {speed:>8}  {verdict}"
        )
