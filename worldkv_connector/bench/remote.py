"""``worldkv bench remote``: put/get GB/s through the remote tier against the raw client, same run.

Per object size: a batch of ``--objects`` shards (each one chunk of one rank, ``[L, 2, T, H, D]``
bytes) is written and read back

- **tier**: ``RemoteTier.put_shards`` / ``get_shards``, the path the connector runs (keys, sha256
  of every shard computed on a helper thread beside the transfer and checked on read, commit-record
  shapes, counters). Buffers sit in memory registered with the store, as the bank's slab is.
- **raw**: the same client with the same buffers and key count, and nothing else: Mooncake
  ``batch_put_from`` / ``batch_get_into``; Redis a pipeline of SET / GET (the GET's bytes copied into
  the destination buffer, as any user of the data must).

``sha256 alone`` is the checksum rate over the same bytes, measured in the same rounds: the tier
can hide it behind the transfer only where a core is free. Runs are interleaved (tier put, raw put,
tier get, raw get, sha256) on fresh keys, removed after each round
(untimed). Figures are medians over ``--repeats`` with min-max spreads; ``tier / raw`` is the median
of the per-round ratios. Without ``--address`` the bench starts its own servers on 127.0.0.1 (store
segment sized for the run) and stops them.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
import uuid

import torch

from worldkv_connector.bench.common import gbps, print_table, print_targets, target
from worldkv_connector.remote.config import BACKENDS, RemoteConfig
from worldkv_connector.remote.tier import RemoteTier

__all__ = ["HELP", "add_arguments", "run"]

HELP = "remote tier put/get GB/s (Mooncake Store or Redis) vs the raw client, same run, same buffers"
_MiB = 1 << 20
_GOAL = 0.8  # tier >= 0.8x raw for put and get on objects of 4 MiB or more


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, required=True, help="remote store to measure")
    p.add_argument("--address", help="a running store (mooncake: the master's host:port; redis: host:port); "
                   "default: start local servers on 127.0.0.1 for the run")
    p.add_argument("--metadata-server", help="mooncake: the metadata server (with --address; default "
                   "http://<master host>:8080/metadata)")
    p.add_argument("--object-mb", type=float, nargs="+", default=[4.0, 16.0],
                   help="object (shard) sizes in MiB (default: 4 16); one chunk of one rank, e.g. LingBot-World "
                   "at SP4 is ~960 MiB per rank, Matrix-Game-2 compressed to half ~240 MiB")
    p.add_argument("--objects", type=int, default=8, help="objects per batch (default 8)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per size (median; default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")


def _check(args) -> None:
    if not 1 <= args.objects <= 4096:
        raise ValueError(f"--objects={args.objects} is out of range: allowed 1 <= objects <= 4096")
    if not 1 <= args.repeats <= 1000 or not 0 <= args.warmup <= 100:
        raise ValueError(f"--repeats={args.repeats} / --warmup={args.warmup}: allowed 1..1000 / 0..100")
    for mb in args.object_mb:
        if not 1 / 1024 <= mb <= 4096:
            raise ValueError(f"--object-mb={mb} is out of range: allowed 1/1024 <= object-mb <= 4096")
    if args.objects * max(args.object_mb) > 2048:
        raise ValueError(f"--objects x --object-mb = {args.objects * max(args.object_mb):.0f} MiB per batch: "
                         "allowed up to 2048 MiB (two batches live at once)")
    if args.metadata_server and not args.address:
        raise ValueError("--metadata-server needs --address (a running store)")


class _Raw:
    """The raw client's calls for one backend."""

    def __init__(self, backend) -> None:
        self.b = backend
        self.raw = backend.raw

    def put(self, keys, bufs) -> None:
        if self.b.name == "mooncake":
            rc = self.raw.batch_put_from(keys, [t.data_ptr() for t in bufs], [t.numel() for t in bufs])
            if any(r != 0 for r in rc):
                raise RuntimeError(f"raw batch_put_from failed: {rc}")
        else:
            pipe = self.raw.pipeline(transaction=False)
            for k, t in zip(keys, bufs):
                pipe.set(k, memoryview(t.numpy()))
            pipe.execute()

    def get(self, keys, bufs) -> None:
        if self.b.name == "mooncake":
            rc = self.raw.batch_get_into(keys, [t.data_ptr() for t in bufs], [t.numel() for t in bufs])
            if any(r != t.numel() for r, t in zip(rc, bufs)):
                raise RuntimeError(f"raw batch_get_into failed: {rc}")
        else:
            pipe = self.raw.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            for data, t in zip(pipe.execute(), bufs):
                t.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _size_row(tier: RemoteTier, raw: _Raw, nbytes: int, args) -> dict:
    n = args.objects
    elems = nbytes // 4
    # [objects, L=1, 2, T, H=1, D=1] fp32 shards; one registered slab per path and direction
    src = torch.randn(n, 1, 2, elems // 2, 1, 1)
    dst_t, dst_r = torch.empty_like(src), torch.empty_like(src)
    for t in (src, dst_t, dst_r):
        tier.backend.register(t)
    src_b = [src[i].view(-1).view(torch.uint8) for i in range(n)]
    dst_b = [dst_r[i].view(-1).view(torch.uint8) for i in range(n)]
    samples = {k: [] for k in ("tier_put", "raw_put", "tier_get", "raw_get", "sha256")}
    for rnd in range(args.warmup + args.repeats):
        sess = f"bench-{uuid.uuid4().hex[:8]}"
        raw_keys = [f"{tier.session_prefix(sess)}raw{i}" for i in range(n)]
        t = {}
        t0 = time.perf_counter()
        digests = tier.put_shards([(sess, i, src[i]) for i in range(n)])
        t["tier_put"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        raw.put(raw_keys, src_b)
        t["raw_put"] = time.perf_counter() - t0
        if any(d is None for d in digests):
            raise RuntimeError("tier put failed: is the store large enough for two batches?")
        recs = [tier.make_record(sess, i, src[i], [d]) for i, d in enumerate(digests)]
        t0 = time.perf_counter()
        ok = tier.get_shards(recs, [dst_t[i] for i in range(n)])
        t["tier_get"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        raw.get(raw_keys, dst_b)
        t["raw_get"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n):  # what the tier adds: one sha256 per shard (on its helper thread)
            hashlib.sha256(memoryview(src_b[i].numpy())).digest()
        t["sha256"] = time.perf_counter() - t0
        if not all(ok) or not torch.equal(dst_t, src) or not torch.equal(dst_r, src):
            raise RuntimeError("read back differs from what was written")
        tier.backend.remove_prefix(tier.session_prefix(sess))  # untimed
        if rnd >= args.warmup:
            for k, v in t.items():
                samples[k].append(v)
    moved = n * nbytes
    rates = {k: [gbps(moved, s) for s in v] for k, v in samples.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = {op: statistics.median(a / b for a, b in zip(rates[f"tier_{op}"], rates[f"raw_{op}"])) for op in ("put", "get")}
    return {"object_bytes": nbytes, "objects": n,
            "tier_gbps": {"put": med["tier_put"], "get": med["tier_get"]},
            "raw_gbps": {"put": med["raw_put"], "get": med["raw_get"]},
            "tier_over_raw": ratio, "sha256_gbps": med["sha256"],
            "spread_gbps": {k: [min(v), max(v)] for k, v in rates.items()}}


def run(args: argparse.Namespace) -> dict:
    _check(args)
    sizes = [max(16, int(mb * _MiB) // 16 * 16) for mb in args.object_mb]
    servers = tmp = None
    try:
        if args.address:
            cfg = RemoteConfig(backend=args.backend, address=args.address, metadata_server=args.metadata_server,
                               namespace="bench")
        else:
            from worldkv_connector.remote import servers as local

            tmp = tempfile.TemporaryDirectory(prefix="wkv-bench-remote-")
            need_mb = 2 * args.objects * max(sizes) // _MiB + 256  # two batches (tier, raw) live at once
            if args.backend == "mooncake":
                servers = local.start_mooncake(tmp.name, segment=f"{need_mb} MB")
                cfg = RemoteConfig.from_value(servers.remote_config("bench"))
            else:
                servers = local.start_redis(tmp.name, maxmemory=f"{need_mb}mb")
                cfg = RemoteConfig.from_value(servers.remote_config("bench"))
            print(f"started local {args.backend} servers on {cfg.address}")
        tier = RemoteTier(cfg, fingerprint="bench")
        try:
            rows = []
            for nbytes in sizes:
                rows.append(_size_row(tier, _Raw(tier.backend), nbytes, args))
                print(f"  {nbytes / _MiB:g} MiB x {args.objects}: done", flush=True)
        finally:
            tier.close()
    finally:
        if servers is not None:
            servers.stop()
        if tmp is not None:
            tmp.cleanup()
    print_table(
        f"remote tier vs raw {args.backend} client ({args.objects} objects per batch, median of {args.repeats}; "
        "GB/s, min-max in brackets)",
        ("object MiB", "tier put", "raw put", "put tier/raw", "tier get", "raw get", "get tier/raw", "sha256 alone"),
        [(r["object_bytes"] / _MiB,
          f"{r['tier_gbps']['put']:.3g} [{r['spread_gbps']['tier_put'][0]:.2g}-{r['spread_gbps']['tier_put'][1]:.2g}]",
          f"{r['raw_gbps']['put']:.3g} [{r['spread_gbps']['raw_put'][0]:.2g}-{r['spread_gbps']['raw_put'][1]:.2g}]",
          r["tier_over_raw"]["put"],
          f"{r['tier_gbps']['get']:.3g} [{r['spread_gbps']['tier_get'][0]:.2g}-{r['spread_gbps']['tier_get'][1]:.2g}]",
          f"{r['raw_gbps']['get']:.3g} [{r['spread_gbps']['raw_get'][0]:.2g}-{r['spread_gbps']['raw_get'][1]:.2g}]",
          r["tier_over_raw"]["get"], r["sha256_gbps"]) for r in rows],
    )
    targets = []
    for r in rows:
        big = r["object_bytes"] >= 4 * _MiB
        for op in ("put", "get"):
            targets.append(target(f"{op} tier/raw @ {r['object_bytes'] / _MiB:g} MiB", r["tier_over_raw"][op], ">=", _GOAL,
                                  applies=big, note="" if big else "objects under 4 MiB: not a target"))
    print_targets(targets)
    print("note: the tier checksums every shard (sha256, on a helper thread beside the transfer); where the "
          "transfer itself is CPU copies (TCP on loopback) the hash competes with it for the same cores.")
    first = rows[0]
    return {"backend": args.backend, "object_bytes": first["object_bytes"], "tier_gbps": first["tier_gbps"],
            "raw_gbps": first["raw_gbps"], "tier_over_raw": first["tier_over_raw"], "objects": args.objects,
            "repeats": args.repeats, "rows": rows, "targets": targets}
