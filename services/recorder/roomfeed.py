"""A `room:NAME` target: the streams of the room's sessions, from the bus into one RoomRecorder.

The hub knows which sessions are in a room and which streams carry their tracks (the
`sessions` command: each track has `kind`, `stream`, `format`). The service asks it once
a second and hands the answer to `RoomFeed.sessions()`, which attaches a framebus consumer
(from the oldest item the ring holds) to each new track's stream and declares the track to
services/recorder/room.py's RoomRecorder (an encoded video stream as "video", a raw one as
"picture", audio as "audio"), and removes the tracks of sessions that left. Writing waits
until two answers in a row list the same tracks: a session's audio track appears with its
first chunk, a moment after its video, and could not join a file already begun.

`pump(now_ns)` (every 100 ms from the service loop) drains every consumer into the
recorder (from its first answer on, settled or not) and, once settled, lets it write what
is older than its reorder window. Capture's rings hold `history_seconds` (10 s by
default), so a 100 ms pump misses nothing; an item a consumer missed is counted.

One recording = one file (`DIR/room-NAME/room-NAME-TIME.mp4.partial`, renamed at the end);
after `segment_seconds` the file is closed and the next one starts with the following
items. A full disk ends the file at its last whole fragment (room.py's writer is mp4.py's).

Restarts (`resume()`): given the resume state of the room's last file (and the file, when
a crash cut it), each session's items the file already holds are skipped (video by ring
generation and sequence, audio by time), the file is continued when the sessions are
those of its tracks (room.py), and a session whose next item does not follow the file's
last (the recorder was down longer than the ring's history, or the source restarted) is a
`record.gap`. A room that starts afresh takes at most FRESH_HISTORY_S of the rings'
history. While recording, a session whose producer restarts (a new ring generation) is a
`record.gap` {reason: "source"} too: its items go on at their capture times.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import framebus
from services.recorder import segments
from services.recorder.mp4 import AUDIO_PREROLL, DiskFull, Mp4Error, boot_id, read_state, state_extent
from services.recorder.room import RoomConfig, RoomInputError, RoomRecorder

__all__ = ["RoomFeed"]

log = logging.getLogger("edgeroom.recorder")

Emit = Callable[[str, dict], None]
CODECS = ("h264",)
FRESH_HISTORY_S = 2.0       # a room recording with nothing to resume starts this far back in the rings
GAP_MIN_NS = 100_000_000
NS_PER_S = 1_000_000_000    # a hole shorter than this (plus an item) is jitter, not a gap


class RoomFeed:
    def __init__(self, target: str, root: Path, prefix: str, emit: Emit, *, segment_seconds: float = 300.0,
                 fragment_seconds: float = 0.5, fsync: bool = True, encoder: str = "libx264",
                 encoder_options: dict[str, str] | None = None, metrics=None, resume: bool = True) -> None:
        self.target, self.room = target, target.split(":", 1)[1]
        self.root, self.prefix, self.emit = Path(root), prefix, emit
        self.segment_seconds = segment_seconds
        self.cfg = RoomConfig(fragment_seconds=fragment_seconds, fsync=fsync, encoder=encoder)
        if encoder_options is not None:
            self.cfg.encoder_options = dict(encoder_options)
        self.consumers: dict[str, tuple[framebus.Consumer, str]] = {}  # track id -> (consumer, kind)
        self.infos: dict[str, dict] = {}  # track id -> what the hub said of it (width, height)
        self.rec: RoomRecorder | None = None
        self.path: Path | None = None
        self.opened_ns = 0
        self.segments = 0
        self.frames = 0
        self.last_path: Path | None = None
        self.last_error = ""
        self.state = "waiting"
        self.started = False
        self._last_tracks: list[str] | None = None
        self.settled = False    # the hub listed the same tracks twice in a row: the recording may start
        self.m = metrics
        # restarts and gaps
        self.at: dict | None = None      # where the last file ends (resume()): what to skip
        self.cont: tuple[Path, dict] | None = None  # the file the crash cut, to continue
        self.resuming: set[str] = set()  # tracks still skipping what the last file holds
        self.rejoined: set[str] = set()  # tracks back after leaving, their first item not yet seen
        self.last: dict[str, tuple[int, int, int]] = {}  # track -> (generation, seq, capture_ns) last pushed
        self.interval: dict[str, int] = {}  # track -> ns between its last two items
        self.gaps: dict[str, float] = {}
        self.pending_gap: dict[str, tuple[str, int, int]] = {}  # track -> (reason, after, interval): to report
        self.final = False
        self.started_ns = time.monotonic_ns()
        # what a room with nothing to resume takes of the rings' history (resume off: the live edge)
        self.fresh_ns = int(FRESH_HISTORY_S * NS_PER_S) if resume else 0

    # ------------------------------------------------------------ sessions
    def sessions(self, sessions: list[dict]) -> None:
        """The hub's current sessions of the room: attach and declare new tracks, drop gone ones."""
        seen = set()
        for s in sessions:
            if not isinstance(s, dict) or not isinstance(s.get("tracks"), list):
                continue
            for t in s["tracks"]:
                if not isinstance(t, dict) or not isinstance(t.get("stream"), str) or not t.get("id"):
                    continue
                stream, fmt = t["stream"], t.get("format", "")
                tid = f"{s.get('session', '?')}/{t['id']}"
                seen.add(tid)
                if tid in self.consumers:
                    continue
                kind = "audio" if t.get("kind") == "audio" else "video" if fmt in CODECS else "picture"
                info = {k: t[k] for k in ("width", "height") if t.get(k)}
                rec = self._recorder()  # a new file declares the tracks already known; this one is new to it
                if tid in self.last:
                    self.rejoined.add(tid)  # back after leaving: its first item decides if it goes straight on
                consumer = framebus.Consumer.attach(stream, prefix=self.prefix, missing_ok=True, start="oldest")
                self.consumers[tid] = (consumer, kind)
                if self.at is not None and tid not in self.last and (
                        tid in self.at["video"] if kind != "audio" else self.at["audio_end"] is not None):
                    self.resuming.add(tid)
                self.infos[tid] = info
                rec.declare(tid, kind, info)
                if self.state != "disk_full":
                    self._drain(rec, tid)  # at once: a full ring's oldest items go with the producer's next sends
                log.info("%s: recording track %s (%s, stream %s)", self.target, tid, kind, stream)
        tracks = sorted(seen)
        if tracks and tracks == self._last_tracks:
            self.settled = True
        self._last_tracks = tracks
        for tid in [t for t in self.consumers if t not in seen]:
            consumer, _ = self.consumers.pop(tid)
            self.infos.pop(tid, None)
            consumer.close()
            if self.rec is not None:
                self.rec.remove(tid)
            log.info("%s: track %s left", self.target, tid)

    def _recorder(self) -> RoomRecorder:
        if self.rec is None:
            self.path = segments.new_path(self.root, self.target)
            self.rec = RoomRecorder(str(self.path), self.cfg, resume=self.cont)
            self.rec.extra_state = self._extra_state
            self.opened_ns = time.monotonic_ns()
            for tid, (_, kind) in self.consumers.items():  # the next segment: the tracks go on
                self.rec.declare(tid, kind, self.infos.get(tid))
        return self.rec

    # ------------------------------------------------------------ items
    def pump(self, now_ns: int) -> None:
        """Drain the streams into the recorder and let it write. The writing waits until the session
        list settled: a session's tracks appear one by one (audio with its first chunk), and a track
        declared after the file's header cannot join. The reading does not wait: what arrives
        meanwhile goes into the recorder's bounded buffers, not left in the rings (a ring with a
        short history could lose it; a settled list takes a second or two)."""
        if not self.consumers or self.state == "disk_full":
            return
        rec = self._recorder()
        try:
            for tid in self.consumers:
                self._drain(rec, tid)
            if not self.settled:
                return
            rec.poll(now_ns)
            if rec.started and self.cont is not None:
                self._settle_cont(rec)
            if rec.started and not self.started:
                self.started = True
                self.state = "recording"
                self.emit("record.started", {"target": self.target, "path": str(self.path), "encoder": "copy"})
        except Mp4Error as exc:
            self._fail(exc)
            return
        if rec.started and now_ns - rec.t0 >= self.segment_seconds * NS_PER_S:  # (a continued file: its own t0)
            self._finish()

    def _drain(self, rec: RoomRecorder, tid: str) -> None:
        consumer, kind = self.consumers[tid]
        while (item := consumer.poll()) is not None:
            self._push(rec, tid, kind, item)

    def _push(self, rec: RoomRecorder, tid: str, kind: str, item) -> None:
        if self._skip(rec, tid, kind, item):
            return
        ident = (item.generation, item.seq, item.capture_ns)
        try:
            if kind == "audio" and item.kind == "audio":
                pcm = item.array.view(np.int16).reshape(-1, item.channels)
                if item.channels != self.cfg.audio_channels:
                    pcm = pcm.mean(axis=1, dtype=np.int32).astype(np.int16)  # mixed to the recording's mono
                rec.push_audio(tid, pcm, item.capture_ns, item.rate, ident=ident)
            elif kind == "video" and item.kind == "encoded":
                rec.push_video(tid, item.array, item.capture_ns, item.keyframe, ident=ident)
            elif kind == "picture" and item.kind == "video":
                rec.push_picture(tid, item.planes(), item.format, item.width, item.height, item.capture_ns,
                                 ident=ident)
            else:
                return
        except RoomInputError as exc:
            log.debug("%s: %s", self.target, exc)
            return
        if item.valid():
            self.frames += kind != "audio"

    # ------------------------------------------------------------ restarts and gaps
    def resume(self, doc: dict | None, partial: Path | None = None) -> None:
        """Take up where the room's last file ends (its resume state), continuing `partial` (that
        file, repaired) when the crash cut it. Call before the first sessions() answer."""
        at = self._resume_point(doc)
        if at is None:
            if partial is not None:
                self._close_cont(partial, "its resume state is of another boot or has no position")
            return
        self.at = at
        self.cont = (partial, doc) if partial is not None else None
        log.info("%s: resuming after %s (video: %s)", self.target, partial or "the last segment",
                 ", ".join(f"{t} item {p[1]}" for t, p in at["video"].items()) or "none")

    def _resume_point(self, doc: dict | None) -> dict | None:
        if not isinstance(doc, dict) or doc.get("boot") != boot_id():
            return None
        owner = doc.get("owner") or {}
        tracks = doc.get("tracks") or []
        if owner.get("kind") != "room" or not owner.get("t0"):
            return None
        t0, rate = int(owner["t0"]), int(owner.get("rate") or self.cfg.audio_rate)
        at = {"video": {}, "audio_end": None, "final": bool(owner.get("final")),
              "interval": owner.get("interval") or {}, "audio": owner.get("audio") or {}}
        for e, saved in zip(owner.get("layout") or [], tracks):
            if e.get("kind") == "audio":
                if saved.get("end") is not None:
                    end = int(saved["end"])
                    at["audio_end"] = t0 + end * NS_PER_S // rate
                    at["audio_from"] = t0 + (end - AUDIO_PREROLL * 1024) * NS_PER_S // rate
            elif saved.get("tok"):
                at["video"][e["tid"]] = tuple(int(x) for x in saved["tok"][:3])
        return at

    def _extra_state(self) -> dict:
        return {"interval": dict(self.interval)}

    def _skip(self, rec: RoomRecorder, tid: str, kind: str, item) -> bool:
        """Whether an item is one the last file holds, or older than a fresh start takes. The first
        of a track that is not ends its resume; a hole before it (or a producer that restarted
        while recording) is a gap."""
        gen, seq, cap = item.generation, item.seq, item.capture_ns
        last = self.last.get(tid)
        if last is not None:
            if gen == last[0] and seq <= last[1]:
                return True  # a consumer attached again (the session came back) reads from the oldest
            if gen != last[0]:
                self._gap(rec, tid, "source", last[2], self.interval.get(tid, 0))
            elif tid in self.rejoined and seq != last[1] + 1:  # the ring no longer held what followed
                self._gap(rec, tid, "overrun", last[2], self.interval.get(tid, 0))
            self.rejoined.discard(tid)
        elif tid in self.resuming:
            at = self.at
            if kind == "audio":
                end = item.array.shape[0] * NS_PER_S // max(1, item.rate)
                if cap + end <= at["audio_from"]:
                    return True
                same = (at["audio"].get(tid) or [None])[0] == gen
                hole, after, interval = cap - at["audio_end"], at["audio_end"], 0
            else:
                pos = at["video"][tid]
                same = gen == pos[0]
                if same and seq <= pos[1]:
                    return True
                exact = same and seq == pos[1] + 1
                rec.continue_track(tid, exact)
                after, interval = pos[2], int(at["interval"].get(tid, 0))
                hole = 0 if exact else cap - after - interval
            self.resuming.discard(tid)
            log.info("%s: track %s resumes with item %d%s", self.target, tid, seq,
                     "" if hole <= 0 else f", {hole / 1e9:.3f} s after the file's end")
            if not at["final"] and hole >= GAP_MIN_NS:
                self._gap(rec, tid, "overrun" if same else "source", after, interval)
        elif cap < self.started_ns - self.fresh_ns:
            return True
        if tid in self.pending_gap and (kind != "video" or item.keyframe):  # the first item written after it
            reason, after, interval = self.pending_gap.pop(tid)
            self._report_gap(tid, reason, cap - after - interval)
        if last is not None and cap > last[2]:
            self.interval[tid] = cap - last[2]
        self.last[tid] = (gen, seq, cap)
        return False

    def _gap(self, rec: RoomRecorder, tid: str, reason: str, after_ns: int, interval_ns: int) -> None:
        """A hole in a session's items after `after_ns`: reported with the first item written after
        it (for video the next keyframe: the frames after a hole do not decode)."""
        rec.gap(tid)
        self.pending_gap[tid] = (reason, after_ns, interval_ns)

    def _report_gap(self, tid: str, reason: str, hole_ns: int) -> None:
        if hole_ns < GAP_MIN_NS:
            return
        seconds = round(hole_ns / 1e9, 3)
        self.gaps[reason] = round(self.gaps.get(reason, 0.0) + seconds, 3)
        log.warning("%s: track %s: %.3f s missing (%s)", self.target, tid, seconds, reason)
        if self.m is not None:
            self.m.gaps.labels(self.target, reason).inc()
            self.m.gap_seconds.labels(self.target, reason).inc(seconds)
        self.emit("record.gap", {"target": self.target, "track": tid, "reason": reason, "seconds": seconds,
                                 "path": str(self.path or "")})

    def _settle_cont(self, rec: RoomRecorder) -> None:
        """The recording started: in the file the crash cut, or (the sessions differ) in a new one."""
        path, _ = self.cont
        self.cont = None
        if rec.resumed:
            self.path = Path(rec.path)
            self.emit("record.resumed", {"target": self.target, "path": str(self.path), "appended": True})
        else:
            self._close_cont(path, "the room's sessions changed during the restart")

    def _close_cont(self, path: Path, why: str) -> None:
        log.info("%s: %s: %s is finished as it is", self.target, why, path)
        try:
            final = segments.finish(path)
        except OSError as exc:
            log.warning("%s: cannot finish %s: %s", self.target, path, exc)
            return
        self.segments += 1
        self.last_path = final
        seconds, frames = state_extent(read_state(final))
        self.emit("record.segment", {"target": self.target, "path": str(final), "duration": seconds,
                                     "frames": frames, "bytes": os.path.getsize(final)})

    # ------------------------------------------------------------ the end
    def _finish(self) -> Path | None:
        rec, self.rec = self.rec, None
        if rec is None:
            return None
        rec.final = self.final
        try:
            rec.close()
        except Mp4Error as exc:
            self.last_error = str(exc)
        path = Path(rec.path)
        if not rec.started or not path.exists() or os.path.getsize(path) == 0:
            path.unlink(missing_ok=True)
            return None
        final = segments.finish(path)
        self.segments += 1
        self.last_path = final
        w = rec.writer
        self.emit("record.segment", {"target": self.target, "path": str(final),
                                     "duration": round(w.duration, 3) if w else 0.0,
                                     "frames": w.frames if w else 0, "bytes": os.path.getsize(final)})
        return final

    def _fail(self, exc: Mp4Error) -> None:
        """The file ends where its last whole fragment did. A full disk pauses the room until
        `resume_if_space()` sees room again; another error starts a new file at the next pump."""
        self.last_error = str(exc)
        full = isinstance(exc, DiskFull)
        log.error("%s: %s; %s", self.target, exc, "paused until space returns" if full else "a new file begins")
        self.emit("record.error", {"target": self.target, "reason": exc.reason, "message": str(exc)})
        self._finish()
        if full:
            self.state = "disk_full"

    def resume_if_space(self, min_free: int) -> bool:
        if self.state != "disk_full" or segments.free_bytes(self.root)[0] < min_free:
            return False
        log.info("%s: space is back: a new file begins", self.target)
        self.state, self.last_error, self.started = "waiting", "", False
        return True

    def stop(self, final: bool = True) -> Path | None:
        """Finish and stop; `final` as StreamRecorder.stop."""
        self.final = final
        path = self._finish()
        if self.cont is not None:
            self._close_cont(self.cont[0], "the recording stops")
            self.cont = None
        for consumer, _ in self.consumers.values():
            consumer.close()
        self.consumers.clear()
        self.state = "stopped"
        self.emit("record.stopped", {"target": self.target, "segments": self.segments, "frames": self.frames,
                                     "path": str(path or self.last_path or "")})
        return path

    def describe(self) -> dict:
        counters = self.rec.counters() if self.rec is not None else {}
        return {"target": self.target, "state": self.state, "path": str(self.path or self.last_path or ""),
                "encoder": "copy", "hardware": False, "note": "", "segments": self.segments, "frames": self.frames,
                "bytes": 0, "segment_seconds": 0.0, "error": self.last_error, "tracks": sorted(self.consumers),
                "gaps": dict(self.gaps),
                "missing": counters.get("missing", []), "dropped": counters.get("dropped", {})}
