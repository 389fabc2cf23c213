"""Media files for tests, made by real encoders: PyAV's libx264 with the synthetic pattern
(every picture carries its frame number, readable after decoding) and the ffmpeg CLI."""
from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from services.capture.sources.synthetic import Pattern, frame_number

__all__ = ["ffprobe_frames", "flashes_and_beeps", "luma", "numbered_file", "picture_number"]


def numbered_file(path: Path, frames: int, *, fps: int = 25, gop: int = 10, size=(320, 240),
                  fmt: str | None = None, x264: dict[str, str] | None = None) -> Path:
    """An H.264 file whose frame i shows the number i (keyframe every `gop` frames); `x264`: more encoder options."""
    w, h = size
    pattern = Pattern(w, h)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.options = {"preset": "ultrafast", "bframes": "0", "sc_threshold": "0", **(x264 or {})}
        stream.time_base = Fraction(1, fps)
        for i in range(frames):
            frame = av.VideoFrame(w, h, "yuv420p")
            y, u, v = (np.frombuffer(p, np.uint8).reshape(-1, p.line_size) for p in frame.planes)
            pattern.draw_yuv(y, u, v, i)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def luma(item) -> np.ndarray:
    """The luma plane of a yuv420p/nv12 bus item (or the gray picture)."""
    return item.planes()[0]


def picture_number(item) -> int:
    return frame_number(luma(item) if item.format in ("yuv420p", "nv12", "gray") else item.array)


def ffprobe_frames(path: Path) -> int:
    """The number of video frames ffprobe counts by decoding the file."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "json", str(path)], capture_output=True, text=True,
                         check=True)
    return int(json.loads(out.stdout)["streams"][0]["nb_read_frames"])


def flashes_and_beeps(path: Path) -> tuple[list[float], list[float]]:
    """Times (s) of the white flashes in the video and of the beep onsets in the audio (the
    synthetic camera's flash and tone), as a player places them."""
    flashes, chunks = [], []
    with av.open(str(path)) as f:
        for frame in f.decode(video=0):
            if frame.to_ndarray(format="gray").mean() > 200:
                flashes.append(float(frame.time))
    with av.open(str(path)) as f:
        for frame in f.decode(audio=0):
            chunks.append((float(frame.time), frame.to_ndarray()[0]))
    t0, rate = chunks[0][0], 48000
    pcm = np.concatenate([c for _, c in chunks])
    loud = np.abs(pcm) > 0.1
    onsets = np.flatnonzero(loud[1:] & ~np.convolve(loud, np.ones(480), "full")[:len(loud) - 1].astype(bool))
    return flashes, [t0 + (i + 1) / rate for i in onsets]
