"""The write side of a stream: one producer per ring, loan -> fill -> send.

    with Producer.create("cam1", kind="video", slots=8, payload=1920 * 1080 * 3) as p:
        loan = p.loan_picture(1920, 1080, "rgb24")
        draw(loan.array)               # straight into shared memory, no extra copy
        loan.send(pts=n, time_base=(1, 30))
        p.publish_picture(frame, "rgb24")   # or: one copy of an existing array

A live source never waits for a consumer. A consumer that must see every item attaches
with reliable=True, and the producer then waits for it before overwriting a slot it still
needs, for at most `hold_back` seconds per item (0: never; None: without bound).
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from fractions import Fraction
from types import TracebackType
from typing import TYPE_CHECKING, TypedDict, Unpack

import numpy as np
import numpy.typing as npt

from framebus import layout as L
from framebus import procinfo, segment, wake
from framebus.atomics import SharedWords, Words, fence_release, fence_seq_cst
from framebus.errors import BusError, PayloadTooLarge, StreamBusy
from framebus.formats import (
    CODECS,
    FLAG_KEYFRAME,
    KIND_AUDIO,
    KIND_ENCODED,
    KIND_NAMES,
    KIND_VIDEO,
    KINDS,
    PIXEL_FORMATS,
    SAMPLE_FORMATS,
    picture_geometry,
)
from framebus.names import check_name, default_prefix, ring_path, tmp_path, wake_glob, wake_path
from framebus.registry import gc
from framebus.views import Bytes, ItemArray, SlotViews, picture_planes

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["Loan", "Producer", "SendMeta", "TimeBase"]

log = logging.getLogger("framebus")

TimeBase = Fraction | tuple[int, int]
_NS_BASE: tuple[int, int] = (1, 1_000_000_000)


class StampMeta(TypedDict, total=False):
    """The keywords publish_encoded() passes on to Loan.send()."""

    pts: int | None
    time_base: TimeBase
    capture_ns: int | None
    flags: int


class SendMeta(StampMeta, total=False):
    """The keywords publish_picture() and publish_audio() pass on to Loan.send()."""

    keyframe: bool
_serial = 0  # wake FIFO serials handed out in this process


def next_serial() -> int:
    global _serial
    _serial += 1
    return _serial


def _time_base(tb: TimeBase) -> tuple[int, int]:
    if isinstance(tb, Fraction):
        return tb.numerator, tb.denominator
    num, den = tb
    if num <= 0 or den <= 0:
        raise ValueError(f"time base must be positive, got {num}/{den}")
    return int(num), int(den)


class Loan:
    """A slot lent to the producer: fill `array` (or `planes`), then send() or abort()."""

    __slots__ = ("_producer", "_index", "_kind", "_fmt", "_size", "_w", "_h", "_s0", "_s1", "array", "_done")

    def __init__(self, producer: Producer, index: int, kind: int, fmt: int, size: int,
                 w: int, h: int, s0: int, s1: int, array: ItemArray) -> None:
        self._producer = producer
        self._index = index
        self._kind, self._fmt, self._size = kind, fmt, size
        self._w, self._h, self._s0, self._s1 = w, h, s0, s1
        self.array = array
        self._done = False

    @property
    def slot(self) -> int:
        """Which slot of the ring this loan writes (for diagnostics)."""
        return self._index

    @property
    def planes(self) -> tuple[Bytes, ...]:
        """Writable plane views: (Y, U, V) for yuv420p, (Y, UV) for nv12, (picture,) else."""
        base = self._producer._views.base(self._index)
        return picture_planes(base, self._fmt, self._w, self._h, self._s0, self._s1)

    def send(self, *, pts: int | None = None, time_base: TimeBase = _NS_BASE, capture_ns: int | None = None,
             flags: int = 0, keyframe: bool = False, size: int | None = None) -> int:
        """Publish the slot; returns the item's sequence number.

        pts defaults to the capture time in ns (time base 1/1e9). capture_ns defaults to
        now on CLOCK_MONOTONIC. `size` shortens an encoded or byte loan to what was written.
        """
        if self._done:
            raise BusError("this loan was already sent or aborted")
        self._done = True
        if size is None:
            size = self._size
        elif self._kind != KIND_ENCODED:
            raise ValueError("send(size=...) is for encoded loans; a picture or audio loan has its size")
        if not 0 <= size <= self._size:
            raise PayloadTooLarge(f"send(size={size}) exceeds the {self._size} bytes loaned")
        if keyframe:
            flags |= FLAG_KEYFRAME
        return self._producer._commit(self._index, self._kind, self._fmt, flags, size,
                                      self._w, self._h, self._s0, self._s1, pts, time_base, capture_ns)

    def abort(self) -> None:
        """Give the slot back unsent: the item it held before is gone, nothing new appears."""
        if not self._done:
            self._done = True
            self._producer._loaned = False

    def __enter__(self) -> Loan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.send()


class Producer:
    """Owner of one ring. Create with Producer.create(); not thread-safe (one owner)."""

    # Set by create() (a bare Producer() is closed and holds nothing).
    prefix: str
    stream: str
    kind: int
    geometry: L.Geometry
    generation: int
    overruns: int  # times a reliable consumer's hold-back bound ran out
    _hold_ns: int
    _history: bool
    _wake_serial: int
    _fd: int
    _path: str
    _ino: int
    _mm: mmap.mmap
    _words: SharedWords
    _views: SlotViews
    _waiter: wake.Waiter
    _seq: int
    _loaned: bool
    _extra_version: int
    _cgen: int
    _consumers: dict[tuple[int, int], tuple[int | None, int, int]]  # (pid, serial) -> (notify fd, entry, flags)
    _notify_fds: list[int]
    _holders: list[tuple[int, bool]]  # (entry offset, reliable) per consumer
    _slot_seq: list[int]  # the item each slot holds (-1: none)
    _slot_of: dict[int, int]  # item -> slot, for items still in the index
    _reserved: list[int] | None  # per slot, payload bytes whose pages are reserved (None: all of them)
    _rate_t0: int
    _rate_n: int
    _last_maint: int

    def __init__(self) -> None:  # use Producer.create()
        self._closed = True

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, stream: str, kind: str = "video", *, payload: int, slots: int = 8,
               prefix: str | None = None, max_consumers: int = 16,
               hold_back: float | None = 0.0, history: bool = False, reserve: str = "all") -> Producer:
        """Create the ring `stream` (replacing a stale one) and become its producer.

        payload: the largest item in bytes; slots: ring length (>= 2);
        hold_back: seconds to wait per item for reliable consumers (0 never, None forever);
        history: keep the last `slots` items whoever reads, like a plain ring (the oldest
        goes first), so a reader that attaches with start='oldest' finds them: for encoded
        streams, where a decoder that joins late needs the last keyframe. Without it the
        most recently freed slot is reused while readers keep up (cache-friendly for big
        pictures); a ring nobody reads is a plain ring all the same (there is no reader to
        keep in cache), so the reader that comes first, start='oldest', finds the items
        sent before it could register (a stream's first pictures), up to `slots` of them.
        reserve: 'all' reserves every page of /dev/shm at creation; 'written' reserves
        the control part then and each slot's payload pages as items first reach them, so
        a long ring of roomy slots (a history of compressed video, whose items are far
        smaller than the slot) costs the memory its items take, not slots x payload. Either
        way a full /dev/shm is BusFull (at the loan for 'written'), never a SIGBUS.
        Raises StreamBusy if a live producer owns the stream, BusFull if /dev/shm is full.
        """
        self = cls()
        self.prefix = check_name("prefix", default_prefix() if prefix is None else prefix)
        self.stream = check_name("stream", stream)
        if kind not in KINDS:
            raise ValueError(f"unknown stream kind {kind!r}; known: {', '.join(KINDS)}")
        if not 2 <= slots <= 65536:
            raise ValueError(f"slots must be 2..65536, got {slots}")
        if payload <= 0:
            raise ValueError(f"payload must be positive, got {payload}")
        if reserve not in ("all", "written"):
            raise ValueError(f"reserve must be 'all' or 'written', got {reserve!r}")
        if not 1 <= max_consumers <= 256:
            raise ValueError(f"max_consumers must be 1..256, got {max_consumers}")
        if hold_back is None:
            hold_ns = L.HOLD_FOREVER
        elif hold_back < 0:
            raise ValueError(f"hold_back must be >= 0 or None, got {hold_back}")
        else:
            hold_ns = int(hold_back * 1e9)
        self.kind = KINDS[kind]
        self.geometry = geo = L.Geometry(slots, payload, max_consumers)
        self._hold_ns = hold_ns
        self._history = history
        upfront = geo.total_size if reserve == "all" else geo.payloads_off
        pid = os.getpid()
        ticks = procinfo.start_ticks(pid) or 0
        self._wake_serial = next_serial()
        tmp = tmp_path(self.prefix, self.stream, pid)
        try:
            fd, mm = segment.build(tmp, geo.total_size, upfront)
        except FileExistsError:  # a leftover of a dead process that had our pid
            os.unlink(tmp)
            fd, mm = segment.build(tmp, geo.total_size, upfront)
        try:
            L.IDENTITY.pack_into(
                mm, 0, L.MAGIC, L.LAYOUT_VERSION, pid, ticks, slots, self.kind, payload,
                geo.slot_stride, geo.consumers_off, geo.slots_off, geo.payloads_off,
                geo.total_size, 0, max_consumers, self._wake_serial, hold_ns, geo.index_off)
            words = Words(mm)
            words.store_release(L.OFF_STATE, L.STATE_OPEN)
            self.generation = self._publish(tmp, mm)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        self._fd = fd
        self._path = ring_path(self.prefix, self.stream)
        self._ino = os.fstat(fd).st_ino
        self._mm = mm
        self._words = words
        self._views = SlotViews(mm, geo.payloads_off, geo.slot_stride, slots, payload)
        self._waiter = wake.Waiter(wake_path(self.prefix, self.stream, pid, self._wake_serial))
        self._seq = 0
        self._loaned = False
        self._extra_version = 0
        self._cgen = -1
        self._consumers = {}
        self._notify_fds = []
        self._holders = []
        self._slot_seq = [-1] * slots
        self._slot_of = {}
        # bytes of each slot's payload whose pages are reserved (None: all, at creation)
        self._reserved = None if reserve == "all" else [0] * slots
        self._rate_t0 = time.monotonic_ns()
        self._rate_n = 0
        self._last_maint = self._rate_t0
        self.overruns = 0
        self._closed = False
        words.store(L.OFF_HEARTBEAT_NS, self._rate_t0)
        # Clear what dead processes left of this stream (their FIFOs), then wake the
        # consumers of a previous generation and any waiting for the stream to appear.
        gc(self.prefix, self.stream)
        wake.poke_all(wake_glob(self.prefix, self.stream), skip=self._waiter.path)
        log.info("stream %s.%s created: %d slots x %d bytes, generation %d",
                 self.prefix, self.stream, slots, payload, self.generation)
        return self

    def _publish(self, tmp: str, mm: mmap.mmap) -> int:
        """Make the built ring visible under its name; return its generation.

        A generation is the ring's creation time in µs since the epoch, moved past its
        predecessor's if the clock went back: it differs for every producer a stream has,
        whether the last one crashed (its ring is still there) or exited cleanly (gone).
        """
        path = ring_path(self.prefix, self.stream)
        while True:
            fresh = time.time_ns() // 1_000
            try:
                fd, size = segment.open_existing(path)
            except FileNotFoundError:
                self._set_generation(mm, fresh)
                try:
                    os.link(tmp, path)  # exclusive: fails if another producer won the race
                except FileExistsError:
                    continue
                os.unlink(tmp)
                return fresh
            try:
                with segment.flock(fd):
                    if os.stat(path).st_ino != os.fstat(fd).st_ino:
                        continue  # replaced while we looked; look again
                    generation = max(fresh, self._retire(fd, size) + 1)
                    self._set_generation(mm, generation)
                    os.rename(tmp, path)  # atomic: consumers see the old ring or the new
                    return generation
            except FileNotFoundError:
                continue
            finally:
                os.close(fd)

    def _retire(self, fd: int, size: int) -> int:
        """Mark a predecessor ring superseded if its producer is dead; return its generation."""
        if size < L.HEADER_SIZE:
            return 0
        old = mmap.mmap(fd, L.HEADER_SIZE)
        try:
            owner = L.read_pid(old, size)
            if owner is None:
                return 0  # not a framebus header: garbage under our name, replace it
            if procinfo.is_alive(*owner):
                version = struct.unpack_from("<I", old, 8)[0]
                raise StreamBusy(
                    f"stream {self.stream!r} under prefix {self.prefix!r} already has a live "
                    f"producer, pid {owner[0]} (layout version {version})"
                )
            if struct.unpack_from("<I", old, 8)[0] != L.LAYOUT_VERSION:
                return 0
            w = Words(old)
            try:
                generation = w.load(L.OFF_GENERATION)
                w.store_release(L.OFF_STATE, L.STATE_SUPERSEDED)
            finally:
                w.release()
            return generation
        finally:
            old.close()

    @staticmethod
    def _set_generation(mm: mmap.mmap, generation: int) -> None:
        struct.pack_into("<Q", mm, L.OFF_GENERATION, generation)

    # ---------------------------------------------------------------- loans
    def _begin(self, size: int) -> int:
        if self._closed:
            raise BusError(f"stream {self.stream!r}: producer is closed")
        if self._loaned:
            raise BusError(f"stream {self.stream!r}: one loan at a time; send or abort the previous one")
        seq = self._seq
        slot = self._choose_slot(seq)
        reserved = self._reserved
        if reserved is not None and size > reserved[slot]:
            # first time this slot holds this much: its pages, before any is written (BusFull, no SIGBUS)
            geo = self.geometry
            want = min(-(-size // L.PAGE) * L.PAGE, geo.slot_stride)
            segment.reserve_range(self._fd, geo.payloads_off + slot * geo.slot_stride + reserved[slot],
                                  want - reserved[slot], f"{self.prefix}.{self.stream}")
            reserved[slot] = want
        old = self._slot_seq[slot]
        if old >= 0:
            self._slot_of.pop(old, None)
        self._slot_seq[slot] = -1
        # Seqlock, writer side: mark the slot busy, then fence so the mark is visible
        # before any byte of the new payload (docs/framebus.md, "Memory ordering").
        self._words.store(self.geometry.stamp_off(slot), 2 * seq + 1)
        fence_release()
        self._loaned = True
        return slot

    def _choose_slot(self, seq: int) -> int:
        """The slot for item `seq`: the most recently written one nobody needs any more.

        Reusing the slot that was freed last keeps the ring's working set in the CPU
        caches when consumers keep up (at 1080p, 2 slots of 6 MB instead of all of them).
        A slot is free when its item is older than every in-order consumer's position,
        not the item a latest() consumer holds, and older than every reliable consumer's
        position. While a latest() consumer is attached the newest item is kept too, so
        latest() never starves behind a fast producer. While no consumer is attached (and
        in a history ring) only items out of the index window are free: a plain ring, so a
        reader that joins with start='oldest' finds the last `slot_count` items.
        When consumers lag, the oldest item goes, as in a plain ring; when that item is
        still wanted by a reliable consumer, the producer waits for it within hold_back.
        """
        n = self.geometry.slot_count
        words = self._words
        if words.load(L.OFF_CONSUMER_GEN) != self._cgen:
            self._rescan()  # a consumer joined or left since the last send: count it now
        waiting = False
        deadline = None
        t0 = 0
        while True:
            if waiting:
                # Announce that we (are about to) sleep, then look again: a consumer that
                # moved before it saw the flag is seen by this look (full fences both sides).
                words.store(L.OFF_PRODUCER_WAITING, 1)
                fence_seq_cst()
            live = reliable = seq
            newest: list[int] = []
            for off, is_reliable in self._holders:
                hold = words.load_acquire(off + L.C_HOLD_SEQ)
                if hold & L.HOLD_NEWEST:
                    newest.append(hold & ~L.HOLD_NEWEST)
                elif is_reliable:
                    reliable = min(reliable, hold)
                else:
                    live = min(live, hold)
            if self._history or not self._holders:
                # A plain ring: nothing in the window is free. With history whatever readers
                # did; with no reader at all because the first one to come (a reader that was
                # waiting for the stream to appear, woken at its creation) has not registered
                # yet and must find what was sent meanwhile, not only the newest item.
                live = min(live, seq - n + 1)
            if newest:
                # Keep the newest item: a latest() reader must be able to get it while the
                # next is written, or a fast producer starves it.
                live, reliable = min(live, seq - 1), min(reliable, seq - 1)
            # Items that fell out of the index window are free for live consumers anyway.
            limit = min(max(live, seq - n + 1), reliable)
            slot = self._free_slot(seq, limit, newest)
            if slot >= 0:
                break
            if reliable > seq - n:
                # Not a reliable consumer's need: a latest() reader holds the only
                # candidate. Live semantics: the oldest item goes.
                slot = self._oldest_slot()
                break
            # A reliable consumer still needs the oldest item: wait, within the bound.
            now = time.monotonic_ns()
            if not waiting:
                waiting = True
                t0 = now
                deadline = None if self._hold_ns == L.HOLD_FOREVER else now + self._hold_ns
                continue
            if deadline is not None and now >= deadline or not self._reliable_alive():
                if deadline is not None and now >= deadline:
                    self.overruns += 1
                    words.store(L.OFF_OVERRUNS, self.overruns)
                slot = self._oldest_slot()
                break
            if words.load(L.OFF_CONSUMER_GEN) != self._cgen:
                self._rescan()  # a consumer left (or joined): look again at once
                continue
            slice_s = 0.005 if deadline is None else max(0.0, min(0.005, (deadline - now) / 1e9))
            self._waiter.wait(slice_s)
            self._waiter.drain()
        if waiting:
            words.store(L.OFF_PRODUCER_WAITING, 0)
            words.store(L.OFF_HELD_NS, words.load(L.OFF_HELD_NS) + time.monotonic_ns() - t0)
        return slot

    def _free_slot(self, seq: int, limit: int, newest: list[int]) -> int:
        """The slot of the newest item below `limit` that no latest() reader holds, or -1."""
        slot_of = self._slot_of
        item = min(limit, seq) - 1
        stop = max(seq - self.geometry.slot_count, -1)
        while item > stop:  # usually one or two steps
            slot = slot_of.get(item)
            if slot is not None and item not in newest:
                return slot
            item -= 1
        best, best_item = -1, -2  # none in the index window: an empty or aborted slot, or older
        for slot, item in enumerate(self._slot_seq):
            if best_item < item < limit and item not in newest:
                best, best_item = slot, item
        return best

    def _oldest_slot(self) -> int:
        """The slot holding the oldest item (or none): what a plain ring would overwrite."""
        return min(range(len(self._slot_seq)), key=self._slot_seq.__getitem__)

    def _reliable_alive(self) -> bool:
        """Is any reliable consumer still running? (A dead one must not hold us back.)"""
        words = self._words
        return any(
            is_reliable and procinfo.is_alive(words.load(off + L.C_PID), words.load(off + L.C_TICKS))
            for off, is_reliable in self._holders
        )

    def _check_kind(self, kind: int) -> None:
        if kind != self.kind:
            raise BusError(
                f"stream {self.stream!r} carries {KIND_NAMES[self.kind]} items, not {KIND_NAMES[kind]}"
            )

    def _check_size(self, size: int, what: str) -> None:
        if size > self.geometry.payload_capacity:
            raise PayloadTooLarge(
                f"stream {self.stream!r}: {what} needs {size} bytes, slots hold {self.geometry.payload_capacity}"
            )

    def loan_picture(self, width: int, height: int, fmt: str = "rgb24", stride: int | None = None) -> Loan:
        """Lend the next slot as a writable picture view (see Item.array for its shape)."""
        self._check_kind(KIND_VIDEO)
        geo = picture_geometry(fmt, width, height, stride)
        self._check_size(geo.size, f"a {width}x{height} {fmt} picture")
        f = PIXEL_FORMATS[fmt]
        index = self._begin(geo.size)
        view = self._views.get(index, KIND_VIDEO, f, geo.size, width, height, geo.stride0, geo.stride1)
        return Loan(self, index, KIND_VIDEO, f, geo.size, width, height, geo.stride0, geo.stride1, view)

    def loan_encoded(self, codec: str, size: int | None = None, width: int = 0, height: int = 0) -> Loan:
        """Lend the next slot for an access unit of at most `size` bytes (default: the slot).

        `width` and `height` are the stream's picture size when the producer knows it (0: not
        said); a consumer that does not decode (a recorder) learns the size from them.
        Write into loan.array, then send(size=bytes_written, keyframe=...).
        """
        self._check_kind(KIND_ENCODED)
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
        size = self.geometry.payload_capacity if size is None else size
        self._check_size(size, "the access unit")
        index = self._begin(size)
        return Loan(self, index, KIND_ENCODED, CODECS[codec], size, max(0, width), max(0, height), 0, 0,
                    self._views.base(index)[:size])

    def loan_audio(self, samples: int, channels: int, rate: int) -> Loan:
        """Lend the next slot as a writable (samples, channels) int16 array."""
        self._check_kind(KIND_AUDIO)
        if samples <= 0 or channels <= 0 or rate <= 0:
            raise ValueError(f"audio needs positive samples, channels and rate, got {samples}, {channels}, {rate}")
        size = samples * channels * 2
        self._check_size(size, f"{samples} samples x {channels} channels of s16")
        index = self._begin(size)
        s16 = SAMPLE_FORMATS["s16"]
        view = self._views.get(index, KIND_AUDIO, s16, size, rate, channels, samples, 0)
        return Loan(self, index, KIND_AUDIO, s16, size, rate, channels, samples, 0, view)

    # ---------------------------------------------------------------- one-copy publish
    def publish_picture(self, picture: npt.NDArray[np.uint8], fmt: str = "rgb24", **meta: Unpack[SendMeta]) -> int:
        """Copy an existing picture into the next slot and send it.

        Packed formats take an (h, w, 3) or (h, w) array; yuv420p/nv12 take the tight
        (h*3/2, w) buffer. Returns the sequence number.
        """
        if picture.dtype != np.uint8:
            raise ValueError(f"a picture must be uint8, got {picture.dtype}")
        if fmt in ("yuv420p", "nv12"):
            h, w = picture.shape[0] * 2 // 3, picture.shape[1]
        else:
            h, w = picture.shape[:2]
        # Check the shape before taking a slot: a failed publish must not destroy an item.
        want = picture_geometry(fmt, w, h)
        if picture.size != want.size or (fmt in ("rgb24", "bgr24") and picture.shape[2:] != (3,)):
            raise ValueError(f"a {w}x{h} {fmt} picture has {want.size} bytes, got an array of shape {picture.shape}")
        loan = self.loan_picture(w, h, fmt)
        try:
            np.copyto(loan.array, picture.reshape(loan.array.shape), casting="no")
        except BaseException:
            loan.abort()
            raise
        return loan.send(**meta)

    def publish_encoded(self, data: ReadableBuffer, codec: str, *, keyframe: bool = False, width: int = 0,
                        height: int = 0, **meta: Unpack[StampMeta]) -> int:
        """Copy one access unit (bytes-like) into the next slot and send it (`width`, `height`:
        the stream's picture size, when known)."""
        view = memoryview(data).cast("B")
        loan = self.loan_encoded(codec, view.nbytes, width, height)
        loan.array[:] = view
        return loan.send(keyframe=keyframe, **meta)

    def publish_audio(self, pcm: npt.NDArray[np.int16], rate: int, **meta: Unpack[SendMeta]) -> int:
        """Copy a (samples, channels) int16 chunk into the next slot and send it."""
        if pcm.dtype != np.int16 or pcm.ndim != 2:
            raise ValueError(f"audio must be a (samples, channels) int16 array, got {pcm.dtype} {pcm.shape}")
        loan = self.loan_audio(pcm.shape[0], pcm.shape[1], rate)
        loan.array[...] = pcm
        return loan.send(**meta)

    def set_extradata(self, data: bytes, codec: str) -> None:
        """Store the codec's parameter sets / extradata for consumers that join late.

        Items sent afterwards carry the new extradata_version.
        """
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
        data = bytes(data)
        if len(data) > L.EXTRADATA_MAX:
            raise PayloadTooLarge(f"extradata of {len(data)} bytes exceeds {L.EXTRADATA_MAX}")
        w = self._words
        stamp = w.load(L.OFF_EXTRA_STAMP)
        w.store(L.OFF_EXTRA_STAMP, stamp + 1)
        fence_release()
        self._mm[L.OFF_EXTRA_DATA : L.OFF_EXTRA_DATA + len(data)] = data
        w.store(L.OFF_EXTRA_LEN, len(data))
        w.store(L.OFF_EXTRA_CODEC, CODECS[codec])
        w.store_release(L.OFF_EXTRA_STAMP, stamp + 2)
        self._extra_version = (stamp + 2) // 2

    # ---------------------------------------------------------------- commit
    def _commit(self, index: int, kind: int, fmt: int, flags: int, size: int, w: int, h: int,
                s0: int, s1: int, pts: int | None, time_base: TimeBase, capture_ns: int | None) -> int:
        now = time.monotonic_ns()
        if capture_ns is None:
            capture_ns = now
        if pts is None:
            pts, tb = capture_ns, _NS_BASE
        else:
            tb = time_base if time_base is _NS_BASE else _time_base(time_base)
        seq = self._seq
        words = self._words
        geo = self.geometry
        stamp_off = geo.stamp_off(index)
        L.META.pack_into(self._mm, stamp_off + L.META_OFF, kind, fmt, flags, size, w, h, s0, s1,
                         pts, tb[0], tb[1], capture_ns, now, self._extra_version)
        # Release: payload and metadata are visible before the committed stamp, the stamp
        # before the index entry that leads readers to it, and that before write_seq.
        words.store_release(stamp_off, 2 * seq + 2)
        words.store_release(geo.index_word_off(seq), ((seq + 1) << L.INDEX_SHIFT) | index)
        words.store_release(L.OFF_WRITE_SEQ, seq + 1)
        if words.load(L.OFF_CONSUMER_GEN) != self._cgen:
            self._rescan()
        for fd in self._notify_fds:  # wake first, book-keeping after
            if not wake.notify(fd):
                self._last_maint = 0  # a reader vanished: reap it now
        self._slot_seq[index] = seq
        self._slot_of[seq] = index
        self._slot_of.pop(seq - geo.slot_count, None)  # left the index window
        self._seq = seq + 1
        self._loaned = False
        words.store(L.OFF_HEARTBEAT_NS, now)
        self._rate_n += 1
        if now - self._last_maint >= 1_000_000_000:
            self._maintain(now)
        return seq

    # ---------------------------------------------------------------- consumers
    def _rescan(self) -> None:
        """Re-read the consumer table after a consumer joined or left."""
        words, geo = self._words, self.geometry
        self._cgen = words.load_acquire(L.OFF_CONSUMER_GEN)
        old = self._consumers
        new: dict[tuple[int, int], tuple[int | None, int, int]] = {}
        for off, pid in geo.taken_entries(words):
            serial = words.load(off + L.C_SERIAL)
            key = (pid, serial)
            if key in old:
                fd = old.pop(key)[0]
            else:
                fd = wake.open_notifier(wake_path(self.prefix, self.stream, pid, serial))
            new[key] = (fd, off, words.load(off + L.C_FLAGS))
        for fd, _, _ in old.values():
            if fd is not None:
                os.close(fd)
        self._consumers = new
        self._notify_fds = [fd for fd, _, _ in new.values() if fd is not None]
        self._holders = [(off, bool(flags & L.CFLAG_RELIABLE)) for _, off, flags in new.values()]

    def _maintain(self, now: int) -> None:
        """Once a second: publish the rate, and free the entries of dead consumers."""
        words = self._words
        elapsed = now - self._rate_t0
        if elapsed >= 1_000_000_000:
            words.store(L.OFF_RATE_MHZ, self._rate_n * 1_000_000_000_000 // elapsed)
            self._rate_t0, self._rate_n = now, 0
        self._last_maint = now
        geo = self.geometry
        dead = [off for off, pid in geo.taken_entries(words)
                if not procinfo.is_alive(pid, words.load(off + L.C_TICKS))]
        if dead:
            with segment.flock(self._fd):
                for off in dead:
                    reap_consumer(words, off, self.prefix, self.stream)
            self._rescan()

    # ---------------------------------------------------------------- life cycle
    @property
    def seq(self) -> int:
        """The sequence number the next item will get (= items sent so far)."""
        return self._seq

    @property
    def readers(self) -> int:
        """Consumers registered on the ring now (live or not yet reaped)."""
        if self._closed:
            return 0
        if self._words.load(L.OFF_CONSUMER_GEN) != self._cgen:
            self._rescan()
        return len(self._consumers)

    def heartbeat(self) -> None:
        """Tell readers the producer lives although it has nothing to send; reap dead readers."""
        now = time.monotonic_ns()
        self._words.store(L.OFF_HEARTBEAT_NS, now)
        if self._words.load(L.OFF_CONSUMER_GEN) != self._cgen:
            self._rescan()
        if now - self._last_maint >= 1_000_000_000:
            self._maintain(now)

    def close(self) -> None:
        """Remove the ring's name, tell consumers, and let go of everything."""
        if self._closed:
            return
        self._closed = True
        # Unlink while still alive, so no successor can have replaced the name meanwhile.
        segment.remove_if_same(self._path, self._ino)
        self._words.store_release(L.OFF_STATE, L.STATE_CLOSED)
        for fd in self._notify_fds:
            wake.notify(fd)
        for entry_fd, _, _ in self._consumers.values():
            if entry_fd is not None:
                os.close(entry_fd)
        self._consumers.clear()
        self._notify_fds = []
        self._waiter.close()
        os.close(self._fd)
        self._words.release()
        log.info("stream %s.%s closed after %d items", self.prefix, self.stream, self._seq)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass


def reap_consumer(words: SharedWords, off: int, prefix: str, stream: str) -> None:
    """Free a dead consumer's entry and remove its wake FIFO (call under the segment flock)."""
    pid = words.load(off + L.C_PID)
    if not pid or procinfo.is_alive(pid, words.load(off + L.C_TICKS)):
        return
    serial = words.load(off + L.C_SERIAL)
    words.store_release(off + L.C_PID, 0)
    words.add(L.OFF_CONSUMER_GEN, 1)
    try:
        os.unlink(wake_path(prefix, stream, pid, serial))
    except FileNotFoundError:
        pass

