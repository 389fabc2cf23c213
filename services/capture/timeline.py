"""One meaning for timestamps everywhere: a source's clock made continuous.

Every item capture puts on the bus carries two times (docs/capture.md):

* capture_ns: CLOCK_MONOTONIC when the item was captured (received from the network or
  device, drawn, or due for a file paced in real time). Comparable across every stream
  and process of the box: what the recorder and the bridge line streams up with.
* pts (with its time base): the source's own presentation time, made continuous here.
  Sources' clocks wrap (RTP's 32-bit 90 kHz clock after 13 h, MPEG-TS's 33 bits after
  26 h), restart (a camera reboots, a file loops, a stream reconnects) or leap. A
  `Timeline` follows the source's clock while it advances plausibly, and when it goes
  backwards or leaps further than `max_gap` beyond what the capture clock saw elapse, it
  rebases: the output continues from where it was by the capture-clock time elapsed. So
  the output never goes backwards and never leaps; each rebase is counted and marks the
  item as a discontinuity.

The decision uses the decode timestamp when the source has one (dts increases in decode
order even with B-frames, where pts does not); pts moves by the same offset.
"""
from __future__ import annotations

from fractions import Fraction

__all__ = ["Timeline"]


class Timeline:
    def __init__(self, time_base: Fraction, max_gap: float = 5.0) -> None:
        self.time_base = Fraction(time_base)
        self.ticks_per_ns = 1 / (self.time_base * 1_000_000_000)
        self.max_gap_ticks = int(max_gap / self.time_base)
        self.offset = 0
        self.last_in: int | None = None    # the source clock (dts or pts) of the previous item
        self.last_out: int | None = None   # its output value
        self.last_ns = 0
        self.rebases = 0

    def map(self, pts: int | None, capture_ns: int, dts: int | None = None) -> tuple[int, bool]:
        """(continuous pts, rebased?) for an item with source `pts`/`dts` captured at `capture_ns`."""
        clock = dts if dts is not None else pts
        if clock is None:  # the source gives no time at all: the capture clock is the time
            clock = pts = self._ticks(capture_ns)
        elif pts is None:
            pts = clock
        rebased = False
        if self.last_in is None:
            self.offset = -clock  # start at 0
        else:
            elapsed = max(0, self._ticks(capture_ns) - self._ticks(self.last_ns))
            step = clock - self.last_in
            if step < 0 or step > elapsed + self.max_gap_ticks:
                # wrapped, restarted or leapt: carry on from the last output by what the capture clock saw
                self.offset = self.last_out + max(1, elapsed) - clock
                self.rebases += 1
                rebased = True
        self.last_in, self.last_out, self.last_ns = clock, clock + self.offset, capture_ns
        return pts + self.offset, rebased

    def _ticks(self, ns: int) -> int:
        return int(ns * self.ticks_per_ns)
