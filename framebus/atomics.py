"""Ordered loads and stores of u64 words in shared memory.

The compiled helper `framebus._atomic` (built from `_atomic.c`) gives acquire/release
loads and stores and real fences. Without it, on x86_64 only, a pure-Python fallback uses
plain aligned 8-byte loads and stores through numpy: x86 is TSO (loads are not reordered
with loads, stores not with stores), and each access is a separate C call the compiler
cannot reorder, so the ring's seqlock holds. aarch64 (Jetson) reorders both, so there the
helper is required and its absence is an ImportError that says how to get it.

Set EDGEROOM_FRAMEBUS_PURE=1 to force the fallback (x86_64 only; the tests use it to keep
both paths honest).
"""
from __future__ import annotations

import mmap
import os
import platform
from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["NATIVE", "TSO", "SharedWords", "Words", "fence_acquire", "fence_release", "fence_seq_cst"]

# setup.py keeps the same set: there the C helper is optional, everywhere else required.
TSO_MACHINES = frozenset({"x86_64", "amd64", "AMD64", "i386", "i686"})
TSO = platform.machine() in TSO_MACHINES  # the pure-Python fallback exists only here


class SharedWords(Protocol):
    """What both implementations of Words offer: u64 words addressed by byte offset."""

    def load_acquire(self, off: int, /) -> int: ...
    def load(self, off: int, /) -> int: ...
    def store_release(self, off: int, value: int, /) -> None: ...
    def store(self, off: int, value: int, /) -> None: ...
    def add(self, off: int, delta: int, /) -> int: ...
    def release(self) -> None: ...


_RELEASED: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)  # any access raises IndexError


class _PureWords:
    """Fallback with the same interface as framebus._atomic.Words (x86_64 only)."""

    __slots__ = ("_w",)

    def __init__(self, buffer: mmap.mmap, /) -> None:
        self._w: npt.NDArray[np.uint64] = np.frombuffer(buffer, dtype=np.uint64)

    def load_acquire(self, off: int, /) -> int:
        return int(self._w[off >> 3])

    load = load_acquire

    def store_release(self, off: int, value: int, /) -> None:
        self._w[off >> 3] = value

    store = store_release

    def add(self, off: int, delta: int, /) -> int:
        # Not atomic: callers only use add() under the segment's flock.
        value = (int(self._w[off >> 3]) + delta) & 0xFFFFFFFFFFFFFFFF
        self._w[off >> 3] = value
        return value

    def release(self) -> None:
        # Drop the buffer export so the mapping can close; a later access is a bug and fails.
        self._w = _RELEASED


def _noop() -> None:
    return None


_Fence = Callable[[], None]


def _load() -> tuple[bool, Callable[[mmap.mmap], SharedWords], _Fence, _Fence, _Fence]:
    pure = os.environ.get("EDGEROOM_FRAMEBUS_PURE") == "1"
    if not pure:
        try:
            from framebus import _atomic

            return True, _atomic.Words, _atomic.fence_acquire, _atomic.fence_release, _atomic.fence_seq_cst
        except ImportError:
            pass
    if not TSO:
        raise ImportError(
            f"framebus needs its compiled memory fences on {platform.machine()} "
            "(weak memory ordering); install a C compiler and the Python headers "
            "(apt-get install build-essential python3-dev) and reinstall edgeroom"
        )
    return False, _PureWords, _noop, _noop, _noop


NATIVE, Words, fence_acquire, fence_release, fence_seq_cst = _load()
