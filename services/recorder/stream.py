"""One target's recording: items in, segments of fragmented MP4 (or WAV) out. Knows nothing of the bus.

`StreamRecorder.feed(item)` takes what a framebus consumer returns (anything with the
same attributes: kind, codec, keyframe, capture_ns, generation, array, planes(), format,
width, height, rate, channels, valid()) and turns it into segments:

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
* when the producer restarted (a new ring generation) or the stream closed (`interrupt()`).

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

from services.recorder import encoder as encoders
from services.recorder import segments
from services.recorder.mp4 import DiskFull, Mp4Error, Mp4Writer, Track
from services.recorder.room_audio import AudioPlacer
from services.recorder.wav import WavWriter

__all__ = ["Settings", "StreamRecorder", "VIDEO_TB", "sps_of"]

log = logging.getLogger("edgeroom.recorder")

VIDEO_TB = Fraction(1, 90000)
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
        self.shape: tuple | None = None  # raw: (width, height, format); audio: (rate, channels)
        self.t0_ns = 0
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
        self.held: deque = deque()      # remuxed access units not written yet: (packet, keyframe, dts, source pts)
        self.src0: int | None = None    # the segment's first source pts, 90 kHz
        self.lead = 0                   # ticks added to the source's pts so that no pts is before its dts
        self.decoder = None             # VP8: its decoder (see _transcoded), for (generation, codec) decoder_key
        self.decoder_key: tuple | None = None
        self.placer: AudioPlacer | None = None  # audio: where each chunk goes in the WAV

    # ------------------------------------------------------------ input
    def feed(self, item) -> None:
        if self.state in ("stopped", "disk_full"):
            if self.state == "disk_full":
                self._drop("disk_full")
            return
        if item.generation != self.generation:
            if self.generation is not None and self.writer is not None:
                self._finish(f"the producer restarted (generation {item.generation})")
            self.generation = item.generation
        kind = item.kind
        try:
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
        if self.writer is None:
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
        for frame in frames:
            self._write_picture((frame.width, frame.height, frame.format.name), frame,
                                item.capture_ns if frame.pts is None else frame.pts, None)

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
        if self.src0 is None:
            self.src0 = src
        src -= self.src0
        if dts - src > self.lead:  # this picture would be presented before it is decoded: later pts for all held
            if self.lead == 0:
                log.info("%s: pts from the source are %d ticks behind the capture clock (B-frames or jitter): "
                         "presentation times are moved that much later", self.target, dts - src)
            self.lead = dts - src
        self.held.append((packet, key, dts, src))
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
        that) shown earlier too: presentation order stays the source's, pts stay distinct."""
        held = self.held
        count = len(held) if n is None else min(n, len(held))
        for _ in range(count):
            packet, key, dts, src = held.popleft()
            self.writer.write_packet(self.track, packet, src + self.lead, dts, keyframe=key)
            self._wrote()

    def _picture(self, item) -> None:
        self._write_picture((item.width, item.height, item.format), item.planes(), item.capture_ns, item.valid)

    def _write_picture(self, shape: tuple, picture, capture_ns: int, check) -> None:
        if self.writer is not None and (shape != self.shape or self._due()):
            self._finish("the picture changed size or format" if shape != self.shape else None)
        if self.writer is None:
            self._open_encode(shape)
        if not self.writer.write_picture(self.track, picture, shape[2], self._pts(capture_ns), check=check):
            self._drop("overwritten")
            return
        self._wrote()

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
        if place.skip < len(pcm):
            self.writer.write(pcm[place.skip:], place.pos)
        self._wrote()

    def _since(self, capture_ns: int) -> int:
        """Nanoseconds since the segment's first item."""
        if not self.t0_ns:
            self.t0_ns = capture_ns
        return capture_ns - self.t0_ns

    def _pts(self, capture_ns: int) -> int:
        return self._since(capture_ns) * 9 // 100_000  # ns -> 90 kHz ticks

    def _due(self) -> bool:
        return self.writer is not None and self.writer.duration >= self.settings.segment_seconds

    def _wrote(self) -> None:
        self.frames += 1
        if self._m_frames is not None:
            self._m_frames.inc()

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if self.m is not None:
            self.m.dropped.labels(self.target, reason).inc()

    # ------------------------------------------------------------ segments
    def _writer(self) -> Mp4Writer:
        path = segments.new_path(self.root, self.target)
        return Mp4Writer(path, fragment_seconds=self.settings.fragment_seconds, fsync=self.settings.fsync,
                         on_flush=self._flushed if self.m is not None else None)

    def _flushed(self, seconds: float, nbytes: int) -> None:
        self._m_flush.observe(seconds)
        self._m_bytes.inc(nbytes)

    def _open_copy(self, item, sps: bytes | None) -> None:
        width, height = (item.width, item.height) if item.width and item.height else frame_size(item.codec, item.array)
        self.writer = self._writer()
        self.track = self.writer.add_video_copy(MUXER_CODECS[item.codec], width, height, None, VIDEO_TB)
        self.held.clear()
        self.src0, self.lead = None, 0
        self.sps, self.shape = sps, (width, height, item.codec)
        self._opened("copy", False, "", f"{item.codec} {width}x{height}, remuxed")

    def _open_encode(self, shape: tuple) -> None:
        width, height, fmt = shape
        s = self.settings
        choice = encoders.choose(s.encoder, width, height)
        options = encoders.encoder_options(choice.name, crf=s.crf, preset=s.preset, bitrate_kbps=s.bitrate_kbps)
        self.writer = self._writer()
        self.track = self.writer.add_video_encode(choice.name, width, height, "yuv420p", VIDEO_TB, options,
                                                  bit_rate=s.bitrate_kbps * 1000,
                                                  gop=max(1, round(s.gop_seconds * NOMINAL_FPS)))
        self.track.stream.codec_context.framerate = Fraction(NOMINAL_FPS)
        self.shape = shape
        how = "hardware" if choice.hardware else "software"
        self._opened(choice.name, choice.hardware, choice.note,
                     f"{fmt} {width}x{height}, encoded with {choice.name} ({how})")

    def _open_wav(self, shape: tuple, capture_ns: int) -> None:
        rate, channels = shape
        path = segments.new_path(self.root, self.target, ext="wav")
        self.writer = WavWriter(path, rate, channels, fragment_seconds=self.settings.fragment_seconds,
                                fsync=self.settings.fsync, on_flush=self._flushed if self.m is not None else None)
        self.track = None
        self.shape = shape
        self._opened("pcm_s16le", False, "", f"audio {rate} Hz x{channels} into WAV")
        self.t0_ns = capture_ns  # sample 0 of the file; sample n was captured at t0 + n / rate
        self.placer = AudioPlacer(capture_ns, rate)

    def _opened(self, name: str, hardware: bool, note: str, what: str) -> None:
        self.state = "recording"
        self.t0_ns = 0
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

    # ------------------------------------------------------------ breaks and errors
    def interrupt(self, why: str) -> None:
        """The input broke off (the stream closed, its producer died): finish the segment."""
        if self.writer is not None:
            self._finish(why)
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

    def stop(self) -> Path | None:
        """Finish the current segment and stop; `record.stopped`."""
        path = self._finish(None) if self.writer is not None else None
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
                "dropped": dict(self.dropped)}


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
