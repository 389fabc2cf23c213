"""The service loop on asyncio, for services built on asyncio libraries (aiortc, SIP stacks).

`AsyncLoop` has the API of `Loop` (services/runtime/loop.py) — readers for ZeroMQ sockets
and file descriptors, timers, signals, work handed over from other threads — so the
service base (heartbeats, the watchdog, sd_notify, reload on SIGHUP, stop on SIGTERM,
commands) runs on it unchanged, and the service's own coroutines run beside it:
`loop.spawn(coro)` starts a task that is cancelled when the service stops, and
`loop.aio` is the asyncio loop itself for libraries that want it.

The same semantics as the plain loop, precisely:
* the watchdog is pinged by a timer on this loop (every 100 ms, sending only when due):
  a coroutine that blocks the loop stops the pings, so systemd (or `edgeroom run`) kills
  the service after WatchdogSec, as with the plain loop;
* signals are handled on the loop (`add_signal_handler`), never inside a handler;
* ZeroMQ sockets signal readiness edge-triggered through their FD: after each callback
  and on a short backstop timer every registered socket's EVENTS is read again, so a
  message that arrived during a send is never left waiting;
* an exception in a callback, or in a task started with `spawn`, is a bug: it stops the
  loop and `run()` raises it, so the service ends as "crashed" and is restarted, as an
  exception escaping the plain loop does (asyncio itself would log it and carry on).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import zmq

__all__ = ["AsyncLoop"]

log = logging.getLogger("edgeroom.loop")

TURN_SECONDS = 0.1     # how often turn hooks (the watchdog ping, the hub link's expiry) run
ZMQ_BACKSTOP = 0.05    # how often ZeroMQ sockets are looked at even without an FD wake-up


class AsyncLoop:
    def __init__(self) -> None:
        self.aio = asyncio.new_event_loop()
        self.turn_hooks: list[Callable[[float], None]] = []
        self.signal_handlers: dict[int, Callable[[int], None]] = {}
        self._zmq: dict[zmq.SyncSocket, Callable[[], None]] = {}
        self._fds: dict[Any, int] = {}
        self._handed: collections.deque[Callable[[], None]] = collections.deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._error: BaseException | None = None
        self.aio.set_exception_handler(self._on_error)
        self.aio.call_soon(self._turn)
        self.aio.call_soon(self._backstop)

    # --- readers ---------------------------------------------------------------------------
    def add_reader(self, source: Any, callback: Callable[[], None]) -> None:
        """`source`: a zmq socket or anything with a file descriptor (or an fd)."""
        if isinstance(source, zmq.Socket):
            self._zmq[source] = callback
            fd = source.fileno()  # ZMQ_FD
            self.aio.add_reader(fd, self._zmq_ready)
        else:
            fd = source if isinstance(source, int) else source.fileno()
            self.aio.add_reader(fd, self._call, callback)
        self._fds[source] = fd

    def remove_reader(self, source: Any) -> None:
        fd = self._fds.pop(source, None)
        if fd is None:
            return
        self._zmq.pop(source, None)
        if fd not in self._fds.values():  # two zmq sockets never share an fd, but be exact
            self.aio.remove_reader(fd)

    def _zmq_ready(self) -> None:
        for sock, callback in list(self._zmq.items()):
            # pyzmq types every option's value as int | bytes; ZMQ_EVENTS is an int
            if sock in self._zmq and not sock.closed and cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                callback()

    def _call(self, callback: Callable[[], None]) -> None:
        callback()
        self._zmq_ready()  # the callback may have sent: a reply may be waiting without an FD edge

    def _backstop(self) -> None:
        self._zmq_ready()
        self.aio.call_later(ZMQ_BACKSTOP, self._backstop)

    # --- timers ----------------------------------------------------------------------------
    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """`when` on time.monotonic(), like the plain loop (asyncio's own clock is the same one on Linux)."""
        self.call_later(max(0.0, when - time.monotonic()), callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.aio.call_later(delay, self._call, callback)

    def every(self, interval: float, callback: Callable[[], None]) -> None:
        def tick() -> None:
            self.aio.call_later(interval, tick)
            self._call(callback)

        self.aio.call_later(interval, tick)

    def _turn(self) -> None:
        now = time.monotonic()
        for hook in self.turn_hooks:
            hook(now)
        self.aio.call_later(TURN_SECONDS, self._turn)

    # --- other threads, coroutines -----------------------------------------------------------
    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop's thread soon; callable from any thread."""
        self._handed.append(callback)
        try:
            self.aio.call_soon_threadsafe(self._run_handed)
        except RuntimeError:  # the loop is closed: stopping; run_handed() takes what is left
            pass

    def run_handed(self) -> None:
        self._run_handed()

    def _run_handed(self) -> None:
        while self._handed:
            self._handed.popleft()()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run `coro` as a task of this loop; it is cancelled when the service stops. An exception
        it raises stops the loop, and run() raises it."""
        task = self.aio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    def _on_error(self, _aio: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self._fail(exc if isinstance(exc, BaseException) else RuntimeError(str(context.get("message"))))

    def _fail(self, exc: BaseException | None) -> None:
        if self._error is None and exc is not None:
            self._error = exc
        self.aio.stop()

    # --- signals, running ---------------------------------------------------------------------
    def on_signal(self, signum: int, handler: Callable[[int], None]) -> None:
        self.signal_handlers[signum] = handler
        self.aio.add_signal_handler(signum, self._call, lambda: handler(signum))

    def stop(self) -> None:
        self.aio.stop()

    def run_once(self, cap: float = 0.5) -> None:
        """One pass of the loop (for tests): what is due runs, then it waits at most `cap` seconds."""
        self.aio.call_later(cap, self.aio.stop)
        self.aio.run_forever()

    def run(self) -> None:
        self.aio.run_forever()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        # a task that just finished is still in the set until its done-callback runs (inside the wait below):
        # waiting on a copy of the unfinished ones never hands asyncio.wait an empty set
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            self.aio.run_until_complete(asyncio.wait(pending, timeout=2.0))
        for signum in self.signal_handlers:
            self.aio.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_DFL)
        for fd in set(self._fds.values()):
            self.aio.remove_reader(fd)
        self._fds.clear()
        self._zmq.clear()
        self.aio.close()
