"""A stream's video decoded and encoded again in another codec, for a call peer that does not take the source's.

    t = Transcoder("cam", "cam-vp8", "vp8", prefix=prefix, registry=registry, log=log,
                   ask_keyframe=service.request_keyframe)
    loop.add_reader(t.fileno(), t.pump)     # one fd for the transcoder's life: pump() when it is readable
    loop.every(1.0, t.tick)                 # heartbeat, a dead source noticed, the kbps gauge
    t.keyframe("pli")                       # the next access unit on cam-vp8 is a keyframe (an IDR in H.264)
    t.status()
    t.close()

The source is an encoded stream of the bus (H.264 Annex B, VP8; H.265, VP9 and AV1 decode as well), or raw
pictures (encoded as they come). It need not exist yet: the consumer waits for it (framebus wakes it when the
ring appears), and follows its producer's restarts (new generations) by itself.

The pieces are the project's own:

* `SourceReader`: a `framebus.Consumer` (missing_ok, start="next") and services/decode/decoder.py's `Decoder`
  (one thread: no picture held back; its keyframe gate: nothing decoded from a reference it lacks comes out;
  its parameter sets, the ring's extradata). A break in the input (items missed, an item torn while copied,
  FLAG_CORRUPT, a new producer generation, the producer closing or dying) flushes the decoder and closes the
  gate. A decode error is counted, the output freezes on the last good picture (nothing is written until
  the next keyframe of the source), and the source's producer is asked for a keyframe with
  `ask_keyframe(source, reason)`, at most once a second (also while the gate waits: at the start, after a
  loss). A reader more than MAX_LAG items behind jumps to the newest (counted as `late`) rather than
  encode seconds-old pictures.
* `Output`: services/recorder/encoder.py's `choose()` picks an encoder that really encodes here (NVENC and
  the like when a probe encode works, else libx264 / libvpx), services/encode/encoder.py's `Encoder` opens
  it with the call settings (constrained baseline H.264 with SPS/PPS before every IDR, or realtime VP8; a
  one-second VBV at `kbps`; time base 1/90000 with pts from the capture times), `ParameterSets` puts SPS/PPS
  in front of an IDR that came without (a hardware engine), and services/capture/sink.py's `Sink` writes
  the access units (64+ slots keeping their history, the last SPS/PPS as the ring's extradata). A picture
  of another size reopens the encoder at that size (its first access unit is a keyframe). Keyframes: the
  first picture, every `gop_s` seconds of capture time, after a reopen, after an access unit was lost on the
  way to the bus, and on request (`keyframe()`).

Each output access unit carries its source access unit's pts, time base and capture_ns (A/V timing kept;
`FLAG_DISCONTINUITY` where the source restarted or said so), the keyframe flag and the encoded size.

Nothing blocks: `pump()` does at most BATCH_ITEMS items or BATCH_SECONDS of work, and when more waits it keeps
its fd readable (an eventfd in the same epoll set), so the loop comes back after its timers. One owner, the
service's loop; no threads. No per-pixel Python: FFmpeg decodes, scales (swscale, only where the size or
format differs) and encodes.

Metrics (prometheus_client, on the registry given, one set per registry shared by every transcoder on it,
labelled by the output stream; a closed transcoder's series leave the scrape): see `MediaMetrics`.
"""
from __future__ import annotations

import collections
import os
import select
import time
import weakref
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import av
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import framebus
from framebus.names import check_name
from services.capture.sink import Sink, SinkMetrics
from services.decode.decoder import Decoder, DecoderUnavailable, canonical_codec
from services.encode.encoder import TIME_BASE, Encoder, ParameterSets
from services.encode.pictures import even_size
from services.recorder import encoder as encoders
from services.runtime.logs import Throttled

__all__ = ["CODECS", "MediaMetrics", "Meta", "Output", "SourceReader", "Transcoder"]

CODECS = ("h264", "vp8")    # what the output may be
BATCH_ITEMS = 16            # items read per pump() (per source) at most...
BATCH_SECONDS = 0.05        # ...or this much work, whichever comes first
MAX_LAG = 30                # items waiting beyond this (1 s at 30 fps): jump to the newest
ASK_EVERY = 1.0             # seconds between two keyframe requests to a source
KEY_EVERY = 0.5             # seconds: a keyframe request within this of the last one made is throttled
GOP_SLACK_NS = 5_000_000    # a periodic keyframe is due this early (capture times jitter)
HOUSEKEEPING_S = 1.0        # heartbeat, a dead producer, gauges: from tick(), or from pump() while items flow
NOMINAL_FPS = 30.0          # the rate an encoder is told when the input's is not known (pts carry the pace)
DARK_Y, NEUTRAL = 16, 128   # limited-range black


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Meta(NamedTuple):
    """What a picture hands on to its access unit."""

    pts: int
    time_base: Fraction
    capture_ns: int
    discontinuity: bool = False


