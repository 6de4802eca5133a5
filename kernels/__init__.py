"""Triton kernels, each directly above its launcher and beside a plain torch reference.

Launchers run on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``); the ``*_torch``
references run everywhere and are the CPU path.
"""
from worldkv_connector.kernels.compress import compress_chunk_kernel, gather_rows_triton, novelty_scores_triton
from worldkv_connector.kernels.paged_attention import paged_attention as paged_attention_triton
from worldkv_connector.kernels.paged_attention import paged_attention_torch
from worldkv_connector.kernels.rope_delta import rope_delta_, rope_delta_torch

__all__ = [
    "paged_attention_triton",  # not "paged_attention": that name is the submodule
    "paged_attention_torch",
    "compress_chunk_kernel",
    "novelty_scores_triton",
    "gather_rows_triton",
    "rope_delta_",
    "rope_delta_torch",
]
