"""Room recording: the audio and video of a room's sessions in one MP4, in sync by capture time.

Every item a session sends carries `capture_ns`, its CLOCK_MONOTONIC capture time, the one
clock every process on the box shares. The recording has a start `t0` on that clock and
places each item at `capture_ns - t0`: nothing is stamped on arrival (RoomKit stamps
items when they reach its recorder, so queueing delays become A/V offsets), nothing is
counted in frames (a frame rate that varies does not stretch the timeline).

Layout: one video track per session, remuxed: an H.264 session's access units are
written as they came (no decode, no encode), a raw session (webcam, screen, processed
pictures) is encoded on its own track. A grid would cost a decode of every session, a
compose and an encode of the whole picture, all on this box's CPU, for a layout a
player can build at playback time. Audio: the sessions are mixed (summed, clipped) into
one track, because players play one audio track; see room_audio.py for the placement.

The flow, driven by the owner's `poll(now_ns)` (one thread owns a recorder):

* `push_*` appends to the track's reorder buffer, sorted by capture time and bounded by
  items, bytes and time span (overflow drops the oldest, counted as "overflow"; an
  encoded track then waits for its next keyframe, since the frames after a hole do not
  decode). Items stamped more than `future_s` past the last poll are refused ("future").
* The recording starts when every declared track has sent, or `wait_s` after the first
  item of any track (a track that never sends does not hold the others back). `t0` is
  the earliest first picture (a keyframe), or the earliest first item when no picture has
  come: audio from before it is trimmed, so the file starts on a picture. Tracks that
  have not sent then: audio joins whenever it comes (it is mixed); a video session joins
  later if its declaration says enough to create its track (width, height and, for H.264,
  the parameter sets), else it is `missing`.
* Each poll writes what is older than `now - reorder_ms` (later items of other tracks
  can no longer come before it), in steps of at most half a second, so audio and video
  reach the muxer interleaved.
* Video pts are (capture_ns - t0) in 1/90000 s, strictly increasing: a repeated or
  backwards time is moved one tick after the previous frame ("pts_fixed").

Bounds: per track `buffer_items`, `buffer_bytes`, `buffer_seconds`; the audio mixer holds
three seconds. Nothing else grows with the inputs.

Restarts: the file's resume state (mp4.py, after every fragment) holds the recording's
`t0`, its tracks in file order (`layout`) and, through the `ident` given with each item,
the last item of each session the file holds. `RoomRecorder(..., resume=(path, state))`
continues that file when the declared sessions are those of its layout: the same t0, each
video track on from its last frame (the caller skips what the file has, and says with
`continue_track` whether the next item follows it exactly or after a hole, when it waits
for a keyframe), the audio from the file's last sample (the mixer restarts two AAC frames
before it; mp4.py drops what the file has). Otherwise it writes a new file. A session
that leaves and comes back (its capture restarted) gets its own track again, with the
gap in its timeline.
"""
from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from services.recorder.mp4 import Mp4Writer
from services.recorder.room_audio import AudioMixer, AudioPlacer

__all__ = ["RoomConfig", "RoomInputError", "RoomRecorder", "RoomStats"]

log = logging.getLogger(__name__)

NS = 1_000_000_000
VIDEO_TB = Fraction(1, 90000)
STEP_NS = NS // 2
AAC_FRAME = 1024    # samples per AAC frame
KINDS = ("video", "picture", "audio")


