"""Loopback ports for the tests' peers, safe when test workers run side by side (pytest-xdist).

A port found by binding port 0 and releasing it comes from the kernel's ephemeral range: any
process on the machine (another test worker's box, a client's connect(), a bind to port 0)
may be handed the same port before our peer binds it, and a port "nobody listens on" may be
listened on by then. So ports are picked here instead from a slice of the range BELOW the
ephemeral one, which the kernel never hands out by itself: each xdist worker has its own
slice (PYTEST_XDIST_WORKER gwN of PYTEST_XDIST_WORKER_COUNT), walked upwards from a random
start (another test run beside this one starts elsewhere) and checked by binding each port
before it is handed out. Peers that pick random ports of their own must pick them elsewhere:
baresip's RTP is kept to the ephemeral range (tests/sip_peers.py, `EPHEMERAL`).
"""
from __future__ import annotations

import os
import random
import socket
import threading

LOOPBACK = "127.0.0.1"
LOWEST = 10000        # below: well-known and registered services of the machine itself


def _ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999   # Linux's default


EPHEMERAL = _ephemeral()


def _slice() -> tuple[int, int]:
    """[first, end) of this worker's ports: its share of LOWEST..ephemeral start, or of what lies
    above the ephemeral range when the machine's ephemeral range starts too low."""
    lo, hi = (LOWEST, EPHEMERAL[0]) if EPHEMERAL[0] - LOWEST >= 2048 else (EPHEMERAL[1] + 1, 65536)
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (hi - lo) // count
    if size < 64:
        raise RuntimeError(f"no room for test ports outside the ephemeral range {EPHEMERAL}")
    return lo + index % count * size, lo + (index % count + 1) * size


_FIRST, _END = _slice()
_lock = threading.Lock()
_next = _FIRST + random.randrange(_END - _FIRST)


def _take(count: int, even: bool) -> int:
    """The start of the next `count` ports of this worker's slice (wrapping round), unchecked."""
    global _next
    with _lock:
        if even and _next % 2:
            _next += 1
        if _next + count > _END:
            _next = _FIRST + (_FIRST % 2 if even else 0)
        base = _next
        _next += count
        return base


def _bindable(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_block(count: int, *, udp: bool = True, tcp: bool = False, even: bool = False) -> int:
    """A base port P of this worker's own with P..P+count-1 all free right now on loopback for UDP
    and/or TCP; an even P when asked (RTP/RTCP pairs)."""
    kinds = [k for k, want in ((socket.SOCK_DGRAM, udp), (socket.SOCK_STREAM, tcp)) if want]
    for _ in range(1000):
        base = _take(count, even)
        if all(_bindable(p, k) for p in range(base, base + count) for k in kinds):
            return base
    raise RuntimeError(f"no {count} free loopback port(s) in a row in {_FIRST}..{_END - 1}")


def free_port(*, udp: bool = True, tcp: bool = False) -> int:
    """A loopback port of this worker's own, free right now for UDP and/or TCP (UDP alone by default)."""
    return free_block(1, udp=udp, tcp=tcp)


def free_udp_block(count: int = 4) -> int:
    """An even base port P of this worker's own with P..P+count-1 all free on UDP (RTP/RTCP pairs:
    audio P, video P+2)."""
    return free_block(count, udp=True, even=True)


def closed_port() -> int:
    """A loopback TCP port nobody listens on, nor will: nothing binds this worker's ports unless asked to."""
    return free_port(udp=False, tcp=True)
