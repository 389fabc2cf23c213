"""The read side of a stream: any number of consumers per ring, each in its own process.

    with Consumer.attach("cam1") as c:
        while (item := c.receive(timeout=1.0)) is not None:
            result = detect(item.array)      # zero-copy view of the slot
            if item.valid():                 # not overwritten while we read it
                publish(result)

A consumer never slows a live producer: if it falls more than a ring behind it skips
ahead and counts `missed`. It survives its producer: when a new producer takes the stream
over (after a crash or a restart) the consumer re-attaches on its own, counts a resync,
and goes on with the new generation. Its wake-up fd (fileno()) stays the same throughout,
so it can sit in a selector, an asyncio loop or a ZeroMQ poller for its whole life.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import mmap
import os
import time
import weakref
from collections.abc import Callable

from framebus import layout as L
from framebus import procinfo, segment, wake
from framebus.atomics import Words, fence_acquire, fence_seq_cst
from framebus.errors import BusError, LayoutMismatch, NotAStream, StreamNotFound
from framebus.formats import CODEC_NAMES
from framebus.item import Item
from framebus.layout import Meta
from framebus.names import SHM_DIR, check_name, default_prefix, ring_path, wake_path
from framebus.producer import next_serial, reap_consumer
from framebus.views import SlotViews

__all__ = ["Consumer"]

log = logging.getLogger("framebus")

_DETACHED_RETRY_S = 1.0  # a detached consumer also looks for its stream this often
_SHIFT, _SLOT_MASK, _DESC, _META_OFF = L.INDEX_SHIFT, L.INDEX_SLOT_MASK, L.SLOT_DESC_SIZE, L.META_OFF


class _Ring:
    """One attached generation of a stream, as this consumer maps it."""

    __slots__ = ("map", "ident", "geo", "ro", "ctl", "views", "entry", "producer_fd", "generation", "n",
                 "capacity", "index_off", "slots_off", "meta")
    meta: Callable[[int], Meta]  # the metadata of the slot descriptor at a byte offset

    def __init__(self, mapping: segment.Mapping, ident: L.Identity) -> None:
        self.map = mapping
        self.ident = ident
        self.geo = ident.geometry()
        self.n = ident.slot_count
        self.capacity = ident.payload_capacity
        self.generation = ident.generation
        self.ro = Words(mapping.ro)  # loads anywhere
        self.ctl = Words(mapping.rw)  # stores to our table entry and the header
        self.views = SlotViews(mapping.ro, self.geo.payloads_off, self.geo.slot_stride, self.n, self.capacity)
        self.entry = -1
        self.producer_fd: int | None = None
        self.index_off = self.geo.index_off
        self.slots_off = self.geo.slots_off
        self.meta = functools.partial(L.META.unpack_from, mapping.ro)  # hot: bound once, no Python frame


def _cleanup(waiter: wake.Waiter) -> None:
    waiter.close()


class Consumer:
    """A reader of one stream. Create with Consumer.attach(); one owner thread."""

    def __init__(self, stream: str, prefix: str | None, reliable: bool) -> None:
        self.prefix = check_name("prefix", default_prefix() if prefix is None else prefix)
        self.stream = check_name("stream", stream)
        self.reliable = reliable
        self.missed = 0  # items overwritten before this consumer could read them
        self.skipped = 0  # items jumped over on purpose by latest()
        self.received = 0
        self.resyncs = 0  # times the consumer moved to a new producer generation
        self.corrupt = 0  # slot descriptors that failed validation
        self._corrupt_logged = 0.0
        self._ring: _Ring | None = None
        self._next = 0
        self._expect_payload = 0
        self._seen: tuple[int, int] | None = None  # (inode, generation) of the last ring attached
        self._last_error = ""
        self._serial = next_serial()
        self._waiter = wake.Waiter(wake_path(self.prefix, self.stream, os.getpid(), self._serial))
        # Remove the FIFO at interpreter exit even if close() is never called.
        self._finalizer = weakref.finalize(self, _cleanup, self._waiter)

    # ---------------------------------------------------------------- attach
    @classmethod
    def attach(cls, stream: str, *, prefix: str | None = None, reliable: bool = False,
               missing_ok: bool = False, start: str = "next",
               expect_payload: int = 0) -> Consumer:
        """Attach to `stream`.

        reliable: the producer holds back (within its hold_back bound) until this consumer
        is done with an item, so it sees every item. missing_ok: start detached if the
        stream does not exist yet, and attach when its producer appears. start: 'next'
        (items sent from now on) or 'oldest' (everything still in the ring).
        expect_payload: the item size in bytes this consumer needs the slots to hold.
        Raises StreamNotFound, NotAStream, LayoutMismatch with the cause in the message.
        """
        if start not in ("next", "oldest"):
            raise ValueError(f"start must be 'next' or 'oldest', got {start!r}")
        self = cls(stream, prefix, reliable)
        self._expect_payload = expect_payload
        try:
            ring = self._attach(start)
            if ring is not None:
                self._seen = (ring.map.ino, ring.generation)
            elif not missing_ok:
                raise StreamNotFound(self._not_found_message())
        except BaseException:
            self.close()
            raise
        return self

    def _not_found_message(self) -> str:
        others = sorted(
            f[len(self.prefix) + 1 :]
            for f in os.listdir(SHM_DIR)
            if f.startswith(self.prefix + ".") and f.count(".") == 1
        )
        where = ring_path(self.prefix, self.stream)
        present = ", ".join(others) if others else "none"
        return (f"no stream {self.stream!r} under prefix {self.prefix!r} (looked for {where}); "
                f"streams present: {present}")

    def _attach(self, start: str) -> _Ring | None:
        """Map the ring now under the stream's name and register; None if there is none."""
        path = ring_path(self.prefix, self.stream)
        try:
            fd, size = segment.open_existing(path)
        except FileNotFoundError:
            return None
        try:
            probe = mmap.mmap(fd, min(size, L.HEADER_SIZE), mmap.MAP_SHARED, mmap.PROT_READ)
            try:
                ident = L.read_identity(probe, self.stream, size)
            finally:
                probe.close()
            if ident.payload_capacity < self._expect_payload:
                raise LayoutMismatch(
                    f"stream {self.stream!r} has slots of {ident.payload_capacity} bytes, "
                    f"this consumer needs {self._expect_payload}"
                )
            ring = _Ring(segment.Mapping(fd, path, ident.total_size, ident.geometry().control_size), ident)
        except BaseException:
            os.close(fd)
            raise
        if ring.ro.load_acquire(L.OFF_STATE) != L.STATE_OPEN:
            ring.map.close()
            return None  # its producer is closing; the next one will wake us
        write_seq = ring.ro.load_acquire(L.OFF_WRITE_SEQ)
        self._next = write_seq if start == "next" else max(0, write_seq - ring.n)
        self._register(ring)
        if self._next < write_seq:
            os.write(self._waiter.fd, b"\x01")  # items are waiting: make fileno() say so
        ring.producer_fd = wake.open_notifier(
            wake_path(self.prefix, self.stream, ident.producer_pid, ident.producer_wake_serial))
        self._ring = ring
        return ring

    def _register(self, ring: _Ring) -> None:
        geo = ring.geo
        ticks = procinfo.start_ticks(os.getpid()) or 0
        with segment.flock(ring.map.fd):
            off = self._free_entry(ring)
            if off < 0:
                full = True
            else:
                full = False
                self._fill_entry(ring, off, ticks)
        if full:
            ring.map.close()
            raise BusError(f"stream {self.stream!r} already has its maximum of {geo.max_consumers} consumers")
        ring.entry = off

    def _fill_entry(self, ring: _Ring, off: int, ticks: int) -> None:
        ctl = ring.ctl
        for field, value in ((L.C_TICKS, ticks), (L.C_SERIAL, self._serial),
                             (L.C_FLAGS, L.CFLAG_RELIABLE if self.reliable else 0),
                             (L.C_HOLD_SEQ, self._next), (L.C_MISSED, self.missed),
                             (L.C_SKIPPED, self.skipped), (L.C_RECEIVED, self.received)):
            ctl.store(off + field, value)
        ctl.store_release(off + L.C_PID, os.getpid())  # last: the entry is complete
        ctl.add(L.OFF_CONSUMER_GEN, 1)

    def _free_entry(self, ring: _Ring) -> int:
        """Offset of a free consumer entry (a dead consumer's is freed), or -1."""
        ctl, geo = ring.ctl, ring.geo
        for i in range(geo.max_consumers):
            off = geo.consumer_off(i)
            if ctl.load(off + L.C_PID):
                reap_consumer(ctl, off, self.prefix, self.stream)
            if not ctl.load(off + L.C_PID):
                return off
        return -1

    def _detach(self) -> None:
        ring, self._ring = self._ring, None
        if ring is None:
            return
        if ring.producer_fd is not None:
            os.close(ring.producer_fd)
        if ring.map.fd >= 0:
            with segment.flock(ring.map.fd):
                entry = ring.entry
                if (ring.ctl.load(entry + L.C_PID), ring.ctl.load(entry + L.C_SERIAL)) == (os.getpid(), self._serial):
                    ring.ctl.store_release(ring.entry + L.C_PID, 0)
                    ring.ctl.add(L.OFF_CONSUMER_GEN, 1)
            ring.map.close()
        # The mappings stay until the last Item viewing them is gone (refcounting).

    def _resync(self) -> _Ring | None:
        """The producer closed or was superseded: follow the stream to its new ring (None: none yet)."""
        self._detach()
        try:
            ring = self._attach("oldest")
        except (NotAStream, LayoutMismatch) as exc:
            if str(exc) != self._last_error:  # say it once, not on every poll
                self._last_error = str(exc)
                log.warning("stream %s: cannot re-attach: %s", self.stream, exc)
            return None
        self._last_error = ""
        if ring is None:
            return None
        if self._next:
            # We were following the stream: items of this ring that are already gone
            # passed us by, and say so.
            self._count_missed(ring, self._next)
        if self._seen is not None and self._seen != (ring.map.ino, ring.generation):
            self.resyncs += 1
            log.info("stream %s: producer generation %d -> %d, resynchronised",
                     self.stream, self._seen[1], ring.generation)
        self._seen = (ring.map.ino, ring.generation)
        return ring

    # ---------------------------------------------------------------- reading
    def _read(self, ring: _Ring, seq: int) -> Item | None:
        """The item `seq` if its slot still holds it, else None (seqlock, reader side)."""
        ro = ring.ro
        word = ro.load_acquire(ring.index_off + (seq % ring.n) * 8)
        if word >> _SHIFT != seq + 1:
            return None  # the index entry moved on: the item is gone
        slot = word & _SLOT_MASK
        stamp = 2 * seq + 2
        off = ring.slots_off + slot * _DESC
        if slot >= ring.n or ro.load_acquire(off) != stamp:
            return None  # its slot was reused (or is being reused)
        m = ring.meta(off + _META_OFF)
        fence_acquire()
        if ro.load(off) != stamp:
            return None  # the metadata we read may be torn: never build a view from it
        try:
            if m[3] > ring.capacity:
                raise ValueError(f"size {m[3]} exceeds the slot's {ring.capacity} bytes")
            array = ring.views.get(slot, m[0], m[1], m[3], m[4], m[5], m[6], m[7])
        except (ValueError, KeyError) as exc:
            self.corrupt += 1
            now = time.monotonic()
            if now - self._corrupt_logged >= 1.0:  # at most one line a second
                self._corrupt_logged = now
                log.warning("stream %s: item %d has a bad descriptor, dropped (%d so far): %s",
                            self.stream, seq, self.corrupt, exc)
            return None
        return Item(ring, slot, stamp, seq, m, array)

    def _take(self, ring: _Ring, newest: bool) -> Item | None:
        """The next item in order (or the newest one), skipping what was overwritten.

        This is the hot path: a handful of loads and stores, no syscall.
        """
        ro, ctl, entry = ring.ro, ring.ctl, ring.entry
        seq = self._next
        if newest:
            write_seq = ro.load_acquire(L.OFF_WRITE_SEQ)
            if write_seq - 1 > seq:
                self.skipped += write_seq - 1 - seq
                ctl.store(entry + L.C_SKIPPED, self.skipped)
                seq = write_seq - 1
            # We need only the item we are about to read, not the ones after it.
            self._hold(ring, L.HOLD_NEWEST | seq)
        else:
            # Our position: everything before `seq` is done with (for a reliable consumer
            # a promise the producer waits on; for all, what `bus ls` shows as lag).
            self._hold(ring, seq)
            write_seq = ro.load_acquire(L.OFF_WRITE_SEQ)
            if write_seq - seq > ring.n:
                self._count_missed(ring, write_seq - ring.n - seq)
                seq = write_seq - ring.n
        if seq >= write_seq:
            return None
        while (item := self._read(ring, seq)) is None:
            # Overwritten (or bad) while we looked: move to what is still there.
            write_seq = ro.load_acquire(L.OFF_WRITE_SEQ)
            ahead = max(seq + 1, write_seq - 1 if newest else write_seq - ring.n + 1)
            self._count_missed(ring, ahead - seq)
            seq = ahead
            if seq >= write_seq:
                self._next = seq
                return None
            if newest:
                self._hold(ring, L.HOLD_NEWEST | seq)
        self._next = seq + 1
        self.received += 1
        ctl.store(entry + L.C_RECEIVED, self.received)
        return item

    def _hold(self, ring: _Ring, hold: int) -> None:
        """Publish what we still need; a reliable consumer wakes a producer waiting on it."""
        ring.ctl.store_release(ring.entry + L.C_HOLD_SEQ, hold)
        if self.reliable:
            fence_seq_cst()  # pairs with the producer's: set its flag, then re-read ours
            if ring.ro.load(L.OFF_PRODUCER_WAITING) and ring.producer_fd is not None:
                wake.notify(ring.producer_fd)

    def _count_missed(self, ring: _Ring, n: int) -> None:
        self.missed += n
        ring.ctl.store(ring.entry + L.C_MISSED, self.missed)

    def _look(self, newest: bool) -> Item | None:
        ring = self._ring
        if ring is None:
            ring = self._resync()
            if ring is None:
                return None
        item = self._take(ring, newest)
        if item is None and ring.ro.load_acquire(L.OFF_STATE) != L.STATE_OPEN:
            ring = self._resync()
            if ring is not None:
                item = self._take(ring, newest)
        return item

    def poll(self) -> Item | None:
        """The next item if one is ready, else None; never blocks."""
        item = self._look(False)
        if item is None:
            # Drain the wake-ups, then look once more: anything sent after the drain
            # writes a new byte, so a waiter on fileno() cannot miss it.
            self._waiter.drain()
            item = self._look(False)
        return item

    def latest(self) -> Item | None:
        """The newest item not yet seen (older ones count as skipped), or None; never blocks."""
        item = self._look(True)
        if item is None:
            self._waiter.drain()
            item = self._look(True)
        return item

    def receive(self, timeout: float | None = None, *, newest: bool = False) -> Item | None:
        """Wait up to `timeout` seconds (None: forever) for the next (or newest) item."""
        look = self.latest if newest else self.poll
        item = look()
        if item is not None or timeout == 0:
            return item
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            ring = self._ring
            if ring is None:
                wait = _DETACHED_RETRY_S if wait is None else min(wait, _DETACHED_RETRY_S)
            self._waiter.wait(wait)
            if ring is not None and ring is self._ring:
                item = self._take(ring, newest)  # the usual wake-up: straight to the ring
                if item is not None:
                    return item
            item = look()
            if item is not None:
                return item

    async def receive_async(self, timeout: float | None = None, *, newest: bool = False) -> Item | None:
        """receive() for asyncio: waits on fileno() in the running loop, never blocks it."""
        look = self.latest if newest else self.poll
        item = look()
        if item is not None or timeout == 0:
            return item
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        loop.add_reader(self._waiter.fd, woken.set)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    woken.clear()
                    item = look()  # drains the fd when it finds nothing
                    if item is not None:
                        return item
                    if self._ring is None:
                        try:
                            async with asyncio.timeout(_DETACHED_RETRY_S):
                                await woken.wait()
                        except TimeoutError:
                            pass
                    else:
                        await woken.wait()
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(self._waiter.fd)

    def fileno(self) -> int:
        """An fd that becomes readable when the stream has news; stable for life.

        After it polls readable, call poll() / latest() until they return None (that
        drains it), as with any level-triggered fd.
        """
        return self._waiter.fd

    def release(self) -> None:
        """Done with the last item: a reliable consumer lets the producer reuse its slot."""
        ring = self._ring
        if ring is not None:
            self._hold(ring, self._next)

    def extradata(self) -> tuple[str, bytes] | None:
        """The stream's codec parameter sets (codec, bytes), or None if none were set."""
        ring = self._ring
        if ring is None:
            return None
        while True:
            s1 = ring.ro.load_acquire(L.OFF_EXTRA_STAMP)
            if s1 == 0:
                return None
            if s1 & 1:
                time.sleep(0)
                continue
            n = ring.ro.load(L.OFF_EXTRA_LEN)
            codec = ring.ro.load(L.OFF_EXTRA_CODEC)
            data = bytes(ring.map.ro[L.OFF_EXTRA_DATA : L.OFF_EXTRA_DATA + min(n, L.EXTRADATA_MAX)])
            fence_acquire()
            if ring.ro.load(L.OFF_EXTRA_STAMP) == s1:
                return CODEC_NAMES.get(codec, "?"), data

    # ---------------------------------------------------------------- state
    @property
    def attached(self) -> bool:
        return self._ring is not None

    @property
    def generation(self) -> int | None:
        return None if self._ring is None else self._ring.generation

    @property
    def lag(self) -> int:
        """Items sent that this consumer has not read yet."""
        if self._ring is None:
            return 0
        return max(0, self._ring.ro.load_acquire(L.OFF_WRITE_SEQ) - self._next)

    def producer_alive(self) -> bool:
        """True if the producer of the attached ring is running."""
        ring = self._ring
        return ring is not None and procinfo.is_alive(ring.ident.producer_pid, ring.ident.producer_ticks)

    def close(self) -> None:
        """Unregister and let go; removes nothing of the stream's."""
        self._detach()
        self._finalizer()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
