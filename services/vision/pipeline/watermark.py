"""Text drawn on every picture: '{stream} {timestamp}', in the colours configured.

    wm = Watermark("edgeroom | {stream} | {timestamp}", position="bottom-right",
                   colour="#FF0000", background="#000000", scale=0.8, margin=12)
    wm(bgr, frame=seq, stream="door", capture_ns=item.capture_ns)   # draws in place

Placeholders: {timestamp} (wall-clock time the frame was captured, formatted with
`timestamp_format`, strftime codes plus %f; local time, or UTC with utc=True), {frame}
(the frame number the caller passes), {stream} (the stream name). Python format specs
work ({frame:06d}); an unknown placeholder or a bad spec is refused when the watermark is
made, not on the first frame. The capture time on the bus is CLOCK_MONOTONIC, so it is
moved to the wall clock by the current wall-minus-monotonic offset.

Colours are '#RRGGBB' and are turned into BGR once (picture.parse_colour), so red is red
in the output: RoomKit passed RGB tuples to OpenCV, which draws BGR. The text is drawn
anti-aliased; with a background box the whole patch (box + text) is composed once per
distinct string and pasted with one copy per frame; without one, the text is blended
onto the picture through its coverage (cv2.blendLinear), so the glyph cores get exactly
the configured colour either way.

Layout happens once per distinct string: rendered patches are kept in a small LRU cache
(64 strings), and `renders` counts layouts, so with a text that does not change (or a
timestamp that changes once a second) nothing is laid out again frame after frame.
Position is top-left, top-right, bottom-left, bottom-right, center, or "x,y" (the box's
top-left corner in pixels); a box that does not fit is clipped at the picture's edge.
"""
from __future__ import annotations

import collections
import string
import time
from datetime import UTC, datetime

import cv2
import numpy as np

from .picture import PictureError, parse_colour

__all__ = ["POSITIONS", "PLACEHOLDERS", "Watermark"]

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
PLACEHOLDERS = ("timestamp", "frame", "stream")
_FONT = cv2.FONT_HERSHEY_SIMPLEX


class _Patch:
    """One laid-out string: a composed BGR patch (with background) or colour + coverage."""

    __slots__ = ("bgr", "w_text", "w_under")

    def __init__(self, bgr: np.ndarray, w_text: np.ndarray | None, w_under: np.ndarray | None) -> None:
        self.bgr, self.w_text, self.w_under = bgr, w_text, w_under


def _parse_position(position) -> str | tuple[int, int]:
    if isinstance(position, (tuple, list)) and len(position) == 2:
        x, y = position
    elif isinstance(position, str) and position.strip().lower() in POSITIONS:
        return position.strip().lower()
    elif isinstance(position, str) and "," in position:
        try:
            x, y = (int(v) for v in position.split(","))
        except ValueError:
            x = y = -1
    else:
        x = y = -1
    if not (isinstance(x, int) and isinstance(y, int)) or x < 0 or y < 0:
        raise PictureError(f"watermark position {position!r}: use one of {', '.join(POSITIONS)} "
                           f"or 'x,y' in pixels (>= 0)", "bad_config")
    return x, y


def _check_text(text: str) -> None:
    if not isinstance(text, str) or not text:
        raise PictureError("watermark text must be a non-empty string", "bad_config")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise PictureError(f"watermark text {text!r}: {e} (write a literal brace as {{{{ or }}}})",
                           "bad_config") from None
    for f in fields:
        if f not in PLACEHOLDERS:
            raise PictureError(f"watermark text {text!r}: unknown placeholder {{{f}}}; known: "
                               + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS), "bad_config")
    try:
        text.format(timestamp="2024-01-01 00:00:00", frame=1, stream="cam")
    except (ValueError, TypeError) as e:
        raise PictureError(f"watermark text {text!r}: {e}", "bad_config") from None


