"""Where a source's items go: its streams on the bus, created when the first item shows their shape.

A source writes into a `Sink`; the sink owns the source's rings:

    NAME         the video: encoded access units (h264, h265, vp8, vp9, av1) or raw pictures
    NAME-audio   PCM s16 chunks, when the source has audio

Rings are made lazily, sized from the first item, and made again (a new generation,
which consumers follow by themselves) when a picture changes size or an access unit
outgrows its slot. Encoded and audio rings keep their history (framebus `history=True`):
the last `history_seconds` (the source's key, default 10 s) of items whoever reads, so a
decoder that falls behind misses nothing, one that attaches late starts from the last
keyframe, and a recorder that restarts picks up where its file ends (docs/recorder.md,
"Restarts"). Their slots are counted from the rate (`history_slots`: video frames per
second from the source, else 30; audio chunks per second from the first chunk), at least
64, at most 4096, and their /dev/shm pages are reserved as items reach them (framebus
`reserve="written"`): a slot is sized for the largest access unit the stream could send,
its items are usually a few KiB, so the ring costs about what the last `history_seconds`
of the stream take (bitrate x seconds, in whole pages per slot), not slots x payload.
They never hold a live source back. Every item costs one copy: from the source's buffer
(an FFmpeg packet, mss's grab, the encoder's output) into the slot.

Not thread-safe: the source's reader thread owns it. Its metrics are prometheus-client
children, which are.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

import framebus
from framebus.formats import picture_geometry
from services.runtime.streams import audio_stream

__all__ = ["Sink", "SinkMetrics"]

log = logging.getLogger("edgeroom.capture")

RAW_SLOTS = 8
ENCODED_SLOTS = 64          # the fewest slots an encoded ring has (more: history_slots)
MIN_HISTORY_SLOTS = ENCODED_SLOTS
MAX_HISTORY_SLOTS = 4096
DEFAULT_FPS = 30.0          # a source that does not say its rate (a url without one)
MIN_AU_SLOT = 256 * 1024
MAX_AU_SLOT = 32 * 1024 * 1024


class _Uncounted:
    """A metric child that counts nothing (what a sink's owner does not count)."""

    def inc(self, *_: object) -> None:
        pass

    def observe(self, *_: object) -> None:
        pass

    def labels(self, *_: object) -> _Uncounted:
        return self


@dataclass
class SinkMetrics:
    """The stream's metric children (services/capture/service.py makes them)."""
    frames: object
    bytes: object
    keyframes: object
    latency: object
    dropped: object       # labels(reason)
    audio_chunks: object
    rebases: object

    @classmethod
    def uncounted(cls, **counted: object) -> SinkMetrics:
        """Every child a no-op but those given (`audio_chunks=...`): a sink whose owner counts on its own."""
        none = _Uncounted()
        return cls(**{**dict.fromkeys(("frames", "bytes", "keyframes", "latency", "dropped", "audio_chunks",
                                       "rebases"), none), **counted})


# readers an encoded or audio ring takes: every call it is routed to reads it (a SIP call each), beside decode,
# the recorder and vision; an entry is 64 bytes of the ring's header, scanned only when a reader comes or goes
CALL_READERS = 96

def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def history_slots(seconds: float, per_second: float) -> int:
    """Slots for `seconds` of items at `per_second`: at least 64, at most 4096."""
    return max(MIN_HISTORY_SLOTS, min(MAX_HISTORY_SLOTS, math.ceil(seconds * max(per_second, 0.0))))


class Sink:
    """`history_seconds`: what the encoded and audio rings keep; `fps`: the video's rate when
    the source knows it (0: unknown until `rate_hint` is set, DEFAULT_FPS meanwhile)."""

    def __init__(self, stream: str, prefix: str, metrics: SinkMetrics, *, history_seconds: float = 10.0,
                 fps: float = 0.0) -> None:
        self.stream, self.prefix, self.m = stream, prefix, metrics
        self.history_seconds = history_seconds
        self.rate_hint = fps          # a file or url source sets it from the stream once it is open
        self.video: framebus.Producer | None = None
        self.audio_producer: framebus.Producer | None = None
        self.codec: str | None = None     # encoded codec, or None for raw
        self.format: str | None = None    # raw pixel format
        self.width = self.height = 0
        self.frames = 0                   # video items sent, for the rate
        self.audio_rate = 0
        self._extradata: bytes | None = None
        self._payload = 0
        # keyframes: when the last went out and the gap before it (when the next is due, for a keyframe
        # request a source cannot answer); on_keyframe() is called from the writing thread
        self.last_keyframe_ns = 0
        self.keyframe_gap_ns = 0
        self.on_keyframe: Callable[[], None] | None = None

    def next_keyframe_in(self) -> float | None:
        """Seconds until the next keyframe is due at the gap seen between the last two; None before two."""
        if not self.keyframe_gap_ns:
            return None
        since = _now_ns() - self.last_keyframe_ns
        return max(0.0, (self.keyframe_gap_ns - since) / 1e9)

    # ------------------------------------------------------------ rings
    def _replace_video(self, kind: str, payload: int, slots: int) -> framebus.Producer:
        if self.video is not None:
            self.video.close()
            self.video = None
        # encoded rings keep their history: a decoder that attaches late starts from the last keyframe,
        # a recorder that restarts from where its file ends
        history = kind == "encoded"
        self.video = framebus.Producer.create(self.stream, kind, payload=payload, slots=slots, prefix=self.prefix,
                                              history=history, reserve="written" if history else "all",
                                              max_consumers=CALL_READERS if history else 16)
        self._payload = payload
        return self.video

    def _encoded_ring(self, codec: str, size: int, width: int, height: int) -> framebus.Producer:
        if self.video is None or self.codec != codec or size > self._payload:
            payload = max(MIN_AU_SLOT, width * height // 2, self._payload)
            while payload < size:
                payload *= 2
            if payload > MAX_AU_SLOT:
                raise framebus.PayloadTooLarge(f"an access unit of {size} bytes (the largest accepted is "
                                               f"{MAX_AU_SLOT})")
            if self.video is not None:
                log.info("%s: access unit of %d bytes outgrows the %d-byte slots: new ring", self.stream, size,
                         self._payload)
            self._replace_video("encoded", payload,
                                history_slots(self.history_seconds, self.rate_hint or DEFAULT_FPS))
            self.codec, self.format = codec, None
            if self._extradata:
                self.video.set_extradata(self._extradata, codec)
        return self.video

    def open_encoded(self, codec: str, width: int, height: int) -> framebus.Producer:
        """The encoded ring, made now (before the first access unit) if it is not there yet, so
        that readers waiting for the stream attach before anything is sent."""
        return self._encoded_ring(codec, 1, width, height)

    # ------------------------------------------------------------ video
    def set_extradata(self, data: bytes | None, codec: str) -> None:
        """The codec's parameter sets (avcC/hvcC or Annex B), for consumers that join late."""
        self._extradata = bytes(data) if data else None
        if self.video is not None and self.codec == codec and self._extradata:
            self.video.set_extradata(self._extradata, codec)

    def encoded(self, data, codec: str, *, keyframe: bool, pts: int, time_base: Fraction, capture_ns: int,
                width: int = 0, height: int = 0, discontinuity: bool = False, corrupt: bool = False) -> bool:
        """One access unit (anything with the buffer protocol: an av.Packet, bytes); False if dropped.

        corrupt: the demuxer says the data is damaged or data before it was lost (FLAG_CORRUPT:
        a decoder closes its keyframe gate rather than show what it would conceal)."""
        view = memoryview(data).cast("B")
        size = view.nbytes
        if size == 0:
            return False
        try:
            ring = self._encoded_ring(codec, size, width, height)
        except framebus.PayloadTooLarge as exc:
            self.m.dropped.labels("too_large").inc()
            log.warning("%s: dropped %s", self.stream, exc)
            return False
        loan = ring.loan_encoded(codec, size, width, height)
        loan.array[:] = view
        flags = self._flags(discontinuity) | (framebus.FLAG_CORRUPT if corrupt else 0)
        loan.send(pts=pts, time_base=time_base, capture_ns=capture_ns, keyframe=keyframe, flags=flags)
        self._sent(size, capture_ns, keyframe)
        return True

    def loan_picture(self, width: int, height: int, fmt: str) -> framebus.Loan:
        """A slot to draw or grab a picture into; send it with send_picture() or abort() it."""
        if self.video is None or (width, height, fmt) != (self.width, self.height, self.format):
            size = picture_geometry(fmt, width, height).size
            if self.video is not None:
                log.info("%s: picture is now %dx%d %s: new ring", self.stream, width, height, fmt)
            self._replace_video("video", size, RAW_SLOTS)
            self.codec, self.format, self.width, self.height = None, fmt, width, height
        return self.video.loan_picture(width, height, fmt)

    def send_picture(self, loan: framebus.Loan, *, pts: int, time_base: Fraction, capture_ns: int,
                     discontinuity: bool = False) -> None:
        loan.send(pts=pts, time_base=time_base, capture_ns=capture_ns, flags=self._flags(discontinuity))
        self._sent(loan.array.nbytes, capture_ns, False)

    def _flags(self, discontinuity: bool) -> int:
        if not discontinuity:
            return 0
        self.m.rebases.inc()
        return framebus.FLAG_DISCONTINUITY

    def _sent(self, size: int, capture_ns: int, keyframe: bool) -> None:
        self.frames += 1
        self.m.frames.inc()
        self.m.bytes.inc(size)
        if keyframe:
            self.m.keyframes.inc()
            if self.last_keyframe_ns:
                self.keyframe_gap_ns = capture_ns - self.last_keyframe_ns
            self.last_keyframe_ns = capture_ns
            if self.on_keyframe is not None:
                self.on_keyframe()
        self.m.latency.observe((_now_ns() - capture_ns) / 1e9)

    # ------------------------------------------------------------ audio
    def audio(self, pcm: np.ndarray, rate: int, *, pts: int, capture_ns: int) -> None:
        """A (samples, channels) int16 chunk; pts in samples (time base 1/rate)."""
        if self.audio_producer is None or rate != self.audio_rate:
            if self.audio_producer is not None:
                self.audio_producer.close()
            # room for a 0.1 s chunk of 8 channels at the rate, whatever the source sends; the
            # history counted in chunks of the first one's length
            slots = history_slots(self.history_seconds, rate / max(1, len(pcm)))
            self.audio_producer = framebus.Producer.create(audio_stream(self.stream), "audio",
                                                           payload=max(rate // 10, 1024) * 8 * 2, slots=slots,
                                                           prefix=self.prefix, history=True, reserve="written",
                                                           max_consumers=CALL_READERS)
            self.audio_rate = rate
        self.audio_producer.publish_audio(pcm, rate, pts=pts, time_base=(1, rate), capture_ns=capture_ns)
        self.m.audio_chunks.inc()

    # ------------------------------------------------------------ state
    def heartbeat(self) -> None:
        """Keep the rings marked alive while the source is quiet (a reconnecting camera)."""
        for p in (self.video, self.audio_producer):
            if p is not None:
                p.heartbeat()

    def streams(self) -> list[str]:
        return [p.stream for p in (self.video, self.audio_producer) if p is not None]

    def close(self) -> None:
        for p in (self.video, self.audio_producer):
            if p is not None:
                p.close()
        self.video = self.audio_producer = None
