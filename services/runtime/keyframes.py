"""Keyframe requests, on the side that can make a keyframe: throttled, repeated until one comes, counted.

Any reader of an encoded stream may ask for a keyframe (`edgeroom ctl keyframe STREAM`, or
`Service.request_keyframe`): the hub forwards the request to the service that produces the
stream, which answers through its `stream.keyframe` offer (`Service.offer_keyframes`). A
producer that *can* make one (an encoder forces an IDR; a call transport sends PLI and FIR
to its peer) keeps a `KeyframeRequests`:

    requests = KeyframeRequests(registry, loop, make=force_idr)
    requests.request("cam", "loss")      # from the offer: sends now, or is throttled
    requests.keyframe("cam")             # when the keyframe goes onto the bus: satisfied

* a request makes one now unless one was made less than `min_interval` (0.5 s) ago, pending
  or already on the bus: many readers asking at once cost one keyframe (counted as
  `throttled`; `how` is `pending`, or `recent` when it went out already: a reader that
  missed it asks again, as RouteReader does once a second while it waits);
* a request stays pending until a keyframe of that stream is put on the bus; while
  pending it is made again every `repeat` seconds (a peer's PLI lost on the way), at
  most `max_tries` times, then given up (counted);
* counted: requests by outcome (requested, sent, throttled, given_up), satisfied, and the
  time from the first request to the keyframe.

A producer that cannot (a file, an RTSP camera) answers with the reason and when its
next keyframe is due; see `cannot()`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["KeyframeRequests", "cannot"]

MIN_INTERVAL = 0.5   # seconds between two keyframes made for requests
REPEAT = 1.0         # seconds after which a request not yet satisfied is made again
MAX_TRIES = 10


class _Timers(Protocol):
    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...


@dataclass
class _Pending:
    since: float        # the first request not yet satisfied
    sent_at: float      # the last time one was made
    tries: int


def cannot(reason: str, next_in: float | None = None) -> dict[str, Any]:
    """The answer of a producer that cannot make a keyframe, with when its next one is due (seconds)."""
    return {"made": False, "reason": reason, "next_keyframe_in": None if next_in is None else round(next_in, 3)}


class KeyframeRequests:
    def __init__(self, registry: CollectorRegistry, loop: _Timers, make: Callable[[str], str],
                 *, min_interval: float = MIN_INTERVAL, repeat: float = REPEAT, max_tries: int = MAX_TRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`make(stream)` asks for a keyframe now and returns how ("idr", "pli", ...)."""
        self.loop, self.make, self.clock = loop, make, clock
        self.min_interval, self.repeat, self.max_tries = min_interval, repeat, max_tries
        self.pending: dict[str, _Pending] = {}
        self.made_at: dict[str, float] = {}      # when one was last asked of the maker, per stream
        self.m_requests = Counter("edgeroom_keyframe_requests", "Keyframe requests a producer got, by stream and "
                                  "outcome (requested, sent, throttled, given_up).", ["stream", "outcome"],
                                  registry=registry)
        self.m_satisfied = Counter("edgeroom_keyframe_satisfied", "Keyframe requests satisfied by a keyframe on the "
                                   "bus.", ["stream"], registry=registry)
        self.m_seconds = Histogram("edgeroom_keyframe_seconds", "From a keyframe request to the keyframe on the bus.",
                                   ["stream"], registry=registry,
                                   buckets=(.01, .02, .05, .1, .2, .5, 1.0, 2.0, 5.0))

    def request(self, stream: str, reason: str = "") -> dict[str, Any]:
        """A request for `stream`; the answer for the requester."""
        now = self.clock()
        self.m_requests.labels(stream, "requested").inc()
        p = self.pending.get(stream)
        if p is not None and now - p.sent_at < self.min_interval:
            self.m_requests.labels(stream, "throttled").inc()
            return {"made": True, "how": "pending", "throttled": True, "waiting": round(now - p.since, 3)}
        made = self.made_at.get(stream)
        if p is None and made is not None and now - made < self.min_interval:
            # one made for a request moments ago went out already (an encoder answers within a frame): it serves
            # this one too, as it would have had it come a moment earlier; a reader that missed it asks again
            self.m_requests.labels(stream, "throttled").inc()
            return {"made": True, "how": "recent", "throttled": True, "waiting": 0.0}
        if p is None:
            p = self.pending[stream] = _Pending(now, now, 0)
            self.loop.call_later(self.repeat, lambda: self._again(stream))
        return {"made": True, "how": self._send(stream, p, now), "throttled": False, "waiting": round(now - p.since, 3)}

    def _send(self, stream: str, p: _Pending, now: float) -> str:
        p.sent_at, p.tries = now, p.tries + 1
        self.made_at[stream] = now
        self.m_requests.labels(stream, "sent").inc()
        return self.make(stream)

    def _again(self, stream: str) -> None:
        p = self.pending.get(stream)
        if p is None:
            return
        if p.tries >= self.max_tries:
            del self.pending[stream]
            self.m_requests.labels(stream, "given_up").inc()
            return
        now = self.clock()
        if now - p.sent_at >= self.repeat - 1e-3:
            self._send(stream, p, now)
        self.loop.call_later(self.repeat, lambda: self._again(stream))

    def keyframe(self, stream: str) -> None:
        """A keyframe of `stream` went onto the bus: a pending request is satisfied."""
        p = self.pending.pop(stream, None)
        if p is not None:
            self.m_satisfied.labels(stream).inc()
            self.m_seconds.labels(stream).observe(self.clock() - p.since)
