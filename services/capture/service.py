"""The capture service: one source onto the bus, as one session with its tracks.

`edgeroom service capture NAME` runs the source NAME (the config's [sources.NAME], or
one added with `edgeroom ctl source add`). The source runs on a reader thread of its own,
which owns the sink (the source's bus rings) and does all blocking I/O: demuxing,
device reads, pacing. The service's loop keeps the control plane: heartbeats, the
watchdog, events, metrics. So a camera that stops answering never stops the heartbeats,
and a stuck loop still stops the watchdog.

When the source fails (SourceError: refused, timed out, unplugged, display gone), the
thread counts the reason, shows it in the status, and opens the source again after a
delay that doubles from reconnect_min up to reconnect_max (reset once the source has
delivered for a few seconds). A file that ends without loop leaves the service up and
idle ("ended"), with its session ended and its tracks removed.

Session and tracks: the session (id = NAME, kind from the source) exists while the
service runs; its video track (and audio track) exist while items flow, so
ON_VIDEO_TRACK_ADDED/REMOVED fire when a camera comes and goes.
"""
from __future__ import annotations

import threading
import time

from prometheus_client import Counter, Gauge, Histogram

from services.capture import book
from services.capture.sink import Sink, SinkMetrics
from services.capture.sources import Source, SourceError, open_source
from services.control.protocol import ProtocolError
from services.runtime.keyframes import KeyframeRequests, cannot
from services.runtime.rate import RateMeter
from services.runtime.service import Service
from services.runtime.streams import audio_stream

__all__ = ["Capture"]

HEALTHY_AFTER = 5.0   # seconds of delivery after which the reconnect delay starts over
FLOWING_WITHIN = 3.0  # a track exists while its last item is at most this old (or one period, if longer)


