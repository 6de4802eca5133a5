"""``worldkv bench <what>``: performance instruments, each printing a ratio against a baseline
measured in the same run (see worldkv_connector/bench/)."""
from __future__ import annotations

import argparse

from worldkv_connector.bench import BENCHES, run_bench


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="run a benchmark (offload, reinsert, overlap, compress, index, e2e, connector)",
        description="Benchmarks. Each prints a table with the baseline measured in the same run; "
        "--json writes the figures.",
    )
    what = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, spec in BENCHES.items():
        p = what.add_parser(name, help=spec.help, description=spec.help)
        p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
        spec.add_arguments(p)
        p.set_defaults(func=lambda args, spec=spec: run_bench(spec, args))
