"""An element described in words -> a point on the screen, by asking the vision provider.

    shot = Screenshot.grab(display, rect=(left, top, w, h), max_width=1024)   # a JPEG of that part of the screen
    box = ask(provider, shot.jpeg, "the blue Save button")                      # Found(box=(x1, y1, x2, y2), label)
    x, y = shot.to_screen(box.centre())                                         # root coordinates

The provider gets the picture and a JSON Schema, SCHEMA: `found` (boolean), `box` ([x1, y1,
x2, y2] in pixels of the picture sent) and `label` (what it saw there). The picture is the
screen's rectangle scaled to at most `max_width` pixels wide, so a box is mapped back by the
picture's scale and the rectangle's offset on the X screen: the monitor's left/top (RoomKit
forgets it, and clicks the wrong place on every monitor but the first) plus the region's.

A box given in fractions of the picture (every value within 0..1, one of them not whole, as
some models answer) is taken as such. `found: false`, no box, or a box outside the picture
is `NotFound`: nothing is clicked.

The second look (verify): the area around the box, at least 3x its size and 96 pixels, is
grabbed again at full resolution and asked the same question; if the provider does not find
the element there, nothing is clicked, and if it does, its box in the close-up (finer) is
the one clicked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["SCHEMA", "Found", "NotFound", "Screenshot", "ask", "prompt_for"]

SCHEMA: dict[str, Any] = {
    "title": "screen_element", "type": "object", "additionalProperties": False,
    "required": ["found", "box", "label"],
    "properties": {
        "found": {"type": "boolean", "description": "whether the element is visible in the picture"},
        "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                "description": "the element's bounding box [x1, y1, x2, y2] in pixels of the picture"},
        "label": {"type": "string", "description": "the element's visible text or a short name for it"},
    },
}


class NotFound(LookupError):
    """The provider did not find the element (or answered no usable box)."""


class Provider(Protocol):
    def describe(self, jpeg: bytes, prompt: str, *, schema: dict | None = None) -> Any: ...


@dataclass(frozen=True)
class Found:
    box: tuple[float, float, float, float]   # in pixels of the picture that was asked about
    label: str

    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


def prompt_for(element: str, width: int, height: int) -> str:
    return (f"This is a screenshot, {width}x{height} pixels. Find the user-interface element described "
            f"below. Answer with found=false if it is not visible. box is its bounding box [x1, y1, x2, y2] in "
            f"pixels of this picture; label is its visible text, or a short name.\nElement: {element}")


def _box(value: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    if all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)) and not all(v.is_integer() for v in (x1, y1, x2, y2)):
        x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height   # fractions of the picture
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return None
    return max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)


def ask(provider: Provider, shot: Screenshot, element: str) -> Found:
    """Where `element` is on `shot`, per the provider; raises NotFound."""
    result = provider.describe(shot.jpeg, prompt_for(element, shot.width, shot.height), schema=SCHEMA)
    data = getattr(result, "data", None) or {}
    label = str(data.get("label") or "")
    if data.get("found") is not True:
        raise NotFound(f"the vision provider did not find {element!r} on the screen"
                       + (f" (it saw: {label!r})" if label else ""))
    box = _box(data.get("box"), shot.width, shot.height)
    if box is None:
        raise NotFound(f"the vision provider answered found for {element!r} but no box inside the "
                       f"{shot.width}x{shot.height} picture (box: {data.get('box')!r})")
    return Found(box, label)


@dataclass(frozen=True)
class Screenshot:
    """A JPEG of a rectangle of the X screen, and how its pixels map back to the screen."""
    jpeg: bytes
    rect: tuple[int, int, int, int]     # left, top, width, height on the X screen (root coordinates)
    width: int                          # the picture's size
    height: int

    @property
    def scale(self) -> float:
        return self.width / self.rect[2]

    def to_screen(self, point: tuple[float, float]) -> tuple[int, int]:
        left, top, w, h = self.rect
        x = min(w - 1, max(0, int(point[0] / self.scale)))
        y = min(h - 1, max(0, int(point[1] * self.rect[3] / self.height)))
        return left + x, top + y

    def around(self, found: Found) -> tuple[int, int, int, int]:
        """The rectangle of the second look: the box's surroundings, on the screen, inside this shot's rect."""
        x1, y1, x2, y2 = found.box
        (sx1, sy1), (sx2, sy2) = self.to_screen((x1, y1)), self.to_screen((x2, y2))
        w, h = max(96, 3 * (sx2 - sx1)), max(96, 3 * (sy2 - sy1))
        left, top, rw, rh = self.rect
        w, h = min(w, rw), min(h, rh)
        cx, cy = (sx1 + sx2) // 2, (sy1 + sy2) // 2
        x = min(max(left, cx - w // 2), left + rw - w)
        y = min(max(top, cy - h // 2), top + rh - h)
        return x, y, w, h

    @classmethod
    def grab(cls, display: str | None, rect: tuple[int, int, int, int], max_width: int,
             quality: int = 85) -> Screenshot:
        import cv2
        import mss
        left, top, w, h = rect
        with mss.MSS(display=display or None) as sct:
            raw = sct.grab({"left": left, "top": top, "width": w, "height": h})
            bgra = np.frombuffer(raw.raw, np.uint8).reshape(h, w, 4)
        bgr = cv2.cvtColor(bgra, cv2.COLOR_BGRA2BGR)
        if w > max_width:
            size = (max_width, max(2, round(h * max_width / w)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode the screenshot")
        return cls(buf.tobytes(), (left, top, w, h), bgr.shape[1], bgr.shape[0])
