"""CPU shims that let sglang 0.5.23 run its causal video models on a CPU-only machine (test tree only).

- PyPI's torchvision is built against a CUDA torch; beside the CPU torch its C extension does not
  load and ``import torchvision`` fails with "operator torchvision::nms does not exist". Defining
  the op's schema first lets the Python side import (nothing here calls nms).
- sglang reads global server args at import and construction time; they are set as sglang's own
  unit-test conftest sets them.
- ``CustomOp.forward_cpu`` paths call a CPU build of sgl-kernel that PyPI does not ship; they are
  routed to ``forward_native`` (the PyTorch reference each op defines).
- sglang 0.5.23 ``CausalWanTransformerBlock.forward`` passes ``crossattn_cache=`` to a cross-attention
  module that does not take it (an upstream bug); the block's own ``_cross_attn_with_cache`` is the
  cached path, so the shim routes the call there.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

_APPLIED = False


def _define_torchvision_schema() -> None:
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _define_torchvision_schema.lib = lib


def _route_cpu_kernels_to_torch() -> None:
    """sglang picks a kernel per platform once, at import (``select_impl``); its ``cpu=`` picks
    need sgl-kernel's CPU build. Prefer the plain-torch pick it gives MPS, which runs anywhere."""
    from sglang.kernels.ops.diffusion.common import platform as kplatform

    original = kplatform.select_impl

    def select_impl(triton_impl, **fallbacks):
        if kplatform.platform_key() == "cpu" and "mps" in fallbacks:
            return fallbacks["mps"]
        return original(triton_impl, **fallbacks)

    kplatform.select_impl = select_impl


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def unit_server_args() -> SimpleNamespace:
    """Global server args as sglang's unit-test conftest builds them."""
    dit_config = SimpleNamespace(hidden_size=64, num_attention_heads=4, boundary_ratio=None,
                                 arch_config=SimpleNamespace(in_channels=16, patch_size=2))
    vae_config = SimpleNamespace(
        vae_tiling=False,
        arch_config=SimpleNamespace(vae_scale_factor=8, spatial_compression_ratio=8, z_dim=16, scale_factor_spatial=8),
        get_vae_scale_factor=lambda: 8,
    )
    pipeline_config = SimpleNamespace(dit_config=dit_config, vae_config=vae_config, dit_precision="float32",
                                      vae_precision="float32", get_latent_dtype=lambda dtype: dtype, context_noise=0)
    return SimpleNamespace(
        attention_backend=None, attention_backend_config=None, comfyui_mode=False, disable_autocast=True,
        enable_cfg_parallel=False, enable_breakable_cuda_graph=False, enable_layerwise_nvtx_marker=False,
        enable_torch_compile=False, kv_gather_degree=1, sp_split_auto=False, model_loaded={}, model_paths={},
        pipeline_config=pipeline_config,
    )


def apply() -> None:
    """Apply every shim once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    if not _has_op("nms"):  # before anything imports torchvision
        _define_torchvision_schema()
    _route_cpu_kernels_to_torch()
    from sglang.multimodal_gen.runtime.layers.custom_op import CustomOp

    # dispatch happens in CustomOp.__init__: ops built after this use their PyTorch reference
    CustomOp.dispatch_forward = lambda self: self.forward_native
    from sglang.multimodal_gen.runtime.server_args import set_global_server_args

    set_global_server_args(unit_server_args())
    _APPLIED = True


def init_single_process_parallel() -> None:
    """One-rank tensor/sequence parallel groups, as sglang's unit-test fixture sets them up."""
    import os
    import socket

    from sglang.multimodal_gen.runtime.distributed.parallel_state import (
        maybe_init_distributed_environment_and_model_parallel, model_parallel_is_initialized,
    )

    if model_parallel_is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    maybe_init_distributed_environment_and_model_parallel(tp_size=1, sp_size=1)


def fix_causal_wan_cross_attention(model) -> int:
    """Upstream bug (sglang 0.5.23): ``CausalWanTransformerBlock.forward`` calls
    ``self.attn2(..., crossattn_cache=...)`` but ``WanT2VCrossAttention.forward`` takes no such
    argument. Route each block's call to the block's own cached path ``_cross_attn_with_cache``.
    Returns the number of blocks fixed."""
    fixed = 0
    for block in getattr(model, "blocks", []):
        if not hasattr(block, "_cross_attn_with_cache"):
            continue

        def forward(hidden_states, context=None, context_lens=None, crossattn_cache=None, _block=block):
            return _block._cross_attn_with_cache(hidden_states, context, crossattn_cache)

        block.attn2.forward = forward
        fixed += 1
    return fixed
