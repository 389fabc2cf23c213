"""The encode service: a stream of raw pictures -> H.264 or VP8 access units on the stream NAME.

One process per [encoders.NAME] table (`edgeroom service encode NAME`, unit
`edgeroom-encode@NAME`): the mirror of decode. It reads the pictures of its `input`
(a decoded source's NAME-raw, a raw camera's NAME, a vision pipeline's NAME-vision),
fills each into an encoder input frame in one pass (services/encode/pictures.py: the
slot's planes straight into a pooled PyAV frame; a conversion or scaling pass only where
the formats or sizes differ), encodes it (services/encode/encoder.py: constrained
baseline H.264 or realtime VP8, zero latency: the access unit comes out of the same call)
and puts the access unit on NAME (services/capture/sink.py's Sink, as capture does: 64
slots with history, so a reader that joins finds the last keyframe), with the picture's
pts, time base and capture_ns, the keyframe flag and the size.

Which encoder: services/recorder/encoder.py's `choose()` (hw_encode = auto: NVENC, the
Jetson or a V4L2 M2M engine when a real probe encode works, else libx264 / libvpx; a
named one that fails falls back to auto, saying why). The choice is in the status, the
log and edgeroom_encode_hardware{backend}.

Keyframes: the first picture, every `gop` seconds of capture time, the first picture after
the encoder was reopened (the input changed size or format), and on request: the service
offers `stream.keyframe` for NAME (the hub's `keyframe` command, `edgeroom ctl keyframe
NAME`, a call transport's PLI), throttled and repeated by services/runtime/keyframes.py;
the next picture encoded is then an IDR. A picture of the input that encode missed (it
fell a ring behind) needs no keyframe: raw pictures stand alone, the encoder's references
are its own.

Live, not complete: encode reads every picture in order while it keeps up; when more than
MAX_LAG pictures wait it jumps to the newest (the others count as dropped{reason="late"}),
so a picture never leaves more than a few frame intervals after it came.

Bad input never stops it: a missing input (status "waiting for stream"), one that carries
access units rather than pictures (counted as not_pictures), a change of size or format
(the encoder reopened, a new IDR), a dead or closed producer (status says so, the output
stays), an encoder error (counted, the encoder reopened at the next picture).
"""
from __future__ import annotations

import collections
import time
from types import SimpleNamespace
from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge, Histogram

import framebus
from services.capture import book
from services.capture.sink import Sink, SinkMetrics
from services.encode import pictures
from services.encode.spec import EncoderConfig
from services.recorder import encoder as encoders
from services.runtime.keyframes import KeyframeRequests, cannot
from services.runtime.rate import RateMeter
from services.runtime.service import Service

__all__ = ["Encode"]

BATCH_ITEMS = 8         # pictures encoded per loop turn at most...
BATCH_SECONDS = 0.05    # ...or this much time, whichever comes first
MAX_LAG = 4             # pictures waiting beyond this (133 ms at 30 fps): jump to the newest
GOP_SLACK_NS = 5_000_000  # a periodic keyframe is due this early (capture times jitter)
NOMINAL_FPS = 30.0      # the rate the encoder is told when fps = 0 (its pts carry the real pace)


class _Meta(NamedTuple):
    """What a picture hands on to its access unit."""
    pts90: int          # the encoder's pts (1/90000)
    pts: int            # the picture's own pts and time base
    time_base: Any
    capture_ns: int
    discontinuity: bool


