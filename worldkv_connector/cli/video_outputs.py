"""``worldkv generate``'s video flags: decode with the Wan VAE as the rollout goes, write MP4 / PNG
frames / a first-visit-vs-revisit contact sheet, and take a prompt or a first frame.

generate.py calls three things: ``add_video_arguments(parser)``; ``VideoOutputs.from_args(args,
model_config)`` before any work (every bad input fails here with a one-line error); then
``outputs.session_kwargs()`` for ``engine.add_session``, ``outputs.on_chunk(result)`` per chunk
and ``outputs.close(engine)`` at the end, also when the run is interrupted (a ``finally``), so the
video written so far stays playable.
"""
from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path

import numpy as np

__all__ = ["add_video_arguments", "VideoOutputs"]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch dtype names
DEFAULT_FPS = 16  # Wan2.1's frame rate


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video output and conditioning")
    g.add_argument("--vae", metavar="PATH", help="Wan VAE: a diffusers AutoencoderKLWan folder (or a pipeline folder "
                   "with vae/), or the Wan2.1 release's Wan2.1_VAE.pth; needed by --video/--frames/--contact-sheet")
    g.add_argument("--vae-device", help="device of the VAE (default: the model's --device)")
    g.add_argument("--vae-dtype", choices=sorted(_DTYPES), help="VAE dtype (default fp32 on the CPU, bf16 on CUDA)")
    g.add_argument("--video", metavar="OUT.mp4", help="write the decoded rollout as an H.264 MP4, chunk by chunk "
                   "(playable if the run stops early); more sessions: OUT.s1.mp4, ...")
    g.add_argument("--fps", type=int, default=DEFAULT_FPS, help=f"frame rate of --video (default {DEFAULT_FPS})")
    g.add_argument("--crf", type=int, default=18, help="x264 quality of --video: 0 lossless .. 51 worst (default 18)")
    g.add_argument("--frames", metavar="DIR", help="write every decoded frame as DIR/<session>_frame_NNNNN.png")
    g.add_argument("--contact-sheet", metavar="OUT.png", help="for each revisit chunk, its first-visit frame beside "
                   "the revisit frame (the middle frame of each chunk), one row per revisit")
    g.add_argument("--prompt-embeds", metavar="FILE.safetensors",
                   help="precomputed umT5 prompt embeddings [L, text_dim] (key prompt_embeds)")
    g.add_argument("--prompt", metavar="TEXT", help="prompt text, encoded with --text-encoder")
    g.add_argument("--text-encoder", metavar="PATH", help="umT5 encoder folder for --prompt (transformers "
                   "UMT5EncoderModel with its tokenizer, or a Wan pipeline folder with text_encoder/ and tokenizer/)")
    g.add_argument("--image", metavar="FILE", help="first frame for image-conditioned models, encoded with --vae")


def _check_suffix(flag: str, path: str | None, suffix: str) -> None:
    if path is not None and not path.lower().endswith(suffix):
        raise ValueError(f"{flag} {path}: expected a {suffix} path")


