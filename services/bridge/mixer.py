"""Mixer: mix-minus audio for one bridged room, read off the bus and written back to it.

Every participant of a room sends an s16 audio stream on the bus (a phone's 8 kHz G.711,
a browser's 48 kHz Opus, 1 or 2 channels: whatever its transport decodes); every target
hears the sum of every OTHER participant, never itself, on a stream of its own:

    mixer = Mixer("lobby", prefix=prefix, registry=registry, log=log)
    mixer.set_participants(sources={"alice": "alice-audio", "bob": "rtp-bob-audio"},
                           targets={"alice": "mix-alice", "bob": "mix-bob"})
    loop.add_reader(mixer.fileno(), mixer.pump)     # one fd, stable for the mixer's life
    loop.every(mixer.frame_ms / 1000, mixer.tick)    # the mix clock
    route(alice, audio=mixer.output_of("alice"))     # "mix-alice-audio": what alice's transport sends

Nothing blocks and there are no threads: `pump()` takes what the sources' rings hold into
their buffers, `tick()` mixes. Both are the service loop's.

Inputs. Each source is read by a framebus consumer (attached with `missing_ok`: a stream
that does not exist yet is attached when its producer appears; `tick()` pumps, so the
retry happens every frame). Each chunk is downmixed to mono (the mean of its channels,
numpy), resampled to the mix rate (`av.AudioResampler`, one per source, remade when the
source's rate changes; none when it is already at the mix rate) and appended to the
source's buffer. The buffer is bounded: past `max_buffer_ms` the oldest samples go (a
source that sends faster than real time, or a burst after a stall), counted as overflow.
Bad input never raises out of `pump()`: an item of another kind (video on an audio route),
an impossible format (rate outside 1 kHz..384 kHz, no channels, a size that is not whole
samples), an item overwritten while it was copied, or anything the resampler refuses, is
dropped and counted by reason; items the consumer missed on the bus are counted too.

The mix clock. `tick()` makes the frames that are due by the monotonic clock since the first
tick: normally one, two when the timer fired late (`Loop.every` schedules the next call an
interval after the current one ran, so it drifts late; a mixer that made one frame per call
would fall behind its real-time sources and keep trimming their buffers). After a stall of
more than `max_buffer_ms` the clock jumps to now instead of catching up (skipped frames are
counted). Each frame takes `frame_ms` of every source's buffer; a source with less gives
what it has and silence for the rest (an underrun, counted once the source has sent its
first chunk): a source that stops sending is silent, never a stall. The frame's mix for a
target is the sum of the other sources, saturated to int16 (computed as the sum of all
minus its own, in int32).

Outputs. One `Sink` (services/capture/sink.py) per target, named by `targets`: its mix is the
audio stream NAME-audio (`output_of`), mono s16 at the mix rate, one chunk of `frame_ms` per
frame, pts in samples. The ring is made at the first frame (a route to it waits for it
meanwhile) and removed when the target leaves or the mixer closes. A/V timing: a chunk's
capture_ns is the capture time of the frame's first sample as the freshest input mixed
into it says it (that input's chunk capture_ns plus the sample's offset in the chunk, at
the mix rate; ignoring the resampler's ~2 ms filter delay); when no input contributed a
sample to it (everyone else silent), the frame's time on the mix clock (about the tick's
`time.monotonic_ns()`).

Levels. Per source, the RMS of the frame taken from it (silence included), smoothed
exponentially over `level_tau_ms` in the power domain, in dBFS (a full-scale square wave is
0 dBFS, a full-scale sine about -3; silence floors at LEVEL_FLOOR_DB). What
`services/bridge/speaker.py`'s SpeakerPicker takes.

Metrics (labels room and source, or room and target), on the registry given (one set per
registry, shared by every room's mixer): edgeroom_bridge_audio_chunks_in,
edgeroom_bridge_audio_dropped_chunks (reason: wrong_kind, bad_format, torn, missed, error),
edgeroom_bridge_audio_underruns (frames a source was short), edgeroom_bridge_audio_silence_seconds
(silence put in for it), edgeroom_bridge_audio_overflow_seconds (its buffered audio dropped
at the bound), edgeroom_bridge_audio_buffered_seconds and edgeroom_bridge_audio_level_dbfs
(gauges); edgeroom_bridge_audio_frames_out (target), edgeroom_bridge_audio_output_errors
(target: its ring could not be made or written), edgeroom_bridge_audio_skipped_frames
(room: the clock jumped after a stall). A participant's series leave the scrape when it leaves.

Not thread-safe: one owner, the service's loop.
"""
from __future__ import annotations

