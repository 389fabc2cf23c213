"""The capture service: one source onto one bus stream, as one session with its tracks.

For now the source is the synthetic camera (the embedded default); the capture issue adds
files, URLs, webcams and screens behind the same service. Frames are paced on the
service's loop against CLOCK_MONOTONIC: a frame whose time has passed by more than one
period is not drawn late, it is counted as dropped (reason "late").
"""
from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

import framebus
from services.capture.synthetic import Pattern
from services.runtime.service import Service

__all__ = ["Capture"]


class Capture(Service):
    kind = "capture"

    def setup(self) -> None:
        if self.instance not in self.config.sources:
            raise ValueError(f"no source {self.instance!r} in the config (sources: {', '.join(self.config.sources)})")
        self.source = self.config.sources[self.instance]
        self.stream = self.instance
        w, h = self.source.width, self.source.height
        self.pattern = Pattern(w, h)
        self.producer = framebus.Producer.create(self.stream, "video", payload=w * h * 3, slots=8,
                                                 prefix=self.config.bus.prefix)
        self.period = 1.0 / self.source.fps
        self.n = 0      # frame slots since start, sent or skipped: the pacing clock
        self.sent = 0   # frames really put on the bus: the rate
        self.t0 = time.monotonic()
        self._rate_mark = (self.t0, 0)
        self.rate = 0.0
        self._metrics()
        self.loop.call_at(self.t0, self._frame)
        self.loop.every(1.0, self._measure)

    def _metrics(self) -> None:
        r, s = self.registry, self.stream
        self.m_frames = Counter("edgeroom_capture_frames", "Frames put on the bus.", ["stream"], registry=r).labels(s)
        self.m_dropped = Counter("edgeroom_capture_dropped_frames", "Frames not captured, by reason.",
                                 ["stream", "reason"], registry=r)
        self.m_fps = Gauge("edgeroom_capture_fps", "Frames per second over the last second.", ["stream"],
                           registry=r).labels(s)
        self.m_latency = Histogram("edgeroom_capture_to_bus_seconds", "From capture to the frame on the bus.",
                                   ["stream"], registry=r,
                                   buckets=(.0005, .001, .002, .005, .01, .02, .05, .1)).labels(s)

    def _frame(self) -> None:
        now = time.monotonic()
        due = self.t0 + self.n * self.period
        if now - due > self.period:  # the loop was held up: skip to the present, count what was skipped
            skipped = int((now - due) / self.period)
            self.m_dropped.labels(self.stream, "late").inc(skipped)
            self.n += skipped
        capture_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        loan = self.producer.loan_picture(self.source.width, self.source.height, "rgb24")
        self.pattern.draw(loan.array, self.n)
        loan.send(pts=capture_ns, capture_ns=capture_ns)  # pts in ns of the capture clock: VFR-safe
        self.m_latency.observe((time.clock_gettime_ns(time.CLOCK_MONOTONIC) - capture_ns) / 1e9)
        self.m_frames.inc()
        self.sent += 1
        self.n += 1
        self.loop.call_at(self.t0 + self.n * self.period, self._frame)

    def _measure(self) -> None:
        now = time.monotonic()
        t, n = self._rate_mark
        self.rate = (self.sent - n) / max(1e-6, now - t)
        self._rate_mark = (now, self.sent)
        self.m_fps.set(self.rate)

    def describe(self) -> dict:
        if not hasattr(self, "producer"):
            return {"status": "starting"}
        track = {"id": "video", "kind": "video", "stream": self.stream, "format": "rgb24",
                 "width": self.source.width, "height": self.source.height, "fps": self.source.fps}
        session = {"id": self.instance, "room": getattr(self.source, "room", "default"), "kind": "camera",
                   "tracks": [track]}
        return {"status": f"{self.source.kind} {self.source.width}x{self.source.height} at {self.rate:.1f} fps",
                "rate": round(self.rate, 2), "sessions": [session], "streams": [self.stream]}

    def teardown(self) -> None:
        if hasattr(self, "producer"):
            self.producer.close()
