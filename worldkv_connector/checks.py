"""Argument checks shared by every config and launcher. Imports nothing from the project, so any
module (core, kernel or host) can use it without an import cycle."""
from __future__ import annotations

import numpy as np

__all__ = ["check_int", "is_int"]


def is_int(value: object) -> bool:
    """True for an ``int`` or a numpy integer; False for a ``bool`` (an ``int`` subclass, never a
    count) and everything else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a Python ``int`` if it is one (see :func:`is_int`) and ``lo <= value <= hi``
    (each bound optional, both inclusive); else ``ValueError`` naming ``name``, the value and what
    is allowed. ``name`` is the field as the user knows it (``"KVShape.head_dim"``,
    ``"TransferEngine num_streams"``); its last word names the field in the range."""
    field = name.rpartition(".")[2].rpartition(" ")[2]
    if lo is not None and hi is not None:
        allowed = f"{lo} <= {field} <= {hi}"
    elif lo is not None:
        allowed = f"{field} >= {lo}"
    elif hi is not None:
        allowed = f"{field} <= {hi}"
    else:
        allowed = None
    if not is_int(value):
        also = f" ({allowed})" if allowed else ""
        raise ValueError(f"{name}={value!r} has the wrong type: expected an int{also}, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}={value!r} is out of range: allowed {allowed}")
    return int(value)
