"""WorldKVConfig: every knob of the WorldKV connector, validated in one place.

The JSON form of this dataclass is the user-facing contract of the engine flag
``--kv-connector-config`` (and of vLLM's ``kv_connector_extra_config``): unknown keys, wrong
types and out-of-range values raise ``ValueError`` naming the key, the value and what is allowed.
Sizes that follow from the knobs (chunks in the sink, kept tokens per chunk...) are derived
here, never hard-coded elsewhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from worldkv_connector.compression import COMPRESSIONS, kept_tokens_per_chunk
from worldkv_connector.machine import available_host_memory
from worldkv_connector.registry import Registry
from worldkv_connector.retrieval.policy import POLICIES

__all__ = ["WorldKVConfig", "kept_tokens_per_chunk", "default_bank_bytes", "AUTO_BANK_SHARE"]

_GiB = 1 << 30
_MiB = 1 << 20
# bank_bytes when not given: this share of the host memory available when the first config is made
# (bank "cpu"), or of the free device memory when the config is made (bank "gpu"; the video engine
# builds its connector after the model and the KV cache took theirs)
AUTO_BANK_SHARE = 0.25
_AUTO_FALLBACK = 8 * _GiB  # where the machine cannot say what it has
_host_default: int | None = None  # one value per process, so equal configs stay equal


def default_bank_bytes(tier: str = "cpu") -> int:
    """The default ``bank_bytes``: ``AUTO_BANK_SHARE`` of available host memory (``cpu``, measured
    once per process) or of free device memory (``gpu``), in whole MiB, at least 64 MiB."""
    global _host_default
    if tier == "gpu":
        try:
            import torch

            free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
        except Exception:  # no usable CUDA: the bank itself reports that when it is built
            free = None
    else:
        if _host_default is not None:
            return _host_default
        free = available_host_memory()
    size = _AUTO_FALLBACK if free is None else max(64 * _MiB, int(free * AUTO_BANK_SHARE) // _MiB * _MiB)
    if tier != "gpu":
        _host_default = size
    return size


@dataclass(frozen=True)
class WorldKVConfig:
    """Configuration of the WorldKV connector (DESIGN §2 defaults).

    Window for a new chunk: ``[sink | retrieved | recent | current]``.
    """

    # --- window and retrieval -------------------------------------------------------------
    retrieval_chunks: int = 6  # chunks put back per step (reference: 18 frames // 3)
    sink_frames: int = 3  # latent frames kept at the start of the window, never retrieval candidates
    recent_frames: int = 6  # latent frames of the sliding recent window, never retrieval candidates
    frames_per_chunk: int = 3  # latent frames generated per chunk
    policy: str = "pose"  # registered retrieval scoring policy: "pose" (WorldKV score) or "fov"
    fov_degrees: float = 90.0  # horizontal field of view used by the "fov" policy
    fov_near: float = 0.1  # depth range sampled by the "fov" policy
    fov_far: float = 10.0
    # --- compression ---------------------------------------------------------------------
    keep_ratio: float = 0.25  # share of each non-anchor frame's tokens kept (1.0 = no compression)
    pooled: bool = True  # one shared budget over all non-anchor frames (reference "pooled" mode)
    compression: str = "novelty"  # registered compression: "novelty" (prune) or "tempcache" (merge), same budget
    # --- reinsertion -------------------------------------------------------------------
    rope_correction: bool = False  # rotate temporal RoPE of retrieved keys to sit before recent
    hot_chunks: int = 6  # retrieved chunks kept resident on the GPU between steps (page budget)
    page_size: int = 64  # tokens per KV page
    # --- bank -------------------------------------------------------------------------
    bank: str = "cpu"  # tier of the bank: "cpu" (pinned host memory when CUDA exists) or "gpu"
    # capacity of that tier in bytes; None (the default): a share of the machine (default_bank_bytes)
    bank_bytes: int | None = None
    eviction: str = "lru"  # registered bank eviction policy when full: "lru" (least recently retrieved) or "fifo"
    bank_dir: str | None = None  # optional disk tier directory for entries spilled from a full bank
    disk_bytes: int = 64 * _GiB  # capacity of the disk tier in bytes
    # --- transfers ----------------------------------------------------------------------
    copy_kernel_threshold_bytes: int = 28 * 1024  # fragments under this go through the SM copy kernel
    # --- remote tier (worldkv_connector.remote.RemoteConfig: backend, address, namespace, ...) -----
    remote: dict | None = None  # a shared world bank on Mooncake Store or Redis/Valkey; None: this process only

    _RANGES = {
        "retrieval_chunks": (0, 4096),
        "sink_frames": (0, 1 << 20),
        "recent_frames": (0, 1 << 20),
        "frames_per_chunk": (1, 64),
        "fov_degrees": (1.0, 179.0),
        "fov_near": (1e-6, 1e9),
        "fov_far": (1e-6, 1e9),
        "keep_ratio": (1e-6, 1.0),
        "hot_chunks": (0, 4096),
        "page_size": (1, 1 << 16),
        "bank_bytes": (1, 1 << 50),
        "disk_bytes": (0, 1 << 52),
        "copy_kernel_threshold_bytes": (0, 1 << 40),
    }
    _CHOICES = {
        "bank": ("cpu", "gpu"),
    }

    def __post_init__(self) -> None:
        if self.bank_bytes is None and self.bank in self._CHOICES["bank"]:
            object.__setattr__(self, "bank_bytes", default_bank_bytes(self.bank))
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, f.type)
        for name, (lo, hi) in self._RANGES.items():
            value = getattr(self, name)
            if value is not None and not (lo <= value <= hi):  # None: bank_bytes of a bad tier, refused below
                raise ValueError(f"WorldKVConfig.{name}={value!r} is out of range: allowed {lo} <= {name} <= {hi}")
        for name, allowed in self._CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"WorldKVConfig.{name}={value!r} is not allowed: choose one of {list(allowed)}")
        for name, registry in _name_registries().items():  # a registered class is a valid name
            registry.check(getattr(self, name), f"WorldKVConfig.{name}")
        for name in ("sink_frames", "recent_frames"):
            value = getattr(self, name)
            if value % self.frames_per_chunk:
                raise ValueError(
                    f"WorldKVConfig.{name}={value} must be a multiple of frames_per_chunk={self.frames_per_chunk}"
                )
        if self.fov_far <= self.fov_near:
            raise ValueError(f"WorldKVConfig.fov_far={self.fov_far} must be greater than fov_near={self.fov_near}")
        if self.remote is not None:
            from worldkv_connector.remote.config import RemoteConfig  # validates, naming remote.<key>

            RemoteConfig.from_value(self.remote)
        if self.hot_chunks < self.retrieval_chunks:
            raise ValueError(
                f"WorldKVConfig.hot_chunks={self.hot_chunks} must be >= retrieval_chunks={self.retrieval_chunks} "
                "(every retrieved chunk needs resident pages)"
            )

    # --- derived sizes ---------------------------------------------------------------------
    @property
    def sink_chunks(self) -> int:
        return self.sink_frames // self.frames_per_chunk

    @property
    def recent_chunks(self) -> int:
        return self.recent_frames // self.frames_per_chunk

    def kept_tokens(self, frame_tokens: int) -> int:
        """Tokens one banked chunk keeps per layer for ``frame_tokens`` tokens per latent frame."""
        return kept_tokens_per_chunk(frame_tokens, self.frames_per_chunk, self.keep_ratio)

    def pages_per_chunk(self, frame_tokens: int) -> int:
        """Pages a retrieved (compressed) chunk occupies per layer; the last one may be partial."""
        return -(-self.kept_tokens(frame_tokens) // self.page_size)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WorldKVConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"WorldKV config must be a JSON object, got {type(data).__name__}: {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorldKV config key(s) {unknown}: allowed keys are {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str | None) -> "WorldKVConfig":
        """Parse the engine flag's JSON (``None`` or empty string gives the defaults)."""
        if text is None or not text.strip():
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"WorldKV config is not valid JSON ({exc.msg} at position {exc.pos}): {text!r}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> "WorldKVConfig":
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Hash of the knobs that change what a bank entry holds (used to refuse incompatible banks)."""
        keys = ("frames_per_chunk", "keep_ratio", "pooled", "page_size")
        if self.compression != "novelty":  # novelty banks keep the fingerprint they always had
            keys += ("compression",)
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _name_registries() -> dict[str, Registry]:
    """Config field -> the registry its value must name."""
    # imported here, not at the top: the bank package imports this module (Bank takes a config)
    from worldkv_connector.bank.eviction import EVICTIONS

    return {"policy": POLICIES, "eviction": EVICTIONS, "compression": COMPRESSIONS}


_TYPES = {"int": (int,), "float": (float, int), "bool": (bool,), "str": (str,), "str | None": (str, type(None)),
          "dict | None": (dict, type(None)),
          "int | None": (int, type(None))}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    allowed = _TYPES[str(annotation)]
    # bool is an int subclass: accept it only where a bool is asked for
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, allowed)
    if ok and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"WorldKVConfig.{name}={value!r} is not a finite number")
    if not ok:
        names = " or ".join({type(None): "null", dict: "a JSON object"}.get(t, t.__name__) for t in allowed)
        raise ValueError(f"WorldKVConfig.{name}={value!r} has the wrong type: expected {names}, got {type(value).__name__}")