import logging
import math
import select
import time
import weakref
from collections import deque
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge

import framebus
from framebus.names import check_name
from services.capture.sink import Sink, SinkMetrics
from services.runtime.streams import audio_stream

__all__ = ["LEVEL_FLOOR_DB", "Mixer", "MixerMetrics"]

LEVEL_FLOOR_DB = -100.0       # the level of silence
MIN_RATE, MAX_RATE = 1000, 384000
MAX_CHANNELS = 32
MAX_ITEMS_PER_PUMP = 512      # per source: a producer faster than we read cannot keep pump() looping
RETRY_S = 1.0                 # a stream that cannot be read, or a target's ring that cannot be made: tried again
WARN_EVERY_S = 10.0           # a recurring problem of a source is logged at most this often
FULL_SCALE = 32768.0

Pcm = npt.NDArray[np.int16]


class MixerMetrics:
    """The bridge audio metrics of one registry (every room's mixer shares them: `for_registry`)."""

    _made: weakref.WeakKeyDictionary[CollectorRegistry, MixerMetrics] = weakref.WeakKeyDictionary()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> MixerMetrics:
        m = cls._made.get(registry)
        if m is None:
            m = cls._made[registry] = cls(registry)
        return m

    def __init__(self, r: CollectorRegistry) -> None:
        src, tgt = ["room", "source"], ["room", "target"]
        self.chunks = Counter("edgeroom_bridge_audio_chunks_in", "Audio chunks a bridge's mixer took from a "
                              "participant's stream.", src, registry=r)
        self.dropped = Counter("edgeroom_bridge_audio_dropped_chunks", "Chunks of a participant's stream not mixed, "
                               "by reason (wrong_kind, bad_format, torn, missed on the bus, error).",
                               [*src, "reason"], registry=r)
        self.underruns = Counter("edgeroom_bridge_audio_underruns", "Mix frames a participant's buffer had less "
                                 "than a frame for (the rest was silence).", src, registry=r)
        self.silence = Counter("edgeroom_bridge_audio_silence_seconds", "Silence put in for a participant whose "
                               "buffer ran short.", src, registry=r)
        self.overflow = Counter("edgeroom_bridge_audio_overflow_seconds", "A participant's buffered audio dropped "
                                "(oldest first) at the buffer's bound: it sent faster than real time.", src,
                                registry=r)
        self.buffered = Gauge("edgeroom_bridge_audio_buffered_seconds", "Audio waiting in a participant's buffer.",
                              src, registry=r)
        self.level = Gauge("edgeroom_bridge_audio_level_dbfs", "A participant's smoothed level (dBFS).", src,
                           registry=r)
        self.frames = Counter("edgeroom_bridge_audio_frames_out", "Mix frames written to a target's stream.", tgt,
                              registry=r)
        self.output_errors = Counter("edgeroom_bridge_audio_output_errors", "Mix frames not written: the target's "
                                     "ring could not be made or written.", tgt, registry=r)
        self.skipped = Counter("edgeroom_bridge_audio_skipped_frames", "Mix frames skipped when the clock jumped "
                               "after a stall of the loop.", ["room"], registry=r)

    def forget(self, room: str, who: str | None = None) -> None:
        """The series of a room's participant (or of the whole room) leave the scrape."""
        for metric in (self.chunks, self.dropped, self.underruns, self.silence, self.overflow, self.buffered,
                       self.level, self.frames, self.output_errors, self.skipped):
            for key in [k for k in list(getattr(metric, "_metrics", {})) if k and k[0] == room and
                        (who is None or (len(k) > 1 and k[1] == who))]:
                metric.remove(*key)


