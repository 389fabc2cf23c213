"""POSIX shared-memory segments for rings: build, publish, attach, remove.

A ring is a POSIX shared-memory object, the same thing multiprocessing.shared_memory
opens (shm_open(3) on Linux is open(2) under /dev/shm; `SharedMemory(name)` attaches to a
ring by its `{prefix}.{stream}` name). We go through the file system view instead of the
SharedMemory class for three reasons:

* Python < 3.13: SharedMemory registers every segment it opens with the resource tracker,
  which unlinks it when the *attaching* process exits (CPython issue 82300; `track=False`
  only exists from 3.13). A consumer's exit would delete the producer's ring.
  Unregistering after the fact leaves a window in which a SIGKILL still unlinks it, so we
  never register at all.
* A new ring is built under a private name and published with link(2)/rename(2), so no
  process ever attaches to a half-initialised header, and two producers cannot both win.
* Pages are reserved with posix_fallocate(3) before they are written: a full /dev/shm is
  a clear BusFull error then, not a SIGBUS in the middle of a frame later (Frigate's "Bus
  error"). A ring reserves everything at creation, or (`build(..., reserve=n)`, the long
  history rings) its first n bytes at creation and each slot's payload pages as the
  producer first writes that far into them (`reserve_range`).
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

from framebus.errors import BusFull
from framebus.names import SHM_DIR

__all__ = ["Mapping", "build", "flock", "open_existing", "remove_if_same", "reserve_range"]

MODE = 0o660  # owner and the appliance's group; systemd units share one group


class Mapping:
    """An open segment: its fd (kept for flock and identity) and its mappings."""

    __slots__ = ("fd", "path", "ino", "size", "rw", "ro")

    def __init__(self, fd: int, path: str, size: int, writable_bytes: int) -> None:
        self.fd = fd
        self.path = path
        self.ino = os.fstat(fd).st_ino
        self.size = size
        # rw covers what this process may write; ro (consumers) covers the whole ring and
        # makes every payload view read-only at the MMU, so a bug cannot scribble on frames.
        self.rw = mmap.mmap(fd, writable_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.ro = self.rw if writable_bytes == size else mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)

    def close(self) -> None:
        """Close the fd; the mappings go when the last view of them does (refcounting)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_room(path: str, size: int) -> None:
    """Raise BusFull unless /dev/shm and memory have room for `size` more bytes.

    Checked before any page is touched: tmpfs pages are memory, and a tmpfs may be
    larger than the RAM that backs it, so trying and failing could wake the OOM killer.
    """
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    mem = _mem_available()
    name = os.path.basename(path)
    if size > free:
        raise BusFull(
            f"{SHM_DIR} has {free} bytes free but the ring {name} needs {size}; "
            "enlarge the tmpfs or use fewer or smaller slots"
        )
    if mem is not None and size > mem:
        raise BusFull(
            f"the ring {name} needs {size} bytes but only {mem} bytes of memory are "
            "available; use fewer or smaller slots"
        )


def build(path: str, size: int, reserve: int | None = None) -> tuple[int, mmap.mmap]:
    """Create `path` exclusively, `size` bytes long, its first `reserve` bytes (default: all)
    reserved; return its fd and a mapping. The rest must be reserved (`reserve_range`)
    before it is written."""
    reserve = size if reserve is None else min(reserve, size)
    check_room(path, reserve)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, MODE)
    try:
        os.fchmod(fd, MODE)  # umask must not take the group's access away
        os.ftruncate(fd, size)
        reserve_range(fd, 0, reserve, os.path.basename(path))
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise


def reserve_range(fd: int, offset: int, length: int, name: str) -> None:
    """Allocate the tmpfs pages of [offset, offset + length) (those already there cost nothing);
    BusFull when /dev/shm has no room for them."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG):
            st = os.statvfs(SHM_DIR)
            raise BusFull(
                f"{SHM_DIR} has {st.f_bavail * st.f_frsize} bytes free but the ring {name} needs "
                f"{length} more; enlarge the tmpfs or use fewer or smaller slots"
            ) from None
        raise


def open_existing(path: str) -> tuple[int, int]:
    """Open an existing segment read-write; return (fd, size). FileNotFoundError if absent."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    return fd, os.fstat(fd).st_size


@contextmanager
def flock(fd: int) -> Iterator[None]:
    """Exclusive lock on a segment for the rare table updates; the kernel drops it if we die."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def remove_if_same(path: str, ino: int) -> bool:
    """Unlink `path` only if it is still the segment with inode `ino` (not a successor)."""
    try:
        if os.stat(path).st_ino != ino:
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