class Watermark:
    """Draws a (templated) text on BGR pictures; see the module docstring."""

    def __init__(self, text: str, *, position="bottom-right", colour: str = "#FFFFFF",
                 background: str | None = None, scale: float = 1.0, margin: int = 10,
                 thickness: int = 0, timestamp_format: str = "%Y-%m-%d %H:%M:%S",
                 utc: bool = False, cache_size: int = 64) -> None:
        _check_text(text)
        if not 0.1 <= float(scale) <= 20:
            raise PictureError(f"watermark scale must be in 0.1..20, got {scale!r}", "bad_config")
        if margin < 0:
            raise PictureError(f"watermark margin must be >= 0, got {margin!r}", "bad_config")
        self.text = text
        self.position = _parse_position(position)
        self.colour = parse_colour(colour, key="watermark colour")
        self.background = None if background in (None, "") else parse_colour(background, key="watermark background")
        self.scale = float(scale)
        self.margin = int(margin)
        self.thickness = int(thickness) or max(1, round(2 * self.scale))
        self.pad = max(2, round(6 * self.scale)) if self.background is not None else 0
        self.timestamp_format = timestamp_format
        self.tz = UTC if utc else None
        self._uses_ts = "timestamp" in {f for _, f, _, _ in string.Formatter().parse(text)}
        self._static = not any(f for _, f, _, _ in string.Formatter().parse(text))
        self._cache: collections.OrderedDict[str, _Patch] = collections.OrderedDict()
        self._cache_size = cache_size
        self.renders = 0  # strings laid out (cache misses)
        self.last_text = ""

    def text_for(self, *, frame: int = 0, stream: str = "", capture_ns: int | None = None) -> str:
        """The text for one frame, placeholders expanded."""
        if self._static:
            return self.text
        ts = ""
        if self._uses_ts:
            if capture_ns:
                wall_ns = capture_ns + (time.time_ns() - time.monotonic_ns())
            else:
                wall_ns = time.time_ns()
            ts = datetime.fromtimestamp(wall_ns / 1e9, tz=self.tz).strftime(self.timestamp_format)
        return self.text.format(timestamp=ts, frame=frame, stream=stream)

    def __call__(self, bgr: np.ndarray, *, frame: int = 0, stream: str = "", capture_ns: int | None = None
                 ) -> np.ndarray:
        """Draw onto `bgr` (a writable (h, w, 3) BGR picture) in place; returns it."""
        text = self.text_for(frame=frame, stream=stream, capture_ns=capture_ns)
        self.last_text = text
        patch = self._patch(text)
        h, w = bgr.shape[:2]
        ph, pw = patch.bgr.shape[:2]
        x, y = self._origin(w, h, pw, ph)
        # Clip the patch to the picture.
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
        if x0 >= x1 or y0 >= y1:
            return bgr
        roi = bgr[y0:y1, x0:x1]
        sy, sx = slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)
        if patch.w_text is None:
            np.copyto(roi, patch.bgr[sy, sx])
        else:
            cv2.blendLinear(roi, patch.bgr[sy, sx], patch.w_under[sy, sx], patch.w_text[sy, sx], dst=roi)
        return bgr

    def _origin(self, w: int, h: int, pw: int, ph: int) -> tuple[int, int]:
        pos, m = self.position, self.margin
        if isinstance(pos, tuple):
            return pos
        x = m if pos.endswith("left") else w - pw - m if pos.endswith("right") else (w - pw) // 2
        y = m if pos.startswith("top") else h - ph - m if pos.startswith("bottom") else (h - ph) // 2
        return x, y

    def _patch(self, text: str) -> _Patch:
        got = self._cache.get(text)
        if got is not None:
            self._cache.move_to_end(text)
            return got
        got = self._render(text)
        self._cache[text] = got
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return got

    def _render(self, text: str) -> _Patch:
        self.renders += 1
        (tw, th), base = cv2.getTextSize(text, _FONT, self.scale, self.thickness)
        pad = self.pad
        ph, pw = th + base + 2 * pad, tw + 2 * pad
        cover = np.zeros((ph, pw), np.uint8)
        cv2.putText(cover, text, (pad, pad + th), _FONT, self.scale, 255, self.thickness, cv2.LINE_AA)
        a = cover.astype(np.float32) / 255.0
        fg = np.empty((ph, pw, 3), np.uint8)
        fg[:] = self.colour
        if self.background is None:
            return _Patch(fg, a, 1.0 - a)
        bg = np.empty_like(fg)
        bg[:] = self.background
        composed = cv2.blendLinear(bg, fg, 1.0 - a, a)
        return _Patch(composed, None, None)
