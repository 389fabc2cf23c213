"""Rate limits per source address: a token bucket each, bounded in how many addresses it remembers.

The SIP service asks `allow(address, rate, burst)` for every message (and again, under its
own key, for every new INVITE): a source over its rate is refused until its bucket refills.
At most MAX_SOURCES buckets are kept, the least recently seen forgotten first, so a flood
from many addresses costs bounded memory.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Limiter"]

MAX_SOURCES = 4096


@dataclass
class _Bucket:
    tokens: float
    at: float


class Limiter:
    """A token bucket per source: `rate` a second, `burst` at once."""

    def __init__(self) -> None:
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, source: str, rate: float, burst: float) -> bool:
        now = time.monotonic()
        b = self.buckets.pop(source, None) or _Bucket(burst, now)
        b.tokens = min(burst, b.tokens + (now - b.at) * rate)
        b.at = now
        self.buckets[source] = b
        if len(self.buckets) > MAX_SOURCES:
            self.buckets.popitem(last=False)
        if b.tokens < 1:
            return False
        b.tokens -= 1
        return True
