"""The recorder service: bus streams -> crash-safe fragmented MP4 segments on disk.

One process (`edgeroom service recorder`, unit `edgeroom-recorder`) records any number
of targets. A target is a bus stream (NAME: encoded, remuxed; NAME-raw or any stream of
pictures: encoded here; NAME-audio: AAC) or `room:NAME` (services/recorder/room.py,
when present). Targets come from `[recorder] record` at start and on reload, and from
the commands `record.start {target}`, `record.stop {target}`, `record.list {}`.

Everything runs on the service loop: one framebus consumer per target, drained every
DRAIN_SECONDS in a bounded batch per turn (not woken per frame: see _drain) and feeding
services.recorder.stream.StreamRecorder. Once a second: attach to streams that appeared (a
stream that closed finishes its segment; one whose producer died and comes back goes on in
it, after a gap), resume recordings paused by a full disk when space is back. Once a
minute (and after each segment): retention (services/recorder/segments).
At start, `.partial` files a crash left are repaired; with `[recorder] resume` (the
default) each target takes up where its last file ends, from the ring's history, and
continues the file the crash cut (stream.py, "Restarts"); the other leftovers are renamed.
With `resume = false` a target starts at the live edge, in a new segment.

Events: record.started, record.resumed, record.segment, record.gap (reason overrun or
source, seconds), record.stopped, record.error (reason disk_full, encode, mux, io, ...).
Metrics: edgeroom_recorder_*. docs/recorder.md has the details.
"""
from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

import framebus
from services.control.protocol import ProtocolError
from services.recorder import encoder as encoders
from services.recorder import segments
from services.recorder.roomfeed import RoomFeed
from services.recorder.spec import TARGET
from services.recorder.stream import Settings, StreamRecorder
from services.runtime.schema import parse_list
from services.runtime.service import Service
from services.runtime.state import Overlay, state_dir

__all__ = ["Recorder", "recordings_dir"]

BATCH_ITEMS = 32
BATCH_SECONDS = 0.05
SWEEP_SECONDS = 60.0
ROOM_PROBE_SIZE = (640, 480)  # the size the encoder probe of a room's raw sessions runs at
DRAIN_SECONDS = 0.1         # every target's ring (and every room's streams) is drained this often
TARGETS_FILE = "recordings.json"  # targets started and stopped by command, over [recorder] record
EARLY_EVENTS = 256          # events kept until the hub link is up


def recordings_dir(config) -> Path:
    """[recorder] dir, else recordings/ in the box's state directory."""
    return Path(config.recorder.dir) if config.recorder.dir else state_dir(config) / "recordings"


