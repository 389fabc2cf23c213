"""Stand-alone producer and consumer processes for the cross-process tests.

Run as `python tests/busproc.py ROLE ...`; each prints JSON lines on stdout (one per event)
so a test can follow it. Every item's payload is a pattern derived from its sequence
number: bytes 0-7 hold the sequence (little-endian), every other byte is seq % 251. A
consumer checks all of it with numpy, so a torn or stale frame cannot pass unnoticed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import framebus  # noqa: E402

END = 1 << 16  # application flag: the producer's last item


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def fill(array: np.ndarray, seq: int) -> None:
    flat = array.reshape(-1)
    flat.fill(seq % 251)
    flat[:8] = np.frombuffer(seq.to_bytes(8, "little"), np.uint8)


def check(array: np.ndarray, seq: int) -> bool:
    flat = array.reshape(-1)
    if int.from_bytes(flat[:8].tobytes(), "little") != seq:
        return False
    return bool((flat[8:] == seq % 251).all())


def producer(args) -> None:
    w, h = (int(x) for x in args.size.split("x"))
    p = framebus.Producer.create(args.stream, "video", payload=w * h * 3, slots=args.slots,
                                 prefix=args.prefix,
                                 hold_back=None if args.hold_back < 0 else args.hold_back)
    say(event="ready", pid=os.getpid(), generation=p.generation)
    if args.wait_consumers:
        while len([c for s in framebus.list_streams(args.prefix) if s.stream == args.stream
                   for c in s.consumers]) < args.wait_consumers:
            time.sleep(0.01)
    period = 1.0 / args.rate if args.rate else 0.0
    t0 = time.monotonic()
    for i in range(args.count):
        loan = p.loan_picture(w, h, "rgb24")
        fill(loan.array, p.seq)
        loan.send(pts=i, time_base=(1, 30))
        if period:
            delay = t0 + (i + 1) * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    if args.midwrite:
        loan = p.loan_picture(w, h, "rgb24")
        half = loan.array.reshape(-1)
        half[: half.size // 2] = 7  # garbage that must never be read as an item
        say(event="midwrite", seq=p.seq, slot=loan.slot)
        time.sleep(3600)  # the test SIGKILLs us here
    if args.end:
        loan = p.loan_picture(w, h, "rgb24")
        fill(loan.array, p.seq)
        loan.send(flags=END)
    say(event="done", sent=p.seq, overruns=p.overruns, seconds=time.monotonic() - t0)
    if args.linger:
        time.sleep(args.linger)
    p.close()


def consumer(args) -> None:
    c = framebus.Consumer.attach(args.stream, prefix=args.prefix, reliable=args.reliable,
                                 missing_ok=True, start=args.start)
    say(event="ready", pid=os.getpid(), attached=c.attached)
    got = errors = torn = 0
    last: dict[int, int] = {}  # generation -> last sequence seen
    order_errors = 0
    generations = set()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        item = c.receive(timeout=0.2)
        if item is None:
            continue
        generations.add(item.generation)
        if item.flags & END:
            if args.until_end:
                break
            continue
        ok = check(item.array, item.seq)
        if args.sleep:
            time.sleep(args.sleep)
        if not item.valid():
            torn += 1  # overwritten while we read: discarded, as a consumer must
            continue
        if not ok:
            errors += 1
        if item.seq <= last.get(item.generation, -1):
            order_errors += 1
        last[item.generation] = item.seq
        got += 1
        if args.count and got >= args.count:
            break
    say(event="summary", received=got, missed=c.missed, errors=errors, torn=torn,
        order_errors=order_errors, resyncs=c.resyncs, generations=sorted(generations),
        last=max(last.values(), default=-1), corrupt=c.corrupt)
    if args.linger:
        time.sleep(args.linger)
    c.close()


def skew_own_start_time(ticks: int) -> None:
    """Make this process see its own start time `ticks` off, as it does under qemu-user.

    qemu's user-mode emulation answers a process's reads of its own /proc/self/stat and
    /proc/<own pid>/stat itself, with a start time from its own clock; every other process
    (and any other path) gets the kernel's. Exactly those two paths are faked here.
    """
    import builtins
    import io

    real_open = builtins.open
    own = {"/proc/self/stat", f"/proc/{os.getpid()}/stat"}

    def open_(file, mode="r", *args, **kwargs):
        if file not in own:
            return real_open(file, mode, *args, **kwargs)
        with real_open(file, "rb") as f:
            stat = f.read()
        head, tail = stat[: stat.rfind(b")") + 2], stat[stat.rfind(b")") + 2 :].split(b" ")
        tail[19] = str(int(tail[19]) + ticks).encode()
        fake = head + b" ".join(tail)
        return io.BytesIO(fake) if "b" in mode else io.StringIO(fake.decode())

    builtins.open = open_


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    ap = argparse.ArgumentParser()
    ap.add_argument("--skew-own-start", type=int, default=0, metavar="TICKS",
                    help="see our own start time this far off in /proc/self/stat (as under qemu-user)")
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("producer")
    p.add_argument("prefix")
    p.add_argument("stream")
    p.add_argument("--size", default="64x48")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--hold-back", type=float, default=0.0, help="seconds; negative = forever")
    p.add_argument("--wait-consumers", type=int, default=0)
    p.add_argument("--midwrite", action="store_true")
    p.add_argument("--end", action="store_true")
    p.add_argument("--linger", type=float, default=0.0)
    c = sub.add_parser("consumer")
    c.add_argument("prefix")
    c.add_argument("stream")
    c.add_argument("--reliable", action="store_true")
    c.add_argument("--start", default="next")
    c.add_argument("--sleep", type=float, default=0.0)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--count", type=int, default=0)
    c.add_argument("--until-end", action="store_true")
    c.add_argument("--linger", type=float, default=0.0)
    args = ap.parse_args()
    if args.skew_own_start:
        skew_own_start_time(args.skew_own_start)
    {"producer": producer, "consumer": consumer}[args.role](args)


if __name__ == "__main__":
    main()
