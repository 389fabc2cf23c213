"""Wake-ups between processes: one named FIFO per waiter, one byte per event.

A waiter (a consumer, or a producer held back by a reliable consumer) owns a FIFO and keeps
it open read-write and non-blocking: the fd is pollable by select/poll, asyncio's
add_reader and a ZeroMQ poller, and never reports hang-up. A notifier opens it write-only
and non-blocking and writes one byte per event:

* a full pipe (EAGAIN) means the waiter is already due to wake: the byte is not needed;
* no reader (ENXIO at open, EPIPE at write) means the waiter died: the notifier drops it.

The waiter drains the FIFO before it re-checks the ring and then sleeps in poll(2), so an
event after the drain always wakes it (no lost wake-up), and an idle waiter costs nothing.
"""
from __future__ import annotations

import errno
import glob
import os
import select
import stat

__all__ = ["Waiter", "notify", "open_notifier", "poke_all"]

_BYTE = b"\x01"


class Waiter:
    """The read side: owns the FIFO file and removes it on close."""

    __slots__ = ("path", "fd", "_poll", "_buf")

    def __init__(self, path: str) -> None:
        try:
            os.mkfifo(path, 0o660)
        except FileExistsError:
            # Left by a dead process whose pid we now have; it is ours to reuse.
            os.unlink(path)
            os.mkfifo(path, 0o660)
        os.chmod(path, 0o660)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self._buf = bytearray(4096)

    def drain(self) -> None:
        """Consume every pending wake-up byte without blocking."""
        buf = self._buf
        try:
            while os.readv(self.fd, [buf]) == len(buf):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None) -> bool:
        """Sleep until a byte arrives or `timeout` seconds pass; True if woken."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        return bool(self._poll.poll(ms))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def open_notifier(path: str) -> int | None:
    """Open a waiter's FIFO for writing; None if it has no reader (dead) or is gone."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return None
        raise
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def notify(fd: int) -> bool:
    """Write one wake-up byte; False if the reader is gone."""
    try:
        os.write(fd, _BYTE)
    except BlockingIOError:
        pass  # the pipe is full: the waiter has wake-ups pending already
    except BrokenPipeError:
        return False
    return True


def poke_all(pattern: str, skip: str | None = None) -> None:
    """Wake every waiter whose FIFO matches `pattern` (a new or closing producer)."""
    for path in glob.glob(pattern):
        if path == skip:
            continue
        fd = open_notifier(path)
        if fd is not None:
            notify(fd)
            os.close(fd)