# ---------------------------------------------------------------------------------------------- metrics
class _Reason:
    """`dropped.labels(reason)` for a Sink, with the stream label applied, counted in the owner's dict too."""

    def __init__(self, counter: Counter, stream: str, seen: collections.Counter[str]) -> None:
        self.counter, self.stream, self.seen = counter, stream, seen

    def labels(self, reason: str) -> _Inc:
        return _Inc(self.counter.labels(self.stream, reason), reason, self.seen)


class _Inc:
    def __init__(self, child: Any, reason: str, seen: collections.Counter[str]) -> None:
        self.child, self.reason, self.seen = child, reason, seen

    def inc(self, n: float = 1) -> None:
        self.child.inc(n)
        self.seen[self.reason] += int(n)


class _Nothing:
    def inc(self, n: float = 1) -> None:
        pass


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, MediaMetrics]] = weakref.WeakKeyDictionary()


class MediaMetrics:
    """The bridge's media metrics of one kind ("transcode" or "grid"), named edgeroom_bridge_{kind}_*, every one
    labelled by the output stream (`stream`). `MediaMetrics.of(registry, kind)`: one set per registry.

    frames_in (access units, or raw pictures, read from the sources), pictures (pictures decoded from them),
    frames_out, bytes, keyframes (published on the output), decode_errors, encode_errors, dropped_frames{reason}
    (waiting_keyframe, corrupt, missed, late, not_video, unsupported, error, bus_full, too_large),
    keyframe_asks (keyframe requests sent to the sources), reopens (the encoder (re)opened: the first picture,
    a new size, an error), discontinuities, kbps (gauge: over the last second), hardware{backend} (gauge: 1 for
    a hardware encoder, 0 for software), decode_seconds and encode_seconds (histograms: per access unit / per
    picture), capture_to_bus_seconds (histogram: from the capture time carried to the access unit on the bus).
    Grid only: sources (gauge: tiles shown), compose_seconds (histogram: the tiles scaled into the picture)."""

    def __init__(self, r: CollectorRegistry, kind: str) -> None:
        p, s = f"edgeroom_bridge_{kind}_", ["stream"]
        what = "the transcoder" if kind == "transcode" else "the grid"
        self.frames_in = Counter(p + "frames_in", f"Access units (or raw pictures) {what} read from its sources.", s,
                                 registry=r)
        self.pictures = Counter(p + "pictures", "Pictures decoded from the sources.", s, registry=r)
        self.frames_out = Counter(p + "frames_out", "Access units published on the output stream.", s, registry=r)
        self.bytes = Counter(p + "bytes", "Bytes of access units published on the output stream.", s, registry=r)
        self.keyframes = Counter(p + "keyframes", "Keyframes (IDR, VP8 key frames) published.", s, registry=r)
        self.decode_errors = Counter(p + "decode_errors", "Source access units that failed to decode (the output "
                                     "freezes until the source's next keyframe).", s, registry=r)
        self.encode_errors = Counter(p + "encode_errors", "Encoder errors (the encoder is reopened).", s, registry=r)
        self.dropped = Counter(p + "dropped_frames", "Access units or pictures not carried through, by reason.",
                               ["stream", "reason"], registry=r)
        self.asks = Counter(p + "keyframe_asks", "Keyframe requests sent to the sources' producers.", s, registry=r)
        self.reopens = Counter(p + "reopens", "Encoder (re)opened: the first picture, a new size, an error.", s,
                               registry=r)
        self.rebases = Counter(p + "discontinuities", "Access units marked FLAG_DISCONTINUITY.", s, registry=r)
        self.kbps = Gauge(p + "kbps", "Kilobits per second published over the last second.", s, registry=r)
        self.hardware = Gauge(p + "hardware", "1 when the encoder in use is a hardware encoder, 0 for software; the "
                              "backend label names it.", ["stream", "backend"], registry=r)
        ms = (.001, .002, .005, .01, .02, .033, .05, .1, .25)
        self.decode_seconds = Histogram(p + "decode_seconds", "Per source access unit: decoding it.", s, registry=r,
                                        buckets=ms)
        self.encode_seconds = Histogram(p + "encode_seconds", "Per picture: encoding it (scaling included).", s,
                                        registry=r, buckets=ms)
        self.latency = Histogram(p + "capture_to_bus_seconds", "From the capture time an access unit carries to the "
                                 "access unit committed on the output stream.", s, registry=r,
                                 buckets=(.002, .005, .01, .02, .033, .05, .1, .2, .5, 1.0))
        self.sources: Gauge | None = None
        self.compose_seconds: Histogram | None = None
        if kind == "grid":
            self.sources = Gauge(p + "sources", "Source streams shown as tiles.", s, registry=r)
            self.compose_seconds = Histogram(p + "compose_seconds", "Per output picture: the tiles that changed "
                                             "scaled into it.", s, registry=r, buckets=ms)

    @classmethod
    def of(cls, registry: CollectorRegistry, kind: str) -> MediaMetrics:
        sets = _by_registry.setdefault(registry, {})
        if kind not in sets:
            sets[kind] = cls(registry, kind)
        return sets[kind]

    def start(self, stream: str) -> None:
        """The output's series in the scrape from the start (at 0), not from their first count."""
        for metric in (self.frames_in, self.pictures, self.frames_out, self.bytes, self.keyframes,
                       self.decode_errors, self.encode_errors, self.asks, self.reopens, self.rebases, self.kbps,
                       self.sources):
            if metric is not None:
                metric.labels(stream)

    def sink(self, stream: str, seen: collections.Counter[str]) -> SinkMetrics:
        return SinkMetrics(frames=self.frames_out.labels(stream), bytes=self.bytes.labels(stream),
                           keyframes=self.keyframes.labels(stream), latency=self.latency.labels(stream),
                           dropped=_Reason(self.dropped, stream, seen), audio_chunks=_Nothing(),
                           rebases=self.rebases.labels(stream))

    def forget(self, stream: str) -> None:
        """A closed output's series leave the scrape."""
        for metric in vars(self).values():
            if metric is None:
                continue
            for key in [k for k in getattr(metric, "_metrics", {}) if k and k[0] == stream]:
                metric.remove(*key)