class Encode(Service):
    kind = "encode"

    # ------------------------------------------------------------ life cycle
    def setup(self) -> None:
        cfg: EncoderConfig | None = self.config.encoders.get(self.instance)
        if cfg is None:
            raise ValueError(f"no encoder {self.instance!r} in [encoders] (encoders: "
                             f"{', '.join(self.config.encoders) or 'none'})")
        self.cfg = cfg
        self.stream = str(self.instance)
        self.input = cfg.input
        if self.input == self.stream:
            raise ValueError(f"encoders.{self.stream}.input: {self.input!r} is the encoder's own output stream")
        if self.stream in book.effective(self.config):
            raise ValueError(f"encoder {self.stream!r}: a source of the same name puts its own stream "
                             f"{self.stream!r} on the bus; rename the encoder")
        self.prefix = self.config.bus.prefix
        self.codec = cfg.codec
        self.gop_ns = round(cfg.gop * 1e9)
        self.cap_ns = round(1e9 / cfg.fps) if cfg.fps else 0
        # the encoder and what feeds it, made at the first picture and again when the input changes
        self.encoder: Any = None            # services.encode.encoder.Encoder
        self.choice: encoders.Choice | None = None
        self.pool: pictures.FramePool | None = None
        self.filler: pictures.Filler | None = None
        self.geometry: tuple[str, int, int] | None = None   # the input's (format, width, height)
        self.params: Any = None             # ParameterSets (H.264)
        self._metas: collections.deque[_Meta] = collections.deque(maxlen=64)
        self._pts_origin = -1               # capture time of the encoder's first picture
        self._last_pts90 = -1
        self._last_key_ns = 0               # capture time of the last keyframe out
        self._want_key = False              # a request: the next picture is an IDR
        self._cap_origin: int | None = None
        self._cap_slot = -1
        # the input
        self.generation: int | None = None
        self._missed_seen = self._skipped_seen = 0
        self._reading = False
        self._disc = False                  # flag the next access unit (the input restarted or jumped)
        self._producer_dead = False
        self._again = False
        self.not_pictures: str | None = None  # "h264 access units" when the input carries no pictures
        self.encoded = self.published_bytes = 0
        self.meter, self.bits = RateMeter(), RateMeter()
        self.dropped: dict[str, int] = {}
        self._metrics()
        self.sink = self.own(Sink(self.stream, self.prefix, self._sink_metrics()))
        self.requests = KeyframeRequests(self.registry, self.loop, self._make_keyframe)
        self.offer_keyframes(self._keyframe_asked)
        self.consumer = self.own(framebus.Consumer.attach(self.input, prefix=self.prefix, missing_ok=True,
                                                          start="next"))
        self.on_stop(self._close_encoder)
        self.loop.add_reader(self.consumer.fileno(), self._readable)
        self.loop.every(1.0, self._tick)
        what = (f"{self.codec} at {cfg.bitrate} kbit/s, {self._size_text()}, "
                f"{f'at most {cfg.fps:g} fps' if cfg.fps else 'at the input pace'}, a keyframe every {cfg.gop:g} s")
        if self.consumer.attached:
            self.generation = self.consumer.generation
            self.log.info("encoding %s into %s: %s", self.input, self.stream, what)
        else:
            self.log.info("waiting for stream %s; will encode it into %s: %s", self.input, self.stream, what)

    def _size_text(self) -> str:
        w, h = self.cfg.width, self.cfg.height
        if w and h:
            return f"{w}x{h}"
        if w or h:
            return f"{w or 'auto'}x{h or 'auto'} (the input's aspect ratio)"
        return "the input's size"

    def _close_encoder(self) -> None:
        self.loop.remove_reader(self.consumer.fileno())
        if self.encoder is not None:
            self._drain(self.encoder.flush())
            self.encoder.close()
            self.encoder = None

    def _metrics(self) -> None:
        r, s = self.registry, self.stream
        self.m_in = Counter("edgeroom_encode_frames_in", "Pictures handed to the encoder.", ["stream"],
                            registry=r).labels(s)
        self.m_out = Counter("edgeroom_encode_frames_out", "Access units published on NAME.", ["stream"],
                             registry=r).labels(s)
        self.m_bytes = Counter("edgeroom_encode_bytes", "Bytes of access units published on NAME.", ["stream"],
                               registry=r).labels(s)
        self.m_keyframes = Counter("edgeroom_encode_keyframes", "Keyframes (IDR) published on NAME.", ["stream"],
                                   registry=r).labels(s)
        self.m_dropped = Counter("edgeroom_encode_dropped_frames", "Input pictures not encoded, or access units not "
                                 "published, by reason.", ["stream", "reason"], registry=r)
        self.m_errors = Counter("edgeroom_encode_errors", "Encoder errors (the encoder is reopened).", ["stream"],
                                registry=r).labels(s)
        self.m_reopens = Counter("edgeroom_encode_reopens", "Encoder (re)opened: the first picture, the input's "
                                 "size or format changed, an error.", ["stream"], registry=r).labels(s)
        self.m_disc = Counter("edgeroom_encode_discontinuities", "Access units marked FLAG_DISCONTINUITY (the "
                              "input restarted or jumped).", ["stream"], registry=r).labels(s)
        self.m_fps = Gauge("edgeroom_encode_fps", "Access units published per second over the last second.",
                           ["stream"], registry=r).labels(s)
        self.m_kbps = Gauge("edgeroom_encode_kbps", "Kilobits per second published over the last second.",
                            ["stream"], registry=r).labels(s)
        self.m_seconds = Histogram("edgeroom_encode_seconds", "Per picture: filling the encoder's frame and "
                                   "encoding it.", ["stream"], registry=r,
                                   buckets=(.001, .002, .005, .01, .02, .033, .05, .1, .25)).labels(s)
        self.m_latency = Histogram("edgeroom_encode_capture_to_bus_seconds", "From the picture's capture to its "
                                   "access unit committed on NAME.", ["stream"], registry=r,
                                   buckets=(.002, .005, .01, .02, .033, .05, .1, .2, .5, 1.0)).labels(s)
        self.m_hardware = Gauge("edgeroom_encode_hardware", "1 when the encoder in use is a hardware encoder, 0 "
                                "for software; the backend label names it.", ["stream", "backend"], registry=r)

    def _sink_metrics(self) -> SinkMetrics:
        """The Sink's counters are encode's own (its dropped labels(reason) carry the stream too)."""
        dropped = SimpleNamespace(labels=lambda reason: self._dropped_child(reason))
        nothing = SimpleNamespace(inc=lambda n=1: None)
        return SinkMetrics(frames=self.m_out, bytes=self.m_bytes, keyframes=self.m_keyframes, latency=self.m_latency,
                           dropped=dropped, audio_chunks=nothing, rebases=self.m_disc)

    def _dropped_child(self, reason: str) -> Any:
        child = self.m_dropped.labels(self.stream, reason)
        return SimpleNamespace(inc=lambda n=1: self._count(reason, n, child))

    def _count(self, reason: str, n: int, child: Any = None) -> None:
        (child or self.m_dropped.labels(self.stream, reason)).inc(n)
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    # ------------------------------------------------------------ keyframe requests
    def _keyframe_asked(self, stream: str, reason: str) -> dict[str, Any]:
        if stream != self.stream:
            return cannot(f"{self.id} produces {self.stream}, not {stream}")
        self.throttled.info("keyframe", f"keyframe of {stream} asked for{f' ({reason})' if reason else ''}")
        return self.requests.request(stream, reason)

    def _make_keyframe(self, _stream: str) -> str:
        self._want_key = True  # the next picture encoded is an IDR (a key frame in VP8)
        return "idr" if self.codec == "h264" else "keyframe"

    # ------------------------------------------------------------ input
    def _readable(self) -> None:
        """The input has news: encode a bounded batch, then come back on the next turn."""
        self._again = False
        deadline = time.monotonic() + BATCH_SECONDS
        for _ in range(BATCH_ITEMS):
            # live: behind by more than MAX_LAG pictures, the newest is what matters
            item = self.consumer.latest() if self.consumer.lag > MAX_LAG else self.consumer.poll()
            if item is None:
                self._check_lost()
                return
            self._item(item)
            if time.monotonic() >= deadline:
                break
        self._again = True  # more may wait, its wake-up byte already drained: after the timers
        self.loop.call_later(0, self._continue)

    def _continue(self) -> None:
        if self._again:
            self._readable()

    def _check_lost(self) -> None:
        """Pictures the consumer lost (overwritten: missed) or jumped over (late) since the last look."""
        missed = self.consumer.missed - self._missed_seen
        skipped = self.consumer.skipped - self._skipped_seen
        self._missed_seen, self._skipped_seen = self.consumer.missed, self.consumer.skipped
        if not self._reading:
            return  # what the input sent before encode read it is not encode's loss
        if missed:
            self._count("missed", missed)
            self.throttled.warning("missed", f"input {self.input}: missed {missed} picture(s): encode fell behind")
        if skipped:
            self._count("late", skipped)
            self.throttled.info("late", f"input {self.input}: {skipped} picture(s) skipped to stay live")

    def _item(self, item: framebus.Item) -> None:
        self._check_lost()
        self._reading = True
        if item.generation != self.generation:
            if self.generation is not None:
                self.log.info("input %s: a new producer (generation %d, was %d)", self.input, item.generation,
                              self.generation)
                self._disc = True
            self.generation = item.generation
            self._producer_dead = False
        if item.kind != "video":
            if self.not_pictures is None:
                self.log.warning("input %s carries %s, not pictures: nothing to encode (encode reads raw pictures: "
                                 "a decoded source's NAME-raw, a raw camera's NAME, NAME-vision)", self.input,
                                 self._what(item))
            self.not_pictures = self._what(item)
            self._count("not_pictures", 1)
            return
        self.not_pictures = None
        capture_ns = item.capture_ns
        if item.flags & framebus.FLAG_DISCONTINUITY:
            self._disc = True
        if self.cap_ns and not self._due(capture_ns):
            self._count("fps", 1)
            return
        geometry = (item.format or "", item.width, item.height)
        if geometry != self.geometry and not self._configure(*geometry):
            self._count("error", 1)
            return
        assert self.pool is not None and self.filler is not None
        t0 = time.perf_counter()
        frame = self.pool.next()
        self.filler(item.planes(), frame)
        if not item.valid():  # overwritten while it was copied: as good as missed
            self._count("missed", 1)
            return
        if self._pts_origin < 0:  # the encoder's first picture: its timeline starts at 0
            self._pts_origin = capture_ns
        pts90 = max((capture_ns - self._pts_origin) * 9 // 100_000, self._last_pts90 + 1)
        self._last_pts90 = pts90
        key = self._want_key or capture_ns - self._last_key_ns >= self.gop_ns - GOP_SLACK_NS
        self._metas.append(_Meta(pts90, item.pts, item.time_base, capture_ns, self._disc))
        self._disc = False
        try:
            packets = self.encoder.encode(frame.av, pts90, key)
        except Exception as exc:  # noqa: BLE001 - FFmpeg's errors have many types: count, reopen, go on
            self.m_errors.inc()
            self._count("error", 1)
            self.throttled.warning("encode", f"{self.encoder.name} failed on a picture of {self.input}: {exc}; "
                                             "reopening it")
            self._drop_encoder()  # the next picture opens a new one (an IDR)
            return
        self.m_in.inc()
        if key:
            self._want_key = False
        self._drain(packets)
        self.m_seconds.observe(time.perf_counter() - t0)

    @staticmethod
    def _what(item: framebus.Item) -> str:
        return f"{item.codec} access units" if item.kind == "encoded" else f"{item.kind} items"

    def _due(self, capture_ns: int) -> bool:
        """fps cap: at most one picture per 1/fps slot of capture time (the first in each)."""
        if self._cap_origin is None or capture_ns < self._cap_origin + self._cap_slot * self.cap_ns - 1_000_000_000:
            self._cap_origin, self._cap_slot = capture_ns, -1  # the first picture, or the clock went back
        slot = (capture_ns - self._cap_origin) // self.cap_ns
        if slot <= self._cap_slot:
            return False
        self._cap_slot = slot
        return True

    # ------------------------------------------------------------ the encoder
    def _configure(self, fmt: str, width: int, height: int) -> bool:
        """Ready the encoder for pictures of this geometry: a new filler, and a new encoder when the
        encoded size or format changes (its first picture is an IDR). False if it cannot (counted)."""
        from services.encode.encoder import Encoder, ParameterSets

        if fmt not in pictures.INPUT_FORMATS or width < 2 or height < 2:
            self.throttled.warning("format", f"input {self.input}: cannot encode {fmt} {width}x{height} pictures")
            return False
        out_w, out_h = pictures.output_size(width, height, self.cfg.width, self.cfg.height)
        pix = "nv12" if fmt == "nv12" and self._takes(self._choose(out_w, out_h).name, "nv12") else "yuv420p"
        if self.geometry is not None:
            self.log.info("input %s: pictures are now %s %dx%d (were %s %dx%d)", self.input, fmt, width, height,
                          *self.geometry)
        old = self.encoder
        if old is not None and (old.width, old.height, old.pix_fmt) == (out_w, out_h, pix):
            self.filler = pictures.Filler(fmt, width, height, self.pool)  # same output: the same encoder goes on
            self.geometry = (fmt, width, height)
            return True
        if old is not None:
            self._drain(old.flush())
            self._drop_encoder()
        choice = self._choose(out_w, out_h, pix)
        cfg = self.cfg
        fps = cfg.fps or NOMINAL_FPS
        try:
            enc = Encoder(choice.name, self.codec, out_w, out_h, pix, kbps=cfg.bitrate, fps=fps, gop=cfg.gop,
                          hardware=choice.hardware, threads=cfg.threads, slice_bytes=cfg.slice_bytes)
        except Exception as exc:  # noqa: BLE001 - a hardware engine that probed fine may refuse the call settings
            if not choice.hardware:
                raise
            self.log.error("encoder %s would not open with the call settings (%s): using software", choice.name, exc)
            choice = encoders.Choice(encoders.SOFTWARE_FOR[self.codec], False, f"{choice.name} failed to open: {exc}")
            enc = Encoder(choice.name, self.codec, out_w, out_h, pix, kbps=cfg.bitrate, fps=fps, gop=cfg.gop,
                          hardware=False, threads=cfg.threads, slice_bytes=cfg.slice_bytes)
        self.encoder, self.choice = enc, choice
        self.params = ParameterSets() if self.codec == "h264" else None
        self.pool = pictures.FramePool(pix, out_w, out_h, enc.ctx.time_base)
        self.filler = pictures.Filler(fmt, width, height, self.pool)
        self.geometry = (fmt, width, height)
        self._pts_origin, self._last_pts90 = -1, -1
        self._metas.clear()
        self._want_key = True  # an encoder's first picture is a keyframe anyway; say so
        self.m_reopens.inc()
        self.m_hardware.labels(self.stream, choice.name).set(1 if choice.hardware else 0)
        how = "hardware" if choice.hardware else "software"
        why = f" ({choice.note})" if choice.note else f" (hw_encode = {self.cfg.hw_encode})"
        self.log.info("encoding %s into %s in %s with %s%s: %s, %s at %d kbit/s", self.input, self.stream, how,
                      choice.name, why, pictures.describe_fill(self.filler, self.pool), self.codec, cfg.bitrate)
        return True

    def _drop_encoder(self) -> None:
        """Close the encoder; the next picture opens a new one (_configure)."""
        old, self.encoder, self.geometry = self.encoder, None, None
        if old is not None:
            old.close()
            self.m_hardware.remove(self.stream, old.name)

    def _choose(self, width: int, height: int, pix: str = "yuv420p") -> encoders.Choice:
        # slices cut to a size: x264's slice-max-size (no hardware encoder here takes an exact byte bound)
        return encoders.choose("off" if self.cfg.slice_bytes else self.cfg.hw_encode, width, height, pix,
                               codec=self.codec)

    @staticmethod
    def _takes(name: str, pix: str) -> bool:
        import av
        formats = av.codec.Codec(name, "w").video_formats or ()
        return pix in {f.name for f in formats}

    def _drain(self, packets: list) -> None:
        for p in packets:
            self._publish(p)

    def _publish(self, packet: Any) -> None:
        meta = self._metas[-1] if self._metas else None
        while self._metas:  # no B-frames: in order; skip pictures the encoder dropped
            m = self._metas.popleft()
            if m.pts90 == packet.pts:
                meta = m
                break
        if meta is None:
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
        enc = self.encoder
        try:
            ok = self.sink.encoded(data, self.codec, keyframe=key, pts=meta.pts, time_base=meta.time_base,
                                   capture_ns=meta.capture_ns, width=enc.width, height=enc.height,
                                   discontinuity=meta.discontinuity)
        except framebus.BusFull as exc:
            self._count("bus_full", 1)
            self.throttled.warning("bus_full", f"{self.stream}: {exc}; access units dropped")
            self._want_key = True  # what follows must not reference what was lost
            return
        if not ok:
            self._want_key = True
            return
        self.encoded += 1
        self.published_bytes += len(data) if isinstance(data, bytes) else data.size
        if key:
            self._last_key_ns = meta.capture_ns
            self.requests.keyframe(self.stream)

    # ------------------------------------------------------------ once a second
    def _tick(self) -> None:
        self.m_fps.set(self.meter.update(self.encoded))
        self.m_kbps.set(self.bits.update(self.published_bytes * 8) / 1000)
        self.sink.heartbeat()  # the output stays alive while the input is quiet
        if not self.consumer.attached:
            self._readable()  # look for the input (its producer also wakes us when it appears)
        elif not self.consumer.producer_alive():
            if not self._producer_dead:
                self._producer_dead = True
                self.log.warning("input %s: its producer died; waiting for a new one", self.input)
        elif self._producer_dead:
            self._producer_dead = False

    def describe(self) -> dict:
        info: dict[str, Any] = {"rate": round(self.meter.rate, 2), "streams": self.sink.streams(), "sessions": []}
        if self.not_pictures is not None:
            info["status"] = (f"{self.input} carries {self.not_pictures}, not pictures: nothing to encode "
                              "(encode reads raw pictures)")
            return info
        if self.generation is None:
            info["status"] = f"waiting for stream {self.input}"
            return info
        if self.encoder is None or self.choice is None:
            info["status"] = f"waiting for the first picture on {self.input}"
            return info
        c, e = self.choice, self.encoder
        how = f"({'hardware' if c.hardware else 'software'}: {c.name}"
        how += f", {self.cfg.hw_encode} unusable)" if c.note and self.cfg.hw_encode not in ("auto", "off") else ")"
        status = (f"{self.input} -> {self.codec} {e.width}x{e.height} at {self.meter.rate:.1f} fps, "
                  f"{self.bits.rate / 1000:.0f} kbit/s {how}")
        if self._producer_dead:
            status = f"input {self.input} stalled (its producer died); {status}"
        elif not self.consumer.attached:
            status = f"input {self.input} closed, waiting for it to return; {status}"
        info["status"] = status
        return info
