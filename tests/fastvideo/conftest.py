"""tests/fastvideo: FastVideo (pinned 0.2.1) as a peer, in its own venv (``.venv-fastvideo``).

Every test here carries the ``fastvideo`` marker. ``make test`` runs them in ``.venv-fastvideo``
(``-m fastvideo``) after the main suite, which deselects them (``-m "not fastvideo"``). Where
fastvideo is not installed the folder is not collected at all (nothing is skipped).

The CPU shims (``fastvideo_shims.py``) are installed here, before any test module imports
fastvideo. This folder is put on ``sys.path`` (fastvideo's wheel ships a top-level ``tests``
package, so ``tests.fastvideo`` is not importable in that venv); other tests use the shims and the
tiny models with ``sys.path.insert(0, "<repo>/tests/fastvideo")`` then ``import fastvideo_shims;
fastvideo_shims.install()`` before they import fastvideo, and ``import fastvideo_tiny``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
HAVE_FASTVIDEO = importlib.util.find_spec("fastvideo") is not None

if HAVE_FASTVIDEO:
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)
    import fastvideo_shims

    fastvideo_shims.install()


def pytest_ignore_collect(collection_path, config):
    if not HAVE_FASTVIDEO:
        return True  # the main venv: these need .venv-fastvideo (`make test` builds and runs it)
    return None


def pytest_collection_modifyitems(config, items):
    mark = pytest.mark.fastvideo
    for item in items:
        if str(item.path).startswith(_HERE + os.sep):
            item.add_marker(mark)


@pytest.fixture(scope="session")
def fastvideo_dist():
    """FastVideo's parallel groups for this one CPU process (world size 1)."""
    fastvideo_shims.init_distributed()
    yield
