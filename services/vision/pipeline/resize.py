"""Downscale pictures in any bus format, keeping the aspect ratio, to even dimensions.

    r = Resizer(max_width=640, max_height=640)
    r.plan(1280, 720)                                   # (640, 360)
    planes = r.resize_planes(item.planes(), "yuv420p", 1280, 720)   # Y 640x360, U/V 320x180
    small = r.resize_bgr(bgr)                           # (360, 640, 3)

Rules (RoomKit's, made exact): never upscale; one scale factor for both axes, the
largest that fits max_width x max_height (0 = no limit on that axis); both output sides
even (floored), at least 2, so a yuv420p/nv12 output needs no padding. An odd-sized
picture that fits is still brought to even sides (e.g. 641x481 -> 640x480).

Why planar formats are resized plane by plane: RoomKit's resizer treats every picture as
one packed image, which for yuv420p/nv12 smears the chroma planes into the luma rows (or
fails). Here Y is resized to w2 x h2 and each chroma plane (U, V, or the interleaved UV
pairs of nv12 as a 2-channel image) to w2/2 x h2/2, so the result is again a valid 4:2:0
picture and no colour conversion is spent on pixels that are about to be thrown away.
INTER_AREA (pixel-area averaging) is used: the right filter for downscaling, with no
aliasing; the tests compare it to FFmpeg's `scale=W:H:flags=area`.

Outputs go into buffers owned by the Resizer, allocated on the first picture of a size
and reused: the same arrays come back every frame. A planar result is one tight
(h2*3/2, w2) buffer whose planes are views, which is exactly what ToBGR converts without
a copy and what framebus publish_picture() takes.
"""
from __future__ import annotations

import cv2
import numpy as np

from .picture import FORMATS, PictureError, _as_planes, _check_planes, _split_tight

__all__ = ["Resizer"]


class Resizer:
    """Downscale-only resizer to at most max_width x max_height (0: that side unlimited)."""

    def __init__(self, max_width: int = 0, max_height: int = 0, *, interpolation: int = cv2.INTER_AREA) -> None:
        for key, v in (("max_width", max_width), ("max_height", max_height)):
            if not isinstance(v, int) or v < 0 or v == 1:
                raise PictureError(f"resize {key} must be 0 (no limit) or an integer >= 2, got {v!r}", "bad_config")
        self.max_width, self.max_height = max_width, max_height
        self.interpolation = interpolation
        self._plans: dict[tuple[int, int], tuple[int, int]] = {}
        self._bufs: dict[tuple, np.ndarray] = {}
        self._planes: dict[tuple, tuple[np.ndarray, ...]] = {}

    def plan(self, width: int, height: int) -> tuple[int, int]:
        """Output size for a width x height input."""
        got = self._plans.get((width, height))
        if got is not None:
            return got
        if width < 2 or height < 2:
            raise PictureError(f"cannot resize a {width}x{height} picture: both sides must be >= 2", "bad_size")
        scale = 1.0
        if self.max_width:
            scale = min(scale, self.max_width / width)
        if self.max_height:
            scale = min(scale, self.max_height / height)
        w2 = max(2, int(width * scale + 1e-9) & ~1)
        h2 = max(2, int(height * scale + 1e-9) & ~1)
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[(width, height)] = (w2, h2)
        return w2, h2

    def changes(self, width: int, height: int) -> bool:
        """Whether a width x height picture would be resized at all."""
        return self.plan(width, height) != (width, height)

    def _buf(self, key: tuple, shape: tuple) -> np.ndarray:
        b = self._bufs.get(key)
        if b is None or b.shape != shape:
            if len(self._bufs) > 8:
                self._bufs.clear()
                self._planes.clear()
            b = self._bufs[key] = np.empty(shape, np.uint8)
        return b

    def resize_bgr(self, bgr: np.ndarray) -> np.ndarray:
        """A (h, w, 3) picture (BGR or RGB alike) -> resized copy in a reused buffer,
        or `bgr` itself when it already fits."""
        h, w = bgr.shape[:2]
        w2, h2 = self.plan(w, h)
        if (w2, h2) == (w, h):
            return bgr
        out = self._buf(("packed", bgr.ndim, w2, h2), (h2, w2) + bgr.shape[2:])
        return cv2.resize(bgr, (w2, h2), dst=out, interpolation=self.interpolation)

    def resize_planes(self, src, fmt: str, width: int, height: int) -> tuple[np.ndarray, ...]:
        """Planes (item.planes(), or item.array) of a `fmt` picture -> resized planes in the
        same format, in reused buffers; the input planes themselves when nothing changes."""
        if fmt not in FORMATS:
            raise PictureError(f"unsupported pixel format {fmt!r}; known: {', '.join(FORMATS)}", "bad_format")
        planes = _as_planes(src, fmt, width, height)
        _check_planes(planes, fmt, width, height)
        w2, h2 = self.plan(width, height)
        if (w2, h2) == (width, height):
            return planes
        dst = self._dst_planes(fmt, w2, h2)
        self._resize_into(planes, dst)
        return dst

    def resize_into(self, src, fmt: str, width: int, height: int, dst) -> None:
        """Resize straight into destination planes of the planned size (an output slot's)."""
        planes = _as_planes(src, fmt, width, height)
        _check_planes(planes, fmt, width, height)
        w2, h2 = self.plan(width, height)
        out = _as_planes(dst, fmt, w2, h2)
        _check_planes(out, fmt, w2, h2)
        self._resize_into(planes, out)

    def _resize_into(self, planes: tuple, dst: tuple) -> None:
        for p, d in zip(planes, dst):
            cv2.resize(p, (d.shape[1], d.shape[0]), dst=d, interpolation=self.interpolation)

    def _dst_planes(self, fmt: str, w2: int, h2: int) -> tuple[np.ndarray, ...]:
        key = (fmt, w2, h2)
        got = self._planes.get(key)
        if got is not None and self._bufs.get(("planes",) + key) is not None:
            return got
        if fmt in ("yuv420p", "nv12"):
            buf = self._buf(("planes",) + key, (h2 * 3 // 2, w2))
            got = _split_tight(buf, fmt, w2, h2)
        else:
            shape = (h2, w2) if fmt == "gray" else (h2, w2, 3)
            got = (self._buf(("planes",) + key, shape),)
        self._planes[key] = got
        return got
