"""Room audio: each session's chunks placed on one sample timeline and mixed into one track.

The timeline counts samples since the recording's start (`t0`, a CLOCK_MONOTONIC time):
position p plays at t0 + p / rate. Every chunk carries the capture time of its first
sample, so its *ideal* position is `round((capture_ns - t0) * rate / 1e9)`.

Placing each chunk exactly at its ideal position would turn clock jitter (a stamp a few
ms early or late) into clicks: tiny silences and trimmed samples at every chunk. Placing
chunks back to back would ignore lost chunks and a sound card whose clock runs fast or
slow, and the audio would drift away from the video. `AudioPlacer` does both, per
session:

* within `jitter_ms` of where the previous chunk ended, a chunk is placed right after it
  (continuous sound), and the error (ideal - placed) is kept in a window of the last
  `window` chunks;
* when the *median* of that window (looked at every fifth chunk) exceeds `drift_ms`, the
  session slips by the median
  (a few samples of silence or a few samples trimmed, once): the sample clock follows
  the capture clock to within `drift_ms` however long the recording, and jitter, which
  the median ignores, never moves it;
* further than `jitter_ms` away, the chunk is a real discontinuity: later (lost chunks,
  a paused source) -> placed at its ideal position, the hole stays silent; earlier (its
  start overlaps what this session already placed) -> the overlapping head is trimmed.

`AudioMixer` sums the placed chunks of all sessions into one int32 buffer (numpy adds, no
per-sample Python) with a coverage mask, and hands out finished spans as int16 (clipped)
with the number of samples no session covered (the silence inserted). A chunk that lands
before the span already written is trimmed there and its samples counted as late.
"""
from __future__ import annotations

import numpy as np

__all__ = ["AudioMixer", "AudioPlacer", "Placement"]

NS = 1_000_000_000


class Placement:
    """Where a chunk goes: its first kept sample index and its position on the timeline."""

    __slots__ = ("skip", "pos", "gap", "trimmed", "slipped")

    def __init__(self, skip: int, pos: int, gap: int = 0, trimmed: int = 0, slipped: int = 0) -> None:
        self.skip, self.pos, self.gap, self.trimmed, self.slipped = skip, pos, gap, trimmed, slipped


class AudioPlacer:
    """One session's position on the timeline: continuity within the jitter, slips against drift."""

    def __init__(self, t0_ns: int, rate: int, *, jitter_ms: float = 10.0, drift_ms: float = 2.0,
                 window: int = 25) -> None:
        self.t0, self.rate = t0_ns, rate
        self.jitter = round(jitter_ms * rate / 1000)
        self.drift = max(1, round(drift_ms * rate / 1000))
        self.errors = np.zeros(window, np.int64)
        self.count = 0
        self.next_pos: int | None = None

    def ideal(self, capture_ns: int) -> int:
        return ((capture_ns - self.t0) * self.rate + NS // 2) // NS

    def place(self, capture_ns: int, samples: int) -> Placement:
        ideal = self.ideal(capture_ns)
        if self.next_pos is None:
            return self._anchor(ideal, samples, Placement(0, ideal))
        err = ideal - self.next_pos
        if err > self.jitter:                    # a hole: lost chunks or a pause
            return self._anchor(ideal, samples, Placement(0, ideal, gap=err))
        if err < -self.jitter:                   # starts inside what was placed: trim the head
            trim = min(-err, samples)
            return self._anchor(ideal + trim, samples - trim, Placement(trim, ideal + trim, trimmed=trim))
        n = len(self.errors)
        self.errors[self.count % n] = err
        self.count += 1
        pos, slipped = self.next_pos, 0
        if self.count >= n and self.count % 5 == 0:      # every 5th chunk: the median costs ~40 us
            median = int(np.median(self.errors))
            if abs(median) > self.drift:         # the sample clock wandered off the capture clock: slip once
                slipped = median
                if median < 0:                   # behind where we are: trim the head instead of going back
                    skip = min(-median, samples)
                    self.count = 0
                    self.next_pos = pos + samples - skip
                    return Placement(skip, pos, trimmed=skip, slipped=median)
                pos += median
                self.count = 0
        self.next_pos = pos + samples
        return Placement(0, pos, slipped=slipped)

    def _anchor(self, pos: int, samples: int, placement: Placement) -> Placement:
        self.count = 0
        self.next_pos = pos + max(0, samples)
        return placement


class AudioMixer:
    """A sum of placed chunks over [base, base + capacity) samples; `take` hands out the finished head."""

    def __init__(self, channels: int, capacity: int) -> None:
        self.channels = channels
        self.buf = np.zeros((capacity, channels), np.int32)
        self.covered = np.zeros(capacity, bool)
        self.base = 0          # timeline position of buf[0]: everything before it was written
        self.late = 0          # samples that arrived for a span already written
        self.overflow = 0      # samples beyond the buffer's reach (a chunk longer than the capacity)
        self.end = 0           # the end of the furthest chunk added

    @property
    def capacity(self) -> int:
        return len(self.covered)

    def add(self, pos: int, pcm: np.ndarray) -> None:
        """Add s16 samples (samples,) or (samples, channels) at timeline position `pos`."""
        n = len(pcm)
        start = pos - self.base
        if start < 0:                              # partly or wholly in what was already written
            cut = min(-start, n)
            self.late += cut
            pcm, n, start = pcm[cut:], n - cut, 0
        end = start + n
        if end > self.capacity:
            self.overflow += end - max(start, self.capacity)
            end = max(start, self.capacity)
            pcm = pcm[: end - start]
        if end <= start:
            return
        dst = self.buf[start:end]
        if pcm.ndim == 1 or pcm.shape[1] == 1:
            dst += pcm.reshape(-1, 1)              # mono into every channel
        elif pcm.shape[1] == self.channels:
            dst += pcm
        else:                                      # a different layout: its mean into every channel
            dst += pcm.mean(axis=1, dtype=np.int32).reshape(-1, 1)
        self.covered[start:end] = True
        self.end = max(self.end, self.base + end)

    def take(self, until: int) -> tuple[np.ndarray, int, int]:
        """The finished span [base, until) as clipped int16, its start position, and how many of its
        samples no session covered. The buffer moves on; `until` beyond the capacity is clamped."""
        n = max(0, min(until - self.base, self.capacity))
        start = self.base
        out = np.clip(self.buf[:n], -32768, 32767).astype(np.int16)
        silent = n - int(np.count_nonzero(self.covered[:n]))
        if n:
            filled = max(n, min(self.end - self.base, self.capacity))   # beyond it the buffer is all zeros
            rest = filled - n
            self.buf[:rest] = self.buf[n:filled]
            self.buf[rest:filled] = 0
            self.covered[:rest] = self.covered[n:filled]
            self.covered[rest:filled] = False
            self.base += n
        return out, start, silent
