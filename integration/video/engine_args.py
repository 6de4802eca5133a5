"""EngineArgs: every knob of the video backend, validated in one place (the CLI flags map 1:1)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass

from worldkv_connector.checks import is_int

__all__ = ["EngineArgs", "ATTENTION_WINDOWS", "DTYPES", "DEFAULT_SINK_FRAMES", "DEFAULT_RECENT_FRAMES", "MAX_CHUNKS"]

ATTENTION_WINDOWS = ("full", "sliding")
DTYPES = ("bf16", "fp16", "fp32")
# the window without a connector when --sink-frames / --recent-frames are not given (WorldKV's reference)
DEFAULT_SINK_FRAMES = 3
DEFAULT_RECENT_FRAMES = 6
_GiB = 1 << 30
# chunks one session may ask for: a bound checked before anything is allocated (a tiny model makes
# about 100 chunks/s on one CPU thread, so this is hours; a Wan-1.3B chunk takes a second on a GPU)
MAX_CHUNKS = 1_000_000


@dataclass(frozen=True)
class EngineArgs:
    """Configuration of a :class:`~worldkv_connector.integration.video.engine.VideoEngine`.

    Window without a connector: ``full`` keeps every committed chunk; ``sliding`` keeps the first
    ``sink_frames`` and the last ``recent_frames`` latent frames (whole chunks); None ("not given")
    means 3 and 6. A connector puts its chunks between the two, and its own config defines the
    window (the WorldKV connector: ``sink_frames``/``recent_frames`` of its JSON, defaults 3 and 6);
    values given here must then agree with it (the engine raises ``ValueError`` naming both).
    """

    model: str = "tiny"  # named model config (integration/video/model_config.py)
    checkpoint: str | None = None  # .safetensors file / shard directory, or .pt/.pth state dict (checkpoint.py)
    checkpoint_key: str | None = None  # entry of a .pt/.pth file holding the weights, e.g. "generator_ema"
    checkpoint_prefix: str = ""  # stripped from every checkpoint key, e.g. "model."
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str | None = None  # "bf16", "fp16", "fp32"; None: the model config's dtype
    seed: int = 0  # model weights seed (random weights when no checkpoint) and default session seed
    attention_window: str = "sliding"  # "full" or "sliding"
    sink_frames: int | None = None  # latent frames of the sink; None: 3, or the connector's
    recent_frames: int | None = None  # latent frames of the recent window; None: 6, or the connector's
    num_denoising_steps: int = 4  # flow-matching steps per chunk before the clean pass
    timestep_shift: float = 5.0  # flow-matching sigma shift (Self-Forcing's warped steps); 1.0: none
    kv_cache_memory: float | None = None  # GiB for the paged KV cache; None: auto (see model_runner)
    page_size: int = 64  # tokens per KV page
    attention_backend: str = "torch"  # "torch" (reference) or "triton"
    kv_connector: str | None = None  # registered connector name or "module:Class"
    kv_connector_config: str | None = None  # JSON passed to the connector
    # diagnostic: keep a shadow full-KV history and measure, per chunk and layer, the share of
    # full-history attention mass the window holds (integration/video/recall.py); costs nothing when off
    eval_attention_recall: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                allowed = f"not a finite number ({allowed})"
            raise ValueError(f"EngineArgs.{name}={value!r}: {allowed}")

        for f in dataclasses.fields(self):  # numpy integers from the Python API are ints here
            value = getattr(self, f.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                object.__setattr__(self, f.name, int(value))
        if isinstance(self.kv_connector_config, dict):  # the Python API may pass the config itself
            try:
                object.__setattr__(self, "kv_connector_config", json.dumps(self.kv_connector_config))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"EngineArgs.kv_connector_config: the dict is not JSON-serialisable ({exc})") from None

        if not isinstance(self.model, str) or not self.model:
            fail("model", "expected a model config name")
        if self.checkpoint_key is not None and (not isinstance(self.checkpoint_key, str) or not self.checkpoint_key):
            fail("checkpoint_key", "expected a non-empty entry name such as 'generator_ema', or None")
        if not isinstance(self.checkpoint_prefix, str):
            fail("checkpoint_prefix", "expected a str such as 'model.' ('' for none)")
        if (self.checkpoint_key or self.checkpoint_prefix) and not self.checkpoint:
            fail("checkpoint_key" if self.checkpoint_key else "checkpoint_prefix", "needs a checkpoint (--checkpoint)")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            fail("device", "choose cpu, cuda or cuda:N")
        if self.dtype is not None and self.dtype not in DTYPES:
            fail("dtype", f"choose one of {list(DTYPES)} or None")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            fail("seed", "allowed 0 <= seed < 2**63")
        if self.attention_window not in ATTENTION_WINDOWS:
            fail("attention_window", f"choose one of {list(ATTENTION_WINDOWS)}")
        for name in ("sink_frames", "recent_frames"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= 1 << 20):
                fail(name, "allowed 0 <= frames <= 1048576, or None (not given)")
        if not is_int(self.num_denoising_steps) or not 1 <= self.num_denoising_steps <= 1000:
            fail("num_denoising_steps", "allowed 1 <= num_denoising_steps <= 1000")
        if not isinstance(self.timestep_shift, (int, float)) or not 0 < self.timestep_shift <= 100:
            fail("timestep_shift", "allowed 0 < timestep_shift <= 100")
        if self.kv_cache_memory is not None and (
            not isinstance(self.kv_cache_memory, (int, float)) or not 0 < self.kv_cache_memory <= 1 << 20
        ):
            fail("kv_cache_memory", "expected GiB > 0 (--kv-cache-memory), or None for auto")
        if not is_int(self.page_size) or not 1 <= self.page_size <= 1 << 16:
            fail("page_size", "allowed 1 <= page_size <= 65536")
        if self.attention_backend not in ("torch", "triton"):
            fail("attention_backend", "choose torch or triton")
        if self.kv_connector is not None and (not isinstance(self.kv_connector, str) or not self.kv_connector):
            fail("kv_connector", "expected a registered connector name or module:Class")
        if self.kv_connector_config is not None and not isinstance(self.kv_connector_config, str):
            fail("kv_connector_config", "expected a JSON string or a dict")
        if self.kv_connector is None and (self.kv_connector_config or "").strip():
            raise ValueError(
                f"--kv-connector-config {self.kv_connector_config!r} was given without --kv-connector: "
                "name the connector it configures (e.g. --kv-connector worldkv), or leave the config out"
            )
        if not isinstance(self.eval_attention_recall, bool):
            fail("eval_attention_recall", "expected True or False")

    def check_frames(self, frames_per_chunk: int) -> None:
        """The window is made of whole chunks: sink and recent frames must be multiples of a chunk."""
        for name in ("sink_frames", "recent_frames"):
            value = getattr(self, name)
            if value is not None and value % frames_per_chunk:
                raise ValueError(
                    f"--{name.replace('_', '-')} {value}: must be a multiple of the chunk size "
                    f"({frames_per_chunk} latent frames)"
                )

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else int(self.kv_cache_memory * _GiB)

    def replace(self, **changes) -> "EngineArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
