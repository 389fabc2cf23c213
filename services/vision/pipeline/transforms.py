"""Picture effects on the BGR working picture: grayscale, sepia, invert, blur, cartoon,
edges, sketch, pixelate.

    t = make_transform("pixelate:24")          # "name" or "name:strength"
    t(src, dst)                                 # writes dst; src may be dst (in place)
    make_transform("vintage")                   # TransformError: unknown transform 'vintage'; known: ...

Each transform is a small class with one optional integer strength and one method,
`__call__(src, dst) -> dst`. Every one is a few whole-picture OpenCV calls (no Python loop
over pixels), may run in place (src is dst), and keeps its scratch buffers (a gray
plane, a small mosaic) between frames, so a running stream allocates nothing.

Colour: the working picture is BGR, so the sepia matrix is written in BGR order and
grayscale uses COLOR_BGR2GRAY (0.114 B + 0.587 G + 0.299 R). RoomKit applied RGB recipes
to BGR data (and the other way round), which turns sepia blue and gives pure blue the
luma of pure red; the tests pin both.

Strength (the N of "name:N"): blur kernel size in pixels (odd, default 15), pixelate block
size (default 16), edges Canny low threshold (default 100, high = 2x), sketch blur size
(default 21), cartoon colour levels per channel (default 8). Others take none.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

__all__ = ["TRANSFORMS", "Transform", "TransformError", "make_transform", "make_transforms"]


class TransformError(ValueError):
    """A transform that cannot be made; `reason` is a short label for a metric."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Transform:
    """Base: a named effect with scratch buffers kept by shape."""

    name = ""
    default: int | None = None  # the default strength; None: takes no strength
    minimum = 1

    def __init__(self, strength: int | None = None) -> None:
        if strength is not None and self.default is None:
            raise TransformError(f"transform {self.name!r} takes no strength, got {strength}", "bad_transform")
        self.strength = self.default if strength is None else strength
        if self.strength is not None and self.strength < self.minimum:
            raise TransformError(f"transform {self.name!r} strength must be >= {self.minimum}, got {strength}",
                                 "bad_transform")
        self._scratch: dict[tuple, np.ndarray] = {}

    def scratch(self, key: str, shape: tuple) -> np.ndarray:
        b = self._scratch.get((key, shape))
        if b is None:
            if len(self._scratch) > 8:
                self._scratch.clear()
            b = self._scratch[(key, shape)] = np.empty(shape, np.uint8)
        return b

    def gray(self, src: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(src, cv2.COLOR_BGR2GRAY, dst=self.scratch("gray", src.shape[:2]))

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name if self.strength is None else f"{self.name}:{self.strength}"


class Grayscale(Transform):
    name = "grayscale"

    def __call__(self, src, dst):
        return cv2.cvtColor(self.gray(src), cv2.COLOR_GRAY2BGR, dst=dst)


class Sepia(Transform):
    name = "sepia"
    # The classic sepia matrix (rows R', G', B' over R, G, B), rewritten for BGR in and out.
    _RGB = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
    MATRIX = _RGB[::-1, ::-1].copy()  # rows B', G', R' over B, G, R

    def __call__(self, src, dst):
        return cv2.transform(src, self.MATRIX, dst=dst)  # saturates to 0..255


class Invert(Transform):
    name = "invert"

    def __call__(self, src, dst):
        return cv2.bitwise_not(src, dst=dst)


class Blur(Transform):
    name = "blur"
    default = 15

    def __call__(self, src, dst):
        k = self.strength | 1
        return cv2.GaussianBlur(src, (k, k), 0, dst=dst)


class Pixelate(Transform):
    name = "pixelate"
    default = 16

    def __call__(self, src, dst):
        h, w = src.shape[:2]
        sw, sh = max(1, w // self.strength), max(1, h // self.strength)
        small = cv2.resize(src, (sw, sh), dst=self.scratch("small", (sh, sw, 3)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), dst=dst, interpolation=cv2.INTER_NEAREST)


class Edges(Transform):
    name = "edges"
    default = 100

    def __call__(self, src, dst):
        g = self.gray(src)
        e = cv2.Canny(g, self.strength, 2 * self.strength, edges=self.scratch("edges", g.shape))
        return cv2.cvtColor(e, cv2.COLOR_GRAY2BGR, dst=dst)


class Sketch(Transform):
    """Pencil sketch: the gray picture divided by its blurred negative (colour dodge)."""

    name = "sketch"
    default = 21

    def __call__(self, src, dst):
        g = self.gray(src)
        inv = cv2.bitwise_not(g, dst=self.scratch("inv", g.shape))
        k = self.strength | 1
        cv2.GaussianBlur(inv, (k, k), 0, dst=inv)
        cv2.bitwise_not(inv, dst=inv)
        s = cv2.divide(g, inv, dst=self.scratch("sketch", g.shape), scale=256.0)
        return cv2.cvtColor(s, cv2.COLOR_GRAY2BGR, dst=dst)


class Cartoon(Transform):
    """Flat colours (smoothed at half size, quantised to N levels) under dark outlines.

    The bilateral filter that cartoon effects usually run at full size with d=9 costs
    ~150 ms at 720p; at half size with d=5 it is ~5 ms and looks the same once quantised.
    """

    name = "cartoon"
    default = 8
    minimum = 2

    def __init__(self, strength: int | None = None) -> None:
        super().__init__(strength)
        step = 256 // self.strength
        lut = (np.arange(256) // step) * step + step // 2
        self._lut = np.clip(lut, 0, 255).astype(np.uint8)

    def __call__(self, src, dst):
        h, w = src.shape[:2]
        g = self.gray(src)
        edges = self.scratch("edges", g.shape)
        cv2.medianBlur(g, 5, dst=edges)
        cv2.adaptiveThreshold(edges, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 5, dst=edges)
        hw, hh = max(1, w // 2), max(1, h // 2)
        half = cv2.resize(src, (hw, hh), dst=self.scratch("half", (hh, hw, 3)), interpolation=cv2.INTER_AREA)
        smooth = cv2.bilateralFilter(half, 5, 50, 50, dst=self.scratch("smooth", (hh, hw, 3)))
        cv2.LUT(smooth, self._lut, dst=smooth)
        cv2.resize(smooth, (w, h), dst=dst, interpolation=cv2.INTER_LINEAR)
        # Outlines: where the threshold says "edge" (0), the picture goes black.
        mask = cv2.cvtColor(edges, cv2.COLOR_GRAY2BGR, dst=self.scratch("mask", (h, w, 3)))
        return cv2.bitwise_and(dst, mask, dst=dst)


TRANSFORMS: dict[str, Callable[..., Transform]] = {
    cls.name: cls for cls in (Grayscale, Sepia, Invert, Blur, Cartoon, Edges, Sketch, Pixelate)
}


def make_transform(spec: str) -> Transform:
    """'name' or 'name:N' -> a transform; unknown names and bad strengths raise TransformError."""
    if not isinstance(spec, str) or not spec.strip():
        raise TransformError(f"a transform is a name like 'blur' or 'blur:21', got {spec!r}", "bad_transform")
    name, _, arg = spec.strip().partition(":")
    cls = TRANSFORMS.get(name.strip().lower())
    if cls is None:
        raise TransformError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}", "unknown_transform")
    strength = None
    if arg:
        try:
            strength = int(arg)
        except ValueError:
            raise TransformError(f"transform {spec!r}: the strength after ':' must be an integer",
                                 "bad_transform") from None
    return cls(strength)


def make_transforms(specs) -> list[Transform]:
    """A list of specs (config's `transforms`) -> transforms, in order."""
    return [make_transform(s) for s in specs]
