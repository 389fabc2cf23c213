"""What is on the bus, and cleaning up what is left of dead processes.

list_streams() reads every ring under a prefix without attaching to it (no consumer entry
is taken); gc() removes rings whose producer is dead, half-built rings and wake FIFOs of
dead processes. Both back `edgeroom bus ls` and `edgeroom bus gc`; services call gc() at
start, so a crashed predecessor's segments never linger.
"""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from framebus import layout as L
from framebus import procinfo, segment, wake
from framebus.atomics import Words
from framebus.errors import BusError
from framebus.formats import KIND_NAMES
from framebus.names import SHM_DIR, check_name, default_prefix, wake_glob

__all__ = ["ConsumerInfo", "StreamInfo", "gc", "list_streams"]

_RATE_STALE_NS = 2_000_000_000


@dataclass
class ConsumerInfo:
    pid: int
    reliable: bool
    alive: bool
    position: int  # the oldest item it may still read (the one it holds, or the next)
    lag: int  # items sent that it has not read
    missed: int
    skipped: int
    received: int


@dataclass
class StreamInfo:
    stream: str
    path: str
    status: str  # alive | stale | invalid
    producer_pid: int = 0
    kind: str = "?"
    generation: int = 0
    state: str = "?"
    slots: int = 0
    payload_bytes: int = 0
    size_bytes: int = 0
    items: int = 0  # items sent in this generation
    rate_hz: float = 0.0
    heartbeat_age_s: float | None = None
    overruns: int = 0  # times a reliable consumer's hold-back bound ran out
    held_s: float = 0.0  # seconds the producer waited for reliable consumers
    consumers: list[ConsumerInfo] = field(default_factory=list)
    error: str = ""

    @property
    def drops(self) -> int:
        """Items lost by consumers because the ring overran them."""
        return sum(c.missed for c in self.consumers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drops"] = self.drops
        return d


def _entries(prefix: str) -> list[str]:
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix + "."))


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_info(stream: str, path: str, fd: int, size: int) -> StreamInfo:
    info = StreamInfo(stream=stream, path=path, status="invalid", size_bytes=size)
    if size < L.HEADER_SIZE:
        info.error = f"{size} bytes, too small for a header"
        return info
    head = mmap.mmap(fd, min(size, L.HEADER_SIZE), mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        owner = L.read_pid(head, size)
        if owner is not None:
            info.producer_pid = owner[0]
            info.status = "alive" if procinfo.is_alive(*owner) else "stale"
        try:
            ident = L.read_identity(head, stream, size)
        except BusError as exc:
            # Garbage, or another release's ring: its status (alive/stale) still stands.
            info.error = str(exc)
            return info
    finally:
        head.close()
    whole = mmap.mmap(fd, ident.total_size, mmap.MAP_SHARED, mmap.PROT_READ)
    words = Words(whole)
    try:
        geo = ident.geometry()
        now = time.monotonic_ns()
        items = words.load_acquire(L.OFF_WRITE_SEQ)
        heartbeat = words.load(L.OFF_HEARTBEAT_NS)
        state = words.load_acquire(L.OFF_STATE)
        info.kind = KIND_NAMES.get(ident.kind, "?")
        info.generation = ident.generation
        info.state = L.STATE_NAMES.get(state, str(state))
        if state != L.STATE_OPEN and info.status == "alive":
            info.status = "stale"  # closed or superseded but still named: leftover
        info.slots = ident.slot_count
        info.payload_bytes = ident.payload_capacity
        info.items = items
        info.heartbeat_age_s = (now - heartbeat) / 1e9 if heartbeat else None
        fresh = heartbeat and now - heartbeat < _RATE_STALE_NS
        info.rate_hz = words.load(L.OFF_RATE_MHZ) / 1000 if fresh and info.status == "alive" else 0.0
        info.overruns = words.load(L.OFF_OVERRUNS)
        info.held_s = words.load(L.OFF_HELD_NS) / 1e9
        for off, pid in geo.taken_entries(words):
            position = words.load(off + L.C_HOLD_SEQ) & ~L.HOLD_NEWEST
            info.consumers.append(ConsumerInfo(
                pid=pid,
                reliable=bool(words.load(off + L.C_FLAGS) & L.CFLAG_RELIABLE),
                alive=procinfo.is_alive(pid, words.load(off + L.C_TICKS)),
                position=position,
                lag=max(0, items - position),
                missed=words.load(off + L.C_MISSED),
                skipped=words.load(off + L.C_SKIPPED),
                received=words.load(off + L.C_RECEIVED),
            ))
    finally:
        words.release()
        whole.close()
    return info


def list_streams(prefix: str | None = None) -> list[StreamInfo]:
    """Every ring under `prefix` (default: the appliance prefix), alive or not."""
    prefix = check_name("prefix", default_prefix() if prefix is None else prefix)
    out = []
    for name in _entries(prefix):
        stream = name[len(prefix) + 1 :]
        if "." in stream:
            continue  # a wake FIFO or a ring being built
        path = f"{SHM_DIR}/{name}"
        try:
            fd, size = segment.open_existing(path)
        except (FileNotFoundError, PermissionError):
            continue
        try:
            out.append(_read_info(stream, path, fd, size))
        finally:
            os.close(fd)
    return out


def _remove_stale_ring(prefix: str, stream: str, path: str) -> bool:
    try:
        fd, size = segment.open_existing(path)
    except FileNotFoundError:
        return False
    try:
        with segment.flock(fd):  # the lock a replacing producer takes too
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return False
            head = mmap.mmap(fd, min(size, L.HEADER_SIZE)) if size else None
            try:
                owner = L.read_pid(head, size) if head is not None else None
                if owner is not None and procinfo.is_alive(*owner):
                    return False
                if head is not None and owner is not None and size >= L.HEADER_SIZE:
                    w = Words(head)
                    w.store_release(L.OFF_STATE, L.STATE_CLOSED)  # its consumers detach
                    w.release()
            finally:
                if head is not None:
                    head.close()
            removed = segment.remove_if_same(path, os.fstat(fd).st_ino)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    wake.poke_all(wake_glob(prefix, stream))
    return removed


def gc(prefix: str | None = None, stream: str | None = None) -> list[str]:
    """Remove what dead processes left under `prefix`; return the paths removed.

    A ring is removed when its producer is dead (or it holds no framebus header); a
    half-built ring and a wake FIFO when the process named in their file name is gone.
    Live producers' rings and live consumers' FIFOs are never touched. With `stream`,
    only that stream's leftovers (what a new producer of it clears at start).
    """
    prefix = check_name("prefix", default_prefix() if prefix is None else prefix)
    removed = []
    for name in _entries(prefix):
        path = f"{SHM_DIR}/{name}"
        rest = name[len(prefix) + 1 :]
        owner, _, tail = rest.partition(".")
        if stream is not None and owner != stream:
            continue
        if not tail:
            if _remove_stale_ring(prefix, rest, path):
                removed.append(path)
            continue
        pid_text = tail.rsplit(".", 1)[0].split("-", 1)[0]
        if not (tail.endswith(".wake") or tail.endswith(".tmp")) or not pid_text.isdigit():
            continue
        if _pid_exists(int(pid_text)):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
