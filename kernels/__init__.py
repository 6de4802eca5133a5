"""Triton kernels (each above its launcher, beside its torch reference)."""