class RoomInputError(ValueError):
    """An item the recorder refuses; `reason` is the metric label it was counted under."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RoomConfig:
    wait_s: float = 2.0               # how long a declared track may stay silent before the start
    reorder_ms: float = 200.0         # items are written this long after their capture time
    future_s: float = 5.0             # items stamped further than this past the last poll are refused
    buffer_items: int = 1000          # per track
    buffer_bytes: int = 32 << 20      # per track
    buffer_seconds: float = 5.0       # per track: newest - oldest capture time
    audio_rate: int = 48000
    audio_channels: int = 1
    audio_codec: str = "aac"
    jitter_ms: float = 10.0           # audio stamps within this of continuity are jitter
    drift_ms: float = 2.0             # audio slips when its median error exceeds this
    encoder: str = "libx264"          # for raw sessions
    encoder_options: dict[str, str] = field(default_factory=lambda: {"preset": "veryfast", "tune": "zerolatency"})
    fragment_seconds: float = 1.0
    fsync: bool = True

    def __post_init__(self) -> None:
        for name in ("wait_s", "reorder_ms", "future_s", "buffer_seconds", "jitter_ms", "drift_ms", "fragment_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"room recording: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.buffer_items < 1 or self.buffer_bytes < 1 or self.audio_rate < 1 or self.audio_channels < 1:
            raise ValueError("room recording: buffer_items, buffer_bytes, audio_rate and audio_channels must be >= 1")


@dataclass
class RoomStats:
    """Counters for a service to export (all only grow)."""
    frames: Counter = field(default_factory=Counter)     # video frames written, by track
    samples: int = 0                                      # audio samples written (per channel)
    silence_samples: int = 0                              # of those, covered by no session
    dropped: Counter = field(default_factory=Counter)    # items refused or discarded, by reason
    late: int = 0                                         # items that came after their time was written
    late_samples: int = 0                                 # audio samples trimmed as late
    trimmed_samples: int = 0                              # audio samples trimmed as overlap / slip
    slips: int = 0                                        # drift corrections of a session's audio
    pts_fixed: int = 0                                    # video times moved one tick forward
    held_start: int = 0                                   # video tracks whose first picture is held from 0

    def silence_ms(self, rate: int) -> float:
        return self.silence_samples * 1000 / rate


class _Track:
    __slots__ = ("id", "kind", "info", "items", "seqs", "bytes", "first_ns", "out", "last_pts", "gate",
                 "placer", "missing", "last_ident")

    def __init__(self, track_id: str, kind: str, info: dict) -> None:
        self.id, self.kind, self.info = track_id, kind, info
        self.items: list[tuple] = []       # (capture_ns, seq, payload, nbytes, keyframe), sorted
        self.bytes = 0
        self.first_ns: int | None = None   # capture time of the first usable item
        self.out = None                    # the writer's track
        self.last_pts: int | None = None
        self.gate = kind == "video"        # an encoded track waits for a keyframe
        self.placer: AudioPlacer | None = None
        self.missing = False
        self.last_ident = None             # the caller's name of the last item written or placed


class RoomRecorder:
    """One room's recording into `path`. Not thread-safe: one owner pushes and polls."""

    def __init__(self, path: str, config: RoomConfig | None = None, *,
                 writer_factory: Callable[..., Any] = Mp4Writer, resume: tuple[str, dict] | None = None) -> None:
        self.path, self.cfg = str(path), config or RoomConfig()
        self._resume = resume        # (a file the crash cut, its resume state): continued if the sessions fit
        self.resumed = False         # this recording continues that file
        self._layout: list[dict] = []   # the file's tracks, in order (the resume state's "layout")
        self._left: dict[str, _Track] = {}  # sessions that left: their place in the file, if they come back
        self.final = False           # stopped on purpose (said in the last resume state)
        self.extra_state: Callable[[], dict] | None = None  # the owner's own part of the resume state
        self._factory = writer_factory
        self.stats = RoomStats()
        self.tracks: dict[str, _Track] = {}
        self.writer = None
        self.t0: int | None = None
        self.watermark: int | None = None        # everything up to here was written
        self._first_item_ns: int | None = None
        self._last_now: int | None = None
        self._seq = 0
        self._audio_out = None
        cfg = self.cfg
        self._mixer = AudioMixer(cfg.audio_channels, cfg.audio_rate * 3)
        self._jitter_samples = round(cfg.jitter_ms * cfg.audio_rate / 1000)
        self._closed = False

    # ------------------------------------------------------------ declaring
    def declare(self, track_id: str, kind: str, info: dict | None = None) -> None:
        """A session's track: kind "video" (encoded H.264 Annex B), "picture" (raw) or "audio".
        info: video {width, height, extradata}, picture {width, height, fmt}, audio {} (all optional)."""
        if kind not in KINDS:
            raise ValueError(f"room recording: track kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if track_id in self.tracks:
            raise ValueError(f"room recording: track {track_id!r} is already declared")
        old = self._left.pop(track_id, None)
        track = _Track(track_id, kind, dict(info or {}))
        self.tracks[track_id] = track
        if old is not None and old.kind == kind and old.out is not None:
            # back after leaving (its session flapped while its capture restarted): its own track
            # again, on from its last frame. Still gated if it was; the caller calls gap() if the
            # first item back does not follow the last one it pushed (it waits for a keyframe)
            track.out, track.last_pts, track.first_ns = old.out, old.last_pts, old.first_ns
            track.gate, track.last_ident = old.gate, old.last_ident
        elif self.t0 is not None:
            self._join(track)

    def remove(self, track_id: str) -> None:
        """The session left: what it buffered is written (or placed) now, then it is forgotten."""
        track = self.tracks.get(track_id)
        if track is None:
            return
        if self.t0 is not None and track.items:
            self._drain(track, track.items[-1][0])
        del self.tracks[track_id]
        if track.out is not None:
            self._left[track_id] = track

    @property
    def missing(self) -> list[str]:
        """Declared tracks that are not in the file (declared with too little to join late)."""
        return [t.id for t in self.tracks.values() if t.missing]

    @property
    def started(self) -> bool:
        return self.t0 is not None

    # ------------------------------------------------------------ pushing
    def push_video(self, track_id: str, data, capture_ns: int, keyframe: bool, ident: Any = None) -> None:
        """One H.264 Annex B access unit (SPS/PPS before each IDR); copied into the buffer. `ident`
        (JSON-able: a bus item's generation and sequence) names it in the resume state."""
        track = self._track(track_id, "video")
        if track.first_ns is None and not keyframe and self._resume is None and not self.resumed:
            self._drop("before_keyframe")
            return
        payload = bytes(data)
        self._push(track, capture_ns, payload, len(payload), keyframe, ident)

    def push_picture(self, track_id: str, planes, fmt: str, width: int, height: int, capture_ns: int,
                     ident: Any = None) -> None:
        """A raw picture (an ndarray, or a tuple of planes): copied, since a bus slot is reused."""
        track = self._track(track_id, "picture")
        if isinstance(planes, np.ndarray):
            copy: Any = planes.copy()
            nbytes = copy.nbytes
        else:
            copy = tuple(np.array(p) for p in planes)
            nbytes = sum(p.nbytes for p in copy)
        track.info.setdefault("width", width)
        track.info.setdefault("height", height)
        track.info.setdefault("fmt", fmt)
        self._push(track, capture_ns, (copy, fmt), nbytes, True, ident)

    def push_audio(self, track_id: str, pcm: np.ndarray, capture_ns: int, rate: int | None = None,
                   ident: Any = None) -> None:
        """s16 samples, (samples,) or (samples, channels), capture_ns of the first sample."""
        track = self._track(track_id, "audio")
        if rate is not None and rate != self.cfg.audio_rate:
            self._refuse(f"track {track_id!r}: audio at {rate} Hz, the recording is at {self.cfg.audio_rate} Hz",
                         "bad_rate")
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16 or pcm.ndim not in (1, 2) or not len(pcm):
            self._refuse(f"track {track_id!r}: audio must be non-empty int16 (samples[, channels]), "
                         f"got {pcm.dtype} {pcm.shape}", "bad_audio")
        self._push(track, capture_ns, pcm.copy(), pcm.nbytes, True, ident)

    def _track(self, track_id: str, kind: str) -> _Track:
        track = self.tracks.get(track_id)
        if track is None:
            self._refuse(f"room recording: no track {track_id!r} was declared", "unknown_track")
        if track.kind != kind:
            self._refuse(f"track {track_id!r} is {track.kind}, not {kind}", "wrong_kind")
        return track

    def _refuse(self, message: str, reason: str):
        self.stats.dropped[reason] += 1
        raise RoomInputError(message, reason)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.stats.dropped[reason] += n

    def _push(self, track: _Track, capture_ns: int, payload, nbytes: int, keyframe: bool, ident: Any = None) -> None:
        capture_ns = int(capture_ns)
        if self._closed:
            self._drop("closed")
            return
        if track.missing:
            self._drop("missing")
            return
        if self._last_now is not None and capture_ns > self._last_now + self.cfg.future_s * NS:
            self._drop("future")
            return
        if self.t0 is not None and capture_ns < self.t0:
            self._drop("before_start")
            if track.kind == "video":
                track.gate = True
            return
        if track.first_ns is None:
            track.first_ns = capture_ns
            if self._first_item_ns is None or capture_ns < self._first_item_ns:
                self._first_item_ns = capture_ns
        self._seq += 1
        item = (capture_ns, self._seq, payload, nbytes, keyframe, ident)
        items = track.items
        if not items or capture_ns >= items[-1][0]:
            items.append(item)
        else:
            bisect.insort(items, item, key=lambda it: (it[0], it[1]))
        track.bytes += nbytes
        self._bound(track)

    def _bound(self, track: _Track) -> None:
        cfg, items = self.cfg, track.items
        span = cfg.buffer_seconds * NS
        while items and (len(items) > cfg.buffer_items or track.bytes > cfg.buffer_bytes
                         or items[-1][0] - items[0][0] > span):
            old = items.pop(0)
            track.bytes -= old[3]
            self._drop("overflow")
            if track.kind == "video":
                track.gate = True   # the frames after a hole do not decode: on from the next keyframe

    # ------------------------------------------------------------ writing
    def poll(self, now_ns: int) -> None:
        """Write everything captured before `now_ns - reorder_ms` (start the file when it is time)."""
        self._last_now = now_ns if self._last_now is None else max(self._last_now, now_ns)
        if self._closed or (self.t0 is None and not self._try_start(now_ns, force=False)):
            return
        ready = now_ns - int(self.cfg.reorder_ms * 1_000_000)
        while self.watermark < ready:
            self._step(min(ready, self.watermark + STEP_NS))

    def close(self) -> None:
        """Write everything buffered, finish the file. A recording that never started writes nothing."""
        if self._closed:
            return
        try:
            if self.t0 is None:
                self._try_start(self._last_now or 0, force=True)
            if self.t0 is not None:
                last = max((t.items[-1][0] for t in self.tracks.values() if t.items), default=self.watermark)
                while self.watermark < last:
                    self._step(min(last, self.watermark + STEP_NS))
                self._write_audio(max(self._mixer.end, self._audio_pos(self.watermark)), final=True)
        finally:
            self._closed = True
            if self.writer is not None:
                self.writer.close()

    def counters(self) -> dict:
        """A snapshot for metrics: frames/samples written, silence, drops by reason, late items."""
        s, rate = self.stats, self.cfg.audio_rate
        return {"frames": sum(s.frames.values()), "samples": s.samples, "silence_ms": s.silence_ms(rate),
                "dropped": dict(s.dropped), "late": s.late, "late_samples": s.late_samples,
                "trimmed_samples": s.trimmed_samples, "slips": s.slips, "pts_fixed": s.pts_fixed,
                "buffered_bytes": sum(t.bytes for t in self.tracks.values()), "missing": self.missing}

    def _try_start(self, now_ns: int, *, force: bool) -> bool:
        sent = [t for t in self.tracks.values() if t.first_ns is not None]
        if not sent:
            return False
        waited = now_ns - self._first_item_ns >= self.cfg.wait_s * NS
        if not (force or waited or len(sent) == len(self.tracks)):
            return False
        if self._resume is not None and self._continue():
            return True
        # The file starts with the first picture when there is one (audio before it is trimmed):
        # a fragmented MP4 has no edit list, so a video track that began after t0 would start
        # on a held still (see _write_video); this way the usual room (one camera) never needs it.
        pictures = [t for t in sent if t.kind != "audio"]
        self.t0 = min(t.first_ns for t in (pictures or sent))
        self.watermark = self.t0 - 1
        self.writer = self._factory(self.path, fragment_seconds=self.cfg.fragment_seconds, fsync=self.cfg.fsync,
                                    state=self._owner_state)
        for track in self.tracks.values():
            self._join(track)
        late = [t.id for t in self.tracks.values() if t.first_ns is None]
        log.info("room recording %s: started (t0=%d)%s", self.path, self.t0,
                 f"; not sent yet: {', '.join(late)}" if late else "")
        return True

    def _join(self, track: _Track) -> None:
        """Give a track its place in the file (at the start, or when declared after it)."""
        cfg, info = self.cfg, track.info
        if track.kind == "audio":
            if self._audio_out is None:
                if self._header_written():
                    track.missing = True
                    return
                self._audio_out = self.writer.add_audio(cfg.audio_rate, cfg.audio_channels, cfg.audio_codec)
                self._layout.append({"tid": None, "kind": "audio"})
            track.placer = AudioPlacer(self.t0, cfg.audio_rate, jitter_ms=cfg.jitter_ms, drift_ms=cfg.drift_ms)
            return
        if self._header_written():
            track.missing = True
            log.warning("room recording %s: video track %s came after the file started: not recorded",
                        self.path, track.id)
            return
        if track.kind == "picture":
            if not (info.get("width") and info.get("height")):
                track.missing = True
                return
            track.out = self.writer.add_video_encode(cfg.encoder, int(info["width"]), int(info["height"]),
                                                     "yuv420p", VIDEO_TB, cfg.encoder_options)
            self._layout.append({"tid": track.id, "kind": "picture", "width": int(info["width"]),
                                 "height": int(info["height"])})
            return
        width, height = info.get("width"), info.get("height")
        if not (width and height) and track.items:
            width, height = _h264_size(track.items[0][2])
        if not (width and height) or (track.first_ns is None and not info.get("extradata")):
            track.missing = True
            return
        track.out = self.writer.add_video_copy("h264", int(width), int(height), info.get("extradata"), VIDEO_TB)
        self._layout.append({"tid": track.id, "kind": "video", "width": int(width), "height": int(height)})

    # ------------------------------------------------------------ restarts
    def _owner_state(self) -> dict:
        """This recording's part of the resume state: its t0, its tracks in file order, and the
        last item placed of each audio session (video items are named by the writer's tokens)."""
        return {"kind": "room", "t0": self.t0, "layout": self._layout, "final": self.final,
                "rate": self.cfg.audio_rate,
                "audio": {t.id: t.last_ident for t in self.tracks.values() if t.kind == "audio" and t.last_ident},
                **(self.extra_state() if self.extra_state is not None else {})}

    def _continue(self) -> bool:
        """Continue the file the crash cut, if the sessions declared now are those of its tracks."""
        path, doc = self._resume
        self._resume = None
        owner = doc.get("owner") or {}
        layout = owner.get("layout") or []
        videos = {e["tid"] for e in layout if e.get("kind") != "audio"}
        declared = {t.id for t in self.tracks.values() if t.kind != "audio"}
        fits = (owner.get("kind") == "room" and owner.get("t0") and videos == declared
                and all(e.get("kind") != "picture" for e in layout)  # a new encoder's parameter sets differ
                and all(self.tracks[e["tid"]].kind == e["kind"] for e in layout if e.get("kind") != "audio"))
        if not fits:
            log.info("room recording %s: its sessions are not those of %s: a new file", self.path, path)
            for track in self.tracks.values():
                track.gate = track.kind == "video"  # a new file starts each video track at a keyframe
            return False
        cfg = self.cfg
        self.path, self.t0 = str(path), int(owner["t0"])
        self.writer = self._factory(self.path, fragment_seconds=cfg.fragment_seconds, fsync=cfg.fsync,
                                    state=self._owner_state, resume=doc)
        marks = []
        for e in layout:
            if e["kind"] == "audio":
                self._audio_out = self.writer.add_audio(cfg.audio_rate, cfg.audio_channels, cfg.audio_codec)
                if self._audio_out.next_input is not None:  # the mixer on from where the writer re-encodes
                    self._mixer.base = self._mixer.end = self._audio_out.next_input
                    marks.append(self.t0 + self._mixer.base * NS // cfg.audio_rate)
                continue
            track = self.tracks[e["tid"]]
            track.out = self.writer.add_video_copy("h264", int(e["width"]), int(e["height"]), None, VIDEO_TB)
            track.last_pts = track.out.last_pts
            tok = track.out.saved.get("tok")
            if tok:
                marks.append(int(tok[2]))
        self._layout = [dict(e) for e in layout]
        for track in self.tracks.values():
            if track.kind == "audio":
                track.placer = AudioPlacer(self.t0, cfg.audio_rate, jitter_ms=cfg.jitter_ms, drift_ms=cfg.drift_ms)
        self.watermark = max(self.t0, min(marks, default=self.t0)) - 1
        self.resumed = True
        log.info("room recording %s: continued after the restart (t0=%d)", self.path, self.t0)
        return True

    def continue_track(self, track_id: str, exact: bool) -> None:
        """After a restart, the next item of a video session follows the file's last exactly (it
        decodes after it: no keyframe needed), or comes after a hole (it waits for a keyframe)."""
        track = self.tracks.get(track_id)
        if track is not None and track.kind == "video":
            track.gate = not exact

    def gap(self, track_id: str) -> None:
        """A hole in a session's items (its producer restarted): video waits for a keyframe."""
        track = self.tracks.get(track_id)
        if track is not None and track.kind == "video":
            track.gate = True

    def _header_written(self) -> bool:
        return self.watermark is not None and self.watermark >= self.t0

    def _step(self, until: int) -> None:
        for track in list(self.tracks.values()):
            self._drain(track, until)
        self._write_audio(self._audio_pos(until) - self._jitter_samples)
        self.watermark = until

    def _drain(self, track: _Track, until: int) -> None:
        items = track.items
        n = bisect.bisect_right(items, until, key=lambda it: it[0])
        if not n:
            return
        ready = items[:n]
        del items[:n]
        track.bytes -= sum(it[3] for it in ready)
        if track.missing or (track.out is None and track.placer is None):
            self._drop("missing", n)
            return
        for capture_ns, _seq, payload, _nbytes, keyframe, ident in ready:
            if capture_ns <= self.watermark:
                self.stats.late += 1
            if track.kind == "audio":
                self._place(track, capture_ns, payload)
                track.last_ident = ident
            else:
                self._write_video(track, capture_ns, payload, keyframe, ident)

    def _write_video(self, track: _Track, capture_ns: int, payload, keyframe: bool, ident: Any = None) -> None:
        if track.gate:
            if not keyframe:
                self._drop("gop_gap")
                return
            track.gate = False
        pts = ((capture_ns - self.t0) * VIDEO_TB.denominator + NS // 2) // NS
        if track.last_pts is None and pts > 0:
            # A fragmented MP4 has no edit list: players start every track at time 0, so a
            # track whose first picture comes after t0 would play early by that much. Its
            # first picture (a keyframe) is written at 0 too, and held until its own time.
            self._put_video(track, payload, 0, keyframe)
            self.stats.held_start += 1
        if track.last_pts is not None and pts <= track.last_pts:
            pts = track.last_pts + 1
            self.stats.pts_fixed += 1
        self._put_video(track, payload, pts, keyframe, ident)
        self.stats.frames[track.id] += 1
        track.last_ident = ident

    def _put_video(self, track: _Track, payload, pts: int, keyframe: bool, ident: Any = None) -> None:
        track.last_pts = pts
        if track.kind == "video":
            self.writer.write_packet(track.out, payload, pts, keyframe=keyframe, token=ident)
        else:
            picture, fmt = payload
            self.writer.write_picture(track.out, picture, fmt, pts, token=ident)

    def _place(self, track: _Track, capture_ns: int, pcm: np.ndarray) -> None:
        p = track.placer.place(capture_ns, len(pcm))
        s = self.stats
        s.trimmed_samples += p.trimmed
        s.slips += bool(p.slipped)
        late = self._mixer.late
        self._mixer.add(p.pos, pcm[p.skip:] if p.skip else pcm)
        s.late_samples += self._mixer.late - late

    def _audio_pos(self, capture_ns: int) -> int:
        return ((capture_ns - self.t0) * self.cfg.audio_rate + NS // 2) // NS

    def _write_audio(self, until: int, *, final: bool = False) -> None:
        """Hand the mixed span up to `until` to the writer, in whole encoder frames (AAC_FRAME samples:
        the writer's audio position then always equals the encoder's); the last one padded with silence."""
        if self._audio_out is None:
            return
        n = until - self._mixer.base
        n = -(-n // AAC_FRAME) * AAC_FRAME if final else n - n % AAC_FRAME
        if n <= 0:
            return
        pcm, start, silent = self._mixer.take(self._mixer.base + n)
        if not len(pcm):
            return
        self.writer.write_audio(self._audio_out, pcm, start)
        self.stats.samples += len(pcm)
        self.stats.silence_samples += silent


def _h264_size(au: bytes) -> tuple[int, int]:
    """Width and height of an H.264 keyframe (decoded once, when a declaration did not say)."""
    import av
    ctx = av.CodecContext.create("h264", "r")
    try:
        for frame in ctx.decode(av.Packet(au)):
            return frame.width, frame.height
        for frame in ctx.decode(None):
            return frame.width, frame.height
    except av.FFmpegError:
        pass
    return 0, 0
