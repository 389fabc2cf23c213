"""The voice that drives an avatar: an audio stream of the bus, or audio pushed through the control plane.

    voice = BusVoice("agent-audio", prefix=prefix, rate=16000, on_drop=count)
    loop.add_reader(voice.fileno(), lambda: [take(pcm, ns) for pcm, ns in voice.read()])
    pushed = PushedVoice(rate=16000, limit_s=60)
    pushed.push(pcm, 24000)                    # a whole sentence of an agent's TTS at once
    for pcm, ns in pushed.due(time.monotonic_ns()): take(pcm, ns)     # released in real time

Both hand int16 mono at the provider's `rate` with the capture time of each chunk's first
sample (CLOCK_MONOTONIC, the bus's clock): a stream's own capture times, or for pushed audio
a clock that starts when it is pushed and advances by its samples. Resampling is FFmpeg's
(`av.AudioResampler`), remade when the input's rate changes: RoomKit fed 24 kHz audio to
providers that assumed 16 kHz.

Bad input never raises: a chunk of the wrong kind, an impossible format, one overwritten
while it was read, anything the resampler refuses, is dropped with its reason (`on_drop`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

import framebus

__all__ = ["BusVoice", "PushedVoice", "Resampler"]

Pcm = npt.NDArray[np.int16]
MIN_RATE, MAX_RATE, MAX_CHANNELS = 1000, 384000, 32
MAX_ITEMS = 256          # per read(): a producer faster than we read cannot keep the loop here


class Resampler:
    """int16 mono at any rate to int16 mono at `rate`."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._in = 0
        self._r: Any = None

    def __call__(self, mono: Pcm, rate: int) -> Pcm:
        if rate == self.rate:
            return mono
        import av
        if self._r is None or rate != self._in:
            self._r, self._in = av.AudioResampler(format="s16", layout="mono", rate=self.rate), rate
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        parts = [f.to_ndarray().reshape(-1) for f in self._r.resample(frame)]
        return np.concatenate(parts).astype(np.int16, copy=False) if parts else np.zeros(0, np.int16)


def downmix(arr: npt.NDArray[np.int16]) -> Pcm:
    """(samples, channels) int16 to mono: a copy out of the ring."""
    if arr.shape[1] == 1:
        return arr[:, 0].copy()
    return (arr.astype(np.int32).sum(axis=1) // arr.shape[1]).astype(np.int16)


class BusVoice:
    """An audio stream of the bus (attached when its producer appears; followed across its restarts)."""

    def __init__(self, stream: str, *, prefix: str, rate: int, on_drop: Callable[[str, str], None]) -> None:
        self.stream, self.rate, self.on_drop = stream, rate, on_drop
        self.consumer = framebus.Consumer.attach(stream, prefix=prefix, missing_ok=True, start="next")
        self.resample = Resampler(rate)
        self.missed_seen = 0
        self.chunks = 0
        self.last_ns = 0           # when the last chunk came (monotonic), 0 never

    def fileno(self) -> int:
        return self.consumer.fileno()

    def read(self) -> list[tuple[Pcm, int]]:
        out = []
        for _ in range(MAX_ITEMS):
            try:
                item = self.consumer.poll()
            except framebus.BusError as exc:
                self.on_drop("error", f"{self.stream} cannot be read: {exc}")
                break
            if item is None:
                break
            try:
                got = self._take(item)
            except Exception as exc:        # anything a bad chunk makes the resampler do: dropped, not raised
                self.resample = Resampler(self.rate)
                self.on_drop("error", f"{self.stream}: a chunk could not be resampled: {exc!r}")
                continue
            if got is not None:
                out.append(got)
        c = self.consumer
        if c.missed > self.missed_seen:
            n, self.missed_seen = c.missed - self.missed_seen, c.missed
            for _ in range(n):
                self.on_drop("missed", f"{self.stream}: {n} chunk(s) missed on the bus")
        return out

    def _take(self, item: framebus.Item) -> tuple[Pcm, int] | None:
        if item.kind != "audio":
            self.on_drop("wrong_kind", f"{self.stream} carries {item.kind}, not audio")
            return None
        arr, rate, channels = item.array, item.rate, item.channels
        if not (MIN_RATE <= rate <= MAX_RATE and 1 <= channels <= MAX_CHANNELS) or arr.ndim != 2 \
                or arr.dtype != np.int16 or arr.shape[1] != channels or arr.shape[0] == 0:
            self.on_drop("bad_format", f"{self.stream}: a chunk at {rate} Hz x {channels} channel(s) is not s16 "
                                       "audio")
            return None
        mono = downmix(arr)
        if not item.valid():
            self.on_drop("torn", f"{self.stream}: a chunk was overwritten while it was read")
            return None
        self.chunks += 1
        self.last_ns = time.monotonic_ns()
        return self.resample(mono, rate), item.capture_ns

    def close(self) -> None:
        self.consumer.close()


class PushedVoice:
    """Audio pushed at once (an agent's sentence), released in real time on its own clock."""

    def __init__(self, *, rate: int, limit_s: float) -> None:
        self.rate, self.limit = rate, int(limit_s * rate)
        self.resample = Resampler(rate)
        self.buf: Pcm = np.zeros(0, np.int16)
        self.start_ns = 0          # the clock of the audio now buffered: when its first sample is due
        self.released = 0          # samples of it released

    def pending_s(self) -> float:
        return len(self.buf) / self.rate

    def push(self, pcm: npt.NDArray[np.int16], rate: int, now_ns: int) -> float:
        """Queue (samples, channels) or mono int16; the seconds queued after it. ValueError past the limit."""
        mono = downmix(pcm) if pcm.ndim == 2 else pcm.astype(np.int16, copy=False)
        mono = self.resample(mono, rate)
        if len(self.buf) + len(mono) > self.limit:
            raise ValueError(f"{(len(self.buf) + len(mono)) / self.rate:.1f} s of pushed audio would wait; at most "
                             f"{self.limit / self.rate:g} s may")
        if not len(self.buf):
            self.start_ns, self.released = now_ns, 0
        self.buf = np.concatenate((self.buf, mono)) if len(self.buf) else mono
        return self.pending_s()

    def due(self, now_ns: int) -> list[tuple[Pcm, int]]:
        """What is due by now, in one chunk, with the capture time of its first sample."""
        if not len(self.buf):
            return []
        n = min(len(self.buf), (now_ns - self.start_ns) * self.rate // 1_000_000_000 - self.released)
        if n <= 0:
            return []
        chunk, self.buf = self.buf[:n], self.buf[n:]
        at = self.start_ns + self.released * 1_000_000_000 // self.rate
        self.released += n
        return [(chunk, at)]
