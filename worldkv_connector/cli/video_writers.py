"""Where decoded frames go: an MP4 written as it grows, PNG frames, a first-visit/revisit sheet.

Frames are ``uint8`` arrays ``[H, W, 3]`` (RGB). ``Mp4Writer`` is PyAV (H.264, yuv420p, x264
without lookahead) into a fragmented MP4 (``empty_moov`` + a fragment per keyframe, a keyframe
every second of video): after a crash or a kill the file plays up to the last whole second
written, and ``close`` writes the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["to_uint8", "Mp4Writer", "PngFrames", "contact_sheet", "read_mp4"]


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[B=1, 3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 (RGB)."""
    if video.dim() != 5 or video.shape[:2] != (1, 3):
        raise ValueError(f"video: expected [1, 3, T, H, W], got {list(video.shape)}")
    x = ((video[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
    return x.permute(1, 2, 3, 0).cpu().numpy()


class Mp4Writer:
    """``write(frames [T, H, W, 3] uint8)`` any number of times, then ``close()``. fps: frames per
    second of the file; crf: x264 quality (0 lossless .. 51 worst, 18 about visually lossless)."""

    def __init__(self, path: str | Path, fps: int, crf: int, codec: str = "libx264") -> None:
        import av

        self.path = Path(path)
        self.fps, self.crf, self.codec = fps, crf, codec
        self._av = av
        self._container = None
        self._stream = None
        self.frames = 0

    def _open(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"--video: frames of {height}x{width}; H.264 yuv420p needs even sizes")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # fragmented MP4: a moov up front, then a fragment per keyframe, flushed to the file per packet
        self._container = self._av.open(str(self.path), mode="w", format="mp4",
                                        options={"movflags": "frag_keyframe+empty_moov+default_base_moof",
                                                 "flush_packets": "1"})
        s = self._container.add_stream(self.codec, rate=self.fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.gop_size = self.fps  # a keyframe, hence a fragment on disk, every second of video
        # zerolatency: no lookahead or B-frames, so each frame leaves the encoder when written
        s.options = {"crf": str(self.crf), "preset": "medium", "tune": "zerolatency"}
        self._stream = s

    def write(self, frames: np.ndarray) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames: expected [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
        if self._container is None:
            self._open(frames.shape[1], frames.shape[2])
        for f in frames:
            vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():  # flush the encoder's delayed frames
            self._container.mux(packet)
        self._container.close()
        self._container = None


def read_mp4(path: str | Path) -> np.ndarray:
    """Every frame of a video file as [T, H, W, 3] uint8 (tests and checks)."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


class PngFrames:
    """Frames as ``DIR/<prefix>frame_00000.png``, numbered per video."""

    def __init__(self, folder: str | Path, prefix: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        from PIL import Image

        for f in frames:
            Image.fromarray(f).save(self.folder / f"{self.prefix}frame_{self.frames:05d}.png")
            self.frames += 1


def contact_sheet(path: str | Path, pairs: Sequence[tuple[int, np.ndarray, int, np.ndarray]], title: str) -> None:
    """One row per revisit: (first-visit chunk, its frame, revisit chunk, its frame), side by side."""
    from PIL import Image, ImageDraw

    h, w = pairs[0][1].shape[:2]
    label, gap = 14, 4
    sheet = Image.new("RGB", (2 * w + 3 * gap, label + len(pairs) * (h + label + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 1), title, fill="black")
    for i, (first, f_img, again, r_img) in enumerate(pairs):
        y = label + i * (h + label + gap)
        draw.text((gap, y), f"chunk {first} (first visit)", fill="black")
        draw.text((2 * gap + w, y), f"chunk {again} (revisit)", fill="black")
        sheet.paste(Image.fromarray(f_img), (gap, y + label))
        sheet.paste(Image.fromarray(r_img), (2 * gap + w, y + label))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
