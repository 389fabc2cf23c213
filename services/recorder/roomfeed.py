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
is older than its reorder window. Rings hold 1.3 s (audio) to two seconds, so a 100 ms
pump misses nothing; an item a consumer missed is counted.

One recording = one file (`DIR/room-NAME/room-NAME-TIME.mp4.partial`, renamed at the end);
after `segment_seconds` the file is closed and the next one starts with the following
items. A full disk ends the file at its last whole fragment (room.py's writer is mp4.py's).
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
from services.recorder.mp4 import DiskFull, Mp4Error
from services.recorder.room import RoomConfig, RoomInputError, RoomRecorder

__all__ = ["RoomFeed"]

log = logging.getLogger("edgeroom.recorder")

Emit = Callable[[str, dict], None]
CODECS = ("h264",)


class RoomFeed:
    def __init__(self, target: str, root: Path, prefix: str, emit: Emit, *, segment_seconds: float = 300.0,
                 fragment_seconds: float = 0.5, fsync: bool = True, encoder: str = "libx264",
                 encoder_options: dict[str, str] | None = None) -> None:
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
                consumer = framebus.Consumer.attach(stream, prefix=self.prefix, missing_ok=True, start="oldest")
                self.consumers[tid] = (consumer, kind)
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
            self.rec = RoomRecorder(str(self.path), self.cfg)
            self.opened_ns = time.monotonic_ns()
            for tid, (_, kind) in self.consumers.items():  # the next segment: the tracks go on
                self.rec.declare(tid, kind, self.infos.get(tid))
        return self.rec

    # ------------------------------------------------------------ items
    def pump(self, now_ns: int) -> None:
        """Drain the streams into the recorder and let it write. The writing waits until the session
        list settled: a session's tracks appear one by one (audio with its first chunk), and a track
        declared after the file's header cannot join. The reading does not wait: what arrives
        meanwhile goes into the recorder's bounded buffers, not left in the rings (an audio ring
        holds 1.3 s; a settled list takes a second or two), so no item is lost to the wait."""
        if not self.consumers or self.state == "disk_full":
            return
        rec = self._recorder()
        try:
            for tid in self.consumers:
                self._drain(rec, tid)
            if not self.settled:
                return
            rec.poll(now_ns)
            if rec.started and not self.started:
                self.started = True
                self.state = "recording"
                self.emit("record.started", {"target": self.target, "path": str(self.path), "encoder": "copy"})
        except Mp4Error as exc:
            self._fail(exc)
            return
        if rec.started and now_ns - self.opened_ns >= self.segment_seconds * 1e9:
            self._finish()

    def _drain(self, rec: RoomRecorder, tid: str) -> None:
        consumer, kind = self.consumers[tid]
        while (item := consumer.poll()) is not None:
            self._push(rec, tid, kind, item)

    def _push(self, rec: RoomRecorder, tid: str, kind: str, item) -> None:
        try:
            if kind == "audio" and item.kind == "audio":
                pcm = item.array.view(np.int16).reshape(-1, item.channels)
                if item.channels != self.cfg.audio_channels:
                    pcm = pcm.mean(axis=1, dtype=np.int32).astype(np.int16)  # mixed to the recording's mono
                rec.push_audio(tid, pcm, item.capture_ns, item.rate)
            elif kind == "video" and item.kind == "encoded":
                rec.push_video(tid, item.array, item.capture_ns, item.keyframe)
            elif kind == "picture" and item.kind == "video":
                rec.push_picture(tid, item.planes(), item.format, item.width, item.height, item.capture_ns)
            else:
                return
        except RoomInputError as exc:
            log.debug("%s: %s", self.target, exc)
            return
        if item.valid():
            self.frames += kind != "audio"

    # ------------------------------------------------------------ the end
    def _finish(self) -> Path | None:
        rec, self.rec = self.rec, None
        if rec is None:
            return None
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

    def stop(self) -> Path | None:
        path = self._finish()
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
                "missing": counters.get("missing", []), "dropped": counters.get("dropped", {})}
