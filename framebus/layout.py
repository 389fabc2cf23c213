"""Byte layout of a ring segment. docs/framebus.md draws it; this file is the truth.

    0      header      4096 bytes: identity (written once), then hot words on their own
                        cache lines, then the extradata area
    4096   consumers   max_consumers x 64-byte entries
    ...    index       slot_count x u64: which slot holds item `seq` (at seq % slot_count)
    ...    slot table  slot_count x 128-byte slot descriptors (stamp + metadata)
    ...    payloads    slot_count x slot_stride bytes, page aligned

All integers are little-endian (both supported machines are); every word that two
processes race on is an 8-byte aligned u64 accessed through framebus.atomics.
The words at offsets 0-31 (magic, layout version, producer pid and start time) keep their
place in every layout version, so any version can tell whether a segment's producer lives.
"""
from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from framebus.errors import LayoutMismatch, NotAStream

if TYPE_CHECKING:
    from framebus.atomics import SharedWords

__all__ = ["MAGIC", "LAYOUT_VERSION", "Geometry", "Identity", "read_identity", "read_pid"]

MAGIC = b"EDGEBUS\x00"
LAYOUT_VERSION = 1
PAGE = 4096
CACHE_LINE = 64

# --- identity: written by the producer before the segment is published, then read-only
IDENTITY = struct.Struct("<8sI4xQQ I I Q Q Q Q Q Q Q I I Q Q")
#  0 magic, 8 layout_version, 16 producer_pid, 24 producer_ticks,
#  32 slot_count, 36 kind, 40 payload_capacity, 48 slot_stride, 56 consumers_off,
#  64 slots_off, 72 payloads_off, 80 total_size, 88 generation, 96 max_consumers,
#  100 producer_wake_serial, 104 hold_back_ns (0 = never wait, 2**64-1 = wait forever),
#  112 index_off
OFF_PID = 16
OFF_TICKS = 24
OFF_GENERATION = 88

# --- hot words, one cache line each where two processes write
OFF_WRITE_SEQ = 128  # items committed so far; the next item gets this sequence
OFF_STATE = 192  # STATE_*
OFF_HEARTBEAT_NS = 200  # CLOCK_MONOTONIC of the producer's last send or heartbeat
OFF_RATE_MHZ = 208  # items per second x 1000 over the last second
OFF_CONSUMER_GEN = 216  # bumped on every consumer register/unregister
OFF_PRODUCER_WAITING = 256  # 1 while the producer waits for a reliable consumer
OFF_OVERRUNS = 264  # times the producer's hold-back bound ran out
OFF_HELD_NS = 272  # total ns the producer spent held back
OFF_EXTRA_STAMP = 320  # seqlock over the extradata (odd while being written)
OFF_EXTRA_LEN = 328
OFF_EXTRA_CODEC = 336
OFF_EXTRA_DATA = 512
EXTRADATA_MAX = PAGE - OFF_EXTRA_DATA  # 3584 bytes: SPS/PPS/VPS sets are far smaller
HEADER_SIZE = PAGE

STATE_OPEN, STATE_CLOSED, STATE_SUPERSEDED = 1, 2, 3
STATE_NAMES = {0: "building", STATE_OPEN: "open", STATE_CLOSED: "closed", STATE_SUPERSEDED: "superseded"}
HOLD_FOREVER = 2**64 - 1

# --- consumer entry (64 bytes). pid 0 = free.
CONSUMER_SIZE = 64
C_PID, C_TICKS, C_SERIAL, C_FLAGS, C_HOLD_SEQ, C_MISSED, C_SKIPPED, C_RECEIVED = range(0, 64, 8)
# hold_seq: the lowest sequence the consumer may still read (its position);
# missed: items overwritten before it could read them; skipped: items it jumped over
# on purpose with latest(); received: items it got.
CFLAG_RELIABLE = 1

# hold_seq's top bit: the consumer reads newest-first (latest()), so it needs only the
# item it holds, not the ones after it.
HOLD_NEWEST = 1 << 63

# --- index word (u64) for item seq, at index_off + (seq % slot_count) * 8:
# ((seq + 1) << INDEX_SHIFT) | slot; 0 = never written. One atomic word, never torn.
INDEX_SHIFT = 20
INDEX_SLOT_MASK = (1 << INDEX_SHIFT) - 1

