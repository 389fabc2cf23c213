"""A picture on the bus into the encoder's input frame: one pass over the pixels, no allocation.

    pool = FramePool("yuv420p", 1280, 720)          # a few frames, made once per geometry
    fill = Filler("rgb24", 1280, 720, pool)        # what the input is
    frame = pool.next()
    fill(item.planes(), frame)                      # the slot's planes straight into the frame

The pool's frames are PyAV frames over numpy buffers of their own (VideoFrame.from_numpy_buffer:
the frame and the array share memory), made once; filling one writes into FFmpeg's input
directly. The encoders FFmpeg wraps here (libx264, libvpx, NVENC, V4L2 M2M) copy the picture in
while encode() runs, so a frame may be refilled once encode() returned; the pool still rotates
over a few, so an encoder that kept a reference for one more call would not see it change.

What the fill costs, per picture (the output is yuv420p, or nv12 when the input is nv12 and the
encoder takes it):

* the input's size (or one pixel less, when it is odd: 4:2:0 needs even sizes; the views are
  cropped, nothing is scaled):
  - yuv420p -> yuv420p, nv12 -> nv12: one copy per plane (np.copyto);
  - nv12 -> yuv420p: Y copied, UV split into U and V (two strided copies of a quarter picture);
  - gray: Y copied; the chroma planes are mid-grey, written once when the pool is made;
  - rgb24 / bgr24: one conversion pass (OpenCV's RGB -> I420, BT.601 limited range, what the
    synthetic camera's own encoder draws) straight into the frame's buffer (a height of 4n+2,
    which VideoFrame.from_numpy_buffer does not take: into a buffer made once, then copied);
* another size: OpenCV's resize per plane into the frame (INTER_AREA down, INTER_LINEAR up);
  rgb24 / bgr24 are resized into a buffer made once, then converted.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import av
import cv2
import numpy as np

__all__ = ["INPUT_FORMATS", "POOL_SIZE", "FramePool", "Filler", "describe_fill", "even_size", "output_size"]

INPUT_FORMATS = ("yuv420p", "nv12", "gray", "rgb24", "bgr24")
POOL_SIZE = 3
NEUTRAL = 128  # chroma of a grey picture

Planes = Sequence[np.ndarray]


def even_size(width: int, height: int) -> tuple[int, int]:
    return width & ~1, height & ~1


def output_size(in_w: int, in_h: int, want_w: int, want_h: int) -> tuple[int, int]:
    """The encoded size: the configured one; a 0 side follows the input's aspect ratio; both 0 are the
    input's own (one less when odd: 4:2:0 chroma needs even sizes)."""
    if want_w and want_h:
        return want_w, want_h
    if want_w:
        return want_w, max(2, round(want_w * in_h / in_w / 2) * 2)
    if want_h:
        return max(2, round(want_h * in_w / in_h / 2) * 2), want_h
    return even_size(in_w, in_h)