class _Source:
    """One participant's input: its consumer, resampler and bounded buffer at the mix rate."""

    def __init__(self, mixer: Mixer, pid: str, stream: str) -> None:
        self.mixer, self.pid, self.stream = mixer, pid, stream
        self.consumer: framebus.Consumer | None = None
        self.retry_at = 0.0
        self.buf: Pcm = np.zeros(0, np.int16)
        self.head = 0                                   # absolute sample index (mix rate) of buf[0]
        self.marks: deque[tuple[int, int]] = deque()    # (absolute index, capture_ns) where each chunk starts
        self.resampler: av.AudioResampler | None = None
        self.rate_in = 0
        self.channels_in = 0
        self.started = False                            # a chunk has come: short frames count as underruns
        self.last_took = 0                              # samples of it in the last frame
        self.chunks = self.underruns = self.bad = 0
        self.underrun_samples = self.overflow_samples = 0
        self.dropped: dict[str, int] = {}
        self.missed_seen = 0
        self.power = 0.0                                # smoothed mean square, in full-scale units
        self.level = LEVEL_FLOOR_DB
        self.problem = ""
        self.warned: dict[str, float] = {}
        m, labels = mixer.metrics, (mixer.room, pid)
        self.m_chunks, self.m_underruns = m.chunks.labels(*labels), m.underruns.labels(*labels)
        self.m_silence, self.m_overflow = m.silence.labels(*labels), m.overflow.labels(*labels)
        self.m_buffered, self.m_level = m.buffered.labels(*labels), m.level.labels(*labels)
        self.m_level.set(LEVEL_FLOOR_DB)
        self.open()

    def open(self) -> None:
        """Attach (missing_ok: a stream with no producer yet is followed when it appears); a stream that cannot be
        read now (not a ring, another layout, its table of readers full) is tried again a second later."""
        try:
            consumer = framebus.Consumer.attach(self.stream, prefix=self.mixer.prefix, missing_ok=True, start="next")
        except framebus.BusError as exc:
            self.retry_at = time.monotonic() + RETRY_S
            self.problem = f"{self.stream} cannot be read: {exc}"
            self.warn("attach", self.problem)
            return
        self.consumer, self.problem = consumer, ""
        self.mixer._epoll.register(consumer.fileno(), select.EPOLLIN)

    # --- in --------------------------------------------------------------------------------------
    def pump(self) -> None:
        c = self.consumer
        if c is None:
            if time.monotonic() < self.retry_at:
                return
            self.open()
            if (c := self.consumer) is None:
                return
        for _ in range(MAX_ITEMS_PER_PUMP):
            try:
                item = c.poll()
            except framebus.BusError as exc:    # its new ring cannot be read (readers' table full, ...): next time
                self.problem = f"{self.stream} cannot be read: {exc}"
                self.warn("read", self.problem)
                return
            if item is None:
                break
            try:
                self._take(item)
            except Exception as exc:            # anything a bad chunk makes the resampler do: dropped, not raised
                self.resampler = None
                self._drop("error", f"{self.stream}: chunk not mixed: {exc!r}")
        if c.missed > self.missed_seen:
            n, self.missed_seen = c.missed - self.missed_seen, c.missed
            self._drop("missed", f"{self.stream}: {n} chunk(s) missed on the bus (the mixer fell behind)", n)

    def _take(self, item: framebus.Item) -> None:
        if item.kind != "audio":
            self._drop("wrong_kind", f"{self.stream} carries {item.kind}, not audio: nothing of it is mixed")
            return
        arr = item.array
        rate, channels = item.rate, item.channels
        if not (MIN_RATE <= rate <= MAX_RATE and 1 <= channels <= MAX_CHANNELS) or arr.ndim != 2 \
                or arr.dtype != np.int16 or arr.shape[1] != channels or item.size != arr.nbytes or arr.shape[0] == 0:
            self._drop("bad_format", f"{self.stream}: a chunk of {item.size} bytes at {rate} Hz x {channels} "
                                     f"channel(s) is not s16 audio the mixer takes")
            return
        if channels == 1:
            mono: Pcm = arr[:, 0].astype(np.int16)      # a copy out of the ring
        else:   # the mean of the channels (int32: no overflow), one copy out of the ring
            mono = (arr.astype(np.int32).sum(axis=1) // channels).astype(np.int16)
        if not item.valid():
            self._drop("torn", f"{self.stream}: a chunk was overwritten while it was read")
            return
        capture_ns = item.capture_ns
        out = self._resample(mono, rate)
        if rate != self.rate_in or channels != self.channels_in:
            self.mixer.log.info("bridge %s: %s sends %s (%d Hz, %d channel(s))%s", self.mixer.room, self.pid,
                                self.stream, rate, channels, "" if self.started else ": first chunk")
            self.rate_in, self.channels_in = rate, channels
        self.started = True
        self.problem = ""
        self.chunks += 1
        self.m_chunks.inc()
        self.append(out, capture_ns)

    def _resample(self, mono: Pcm, rate: int) -> Pcm:
        target = self.mixer.rate
        if rate == target:
            self.resampler = None
            return mono
        if self.resampler is None or rate != self.rate_in:
            self.resampler = av.AudioResampler(format="s16", layout="mono", rate=target)
        frame = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        parts = [f.to_ndarray().reshape(-1) for f in self.resampler.resample(frame)]
        if not parts:
            return np.zeros(0, np.int16)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.int16)

    def append(self, pcm: Pcm, capture_ns: int) -> None:
        if len(pcm) == 0:
            return
        if capture_ns > 0:
            self.marks.append((self.head + len(self.buf), capture_ns))
        self.buf = np.concatenate((self.buf, pcm)) if len(self.buf) else pcm
        excess = len(self.buf) - self.mixer.max_buffer
        if excess > 0:      # faster than real time, or a burst: the oldest go
            self.buf = self.buf[excess:]
            self.head += excess
            self._prune()
            self.overflow_samples += excess
            self.m_overflow.inc(excess / self.mixer.rate)
            self.warn("overflow", f"{self.stream}: more than {self.mixer.max_buffer_ms} ms buffered (it sends faster "
                                  "than real time): the oldest audio was dropped")
        self.m_buffered.set(len(self.buf) / self.mixer.rate)

    def _prune(self) -> None:
        while len(self.marks) > 1 and self.marks[1][0] <= self.head:
            self.marks.popleft()

    def _drop(self, reason: str, why: str, n: int = 1) -> None:
        self.bad += n
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.mixer.metrics.dropped.labels(self.mixer.room, self.pid, reason).inc(n)
        if reason != "missed":
            self.problem = why
        self.warn(reason, why)

    def warn(self, key: str, why: str) -> None:
        now = time.monotonic()
        if now - self.warned.get(key, -math.inf) >= WARN_EVERY_S:
            self.warned[key] = now
            self.mixer.log.warning("bridge %s: %s: %s", self.mixer.room, self.pid, why)

    # --- out -------------------------------------------------------------------------------------
    def frame(self, n: int) -> tuple[Pcm, int]:
        """The next `n` samples (silence where the buffer runs short) and the capture time of the first
        (0: no sample of this source in it)."""
        have = self.last_took = min(n, len(self.buf))
        capture = 0
        if have:
            self._prune()
            if self.marks and self.marks[0][0] <= self.head:
                start, cap = self.marks[0]
                capture = cap + (self.head - start) * 1_000_000_000 // self.mixer.rate
        if have == n:
            out = self.buf[:n]
        else:
            out = np.zeros(n, np.int16)
            out[:have] = self.buf[:have]
            if self.started:
                self.underruns += 1
                self.underrun_samples += n - have
                self.m_underruns.inc()
                self.m_silence.inc((n - have) / self.mixer.rate)
        self.buf = self.buf[have:]
        self.head += have
        self.m_buffered.set(len(self.buf) / self.mixer.rate)
        self._level(out)
        return out, capture

    def _level(self, pcm: Pcm) -> None:
        x = pcm.astype(np.float64) / FULL_SCALE
        power = float(np.dot(x, x)) / max(1, len(x))
        a = self.mixer.level_alpha
        self.power = a * self.power + (1.0 - a) * power
        self.level = max(LEVEL_FLOOR_DB, 10.0 * math.log10(self.power)) if self.power > 0 else LEVEL_FLOOR_DB
        self.m_level.set(self.level)

    # --- state -----------------------------------------------------------------------------------
    def state(self) -> str:
        if self.consumer is None or not self.consumer.attached:
            return "waiting"            # no producer of the stream (yet, or any more)
        if not self.started:
            return "attached"           # no chunk yet
        return "live" if self.last_took or len(self.buf) else "silent"

    def status(self) -> dict[str, Any]:
        rate = self.mixer.rate
        return {"stream": self.stream, "state": self.state(), "rate_in": self.rate_in,
                "channels_in": self.channels_in, "buffered_ms": round(len(self.buf) * 1000 / rate, 1),
                "chunks": self.chunks, "underruns": self.underruns,
                "underrun_ms": round(self.underrun_samples * 1000 / rate, 1),
                "overflows_ms": round(self.overflow_samples * 1000 / rate, 1), "dropped": dict(self.dropped),
                "level_db": round(self.level, 1), "problem": self.problem}

    def close(self) -> None:
        if self.consumer is not None:
            self.mixer._epoll.unregister(self.consumer.fileno())
            self.consumer.close()
            self.consumer = None


