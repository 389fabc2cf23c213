"""The decode service: one encoded source's stream NAME -> decoded pictures on NAME-raw.

One process per source (`edgeroom service decode NAME`, unit `edgeroom-decode@NAME`),
run by the catalog for every source whose `wants_decode()` is true. It reads the access
units capture@NAME puts on the bus stream NAME, decodes them with services.decode.Decoder
(hardware when the probe finds a decoder that works, else software; keyframe gate;
whole AUs or one NAL per item) and publishes every picture on NAME-raw in the source's
`pixel_format`, with one copy: FFmpeg's planes straight into a loaned bus slot.

Each picture keeps its access unit's pts, time base and capture_ns, so the latency from
capture to a decoded picture is measurable anywhere on the box (item.publish_ns -
item.capture_ns on NAME-raw). FLAG_DISCONTINUITY on an input item (capture rebased its
timestamps), or a new generation of NAME (capture restarted), marks the first picture
published after it.

Never a silent loss: when the consumer's `missed` grows (decode fell more than a ring
behind) or an item was torn while it was copied, the items lost are counted as
dropped{reason="missed"}. Then, and also when the producer of NAME died, closed the ring
or was replaced (a new generation), or an item is marked FLAG_CORRUPT (the demuxer saw
damage or loss), the decoder is flushed: the pictures of the access units it already has
(all from before the break) are published, and its keyframe gate closes, so nothing that
would reference a lost picture is ever published (no grey smear). A FLAG_CORRUPT item is
still decoded: if it is a keyframe it opens the gate again (damage inside it is caught by
the decoder's own checks); if not, it waits behind the gate like those after it.

Everything runs on the service's loop (so its watchdog reflects decode health); one loop
turn decodes at most BATCH_ITEMS items or BATCH_SECONDS of work, then lets the timers
(heartbeats, watchdog) run before it goes on. docs/decode.md has the details.
"""
from __future__ import annotations

import time
from fractions import Fraction
from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge, Histogram

import framebus
from framebus.formats import picture_geometry
from services.capture.sink import RAW_SLOTS
from services.decode import spec as decode_spec
from services.decode.decoder import Decoded, Decoder, DecoderUnavailable, canonical_codec, publish_frame
from services.runtime.rate import RateMeter
from services.runtime.service import Service
from services.runtime.streams import raw_stream

__all__ = ["Decode"]

BATCH_ITEMS = 16        # items decoded per loop turn at most...
BATCH_SECONDS = 0.05    # ...or this much time, whichever comes first
CATCH_UP_ITEMS = 64     # a decode that joins a running stream decodes at most this many of the ring's items
RING_RETRY_S = 1.0      # after /dev/shm was full, try to make the output ring again this much later


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class _Meta(NamedTuple):
    """What an access unit hands on to its picture (rides through FFmpeg with the packet)."""
    pts: int
    time_base: Fraction
    capture_ns: int
    generation: int
    seq: int