def min_free_bytes(fs_size: int) -> int:
    """Free space needed before a recording paused by a full disk resumes: 2% of the
    filesystem, at least 256 KiB, at most 64 MiB."""
    return max(256 * 1024, min(64 * 1024 * 1024, fs_size // 50))


class _Metrics:
    def __init__(self, r) -> None:
        self.bytes = Counter("edgeroom_recorder_bytes", "Bytes written to recordings (whole fragments).",
                             ["target"], registry=r)
        self.frames = Counter("edgeroom_recorder_frames", "Frames (access units, pictures, audio chunks) recorded.",
                              ["target"], registry=r)
        self.segments = Counter("edgeroom_recorder_segments", "Segments completed.", ["target"], registry=r)
        self.errors = Counter("edgeroom_recorder_errors", "Recording errors, by reason (disk_full, encode, mux, io).",
                              ["target", "reason"], registry=r)
        self.dropped = Counter("edgeroom_recorder_dropped", "Items not recorded, by reason (waiting_keyframe, "
                               "disk_full, overwritten, missed).", ["target", "reason"], registry=r)
        self.recording = Gauge("edgeroom_recorder_recording", "1 while the target is being recorded.", ["target"],
                               registry=r)
        self.encoder = Gauge("edgeroom_recorder_encoder", "1 for the encoder in use (copy: remux); hardware says "
                             "whether it is a hardware encoder.", ["target", "name", "hardware"], registry=r)
        self.flush = Histogram("edgeroom_recorder_fragment_flush_seconds", "Time to write and fsync one fragment.",
                               ["target"], registry=r,
                               buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1.0))
        self.deleted = Counter("edgeroom_recorder_deleted_segments", "Segments deleted by retention.", registry=r)
        self.recovered = Counter("edgeroom_recorder_recovered_segments", "Segments left by a crash, by outcome "
                                 "(kept: repaired and renamed; removed: no media; continued: repaired, and the "
                                 "restarted recorder writes on in it).", ["outcome"], registry=r)
        self.gaps = Counter("edgeroom_recorder_gaps", "Holes in a recording's timeline, by reason (overrun: the "
                            "recorder was down longer than the ring's history; source: the source was away).",
                            ["target", "reason"], registry=r)
        self.gap_seconds = Counter("edgeroom_recorder_gap_seconds", "Seconds missing from recordings, by reason "
                                   "(as edgeroom_recorder_gaps).", ["target", "reason"], registry=r)


class _Target:
    __slots__ = ("name", "consumer", "rec", "missed_seen", "again")

    def __init__(self, name: str, consumer: framebus.Consumer, rec: StreamRecorder) -> None:
        self.name, self.consumer, self.rec = name, consumer, rec
        self.missed_seen = 0
        self.again = False


class Recorder(Service):
    kind = "recorder"

    # ------------------------------------------------------------ life cycle
    def setup(self) -> None:
        self.root = recordings_dir(self.config)
        self.root.mkdir(parents=True, exist_ok=True)
        self.m = _Metrics(self.registry)
        self.targets: dict[str, _Target] = {}
        self.rooms: dict[str, RoomFeed] = {}
        self._early: list[tuple[str, dict]] = []  # events from before the hub answered (_emit)
        self.on_stop(self._stop_all, "the recordings")
        wanted = self._wanted()
        # the file each target was writing when the recorder died: continued, not renamed
        cut = {t: p for t in wanted if self.config.recorder.resume
               and (p := segments.newest_partial(self.root, t)) is not None}
        got = segments.recover(self.root, keep=set(cut.values()))
        for p in got.kept:
            self.log.warning("recovered %s, left by a crash (cut after its last whole fragment)", p)
        for p in got.removed:
            self.log.warning("removed %s, left by a crash with no media in it", p)
        for p in got.continued:
            self.log.info("%s was cut by a crash; its recording continues in it", p)
        self.m.recovered.labels("kept").inc(len(got.kept))
        self.m.recovered.labels("removed").inc(len(got.removed))
        self.m.recovered.labels("continued").inc(len(got.continued))
        self._cut = {t: p for t, p in cut.items() if p in got.continued}
        self._sweep()
        self.loop.every(1.0, self._tick)
        self.loop.every(DRAIN_SECONDS, self._drain)
        self.loop.every(SWEEP_SECONDS, self._sweep)
        self.offer("record.start", self.cmd_start, "start recording a target: {target: STREAM | room:NAME}",
                   args={"target": str}, required=("target",))
        self.offer("record.stop", self.cmd_stop, "stop recording a target: {target}",
                   args={"target": str}, required=("target",))
        self.offer("record.list", self.cmd_list, "the recordings in progress and the recordings directory")
        for target in wanted:
            self.start(target)
        self.log.info("recordings in %s; recording %s", self.root, ", ".join(self.targets) or "nothing yet")

    def _stop_all(self) -> None:
        for name in [*self.targets, *self.rooms]:
            self.stop(name, final=False)  # the next run takes up where these files end

    def apply(self, new, changes) -> list[str]:
        pending = [c.key for c in changes if not c.live]
        old_targets = set(parse_list(self.config.recorder.record))
        new_targets = set(parse_list(new.recorder.record))
        self.config = new  # segments opened from now on use the new settings
        for t in self.targets.values():
            t.rec.settings = self._settings()
        for name in sorted(old_targets - new_targets):
            if name in self.targets or name in self.rooms:
                self.stop(name)
        for name in sorted(new_targets - old_targets):
            self.start(name)
        return pending

    def _settings(self) -> Settings:
        c = self.config.recorder
        return Settings(segment_seconds=c.segment_seconds, fragment_seconds=c.fragment_seconds, encoder=c.encoder,
                        crf=c.crf, preset=c.preset, bitrate_kbps=c.bitrate, gop_seconds=c.gop, fsync=c.fsync)

    # ------------------------------------------------------------ targets
    def start(self, name: str) -> _Target | RoomFeed:
        if name in self.targets:
            return self.targets[name]
        if name in self.rooms:
            return self.rooms[name]
        if not TARGET.fullmatch(name):
            raise ProtocolError("bad_args", f"target must be a stream name or room:NAME, got {name!r}")
        if name.startswith("room:"):
            c = self.config.recorder
            choice = encoders.choose(c.encoder, ROOM_PROBE_SIZE[0], ROOM_PROBE_SIZE[1])  # for raw sessions
            options = encoders.encoder_options(choice.name, crf=c.crf, preset=c.preset, bitrate_kbps=c.bitrate)
            feed = RoomFeed(name, self.root, self.config.bus.prefix, self._emit, segment_seconds=c.segment_seconds,
                            fragment_seconds=c.fragment_seconds, fsync=c.fsync, encoder=choice.name,
                            encoder_options=options, metrics=self.m, resume=c.resume)
            partial = self._cut.pop(name, None)
            if c.resume:
                doc, _ = segments.last_state(self.root, name)
                feed.resume(doc, partial)
            self.rooms[name] = feed
            self.m.recording.labels(name).set(1)
            self.log.info("recording %s (its sessions' streams, as the hub lists them)", name)
            self._ask_sessions(feed)
            return feed
        resume = self.config.recorder.resume
        # resume: from the oldest item the ring holds, skipping what the last file has; else the live edge
        consumer = framebus.Consumer.attach(name, prefix=self.config.bus.prefix, missing_ok=True,
                                            start="oldest" if resume else "next")
        rec = StreamRecorder(name, self.root, self._settings(), self._emit, self.m, on_segment=lambda _p: self._sweep())
        partial = self._cut.pop(name, None)
        if resume:
            doc, _ = segments.last_state(self.root, name)
            rec.resume(doc, partial)
        t = _Target(name, consumer, rec)
        self.targets[name] = t
        self.log.info("recording %s%s", name, "" if consumer.attached else " (waiting for the stream)")
        self._readable(t)
        return t

    def stop(self, name: str, final: bool = True) -> dict:
        if name in self.rooms:
            feed = self.rooms.pop(name)
            path = feed.stop(final)
            self.m.recording.labels(name).set(0)
            self.log.info("stopped recording %s", name)
            return {"target": name, "path": str(path or feed.last_path or ""), "segments": feed.segments,
                    "frames": feed.frames}
        t = self.targets.pop(name)
        t.again = False
        path = t.rec.stop(final)
        t.consumer.close()
        self.log.info("stopped recording %s", name)
        return {"target": name, "path": str(path or t.rec.last_path or ""), "segments": t.rec.segments,
                "frames": t.rec.frames}

    def _emit(self, topic: str, data: dict) -> None:
        """An event to the hub. Until the link has heard from the hub, events wait (at most
        EARLY_EVENTS): a PUB socket drops what it sends before its subscriber's handshake, and a
        restarted recorder reports where it resumed, and any gap, while it starts."""
        if self.link is None:
            return
        if not self.link.connected:
            if len(self._early) < EARLY_EVENTS:
                self._early.append((topic, data))
            return
        self._flush_early()
        self.link.publish(topic, data)

    def _flush_early(self) -> None:
        if self._early and self.link is not None and self.link.connected:
            early, self._early = self._early, []
            for topic, data in early:
                self.link.publish(topic, data)

    # ------------------------------------------------------------ input
    def _readable(self, t: _Target) -> None:
        t.again = False
        if self.targets.get(t.name) is not t:
            return
        deadline = time.monotonic() + BATCH_SECONDS
        for _ in range(BATCH_ITEMS):
            item = t.consumer.poll()
            if item is None:
                self._idle(t)
                return
            self._count_missed(t)
            t.rec.feed(item)
            if time.monotonic() >= deadline:
                break
        t.again = True  # more may be waiting and its wake-up byte already drained
        self.loop.call_later(0, lambda: t.again and self._readable(t))

    def _count_missed(self, t: _Target) -> None:
        missed = t.consumer.missed - t.missed_seen
        if missed > 0:
            t.missed_seen = t.consumer.missed
            self.m.dropped.labels(t.name, "missed").inc(missed)
            self.throttled.warning(f"missed-{t.name}", f"{t.name}: {missed} item(s) overwritten before the "
                                                       "recorder read them")

    def _idle(self, t: _Target) -> None:
        if not t.consumer.attached and t.rec.writer is not None:
            t.rec.interrupt("the stream closed")

    # ------------------------------------------------------------ once a second, once a minute
    def _tick(self) -> None:
        for feed in list(self.rooms.values()):
            self._ask_sessions(feed)
            if feed.state == "disk_full":
                feed.resume_if_space(min_free_bytes(segments.free_bytes(self.root)[1]))
        for t in list(self.targets.values()):
            if not t.consumer.attached:
                self._readable(t)
            # a producer that died is left alone: its successor's items continue the segment (a gap
            # in its timeline), or start a new one if the stream's shape changed
            t.rec.expire(time.monotonic_ns())
            if t.rec.state == "disk_full":
                _, size = segments.free_bytes(self.root)
                t.rec.resume_if_space(min_free_bytes(size))

    def _ask_sessions(self, feed: RoomFeed) -> None:
        if self.link is None:
            return

        def answered(result, error) -> None:
            if error is None and isinstance(result, list) and self.rooms.get(feed.target) is feed:
                try:
                    feed.sessions(result)
                except (framebus.BusError, ValueError, OSError) as exc:  # never let a session take the service down
                    self.throttled.warning(f"sessions-{feed.target}", f"{feed.target}: {exc}")
        self.link.request("sessions", {"room": feed.room}, answered)

    def _drain(self) -> None:
        """Every DRAIN_SECONDS: read what each target's ring holds, and feed the rooms.

        Not a wake-up per frame: recording has no latency to keep, a ring holds seconds of
        items, and one wake-up for every target together costs a fraction of 30 per stream
        per second (benchmarks/record.py)."""
        if self._early:
            self._flush_early()
        for t in list(self.targets.values()):
            if not t.again:
                self._readable(t)
        if self.rooms:
            now = time.monotonic_ns()
            for feed in list(self.rooms.values()):
                feed.pump(now)

    def _sweep(self) -> None:
        c = self.config.recorder
        try:
            gone = segments.sweep(self.root, max_age_s=c.retention_hours * 3600, max_share=c.max_disk_share)
        except OSError as exc:
            self.throttled.warning("sweep", f"retention could not run: {exc}")
            return
        for p in gone:
            self.log.info("retention deleted %s", p)
        if gone:
            self.m.deleted.inc(len(gone))

    # ------------------------------------------------------------ commands
    def _target_arg(self, args: dict) -> str:
        if not args["target"]:
            raise ProtocolError("bad_args", "record.start/stop need {\"target\": STREAM or \"room:NAME\"}")
        return str(args["target"])

    def cmd_start(self, args: dict) -> dict:
        name = self._target_arg(args)
        t = self.start(name)
        self._remember(name, recording=True)
        return {"dir": str(self.root), **(t.describe() if isinstance(t, RoomFeed) else t.rec.describe())}

    def cmd_stop(self, args: dict) -> dict:
        name = self._target_arg(args)
        if name not in self.targets and name not in self.rooms:
            raise ProtocolError("not_found", f"{name} is not being recorded (recording: "
                                             f"{', '.join(sorted([*self.targets, *self.rooms])) or 'nothing'})")
        self._remember(name, recording=False)
        return self.stop(name)

    # ------------------------------------------------------------ what to record, across restarts
    def _overlay(self) -> Overlay:
        return Overlay.read(state_dir(self.config) / TARGETS_FILE)

    def _wanted(self) -> list[str]:
        """[recorder] record, plus what `record.start` added, less what `record.stop` stopped:
        a recording started by command goes on after the recorder (or the box) restarts."""
        overlay = self._overlay()
        if overlay.problem:
            self.log.warning("%s", overlay.problem)
        wanted = [t for t in parse_list(self.config.recorder.record) if t not in overlay.removed]
        return wanted + [t for t in overlay.added if t not in wanted and TARGET.fullmatch(t)]

    def _remember(self, name: str, recording: bool) -> None:
        overlay = self._overlay()
        if recording:
            overlay.add(name, {})
        else:
            overlay.remove(name, in_config=name in parse_list(self.config.recorder.record))
        try:
            overlay.write()
        except OSError as exc:  # recording goes on; only the memory of it across a restart is lost
            self.log.error("cannot write %s: %s: %s is not remembered across a restart", overlay.path,
                           exc.strerror or exc, name)

    def cmd_list(self, _args: dict) -> dict:
        return {"dir": str(self.root), "recordings": [t.rec.describe() for t in self.targets.values()]
                + [f.describe() for f in self.rooms.values()]}

    # ------------------------------------------------------------ state
    def describe(self) -> dict:
        parts = []
        for d in [t.rec.describe() for t in self.targets.values()] + [f.describe() for f in self.rooms.values()]:
            enc = f" with {d['encoder']}" + (" (hardware)" if d["hardware"] else "") if d["encoder"] else ""
            note = f"; {d['note']}" if d["note"] else ""
            parts.append(f"{d['target']}: {d['state']}{enc}{note}" + (f" ({d['error']})" if d["error"] else ""))
        return {"status": "; ".join(parts) or f"idle (recordings in {self.root})", "streams": [], "sessions": [],
                "rate": 0.0}
