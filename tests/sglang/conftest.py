"""sglang tests run in ``.venv-sglang`` (``make test`` runs them there with ``-m sglang``); where
sglang is not installed (the main venv) they are deselected, never run against a missing host. The
CPU shims (test tree only) are applied before any model is built."""
import importlib.util
import os
import sys

import pytest

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None
sys.path.insert(0, os.path.dirname(__file__))

if HAVE_SGLANG:
    import shims  # noqa: E402

    shims.apply()


def _here(item) -> bool:
    return "tests/sglang/" in str(item.fspath).replace(os.sep, "/")


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if _here(item)]
    for item in mine:
        item.add_marker(pytest.mark.sglang)
    if not HAVE_SGLANG and mine:  # they run in .venv-sglang (make test-sglang)
        config.hook.pytest_deselected(items=mine)
        items[:] = [item for item in items if not _here(item)]
