"""Items per second, measured between two looks at a running count."""
from __future__ import annotations

import time

__all__ = ["RateMeter"]


class RateMeter:
    """`update(count)` once in a while (a service's one-second tick) with a count that only grows;
    `rate` is the items per second since the previous update (0 before the second one)."""

    __slots__ = ("_count", "_when", "rate")

    def __init__(self) -> None:
        self._when, self._count = time.monotonic(), 0
        self.rate = 0.0

    def update(self, count: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.rate = max(0, count - self._count) / max(1e-6, now - self._when)
        self._when, self._count = now, count
        return self.rate
