"""Hide what must not be seen: blocked labels blacked out, blurred or pixelated, in the
whole frame or only inside the detection boxes, with grace frames against flicker.

    c = Censor(["person", "cell phone"], mode="pixelate", scope="boxes", grace_frames=15)
    if c.apply(bgr, detections):            # in place; True when this frame was censored
        ...
    c.censored, c.frames_censored            # this frame; how many so far

A detection is blocked when its label is in `labels` (case-insensitive; "*" blocks every
label) and its confidence is at least `min_confidence`. Boxes are in the pixels of the
picture the detector saw; pass `source_size=(w, h)` when that is not the picture being
censored (e.g. the detector ran before the resizer) and they are scaled.

Grace frames: detectors flicker, and one missed detection would leak a whole frame of
what is being hidden. After the last frame with a blocked detection, the next
`grace_frames` frames are censored too; in "boxes" scope with the last blocked boxes
(the best guess of where the thing still is). The countdown restarts at every frame with
a blocked detection, so a run of detections is followed by exactly `grace_frames` more.

Modes: black (fill), blur (area-downscale by 1/16 of the region's size then linear
upscale: strong, and O(1) per pixel whatever the region's size, unlike a Gaussian kernel
that would need to be ~100 px wide to hide a face at 720p), pixelate (blocks of
`block` pixels). Boxes are padded by `padding` (a fraction of the box's size on each
side) and clipped to the picture; everything outside them is left bit-for-bit alone.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from ..types import Detection
from .picture import PictureError

__all__ = ["MODES", "SCOPES", "Censor"]

MODES = ("black", "blur", "pixelate")
SCOPES = ("frame", "boxes")


class Censor:
    """Censors BGR pictures in place when blocked labels are detected (see module doc)."""

    def __init__(self, labels: Iterable[str], *, mode: str = "black", scope: str = "frame",
                 grace_frames: int = 0, padding: float = 0.1, min_confidence: float = 0.0,
                 block: int = 16) -> None:
        if isinstance(labels, str):
            labels = [labels]
        self.labels = frozenset(str(v).strip().lower() for v in labels if str(v).strip())
        if not self.labels:
            raise PictureError("censor labels must name at least one label (or '*' for any)", "bad_config")
        if mode not in MODES:
            raise PictureError(f"censor mode {mode!r}: use one of {', '.join(MODES)}", "bad_config")
        if scope not in SCOPES:
            raise PictureError(f"censor scope {scope!r}: use one of {', '.join(SCOPES)}", "bad_config")
        if not isinstance(grace_frames, int) or grace_frames < 0:
            raise PictureError(f"censor grace_frames must be an integer >= 0, got {grace_frames!r}", "bad_config")
        if not 0.0 <= padding <= 2.0:
            raise PictureError(f"censor padding must be a fraction in 0..2, got {padding!r}", "bad_config")
        if block < 2:
            raise PictureError(f"censor block must be >= 2 pixels, got {block!r}", "bad_config")
        self.mode, self.scope = mode, scope
        self.grace_frames, self.padding = grace_frames, float(padding)
        self.min_confidence, self.block = float(min_confidence), int(block)
        self._any = "*" in self.labels
        self._grace_left = 0
        self._last_boxes: list[tuple[int, int, int, int]] = []
        self._small: dict[tuple, np.ndarray] = {}
        self.censored = False       # the last frame given to apply() was censored
        self.in_grace = False       # ... only because of grace frames
        self.frames_seen = 0
        self.frames_censored = 0
        self.frames_grace = 0       # censored with no blocked detection of their own

    def blocked(self, detections: Sequence[Detection]) -> list[Detection]:
        """The detections this censor hides."""
        return [d for d in detections
                if d.confidence >= self.min_confidence and (self._any or d.label.lower() in self.labels)]

    def decide(self, detections: Sequence[Detection], size: tuple[int, int],
               source_size: tuple[int, int] | None = None) -> list[tuple[int, int, int, int]] | None:
        """Advance the grace state for one frame; the regions to censor (x0, y0, x1, y1),
        [] for the whole frame, or None when this frame is not censored.
        `size` is the (w, h) of the picture to be censored."""
        self.frames_seen += 1
        hits = self.blocked(detections)
        if hits:
            self._grace_left = self.grace_frames
            self._last_boxes = [self._region(d.box, size, source_size) for d in hits]
            self.in_grace = False
        elif self._grace_left > 0:
            self._grace_left -= 1
            self.in_grace = True
        else:
            self.censored = self.in_grace = False
            return None
        self.censored = True
        self.frames_censored += 1
        self.frames_grace += self.in_grace
        return [] if self.scope == "frame" else self._last_boxes

    def apply(self, bgr: np.ndarray, detections: Sequence[Detection], *,
              source_size: tuple[int, int] | None = None) -> bool:
        """Censor `bgr` ((h, w, 3), writable) in place for this frame; True when censored."""
        h, w = bgr.shape[:2]
        regions = self.decide(detections, (w, h), source_size)
        if regions is None:
            return False
        self.paint(bgr, regions)
        return True

    def paint(self, bgr: np.ndarray, regions: list[tuple[int, int, int, int]]) -> None:
        """Hide `regions` of `bgr` ([] = the whole picture) with the configured mode."""
        if not regions:
            self._hide(bgr)
            return
        for x0, y0, x1, y1 in regions:
            if x1 > x0 and y1 > y0:
                self._hide(bgr[y0:y1, x0:x1])

    def _region(self, box, size, source_size) -> tuple[int, int, int, int]:
        w, h = size
        x1, y1, x2, y2 = (float(v) for v in box)
        if source_size and tuple(source_size) != (w, h):
            sx, sy = w / source_size[0], h / source_size[1]
            x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
        px, py = (x2 - x1) * self.padding, (y2 - y1) * self.padding
        return (max(0, int(x1 - px)), max(0, int(y1 - py)),
                min(w, int(np.ceil(x2 + px))), min(h, int(np.ceil(y2 + py))))

    def _hide(self, roi: np.ndarray) -> None:
        if self.mode == "black":
            roi[...] = 0
            return
        h, w = roi.shape[:2]
        if self.mode == "pixelate":
            sw, sh, up = max(1, w // self.block), max(1, h // self.block), cv2.INTER_NEAREST
        else:
            sw, sh, up = max(1, w // 16), max(1, h // 16), cv2.INTER_LINEAR
        key = (sh, sw)
        small = self._small.get(key)
        if small is None:
            if len(self._small) > 32:
                self._small.clear()
            small = self._small[key] = np.empty((sh, sw, 3), np.uint8)
        cv2.resize(roi, (sw, sh), dst=small, interpolation=cv2.INTER_AREA)
        cv2.resize(small, (w, h), dst=roi, interpolation=up)