class Decode(Service):
    kind = "decode"

    # ------------------------------------------------------------ life cycle
    def setup(self) -> None:
        self.source = decode_spec.lookup(self.config, self.instance)  # [sources.NAME], or an [rtp.NAME] call
        if not hasattr(self.source, "pixel_format"):  # a kind without decode keys (webcam, screen)
            raise ValueError(f"source {self.instance!r} is a {self.source.kind} source: its pictures go on the bus "
                             "as they are, there is nothing to decode")
        self.stream = self.instance
        self.out_stream = raw_stream(self.instance)
        self.prefix = self.config.bus.prefix
        self.fmt = self.source.pixel_format
        self.decoder: Decoder | None = None
        self.codec: str | None = None
        self.backend_note = ""          # why the configured decoder is not the one in use
        self.producer: framebus.Producer | None = None
        self.width = self.height = 0
        self._ring_retry_at = 0.0
        self.raw_input: str | None = None  # "rgb24 1280x720" when NAME carries pictures
        self.generation: int | None = None
        self._missed_seen = 0
        self._reading = False  # an item was read: from now on, every item missed counts
        self._extra_key: tuple[int, int] | None = None
        self._disc_from: tuple[int, int] | None = None  # (generation, seq): flag the first picture from there
        self._closed_flushed = False
        self._producer_dead = False
        self._again = False
        self.published = 0
        self.meter = RateMeter()
        self.dropped: dict[str, int] = {}
        self._metrics()
        if not self.source.wants_decode():
            self.log.info("source %s is %s (%s): decode@%s has nothing to do unless the stream carries access "
                          "units", self.stream, self.source.kind, self.source.target(), self.stream)
        # "oldest": whatever the ring still holds (a file's first frames; the last keyframe, sooner), but
        # not more than the last CATCH_UP_ITEMS (what the rings held before they kept seconds for a
        # recorder's sake): a restarted decode would publish them all, late, in a burst
        self.consumer = self.own(framebus.Consumer.attach(self.stream, prefix=self.prefix, missing_ok=True,
                                                          start="oldest"))
        self.on_stop(self._close_outputs)
        self.loop.add_reader(self.consumer.fileno(), self._readable)
        self.loop.every(1.0, self._tick)
        if self.consumer.attached:
            self.generation = self.consumer.generation
            self.log.info("reading %s (generation %d), publishing %s pictures on %s", self.stream,
                          self.generation, self.fmt, self.out_stream)
        else:
            self.log.info("waiting for stream %s; will publish %s pictures on %s", self.stream, self.fmt,
                          self.out_stream)

    def _close_outputs(self) -> None:
        """The ring and the decoder made since setup (either may not exist yet)."""
        self.loop.remove_reader(self.consumer.fileno())
        if self.producer is not None:
            self.producer.close()
            self.producer = None
        if self.decoder is not None:
            self.decoder.close()

    def _metrics(self) -> None:
        r, s = self.registry, self.stream
        self.m_in = Counter("edgeroom_decode_frames_in", "Access units handed to the decoder.", ["stream"],
                            registry=r).labels(s)
        self.m_out = Counter("edgeroom_decode_frames_out", "Pictures published on NAME-raw.", ["stream"],
                             registry=r).labels(s)
        self.m_dropped = Counter("edgeroom_decode_dropped_frames", "Access units or pictures not published, by reason.",
                                 ["stream", "reason"], registry=r)
        self.m_errors = Counter("edgeroom_decode_errors", "Decode errors (bad data, concealed pictures).", ["stream"],
                                registry=r).labels(s)
        self.m_fps = Gauge("edgeroom_decode_fps", "Pictures published per second over the last second.", ["stream"],
                           registry=r).labels(s)
        self.m_decode_s = Histogram("edgeroom_decode_seconds", "Time spent in decode() per access unit.", ["stream"],
                                    registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25)).labels(s)
        self.m_latency = Histogram("edgeroom_decode_capture_to_raw_seconds",
                                   "From the access unit's capture to its picture on NAME-raw.", ["stream"], registry=r,
                                   buckets=(.002, .005, .01, .02, .033, .05, .1, .2, .5, 1.0)).labels(s)
        self.m_hardware = Gauge("edgeroom_decode_hardware", "1 when the decoder in use is a hardware decoder, 0 for "
                                "software; the backend label names it.", ["stream", "backend"], registry=r)
        self._synced = {"in": 0, "errors": 0, "dropped": {}}

    # ------------------------------------------------------------ input
    def _readable(self) -> None:
        """The stream has news: decode a bounded batch, then come back on the next turn."""
        self._again = False
        deadline = time.monotonic() + BATCH_SECONDS
        for _ in range(BATCH_ITEMS):
            item = self.consumer.poll()
            if item is None:
                self._idle()
                return
            self._item(item)
            if time.monotonic() >= deadline:
                break
        # More may be waiting, and its wake-up byte may already be drained: come back on the
        # next turn, after the due timers (heartbeat, watchdog ping) have run.
        self._again = True
        self.loop.call_later(0, self._continue)

    def _continue(self) -> None:
        if self._again:
            self._readable()

    def _idle(self) -> None:
        """Nothing more to read now. A stream whose producer closed it: flush the decoder."""
        missed = self._check_missed()  # items overwritten while we looked for the next one
        if missed:
            self._lost(missed, f"missed {missed} access unit(s): decode fell behind")
        if not self.consumer.attached and self.generation is not None and not self._closed_flushed:
            self._closed_flushed = True  # the end of the stream: what the decoder holds comes out
            self._lost(0, "closed by its producer")

    def _check_missed(self) -> int:
        """Items the consumer lost since the last look. Before the first item read, none count:
        what a stream sent before decode came is not decode's loss."""
        missed = self.consumer.missed - self._missed_seen
        self._missed_seen = self.consumer.missed
        return missed if self._reading else 0

    def _item(self, item: framebus.Item) -> None:
        if not self._reading and self.consumer.lag >= CATCH_UP_ITEMS:  # history from before decode came
            self._missed_seen = self.consumer.missed
            return
        missed = self._check_missed()
        self._reading = True
        gen = item.generation
        new_gen = gen != self.generation
        if new_gen:
            if self.generation is not None:  # capture restarted: its timeline starts again
                self._lost(missed, f"new producer generation {gen} (was {self.generation})")
                missed = 0
                self._disc_from = (gen, item.seq)
            self.generation = gen
            self._closed_flushed = self._producer_dead = False
        if item.kind != "encoded":
            if self.raw_input is None:
                self.log.info("stream %s carries %s pictures, not access units: nothing to decode", self.stream,
                              item.kind)
            self.raw_input = f"{item.format} {item.width}x{item.height}" if item.kind == "video" else item.kind
            return
        self.raw_input = None
        # metadata first (read consistently when the item was taken), then one copy of the AU
        codec, key, flags = item.codec, item.keyframe, item.flags
        meta = _Meta(item.pts, item.time_base, item.capture_ns, gen, item.seq)
        xver = item.extradata_version
        data = item.array.tobytes()
        if not item.valid():  # overwritten while we copied it: as good as missed
            self._lost(missed + 1, f"access unit {item.seq} overwritten while read")
            return
        if missed:
            self._lost(missed, f"missed {missed} access unit(s): decode fell behind")
        if flags & framebus.FLAG_CORRUPT:  # damaged, or data before it was lost: trust nothing before it
            self._lost(0, f"access unit {item.seq} is marked damaged (FLAG_CORRUPT)", warn=True)
        if flags & framebus.FLAG_DISCONTINUITY:
            self._disc_from = (gen, item.seq)
        if self.decoder is None or codec != self.codec:
            self._open_decoder(codec)
            self._extra_key = (gen, xver)
        elif xver and (gen, xver) != self._extra_key:  # new parameter sets on the ring (or a new ring)
            self._extra_key = (gen, xver)
            extra = self._extradata_for(self.codec)
            if extra is not None:
                try:  # reopens only if the bytes changed; the pictures inside come out
                    self._publish_all(self.decoder.set_extradata(extra))
                except Exception as exc:
                    self.throttled.warning("extradata", f"{self.stream}: new extradata refused ({exc}); "
                                                        "keeping the in-band parameter sets")
        t0 = time.perf_counter()
        out = self.decoder.decode(data, pts=item.pts, keyframe=True if key else None, meta=meta)
        self.m_decode_s.observe(time.perf_counter() - t0)
        self._sync()
        self._publish_all(out)

    def _lost(self, missed: int, why: str, warn: bool = False) -> None:
        """The input broke off (items missed, a torn item, the producer died or was replaced):
        publish the pictures of the access units decoded so far (complete: they came before the
        break), close the keyframe gate so nothing that references what was lost is published,
        and count the items that never reached the decoder."""
        if self.decoder is not None:
            out = self.decoder.flush()
            self._sync()
            self._publish_all(out)
        if missed:
            self._count("missed", missed)
        if missed or warn:  # can recur: at most once a second
            self.throttled.warning("missed" if missed else "break",
                                   f"stream {self.stream}: {why}; waiting for the next keyframe")
        else:
            self.log.info("stream %s: %s; waiting for the next keyframe", self.stream, why)
        if self.consumer.attached and self.consumer.producer_alive():
            # the producer may make one sooner than its next is due (its own encoder, a call's peer);
            # it throttles many requests into one (services/runtime/keyframes.py)
            self.request_keyframe(self.stream, why)

    # ------------------------------------------------------------ decoder
    def _open_decoder(self, codec: str) -> None:
        if self.decoder is not None:  # the stream changed codec: what the old one holds is published
            self._publish_all(self.decoder.flush())
            self._sync()
            self.decoder.close()
            self.m_hardware.remove(self.stream, self.decoder.backend)
        hw, threads = self.source.hw_decode, self.source.decode_threads
        extradata = self._extradata_for(codec)
        self.backend_note = ""
        try:
            dec = self._decoder(codec, hw, threads, extradata)
        except DecoderUnavailable as exc:
            self.log.error("%s; falling back to hw_decode = \"auto\"", exc)
            self.backend_note = f", {hw} unusable"
            dec = self._decoder(codec, "auto", threads, extradata)
        self.decoder, self.codec = dec, codec
        self._synced = {"in": 0, "errors": 0, "dropped": {}}
        self.m_hardware.labels(self.stream, dec.backend).set(1 if dec.hardware else 0)
        how = "hardware" if dec.hardware else "software"
        if self.backend_note:
            why = f" ({hw} unusable)"
        elif hw == "auto":
            why = "" if dec.hardware else " (no hardware decoder works here)"
        else:
            why = f" (hw_decode = {hw})"
        self.log.info("decoding %s from %s in %s with %s%s, %s pictures on %s", codec, self.stream, how, dec.backend,
                      why, self.fmt, self.out_stream)

    def _decoder(self, codec: str, hw: str, threads: int, extradata: bytes | None) -> Decoder:
        try:
            return Decoder(codec, hw=hw, threads=threads, extradata=extradata)
        except DecoderUnavailable:
            raise
        except Exception as exc:  # extradata the codec refuses: the in-band parameter sets will do
            if not extradata:
                raise
            self.log.warning("%s: the stream's extradata was refused (%s); opening without it", self.stream, exc)
            return Decoder(codec, hw=hw, threads=threads)

    def _extradata_for(self, codec: str) -> bytes | None:
        """The ring's extradata, if it is for `codec`."""
        extra = self.consumer.extradata()
        if extra is None:
            return None
        try:
            return extra[1] if canonical_codec(extra[0]) == codec else None
        except ValueError:
            return None

    def _sync(self) -> None:
        """Carry the decoder's counters over to the metrics."""
        d, s = self.decoder, self._synced
        if d is None:
            return
        if d.frames_in != s["in"]:
            self.m_in.inc(d.frames_in - s["in"])
            s["in"] = d.frames_in
        if d.errors != s["errors"]:
            self.m_errors.inc(d.errors - s["errors"])
            s["errors"] = d.errors
        seen = s["dropped"]
        for reason, n in d.dropped.items():
            if n != seen.get(reason, 0):
                self._count(reason, n - seen.get(reason, 0))
                seen[reason] = n

    def _count(self, reason: str, n: int) -> None:
        self.m_dropped.labels(self.stream, reason).inc(n)
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    # ------------------------------------------------------------ output
    def _publish_all(self, out: list[Decoded]) -> None:
        for d in out:
            self._publish(d)

    def _publish(self, d: Decoded) -> None:
        f = d.frame
        meta: _Meta | Any = d.meta
        if self.producer is None or (f.width, f.height) != (self.width, self.height):
            if not self._new_ring(f.width, f.height):
                self._count("bus_full", 1)
                return
        flags = 0
        if self._disc_from is not None and isinstance(meta, _Meta) and (meta.generation, meta.seq) >= self._disc_from:
            flags = framebus.FLAG_DISCONTINUITY
            self._disc_from = None
        if isinstance(meta, _Meta):
            pts = d.pts if d.pts is not None else meta.pts
            publish_frame(self.producer, f, self.fmt, pts=pts, time_base=meta.time_base, capture_ns=meta.capture_ns,
                          flags=flags)
            self.m_latency.observe((_now_ns() - meta.capture_ns) / 1e9)
        else:  # no meta came through (cannot happen with copy_opaque; never drop a good picture for it)
            publish_frame(self.producer, f, self.fmt, flags=flags)
        self.published += 1
        self.m_out.inc()

    def _new_ring(self, width: int, height: int) -> bool:
        """(Re)make NAME-raw for pictures of this size; False if /dev/shm has no room (retried later)."""
        now = time.monotonic()
        if self.producer is None and now < self._ring_retry_at:
            return False
        if self.producer is not None:
            self.log.info("%s: pictures are now %dx%d (were %dx%d): new ring", self.out_stream, width, height,
                          self.width, self.height)
            self.producer.close()
            self.producer = None
        size = picture_geometry(self.fmt, width, height).size
        try:
            self.producer = framebus.Producer.create(self.out_stream, "video", payload=size, slots=RAW_SLOTS,
                                                     prefix=self.prefix)
        except framebus.BusFull as exc:
            self._ring_retry_at = now + RING_RETRY_S
            self.throttled.warning("bus_full", f"{self.out_stream}: {exc}; pictures dropped")
            return False
        self.width, self.height = width, height
        return True

    # ------------------------------------------------------------ once a second
    def _tick(self) -> None:
        self.m_fps.set(self.meter.update(self.published))
        if self.producer is not None:
            self.producer.heartbeat()  # alive while the input is quiet; reaps dead readers
        if not self.consumer.attached:
            self._readable()  # look for the stream (its producer also wakes us when it appears)
        elif not self.consumer.producer_alive():
            if not self._producer_dead:
                self._producer_dead = True
                self._lost(0, f"its producer (pid {self._producer_pid()}) died", warn=True)
        elif self._producer_dead:
            self._producer_dead = False

    def _producer_pid(self) -> str:
        for info in framebus.list_streams(self.prefix):
            if info.stream == self.stream:
                return str(info.producer_pid)
        return "?"

    def describe(self) -> dict:
        streams = [self.out_stream] if self.producer is not None else []
        info = {"rate": round(self.meter.rate, 2), "streams": streams, "sessions": []}
        if self.raw_input is not None:
            info["status"] = f"{self.stream} carries raw pictures ({self.raw_input}): nothing to decode"
            return info
        if self.generation is None:
            info["status"] = f"waiting for stream {self.stream}"
            return info
        if self.decoder is None:
            info["status"] = f"waiting for the first access unit on {self.stream}"
            return info
        d = self.decoder
        how = f"({'hardware' if d.hardware else 'software'}: {d.backend}{self.backend_note})"
        if self.published and self.producer is not None:
            status = f"{self.codec} -> {self.fmt} {self.width}x{self.height} at {self.meter.rate:.1f} fps {how}"
        else:
            status = f"{self.codec} -> {self.fmt}, waiting for a keyframe {how}"
        if self._producer_dead:
            status = f"stream {self.stream} stalled (its producer died); {status}"
        elif not self.consumer.attached:
            status = f"stream {self.stream} closed, waiting for it to return; {status}"
        info["status"] = status
        return info