# ---------------------------------------------------------------------------------------------- input
def frame_of(item: framebus.Item) -> av.VideoFrame:
    """A raw picture of the bus as a PyAV frame: one copy per plane, into FFmpeg's buffers."""
    fmt = item.format or ""
    frame = av.VideoFrame(item.width, item.height, fmt)
    for src, plane in zip(item.planes(), frame.planes):
        rows = src.shape[0]
        row_bytes = src.size // rows
        dst = np.ndarray((rows, row_bytes), np.uint8, buffer=memoryview(plane), strides=(plane.line_size, 1))
        np.copyto(dst, src.reshape(rows, row_bytes))
    return frame


class SourceReader:
    """One stream of the bus as pictures: decoded access units (keyframe gate), or raw pictures.

    `read(out, deadline, budget)` hands each picture to `out(frame, meta)` in order and returns True when it
    stopped with more to read. `newest_raw`: of raw pictures, only the newest waiting is handed on (a grid
    shows the newest; a transcoder encodes every one). Counters: frames_in, pictures, errors (decode errors),
    dropped (reason -> n), asks (keyframe requests sent). `fileno()`: the consumer's, stable for life.
    """

    def __init__(self, stream: str, *, prefix: str, ask_keyframe: Callable[[str, str], None], log: Any,
                 decoder: str = "off", newest_raw: bool = False,
                 observe: Callable[[float], None] | None = None) -> None:
        self.stream, self.hw, self.newest_raw = check_name("stream", stream), decoder, newest_raw
        self.ask_keyframe, self.log, self.observe = ask_keyframe, log, observe
        self.throttled = Throttled(log)
        self.consumer = framebus.Consumer.attach(stream, prefix=prefix, missing_ok=True, start="next")
        self.decoder: Decoder | None = None
        self.codec: str | None = None          # the source's codec, once seen
        self.raw: str | None = None            # "rgb24 1280x720" while the source carries raw pictures
        self.size: tuple[int, int] = (0, 0)    # the last picture's
        self.generation: int | None = None
        self.frames_in = self.pictures = self.errors = self.asks = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.last_error: str | None = None
        self.producer_dead = False
        self._reading = False
        self._missed_seen = self._skipped_seen = 0
        self._closed_flushed = False
        self._disc = False
        self._extra_key: tuple[int, int] | None = None
        self._synced: tuple[int, dict[str, int]] = (0, {})
        self._asked_at = -1e9
        self._last_meta = Meta(0, TIME_BASE, 0)

    def fileno(self) -> int:
        return self.consumer.fileno()

    # ------------------------------------------------------------ reading
    def read(self, out: Callable[[av.VideoFrame, Meta], None], deadline: float, budget: int = BATCH_ITEMS) -> bool:
        c = self.consumer
        for _ in range(budget):
            if self.raw is not None and self.newest_raw:
                item = c.latest()
                self._skipped_seen = c.skipped  # on purpose: not a loss
            elif c.lag > MAX_LAG and self._reading:
                item = c.latest()
                if item is not None:
                    late = c.skipped - self._skipped_seen
                    self._skipped_seen = c.skipped
                    self.dropped["late"] += late
                    self._break(out, f"{late} access unit(s) behind: jumped to the newest", lost=True)
            else:
                item = c.poll()
            if item is None:
                self._idle(out)
                return False
            self._item(item, out)
            if time.monotonic() >= deadline:
                return True
        return True

    def _check_missed(self) -> int:
        missed = self.consumer.missed - self._missed_seen
        self._missed_seen = self.consumer.missed
        return missed if self._reading else 0  # what the source sent before we read it is not our loss

    def _idle(self, out: Callable[[av.VideoFrame, Meta], None]) -> None:
        missed = self._check_missed()
        if missed:
            self.dropped["missed"] += missed
            self._break(out, f"missed {missed} access unit(s): fell behind", lost=True)
        if not self.consumer.attached and self.generation is not None and not self._closed_flushed:
            self._closed_flushed = True
            self._break(out, "closed by its producer", lost=False)

    def _item(self, item: framebus.Item, out: Callable[[av.VideoFrame, Meta], None]) -> None:
        missed = self._check_missed()
        self._reading = True
        gen = item.generation
        if gen != self.generation:
            if self.generation is not None:  # the producer restarted: its timeline starts again
                self._break(out, f"a new producer (generation {gen})", lost=False)
                self._disc = True
            self.generation = gen
            self._closed_flushed = self.producer_dead = False
        if missed:
            self.dropped["missed"] += missed
            self._break(out, f"missed {missed} access unit(s): fell behind", lost=True)
        if item.kind == "video":
            self._picture(item, out)
            return
        if item.kind != "encoded":
            self.dropped["not_video"] += 1
            self.throttled.warning(f"kind-{self.stream}", f"stream {self.stream} carries {item.kind} items, not video")
            return
        self.raw = None
        codec, key, flags = item.codec or "", item.keyframe, item.flags
        meta = Meta(item.pts, item.time_base, item.capture_ns, bool(flags & framebus.FLAG_DISCONTINUITY))
        xver = item.extradata_version
        data = item.array.tobytes()  # one copy out of the ring, checked below
        if not item.valid():
            self.dropped["missed"] += 1
            self._break(out, f"access unit {item.seq} overwritten while read", lost=True)
            return
        if flags & framebus.FLAG_CORRUPT:  # damaged, or data before it lost: trust nothing before it
            self._break(out, f"access unit {item.seq} is marked damaged (FLAG_CORRUPT)", lost=True)
        if meta.discontinuity:
            self._disc = True
        if self.decoder is None or codec != self.codec:
            if not self._open(codec, out):
                return
            self._extra_key = (gen, xver)
        elif xver and (gen, xver) != self._extra_key:  # new parameter sets on the ring
            self._extra_key = (gen, xver)
            extra = self._extradata_for(codec)
            if extra is not None:
                try:
                    self._emit(self.decoder.set_extradata(extra), out)
                except Exception as exc:  # noqa: BLE001 - the in-band parameter sets will do
                    self.throttled.warning(f"extra-{self.stream}", f"{self.stream}: new extradata refused ({exc})")
        assert self.decoder is not None
        self.frames_in += 1
        self._last_meta = meta
        t0 = time.perf_counter()
        pictures = self.decoder.decode(data, pts=item.pts, keyframe=True if key else None, meta=meta)
        if self.observe is not None:
            self.observe(time.perf_counter() - t0)
        self._sync()
        self._emit(pictures, out)

    def _picture(self, item: framebus.Item, out: Callable[[av.VideoFrame, Meta], None]) -> None:
        self.raw = f"{item.format} {item.width}x{item.height}"
        self.codec = None
        meta = Meta(item.pts, item.time_base, item.capture_ns, bool(item.flags & framebus.FLAG_DISCONTINUITY))
        try:
            frame = frame_of(item)
        except Exception as exc:  # noqa: BLE001 - a format FFmpeg does not know
            self.dropped["unsupported"] += 1
            self.throttled.warning(f"raw-{self.stream}", f"stream {self.stream}: cannot take {self.raw} pictures "
                                                         f"({exc})")
            return
        if not item.valid():
            self.dropped["missed"] += 1
            return
        self.frames_in += 1
        self._emit_one(frame, meta, out)

    def _emit(self, pictures: list[Any], out: Callable[[av.VideoFrame, Meta], None]) -> None:
        for d in pictures:
            meta = d.meta if isinstance(d.meta, Meta) else self._last_meta
            self._emit_one(d.frame, meta, out)

    def _emit_one(self, frame: av.VideoFrame, meta: Meta, out: Callable[[av.VideoFrame, Meta], None]) -> None:
        if self._disc:
            meta, self._disc = meta._replace(discontinuity=True), False
        self.pictures += 1
        self.size = (frame.width, frame.height)
        out(frame, meta)

    def _break(self, out: Callable[[av.VideoFrame, Meta], None], why: str, *, lost: bool) -> None:
        """The input broke off: the pictures decoded so far come out (complete: from before the break), the
        gate closes until the next keyframe, and the producer is asked for one when something was lost."""
        if self.decoder is not None:
            pictures = self.decoder.flush()
            self._sync()
            self._emit(pictures, out)
        if lost:
            self.throttled.warning(f"break-{self.stream}", f"stream {self.stream}: {why}; waiting for a keyframe")
            self.ask(why)
        else:
            self.log.info("stream %s: %s; waiting for a keyframe", self.stream, why)

    def ask(self, reason: str) -> None:
        """Ask the source's producer for a keyframe, at most once every ASK_EVERY seconds."""
        now = time.monotonic()
        if now - self._asked_at < ASK_EVERY or not self.consumer.attached:
            return
        self._asked_at = now
        self.asks += 1
        try:
            self.ask_keyframe(self.stream, reason)
        except Exception as exc:  # noqa: BLE001 - a hub that does not answer must not stop the video
            self.throttled.warning(f"ask-{self.stream}", f"keyframe request for {self.stream} failed: {exc}")

    # ------------------------------------------------------------ decoder
    def _open(self, codec: str, out: Callable[[av.VideoFrame, Meta], None]) -> bool:
        if self.decoder is not None:  # the stream changed codec: what the old one holds comes out
            self._emit(self.decoder.flush(), out)
            self._sync()
            self.decoder.close()
            self.decoder = None
        try:
            codec = canonical_codec(codec)
        except ValueError:
            self.dropped["unsupported"] += 1
            self.throttled.warning(f"codec-{self.stream}", f"stream {self.stream}: cannot decode {codec!r}")
            return False
        extra = self._extradata_for(codec)
        try:
            dec = self._decoder(codec, self.hw, extra)
        except DecoderUnavailable as exc:
            self.log.error("%s; decoding %s with hw = auto", exc, self.stream)
            dec = self._decoder(codec, "auto", extra)
        self.decoder, self.codec = dec, codec
        self._synced = (0, {})
        self.log.info("decoding %s from %s with %s", codec, self.stream, dec.backend)
        return True

    def _decoder(self, codec: str, hw: str, extra: bytes | None) -> Decoder:
        try:
            return Decoder(codec, hw=hw, threads=1, extradata=extra)
        except DecoderUnavailable:
            raise
        except Exception as exc:  # extradata the codec refuses: the in-band parameter sets will do
            if not extra:
                raise
            self.log.warning("%s: the stream's extradata was refused (%s); opening without it", self.stream, exc)
            return Decoder(codec, hw=hw, threads=1)

    def _extradata_for(self, codec: str) -> bytes | None:
        extra = self.consumer.extradata()
        if extra is None:
            return None
        try:
            return extra[1] if canonical_codec(extra[0]) == codec else None
        except ValueError:
            return None

    def _sync(self) -> None:
        """The decoder's counters into ours; a decode error or an access unit behind the closed gate asks the
        source for a keyframe (throttled)."""
        d = self.decoder
        if d is None:
            return
        errors, seen = self._synced
        if d.errors != errors:
            self.errors += d.errors - errors
            self.last_error = d.last_error
            self.throttled.warning(f"error-{self.stream}", f"stream {self.stream}: decode error ({d.last_error}); "
                                                           "the picture holds until the next keyframe")
            self.ask("decode error")
        for reason, n in d.dropped.items():
            if n != seen.get(reason, 0):
                self.dropped[reason] += n - seen.get(reason, 0)
                seen[reason] = n
                if reason == "waiting_keyframe":
                    self.ask("waiting for a keyframe")
        self._synced = (d.errors, seen)

    # ------------------------------------------------------------ state
    def check(self, out: Callable[[av.VideoFrame, Meta], None]) -> None:
        """Once in a while: a producer that died is noticed (what the decoder holds comes out)."""
        c = self.consumer
        if c.attached and not c.producer_alive():
            if not self.producer_dead:
                self.producer_dead = True
                self._break(out, "its producer died", lost=False)
        else:
            self.producer_dead = False

    @property
    def waiting_keyframe(self) -> bool:
        return self.decoder is not None and bool(self.decoder.stats()["waiting_keyframe"])

    def state(self) -> str:
        c = self.consumer
        if not c.attached:
            return "waiting for the stream" if self.generation is None else "closed, waiting for it to return"
        if self.producer_dead:
            return "stalled (its producer died)"
        if self.generation is None:
            return "waiting for the first item"
        if self.raw is None and (self.decoder is None or self.waiting_keyframe):
            return "waiting for a keyframe"
        return "running"

    def status(self) -> dict[str, Any]:
        return {"stream": self.stream, "state": self.state(), "codec": self.codec or self.raw or "",
                "decoder": self.decoder.backend if self.decoder is not None else "",
                "size": f"{self.size[0]}x{self.size[1]}" if self.size[0] else "", "frames_in": self.frames_in,
                "pictures": self.pictures, "decode_errors": self.errors, "dropped": dict(self.dropped),
                "keyframe_asks": self.asks, "last_error": self.last_error}

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        self.consumer.close()