def _load_image(path: str, height: int, width: int):
    """[3, H, W] fp32 in [-1, 1], resized to the model's frame size (as the Wan I2V pipeline resizes)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"--image {path}: not an image ({exc})") from None
    img = img.resize((width, height), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1.0


class VideoOutputs:
    """The decoders and writers of one ``generate`` run (module docstring)."""

    def __init__(self, args: argparse.Namespace, model_config) -> None:
        self.args, self.config = args, model_config
        self.vae = None
        self.context = None  # [L, text_dim] fp32 CPU
        self.image_latents = None  # [C, 1, h, w] fp32 CPU
        self._decoders: dict = {}
        self._videos: dict = {}
        self._frames: dict = {}
        self._stills: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        self._bar = None

    @property
    def decoding(self) -> bool:
        a = self.args
        return bool(a.video or a.frames or a.contact_sheet)

    # --- validation and inputs, before any work ----------------------------------------------
    @classmethod
    def from_args(cls, args: argparse.Namespace, model_config) -> "VideoOutputs":
        self = cls(args, model_config)
        a, c = args, model_config
        _check_suffix("--video", a.video, ".mp4")
        _check_suffix("--contact-sheet", a.contact_sheet, ".png")
        if not 1 <= a.fps <= 240:
            raise ValueError(f"--fps {a.fps}: expected 1..240")
        if not 0 <= a.crf <= 51:
            raise ValueError(f"--crf {a.crf}: expected 0..51")
        for flag, value in (("--video", a.video), ("--frames", a.frames), ("--contact-sheet", a.contact_sheet),
                            ("--image", a.image)):
            if value is not None and a.vae is None:
                raise ValueError(f"{flag} needs --vae PATH (the Wan VAE; see the README's video section)")
        if a.vae is not None and not (self.decoding or a.image):
            raise ValueError(f"--vae {a.vae}: nothing to decode; add --video, --frames or --contact-sheet")
        if a.prompt is not None and a.prompt_embeds is not None:
            raise ValueError("give either --prompt or --prompt-embeds, not both")
        if (a.prompt is None) != (a.text_encoder is None):
            raise ValueError("--prompt and --text-encoder go together (the prompt is encoded with the encoder)")
        if a.image is not None and not getattr(c, "image_conditioned", False):
            raise ValueError(f"--image {a.image}: model {c.name} is not image-conditioned (it takes no first frame)")
        if a.video is not None:
            try:
                import av  # noqa: F401
            except ImportError as exc:
                raise ValueError(f"--video needs PyAV (pip install av==18.1.0): {exc}") from None
        self._load_inputs()
        return self

    def _load_inputs(self) -> None:
        import torch

        from worldkv_connector.integration.video import text_encoder as te

        a, c = self.args, self.config
        where = a.vae_device or a.device
        try:
            ok = torch.device(where).type != "cuda" or torch.cuda.is_available()
        except RuntimeError:
            raise ValueError(f"--vae-device {where!r}: not a torch device (cpu, cuda, cuda:N)") from None
        if not ok and (a.vae or a.prompt):
            raise ValueError(f"--vae-device {where}: torch.cuda.is_available() is False on this machine")
        if a.prompt_embeds is not None:
            self.context = te.check_context(te.load_prompt_embeds(a.prompt_embeds), c.text_dim, c.text_len, c.name,
                                            "--prompt-embeds")
        if a.prompt is not None:
            enc = te.PromptEncoder(a.text_encoder, c.text_len, device=where)
            if enc.hidden_size != c.text_dim:
                raise ValueError(f"--text-encoder {a.text_encoder}: hidden size {enc.hidden_size}, but model {c.name} "
                                 f"takes text_dim {c.text_dim}")
            self.context = te.check_context(enc.encode(a.prompt), c.text_dim, c.text_len, c.name, "--prompt")
            del enc
        if a.vae is None:
            return
        from worldkv_connector.integration.video.vae import encode_first_frame, load_wan_vae

        device = torch.device(a.vae_device or a.device)
        dtype = getattr(torch, _DTYPES[a.vae_dtype or ("bf16" if device.type == "cuda" else "fp32")])
        self.vae = load_wan_vae(a.vae, device, dtype)
        z = self.vae.config.z_dim
        if z != c.in_channels:
            raise ValueError(f"--vae {a.vae}: latent channels {z}, but model {c.name} makes {c.in_channels}")
        if a.image is not None:
            ratio = self.vae.spatial_compression_ratio
            img = _load_image(a.image, c.latent_height * ratio, c.latent_width * ratio)
            self.image_latents = encode_first_frame(self.vae, img).float().cpu()  # [C, 1, h, w]

    def session_kwargs(self, add_session) -> dict:
        """Keyword arguments of ``add_session`` for the conditioning inputs it accepts."""
        kw: dict = {}
        if self.context is not None:
            kw["context"] = self.context
        if self.image_latents is not None:
            if "image_latents" not in inspect.signature(add_session).parameters:
                raise ValueError(f"--image: the engine's sessions take no image_latents for model {self.config.name}")
            kw["image_latents"] = self.image_latents
        return kw

    # --- per chunk ------------------------------------------------------------------------------
    def _path(self, sid: str, index: int) -> Path:
        p = Path(self.args.video)
        return p if index == 0 else p.with_name(f"{p.stem}.{sid}{p.suffix}")

    def on_chunk(self, r) -> None:
        """Decode chunk ``r`` (a ChunkResult: latents [F, C, h, w]) and write it everywhere asked."""
        if not self.decoding:
            return
        from worldkv_connector.cli.video_writers import Mp4Writer, PngFrames, to_uint8
        from worldkv_connector.integration.video.vae import StreamingDecoder

        sid, a = r.session_id, self.args
        if sid not in self._decoders:
            index = len(self._decoders)
            self._decoders[sid] = StreamingDecoder(self.vae)
            if a.video:
                self._videos[sid] = Mp4Writer(self._path(sid, index), a.fps, a.crf)
            if a.frames:
                self._frames[sid] = PngFrames(a.frames, prefix=f"{sid}_")
        frames = to_uint8(self._decoders[sid].decode(r.latents.permute(1, 0, 2, 3)[None]))  # [T, H, W, 3]
        if sid in self._videos:
            self._videos[sid].write(frames)
        if sid in self._frames:
            self._frames[sid].write(frames)
        if a.contact_sheet:
            self._stills.setdefault(sid, []).append((r.chunk_index, frames[len(frames) // 2].copy(),
                                                     np.asarray(r.pose)))
        self._progress(len(frames))

    def _progress(self, n: int) -> None:
        if self._bar is None:
            import sys

            from tqdm import tqdm

            self._bar = tqdm(unit="frame", desc="decode", file=sys.stderr, position=1,
                             disable=getattr(self.args, "no_progress", False))
        self._bar.update(n)

    # --- end --------------------------------------------------------------------------------------
    def close(self, engine=None) -> list[str]:
        """Finish every file; returns the lines to print (what was written)."""
        lines = []
        for w in self._videos.values():
            w.close()
            lines.append(f"wrote {w.path} ({w.frames} frames, {self.args.fps} fps)")
        for sid, f in self._frames.items():
            lines.append(f"wrote {f.frames} frames of {sid} to {f.folder}")
        if self._bar is not None:
            self._bar.close()
        if self.args.contact_sheet and engine is not None:
            lines.append(self._contact_sheet(engine))
        self._videos.clear()
        return lines

    def _contact_sheet(self, engine, max_rows: int = 12) -> str:
        from worldkv_connector.cli.video_writers import contact_sheet
        from worldkv_connector.integration.video.recall import revisit_sources

        sched = engine.scheduler
        pairs = []
        for sid, stills in self._stills.items():
            stills = sorted(stills, key=lambda s: s[0])
            poses = np.stack([s[2] for s in stills])  # [N, 4, 4]
            sources = revisit_sources(poses, sched.sink_chunks, sched.recent_chunks)
            for c, src in enumerate(sources):
                if src:  # the first visit: the candidate whose view is closest (earliest on ties)
                    j = min(src, key=lambda j: (_view_distance(poses[j], poses[c]), j))
                    pairs.append((stills[j][0], stills[j][1], stills[c][0], stills[c][1]))
        if not pairs:
            return f"--contact-sheet {self.args.contact_sheet}: no revisit in this rollout, nothing written"
        if len(pairs) > max_rows:  # evenly over the rollout
            pairs = [pairs[round(i * (len(pairs) - 1) / (max_rows - 1))] for i in range(max_rows)]
        contact_sheet(self.args.contact_sheet, pairs, f"first visit | revisit ({len(pairs)} rows)")
        return f"wrote {self.args.contact_sheet} ({len(pairs)} revisit rows)"


def _view_distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(rotation angle in degrees, translation) between two [4, 4] camera-to-world poses."""
    cos = (np.trace(a[:3, :3].T @ b[:3, :3]) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))), float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
