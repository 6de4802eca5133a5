"""The ``worldkv`` command line: one subcommand per module, each adding its own parser.

A command module exposes ``register(subparsers)``, which adds its parser and sets
``func=handler``; the handler takes the parsed namespace and returns an exit code.
User errors (``ValueError``, ``FileNotFoundError``) and disk errors (``OSError``) print one line
and exit 2, no traceback; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "build_parser"]

# module paths of the subcommands, in the order `worldkv --help` lists them
COMMAND_MODULES = (
    "worldkv_connector.cli.demo",
    "worldkv_connector.cli.generate",
    "worldkv_connector.cli.bench",
    "worldkv_connector.cli.bank",
    "worldkv_connector.cli.convert",
    "worldkv_connector.cli.train",
    "worldkv_connector.cli.eval",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldkv",
        description="WorldKV connector: persistent world memory (pose retrieval, KV compression, "
        "paged offload) for autoregressive video diffusion world models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"worldkv {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk error: one line naming the file, not a traceback
        where = f": {exc.filename!r}" if getattr(exc, "filename", None) else ""
        print(f"worldkv {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a run that stops cleanly
        print(f"worldkv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
