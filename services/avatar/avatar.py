"""One avatar: a voice in, a talking face and that voice out on the bus, in step, as a session of a room.

    a = Avatar(spec, prefix=prefix, metrics=metrics, timing=Timing(), log=log)
    a.begin(aio_loop)          # the provider is started (and restarted with backoff) on the loop
    a.say(pcm, rate)           # pushed voice (avatar.say), beside or instead of spec.audio's stream
    a.session()                # what the hub hears: NAME (rgb24 pictures) and NAME-audio (s16)
    await a.close()

What goes on the bus (services/capture/sink.py's Sink): NAME, raw rgb24 pictures at the face's size, and
NAME-audio, the voice that drives the face, mono s16 at the provider's rate. The bridge sends both to the
room's callers (transcoded to what a phone takes), so nothing else needs to know what an avatar is.

**In step.** A *paired* provider (the WebSocket avatar, MuseTalk) makes `fps` frames per second of the audio
it is fed, in order. The voice is cut into slices of one frame each (slice i: samples [i*rate/fps,
(i+1)*rate/fps) of the turn), each fed as soon as it is whole (one message a frame). A slice waits until its
frame comes back, then the frame and the slice go on the bus together, both stamped with the capture time of
the slice's first sample (the voice's own clock: a stream's capture times, or a pushed voice's real-time
clock; never a fixed step). A slice whose frame is `max_delay` late goes out with the last picture held
(counted: `frames{kind="held"}`), and its frame is dropped when it comes (`dropped_frames{reason="late"}`):
the voice is never held longer than max_delay, whatever the provider does. A *streamed* provider (Anam)
sends its own audio and video back in step; they go on the bus as they come.

**Turns.** A turn starts with the first voice after a silence of the stream (not of the sound: a stream of
silence is a turn whose mouth stays closed) and ends `turn_gap` seconds after its last chunk: the provider is
told to flush (`end_turn`), so the last frames come back. A driving stream that stops ends the turn.

**Never a frozen face.** With no turn, the idle face goes out at `fps` (the provider's idle frame, or the
reference image itself while the provider is down); within a turn, when no slice is due for 1.5 frames, the
last picture is repeated (`frames{kind="repeated"}`).

**A provider that fails** (down, slow, garbage, the connection dropped) is counted by reason, shown in `ctl
avatar list`, and started again with exponential backoff (1 s doubling to `backoff_max`); meanwhile the voice
still goes out, at once, with the idle face. When the provider is back, the voice of a turn it missed is fed
from then on as a new turn (frames are paired within a turn). `Unavailable` (no GPU, no model, no key) is not retried.

One owner: the service's asyncio loop. Nothing here blocks it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

import framebus
from services.avatar.metrics import AvatarMetrics
from services.avatar.providers import AvatarError, AvatarProvider, Face, Outputs, Settings, open_provider
from services.avatar.providers.base import Pcm, Rgb, fit
from services.avatar.voice import BusVoice, PushedVoice, Resampler
from services.capture.sink import Sink, SinkMetrics
from services.runtime.logs import Throttled
from services.runtime.streams import audio_stream

__all__ = ["Avatar", "AvatarSpec", "Slice", "Timing", "slice_bounds"]

TICK = 0.01                   # the avatar's clock: deadlines, idle frames, pushed voice released
VIDEO_TB = Fraction(1, 90000)
OUT_RATE = 48000              # the voice on the bus: what WebRTC's Opus takes as it is, in whole 20 ms frames
LATENCIES = 512               # audio-to-frame latencies kept for `status()`'s percentiles


@dataclass(frozen=True)
class AvatarSpec:
    name: str
    room: str
    provider: str
    image: str                        # the reference image's path
    width: int = 512
    height: int = 512
    fps: float = 25.0
    audio: str = ""                   # the driving stream of the bus ('' only pushed voice)
    settings: Settings = field(default_factory=Settings)
    origin: str = "config"            # config | command


@dataclass(frozen=True)
class Timing:
    turn_gap: float = 0.3             # seconds without voice that end a turn
    max_delay: float = 0.4            # seconds a slice of voice waits for its frame
    backoff_max: float = 30.0
    push_limit: float = 60.0          # seconds of pushed voice that may wait


@dataclass
class Slice:
    index: int
    pcm: Pcm
    capture_ns: int
    ready: float                      # monotonic seconds when it was complete


def slice_bounds(i: int, rate: int, fps: float) -> int:
    """The first sample of slice i (one frame's audio) within a turn."""
    return int(i * rate / fps)


@dataclass
class Turn:
    fed: bool                         # the provider takes this turn's voice
    last_voice: float                 # monotonic s of its last chunk
    made: int = 0                     # slices cut
    frames: int = 0                   # provider frames received for it
    carry: Pcm = field(default_factory=lambda: np.zeros(0, np.int16))
    carry_ns: int = 0
    samples: int = 0                  # samples cut into slices
    ending: float = 0.0               # when end_turn was sent (0: not yet)


class Avatar:
    def __init__(self, spec: AvatarSpec, *, face: Face, reference: Rgb, prefix: str, metrics: AvatarMetrics,
                 timing: Timing, log: logging.Logger) -> None:
        self.spec, self.face, self.reference = spec, face, reference
        self.prefix, self.m, self.timing, self.log = prefix, metrics, timing, log
        self.throttled = Throttled(log, 10.0)
        self.sink = Sink(spec.name, prefix, SinkMetrics.uncounted())    # the avatar's own metrics count
        self.provider: AvatarProvider | None = None
        self.paired = True
        self.rate = 16000
        self.fps = spec.fps
        self.idle: Rgb = reference
        self.last: Rgb = reference
        self.state = "starting"
        self.problem = ""
        self.ready = False
        self.turn: Turn | None = None
        self.pending: deque[Slice] = deque()
        self.next_index = 0               # the next slice of the turn to go out
        self.owed = 0                     # frames a finished turn still has coming: not the next turn's
        self.voice: BusVoice | None = None
        self.pushed: PushedVoice | None = None
        self.upsample = Resampler(OUT_RATE)
        self.last_video = 0.0             # monotonic s of the last picture out
        self.next_idle = 0.0              # when the next idle picture is due
        self.last_video_ns = 0
        self.next_audio_pts = 0
        self.counts = dict.fromkeys(("provider", "idle", "held", "repeated", "late", "unpaired", "bus", "turns",
                                     "errors", "connects", "voice_dropped"), 0)
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self.since = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failed: asyncio.Event | None = None
        self._closed = False

    # ------------------------------------------------------------ lifecycle
    def begin(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._set_rate(self._provider_rate())
        if self.spec.audio:
            self.voice = BusVoice(self.spec.audio, prefix=self.prefix, rate=self.rate, on_drop=self._voice_dropped)
            loop.add_reader(self.voice.fileno(), self._on_voice)
        self._task = loop.create_task(self._run_provider(), name=f"avatar {self.spec.name}")
        self._timer = loop.call_later(TICK, self._tick)

    def _provider_rate(self) -> int:
        from services.avatar.providers import kinds
        kind = kinds()[self.spec.provider].factory
        return self.spec.settings.sample_rate or getattr(kind, "default_rate", 16000)

    def _set_rate(self, rate: int) -> None:
        if rate == self.rate and self.pushed is not None:
            return
        self.rate = rate
        self.pushed = PushedVoice(rate=rate, limit_s=self.timing.push_limit)
        if self.voice is not None:
            self.voice.rate, self.voice.resample = rate, Resampler(rate)

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.voice is not None and self._loop is not None:
            self._loop.remove_reader(self.voice.fileno())
            self.voice.close()
            self.voice = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.provider is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.provider.stop(), 2.0)
        self.sink.close()
        self.m.forget(self.spec.name)

    # ------------------------------------------------------------ the provider, with backoff
    async def _run_provider(self) -> None:
        delay = 1.0
        while not self._closed:
            outputs = Outputs(self._on_frame, self._on_audio, self._on_error)
            p = self.provider = open_provider(self.spec.provider, self.spec.settings, outputs)
            self.paired = p.paired
            self._failed = asyncio.Event()
            self.state, timeout = "connecting", self.spec.settings.timeout * 2 + 5
            try:
                fps = await asyncio.wait_for(p.start(self.face), timeout)
                idle = await asyncio.wait_for(p.idle_frame(), timeout)
            except AvatarError as exc:
                self._count_error(exc)
                await self._stop_provider(p)
                if exc.reason == "unavailable":
                    self.state = "unavailable"
                    return
                self.state = "backoff"
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.timing.backoff_max)
                continue
            except Exception as exc:     # a provider's bug or a library's surprise: counted, retried, never fatal
                self._count_error(AvatarError("down", f"{self.spec.provider}: {exc.__class__.__name__}: {exc}"))
                await self._stop_provider(p)
                self.state = "backoff"
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.timing.backoff_max)
                continue
            self.fps = float(fps) if fps > 0 else self.spec.fps
            self._set_rate(p.sample_rate)
            if idle.shape == self.reference.shape:
                self.idle = idle
            self.ready, self.state, self.problem, delay = True, "ready", "", 1.0
            self.owed = 0
            self.counts["connects"] += 1
            self.m.connects.labels(self.spec.name).inc()
            self.m.up.labels(self.spec.name).set(1)
            self.log.info("avatar %s: %s up (%g fps, %d Hz)", self.spec.name, self.spec.provider, self.fps, self.rate)
            await self._failed.wait()
            self.ready = False
            self.m.up.labels(self.spec.name).set(0)
            if self.turn is not None:
                self.turn.fed = False       # its frames will not come: its slices go out on their deadlines
            await self._stop_provider(p)
            self.state = "backoff"
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.timing.backoff_max)

    async def _stop_provider(self, p: AvatarProvider) -> None:
        try:
            await asyncio.wait_for(p.stop(), 3.0)
        except Exception as exc:
            self.log.debug("avatar %s: stopping %s: %s", self.spec.name, self.spec.provider, exc)

    def _count_error(self, exc: AvatarError) -> None:
        self.problem = str(exc)
        self.counts["errors"] += 1
        self.m.errors.labels(self.spec.name, self.spec.provider, exc.reason).inc()
        self.throttled.warning(exc.reason, f"avatar {self.spec.name}: {exc}")

    def _on_error(self, exc: AvatarError) -> None:
        self._count_error(exc)
        if self._failed is not None:
            self._failed.set()

    # ------------------------------------------------------------ the voice in
    def _on_voice(self) -> None:
        if self.voice is None:
            return
        for pcm, ns in self.voice.read():
            self.m.voice.labels(self.spec.name, "bus").inc(len(pcm) / self.rate)
            self.take(pcm, ns)

    def _voice_dropped(self, reason: str, why: str) -> None:
        self.counts["voice_dropped"] += 1
        self.m.voice_dropped.labels(self.spec.name, reason).inc()
        self.throttled.warning("voice-" + reason, f"avatar {self.spec.name}: {why}")

    def say(self, pcm: Pcm, rate: int) -> float:
        """Pushed voice: released in real time from now (after what is already waiting); seconds waiting."""
        assert self.pushed is not None
        try:
            return self.pushed.push(pcm, rate, time.monotonic_ns())
        except ValueError:
            self.m.voice_dropped.labels(self.spec.name, "too_much").inc()
            raise

    def take(self, pcm: Pcm, capture_ns: int) -> None:
        """A chunk of voice (mono at self.rate, the capture time of its first sample)."""
        if len(pcm) == 0:
            return
        now = time.monotonic()
        t = self.turn
        up = self.ready and self.provider is not None
        if t is not None and not t.fed and up:
            # the provider came (back) during a turn it was not fed: a voice that never pauses (a file, a call)
            # would never reach it. That turn ends here, its partial slice out as it is, and a fed one begins
            if len(t.carry):
                self._slice(t, t.carry, now)
                t.carry = t.carry[:0]
            self._finish_turn()
            t = None
        if t is None or t.ending:
            if t is not None:           # a voice within the ending turn's flush: that turn is over for us
                self._finish_turn()
            t = self.turn = Turn(fed=up, last_voice=now)
            self.counts["turns"] += 1
            self.m.turns.labels(self.spec.name).inc()
        t.last_voice = now
        if t.fed and not self.paired and self.provider is not None:
            self.provider.feed(pcm)     # a streamed provider sends this voice back itself, in step
            return
        self._cut(t, pcm, capture_ns, now)

    def _cut(self, t: Turn, pcm: Pcm, capture_ns: int, now: float) -> None:
        if not len(t.carry):
            t.carry_ns = capture_ns
        t.carry = np.concatenate((t.carry, pcm)) if len(t.carry) else pcm
        while True:
            size = slice_bounds(t.made + 1, self.rate, self.fps) - slice_bounds(t.made, self.rate, self.fps)
            if len(t.carry) < size:
                break
            self._slice(t, t.carry[:size], now)
            t.carry = t.carry[size:]
            t.carry_ns += size * 1_000_000_000 // self.rate

    def _slice(self, t: Turn, pcm: Pcm, now: float) -> None:
        s = Slice(t.made, pcm, t.carry_ns, now)
        t.made += 1
        t.samples += len(pcm)
        if t.fed and self.paired and self.provider is not None:
            # fed a slice at a time: one message per frame (a frame cannot be made before its slice is whole, so
            # this costs no latency; a 20 ms chunk a message would double what a server must answer)
            self.provider.feed(pcm)
            self.pending.append(s)
            return
        while self.pending:             # the provider went away mid-turn: what waited goes first, in order
            self._publish(self.last, self.pending.popleft(), "held")
        self._publish(self.idle, s, "idle")

    def _finish_turn(self) -> None:
        """The turn is over: whatever still waits goes out now, in order. Frames the provider still owes it are
        dropped when they come (they would be taken for the next turn's)."""
        t = self.turn
        while self.pending:
            self._publish(self.last, self.pending.popleft(), "held")
        if t is not None and t.fed and self.ready:
            self.owed += max(0, t.made - t.frames)
        self.turn = None
        self.next_index = 0

    # ------------------------------------------------------------ what the provider sends
    def _on_frame(self, rgb: Rgb) -> None:
        if not self.paired:
            self._publish(rgb, None, "provider")
            return
        if self.owed:
            self.owed -= 1
            self._drop("late")
            return
        t = self.turn
        if t is None:
            self._drop("unpaired")
            return
        idx = t.frames
        t.frames += 1
        if self.pending and self.pending[0].index == idx:
            self._publish(rgb, self.pending.popleft(), "provider")
        elif idx < self.next_index:
            self._drop("late")
        else:
            self._drop("unpaired")

    def _on_audio(self, pcm: Pcm, rate: int) -> None:
        now_ns = time.monotonic_ns()
        self._audio_out(pcm if pcm.ndim == 2 else pcm.reshape(-1, 1), rate, now_ns)

    def _drop(self, reason: str) -> None:
        self.counts[reason] += 1
        self.m.dropped_frames.labels(self.spec.name, reason).inc()

    # ------------------------------------------------------------ the clock
    def _tick(self) -> None:
        if self._closed or self._loop is None:
            return
        self._timer = self._loop.call_later(TICK, self._tick)
        now = time.monotonic()
        if self.pushed is not None:
            for pcm, ns in self.pushed.due(time.monotonic_ns()):
                self.m.voice.labels(self.spec.name, "pushed").inc(len(pcm) / self.rate)
                self.take(pcm, ns)
        while self.pending and now - self.pending[0].ready > self.timing.max_delay:
            self._publish(self.last, self.pending.popleft(), "held")
        t = self.turn
        if t is not None and not t.ending and now - t.last_voice > self.timing.turn_gap:
            if len(t.carry):            # the last partial frame's voice: a slice of its own
                self._slice(t, t.carry, now)
                t.carry = t.carry[:0]
            t.ending = now
            if t.fed and self.provider is not None:
                self.provider.end_turn()
        if t is not None and t.ending and not self.pending and (not t.fed or t.frames >= t.made or
                                                                now - t.ending > self.timing.max_delay):
            self._finish_turn()
        self._keep_video_going(now)

    def _keep_video_going(self, now: float) -> None:
        gap = 1.0 / self.fps
        if self.pending:
            return
        if self.turn is not None:
            if now - self.last_video > 1.5 * gap:
                self._publish(self.last, None, "repeated")
            return
        streaming = not self.paired and self.ready and now - self.last_video < 3 * gap
        if not streaming and now >= self.next_idle:
            self._publish(self.idle, None, "idle")
            self.next_idle = self.next_idle + gap if now - self.next_idle < gap else now + gap

    # ------------------------------------------------------------ onto the bus
    def _publish(self, rgb: Rgb, s: Slice | None, kind: str) -> None:
        now_ns = time.monotonic_ns()
        ns = max(s.capture_ns if s is not None else now_ns, self.last_video_ns + 1_000_000)
        try:
            w, h = self.face.width, self.face.height
            loan = self.sink.loan_picture(w, h, "rgb24")
            loan.array.reshape(h, w, 3)[...] = fit(rgb, w, h)
            self.sink.send_picture(loan, pts=ns * 9 // 100_000, time_base=VIDEO_TB, capture_ns=ns)
        except (framebus.BusError, OSError, ValueError) as exc:
            self._bus_error(exc)
        else:
            self.last_video_ns = ns
            self.counts[kind] += 1
            self.m.frames.labels(self.spec.name, kind).inc()
        self.last_video = time.monotonic()
        if kind == "provider":
            self.last = rgb
        if s is not None:
            self.next_index = s.index + 1
            self._audio_out(self.upsample(s.pcm, self.rate).reshape(-1, 1), OUT_RATE, s.capture_ns)
            if kind == "provider":
                latency = (now_ns - s.capture_ns) / 1e9
                self.latencies.append(latency)
                self.m.latency.labels(self.spec.name).observe(latency)

    def _audio_out(self, pcm: Pcm, rate: int, capture_ns: int) -> None:
        pts = max(capture_ns * rate // 1_000_000_000, self.next_audio_pts)
        try:
            self.sink.audio(pcm, rate, pts=pts, capture_ns=capture_ns)
        except (framebus.BusError, OSError, ValueError) as exc:
            self._bus_error(exc)
            return
        self.next_audio_pts = pts + len(pcm)
        self.m.audio.labels(self.spec.name).inc(len(pcm) / rate)

    def _bus_error(self, exc: Exception) -> None:
        self._drop("bus")
        self.throttled.warning("bus", f"avatar {self.spec.name}: cannot write to the bus: {exc}")

    # ------------------------------------------------------------ what the hub and `ctl avatar list` see
    def session(self) -> dict[str, Any]:
        n = self.spec.name
        tracks = [{"id": "video", "kind": "video", "stream": n, "format": "rgb24", "width": self.face.width,
                   "height": self.face.height, "fps": self.fps},
                  {"id": "audio", "kind": "audio", "stream": audio_stream(n), "format": "s16", "rate": OUT_RATE}]
        out: dict[str, Any] = {"id": n, "room": self.spec.room, "kind": "avatar", "tracks": tracks}
        if self.state != "ready":
            out["note"] = f"{self.state}: {self.problem}" if self.problem else self.state
        return out

    def status(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] if lat else None
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None
        s, c = self.spec, self.counts
        return {"name": s.name, "room": s.room, "provider": s.provider, "audio": s.audio, "image": s.image,
                "size": f"{self.face.width}x{self.face.height}", "fps": self.fps, "rate": self.rate,
                "state": self.state, "problem": self.problem, "origin": s.origin, "turn": self.turn is not None,
                "pending": len(self.pending), "pushed_s": round(self.pushed.pending_s(), 3) if self.pushed else 0.0,
                "latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "latency_p99_ms": None if p99 is None else round(p99 * 1000, 1),
                "frames": {k: c[k] for k in ("provider", "idle", "held", "repeated")},
                "dropped": {k: c[k] for k in ("late", "unpaired", "bus")},
                **{k: c[k] for k in ("turns", "errors", "connects", "voice_dropped")},
                "provider_status": self.provider.status() if self.provider is not None and self.ready else {}}
