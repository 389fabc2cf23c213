"""Bus pictures <-> the BGR working picture, into buffers that live as long as the stream.

    to_bgr = ToBGR()
    bgr = to_bgr(item.planes(), item.format, item.width, item.height)   # (h, w, 3) BGR
    ...
    from_bgr = FromBGR()
    from_bgr(bgr, "yuv420p", loan.planes)                               # into the output slot

Why BGR: it is what OpenCV's drawing, filtering and colour functions assume, so the
stages (transforms, censor, watermark) can call OpenCV without ever reordering channels.
RoomKit hands RGB frames to OpenCV calls written for BGR, so its sepia comes out blue and
its watermark colours swapped; here every colour the user gives ("#RRGGBB") is turned into
BGR once, at configuration time (`parse_colour`).

Conversions (BT.601 limited range, what OpenCV's I420/NV12 conversions and FFmpeg's
default for unlabelled yuv420p both use, so a picture round-trips through FFmpeg with
its colours):
  * yuv420p / nv12, tight, even size (the common case: what the decoder puts on the bus):
    one cv2.cvtColor straight from the slot into the BGR buffer, no copy.
  * yuv420p / nv12 with row padding or odd width/height: OpenCV's converters only take
    a tight, even buffer, so the planes are copied once into a reusable tight buffer
    (odd sizes padded by repeating the last row/column), converted, and a view of the
    real w x h is returned. This copy is the one that cannot be avoided.
  * rgb24 / gray: one cvtColor into the buffer. bgr24: returned as it is (a read-only view
    into the slot; the pipeline copies only if a stage writes pixels).
Back from BGR (FromBGR), straight into the destination planes (an output slot's): bgr24
copy, rgb24 / gray cvtColor with dst=, yuv420p with cvtColor into the slot when its planes
are tight and contiguous, otherwise through a reusable tight buffer and one copy per
plane; nv12 as I420 then U and V interleaved into the UV plane (OpenCV has no BGR->NV12).

Buffers are allocated on the first picture of a size and format and reused after that:
the same array objects come back frame after frame (tests check the identity).
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["FORMATS", "FromBGR", "PictureError", "ToBGR", "parse_colour", "tight_yuv420"]

FORMATS = ("yuv420p", "nv12", "gray", "rgb24", "bgr24")


class PictureError(ValueError):
    """A picture the pipeline cannot take; `reason` is a short label for a metric."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_colour(text: str, *, key: str = "colour") -> tuple[int, int, int]:
    """'#RRGGBB' -> (B, G, R), the order OpenCV draws with."""
    s = text.strip() if isinstance(text, str) else ""
    if len(s) != 7 or s[0] != "#":
        raise PictureError(f"{key}: {text!r} is not a colour; write it as #RRGGBB, e.g. #FF0000 for red",
                           "bad_colour")
    try:
        r, g, b = (int(s[i:i + 2], 16) for i in (1, 3, 5))
    except ValueError:
        raise PictureError(f"{key}: {text!r} is not a colour; write it as #RRGGBB, e.g. #FF0000 for red",
                           "bad_colour") from None
    return b, g, r


def _check(fmt: str, width: int, height: int) -> None:
    if fmt not in FORMATS:
        raise PictureError(f"unsupported pixel format {fmt!r}; known: {', '.join(FORMATS)}", "bad_format")
    if width <= 0 or height <= 0:
        raise PictureError(f"picture size must be positive, got {width}x{height}", "bad_size")


