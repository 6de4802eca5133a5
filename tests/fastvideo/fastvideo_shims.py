"""CPU shims that let the pinned FastVideo 0.2.1 run on a machine without a GPU (test tree only).

``install()`` must run before ``fastvideo`` (or ``torchvision``) is imported:

1. torchvision. The PyPI torchvision wheel's C extension is built against CUDA torch and does not
   load beside the CPU torch, and its import then registers fake kernels for ``torchvision::nms``
   and ``torchvision::qnms``, which fails when those operators were never defined. We define the
   two schemas (no kernels: nothing here calls them), so the import goes through.
2. Attention. FastVideo's ``CpuPlatform`` has no attention backend. We route it to FastVideo's
   own ``TORCH_SDPA`` backend (its real code, ``fastvideo.attention.backends.sdpa``), so every
   attention layer runs FastVideo's SDPA path on the CPU.

3. LingBot-World v2's own attention helpers (``models/dits/lingbotworld2/causal_fast.py``):
   ``flash_attention`` (its cross-attention) asserts a CUDA device, and ``attention`` falls back to
   SDPA in bf16 whatever the model dtype. On the CPU both run SDPA in the input's dtype (fp32 tests
   stay fp32); FastVideo's own path and the adapter's path go through the same shim.

4. ``get_local_torch_device`` answers ``mps`` on every platform that is neither CUDA nor NPU;
   on the CPU platform it answers ``cpu`` (patched where it is defined and re-exported, before the
   stages import it).

Nothing else of FastVideo is changed. ``install()`` is idempotent.
"""
from __future__ import annotations

import os

import torch

__all__ = ["install", "installed", "init_distributed"]

_STATE = {"installed": False}
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBS: list = []  # keep the Library objects alive (dropping them unregisters the schemas)


def _define_torchvision_ops() -> None:
    for schema in _TORCHVISION_SCHEMAS:
        name = schema.split("(", 1)[0]
        try:
            getattr(torch.ops.torchvision, name)
            continue  # already defined (a working torchvision extension, or an earlier install)
        except (AttributeError, RuntimeError):
            pass
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define(schema)
        _LIBS.append(lib)


def _route_cpu_attention() -> None:
    from fastvideo.platforms.cpu import CpuPlatform

    sdpa_cls = "fastvideo.attention.backends.sdpa.SDPABackend"

    def get_attn_backend_cls(cls, selected_backend, head_size, dtype):  # noqa: ARG001 - FastVideo's signature
        # whatever was asked for (flash, sliding-tile, ...), SDPA is the only backend a CPU runs
        return sdpa_cls

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _lingbot_cpu_attention() -> None:
    import torch.nn.functional as F
    from fastvideo.models.dits.lingbotworld2 import causal_fast

    def sdpa(q, k, v, *args, causal: bool = False, **kwargs):  # noqa: ARG001 - their signature
        # q, k, v: [B, L, H, D] -> [B, L, H, D], in q's dtype
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                             v.transpose(1, 2).to(q.dtype), is_causal=causal)
        return out.transpose(1, 2).contiguous()

    causal_fast.flash_attention = sdpa
    causal_fast.attention = sdpa


def _cpu_local_device() -> None:
    import sys

    import fastvideo.distributed as dist
    from fastvideo.distributed import parallel_state

    orig = parallel_state.get_local_torch_device

    def get_local_torch_device() -> torch.device:
        from fastvideo.platforms import current_platform

        if current_platform.is_cpu():
            return torch.device("cpu")
        return orig()

    for mod in [parallel_state, dist] + [m for n, m in sys.modules.items() if n.startswith("fastvideo.") and m]:
        if getattr(mod, "get_local_torch_device", None) is orig:
            mod.get_local_torch_device = get_local_torch_device


def install() -> None:
    """Apply both shims (before any ``fastvideo`` import)."""
    if _STATE["installed"]:
        return
    os.environ.setdefault("FASTVIDEO_ATTENTION_BACKEND", "TORCH_SDPA")
    _define_torchvision_ops()
    _route_cpu_attention()
    _lingbot_cpu_attention()
    _cpu_local_device()
    _STATE["installed"] = True


def installed() -> bool:
    return _STATE["installed"]


def init_distributed() -> None:
    """FastVideo's parallel groups for one CPU process (world size 1, gloo on 127.0.0.1), which
    its layers query (sequence-parallel size) even when nothing is parallel. Idempotent."""
    import socket

    from fastvideo.distributed.parallel_state import maybe_init_distributed_environment_and_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    maybe_init_distributed_environment_and_model_parallel(1, 1, distributed_init_method=f"tcp://127.0.0.1:{port}")
