"""sglang tests run in ``.venv-sglang`` (``make test`` does it); the main venv's run deselects the
``sglang`` marker. The CPU shims (test tree only) are applied before any model is built."""
import importlib.util
import os
import sys

import pytest

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None

if HAVE_SGLANG:
    sys.path.insert(0, os.path.dirname(__file__))
    import shims  # noqa: E402

    shims.apply()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/sglang/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.sglang)