class Capture(Service):
    kind = "capture"

    def setup(self) -> None:
        self.source_cfg = book.lookup(self.config, self.instance)
        self.stream = self.instance
        self._metrics()
        self.phase = "starting"          # starting | running | waiting | ended
        self.last_error = ""
        self.retry_at = 0.0
        self._frames_at_open = 0  # items sent when the source was last (re)opened
        self.meter = RateMeter()
        self._last_frames = 0
        self._last_item = 0.0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._reader, name=f"capture-{self.instance}", daemon=True)
        cfg = self.source_cfg
        interval = cfg.frame_interval()
        self.sink = self.own(Sink(self.stream, self.config.bus.prefix, self.sink_metrics,
                                  history_seconds=getattr(cfg, "history_seconds", 10.0),
                                  fps=1.0 / interval if interval > 0 else 0.0), self._close_sink)
        self.source: Source = open_source(self.instance, self.source_cfg)
        self.keyframes = KeyframeRequests(self.registry, self.loop, self._make_keyframe)
        self.sink.on_keyframe = lambda: self.loop.call_soon_threadsafe(lambda: self.keyframes.keyframe(self.stream))
        self.offer_keyframes(self._keyframe_request)
        self._thread.start()
        self.on_stop(self._stop_reader)
        if getattr(cfg, "input", False):  # a screen source that takes input: services/screen/offers.py
            from services.screen.offers import ScreenInput
            ScreenInput(self, cfg)
        self.loop.every(1.0, self._measure)

    def _metrics(self) -> None:
        r, s = self.registry, self.stream
        frames = Counter("edgeroom_capture_frames", "Video items put on the bus.", ["stream"], registry=r)
        dropped = Counter("edgeroom_capture_dropped_frames", "Frames not put on the bus, by reason.",
                          ["stream", "reason"], registry=r)
        self.m_fps = Gauge("edgeroom_capture_fps", "Video items per second over the last second.", ["stream"],
                           registry=r).labels(s)
        latency = Histogram("edgeroom_capture_to_bus_seconds", "From capture to the item on the bus.",
                            ["stream"], registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1))
        nbytes = Counter("edgeroom_capture_bytes", "Bytes of video items put on the bus.", ["stream"], registry=r)
        keyframes = Counter("edgeroom_capture_keyframes", "Encoded keyframes put on the bus.", ["stream"],
                            registry=r)
        audio = Counter("edgeroom_capture_audio_chunks", "Audio chunks put on the bus.", ["stream"], registry=r)
        self.m_errors = Counter("edgeroom_capture_source_errors", "Source failures, by reason.",
                                ["stream", "reason"], registry=r)
        self.m_reconnects = Counter("edgeroom_capture_reconnects", "Times the source was opened again after a "
                                    "failure.", ["stream"], registry=r).labels(s)
        self.m_up = Gauge("edgeroom_capture_source_up", "1 while the source delivers.", ["stream"],
                          registry=r).labels(s)
        rebases = Counter("edgeroom_capture_timestamp_rebases", "Times the source's clock wrapped, restarted or "
                          "leapt and the timestamps were rebased (the item is marked a discontinuity).", ["stream"],
                          registry=r)
        self.sink_metrics = SinkMetrics(frames.labels(s), nbytes.labels(s), keyframes.labels(s), latency.labels(s),
                                        _Bound(dropped, s), audio.labels(s), rebases.labels(s))

    # ------------------------------------------------------------ the reader thread
    def _reader(self) -> None:
        cfg = self.source_cfg
        delay = cfg.reconnect_min
        while not self._halt.is_set():
            started, self._frames_at_open = time.monotonic(), self.sink.frames
            self.phase = "running"
            try:
                ended = self.source.run(self.sink, self._halt, self._emit)
            except SourceError as exc:
                self._failed(exc.reason, str(exc))
            except Exception as exc:  # a bug or an unexpected library error: keep the service up, say what
                self.log.exception("source %s failed unexpectedly", self.instance)
                self._failed("internal", f"{type(exc).__name__}: {exc}")
            else:
                if ended:  # the input is over: close the rings, so readers (decode) know and flush
                    self.phase = "ended"
                    self.sink.close()
                    return
                continue
            if self.sink.frames > self._frames_at_open and time.monotonic() - started > HEALTHY_AFTER:
                delay = cfg.reconnect_min
            self.phase = "waiting"
            self.retry_at = time.monotonic() + delay
            while (left := self.retry_at - time.monotonic()) > 0:
                self.sink.heartbeat()  # the rings stay alive (not stale) while the source is away
                if self._halt.wait(min(left, 1.0)):
                    return
            delay = min(delay * 2, cfg.reconnect_max)
            self.m_reconnects.inc()

    def _failed(self, reason: str, message: str) -> None:
        self.last_error = message
        self.m_errors.labels(self.stream, reason).inc()
        self.m_up.set(0)
        self.throttled.warning(f"source-{reason}", f"source {self.instance}: {message}")

    def _emit(self, topic: str, data: dict) -> None:
        """From the reader thread: an event goes out on the loop's thread (ZeroMQ sockets are not shared)."""
        data = {"session": self.instance, "stream": self.stream, **data}
        self.loop.call_soon_threadsafe(lambda: self.link.publish(topic, data) if self.link else None)

    # ------------------------------------------------------------ on the loop
    def _measure(self) -> None:
        now = time.monotonic()
        self.m_fps.set(self.meter.update(self.sink.frames, now))
        self.m_up.set(1 if self._flowing(now) else 0)

    def _flowing(self, now: float) -> bool:
        if self.sink.frames != self._last_frames:
            self._last_frames, self._last_item = self.sink.frames, now
        window = max(FLOWING_WITHIN, 2.0 * self.source_cfg.frame_interval())
        return self._last_item > 0 and now - self._last_item <= window and self.phase == "running"

    def _status(self) -> str:
        cfg = self.source_cfg
        what = self.source.describe() or cfg.kind
        fmt = self.sink.codec or self.sink.format or "-"
        if self.phase == "waiting":
            return f"{cfg.kind}: retrying in {max(0.0, self.retry_at - time.monotonic()):.1f} s: {self.last_error}"
        if self.phase == "ended":
            return f"{cfg.kind}: ended ({what})"
        if self.phase == "running" and self.sink.frames == self._frames_at_open:
            return f"{cfg.kind}: opening {what}" + (f" (last error: {self.last_error})" if self.last_error else "")
        return f"{cfg.kind} {what} -> {fmt} at {self.meter.rate:.1f} fps"

    def _tracks(self) -> list[dict]:
        if not self._flowing(time.monotonic()):
            return []
        sink = self.sink
        interval = self.source_cfg.frame_interval()
        video = {"id": "video", "kind": "video", "stream": self.stream, "format": sink.codec or sink.format or "",
                 "fps": round(1 / interval, 3) if interval else round(self.meter.rate, 3)}
        if sink.format:
            video |= {"width": sink.width, "height": sink.height}
        tracks = [video]
        if sink.audio_producer is not None:
            tracks.append({"id": "audio", "kind": "audio", "stream": audio_stream(self.stream),
                           "format": "s16", "rate": sink.audio_rate})
        return tracks

    def describe(self) -> dict:
        sessions = []
        if self.phase != "ended":
            sessions.append({"id": self.instance, "room": self.source_cfg.room,
                             "kind": self.source_cfg.session_kind, "tracks": self._tracks()})
        return {"status": self._status(), "rate": round(self.meter.rate, 2), "sessions": sessions,
                "streams": self.sink.streams(), "state": "degraded" if self._reopening() else None}

    def _reopening(self) -> bool:
        """Failed and not delivering again yet: waiting to retry, or reopening after a failure."""
        return self.phase == "waiting" or (self.phase == "running" and bool(self.last_error)
                                            and self.sink.frames == self._frames_at_open)

    # ------------------------------------------------------------ keyframe requests
    def _keyframe_request(self, stream: str, reason: str) -> dict:
        if stream != self.stream:
            raise ProtocolError("not_found", f"{self.id} produces {self.stream}, not {stream!r}")
        if not self.source_cfg.encoded():
            return cannot(f"{stream} carries raw pictures: each stands alone")
        if not self.source_cfg.makes_keyframes():
            return cannot(f"a {self.source_cfg.kind} source passes on the keyframes it gets and cannot make one",
                          self.sink.next_keyframe_in())
        return self.keyframes.request(stream, reason)

    def _make_keyframe(self, stream: str) -> str:
        return self.source.force_keyframe() or "none"

    def _stop_reader(self) -> None:
        self._halt.set()
        self._thread.join(timeout=min(self.source_cfg.stop_bound(), 0.9 * self.config.services[self.kind].stop_timeout))
        self.loop.run_handed()  # the source's last events (share stopped) still go out

    def _close_sink(self, sink: Sink) -> None:
        if self._thread.is_alive():  # a read still blocked: the thread may yet write, so its rings stay
            self.log.warning("the source did not stop within the bound; leaving its thread behind")
            return
        sink.close()


class _Bound:
    """`dropped.labels(reason)` with the stream label already applied."""

    def __init__(self, counter, stream: str) -> None:
        self.counter, self.stream = counter, stream

    def labels(self, reason: str):
        return self.counter.labels(self.stream, reason)