# --- slot descriptor (128 bytes): a stamp word, then the item's metadata
SLOT_DESC_SIZE = 128
# stamp: 0 = never written; 2*seq+1 = item `seq` being written; 2*seq+2 = item `seq` committed
META = struct.Struct("<HHIQIIIIqIIQQQ")
#  +8 kind u16, format/codec u16, flags u32, size u64, width|rate u32, height|channels u32,
#  stride0|samples u32, stride1 u32, pts i64, tb_num u32, tb_den u32, capture_ns u64,
#  publish_ns u64, extradata_version u64
Meta = tuple[int, ...]  # META unpacked: the 14 integers above, in that order
META_OFF = 8
assert META_OFF + META.size <= SLOT_DESC_SIZE


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class Geometry:
    """Offsets and sizes derived from (slot_count, payload_capacity, max_consumers)."""

    __slots__ = ("slot_count", "payload_capacity", "max_consumers", "slot_stride",
                 "consumers_off", "index_off", "slots_off", "payloads_off", "total_size")

    def __init__(self, slot_count: int, payload_capacity: int, max_consumers: int) -> None:
        self.slot_count = slot_count
        self.payload_capacity = payload_capacity
        self.max_consumers = max_consumers
        self.slot_stride = _align(payload_capacity, PAGE)
        self.consumers_off = HEADER_SIZE
        # Page aligned: consumers map everything before it writable, everything after read-only.
        self.index_off = _align(self.consumers_off + max_consumers * CONSUMER_SIZE, PAGE)
        self.slots_off = _align(self.index_off + slot_count * 8, CACHE_LINE)
        self.payloads_off = _align(self.slots_off + slot_count * SLOT_DESC_SIZE, PAGE)
        self.total_size = self.payloads_off + slot_count * self.slot_stride

    @property
    def control_size(self) -> int:
        """Bytes a consumer maps writable: header and consumer table (page aligned)."""
        return _align(self.index_off, PAGE)

    def stamp_off(self, slot: int) -> int:
        return self.slots_off + slot * SLOT_DESC_SIZE

    def index_word_off(self, seq: int) -> int:
        return self.index_off + (seq % self.slot_count) * 8

    def consumer_off(self, index: int) -> int:
        return self.consumers_off + index * CONSUMER_SIZE

    def taken_entries(self, words: SharedWords) -> Iterator[tuple[int, int]]:
        """(offset, pid) of every occupied consumer entry, read through `words`."""
        for i in range(self.max_consumers):
            off = self.consumers_off + i * CONSUMER_SIZE
            pid = words.load_acquire(off + C_PID)
            if pid:
                yield off, pid


class Identity(NamedTuple):
    """The write-once part of the header."""

    magic: bytes
    layout_version: int
    producer_pid: int
    producer_ticks: int
    slot_count: int
    kind: int
    payload_capacity: int
    slot_stride: int
    consumers_off: int
    slots_off: int
    payloads_off: int
    total_size: int
    generation: int
    max_consumers: int
    producer_wake_serial: int
    hold_back_ns: int
    index_off: int

    def geometry(self) -> Geometry:
        return Geometry(self.slot_count, self.payload_capacity, self.max_consumers)


def read_identity(buf: mmap.mmap, name: str, file_size: int) -> Identity:
    """Parse and check a segment's identity; raise NotAStream or LayoutMismatch naming why."""
    if file_size < 32:
        raise NotAStream(f"stream {name!r}: segment is {file_size} bytes, too small for a framebus header")
    magic, version = struct.unpack_from("<8sI", buf, 0)
    if magic != MAGIC:
        raise NotAStream(f"stream {name!r}: not a framebus segment (magic {magic!r}, expected {MAGIC!r})")
    if version != LAYOUT_VERSION:
        raise LayoutMismatch(
            f"stream {name!r} has layout version {version}, this framebus reads version "
            f"{LAYOUT_VERSION}; run producer and consumers from the same edgeroom release"
        )
    if file_size < HEADER_SIZE:
        raise NotAStream(f"stream {name!r}: segment is {file_size} bytes, shorter than its {HEADER_SIZE}-byte header")
    ident = Identity(*IDENTITY.unpack_from(buf, 0))
    geo = ident.geometry()
    derived = (geo.slot_stride, geo.consumers_off, geo.index_off, geo.slots_off, geo.payloads_off, geo.total_size)
    stored = (ident.slot_stride, ident.consumers_off, ident.index_off, ident.slots_off, ident.payloads_off,
              ident.total_size)
    if derived != stored or ident.slot_count < 2:
        raise NotAStream(f"stream {name!r}: header geometry is inconsistent {stored} (corrupt segment)")
    if file_size < ident.total_size:
        raise NotAStream(
            f"stream {name!r}: segment is {file_size} bytes but its header describes {ident.total_size} (truncated)"
        )
    return ident


def read_pid(buf: mmap.mmap, file_size: int) -> tuple[int, int] | None:
    """(producer pid, start ticks) of any layout version, or None if there is no header."""
    if file_size < 32 or bytes(buf[0:8]) != MAGIC:
        return None
    return struct.unpack_from("<QQ", buf, OFF_PID)