class _Target:
    """One participant's output: the Sink its mix goes to."""

    def __init__(self, mixer: Mixer, pid: str, name: str) -> None:
        self.mixer, self.pid, self.name = mixer, pid, name
        m, labels = mixer.metrics, (mixer.room, pid)
        self.m_frames, self.m_errors = m.frames.labels(*labels), m.output_errors.labels(*labels)
        self.sink = Sink(name, mixer.prefix, SinkMetrics.uncounted(audio_chunks=self.m_frames))
        self.frames = self.errors = 0
        self.pts = 0
        self.retry_at = 0.0
        self.problem = ""

    @property
    def stream(self) -> str:
        return audio_stream(self.name)

    def write(self, mix: Pcm, capture_ns: int) -> None:
        now = time.monotonic()
        if now < self.retry_at:
            self.errors += 1
            self.m_errors.inc()
            return
        try:
            self.sink.audio(mix.reshape(-1, 1), self.mixer.rate, pts=self.pts, capture_ns=capture_ns)
        except (framebus.BusError, OSError, ValueError) as exc:
            self.errors += 1
            self.m_errors.inc()
            self.retry_at = now + RETRY_S
            if str(exc) != self.problem:
                self.mixer.log.warning("bridge %s: the mix for %s cannot be written to %s: %s", self.mixer.room,
                                       self.pid, self.stream, exc)
            self.problem = str(exc)
            return
        self.problem = ""
        self.pts += len(mix)
        self.frames += 1

    def status(self, sources: list[str]) -> dict[str, Any]:
        return {"stream": self.stream, "hears": sources, "frames": self.frames, "errors": self.errors,
                "problem": self.problem}

    def close(self) -> None:
        self.sink.close()


