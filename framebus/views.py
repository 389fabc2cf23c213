"""numpy views of slot payloads, made once per slot and shape and then reused.

The same code serves the producer (views of its writable mapping, to fill loaned slots)
and consumers (views of their read-only mapping). Creating an ndarray costs about a
microsecond; a steady stream reuses the cached one, so the hot path allocates only the
small Item object.
"""
from __future__ import annotations

import mmap

import numpy as np
import numpy.typing as npt

from framebus.formats import KIND_AUDIO, KIND_ENCODED, PIXEL_FORMAT_NAMES

__all__ = ["Bytes", "ItemArray", "SlotViews", "picture_planes"]

Bytes = npt.NDArray[np.uint8]
# What an item's array is: bytes (pictures, encoded units) or int16 samples (audio).
ItemArray = npt.NDArray[np.uint8 | np.int16]

_PACKED = {1: 3, 2: 3, 3: 1}  # rgb24, bgr24, gray -> bytes per pixel
_YUV420P, _NV12 = 4, 5
_CACHE_LIMIT = 8


def _chroma(n: int) -> int:
    return (n + 1) // 2


class SlotViews:
    """Per-slot view cache over one mapping."""

    __slots__ = ("_bases", "_cache")

    def __init__(self, buffer: mmap.mmap, payloads_off: int, slot_stride: int, slot_count: int, capacity: int) -> None:
        whole = np.frombuffer(buffer, dtype=np.uint8)
        self._bases = [
            whole[payloads_off + i * slot_stride : payloads_off + i * slot_stride + capacity]
            for i in range(slot_count)
        ]
        self._cache: list[dict[tuple[int, int, int, int, int], Bytes]] = [{} for _ in range(slot_count)]

    def base(self, index: int) -> Bytes:
        """The whole payload of slot `index` as a 1-D uint8 array."""
        return self._bases[index]

    def get(self, index: int, kind: int, fmt: int, size: int, w: int, h: int, s0: int, s1: int) -> ItemArray:
        """The natural array view of an item in slot `index` (see Item.array)."""
        base = self._bases[index]
        if kind == KIND_ENCODED:
            return base[:size]
        if kind == KIND_AUDIO:
            # w = rate, h = channels, s0 = samples
            return base[: s0 * h * 2].view(np.int16).reshape(s0, h)
        key = (fmt, w, h, s0, s1)
        cache = self._cache[index]
        view = cache.get(key)
        if view is None:
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            view = cache[key] = _picture_view(base, fmt, w, h, s0, s1, size)
        return view


def _picture_view(base: Bytes, fmt: int, w: int, h: int, s0: int, s1: int, size: int) -> Bytes:
    bpp = _PACKED.get(fmt)
    if bpp is not None:
        shape = (h, w, bpp) if bpp > 1 else (h, w)
        strides = (s0, bpp, 1) if bpp > 1 else (s0, 1)
        return _strided(base, 0, shape, strides)
    if fmt in (_YUV420P, _NV12) and s0 == w and w % 2 == 0 and h % 2 == 0:
        # The tight I420 / NV12 buffer, shaped the way cv2.cvtColor wants it.
        return base[: size].reshape(h * 3 // 2, w)
    return base[:size]


def _strided(base: Bytes, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> Bytes:
    # np.ndarray checks that shape and strides stay inside `base`, so even a corrupt
    # descriptor can never produce a view past the slot.
    return np.ndarray(shape, np.uint8, buffer=base, offset=offset, strides=strides)


def picture_planes(base: Bytes, fmt: int, w: int, h: int, s0: int, s1: int) -> tuple[Bytes, ...]:
    """The planes of a picture: (Y, U, V) for yuv420p, (Y, UV) for nv12, (picture,) else."""
    if fmt in _PACKED:
        return (_picture_view(base, fmt, w, h, s0, s1, s0 * h),)
    y = _strided(base, 0, (h, w), (s0, 1))
    ch, cw = _chroma(h), _chroma(w)
    if fmt == _YUV420P:
        u = _strided(base, s0 * h, (ch, cw), (s1, 1))
        v = _strided(base, s0 * h + s1 * ch, (ch, cw), (s1, 1))
        return (y, u, v)
    if fmt == _NV12:
        return (y, _strided(base, s0 * h, (ch, cw, 2), (s1, 2, 1)))
    raise ValueError(f"unknown pixel format id {fmt} ({PIXEL_FORMAT_NAMES.get(fmt, '?')})")

