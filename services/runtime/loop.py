"""The one loop a service runs on: ZeroMQ sockets, file descriptors, timers and signals.

Every piece of a service's mutable state is touched from this loop only (control
requests, hook events, timers, signals), so nothing needs a lock. Signals arrive through
`signal.set_wakeup_fd` and are handled between turns, never inside a handler.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

__all__ = ["Loop"]

log = logging.getLogger("edgeroom.loop")


class Loop:
    def __init__(self) -> None:
        self.poller = zmq.Poller()
        self.readers: dict[Any, Callable[[], None]] = {}
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.turn_hooks: list[Callable[[float], None]] = []
        self.signal_handlers: dict[int, Callable[[int], None]] = {}
        self._seq = itertools.count()
        self._running = False
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self.add_reader(self._sig_r.fileno(), self._drain_signals)
        # work handed over by other threads (a capture source's reader thread): a deque and a wake-up byte
        self._handed: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add_reader(self._wake_r.fileno(), self._run_handed)

    def add_reader(self, source: Any, callback: Callable[[], None]) -> None:
        """`source`: a zmq socket or anything with a file descriptor."""
        self.readers[source] = callback
        self.poller.register(source, zmq.POLLIN)

    def remove_reader(self, source: Any) -> None:
        if self.readers.pop(source, None) is not None:
            self.poller.unregister(source)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self._seq), callback))

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.call_at(time.monotonic() + delay, callback)

    def every(self, interval: float, callback: Callable[[], None]) -> None:
        def tick() -> None:
            self.call_later(interval, tick)
            callback()

        self.call_later(interval, tick)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop's thread at its next turn; callable from any thread."""
        self._handed.append(callback)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # a full buffer already means a wake-up is pending; closed: stopping
            pass

    def run_handed(self) -> None:
        """Run what other threads handed over; the loop does it each turn, a stopping service once more."""
        self._run_handed()

    def _run_handed(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._handed:
            self._handed.popleft()()

    def on_signal(self, signum: int, handler: Callable[[int], None]) -> None:
        self.signal_handlers[signum] = handler
        signal.signal(signum, lambda *_: None)  # a Python-level no-op; the wakeup fd carries the number
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)

    def _drain_signals(self) -> None:
        try:
            data = self._sig_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            handler = self.signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    def stop(self) -> None:
        self._running = False

    def _run_due_timers(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, _, callback = heapq.heappop(self.timers)
            callback()

    def _timeout_ms(self, now: float, cap: float) -> int:
        wait = cap if not self.timers else min(cap, max(0.0, self.timers[0][0] - now))
        return int(wait * 1000) + (1 if wait > 0 else 0)

    def run_once(self, cap: float = 0.5) -> None:
        now = time.monotonic()
        for hook in self.turn_hooks:
            hook(now)
        self._run_due_timers(now)
        for source, _ in self.poller.poll(self._timeout_ms(time.monotonic(), cap)):
            callback = self.readers.get(source)
            if callback is not None:
                callback()

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once()

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in self.signal_handlers:
            signal.signal(signum, signal.SIG_DFL)
        for sock in (self._sig_r, self._sig_w, self._wake_r, self._wake_w):
            sock.close()