class _Frame:
    """One pooled frame: the PyAV frame, numpy views of its planes (sharing its memory), and `buf`, the
    whole picture as one contiguous I420 / NV12 array, when the frame wraps one (heights that are a
    multiple of 4: what VideoFrame.from_numpy_buffer takes; else None, and the frame's own planes are
    padded FFmpeg buffers)."""

    __slots__ = ("av", "buf", "planes")

    def __init__(self, fmt: str, width: int, height: int, time_base: Fraction) -> None:
        cw, ch = width // 2, height // 2
        if height % 4 == 0:
            self.buf: np.ndarray | None = np.empty((height * 3 // 2, width), np.uint8)
            self.av = av.VideoFrame.from_numpy_buffer(self.buf, fmt)
            flat = self.buf.reshape(-1)
            ysize = width * height
            y = flat[:ysize].reshape(height, width)
            if fmt == "yuv420p":
                u = flat[ysize: ysize + cw * ch].reshape(ch, cw)
                v = flat[ysize + cw * ch: ysize + 2 * cw * ch].reshape(ch, cw)
                self.planes: tuple[np.ndarray, ...] = (y, u, v)
            else:  # nv12
                self.planes = (y, flat[ysize: ysize + 2 * cw * ch].reshape(ch, cw, 2))
        else:
            self.buf = None
            self.av = av.VideoFrame(width, height, fmt)
            rows = [np.frombuffer(p, np.uint8).reshape(-1, p.line_size) for p in self.av.planes]
            if fmt == "yuv420p":
                self.planes = (rows[0][:height, :width], rows[1][:ch, :cw], rows[2][:ch, :cw])
            else:
                self.planes = (rows[0][:height, :width], rows[1][:ch, : 2 * cw].reshape(ch, cw, 2))
        if (self.av.width, self.av.height) != (width, height):
            raise ValueError(f"a {width}x{height} {fmt} frame came out {self.av.width}x{self.av.height}")
        self.av.time_base = time_base


class FramePool:
    """POOL_SIZE frames of one geometry, handed out in turn."""

    def __init__(self, fmt: str, width: int, height: int, time_base: Fraction) -> None:
        if fmt not in ("yuv420p", "nv12"):
            raise ValueError(f"the encoder's input is yuv420p or nv12, not {fmt!r}")
        if width % 2 or height % 2:
            raise ValueError(f"4:2:0 pictures have even sizes, not {width}x{height}")
        self.format, self.width, self.height = fmt, width, height
        self.frames = [_Frame(fmt, width, height, time_base) for _ in range(POOL_SIZE)]
        self._i = 0

    def next(self) -> _Frame:
        self._i = (self._i + 1) % len(self.frames)
        return self.frames[self._i]

    def grey_chroma(self) -> None:
        """Mid-grey chroma in every frame (a gray input writes only luma)."""
        for f in self.frames:
            for p in f.planes[1:]:
                p.fill(NEUTRAL)


class Filler:
    """Fills pool frames from pictures of one input geometry (`fmt`, `width` x `height`)."""

    def __init__(self, fmt: str, width: int, height: int, pool: FramePool) -> None:
        if fmt not in INPUT_FORMATS:
            raise ValueError(f"cannot encode {fmt!r} pictures (known: {', '.join(INPUT_FORMATS)})")
        self.format, self.width, self.height = fmt, width, height
        W, H = pool.width, pool.height
        self.scaled = (W, H) != even_size(width, height)
        self.interpolation = cv2.INTER_AREA if W * H < width * height else cv2.INTER_LINEAR
        self._scratch: np.ndarray | None = None
        self._i420: np.ndarray | None = None
        if fmt == "gray":
            pool.grey_chroma()
        self.fill: Callable[[Planes, _Frame], None] = self._plan(fmt, pool.format)

    def __call__(self, src: Planes, frame: _Frame) -> None:
        self.fill(src, frame)

    # ------------------------------------------------------------ plans
    def _plan(self, fmt: str, out: str) -> Callable[[Planes, _Frame], None]:
        if fmt in ("rgb24", "bgr24"):
            code = cv2.COLOR_RGB2YUV_I420 if fmt == "rgb24" else cv2.COLOR_BGR2YUV_I420
            if out != "yuv420p":
                raise ValueError("rgb24 / bgr24 pictures are converted to yuv420p")
            return self._packed_scaled(code) if self.scaled else self._packed(code)
        if self.scaled:
            return self._planar_scaled(fmt, out)
        if fmt == "gray":
            return self._gray
        if fmt == out:
            return self._same
        if fmt == "nv12":  # -> yuv420p
            return self._nv12_to_i420
        return self._i420_to_nv12

    def _same(self, src: Planes, frame: _Frame) -> None:
        for i, dst in enumerate(frame.planes):
            np.copyto(dst, src[i][: dst.shape[0], : dst.shape[1]])

    def _gray(self, src: Planes, frame: _Frame) -> None:
        y = frame.planes[0]
        np.copyto(y, src[0][: y.shape[0], : y.shape[1]])

    def _nv12_to_i420(self, src: Planes, frame: _Frame) -> None:
        y, u, v = frame.planes
        np.copyto(y, src[0][: y.shape[0], : y.shape[1]])
        uv = src[1][: u.shape[0], : u.shape[1]]
        np.copyto(u, uv[..., 0])
        np.copyto(v, uv[..., 1])

    def _i420_to_nv12(self, src: Planes, frame: _Frame) -> None:
        y, uv = frame.planes
        np.copyto(y, src[0][: y.shape[0], : y.shape[1]])
        np.copyto(uv[..., 0], src[1][: uv.shape[0], : uv.shape[1]])
        np.copyto(uv[..., 1], src[2][: uv.shape[0], : uv.shape[1]])

    def _packed(self, code: int) -> Callable[[Planes, _Frame], None]:
        def fill(src: Planes, frame: _Frame) -> None:
            h, w = frame.planes[0].shape
            self._to_i420(src[0][:h, :w], code, frame)
        return fill

    def _packed_scaled(self, code: int) -> Callable[[Planes, _Frame], None]:
        def fill(src: Planes, frame: _Frame) -> None:
            h, w = frame.planes[0].shape
            if self._scratch is None:
                self._scratch = np.empty((h, w, 3), np.uint8)
            cv2.resize(src[0], (w, h), dst=self._scratch, interpolation=self.interpolation)
            self._to_i420(self._scratch, code, frame)
        return fill

    def _to_i420(self, rgb: np.ndarray, code: int, frame: _Frame) -> None:
        if frame.buf is not None:  # straight into the frame
            cv2.cvtColor(rgb, code, dst=frame.buf)
            return
        h, w = frame.planes[0].shape  # a height of 4n+2: through a contiguous I420 picture (a second pass)
        if self._i420 is None:
            self._i420 = np.empty((h * 3 // 2, w), np.uint8)
        cv2.cvtColor(rgb, code, dst=self._i420)
        flat, ysize, csize = self._i420.reshape(-1), w * h, (w // 2) * (h // 2)
        np.copyto(frame.planes[0], flat[:ysize].reshape(h, w))
        np.copyto(frame.planes[1], flat[ysize: ysize + csize].reshape(h // 2, w // 2))
        np.copyto(frame.planes[2], flat[ysize + csize: ysize + 2 * csize].reshape(h // 2, w // 2))

    def _planar_scaled(self, fmt: str, out: str) -> Callable[[Planes, _Frame], None]:
        interp = self.interpolation

        def resize(src: np.ndarray, dst: np.ndarray) -> None:
            cv2.resize(src, (dst.shape[1], dst.shape[0]), dst=dst, interpolation=interp)

        if fmt == "gray" or fmt == out:
            def same(src: Planes, frame: _Frame) -> None:
                for s, d in zip(src, frame.planes):  # gray: Y only, the chroma stays grey
                    resize(s, d)
            return same

        def other(src: Planes, frame: _Frame) -> None:
            # the chroma at the output size, in the input's layout, then into the frame's
            resize(src[0], frame.planes[0])
            ch, cw = frame.planes[1].shape[:2]
            if fmt == "nv12":  # -> yuv420p
                if self._scratch is None:
                    self._scratch = np.empty((ch, cw, 2), np.uint8)
                resize(src[1], self._scratch)
                np.copyto(frame.planes[1], self._scratch[..., 0])
                np.copyto(frame.planes[2], self._scratch[..., 1])
            else:  # yuv420p -> nv12
                if self._scratch is None:
                    self._scratch = np.empty((2, ch, cw), np.uint8)
                resize(src[1], self._scratch[0])
                resize(src[2], self._scratch[1])
                np.copyto(frame.planes[1][..., 0], self._scratch[0])
                np.copyto(frame.planes[1][..., 1], self._scratch[1])
        return other


def describe_fill(filler: Filler, pool: FramePool) -> str:
    """One line for the log: what a picture costs on its way in."""
    what = "scaled" if filler.scaled else "copied"
    if filler.format in ("rgb24", "bgr24"):
        what = ("scaled and " if filler.scaled else "") + "converted"
    return (f"{filler.format} {filler.width}x{filler.height} {what} into {pool.format} "
            f"{pool.width}x{pool.height}")