class Mixer:
    """Mix-minus for one room (see the module's docstring)."""

    def __init__(self, room: str, *, prefix: str, registry: CollectorRegistry, log: logging.Logger | None = None,
                 rate: int = 48000, frame_ms: int = 20, max_buffer_ms: int = 200, level_tau_ms: float = 100.0) -> None:
        if not MIN_RATE <= rate <= MAX_RATE or rate * frame_ms % 1000:
            raise ValueError(f"a mix rate of {rate} Hz with {frame_ms} ms frames is not a whole number of samples "
                             "a frame")
        if frame_ms <= 0 or max_buffer_ms < frame_ms:
            raise ValueError(f"frame_ms ({frame_ms}) must be positive and max_buffer_ms ({max_buffer_ms}) at least "
                             "a frame")
        self.room, self.prefix = room, check_name("prefix", prefix)
        self.log = log or logging.getLogger("edgeroom.bridge")
        self.rate, self.frame_ms, self.max_buffer_ms = rate, frame_ms, max_buffer_ms
        self.frame = rate * frame_ms // 1000
        self.max_buffer = rate * max_buffer_ms // 1000
        self.level_alpha = math.exp(-frame_ms / level_tau_ms) if level_tau_ms > 0 else 0.0
        self.metrics = MixerMetrics.for_registry(registry)
        self._m_skipped = self.metrics.skipped.labels(room)
        self._epoll = select.epoll()
        self._sources: dict[str, _Source] = {}
        self._targets: dict[str, _Target] = {}
        self._frame_ns = frame_ms * 1_000_000
        self._next_ns: int | None = None     # when the next frame is due on the mix clock
        self.frames = 0                      # frames mixed
        self.skipped = 0                     # frames skipped after stalls
        self._closed = False

    # --- participants ----------------------------------------------------------------------------
    def set_participants(self, sources: dict[str, str], targets: dict[str, str]) -> None:
        """sources: participant -> its audio stream; targets: participant -> the Sink name its mix goes to (the
        stream NAME-audio). Consumers and sinks are made and let go to match; a participant whose stream or
        sink name is unchanged keeps its buffer and its stream. ValueError (nothing changed) on a bad name."""
        for stream in sources.values():
            check_name("stream", stream)
        for name in targets.values():
            check_name("stream", audio_stream(name))
        for pid in [p for p, s in self._sources.items() if sources.get(p) != s.stream]:
            self._drop_source(pid)
        for pid in [p for p, t in self._targets.items() if targets.get(p) != t.name]:
            self._drop_target(pid)
        for pid, stream in sources.items():
            if pid not in self._sources:
                self._sources[pid] = _Source(self, pid, stream)
        for pid, name in targets.items():
            if pid not in self._targets:
                self._targets[pid] = _Target(self, pid, name)

    def _drop_source(self, pid: str) -> None:
        self._sources.pop(pid).close()
        if pid not in self._targets:
            self.metrics.forget(self.room, pid)

    def _drop_target(self, pid: str) -> None:
        self._targets.pop(pid).close()
        if pid not in self._sources:
            self.metrics.forget(self.room, pid)

    def output_of(self, target: str) -> str:
        """The audio stream a target's transport should send (KeyError: no such target)."""
        return self._targets[target].stream

    # --- the loop's side -------------------------------------------------------------------------
    def fileno(self) -> int:
        """Readable when a source has news (call pump()); the same fd for the mixer's life."""
        return self._epoll.fileno()

    def pump(self) -> None:
        """Take every waiting chunk into its source's buffer; never blocks, never raises for bad input."""
        for src in self._sources.values():
            src.pump()

    def tick(self, now_ns: int | None = None) -> None:
        """Mix the frames due by the clock (normally one) and write each target's. `now_ns`: the monotonic
        time to take as now (tests drive the clock with it); default time.monotonic_ns()."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        self.pump()
        if self._next_ns is None:
            self._next_ns = now
        if now < self._next_ns:
            return
        due = (now - self._next_ns) // self._frame_ns + 1
        most = max(1, self.max_buffer_ms // self.frame_ms)
        if due > most:     # the loop stalled: catching up would only mix silence and trimmed buffers
            self.skipped += due - 1
            self._m_skipped.inc(due - 1)
            self.log.warning("bridge %s: the mix clock was %d ms late: %d frame(s) skipped", self.room,
                             (now - self._next_ns) // 1_000_000, due - 1)
            self._next_ns, due = now, 1
        for _ in range(due):
            self._mix(self._next_ns)
            self._next_ns += self._frame_ns

    def _mix(self, frame_ns: int) -> None:
        n = self.frame
        pcm: dict[str, Pcm] = {}
        capture: dict[str, int] = {}
        total = np.zeros(n, np.int32)
        for pid, src in self._sources.items():
            pcm[pid], capture[pid] = src.frame(n)
            total += pcm[pid]
        for pid, target in self._targets.items():
            own = pcm.get(pid)
            mix = total - own if own is not None else total
            out = np.clip(mix, -32768, 32767).astype(np.int16)
            newest = max((c for p, c in capture.items() if p != pid), default=0)
            target.write(out, newest if newest > 0 else frame_ns)
        self.frames += 1

    # --- what it knows ---------------------------------------------------------------------------
    def levels(self) -> dict[str, float]:
        """Per source: its smoothed level in dBFS (LEVEL_FLOOR_DB for silence)."""
        return {pid: src.level for pid, src in self._sources.items()}

    def status(self) -> dict[str, Any]:
        """The room's mix: rate, frame_ms, frames mixed and skipped; per source its stream, state (waiting: no
        producer; attached: no chunk yet; live: in the last frame or buffered; silent: sends nothing now), input
        rate and channels, buffered_ms, chunks, underruns (frames short) and underrun_ms (silence put in), overflows_ms
        (audio dropped at the bound), dropped (chunks, by reason), level_db, problem; per target its out stream,
        whom it hears, frames written, errors, problem."""
        return {"room": self.room, "rate": self.rate, "frame_ms": self.frame_ms, "max_buffer_ms": self.max_buffer_ms,
                "frames": self.frames, "skipped": self.skipped,
                "sources": {pid: src.status() for pid, src in self._sources.items()},
                "targets": {pid: t.status([p for p in self._sources if p != pid]) for pid, t in self._targets.items()}}

    def close(self) -> None:
        """Let go of every consumer, remove every target's ring, and the room's metric series."""
        if self._closed:
            return
        self._closed = True
        for pid in list(self._sources):
            self._drop_source(pid)
        for pid in list(self._targets):
            self._drop_target(pid)
        self.metrics.forget(self.room)
        self._epoll.close()

    def __enter__(self) -> Mixer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
