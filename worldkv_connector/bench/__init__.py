"""Benchmark registry: ``worldkv bench <name>``.

Each benchmark module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> dict``;
``run`` prints its own table and returns the JSON-serialisable results.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["BENCHES", "BenchSpec", "run_bench", "machine_info"]


@dataclass(frozen=True)
class BenchSpec:
    name: str
    module: str

    def _mod(self):
        return importlib.import_module(self.module)

    @property
    def help(self) -> str:
        return self._mod().HELP

    @property
    def add_arguments(self) -> Callable[[argparse.ArgumentParser], None]:
        return self._mod().add_arguments

    @property
    def run(self) -> Callable[[argparse.Namespace], dict]:
        return self._mod().run


_NAMES = ("offload", "reinsert", "overlap", "compress", "index", "e2e", "connector", "remote")
BENCHES: dict[str, BenchSpec] = {name: BenchSpec(name, f"worldkv_connector.bench.{name}") for name in _NAMES}


def machine_info() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["date"] = time.strftime("%Y-%m-%d")
    return info


def run_bench(spec: BenchSpec, args: argparse.Namespace) -> int:
    results = spec.run(args)
    results = {"bench": spec.name, "machine": machine_info(), **results}
    if getattr(args, "json", None):
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=float)
        print(f"wrote {args.json}")
    return 0
