"""ModelConfig of the causal Wan-style DiT (Wan2.1 layout, causal across 3-latent-frame chunks) and
the named configurations of the models users run (DESIGN §2). Every size of the model and of its KV
cache is derived from these fields."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from worldkv_connector.checks import check_int, is_int
from worldkv_connector.shapes import KVShape

__all__ = ["ModelConfig", "ActionConfig", "MODEL_CONFIGS", "MODEL_FAMILIES", "get_model_config"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# wan: text-conditioned Wan T2V (Self-Forcing, CausVid); matrix-game-2: image + keyboard/mouse action
# conditioned (models/matrix_game2.py); lingbot: text + Plucker camera conditioned (models/lingbot.py)
MODEL_FAMILIES = ("wan", "matrix-game-2", "lingbot", "world")


@dataclass(frozen=True)
class ActionConfig:
    """Matrix-Game-2's action module (upstream ``action_config``): keyboard and mouse cross/temporal
    attention in the listed blocks. Inputs are per video frame; each latent frame sees a window of
    ``windows_size * vae_time_compression_ratio`` video frames of actions."""

    blocks: tuple[int, ...] = tuple(range(15))
    heads_num: int = 16
    hidden_size: int = 128  # keyboard embedding width
    keyboard_dim_in: int = 4  # W, S, A, D
    keyboard_hidden_dim: int = 1024
    mouse_dim_in: int = 2  # pitch, yaw
    mouse_hidden_dim: int = 1024
    mouse_qk_dim_list: tuple[int, int, int] = (8, 28, 28)  # RoPE split of the head dim (time, -, -)
    rope_theta: float = 256.0
    vae_time_compression_ratio: int = 4
    windows_size: int = 3
    qk_norm: bool = True
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("blocks", "mouse_qk_dim_list"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("heads_num", "hidden_size", "keyboard_dim_in", "keyboard_hidden_dim", "mouse_dim_in",
                     "mouse_hidden_dim", "vae_time_compression_ratio", "windows_size"):
            object.__setattr__(self, name, check_int(f"ActionConfig.{name}", getattr(self, name), lo=1))
        for name, width in (("mouse_hidden_dim", self.mouse_hidden_dim), ("keyboard_hidden_dim", self.keyboard_hidden_dim)):
            if width % self.heads_num:
                raise ValueError(f"ActionConfig.{name}={width}: must be divisible by heads_num={self.heads_num}")
        if sum(self.mouse_qk_dim_list) != self.mouse_hidden_dim // self.heads_num:
            raise ValueError(f"ActionConfig.mouse_qk_dim_list={list(self.mouse_qk_dim_list)}: must sum to the action "
                             f"head dim {self.mouse_hidden_dim // self.heads_num}")
        if any(not is_int(b) or b < 0 for b in self.blocks):
            raise ValueError(f"ActionConfig.blocks={list(self.blocks)}: expected block indices >= 0")

    @property
    def pad_frames(self) -> int:
        """Video frames of actions each latent frame sees."""
        return self.windows_size * self.vae_time_compression_ratio


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a causal Wan-style DiT.

    Latents of one chunk are ``[B, frames_per_chunk, in_channels, latent_height, latent_width]``;
    each latent frame becomes ``frame_tokens = (latent_height/ph) * (latent_width/pw)`` tokens.
    """

    name: str
    num_layers: int
    num_heads: int
    head_dim: int
    dim: int  # = num_heads * head_dim
    ffn_dim: int
    latent_height: int
    latent_width: int
    num_kv_heads: int | None = None  # = num_heads (Wan has no GQA); None means num_heads
    in_channels: int = 16  # Wan VAE latent channels
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width), Conv3d kernel = stride
    text_dim: int = 4096  # umT5-XXL hidden size; 0: no text conditioning (Matrix-Game-2)
    text_len: int = 512
    freq_dim: int = 256  # sinusoidal timestep embedding size
    family: str = "wan"  # one of MODEL_FAMILIES
    image_dim: int = 0  # CLIP image feature width of image-conditioned models (1280); 0: none
    image_len: int = 257  # CLIP image tokens
    action: ActionConfig | None = None  # Matrix-Game-2's action module
    camera_fov_degrees: float = 90.0  # horizontal field of view of the default intrinsics (lingbot, world)
    temporal_rope: bool = True  # False: every frame sits at temporal position 0 (no time position; the world model)
    frames_per_chunk: int = 3
    eps: float = 1e-6
    timestep_scale: float = 1000.0  # sigma in [0, 1] -> Wan's timestep in [0, 1000]
    dtype: str = "bf16"  # "bf16", "fp16" or "fp32"

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelConfig.name={self.name!r}: expected a non-empty str")
        if isinstance(self.action, dict):
            object.__setattr__(self, "action", ActionConfig(**self.action))
        if self.family not in MODEL_FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}: choose one of {list(MODEL_FAMILIES)}")
        if (self.family == "matrix-game-2") != (self.action is not None):
            raise ValueError(f"ModelConfig.action={self.action!r}: matrix-game-2 needs an ActionConfig, other families none")
        if self.family == "matrix-game-2" and (self.image_dim < 1 or self.text_dim != 0):
            raise ValueError(f"ModelConfig.image_dim={self.image_dim!r}, text_dim={self.text_dim!r}: matrix-game-2 is "
                             "image-conditioned (image_dim >= 1) and has no text (text_dim 0)")
        for field in ("text_dim", "image_dim"):
            object.__setattr__(self, field, check_int(f"ModelConfig.{field}", getattr(self, field), lo=0))
        if self.family != "matrix-game-2" and self.text_dim < 1:
            raise ValueError(f"ModelConfig.text_dim={self.text_dim!r}: family {self.family!r} is text-conditioned (>= 1)")
        for field in (
            "num_layers", "num_heads", "num_kv_heads", "head_dim", "dim", "ffn_dim", "latent_height",
            "latent_width", "in_channels", "out_channels", "text_len", "freq_dim", "image_len",
            "frames_per_chunk",
        ):
            object.__setattr__(self, field, check_int(f"ModelConfig.{field}", getattr(self, field), lo=1))
        if self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads!r}: must equal num_heads={self.num_heads} "
                "(Wan DiTs do not use GQA)"
            )
        if self.dim != self.num_heads * self.head_dim:
            raise ValueError(
                f"ModelConfig.dim={self.dim!r}: must equal num_heads*head_dim="
                f"{self.num_heads}*{self.head_dim}={self.num_heads * self.head_dim}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim!r}: must be even (RoPE rotates channel pairs)")
        if self.freq_dim % 2:
            raise ValueError(f"ModelConfig.freq_dim={self.freq_dim!r}: must be even (sin and cos halves)")
        ps = self.patch_size
        if not (isinstance(ps, tuple) and len(ps) == 3 and all(is_int(p) and p >= 1 for p in ps)):
            raise ValueError(f"ModelConfig.patch_size={ps!r}: expected a tuple of 3 ints >= 1")
        if ps[0] != 1:
            # the causal cache is per latent frame: a temporal patch would mix frames of two chunks
            raise ValueError(f"ModelConfig.patch_size={ps!r}: temporal patch must be 1")
        if self.latent_height % ps[1]:
            raise ValueError(
                f"ModelConfig.latent_height={self.latent_height!r}: must be divisible by patch height {ps[1]}"
            )
        if self.latent_width % ps[2]:
            raise ValueError(
                f"ModelConfig.latent_width={self.latent_width!r}: must be divisible by patch width {ps[2]}"
            )
        if not isinstance(self.temporal_rope, bool):
            raise ValueError(f"ModelConfig.temporal_rope={self.temporal_rope!r}: expected True or False")
        if not 1.0 <= self.camera_fov_degrees <= 179.0:
            raise ValueError(f"ModelConfig.camera_fov_degrees={self.camera_fov_degrees!r}: expected 1..179")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"ModelConfig.eps={self.eps!r}: expected 0 < eps < 1")
        if not self.timestep_scale > 0:
            raise ValueError(f"ModelConfig.timestep_scale={self.timestep_scale!r}: expected > 0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}: choose one of {sorted(_DTYPES)}")

    # --- derived sizes ------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def grid_height(self) -> int:
        """Patch rows per latent frame."""
        return self.latent_height // self.patch_size[1]

    @property
    def grid_width(self) -> int:
        """Patch columns per latent frame."""
        return self.latent_width // self.patch_size[2]

    @property
    def frame_tokens(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def chunk_tokens(self) -> int:
        return self.frame_tokens * self.frames_per_chunk

    @property
    def patch_elems(self) -> int:
        return math.prod(self.patch_size)

    def kv_shape(self) -> KVShape:
        """Shape of this model's KV cache (per layer, per latent frame)."""
        return KVShape(
            name=self.name,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            frame_tokens=self.frame_tokens,
            dtype=self.dtype,
            frames_per_chunk=self.frames_per_chunk,
        )

    def num_params(self) -> int:
        """Parameter count of the model built from this config (equal to the built model's count)."""
        d, pe = self.dim, self.patch_elems

        def linear(i: int, o: int) -> int:
            return i * o + o

        if self.family != "wan":  # the model files count their own extra modules
            from worldkv_connector.integration.video.models import build_model_on

            return sum(p.numel() for p in build_model_on(self, "meta").parameters())
        attn = 4 * linear(d, d) + 2 * d  # q, k, v, o + RMSNorm weights of q and k
        block = 2 * attn + 2 * d + linear(d, self.ffn_dim) + linear(self.ffn_dim, d) + 6 * d  # + norm3, ffn, modulation
        total = self.num_layers * block
        total += self.in_channels * pe * d + d  # patch_embedding (Conv3d)
        total += linear(self.text_dim, d) + linear(d, d)  # text_embedding
        total += linear(self.freq_dim, d) + linear(d, d)  # time_embedding
        total += linear(d, 6 * d)  # time_projection
        total += linear(d, pe * self.out_channels) + 2 * d  # head + head.modulation
        return total

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        if self.action is not None:
            out["action"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["action"].items()}
        return out

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        # tests: 16 tokens per latent frame; a 24-chunk rollout runs in seconds on the CPU
        ModelConfig("tiny", num_layers=2, num_heads=2, head_dim=16, dim=32, ffn_dim=64, latent_height=8,
                    latent_width=8, text_dim=32, text_len=8, freq_dim=32, dtype="fp32"),
        # CPU benchmarks: 64 tokens per latent frame
        ModelConfig("small", num_layers=4, num_heads=4, head_dim=32, dim=128, ffn_dim=256, latent_height=16,
                    latent_width=16, text_dim=64, text_len=16, freq_dim=64, dtype="fp32"),
        # Self-Forcing / CausVid: Wan2.1-T2V-1.3B at 480x832 (latent 60x104)
        ModelConfig("wan-1.3b", num_layers=30, num_heads=12, head_dim=128, dim=1536, ffn_dim=8960,
                    latent_height=60, latent_width=104),
        # Matrix-Game-2.0 (Skywork): Wan-1.3B I2V-shaped, 352x640 (latent 44x80); input = 16 noise + 4 mask +
        # 16 first-frame latent channels; CLIP image context, no text; action module in blocks 0-14
        ModelConfig("matrix-game-2", num_layers=30, num_heads=12, head_dim=128, dim=1536, ffn_dim=8960,
                    latent_height=44, latent_width=80, in_channels=36, text_dim=0, family="matrix-game-2",
                    image_dim=1280, action=ActionConfig()),
        # tests: a Matrix-Game-2 with the upstream structure at toy widths (action module in blocks 0 and 1)
        ModelConfig("tiny-mg2", num_layers=2, num_heads=2, head_dim=16, dim=32, ffn_dim=64, latent_height=8,
                    latent_width=8, in_channels=36, text_dim=0, freq_dim=32, family="matrix-game-2", image_dim=24,
                    image_len=5, dtype="fp32",
                    action=ActionConfig(blocks=(0, 1), heads_num=1, hidden_size=8, keyboard_hidden_dim=64,
                                        mouse_hidden_dim=64, mouse_qk_dim_list=(16, 24, 24))),
        # LingBot-World-Fast (Robbyant): Wan2.2-I2V-A14B-shaped (one expert), 480x832; input = 16 noise + 4 mask +
        # 16 first-frame latent channels; umT5 text context and Plucker camera control
        ModelConfig("lingbot-fast", num_layers=40, num_heads=40, head_dim=128, dim=5120, ffn_dim=13824,
                    latent_height=60, latent_width=104, in_channels=36, family="lingbot"),
        # tests: a LingBot-World with the upstream structure at toy widths
        ModelConfig("tiny-lingbot", num_layers=2, num_heads=2, head_dim=16, dim=32, ffn_dim=64, latent_height=8,
                    latent_width=8, in_channels=36, text_dim=32, text_len=8, freq_dim=32, family="lingbot",
                    dtype="fp32"),
        # the world model trained on the procedural panorama world (worldkv_connector/world): 12 tokens
        # per latent frame, camera-conditioned, no time position so any subset of cached chunks is a context
        ModelConfig("world", num_layers=3, num_heads=4, head_dim=24, dim=96, ffn_dim=256, latent_height=4,
                    latent_width=12, in_channels=4, out_channels=4, text_dim=8, text_len=1, freq_dim=32,
                    family="world", camera_fov_degrees=45.0, temporal_rope=False, dtype="fp32"),
    )
}


def get_model_config(name: str) -> ModelConfig:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}: choose one of {sorted(MODEL_CONFIGS)}") from None
