"""sglang tests run in ``.venv-sglang`` (``make test`` runs them there with ``-m sglang``); where
sglang is not installed (the main venv) they are deselected, never run against a missing host. The
CPU shims (test tree only) are applied before any model is built."""
import importlib.util
import json
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


@pytest.fixture(scope="session")
def hooks():
    """Load the plugin the way SGLang does (SGLANG_PLUGINS=worldkv) and apply its hooks (once per
    process: they patch the stage classes). Yields SGLang's own allocation, for baselines."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SGLANG_PLUGINS", "worldkv")
    from sglang.multimodal_gen.runtime.platforms.plugins import HookRegistry, apply_plugin_hooks, load_plugins
    from sglang.multimodal_gen.runtime.pipelines_core.stages.causal_denoising import CausalDMDDenoisingStage

    original = CausalDMDDenoisingStage._allocate_causal_kv_cache
    load_plugins()
    apply_plugin_hooks()
    assert CausalDMDDenoisingStage._allocate_causal_kv_cache is not original
    yield original
    mp.undo()


@pytest.fixture
def worldkv(monkeypatch):
    """Set the plugin's environment for one test (fresh runtimes)."""

    from worldkv_connector.integration.sglang import plugin

    def configure(poseless="static", **config):
        plugin.reset_runtimes()
        monkeypatch.setenv("WORLDKV_CONFIG", json.dumps(config))
        monkeypatch.setenv("WORLDKV_POSELESS", poseless)

    yield configure
    plugin.reset_runtimes()
