"""The files of a saved bank directory: path checks, the advisory lock of a saver, and removing
what a killed save left behind (see ``persist``'s module docstring for the layout)."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

__all__ = ["LOCK", "BankLockedError", "bank_dir", "bank_lock", "clean_stale"]

logger = logging.getLogger(__name__)

LOCK = ".lock"  # flock'ed by a saver; holds its pid


class BankLockedError(ValueError):
    """Another process is saving into the same bank directory."""


def bank_dir(path, *, create: bool) -> Path:
    """``path`` as a bank directory: a non-empty path that is not a file (created if asked)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"bank path {path!r}: expected a directory path")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"bank path {str(path)!r} is a file, not a bank directory")
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"bank path {str(path)!r}: cannot create the directory ({exc.strerror or exc})") from None
    return p


@contextlib.contextmanager
def bank_lock(path: str | os.PathLike, *, wait: bool = False):
    """Hold the advisory lock of the bank directory ``path`` (created). ``BankLockedError`` naming
    the holder's pid when another process holds it (unless ``wait``)."""
    p = bank_dir(path, create=True)
    fd = os.open(p / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BankLockedError(f"bank {str(path)!r} is locked by pid {holder}, which is saving into it; "
                                  "wait for it or save elsewhere") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield p
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def clean_stale(p: Path, keep: set[str]) -> int:
    """Delete leftovers of killed saves (call with the lock held): temporary files, and data files
    not in ``keep`` (the names the current manifest refers to). Returns how many were removed."""
    removed = 0
    for f in p.iterdir():
        name = f.name
        stale = (name.startswith(".") and ".tmp-" in name) or (
            name.startswith("kv-") and name.endswith(".safetensors") and name not in keep)
        if stale and f.is_file():
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
    if removed:
        logger.info("removed %d file(s) left by an interrupted save in %s", removed, p)
    return removed
