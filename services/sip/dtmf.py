"""DTMF received as RFC 4733 telephone-events: RTP payloads to digits, each reported once.

A sender keys one event (a digit) as a run of packets sharing one RTP timestamp, the event's start: a first
one (marker bit set), a progress packet each 20 ms or so with the duration so far, then the end packet (E bit)
sent three times for robustness. `DtmfReceiver.packet()` turns that run into one digit, reported when the
first end packet arrives; an event whose end packets were all lost is reported when the next event's
timestamp comes (or at `flush()`, the caller's timeout), with the longest duration seen. Packets of an
event already passed (a late copy of an end) are ignored. An event longer than a 16-bit duration goes on
in segments (RFC 4733 2.5.1.3: a new timestamp, 0xFFFF later, same event, no E bit on the previous): one digit.

The durations count RTP clock ticks. baresip 1.0 sends them on the audio codec's clock even when the
telephone-event's rtpmap says 8000 (measured: 180 ms keyed in an Opus call came as 8640, 48 kHz ticks;
tests/golden/sip/baresip-dtmf.txt): give the receiver the clock the peer's RTP stream runs on.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["Digit", "DtmfReceiver", "Event", "name", "parse"]

NAMES = "0123456789*#ABCD"
SEGMENT = 0xFFFF                 # the longest duration one timestamp carries (RFC 4733 2.5.1.3)


@dataclass(frozen=True)
class Event:
    """One telephone-event payload (RFC 4733 2.3)."""
    code: int                    # 0-255: 0-9, 10 '*', 11 '#', 12-15 A-D, 16 flash (RFC 4734 for the rest)
    end: bool
    volume: int                  # 0-63, in -dBm0 (0 is loudest)
    duration: int                # RTP clock ticks since the event's timestamp

    @property
    def name(self) -> str:
        return name(self.code)


@dataclass(frozen=True)
class Digit:
    """An event as reported: what was keyed and for how long."""
    name: str
    code: int
    duration_ms: int
    ended: bool                  # False: its end packets never came (reported on the next event, or a flush)


def name(code: int) -> str:
    """'0'-'9', '*', '#', 'A'-'D', 'flash' for 16; any other event its number."""
    if 0 <= code < len(NAMES):
        return NAMES[code]
    return "flash" if code == 16 else str(code)


def parse(payload: bytes) -> Event:
    """The event in an RTP payload; ValueError for one shorter than an event (4 bytes). Bytes past the fourth
    (padding some senders leave) are not read."""
    if len(payload) < 4:
        raise ValueError(f"a telephone-event payload is 4 bytes (event, E/R/volume, duration); this one has "
                         f"{len(payload)}")
    code, flags, duration = struct.unpack_from("!BBH", payload)
    return Event(code, bool(flags & 0x80), flags & 0x3F, duration)


class DtmfReceiver:
    """The telephone-events of one RTP stream to digits, each once. `clock`: the stream's RTP clock rate."""

    def __init__(self, clock: int = 8000) -> None:
        if clock <= 0:
            raise ValueError(f"the clock rate must be positive, got {clock}")
        self.clock = clock
        self.last: Digit | None = None        # the latest digit reported
        self._ts: int | None = None          # the current event's timestamp (of its latest segment)
        self._code = 0
        self._base = 0                       # ticks of the event's earlier segments
        self._longest = 0                    # the longest duration seen in the current segment
        self._reported = True                # the current event was reported (or there is none)

    def packet(self, timestamp: int, payload: bytes) -> str | None:
        """The digit that ended with this packet, once per event; else None. ValueError for a payload that is
        not an event (the state is left as it was)."""
        event = parse(payload)
        timestamp &= 0xFFFFFFFF
        if self._ts is not None and timestamp != self._ts:
            if (timestamp - self._ts) & 0xFFFFFFFF >= 1 << 31:
                return None                                    # an event already passed: a late copy
            if self._continues(timestamp, event):
                self._base += SEGMENT
                self._ts, self._longest = timestamp, event.duration
                return self._end() if event.end else None
            out = None if self._reported else self._report(ended=False)
            self._start(timestamp, event)
            return out if out is not None or not event.end else self._end()
        if self._ts is None:
            self._start(timestamp, event)
        elif not self._reported:
            self._longest = max(self._longest, event.duration)
        if event.end and not self._reported:
            return self._end()
        return None

    def flush(self) -> str | None:
        """The current event if it never ended (call it when the stream fell silent, or at hang-up); else None."""
        if self._ts is None or self._reported:
            return None
        return self._report(ended=False)

    def _continues(self, timestamp: int, event: Event) -> bool:
        """The packet is the next segment of an event too long for one timestamp."""
        if self._ts is None or self._reported or event.code != self._code or self._longest < SEGMENT:
            return False
        return (timestamp - self._ts) & 0xFFFFFFFF == SEGMENT

    def _start(self, timestamp: int, event: Event) -> None:
        self._ts, self._code, self._base = timestamp, event.code, 0
        self._longest, self._reported = event.duration, False

    def _end(self) -> str:
        return self._report(ended=True)

    def _report(self, *, ended: bool) -> str:
        self._reported = True
        self.last = Digit(name(self._code), self._code, (self._base + self._longest) * 1000 // self.clock, ended)
        return self.last.name
