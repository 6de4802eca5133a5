"""CUDA C++ sources of the copy engine, compiled at run time through CuPy NVRTC
(``worldkv_connector.transfer.cuda_copy``); they also compile with plain ``nvcc`` (tests check it)."""
from __future__ import annotations

from importlib import resources

__all__ = ["SOURCES", "read_source"]

SOURCES = ("paged_copy.cu",)


def read_source(name: str) -> str:
    """Text of one CUDA source shipped in this package (e.g. ``"paged_copy.cu"``)."""
    if name not in SOURCES:
        raise ValueError(f"unknown CUDA source {name!r}: choose one of {list(SOURCES)}")
    return resources.files(__name__).joinpath(name).read_text()