# ---------------------------------------------------------------------------------------------- output
SLICE_BYTES = 1100    # H.264 slices that fit one RTP packet ([sip] mtu 1200): a phone that takes packetization-mode
                      # 0 only (single NAL units, no fragments) decodes the bridge's H.264 too; x264 only


def _slices(codec: str, hardware: bool) -> int:
    return SLICE_BYTES if codec == "h264" and not hardware else 0


class Output:
    """An encoder and the stream of the bus it writes (see the module's docstring). `encode(frame, meta)` takes a
    picture of any size and format; `force_keyframe()` makes the next one a keyframe."""

    def __init__(self, stream: str, codec: str, *, prefix: str, kbps: int, gop_s: float, encoder: str, fps: float,
                 log: Any, metrics: MediaMetrics) -> None:
        if codec not in CODECS:
            raise ValueError(f"output codec {codec!r}: use {' or '.join(CODECS)}")
        self.stream, self.codec = check_name("stream", stream), codec
        self.kbps, self.gop_s, self.configured, self.fps = kbps, gop_s, encoder, fps
        self.log, self.m = log, metrics
        metrics.start(stream)
        self.throttled = Throttled(log)
        self.dropped: collections.Counter[str] = collections.Counter()
        self.sink = Sink(stream, prefix, metrics.sink(stream, self.dropped))
        self.enc: Encoder | None = None
        self.choice: encoders.Choice | None = None
        self.params: ParameterSets | None = None
        self.want_key = True
        self.pending_since: float | None = None   # a keyframe asked for, not on the bus yet
        self.last_key_ns = 0                      # capture time of the last keyframe out
        self.gop_ns = round(gop_s * 1e9)
        self._metas: collections.deque[tuple[int, Meta]] = collections.deque(maxlen=64)
        self._origin = self._last_pts90 = -1
        self.frames = self.bytes_out = self.keyframes_out = self.errors = self.reopens = 0
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self.on_keyframe: Callable[[str], None] | None = None

    # ------------------------------------------------------------ encoding
    def encode(self, frame: av.VideoFrame, meta: Meta) -> None:
        w, h = even_size(frame.width, frame.height)
        if w < 2 or h < 2:
            self._drop("error")
            return
        enc = self.enc
        if enc is None or (enc.width, enc.height) != (w, h):
            enc = self._open(w, h)
        if frame.format.name != enc.pix_fmt or (frame.width, frame.height) != (w, h):
            frame = frame.reformat(width=w, height=h, format=enc.pix_fmt)  # swscale: odd size, nv12, yuvj420p
        if self._origin < 0:
            self._origin = meta.capture_ns
        pts90 = max((meta.capture_ns - self._origin) * 9 // 100_000, self._last_pts90 + 1)
        self._last_pts90 = pts90
        key = self.want_key or meta.capture_ns - self.last_key_ns >= self.gop_ns - GOP_SLACK_NS
        frame.time_base = TIME_BASE
        self._metas.append((pts90, meta))
        t0 = time.perf_counter()
        try:
            packets = enc.encode(frame, pts90, key)
        except Exception as exc:  # noqa: BLE001 - FFmpeg's errors have many types: count, reopen, go on
            self.errors += 1
            self.m.encode_errors.labels(self.stream).inc()
            self._drop("error")
            self.throttled.warning(f"encode-{self.stream}", f"{enc.name} failed on a picture for {self.stream}: "
                                                            f"{exc}; reopening it")
            self._close_encoder()
            return
        self.m.encode_seconds.labels(self.stream).observe(time.perf_counter() - t0)
        if key:
            self.want_key = False
        for p in packets:
            self._publish(p)

    def _open(self, w: int, h: int) -> Encoder:
        if self.enc is not None:
            self.log.info("%s: pictures are now %dx%d (were %dx%d): reopening the encoder", self.stream, w, h,
                          self.enc.width, self.enc.height)
            for p in self.enc.flush():
                self._publish(p)
            self._close_encoder()
        choice = encoders.choose(self.configured, w, h, "yuv420p", codec=self.codec)
        try:
            enc = Encoder(choice.name, self.codec, w, h, "yuv420p", kbps=self.kbps, fps=self.fps, gop=self.gop_s,
                          hardware=choice.hardware, slice_bytes=_slices(self.codec, choice.hardware))
        except Exception as exc:  # noqa: BLE001 - a hardware engine that probed fine may refuse the call settings
            if not choice.hardware:
                raise
            self.log.error("encoder %s would not open with the call settings (%s): using software", choice.name, exc)
            choice = encoders.Choice(encoders.SOFTWARE_FOR[self.codec], False, f"{choice.name} failed to open: {exc}")
            enc = Encoder(choice.name, self.codec, w, h, "yuv420p", kbps=self.kbps, fps=self.fps, gop=self.gop_s,
                          hardware=False, slice_bytes=_slices(self.codec, False))
        self.enc, self.choice = enc, choice
        self.params = ParameterSets() if self.codec == "h264" else None
        self._origin = self._last_pts90 = -1
        self._metas.clear()
        self.want_key = True  # an encoder's first picture is a keyframe anyway; say so
        self.reopens += 1
        self.m.reopens.labels(self.stream).inc()
        self.m.hardware.labels(self.stream, choice.name).set(1 if choice.hardware else 0)
        how = "hardware" if choice.hardware else "software"
        self.log.info("%s: encoding %s %dx%d at %d kbit/s in %s with %s%s", self.stream, self.codec, w, h, self.kbps,
                      how, choice.name, f" ({choice.note})" if choice.note else "")
        return enc

    def _close_encoder(self) -> None:
        old, self.enc = self.enc, None
        if old is not None:
            old.close()
            try:
                self.m.hardware.remove(self.stream, old.name)
            except KeyError:
                pass

    def _publish(self, packet: Any) -> None:
        meta: Meta | None = self._metas[-1][1] if self._metas else None
        while self._metas:  # no B-frames: in order; skip pictures the encoder dropped
            pts90, m = self._metas.popleft()
            if pts90 == packet.pts:
                meta = m
                break
        if meta is None or self.enc is None:
            return
        key = bool(packet.is_keyframe)
        data: Any = packet
        if key and self.params is not None:
            before = self.params.annexb
            fixed = self.params.check(packet)
            if fixed is not None:
                data = fixed
            if self.params.annexb != before:  # new parameter sets: for readers that join (sprop, a decoder)
                self.sink.set_extradata(self.params.annexb, "h264")
        try:
            ok = self.sink.encoded(data, self.codec, keyframe=key, pts=meta.pts, time_base=meta.time_base,
                                   capture_ns=meta.capture_ns, width=self.enc.width, height=self.enc.height,
                                   discontinuity=meta.discontinuity)
        except framebus.BusFull as exc:
            self._drop("bus_full")
            self.throttled.warning(f"bus_full-{self.stream}", f"{self.stream}: {exc}; access units dropped")
            self.want_key = True  # what follows must not reference what was lost
            return
        if not ok:
            self.want_key = True
            return
        size = memoryview(data).nbytes
        self.frames += 1
        self.bytes_out += size
        self._window.append((time.monotonic(), size))
        if key:
            self.keyframes_out += 1
            self.last_key_ns = meta.capture_ns
            self.pending_since = None
            if self.on_keyframe is not None:
                self.on_keyframe(self.stream)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.m.dropped.labels(self.stream, reason).inc(n)
        self.dropped[reason] += n

    # ------------------------------------------------------------ keyframes and state
    def force_keyframe(self) -> dict[str, Any]:
        """The next picture encoded is a keyframe. Answered as services/runtime/keyframes.py answers: a request
        while one is pending (asked for less than KEY_EVERY seconds ago, or not on the bus yet: the input is
        quiet) is `throttled`, and still served by the keyframe to come."""
        now = time.monotonic()
        how = "idr" if self.codec == "h264" else "keyframe"
        if self.pending_since is not None and self.want_key:
            return {"made": True, "how": "pending", "throttled": True, "waiting": round(now - self.pending_since, 3)}
        if self.pending_since is not None and now - self.pending_since < KEY_EVERY:
            return {"made": True, "how": "pending", "throttled": True, "waiting": round(now - self.pending_since, 3)}
        self.want_key = True
        self.pending_since = now
        return {"made": True, "how": how, "throttled": False, "waiting": 0.0}

    def kbps_now(self) -> float:
        """Kilobits per second published over the last second."""
        now = time.monotonic()
        while self._window and now - self._window[0][0] > 1.0:
            self._window.popleft()
        return sum(n for _, n in self._window) * 8 / 1000

    def tick(self) -> None:
        self.m.kbps.labels(self.stream).set(self.kbps_now())
        self.sink.heartbeat()

    def status(self) -> dict[str, Any]:
        enc, c = self.enc, self.choice
        return {"out": self.stream, "codec": self.codec, "encoder": c.name if c is not None else "",
                "hardware": bool(c is not None and c.hardware), "encoder_note": c.note if c is not None else "",
                "size": f"{enc.width}x{enc.height}" if enc is not None else "", "frames_out": self.frames,
                "keyframes_out": self.keyframes_out, "bytes_out": self.bytes_out, "kbps": round(self.kbps_now(), 1),
                "target_kbps": self.kbps, "encode_errors": self.errors, "reopens": self.reopens,
                "keyframe_pending": self.pending_since is not None}

    def close(self) -> None:
        if self.enc is not None:
            try:
                for p in self.enc.flush():
                    self._publish(p)
            except Exception:  # noqa: BLE001 - closing: what is left goes with the encoder
                pass
            self._close_encoder()
        self.sink.close()


# ---------------------------------------------------------------------------------------------- wake-up
class Wake:
    """An epoll set over the sources' fds plus an eventfd that keeps it readable while work is left over."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.event, select.EPOLLIN)

    def add(self, fd: int) -> None:
        self.epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def clear(self) -> None:
        try:
            os.eventfd_read(self.event)
        except BlockingIOError:
            pass

    def again(self) -> None:
        os.eventfd_write(self.event, 1)

    def close(self) -> None:
        self.epoll.close()
        os.close(self.event)


# ---------------------------------------------------------------------------------------------- transcoder
class Transcoder:
    """`source` decoded and encoded again as `codec` ("h264" or "vp8") on the stream `out` (module docstring).

    The service: `loop.add_reader(t.fileno(), t.pump)`, `loop.every(1.0, t.tick)` (recommended: while items flow
    pump() does the same once a second; tick() covers a quiet source), `t.keyframe(reason)` from its
    keyframe offer for `out`, `t.close()`. `on_keyframe`: set it to be told (with `out`) when a keyframe goes onto
    the bus (a KeyframeRequests' `keyframe()`). `decoder`: the source's decoder ("off": software, the default;
    "auto": a hardware one when a probe decode works; or a name)."""

    def __init__(self, source: str, out: str, codec: str, *, prefix: str, registry: CollectorRegistry, log: Any,
                 ask_keyframe: Callable[[str, str], None], kbps: int = 1000, gop_s: float = 2.0,
                 encoder: str = "auto", decoder: str = "off") -> None:
        if out == source:
            raise ValueError(f"transcoder: the output {out!r} is its own source")
        self.source, self.out, self.codec = source, out, codec
        self.log = log
        self.m = MediaMetrics.of(registry, "transcode")
        self._wake = Wake()
        decode_s = self.m.decode_seconds.labels(out)
        self.reader: SourceReader | None = None
        self.output: Output | None = None
        try:
            self.output = Output(out, codec, prefix=prefix, kbps=kbps, gop_s=gop_s, encoder=encoder,
                                 fps=NOMINAL_FPS, log=log, metrics=self.m)
            self.reader = SourceReader(source, prefix=prefix, ask_keyframe=ask_keyframe, log=log, decoder=decoder,
                                       observe=decode_s.observe)
        except BaseException:
            self.close()
            raise
        self._wake.add(self.reader.fileno())
        self._seen: dict[str, int] = {}
        self._closed = False
        self._house = time.monotonic()
        self._in_tick = False
        if self.reader.consumer.attached:
            log.info("transcoding %s into %s (%s at %d kbit/s)", source, out, codec, kbps)
        else:
            log.info("waiting for stream %s; will transcode it into %s (%s at %d kbit/s)", source, out, codec, kbps)

    @property
    def on_keyframe(self) -> Callable[[str], None] | None:
        return self.output.on_keyframe if self.output is not None else None

    @on_keyframe.setter
    def on_keyframe(self, callback: Callable[[str], None] | None) -> None:
        if self.output is not None:
            self.output.on_keyframe = callback

    def fileno(self) -> int:
        """Readable when the source has items (or work was left over); the same fd for the object's life."""
        return self._wake.epoll.fileno()

    def pump(self) -> None:
        """Take the items waiting: decode, encode, write. At most BATCH_ITEMS or BATCH_SECONDS of work; the fd
        stays readable when more waits. Never blocks, never raises for bad input."""
        if self._closed or self.reader is None:
            return
        self._wake.clear()
        more = self.reader.read(self._picture, time.monotonic() + BATCH_SECONDS)
        self._sync()
        if more:
            self._wake.again()
        if time.monotonic() - self._house >= HOUSEKEEPING_S and not self._in_tick:
            self.tick()  # while items flow, tick() need not be called by anyone

    def _picture(self, frame: av.VideoFrame, meta: Meta) -> None:
        assert self.output is not None
        self.output.encode(frame, meta)

    def tick(self) -> None:
        """Once a second or so: the output's heartbeat and kbps gauge; a source whose producer died is noticed;
        a source not there yet is looked for (its producer also wakes fileno() when it appears)."""
        if self._closed or self.reader is None or self.output is None:
            return
        self._house = time.monotonic()
        self._in_tick = True
        try:
            self.reader.check(self._picture)
            if not self.reader.consumer.attached:
                self.pump()
        finally:
            self._in_tick = False
        self._sync()
        self.output.tick()

    def _sync(self) -> None:
        """The reader's counters into the metrics."""
        r, s, out = self.reader, self._seen, self.out
        if r is None:
            return
        for name, value, metric in (("in", r.frames_in, self.m.frames_in), ("pictures", r.pictures, self.m.pictures),
                                    ("errors", r.errors, self.m.decode_errors), ("asks", r.asks, self.m.asks)):
            if value != s.get(name, 0):
                metric.labels(out).inc(value - s.get(name, 0))
                s[name] = value
        for reason, n in r.dropped.items():
            key = "dropped:" + reason
            if n != s.get(key, 0):
                self.m.dropped.labels(out, reason).inc(n - s.get(key, 0))
                s[key] = n

    def keyframe(self, reason: str = "") -> dict[str, Any]:
        """The next output picture is an IDR (a VP8 key frame); the answer for the hub's keyframe command."""
        if self.output is None:
            return {"made": False, "reason": "closed", "next_keyframe_in": None}
        self.log.info("keyframe of %s asked for%s", self.out, f" ({reason})" if reason else "")
        return self.output.force_keyframe()

    def status(self) -> dict[str, Any]:
        """source, out, codec, state, encoder, hardware, size, frames in/out, decode errors, dropped, kbps, ..."""
        r, o = self.reader, self.output
        if r is None or o is None:
            return {"source": self.source, "out": self.out, "codec": self.codec, "state": "closed"}
        src, outs = r.status(), o.status()
        dropped = collections.Counter(r.dropped)
        dropped.update(o.dropped)
        return {"source": self.source, "out": self.out, "codec": self.codec, "state": r.state(),
                "source_codec": src["codec"], "decoder": src["decoder"], "source_size": src["size"],
                "encoder": outs["encoder"], "hardware": outs["hardware"], "encoder_note": outs["encoder_note"],
                "size": outs["size"], "frames_in": r.frames_in, "pictures": r.pictures, "frames_out": o.frames,
                "decode_errors": r.errors, "encode_errors": o.errors, "dropped": dict(dropped),
                "kbps": outs["kbps"], "target_kbps": outs["target_kbps"], "keyframes_out": o.keyframes_out,
                "keyframe_asks": r.asks, "keyframe_pending": outs["keyframe_pending"], "reopens": o.reopens,
                "last_error": r.last_error}

    def close(self) -> None:
        """Stop: the output stream is removed, the source let go, the metrics' series dropped."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self.reader is not None:
            self._wake.remove(self.reader.fileno())
            self.reader.close()
        if self.output is not None:
            self.output.close()
        self._wake.close()
        self.m.forget(self.out)
