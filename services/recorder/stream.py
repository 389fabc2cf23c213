"""One target's recording: items in, segments of fragmented MP4 (or WAV) out. Knows nothing of the bus.

`StreamRecorder.feed(item)` takes what a framebus consumer returns (anything with the
same attributes: kind, codec, keyframe, capture_ns, pts, time_base, generation, seq,
array, planes(), format, width, height, rate, channels, valid()) and turns it into segments:

* encoded access units (H.264, H.265, VP9, AV1) are remuxed: no decoder, no encoder, the
  bytes as they came. A segment starts at a keyframe (the items before the first one are
  dropped and counted as `waiting_keyframe`). Its size is the one the item carries
  (capture sets it from the demuxer), else FFmpeg's parser's, else that of the decoded
  keyframe. VP8, which FFmpeg's MP4 muxer cannot carry, is decoded here and encoded as
  raw pictures are;
* raw pictures are encoded with the encoder services/recorder/encoder.py chooses;
* s16 audio chunks (a NAME-audio target) are written as they came into a WAV
  (services/recorder/wav.py), each chunk at the sample its capture time says.

Timestamps come from capture_ns (the box's one monotonic clock) at 90 kHz from the
segment's first item, so variable frame rate is kept as it was captured; Mp4Writer makes
them strictly increasing. A remuxed stream's presentation times come from the source's
pts, as late as the capture clock needs (see _write_held): B-frames keep their order
wherever in the stream they begin.

A new segment begins (the current one is finished: renamed from `.partial`, event
`record.segment`):
* when the segment is `segment_seconds` long, at the next keyframe (raw: the next picture);
* when the parameter sets change (a new H.264/H.265 SPS: resolution or profile), a
  keyframe's size differs from the segment's or a raw picture changes size or format:
  the MP4 sample entry holds one of each;
* when the stream closed (`interrupt()`). A producer that comes back (a new ring
  generation: a capture process restarted) continues the segment when the stream's shape
  is the same: its timestamps are the capture times, so the outage is a gap in the
  file's timeline, reported as `record.gap` {reason: "source", seconds}.

Restarts (`resume()`): a recorder that starts again is handed the resume state of the
target's last file (services/recorder/mp4.py: written after every fragment) and, when
that file was cut by the crash, the file itself. It skips what the file holds (items up
to the one its last fragment ends with, by ring generation and sequence) and continues
the same file with the next item, from the ring's history: nothing lost, nothing twice,
no new segment. If the ring no longer holds that item (the recorder was down longer
than the history) or the producer restarted meanwhile, the file continues after a gap
(at the next keyframe), reported as `record.gap` {reason: "overrun" | "source", seconds}.

A full disk (mp4.DiskFull) finishes the segment where its last whole fragment ended,
emits `record.error` {reason: disk_full} once, counts it, and drops items (counted as
`disk_full`) until `resume_if_space()` sees room again; then the next keyframe opens a
new segment. Other write errors do the same without the wait.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from services.recorder import encoder as encoders
from services.recorder import segments
from services.recorder.mp4 import DiskFull, Mp4Error, Mp4Writer, Track, boot_id, state_extent
from services.recorder.room_audio import AudioPlacer
from services.recorder.wav import WavWriter

__all__ = ["Settings", "StreamRecorder", "VIDEO_TB", "sps_of"]

log = logging.getLogger("edgeroom.recorder")

VIDEO_TB = Fraction(1, 90000)
GAP_MIN_NS = 100_000_000    # a hole shorter than this (plus a frame) is jitter, not a gap
WINDOW = 8                  # remuxed access units held before writing: deeper than streams reorder (1 to 4)
AUDIO_GAP_MAX_S = 10.0      # audio that pauses longer than this begins a new WAV instead of writing silence
NOMINAL_FPS = 30            # the encoder's rate-control hint and gop unit; timestamps stay the captured ones


@dataclass(frozen=True)
class Settings:
    segment_seconds: float = 300.0
    fragment_seconds: float = 0.5
    encoder: str = "auto"
    crf: int = 23
    preset: str = "veryfast"
    bitrate_kbps: int = 0
    gop_seconds: float = 2.0
    fsync: bool = True


Emit = Callable[[str, dict], None]


class StreamRecorder:
    """The recording of one target. One owner (the service loop) calls it."""

    def __init__(self, target: str, root: Path, settings: Settings, emit: Emit, metrics=None,
                 on_segment: Callable[[Path], None] | None = None) -> None:
        self.target, self.root, self.settings, self.emit = target, Path(root), settings, emit
        self.m = metrics
        # the per-item children, looked up once (labels() costs more than the increment)
        self._m_frames = metrics.frames.labels(target) if metrics is not None else None
        self._m_flush = metrics.flush.labels(target) if metrics is not None else None
        self._m_bytes = metrics.bytes.labels(target) if metrics is not None else None
        self.on_segment = on_segment
        self.writer: Mp4Writer | WavWriter | None = None
        self.track: Track | None = None
        self.state = "waiting"          # waiting (for a keyframe / first item), recording, disk_full, stopped
        self.generation: int | None = None
        self.sps: bytes | None = None
        self.shape: tuple | None = None  # copy: (width, height, codec); raw: (width, height, format); audio: (rate, ch)
        self.t0_ns = 0
        self.encoder_kind = ""          # copy, encode or wav: how the current segment is made
        self.encoder_name = ""          # "copy" for remux, else the video/audio encoder
        self.encoder_note = ""
        self.hardware = False
        self.started = False            # record.started sent for this recording
        self.segments = 0
        self.frames = 0
        self.bytes = 0
        self.last_error = ""
        self.last_path: Path | None = None
        self.dropped: dict[str, int] = {}
        # remux timestamps (see _hold and _write_held)
        self.held: deque = deque()      # access units not written yet: (packet, keyframe, dts, source pts, ident)
        self.src0: int | None = None    # source pts (90 kHz) that map to decode time 0 ...
        self.src_gen: int | None = None  # ... for this ring generation (a restarted producer's pts start afresh)
        self.lead = 0                   # ticks added to the source's pts so that no pts is before its dts
        self.decoder = None             # VP8: its decoder (see _transcoded), for (generation, codec) decoder_key
        self.decoder_key: tuple | None = None
        self.placer: AudioPlacer | None = None  # audio: where each chunk goes in the WAV
        # restarts and gaps
        self.resume_at: dict | None = None  # where the last file ended: skip up to it (resume())
        self.cont: tuple[Path, dict] | None = None  # a file cut by the crash to continue (path, its state)
        self.exact = False              # the next item is the one after the file's last: no keyframe needed
        self.await_key = False          # the producer restarted: the segment goes on at its next keyframe
        self.gap: dict | None = None    # a hole before the next item written, reported when it is
        self.last = (0, -1, 0)          # (generation, seq, capture_ns) of the last item written
        self.interval = 0               # ns between the last two items written
        self.gaps: dict[str, float] = {}  # seconds of gaps by reason, for describe()
        self.final = False              # stopped on purpose: the last state says so
        self.replay: list | None = None  # skipped access units since their keyframe (see _before_resume)

    # ------------------------------------------------------------ input
    def feed(self, item) -> None:
        if self.state in ("stopped", "disk_full"):
            if self.state == "disk_full":
                self._drop("disk_full")
            return
        if self.resume_at is not None and self._before_resume(item):
            return
        kind = item.kind
        try:
            if item.generation != self.generation:
                if self.generation is not None and self.writer is not None:
                    self._new_generation(item)
                self.generation = item.generation
            if kind == "encoded" and item.codec in MUXER_CODECS:
                self._encoded(item)
            elif kind == "encoded" and item.codec in TRANSCODED:
                self._transcoded(item)
            elif kind == "video":
                self._picture(item)
            elif kind == "audio":
                self._audio(item)
            else:
                self._drop("bad_input")
                log.debug("%s: item of kind %r%s ignored", self.target, kind,
                          f" (codec {item.codec!r})" if kind == "encoded" else "")
        except DiskFull as exc:
            self._disk_full(exc)
        except Mp4Error as exc:
            self._error(exc.reason, str(exc))
        except (av.FFmpegError, ValueError) as exc:
            self._error("encode", f"{self.target}: {exc}")

    def _encoded(self, item) -> None:
        data = item.array
        key = item.keyframe
        if key:
            sps = sps_of(data, item.codec)
            if self.writer is not None:
                if (why := self._new_shape(item, sps)) is not None:
                    self._finish(why)
                elif self._due():
                    self._finish(None)
            if self.writer is None:
                self._open_copy(item, sps)
            self.await_key = False
        elif self.writer is None and self.exact and self.cont is not None:
            self._open_copy(item, None)  # the file's next access unit: it decodes after the file's last
        if self.writer is None or self.await_key:
            self._drop("waiting_keyframe")
            return
        self._hold(data, key, item)

    def _new_shape(self, item, sps: bytes | None) -> str | None:
        """Why a keyframe cannot go on in the segment (its sample entry holds one size and one set
        of parameter sets), or None."""
        if sps is not None and self.sps is not None and sps != self.sps:
            return "new parameter sets (resolution or profile change)"
        if self.shape is not None and item.width and (item.width, item.height) != self.shape[:2]:
            return f"the picture size changed to {item.width}x{item.height}"
        return None

    def _transcoded(self, item) -> None:
        """A codec the MP4 muxer cannot carry (VP8: FFmpeg has no MP4 sample entry for it):
        decoded here, and its pictures encoded as raw pictures are (one decoder per stream,
        from a keyframe; a picture that does not decode is dropped until the next one)."""
        if self.decoder is None or self.decoder_key != (item.generation, item.codec):
            if not item.keyframe:
                self._drop("waiting_keyframe")
                return
            self.decoder = av.CodecContext.create(item.codec, "r")  # one thread: a packet in, its picture out
            self.decoder_key = (item.generation, item.codec)
        packet = av.Packet(item.array)
        if not item.valid():
            self._drop("overwritten")
            return
        packet.pts, packet.time_base = item.capture_ns, NS_TB
        try:
            frames = self.decoder.decode(packet)
        except av.FFmpegError as exc:
            self._drop("corrupt")
            log.warning("%s: a %s access unit does not decode (%s); waiting for a keyframe", self.target,
                        item.codec, exc)
            self.decoder = None
            return
        ident = (item.generation, item.seq, item.capture_ns)
        for frame in frames:
            self._write_picture((frame.width, frame.height, frame.format.name), frame,
                                item.capture_ns if frame.pts is None else frame.pts, None, ident)

    # ------------------------------------------------------------ remux timestamps
    def _hold(self, data, key: bool, item) -> None:
        """Queue one access unit; write the one that leaves the window (see _write_held)."""
        packet = av.Packet(data)  # the one copy out of the ring
        if not item.valid():
            self._drop("overwritten")
            return
        dts = self._pts(item.capture_ns)
        tb = item.time_base
        src = item.pts * tb.numerator * 90000 // tb.denominator
        if self.src_gen != item.generation or self.src0 is None:
            # the first access unit of a segment, or of a producer that started again (its pts start
            # afresh): it is shown at its decode time, after everything the file shows already
            base = dts
            if self.track is not None and self.track.last_pts is not None:
                base = max(base, self.track.last_pts + 1 - self.lead)
            self.src0, self.src_gen = src - base, item.generation
        src -= self.src0
        if dts - src > self.lead:  # this picture would be presented before it is decoded: later pts for all held
            if self.lead == 0:
                log.info("%s: pts from the source are %d ticks behind the capture clock (B-frames or jitter): "
                         "presentation times are moved that much later", self.target, dts - src)
            self.lead = dts - src
        self.held.append((packet, key, dts, src, (item.generation, item.seq, item.capture_ns)))
        if len(self.held) > WINDOW:
            self._write_held(1)

    def _write_held(self, n: int | None = None) -> None:
        """Write the oldest `n` held access units (all when None): pts = source pts + lead, dts = capture clock.

        Why: the capture clock gives every stream strictly increasing decode times (variable
        frame rate as captured, loops made continuous by capture's Timeline), but only the
        source's pts say in which order pictures are shown: with B-frames they differ from
        decode order, and a stream may start without B-frames and use them later (x264's
        adaptive B-frames on a still scene). So pts always come from the source, shifted by
        the smallest `lead` that keeps every pts at or after its dts. The lead only grows;
        when it does, the access units still held move with it, and those already written
        were decoded at least WINDOW access units earlier, so (reordering less deep than
        that) shown earlier too: presentation order stays the source's, pts stay distinct.

        Each packet carries its item's identity (generation, seq, capture_ns) as the writer's
        token: the resume state names the last item a fragment on disk holds, so what is
        still held here when the recorder dies is taken again from the ring's history."""
        held = self.held
        count = len(held) if n is None else min(n, len(held))
        for _ in range(count):
            packet, key, dts, src, ident = held.popleft()
            self.writer.write_packet(self.track, packet, src + self.lead, dts, keyframe=key, token=ident)
            self._wrote(ident)

    def _picture(self, item) -> None:
        self._write_picture((item.width, item.height, item.format), item.planes(), item.capture_ns, item.valid,
                            (item.generation, item.seq, item.capture_ns))

    def _write_picture(self, shape: tuple, picture, capture_ns: int, check, ident: tuple[int, int, int]) -> None:
        if self.writer is not None and (shape != self.shape or self._due()):
            self._finish("the picture changed size or format" if shape != self.shape else None)
        if self.writer is None:
            self._open_encode(shape)
        if not self.writer.write_picture(self.track, picture, shape[2], self._pts(capture_ns), check=check,
                                         token=ident):
            self._drop("overwritten")
            return
        self._wrote(ident)

    def _audio(self, item) -> None:
        """s16 chunks -> a WAV segment (services/recorder/wav.py), each placed by its capture time."""
        shape = (item.rate, item.channels)
        if self.writer is not None and (shape != self.shape or self._due() or self.writer.full):
            self._finish("the audio format changed" if shape != self.shape else None)
        pcm = item.array.copy()  # the one copy out of the ring: the writer keeps it until its flush
        if not item.valid():
            self._drop("overwritten")
            return
        if self.writer is None:
            self._open_wav(shape, item.capture_ns)
        place = self.placer.place(item.capture_ns, len(pcm))
        if place.gap > AUDIO_GAP_MAX_S * item.rate:  # a long pause: a new file, not minutes of silence
            self._finish(f"no audio for {place.gap / item.rate:.1f} s")
            self._open_wav(shape, item.capture_ns)
            place = self.placer.place(item.capture_ns, len(pcm))
        ident = (item.generation, item.seq, item.capture_ns)
        if place.skip < len(pcm):
            self.writer.write(pcm[place.skip:], place.pos, token=ident)
        self._wrote(ident, len(pcm) * 1_000_000_000 // item.rate)

    def _since(self, capture_ns: int) -> int:
        """Nanoseconds since the segment's first item."""
        if not self.t0_ns:
            self.t0_ns = capture_ns
        return capture_ns - self.t0_ns

    def _pts(self, capture_ns: int) -> int:
        return self._since(capture_ns) * 9 // 100_000  # ns -> 90 kHz ticks

    def _due(self) -> bool:
        return self.writer is not None and self.writer.duration >= self.settings.segment_seconds

    def _wrote(self, ident: tuple[int, int, int], duration_ns: int = 0) -> None:
        """One item written; `ident` = (generation, seq, capture_ns)."""
        self.frames += 1
        if self._m_frames is not None:
            self._m_frames.inc()
        capture_ns = ident[2]
        if self.gap is not None:
            self._report_gap(capture_ns)
        if self.last[2] and capture_ns > self.last[2]:
            self.interval = duration_ns or capture_ns - self.last[2]
        elif duration_ns:
            self.interval = duration_ns
        self.last = ident

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if self.m is not None:
            self.m.dropped.labels(self.target, reason).inc()

    # ------------------------------------------------------------ segments
    def _take_cont(self, kind: str, shape: tuple) -> tuple[Path, dict] | None:
        """The file cut by the crash, when its stream goes on in the same shape (else it is
        finished as it is, and None)."""
        cont, self.cont = self.cont, None
        if cont is None:
            return None
        path, doc = cont
        owner = doc.get("owner") or {}
        if owner.get("kind") == kind and tuple(owner.get("shape") or ()) == tuple(shape) and \
                (kind != "copy" or owner.get("sps") == (self.sps.hex() if self.sps else None)):
            return cont
        self._close_cont(path, doc, "its stream's shape changed during the restart")
        return None

    def _writer(self, kind: str, shape: tuple) -> Mp4Writer:
        """A new segment, or the file cut by the crash when its stream goes on in the same shape."""
        on_flush = self._flushed if self.m is not None else None
        cont = self._take_cont(kind, shape)
        if cont is not None:
            path, doc = cont
            owner = doc.get("owner") or {}
            self.t0_ns = int(owner["t0"])
            if owner.get("src0") is not None:  # the file's presentation times go on by the same rule
                self.src0, self.src_gen, self.lead = int(owner["src0"]), owner.get("src_gen"), int(owner["lead"])
            w = Mp4Writer(path, fragment_seconds=self.settings.fragment_seconds, fsync=self.settings.fsync,
                          on_flush=on_flush, state=self._owner_state, resume=doc)
            log.info("%s: continuing %s after the restart", self.target, path)
            self.emit("record.resumed", {"target": self.target, "path": str(path), "appended": True})
            return w
        path = segments.new_path(self.root, self.target)
        self.t0_ns = 0
        return Mp4Writer(path, fragment_seconds=self.settings.fragment_seconds, fsync=self.settings.fsync,
                         on_flush=on_flush, state=self._owner_state)

    def _owner_state(self) -> dict:
        """This recorder's part of the resume state: how its timestamps are made, the stream's shape."""
        return {"target": self.target, "kind": self.encoder_kind, "t0": self.t0_ns, "shape": list(self.shape or ()),
                "sps": self.sps.hex() if self.sps else None, "src0": self.src0, "src_gen": self.src_gen,
                "lead": self.lead, "last": list(self.last), "interval": self.interval, "final": self.final}

    def _flushed(self, seconds: float, nbytes: int) -> None:
        self._m_flush.observe(seconds)
        self._m_bytes.inc(nbytes)

    def _open_copy(self, item, sps: bytes | None) -> None:
        if sps is None and self.exact and self.cont is not None:  # mid-GOP: the file's parameter sets and size
            owner = self.cont[1].get("owner") or {}
            sps = bytes.fromhex(owner["sps"]) if owner.get("sps") else None
            width, height = (owner.get("shape") or (0, 0))[:2]
        elif item.width and item.height:
            width, height = item.width, item.height
        else:
            width, height = frame_size(item.codec, item.array)
        self.sps, self.shape, self.encoder_kind = sps, (width, height, item.codec), "copy"
        self.held.clear()
        self.src0 = self.src_gen = None
        self.lead = 0
        self.writer = self._writer("copy", self.shape)
        self.track = self.writer.add_video_copy(MUXER_CODECS[item.codec], width, height, None, VIDEO_TB)
        self._opened("copy", False, "", f"{item.codec} {width}x{height}, remuxed")

    def _open_encode(self, shape: tuple) -> None:
        width, height, fmt = shape
        s = self.settings
        choice = encoders.choose(s.encoder, width, height)
        options = encoders.encoder_options(choice.name, crf=s.crf, preset=s.preset, bitrate_kbps=s.bitrate_kbps)
        self.shape, self.encoder_kind = shape, "encode"
        if self.cont is not None:  # a new encoder's parameter sets are not the file's: a new segment
            self._close_cont(*self.cont, "a raw stream is encoded afresh after a restart")
            self.cont = None
        self.writer = self._writer("encode", shape)
        self.track = self.writer.add_video_encode(choice.name, width, height, "yuv420p", VIDEO_TB, options,
                                                  bit_rate=s.bitrate_kbps * 1000,
                                                  gop=max(1, round(s.gop_seconds * NOMINAL_FPS)))
        self.track.stream.codec_context.framerate = Fraction(NOMINAL_FPS)
        how = "hardware" if choice.hardware else "software"
        self._opened(choice.name, choice.hardware, choice.note,
                     f"{fmt} {width}x{height}, encoded with {choice.name} ({how})")

    def _open_wav(self, shape: tuple, capture_ns: int) -> None:
        """A new WAV, or the one the crash cut when the audio goes on in the same format: its
        samples keep their times (t0 from its state), the next chunk goes where its capture
        time says after the file's end (a hole as silence, up to AUDIO_GAP_MAX_S)."""
        rate, channels = shape
        self.shape, self.encoder_kind = shape, "wav"
        on_flush = self._flushed if self.m is not None else None
        cont = self._take_cont("wav", shape)
        if cont is not None:
            path, doc = cont
            self.t0_ns = int(doc["owner"]["t0"])
            self.writer = WavWriter(path, rate, channels, fragment_seconds=self.settings.fragment_seconds,
                                    fsync=self.settings.fsync, on_flush=on_flush, state=self._owner_state,
                                    resume=doc)
            self.placer = AudioPlacer(self.t0_ns, rate)
            self.placer.next_pos = self.writer.samples  # continuous with the file within the jitter
            log.info("%s: continuing %s after the restart", self.target, path)
            self.emit("record.resumed", {"target": self.target, "path": str(path), "appended": True})
        else:
            path = segments.new_path(self.root, self.target, ext="wav")
            self.t0_ns = capture_ns  # sample 0 of the file; sample n was captured at t0 + n / rate
            self.writer = WavWriter(path, rate, channels, fragment_seconds=self.settings.fragment_seconds,
                                    fsync=self.settings.fsync, on_flush=on_flush, state=self._owner_state)
            self.placer = AudioPlacer(capture_ns, rate)
        self.track = None
        self._opened("pcm_s16le", False, "", f"audio {rate} Hz x{channels} into WAV")

    def _opened(self, name: str, hardware: bool, note: str, what: str) -> None:
        self.state = "recording"
        self.exact = False
        if self.m is not None and (name, hardware) != (self.encoder_name, self.hardware):
            if self.encoder_name:
                self.m.encoder.remove(self.target, self.encoder_name, str(self.hardware).lower())
            self.m.encoder.labels(self.target, name, str(hardware).lower()).set(1)
        if self.m is not None:
            self.m.recording.labels(self.target).set(1)
        self.encoder_name, self.hardware, self.encoder_note = name, hardware, note
        path = self.writer.path
        log.info("%s: recording %s into %s%s", self.target, what, path, f" ({note})" if note else "")
        if not self.started:
            self.started = True
            self.emit("record.started", {"target": self.target, "path": path, "encoder": name,
                                         "hardware": hardware, **({"note": note} if note else {})})

    def _finish(self, why: str | None) -> Path | None:
        """Close the current segment: rename it to .mp4 and announce it (an empty one is deleted)."""
        if self.held and self.writer is not None:
            try:
                self._write_held()
            except Mp4Error:
                pass  # the segment ends with what reached the disk
        self.held.clear()
        w, self.writer, self.track = self.writer, None, None
        self.sps = None
        if w is None:
            return None
        if why:
            log.info("%s: %s: new segment", self.target, why)
        try:
            w.close()
        except DiskFull as exc:  # the trailer did not fit: the file ends at its last whole fragment
            self._disk_full(exc, finishing=True)
        except Mp4Error as exc:
            self._error(exc.reason, str(exc), finishing=True)
        partial = Path(w.path)
        if w.frames == 0 or w.bytes_written == 0 or not partial.exists():
            partial.unlink(missing_ok=True)
            return None
        path = segments.finish(partial)
        self.segments += 1
        self.bytes += w.bytes_written
        self.last_path = path
        if self.m is not None:
            self.m.segments.labels(self.target).inc()
        self.emit("record.segment", {"target": self.target, "path": str(path), "duration": round(w.duration, 3),
                                     "frames": w.frames, "bytes": os.path.getsize(path), "start_ns": self.t0_ns})
        if self.on_segment is not None:
            self.on_segment(path)
        return path

    # ------------------------------------------------------------ restarts and gaps
    def resume(self, doc: dict | None, partial: Path | None = None) -> None:
        """Take up where the target's last file ends: `doc` is its resume state (mp4.read_state
        or wav.read_state),
        `partial` the file itself when a crash cut it (repaired, still `.partial`): it goes on
        with the next item. Call before the first feed()."""
        at = _resume_point(doc)
        if at is None:
            if partial is not None:
                self._close_cont(partial, doc, "its resume state is of another boot or has no position")
            return
        self.resume_at = at
        if partial is not None:
            self.cont = (partial, doc)
        log.info("%s: resuming after %s (generation %s, item %s)", self.target, partial or "the last segment",
                 at["gen"], at["seq"])

    def _before_resume(self, item) -> bool:
        """Whether `item` is already in the last file (skipped). The first item that is not ends
        the resume: it follows the file's last exactly, or there is a gap (overrun, or the
        producer restarted meanwhile) that is reported when the next item is written."""
        at = self.resume_at
        same = item.generation == at["gen"]
        if same and item.seq <= at["seq"]:
            if item.kind == "encoded" and (self.cont is None or item.codec in TRANSCODED):
                # the GOP a new segment would start with, or a decoder must have seen
                if item.keyframe:
                    self.replay = []
                if self.replay is not None:
                    saved = _Saved(item)
                    if item.valid():
                        self.replay.append(saved)
                    else:  # overwritten while copied: no clean GOP to repeat
                        self.replay = None
            return True
        exact = same and item.seq == at["seq"] + 1
        self.resume_at = None
        self.generation = item.generation
        replay, self.replay = self.replay, None
        if exact:
            self.exact = True
            if item.kind == "encoded" and item.codec in TRANSCODED and not item.keyframe and replay:
                self._prime(replay)
            elif self.cont is None and item.kind == "encoded" and not item.keyframe and replay:
                # the last file was finished (a clean stop): a new segment must start at a keyframe, so
                # it starts at the one before this item, and that GOP's head is in both files
                log.info("%s: the last segment was finished cleanly; the new one repeats its last %d access "
                         "unit(s), from their keyframe, so nothing after it is lost", self.target, len(replay))
                self.exact = False
                for saved in replay:
                    self.feed(saved)
        else:
            if not at["final"]:
                self.gap = {"reason": "overrun" if same else "source", "after": at["cap"], "interval": at["interval"]}
            if self.cont is not None and item.capture_ns - at["cap"] > self.settings.segment_seconds * 1e9:
                self._close_cont(*self.cont, "the recorder was down longer than a segment")
                self.cont = None
        return False

    def _prime(self, replay: list) -> None:
        """A transcoded stream (VP8) resumed mid-GOP: its decoder is given the skipped access
        units from their keyframe (their pictures are in the file already, not written
        again), so the next one decodes and nothing waits for the next keyframe."""
        first = replay[0]
        try:
            decoder = av.CodecContext.create(first.codec, "r")
            for saved in replay:
                decoder.decode(av.Packet(saved.array))
        except av.FFmpegError as exc:
            log.warning("%s: the %s access units before the resume point do not decode (%s); waiting for a "
                        "keyframe", self.target, first.codec, exc)
            return
        self.decoder, self.decoder_key = decoder, (first.generation, first.codec)

    def expire(self, now_ns: int) -> None:
        """A file the crash cut whose stream has not come back within `segment_seconds` of its
        last item (the rule _before_resume applies when it does come back) is finished as it
        is, not left `.partial` while the recorder waits."""
        if self.cont is not None and self.writer is None:
            at = _resume_point(self.cont[1])
            since = now_ns - (at["cap"] if at is not None else 0)
            if since > self.settings.segment_seconds * 1e9:
                self._close_cont(*self.cont, f"its stream has not come back for {since / 1e9:.0f} s")
                self.cont = None

    def _new_generation(self, item) -> None:
        """The producer restarted (a capture process died and came back): the segment goes on with
        the gap in its timeline (a remuxed one at the next keyframe, its presentation times
        placed after the file's: see _hold), unless the stream's shape changed (the next
        keyframe or picture will tell). What the window still holds of the old producer is
        written first: nothing more of it comes, and the gap is reported at the new one's
        first item."""
        if self.held:
            self._write_held()
        self.gap = {"reason": "source", "after": self.last[2], "interval": self.interval}
        if self.encoder_kind == "copy":
            self.await_key = True
        log.info("%s: the producer restarted (generation %d): the segment goes on%s", self.target,
                 item.generation, " at its next keyframe" if self.await_key else "")

    def _report_gap(self, capture_ns: int) -> None:
        gap, self.gap = self.gap, None
        if not gap["after"]:
            return
        hole = capture_ns - gap["after"] - gap["interval"]
        if hole < GAP_MIN_NS:
            return
        seconds = round(hole / 1e9, 3)
        reason = gap["reason"]
        self.gaps[reason] = round(self.gaps.get(reason, 0.0) + seconds, 3)
        log.warning("%s: %.3f s missing before this item (%s): a gap in %s", self.target, seconds,
                    {"source": "the source was away", "overrun": "the recorder was down longer than the ring's "
                     "history"}.get(reason, reason), self.writer.path if self.writer else "the recording")
        if self.m is not None:
            self.m.gaps.labels(self.target, reason).inc()
            self.m.gap_seconds.labels(self.target, reason).inc(seconds)
        self.emit("record.gap", {"target": self.target, "reason": reason, "seconds": seconds,
                                 "path": self.writer.path if self.writer else ""})

    def _close_cont(self, path: Path, doc: dict | None, why: str) -> None:
        """A file the crash cut that is not continued: finished as it is (renamed, announced)."""
        log.info("%s: %s: %s is finished as it is", self.target, why, path)
        try:
            final = segments.finish(path)
        except OSError as exc:
            log.warning("%s: cannot finish %s: %s", self.target, path, exc)
            return
        self.segments += 1
        self.last_path = final
        seconds, frames = state_extent(doc)
        owner = (doc or {}).get("owner") or {}
        self.emit("record.segment", {"target": self.target, "path": str(final), "duration": seconds,
                                     "frames": frames, "bytes": os.path.getsize(final),
                                     "start_ns": int(owner.get("t0") or 0)})

    # ------------------------------------------------------------ breaks and errors
    def interrupt(self, why: str) -> None:
        """The input broke off (the stream closed, its producer died): finish the segment."""
        if self.writer is not None:
            self._finish(why)
        if self.cont is not None:
            self._close_cont(*self.cont, why)
            self.cont = None
        if self.state == "recording":
            self.state = "waiting"

    def _disk_full(self, exc: DiskFull, finishing: bool = False) -> None:
        first = self.state != "disk_full"
        self.state = "disk_full"
        self.last_error = str(exc)
        if first:
            log.error("%s: %s; recording pauses until space returns", self.target, exc)
            if self.m is not None:
                self.m.errors.labels(self.target, "disk_full").inc()
            self.emit("record.error", {"target": self.target, "reason": "disk_full", "message": str(exc),
                                       "path": finished_name(exc.path)})
        if not finishing:
            self._finish(None)

    def _error(self, reason: str, message: str, finishing: bool = False) -> None:
        self.last_error = message
        log.error("%s: %s; starting a new segment", self.target, message)
        if self.m is not None:
            self.m.errors.labels(self.target, reason).inc()
        self.emit("record.error", {"target": self.target, "reason": reason, "message": message})
        if not finishing:
            self._finish(None)
            if self.state == "recording":
                self.state = "waiting"

    def resume_if_space(self, min_free: int) -> bool:
        """After a full disk: back to recording (at the next keyframe) once `min_free` bytes are free."""
        if self.state != "disk_full":
            return False
        free, _ = segments.free_bytes(self.root)
        if free < min_free:
            return False
        log.info("%s: %d bytes free again: recording resumes at the next keyframe", self.target, free)
        self.state = "waiting"
        self.last_error = ""
        return True

    def stop(self, final: bool = True) -> Path | None:
        """Finish the current segment and stop; `record.stopped`. `final`: the recording ends here
        (stopped by command or config), and a later start reports no gap since; else the
        service is shutting down, and the next run resumes after this."""
        self.final = final
        path = self._finish(None) if self.writer is not None else None
        if self.cont is not None:
            self._close_cont(*self.cont, "the recording stops")
            self.cont = None
        self.state = "stopped"
        if self.m is not None:
            self.m.recording.labels(self.target).set(0)
        self.emit("record.stopped", {"target": self.target, "segments": self.segments, "frames": self.frames,
                                     "path": str(path or self.last_path or "")})
        return path

    def describe(self) -> dict:
        w = self.writer
        return {"target": self.target, "state": self.state, "path": w.path if w else str(self.last_path or ""),
                "encoder": self.encoder_name, "hardware": self.hardware, "note": self.encoder_note,
                "segments": self.segments, "frames": self.frames,
                "bytes": self.bytes + (w.bytes_written if w else 0),
                "segment_seconds": round(w.duration, 3) if w else 0.0, "error": self.last_error,
                "dropped": dict(self.dropped), "gaps": dict(self.gaps)}


class _Saved:
    """A copy of an encoded bus item, fed again after its slot was reused."""

    __slots__ = ("kind", "codec", "keyframe", "capture_ns", "pts", "time_base", "generation", "seq", "width",
                 "height", "array")

    def __init__(self, item) -> None:
        self.kind, self.codec, self.keyframe = item.kind, item.codec, item.keyframe
        self.capture_ns, self.pts, self.time_base = item.capture_ns, item.pts, item.time_base
        self.generation, self.seq = item.generation, item.seq
        self.width, self.height = item.width, item.height
        self.array = np.frombuffer(bytes(memoryview(item.array).cast("B")), np.uint8)

    def valid(self) -> bool:
        return True


def _resume_point(doc: dict | None) -> dict | None:
    """Where a file's resume state says its recording ended (the last item its first track
    holds, by generation and sequence), or None (another boot, no position)."""
    if not isinstance(doc, dict) or doc.get("boot") != boot_id():
        return None
    owner = doc.get("owner") or {}
    tracks = doc.get("tracks") or []
    if not tracks or not isinstance(owner, dict):
        return None
    at = {"kind": owner.get("kind"), "final": bool(owner.get("final")), "interval": int(owner.get("interval") or 0)}
    try:
        tok = tracks[0].get("tok")
        if not tok:
            return None
        at.update(gen=int(tok[0]), seq=int(tok[1]), cap=int(tok[2]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    return at


def finished_name(path: str) -> str:
    """The name a segment has once finished (what a record.error should point at)."""
    return path[: -len(segments.PARTIAL)] if path.endswith(segments.PARTIAL) else path


# ------------------------------------------------------------ codec helpers
# The bus's codec names (framebus/formats.py) -> FFmpeg's, for the MP4 muxer. Not here: VP8,
# which FFmpeg's MP4 muxer refuses ("does not support"): StreamRecorder._transcoded encodes it.
MUXER_CODECS = {"h264": "h264", "h265": "hevc", "vp9": "vp9", "av1": "av1"}
TRANSCODED = ("vp8",)
NS_TB = Fraction(1, 1_000_000_000)


def _sps_type(codec: str):
    if codec == "h264":
        return lambda b: b & 0x1F == 7
    if codec == "h265":
        return lambda b: (b >> 1) & 0x3F == 33
    return None


def sps_of(data, codec: str = "h264") -> bytes | None:
    """The SPS NAL unit of an H.264 or H.265 Annex B access unit (searched in its first 512
    bytes), or None (other codecs, or none there)."""
    is_sps = _sps_type(codec)
    if is_sps is None:
        return None
    head = bytes(memoryview(data).cast("B")[:512])
    i = head.find(b"\x00\x00\x01")
    while i != -1 and i + 3 < len(head):
        start = i + 3
        nxt = head.find(b"\x00\x00\x01", start)
        if is_sps(head[start]):
            end = len(head) if nxt == -1 else nxt
            return head[start:end].rstrip(b"\x00")
        i = nxt
    return None


def frame_size(codec: str, data) -> tuple[int, int]:
    """Width and height of a keyframe (bus codec name) whose item did not say them: by FFmpeg's
    parser (no decoding; it reads H.264/H.265/AV1 sizes), else by decoding that one keyframe
    (VP9's parser reports none). (0, 0) when neither works."""
    name = MUXER_CODECS.get(codec, codec)
    buf = bytes(memoryview(data).cast("B"))
    try:
        cc = av.CodecContext.create(name, "r")
        cc.parse(buf)
        cc.parse(None)
        if cc.width and cc.height:
            return cc.width, cc.height
        cc = av.CodecContext.create(name, "r")
        for frame in [*cc.decode(av.Packet(buf)), *cc.decode(None)]:
            return frame.width, frame.height
    except Exception:  # noqa: BLE001 - a stream the muxer may still take (it reads H.264's SPS itself)
        pass
    return 0, 0
