"""What an item can be: raw pictures, encoded access units, PCM audio; their wire ids.

Ids are part of the shared-memory layout (docs/framebus.md): never renumber, only append.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "CODECS",
    "KIND_AUDIO",
    "KIND_ENCODED",
    "KIND_VIDEO",
    "KINDS",
    "PIXEL_FORMATS",
    "SAMPLE_FORMATS",
    "PictureGeometry",
    "picture_geometry",
]

KIND_VIDEO, KIND_ENCODED, KIND_AUDIO = 1, 2, 3
KINDS = {"video": KIND_VIDEO, "encoded": KIND_ENCODED, "audio": KIND_AUDIO}
KIND_NAMES = {v: k for k, v in KINDS.items()}

# name -> (id, bytes per pixel of plane 0, planar)
PIXEL_FORMATS = {"rgb24": 1, "bgr24": 2, "gray": 3, "yuv420p": 4, "nv12": 5}
PIXEL_FORMAT_NAMES = {v: k for k, v in PIXEL_FORMATS.items()}
_PACKED_BPP = {"rgb24": 3, "bgr24": 3, "gray": 1}

CODECS = {"h264": 1, "h265": 2, "vp8": 3, "vp9": 4, "av1": 5}
CODEC_NAMES = {v: k for k, v in CODECS.items()}

SAMPLE_FORMATS = {"s16": 1}

# Item flags (u32). Bits 16-31 are free for applications.
FLAG_KEYFRAME = 1 << 0
FLAG_DISCONTINUITY = 1 << 1  # the source jumped or restarted before this item
FLAG_CORRUPT = 1 << 2  # the producer knows the item is damaged


class PictureGeometry(NamedTuple):
    """Where the planes of a picture lie inside a slot's payload."""

    size: int  # bytes the picture occupies
    stride0: int  # row pitch of plane 0 (Y, or the packed picture)
    stride1: int  # row pitch of the chroma plane(s); 0 for packed formats


def _chroma(n: int) -> int:
    return (n + 1) // 2


def picture_geometry(fmt: str, width: int, height: int, stride: int | None = None) -> PictureGeometry:
    """Size and row pitches of a `fmt` picture; `stride` is plane 0's pitch (default: tight).

    yuv420p: Y (h x stride), then U and V (ceil(h/2) x stride1), stride1 = ceil(stride/2).
    nv12: Y (h x stride), then interleaved UV (ceil(h/2) x stride). This is the layout
    OpenCV's COLOR_YUV2*_I420 / _NV12 expect when the strides are tight and sizes even.
    """
    if fmt not in PIXEL_FORMATS:
        raise ValueError(f"unknown pixel format {fmt!r}; known: {', '.join(PIXEL_FORMATS)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"picture size must be positive, got {width}x{height}")
    if fmt in _PACKED_BPP:
        row = width * _PACKED_BPP[fmt]
        s0 = row if stride is None else stride
        if s0 < row:
            raise ValueError(f"stride {s0} is smaller than a {fmt} row of {row} bytes")
        return PictureGeometry(s0 * height, s0, 0)
    s0 = width if stride is None else stride
    if s0 < width:
        raise ValueError(f"stride {s0} is smaller than a {fmt} luma row of {width} bytes")
    if fmt == "yuv420p":
        s1 = _chroma(s0)
        return PictureGeometry(s0 * height + 2 * s1 * _chroma(height), s0, s1)
    # nv12: the UV plane has ceil(w/2) pairs per row, stride rounded up to even
    s1 = s0 + (s0 & 1)
    return PictureGeometry(s0 * height + s1 * _chroma(height), s0, s1)
