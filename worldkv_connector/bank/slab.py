"""The memory of the host/GPU tier: one slab allocated once, checked against the machine first.

When CUDA is present a host slab is pinned with ``cudaHostRegister`` on a plain allocation: torch's
pinned allocator rounds every request up to a power of two, which would waste up to half of a
multi-GiB bank (DESIGN §2). A GPU slab lives on the device.
"""
from __future__ import annotations

import logging

import torch

from worldkv_connector.machine import host_memory

__all__ = ["check_bank_memory", "resolve_device", "allocate_slab", "release_slab", "SlabViews", "TIERS"]

logger = logging.getLogger(__name__)

TIERS = ("cpu", "gpu")
_GiB = 1 << 30
_HOST_REGISTER_PORTABLE = 0x01  # cudaHostRegisterPortable
_HOST_REGISTER_MAPPED = 0x02  # cudaHostRegisterMapped


def check_bank_memory(tier: str, device: torch.device | str, nbytes: int) -> None:
    """A bank larger than the machine could ever hold is a configuration error (before allocating)."""
    if tier == "gpu":
        free, total = torch.cuda.mem_get_info(device)
        if nbytes > free:
            raise ValueError(f"bank_bytes: a gpu bank of {nbytes} bytes ({nbytes / _GiB:.3g} GiB) is more than the "
                             f"{free / _GiB:.3g} GiB free on {device} (of {total / _GiB:.3g} GiB); lower bank_bytes")
        return
    total, available = host_memory()
    if total is not None and nbytes > total:
        raise ValueError(f"bank_bytes: a cpu bank of {nbytes} bytes ({nbytes / _GiB:.3g} GiB) is more than this "
                         f"machine's {total / _GiB:.3g} GiB of memory and swap; lower bank_bytes")
    if available is not None and nbytes > available:
        logger.warning("bank of %.3g GiB is more than the %.3g GiB of host memory available now: it is allocated "
                       "lazily, and filling it may swap or fail", nbytes / _GiB, available / _GiB)


def resolve_device(tier: str, device: str | torch.device | None) -> torch.device:
    """The device of a ``tier`` slab ("cpu": host memory, "gpu": a cuda device)."""
    if tier == "cpu":
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type != "cpu":
            raise ValueError(f"Bank device={device!r} does not match tier='cpu' (host memory)")
        return dev
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"Bank device={device!r} does not match tier='gpu': expected a cuda device")
    if not torch.cuda.is_available():
        raise ValueError("Bank tier='gpu' needs a CUDA device: torch.cuda.is_available() is False")
    return dev


def _host_register(t: torch.Tensor) -> bool:
    """Pin ``t``'s memory in place (no power-of-two rounding). False, with a warning, on failure."""
    # Portable: usable from every device's context; Mapped: device-addressable, so the SM copy
    # kernel can read and write the slab directly (unified addressing) instead of only DMA.
    flags = _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), flags)
    code = int(getattr(err, "value", err))
    if code != 0:
        logger.warning("cudaHostRegister of %d bytes failed (error %s): the bank stays pageable", t.nbytes, err)
        return False
    return True


def allocate_slab(shape: tuple[int, ...], dtype: torch.dtype, tier: str, device: torch.device,
                  capacity_bytes: int, pin: bool | None) -> tuple[torch.Tensor, bool]:
    """``(slab, pinned)``: the slab ``shape`` (``[num_slots, L, 2, slot_tokens, H, D]``, ``dtype``,
    on ``device``), host slabs pinned when ``pin`` (None: when CUDA is present). A slab the machine
    cannot hold is a ``ValueError`` naming ``bank_bytes`` (``capacity_bytes``)."""
    slab_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    check_bank_memory(tier, device, slab_bytes)
    try:
        slab = torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        raise ValueError(f"bank_bytes={capacity_bytes} ({capacity_bytes / _GiB:.3g} GiB): the {tier} tier cannot "
                         f"allocate {slab_bytes} bytes on this machine ({str(exc).splitlines()[0][:120]}); "
                         "lower bank_bytes") from None
    want_pin = torch.cuda.is_available() if pin is None else bool(pin)
    if want_pin and tier == "cpu" and not torch.cuda.is_available():
        raise ValueError("Bank pin=True needs CUDA: torch.cuda.is_available() is False")
    return slab, bool(want_pin and tier == "cpu" and _host_register(slab))


def release_slab(slab: torch.Tensor, pinned: bool) -> None:
    """Unpin a slab from ``allocate_slab``. Runs once, from ``Bank.close()`` or when the bank is
    garbage collected without it."""
    if pinned:
        err = torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())
        if int(getattr(err, "value", err)) != 0:
            logger.warning("cudaHostUnregister failed (error %s)", err)


class SlabViews:
    """The views ``slab[slot, :, :, :tokens]`` of a slab, each made once and handed out again while
    the slot holds that many tokens. A step plans its copies from a few views, and making a tensor
    view costs microseconds (several times that from cold caches, as right after compute). Callers
    share the objects: they write a view's data, never its metadata (no in-place ``resize_``,
    ``squeeze_`` or ``set_``). At most ``MAX_VIEWS`` are held (all dropped when full)."""

    MAX_VIEWS = 4096

    def __init__(self, slab: torch.Tensor) -> None:
        self._slab = slab
        self._views: dict[int, tuple[int, torch.Tensor]] = {}  # slot -> (tokens, view)

    def get(self, slot: int, tokens: int) -> torch.Tensor:
        hit = self._views.get(slot)
        if hit is not None and hit[0] == tokens:
            return hit[1]
        if len(self._views) >= self.MAX_VIEWS:
            self._views.clear()
        view = self._slab[slot, :, :, :tokens]
        self._views[slot] = (tokens, view)
        return view
