"""What this machine has: host memory (for default sizes and for bounds checked before allocating)."""
from __future__ import annotations

import os

__all__ = ["host_memory", "available_host_memory"]


def host_memory() -> tuple[int | None, int | None]:
    """``(MemTotal + SwapTotal, MemAvailable)`` in bytes from /proc/meminfo (None where unknown;
    without /proc, sysconf's physical pages give both)."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                fields = rest.split()
                if fields:
                    info[name] = int(fields[0]) * 1024
    except (OSError, ValueError):
        info = {}
    if "MemTotal" in info:
        return info["MemTotal"] + info.get("SwapTotal", 0), info.get("MemAvailable")
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None, None


def available_host_memory() -> int | None:
    """Bytes of host memory available now, or None where unknown."""
    return host_memory()[1]
