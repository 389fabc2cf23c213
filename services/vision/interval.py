"""Ask a vision provider about each stream's newest picture every `interval` seconds, never twice at once.

    caller = IntervalCaller(provider, on_result=..., on_error=..., workers=4, registry=registry)
    caller.add("door", get_jpeg, interval=2.0, prompt="Who is at the door?")   # get_jpeg() -> bytes | None
    ...
    caller.remove("door")
    caller.close()                      # prompt, even with a call hung in flight

RoomKit's weakness 6 (calls overlap when the API is slower than the interval, and finish
out of order) is ruled out by construction:

* One scheduler thread keeps each stream's next due time (monotonic clock, fixed rate:
  due += interval, re-anchored to now after a long stall, so no burst of catch-up calls).
* A stream has at most one call pending or in flight. A tick that finds one is *skipped*
  and counted (`skipped`, edgeroom_vision_interval_skipped{reason="in_flight"}): a slow
  API lowers the call rate, it never builds a queue, and since calls of one stream never
  overlap their results are delivered in call order (seq 1, 2, 3, ...).
* The picture is fetched by the worker when the call starts (`get_frame()` is called then,
  not at the tick), so it is the newest one, never one that aged in a queue. None means
  "no picture yet": that tick is skipped (reason "no_frame"), not an error.
* A fixed pool of `workers` daemon threads makes the calls; streams share it, so two
  streams run concurrently up to that bound. A queue of jobs never holds more than one
  entry per stream.

Results go to `on_result(stream, seq, result)`, failures to `on_error(stream, seq, exc)`
(a ProviderError, or whatever get_frame raised), on a worker thread: the service moves
them onto its own loop (loop.call_soon_threadsafe). A callback that raises is logged and
counted; it never stops the caller. Nothing here knows about the bus: the frame getter
is injected.

close() stops the scheduler, closes nothing it does not own (the provider is the
caller's), and returns within `join_timeout` even when a call hangs: the workers are
daemon threads, each call is bounded by its provider's timeout, and a result that comes
back after close() or after its stream was removed is dropped, not delivered.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.vision.providers import ProviderError, VisionProvider
from services.vision.types import VisionResult

__all__ = ["IntervalCaller", "StreamStats"]

log = logging.getLogger("edgeroom.vision")

_KEEP = object()   # update(): leave the schema as it is
FrameGetter = Callable[[], "bytes | None"]
ResultCallback = Callable[[str, int, VisionResult], None]
ErrorCallback = Callable[[str, int, BaseException], None]


@dataclass
class StreamStats:
    calls: int = 0          # calls started
    results: int = 0
    errors: int = 0
    skipped: int = 0        # ticks skipped because a call was pending or in flight
    no_frame: int = 0       # ticks skipped because get_frame() had nothing


@dataclass
class _Stream:
    name: str
    get_frame: FrameGetter
    interval: float
    prompt: str
    schema: dict | None
    provider: VisionProvider
    generation: int
    due: float
    busy: bool = False
    seq: int = 0
    stats: StreamStats = field(default_factory=StreamStats)


class _Metrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.calls = Counter("edgeroom_vision_interval_calls", "Vision calls started by the interval, by stream.",
                             ["stream"], registry=r)
        self.skipped = Counter("edgeroom_vision_interval_skipped",
                               "Interval ticks that made no call, by stream and reason (in_flight, no_frame).",
                               ["stream", "reason"], registry=r)
        self.failed = Counter("edgeroom_vision_interval_failed",
                              "Interval calls that ended in an error, by stream and reason.",
                              ["stream", "reason"], registry=r)
        self.callback_errors = Counter("edgeroom_vision_interval_callback_errors",
                                       "on_result/on_error callbacks that raised.", registry=r)
        self.in_flight = Gauge("edgeroom_vision_interval_in_flight", "Vision calls pending or in flight.",
                               registry=r)


class IntervalCaller:
    def __init__(self, provider: VisionProvider, *, on_result: ResultCallback, on_error: ErrorCallback,
                 workers: int = 4, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.provider = provider
        self._on_result = on_result
        self._on_error = on_error
        self._clock = clock
        self._m = _Metrics(registry or CollectorRegistry())
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._streams: dict[str, _Stream] = {}
        self._stats: dict[str, StreamStats] = {}          # outlives remove() and close(), for reports
        self._heap: list[tuple[float, int, str]] = []     # (due, generation, stream)
        self._generations = itertools.count(1)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._scheduler = threading.Thread(target=self._schedule, name="vision-interval", daemon=True)
        self._workers = [threading.Thread(target=self._work, name=f"vision-call-{i}", daemon=True)
                         for i in range(workers)]
        self._scheduler.start()
        for t in self._workers:
            t.start()

    # -- public ------------------------------------------------------------------------

    def add(self, stream: str, get_frame: FrameGetter, *, interval: float, prompt: str,
            schema: dict | None = None, provider: VisionProvider | None = None, first_after: float = 0.0) -> None:
        """Start calling for `stream`: the first tick after `first_after` seconds, then every `interval`."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        with self._wake:
            if self._closed:
                raise RuntimeError("IntervalCaller is closed")
            if stream in self._streams:
                raise ValueError(f"stream {stream!r} is already being described")
            s = _Stream(stream, get_frame, float(interval), prompt, schema, provider or self.provider,
                        next(self._generations), self._clock() + max(0.0, first_after))
            self._streams[stream] = s
            self._stats[stream] = s.stats
            heapq.heappush(self._heap, (s.due, s.generation, stream))
            self._wake.notify()

    def update(self, stream: str, *, interval: float | None = None, prompt: str | None = None,
               schema: dict | None | object = _KEEP) -> None:
        """Change a stream's interval, prompt or schema (a config reload); a call in flight keeps the old ones."""
        if interval is not None and interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        with self._wake:
            s = self._streams[stream]
            if prompt is not None:
                s.prompt = prompt
            if schema is not _KEEP:
                s.schema = schema  # type: ignore[assignment]
            if interval is not None and interval != s.interval:
                s.interval = float(interval)
                s.due = min(s.due, self._clock() + s.interval)
                s.generation = next(self._generations)      # the old heap entry goes stale
                heapq.heappush(self._heap, (s.due, s.generation, stream))
                self._wake.notify()

    def remove(self, stream: str) -> bool:
        """Stop calling for `stream`; a call in flight finishes but its result is dropped."""
        with self._wake:
            return self._streams.pop(stream, None) is not None

    def streams(self) -> list[str]:
        with self._lock:
            return sorted(self._streams)

    def stats(self, stream: str) -> StreamStats:
        """A copy of the stream's counters (also after remove() and close())."""
        with self._lock:
            return StreamStats(**vars(self._stats[stream]))

    def close(self, join_timeout: float = 1.0) -> None:
        """Stop ticking; wait up to join_timeout for idle workers to exit; never for a hung call."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._streams.clear()
            self._wake.notify_all()
        for _ in self._workers:
            self._jobs.put(None)
        deadline = time.monotonic() + join_timeout
        for t in [self._scheduler, *self._workers]:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in self._workers if t.is_alive()]
        if hung:
            log.info("vision interval closed with %d call(s) still in flight (%s); they end at their timeout",
                     len(hung), ", ".join(hung))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- scheduler ---------------------------------------------------------------------

    def _schedule(self) -> None:
        with self._wake:
            while not self._closed:
                now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    _, gen, name = heapq.heappop(self._heap)
                    s = self._streams.get(name)
                    if s is None or s.generation != gen:
                        continue                            # removed (or removed and added again)
                    self._tick(s, now)
                    heapq.heappush(self._heap, (s.due, s.generation, name))
                timeout = (self._heap[0][0] - now) if self._heap else None
                self._wake.wait(timeout)

    def _tick(self, s: _Stream, now: float) -> None:
        """One due time of a stream (lock held): start a call or count a skip; set the next due time."""
        if s.busy:
            s.stats.skipped += 1
            self._m.skipped.labels(s.name, "in_flight").inc()
        else:
            s.busy = True
            s.seq += 1
            self._m.in_flight.inc()
            self._jobs.put((s, s.seq))
        s.due += s.interval
        if s.due <= now:                    # stalled for more than an interval: re-anchor, no burst
            s.due = now + s.interval

    # -- workers -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            s, seq = job
            try:
                self._call(s, seq)
            finally:
                with self._lock:
                    s.busy = False
                self._m.in_flight.dec()

    def _call(self, s: _Stream, seq: int) -> None:
        if not self._live(s):
            return
        try:
            jpeg = s.get_frame()
        except Exception as e:              # noqa: BLE001 (the getter is the service's; report, keep going)
            self._failed(s, seq, e, "frame")
            return
        if jpeg is None:
            with self._lock:
                s.stats.no_frame += 1
            self._m.skipped.labels(s.name, "no_frame").inc()
            return
        with self._lock:
            s.stats.calls += 1
        self._m.calls.labels(s.name).inc()
        try:
            result = s.provider.describe(jpeg, s.prompt, schema=s.schema)
        except ProviderError as e:
            self._failed(s, seq, e, e.reason)
            return
        except Exception as e:              # noqa: BLE001 (a provider bug must not kill the worker)
            log.exception("vision provider %s raised unexpectedly", getattr(s.provider, "name", "?"))
            self._failed(s, seq, e, "internal")
            return
        if not self._live(s):
            return                          # closed or removed while the call was out: drop
        with self._lock:
            s.stats.results += 1
        result.metadata.setdefault("stream", s.name)
        result.metadata.setdefault("seq", seq)
        self._deliver(self._on_result, s.name, seq, result)

    def _failed(self, s: _Stream, seq: int, exc: BaseException, reason: str) -> None:
        with self._lock:
            s.stats.errors += 1
        self._m.failed.labels(s.name, reason).inc()
        if self._live(s):
            self._deliver(self._on_error, s.name, seq, exc)

    def _live(self, s: _Stream) -> bool:
        with self._lock:
            return not self._closed and self._streams.get(s.name) is s

    def _deliver(self, callback, name: str, seq: int, value) -> None:
        try:
            callback(name, seq, value)
        except Exception:                   # noqa: BLE001
            self._m.callback_errors.inc()
            log.exception("vision interval callback failed for stream %s", name)
