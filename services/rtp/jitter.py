"""The jitter buffer: one RTP stream's packets back in sequence order, bounded in time.

A packet that arrives in order goes out at once. One that arrives after a gap is held
while the packets before it may still come (reordered on the way, or retransmitted after
a NACK), at most `window_ns` after it arrived; then the missing ones are given up as lost
and what is held goes out, each with the number of packets lost just before it, so the
depacketizer breaks the access unit they belonged to. The buffer never holds more than
`capacity` packets (a long outage gives up its gaps early), so its delay is bounded in time
and its memory in packets.

Sequence numbers are 16 bits: they are extended (wrap counted) against the next expected
one. A packet older than that comes too late (`late`, or `duplicate` when it was already
seen: both refused); a jump of more than `MAX_JUMP` either way is a restarted sequence,
taken as a loss and a new start.
"""
from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["JitterBuffer"]

T = TypeVar("T")
MAX_JUMP = 3000


class JitterBuffer(Generic[T]):
    def __init__(self, window_ns: int, capacity: int = 1024) -> None:
        self.window, self.capacity = window_ns, capacity
        self.next: int | None = None          # the extended sequence number expected next
        self.held: dict[int, tuple[T, int]] = {}   # extended seq -> (packet, arrival ns)
        self.highest: int | None = None         # the highest extended seq seen
        self.gap: list[int] = []                # 16-bit seqs found missing by the last push (to NACK)
        self.lost = 0                           # packets given up, in all
        self.reordered = 0                      # packets that came after a later one

    def reset(self) -> None:
        self.next = self.highest = None
        self.held.clear()

    def _extend(self, seq: int) -> int:
        assert self.next is not None
        d = (seq - self.next) & 0xFFFF
        if d >= 0x8000:
            d -= 0x10000
        return self.next + d

    def push(self, seq: int, packet: T, now_ns: int) -> tuple[str, list[tuple[int, T]]]:
        """A packet that arrived: (why it was refused or '', [(lost before it, packet), ...] to go out now)."""
        self.gap = []
        if self.next is None:
            self.next = seq
        ext = self._extend(seq)
        if self.highest is not None and self.highest + 1 < ext <= self.highest + MAX_JUMP:
            self.gap = [s & 0xFFFF for s in range(self.highest + 1, ext)]
        if self.highest is None or ext > self.highest:
            self.highest = ext
        if ext < self.next:
            if self.next - ext > MAX_JUMP:
                return self._restart(ext, packet, now_ns)
            return "late", []
        if ext in self.held:
            return "duplicate", []
        if ext - self.next > MAX_JUMP:
            return self._restart(ext, packet, now_ns)
        if ext == self.next and not self.held:
            self.next += 1
            return "", [(0, packet)]
        if ext > self.next or self.held:
            if ext < max(self.held, default=ext):
                self.reordered += 1
        self.held[ext] = (packet, now_ns)
        out = self._release()
        if len(self.held) > self.capacity:
            out += self._give_up()
        return "", out + self.expire(now_ns)

    def _restart(self, ext: int, packet: T, now_ns: int) -> tuple[str, list[tuple[int, T]]]:
        out = [(1, p) for _, (p, _) in sorted(self.held.items())]   # what was held goes out after a loss
        self.lost += 1
        self.held.clear()
        self.next = self.highest = ext + 1
        return "", [*out, (1, packet)]

    def _release(self) -> list[tuple[int, T]]:
        out = []
        while self.next in self.held:
            out.append((0, self.held.pop(self.next)[0]))
            self.next += 1
        return out

    def _give_up(self) -> list[tuple[int, T]]:
        """The packets missing before the first one held are lost: it and those after it go out."""
        assert self.next is not None
        first = min(self.held)
        missing = first - self.next
        self.lost += missing
        self.next = first
        (packet, _) = self.held.pop(first)
        self.next += 1
        return [(missing, packet), *self._release()]

    def expire(self, now_ns: int) -> list[tuple[int, T]]:
        """Give up the gaps whose first later packet has waited `window_ns`."""
        out: list[tuple[int, T]] = []
        while self.held:
            first = min(self.held)
            if now_ns - self.held[first][1] < self.window:
                break
            out += self._give_up()
        return out

    def deadline(self) -> int | None:
        """When the oldest gap is given up (ns), or None when nothing is held."""
        if not self.held:
            return None
        return self.held[min(self.held)][1] + self.window
