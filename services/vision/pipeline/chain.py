"""One stream's picture pipeline: resize -> transforms -> censor -> watermark.

    p = Pipeline(Resizer(640, 640), make_transforms(["sepia"]),
                 Censor(["person"], scope="boxes", grace_frames=15),
                 Watermark("{stream} {timestamp}", colour="#FFFFFF", background="#000000"))
    bgr = p.load(item.planes(), item.format, item.width, item.height)   # resized, then BGR
    dets = detector(bgr)                                              # boxes in bgr's pixels
    out = p.run(bgr, dets, frame=item.seq, stream="door", capture_ns=item.capture_ns)
    p.write(out, "yuv420p", loan.planes)                              # into the output slot
    p.timings    # {"resize": s, "convert": s, "transforms": s, "censor": s, "watermark": s, "output": s}

Why this order:
  1. resize first: every later stage (and the detector) then touches fewer pixels, and the
     detections the service passes in are in the same pixels the censor paints. load()
     even resizes before the colour conversion, plane by plane in the bus format, so the
     conversion also runs on the small picture.
  2. transforms next: they are the look of the stream, and must come before the censor,
     or a transform could undo it (invert turns a black box white; edges/sketch redraw
     the outlines of a pixelated face; blur or sepia would soften a black box's edges).
  3. censor after that: the last stage that decides what content is visible, so nothing
     configured after it can reveal what it hid. The detector runs on the picture before
     transforms (the service calls it between load() and run()), so a cartoon or edges
     effect does not blind it.
  4. watermark last: it is drawn on top of everything, its colours come out exactly as
     configured (no sepia/invert recolouring it) and it stays readable on a censored
     frame, which is when the stream name and time matter most.

Buffers: a picture that comes from the bus is read-only; the first stage that writes
pixels writes into a buffer the pipeline owns (the resizer's output, the converter's
output from load(), or one work buffer per picture size), and the stages after it work
in place. No stage allocates per frame once a stream's size is known, and run() returns
the same array object frame after frame (the tests check it). run() writes in place into
the picture load() returned (the detector has already looked at it).

Timing: `timings` holds the seconds each stage took on the last frame (stages that did not
run are absent); `observer(stage, seconds)`, when given, is called for each, which is where
the service feeds its Prometheus histogram (edgeroom_vision_stage_seconds{stage}).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..types import Detection
from .censor import Censor
from .picture import FromBGR, PictureError, ToBGR
from .resize import Resizer
from .transforms import Transform, make_transforms
from .watermark import Watermark

__all__ = ["STAGES", "Pipeline"]

STAGES = ("resize", "convert", "transforms", "censor", "watermark", "output")


class Pipeline:
    """The stages of one stream, run in a fixed order on reusable buffers."""

    def __init__(self, resizer: Resizer | None = None, transforms: Sequence[Transform] = (),
                 censor: Censor | None = None, watermark: Watermark | None = None, *,
                 observer: Callable[[str, float], None] | None = None) -> None:
        self.resizer, self.transforms = resizer, list(transforms)
        self.censor, self.watermark = censor, watermark
        self.observer = observer
        self.timings: dict[str, float] = {}
        self.frames = 0
        self._to_bgr, self._from_bgr = ToBGR(), FromBGR()
        self._loaded: np.ndarray | None = None  # load()'s last result, when it is our buffer
        self._work: np.ndarray | None = None

    @classmethod
    def from_settings(cls, *, resize_max_width: int = 0, resize_max_height: int = 0,
                      transforms: Sequence[str] = (), watermark_text: str = "",
                      watermark_position: str = "bottom-right", watermark_colour: str = "#FFFFFF",
                      watermark_background: str = "", watermark_scale: float = 1.0, watermark_margin: int = 10,
                      watermark_timestamp_format: str = "%Y-%m-%d %H:%M:%S", watermark_utc: bool = False,
                      censor_labels: Sequence[str] = (), censor_mode: str = "black", censor_scope: str = "frame",
                      censor_grace_frames: int = 0, censor_padding: float = 0.1,
                      censor_min_confidence: float = 0.0, censor_block: int = 16,
                      observer: Callable[[str, float], None] | None = None) -> Pipeline:
        """A pipeline from the flat keys proposed for a [pipelines.NAME] table
        (docs/vision-pipeline.md); a stage whose keys are left at their defaults is absent.
        Bad values raise PictureError / TransformError naming the key."""
        resizer = Resizer(resize_max_width, resize_max_height) if (resize_max_width or resize_max_height) else None
        censor = None
        if censor_labels:
            censor = Censor(censor_labels, mode=censor_mode, scope=censor_scope, grace_frames=censor_grace_frames,
                            padding=censor_padding, min_confidence=censor_min_confidence, block=censor_block)
        watermark = None
        if watermark_text:
            watermark = Watermark(watermark_text, position=watermark_position, colour=watermark_colour,
                                  background=watermark_background or None, scale=watermark_scale,
                                  margin=watermark_margin, timestamp_format=watermark_timestamp_format,
                                  utc=watermark_utc)
        return cls(resizer, make_transforms(transforms), censor, watermark, observer=observer)

    @property
    def draws(self) -> bool:
        """Whether run() changes pixels at all (transforms, censor or watermark)."""
        return bool(self.transforms or self.censor or self.watermark)

    @property
    def censored(self) -> bool:
        """Whether the last frame run() saw was censored."""
        return bool(self.censor and self.censor.censored)

    def _time(self, stage: str, t0: int) -> int:
        t1 = time.perf_counter_ns()
        s = (t1 - t0) / 1e9
        self.timings[stage] = s
        if self.observer is not None:
            self.observer(stage, s)
        return t1

    def load(self, src, fmt: str, width: int, height: int) -> np.ndarray:
        """A bus picture (item.planes() or item.array) -> the BGR working picture, resized
        in its own format first. May return the bus view itself (bgr24, no resize)."""
        self.timings.clear()
        t = time.perf_counter_ns()
        resized = self.resizer is not None and self.resizer.changes(width, height)
        if resized:
            src = self.resizer.resize_planes(src, fmt, width, height)
            width, height = self.resizer.plan(width, height)
            t = self._time("resize", t)
        bgr = self._to_bgr(src, fmt, width, height)
        self._time("convert", t)
        # Ours to write into unless it is the (read-only) bus view of a bgr24 picture.
        self._loaded = bgr if resized or fmt != "bgr24" else None
        return bgr

    def run(self, bgr: np.ndarray, detections: Sequence[Detection] = (), *, frame: int = 0,
            stream: str = "", capture_ns: int | None = None,
            source_size: tuple[int, int] | None = None) -> np.ndarray:
        """Run the stages on a (h, w, 3) BGR picture; returns the result (see module doc).
        `detections` are in bgr's pixels, or in a source_size=(w, h) picture's."""
        if bgr.ndim != 3 or bgr.shape[2] != 3:
            raise PictureError(f"run() takes a (h, w, 3) BGR picture, got shape {bgr.shape}", "bad_layout")
        if self._loaded is None or bgr is not self._loaded:
            self.timings.clear()
        self.frames += 1
        cur, owned = bgr, bgr is self._loaded and bgr.flags.writeable
        t = time.perf_counter_ns()
        if self.resizer is not None:
            out = self.resizer.resize_bgr(cur)
            if out is not cur:
                if source_size is None:
                    source_size = (cur.shape[1], cur.shape[0])
                cur, owned = out, True
                t = self._time("resize", t)
        if self.transforms:
            for tr in self.transforms:
                dst = cur if owned else self._work_for(cur)
                cur, owned = tr(cur, dst), True
            t = self._time("transforms", t)
        if self.censor is not None:
            h, w = cur.shape[:2]
            regions = self.censor.decide(detections, (w, h), source_size)
            if regions is not None:
                if not owned:
                    cur, owned = self._copy(cur), True
                self.censor.paint(cur, regions)
            t = self._time("censor", t)
        if self.watermark is not None:
            if not owned:
                cur, owned = self._copy(cur), True
            self.watermark(cur, frame=frame, stream=stream, capture_ns=capture_ns)
            self._time("watermark", t)
        return cur

    def write(self, bgr: np.ndarray, fmt: str, dst) -> None:
        """Write the result into destination planes (an output slot's) in `fmt`."""
        t = time.perf_counter_ns()
        self._from_bgr(bgr, fmt, dst)
        self._time("output", t)

    def _work_for(self, like: np.ndarray) -> np.ndarray:
        if self._work is None or self._work.shape != like.shape:
            self._work = np.empty(like.shape, np.uint8)
        return self._work

    def _copy(self, src: np.ndarray) -> np.ndarray:
        dst = self._work_for(src)
        np.copyto(dst, src)
        return dst
