"""The vision engine: one worker thread that runs every stream's pipeline and the one detector.

    engine = Engine(prefix, lanes, detector, metrics, on_detections=..., on_error=...)
    engine.start(); ...; engine.stop()

Each configured stream is a `Lane`: a consumer of its input stream, its `Pipeline`
(services/vision/pipeline), the detections it last saw, and (when `publish`) a producer of
NAME-vision. The worker takes the NEWEST picture of every lane that has one
(`Consumer.latest()`: older pictures are skipped and counted, so a stream the detector
cannot keep up with is sampled, never queued), runs the detector on all of them in one
`detect_batch` (batched when the model allows it), then each lane's stages, and
publishes the result.

Why one thread: the detector is one model instance for every stream (one copy of the
weights, one set of CPU threads or one GPU context); the stages are OpenCV calls that
release the GIL; and the service's own loop stays free for heartbeats, commands and
events (results reach it through callbacks the service hands over with
`call_soon_threadsafe`).

Detection and censoring are synchronous: a picture is censored in light of its own
detections, so the first picture with a blocked label is never published uncensored.
A lane that must censor but has no working detector fails closed: every picture is
censored whole, and the lane says why.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

import framebus
from services.vision.pipeline import Pipeline
from services.vision.types import Detection

__all__ = ["Lane", "Engine", "draw_boxes"]

log = logging.getLogger("edgeroom.vision")

IDLE_WAIT = 0.05          # seconds the worker sleeps on the wake fds when no lane has a picture
BOX_COLOUR = (0, 255, 0)  # BGR


@dataclass
class Lane:
    """One stream through the engine; everything here is touched only by the worker thread,
    except the counters and `last_*`, which the service reads (plain ints and references)."""
    name: str
    input: str
    output: str | None            # NAME-vision when publish, else None
    output_format: str
    pipeline: Pipeline
    detect: bool
    every_n: int
    draw: bool
    censors: bool                 # has blocked labels: fails closed without a detector
    consumer: framebus.Consumer | None = None
    producer: framebus.Producer | None = None
    payload: int = 0              # the output ring's slot size
    detections: list[Detection] = field(default_factory=list)
    frames: int = 0               # pictures processed
    skipped_seen: int = 0         # consumer.skipped already counted in metrics
    torn: int = 0
    last_seq: int = -1
    last_capture_ns: int = 0
    last_size: tuple[int, int] = (0, 0)
    problem: str = ""

    def close(self) -> None:
        for end in (self.consumer, self.producer):
            if end is not None:
                end.close()
        self.consumer = self.producer = None


def draw_boxes(bgr: np.ndarray, detections: list[Detection]) -> None:
    """Boxes and labels onto the picture, in place (OpenCV; a handful of calls per frame)."""
    for d in detections:
        x1, y1, x2, y2 = d.box
        cv2.rectangle(bgr, (x1, y1), (x2, y2), BOX_COLOUR, 2)
        cv2.putText(bgr, f"{d.label} {d.confidence:.2f}", (x1 + 2, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45, BOX_COLOUR, 1, cv2.LINE_AA)


class Engine:
    def __init__(self, prefix: str, lanes: list[Lane], detector, metrics, *,
                 on_detections: Callable[[Lane, int, int, list[Detection]], None],
                 on_error: Callable[[str, str], None], detector_problem: str = "",
                 upgrade=None, open_upgraded: Callable | None = None,
                 on_upgraded: Callable[[object], None] | None = None) -> None:
        self.prefix, self.lanes, self.detector, self.m = prefix, lanes, detector, metrics
        self.on_detections, self.on_error = on_detections, on_error
        self.detector_problem = detector_problem
        # the int8 copy of the detector (services/vision/quantize.py): calibrated on pictures of
        # lanes that do not censor (uncensored pixels would otherwise sit in a file while it builds)
        self.upgrade, self.open_upgraded, self.on_upgraded = upgrade, open_upgraded, on_upgraded
        self._stop = threading.Event()
        self._changes: list[tuple[str, Lane | None]] = []   # from the service's loop, applied by the worker
        self._changes_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vision-engine", daemon=True)
        self.busy = 0.0           # share of the last second spent working (for status)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        for lane in self.lanes:
            self._open(lane)
        self._thread.start()

    def _open(self, lane: Lane) -> None:
        lane.consumer = framebus.Consumer.attach(lane.input, prefix=self.prefix, missing_ok=True)
        if lane.censors and self.detector is None:
            lane.problem = f"censoring every picture: no detector ({self.detector_problem or 'none configured'})"

    def replace(self, name: str, lane: Lane | None) -> None:
        """Put `lane` in place of the lane called `name` (None: remove it), between two batches."""
        with self._changes_lock:
            self._changes.append((name, lane))

    def _apply_changes(self) -> None:
        with self._changes_lock:
            changes, self._changes = self._changes, []
        for name, lane in changes:
            lanes = [old for old in self.lanes if old.name != name]
            for old in self.lanes:
                if old.name == name:
                    old.close()
            if lane is not None:
                self._open(lane)
                lanes.append(lane)
            self.lanes = sorted(lanes, key=lambda x: x.name)  # one assignment: readers see old or new

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        for lane in self.lanes:
            lane.close()

    # --- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        work, window = 0.0, time.monotonic()
        while not self._stop.is_set():
            if self._changes:
                self._apply_changes()
            batch = self._newest()
            if not batch:
                self._idle()
            else:
                t0 = time.perf_counter()
                try:
                    self._process(batch)
                except Exception as exc:  # a bug must cost pictures, not the engine
                    log.exception("vision engine failed on a batch")
                    self.on_error("internal", f"{type(exc).__name__}: {exc}")
                work += time.perf_counter() - t0
            now = time.monotonic()
            if now - window >= 1.0:
                self.busy, work, window = work / (now - window), 0.0, now

    def _idle(self) -> None:
        fds = [lane.consumer.fileno() for lane in self.lanes if lane.consumer is not None and lane.consumer.attached]
        if fds:
            select.select(fds, [], [], IDLE_WAIT)
        else:
            self._stop.wait(IDLE_WAIT * 4)  # nothing attached yet: the consumers attach when polled

    def _newest(self) -> list[tuple[Lane, framebus.Item]]:
        out = []
        for lane in self.lanes:
            c = lane.consumer
            try:
                item = c.latest() if c is not None else None
            except framebus.BusError as exc:
                self.on_error("bus", f"{lane.input}: {exc}")
                continue
            if c is not None and c.skipped != lane.skipped_seen:
                self.m.skipped.labels(lane.name).inc(c.skipped - lane.skipped_seen)
                lane.skipped_seen = c.skipped
            if item is None:
                continue
            if item.kind != "video":
                lane.problem = f"{lane.input} carries {item.kind}, not pictures (use its -raw stream)"
                continue
            out.append((lane, item))
        return out

    def _process(self, batch: list[tuple[Lane, framebus.Item]]) -> None:
        loaded = []
        for lane, item in batch:
            src = item.array if item.format in ("bgr24", "rgb24", "gray") else item.planes()
            bgr = lane.pipeline.load(src, item.format, item.width, item.height)
            if not item.valid():  # overwritten while we read it: drop it, the next one is newer anyway
                lane.torn += 1
                self.m.dropped.labels(lane.name, "overwritten").inc()
                continue
            loaded.append((lane, item, bgr))
        if self.upgrade is not None and not self.upgrade.done:
            self._upgrade(loaded)
        due = [(lane, bgr) for lane, _item, bgr in loaded
               if lane.detect and self.detector is not None and lane.frames % lane.every_n == 0]
        if due:
            t0 = time.perf_counter()
            try:
                found = self.detector.detect_batch([bgr for _lane, bgr in due])
            except Exception as exc:
                self.on_error("detector", f"{type(exc).__name__}: {exc}")
                found = [[] for _ in due]
            took = time.perf_counter() - t0
            self.m.detect_seconds.observe(took)
            for (lane, _bgr), dets in zip(due, found):
                lane.detections = dets
        for lane, item, bgr in loaded:
            self._finish(lane, item, bgr, any(lane is d for d, _ in due))

    def _upgrade(self, loaded) -> None:
        up = self.upgrade
        for lane, _item, bgr in loaded:
            if not lane.censors:
                up.offer(bgr)
        path = up.poll()
        if path is not None:
            try:
                new = self.open_upgraded(path)
            except Exception as exc:
                self.on_error("quantize_failed", f"the int8 copy {path} does not open: {type(exc).__name__}: {exc}")
                return
            old, self.detector = self.detector, new
            old.close()
            log.info("detector swapped for its int8 copy %s (built in %.1f s)", path, up.build_seconds or 0.0)
            if self.on_upgraded is not None:
                self.on_upgraded(new)

    def _finish(self, lane: Lane, item, bgr: np.ndarray, detected: bool) -> None:
        dets = lane.detections
        if lane.censors and self.detector is None:  # fail closed
            dets = [Detection(label, 1.0, (0, 0, bgr.shape[1], bgr.shape[0])) for label in lane.pipeline.censor.labels]
        out = lane.pipeline.run(bgr, dets, frame=item.seq, stream=lane.name, capture_ns=item.capture_ns)
        if lane.draw and dets and not (lane.censors and self.detector is None):
            draw_boxes(out, dets)
        lane.frames += 1
        lane.last_seq, lane.last_capture_ns = item.seq, item.capture_ns
        lane.last_size = (out.shape[1], out.shape[0])
        self.m.frames.labels(lane.name).inc()
        if lane.pipeline.censored:
            self.m.censored.labels(lane.name).inc()
        if lane.output is not None:
            self._publish(lane, item, out)
        if detected and lane.detections:
            self.m.detections.labels(lane.name).inc(len(lane.detections))
            self.on_detections(lane, item.seq, item.capture_ns, list(lane.detections))
        self.m.latency.observe(max(0, time.clock_gettime_ns(time.CLOCK_MONOTONIC) - item.capture_ns) / 1e9)

    def _publish(self, lane: Lane, item, out: np.ndarray) -> None:
        h, w = out.shape[:2]
        need = w * h * 3
        p = lane.producer
        if p is None or lane.payload < need:  # first picture, or bigger ones: a new generation of the ring
            if p is not None:
                p.close()
            lane.producer = p = framebus.Producer.create(lane.output, "video", payload=need, slots=4,
                                                         prefix=self.prefix)
            lane.payload = need
            log.info("publishing %s pictures of %s on %s", lane.output_format, lane.name, lane.output)
        loan = p.loan_picture(w, h, lane.output_format)
        lane.pipeline.write(out, lane.output_format, loan.planes)
        loan.send(pts=item.pts, time_base=item.time_base, capture_ns=item.capture_ns)
