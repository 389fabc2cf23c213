"""An item as a consumer sees it: a zero-copy view of a slot plus its metadata."""
from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

from framebus.atomics import fence_acquire
from framebus.errors import BusError
from framebus.formats import (
    CODEC_NAMES,
    FLAG_KEYFRAME,
    KIND_AUDIO,
    KIND_ENCODED,
    KIND_NAMES,
    KIND_VIDEO,
    PIXEL_FORMAT_NAMES,
)
from framebus.layout import Meta
from framebus.views import Bytes, ItemArray, picture_planes

if TYPE_CHECKING:
    from framebus.consumer import _Ring

__all__ = ["Item", "Overwritten"]


class Overwritten(BusError):
    """The slot was reused while the item was being read: its contents are not this item."""


class Item:
    """One received item. `array` is a read-only view straight into shared memory.

    The view stays readable after the producer moves on, but its bytes then belong to a
    later item: check valid() after using the data (or use copy(), which checks for you).
    """

    __slots__ = ("_ring", "_slot", "_stamp", "_m", "seq", "array")

    def __init__(self, ring: _Ring, slot: int, stamp: int, seq: int, meta: Meta, array: ItemArray) -> None:
        self._ring = ring
        self._slot = slot
        self._stamp = stamp
        self._m = meta
        self.seq = seq
        self.array = array

    def valid(self) -> bool:
        """True while the slot still holds this item (seqlock, reader side: the acquire
        fence orders every earlier read of the payload before the re-read of the stamp)."""
        fence_acquire()
        return self._ring.ro.load(self._ring.geo.stamp_off(self._slot)) == self._stamp

    def copy(self) -> ItemArray:
        """A private copy of the payload; raises Overwritten if it was torn by a reuse."""
        out = self.array.copy()
        if not self.valid():
            raise Overwritten(f"item {self.seq} was overwritten while it was copied")
        return out

    # -- metadata
    @property
    def generation(self) -> int:
        """The producer generation that wrote the item (changes when the producer restarts)."""
        return self._ring.generation

    @property
    def kind(self) -> str:
        return KIND_NAMES[self._m[0]]

    @property
    def format(self) -> str | None:
        """Pixel format of a picture ('rgb24', ...), else None."""
        return PIXEL_FORMAT_NAMES.get(self._m[1]) if self._m[0] == KIND_VIDEO else None

    @property
    def codec(self) -> str | None:
        """Codec of an encoded access unit ('h264', ...), else None."""
        return CODEC_NAMES.get(self._m[1]) if self._m[0] == KIND_ENCODED else None

    @property
    def flags(self) -> int:
        return self._m[2]

    @property
    def keyframe(self) -> bool:
        return bool(self._m[2] & FLAG_KEYFRAME)

    @property
    def size(self) -> int:
        """Payload bytes."""
        return self._m[3]

    @property
    def width(self) -> int:
        """Picture width; for an encoded item the stream's, when its producer said it (else 0)."""
        return self._m[4] if self._m[0] in (KIND_VIDEO, KIND_ENCODED) else 0

    @property
    def height(self) -> int:
        return self._m[5] if self._m[0] in (KIND_VIDEO, KIND_ENCODED) else 0

    @property
    def stride(self) -> int:
        """Row pitch of plane 0 of a picture in bytes."""
        return self._m[6] if self._m[0] == KIND_VIDEO else 0

    @property
    def rate(self) -> int:
        """Audio sample rate in Hz (0 for video)."""
        return self._m[4] if self._m[0] == KIND_AUDIO else 0

    @property
    def channels(self) -> int:
        return self._m[5] if self._m[0] == KIND_AUDIO else 0

    @property
    def samples(self) -> int:
        return self._m[6] if self._m[0] == KIND_AUDIO else 0

    @property
    def pts(self) -> int:
        return self._m[8]

    @property
    def time_base(self) -> Fraction:
        return Fraction(self._m[9], self._m[10])

    @property
    def capture_ns(self) -> int:
        """When the source captured it, CLOCK_MONOTONIC ns (same clock in every process)."""
        return self._m[11]

    @property
    def publish_ns(self) -> int:
        """When the producer sent it, CLOCK_MONOTONIC ns."""
        return self._m[12]

    @property
    def extradata_version(self) -> int:
        """Which Consumer.extradata() applies to this item (0: none set yet)."""
        return self._m[13]

    def planes(self) -> tuple[Bytes, ...]:
        """Picture planes: (Y, U, V) for yuv420p, (Y, UV) for nv12, (picture,) else."""
        if self._m[0] != KIND_VIDEO:
            raise BusError(f"item {self.seq} is {self.kind}, not a picture")
        _, fmt, _, _, w, h, s0, s1 = self._m[:8]
        base = self._ring.views.base(self._slot)
        return picture_planes(base, fmt, w, h, s0, s1)

    def __repr__(self) -> str:
        return f"<Item seq={self.seq} {self.kind} {self.format or self.codec or ''} size={self.size}>"