def _as_planes(src, fmt: str, width: int, height: int) -> tuple[np.ndarray, ...]:
    """Accept item.planes() (a tuple) or item.array (one array) and return planes."""
    if isinstance(src, np.ndarray):
        if fmt in ("yuv420p", "nv12"):
            if src.shape == (height * 3 // 2, width) and width % 2 == 0 and height % 2 == 0:
                return _split_tight(src, fmt, width, height)
            raise PictureError(f"a {fmt} {width}x{height} picture given as one array must be the tight "
                               f"({height * 3 // 2}, {width}) buffer, got {src.shape}; pass item.planes()",
                               "bad_layout")
        return (src,)
    return tuple(src)


def _split_tight(buf: np.ndarray, fmt: str, w: int, h: int) -> tuple[np.ndarray, ...]:
    flat = buf.reshape(-1)
    y = buf[:h]
    cw, ch = (w + 1) // 2, (h + 1) // 2
    if fmt == "yuv420p":
        u = flat[w * h: w * h + cw * ch].reshape(ch, cw)
        v = flat[w * h + cw * ch: w * h + 2 * cw * ch].reshape(ch, cw)
        return (y, u, v)
    return (y, flat[w * h: w * h + 2 * cw * ch].reshape(ch, cw, 2))


def _check_planes(planes: tuple, fmt: str, w: int, h: int) -> None:
    cw, ch = (w + 1) // 2, (h + 1) // 2
    if fmt == "yuv420p":
        want = [(h, w), (ch, cw), (ch, cw)]
    elif fmt == "nv12":
        want = [(h, w), (ch, cw, 2)]
    elif fmt == "gray":
        want = [(h, w)]
    else:
        want = [(h, w, 3)]
    got = [tuple(p.shape) for p in planes]
    if got != want:
        raise PictureError(f"{fmt} {w}x{h} planes should have shapes {want}, got {got}", "bad_layout")


def tight_yuv420(planes: tuple[np.ndarray, ...], w: int, h: int) -> np.ndarray | None:
    """The (h*3/2, w) array OpenCV converts, as a view, when the planes already lie that way.

    True for what the decoder writes (tight strides, even size, planes back to back);
    None otherwise. Only the addresses and strides are compared, no pixel is read.
    """
    if w % 2 or h % 2:
        return None
    y = planes[0]
    if y.strides != (w, 1):
        return None
    addr = y.__array_interface__["data"][0]
    at = addr + w * h
    for p in planes[1:]:
        if p.__array_interface__["data"][0] != at or not p.flags.c_contiguous:
            return None
        at += p.nbytes
    # The planes are one contiguous run of h*3/2 rows of w bytes: view them as one array.
    return np.lib.stride_tricks.as_strided(y, shape=(h * 3 // 2, w), strides=(w, 1), writeable=y.flags.writeable)


class ToBGR:
    """Converts bus pictures to a BGR working picture, reusing its buffers per size/format."""

    _CODES = {"yuv420p": cv2.COLOR_YUV2BGR_I420, "nv12": cv2.COLOR_YUV2BGR_NV12}

    def __init__(self) -> None:
        self._bufs: dict[tuple, np.ndarray] = {}
        self.copies = 0  # pictures that went through the tight staging copy (padding / odd size)

    def _buf(self, key: tuple, shape: tuple) -> np.ndarray:
        b = self._bufs.get(key)
        if b is None or b.shape != shape:
            if len(self._bufs) > 8:  # a stream that keeps changing size: don't hoard
                self._bufs.clear()
            b = self._bufs[key] = np.empty(shape, np.uint8)
        return b

    def __call__(self, src, fmt: str, width: int, height: int) -> np.ndarray:
        """item.planes() (or item.array) of a `fmt` picture -> (height, width, 3) BGR."""
        _check(fmt, width, height)
        planes = _as_planes(src, fmt, width, height)
        _check_planes(planes, fmt, width, height)
        if fmt == "bgr24":
            return planes[0]
        if fmt in ("rgb24", "gray"):
            out = self._buf(("bgr", width, height), (height, width, 3))
            code = cv2.COLOR_RGB2BGR if fmt == "rgb24" else cv2.COLOR_GRAY2BGR
            return cv2.cvtColor(planes[0], code, dst=out)
        tight = tight_yuv420(planes, width, height)
        ew, eh = width + (width & 1), height + (height & 1)
        out = self._buf(("bgr", ew, eh), (eh, ew, 3))
        if tight is None:
            tight = self._stage(planes, fmt, width, height)
            self.copies += 1
        cv2.cvtColor(tight, self._CODES[fmt], dst=out)
        if (ew, eh) == (width, height):
            return out
        view = self._bufs.get(("view", width, height))
        if view is None or view.base is not out:
            view = self._bufs[("view", width, height)] = out[:height, :width]
        return view

    def _stage(self, planes: tuple, fmt: str, w: int, h: int) -> np.ndarray:
        """Copy planes into a tight, even (eh*3/2, ew) buffer; odd edges repeated."""
        ew, eh = w + (w & 1), h + (h & 1)
        t = self._buf(("tight", fmt, ew, eh), (eh * 3 // 2, ew))
        y = t[:eh]
        y[:h, :w] = planes[0]
        if ew != w:
            y[:h, w] = planes[0][:, w - 1]
        if eh != h:
            y[h] = y[h - 1]
        cw, ch = ew // 2, eh // 2
        flat = t.reshape(-1)
        if fmt == "yuv420p":
            flat[ew * eh: ew * eh + cw * ch].reshape(ch, cw)[...] = planes[1]
            flat[ew * eh + cw * ch: ew * eh + 2 * cw * ch].reshape(ch, cw)[...] = planes[2]
        else:
            flat[ew * eh: ew * eh + 2 * cw * ch].reshape(ch, cw, 2)[...] = planes[1]
        return t


class FromBGR:
    """Writes a BGR picture into destination planes of any bus format (an output slot's)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, np.ndarray] = {}
        self.copies = 0  # pictures that went through the staging buffer

    def _buf(self, key: tuple, shape: tuple) -> np.ndarray:
        b = self._bufs.get(key)
        if b is None or b.shape != shape:
            if len(self._bufs) > 8:
                self._bufs.clear()
            b = self._bufs[key] = np.empty(shape, np.uint8)
        return b

    def __call__(self, bgr: np.ndarray, fmt: str, dst) -> None:
        """Write `bgr` ((h, w, 3)) as `fmt` into `dst`: a planes tuple (loan.planes) or,
        for yuv420p/nv12 of even size, the tight (h*3/2, w) array (loan.array)."""
        h, w = bgr.shape[:2]
        _check(fmt, w, h)
        planes = _as_planes(dst, fmt, w, h)
        _check_planes(planes, fmt, w, h)
        if fmt == "bgr24":
            np.copyto(planes[0], bgr)
        elif fmt == "rgb24":
            cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=planes[0])
        elif fmt == "gray":
            cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY, dst=planes[0])
        elif fmt == "yuv420p":
            tight = tight_yuv420(planes, w, h)
            if tight is not None and tight.flags.writeable:
                cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420, dst=tight)
            else:
                self._via_stage(bgr, planes, w, h, nv12=False)
        else:
            self._via_stage(bgr, planes, w, h, nv12=True)

    def _via_stage(self, bgr: np.ndarray, planes: tuple, w: int, h: int, *, nv12: bool) -> None:
        ew, eh = w + (w & 1), h + (h & 1)
        if (ew, eh) != (w, h):
            padded = self._buf(("pad", ew, eh), (eh, ew, 3))
            cv2.copyMakeBorder(bgr, 0, eh - h, 0, ew - w, cv2.BORDER_REPLICATE, dst=padded)
            bgr = padded
        t = self._buf(("tight", ew, eh), (eh * 3 // 2, ew))
        cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420, dst=t)
        y, u, v = _split_tight(t, "yuv420p", ew, eh)
        np.copyto(planes[0], y[:h, :w])
        self.copies += 1
        if nv12:
            uv = planes[1]
            np.copyto(uv[..., 0], u)
            np.copyto(uv[..., 1], v)
        else:
            np.copyto(planes[1], u)
            np.copyto(planes[2], v)
