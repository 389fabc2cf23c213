"""The embedded default, for now: a synthetic camera on the bus and three kinds of reader.

    camera    draws a moving test pattern straight into loaned slots (1280x720 rgb24, 30/s)
    vision    samples the newest frame five times a second (latest(): skips, never lags)
    recorder  a reliable consumer: sees every frame (the camera holds back up to 50 ms)
    viewer    an asyncio consumer waiting on the ring's fd

Each is its own process. Every second the demo prints each one's rate, send-to-hold
latency and losses; at the end, what `edgeroom bus ls` shows. Later issues replace this
with the whole appliance under `edgeroom run`.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import signal
import time

import numpy as np

import framebus

__all__ = ["run"]

W, H, FPS = 1280, 720, 30
STREAM = "camera"


def _pattern() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    bg = np.empty((H, W, 3), np.uint8)
    bg[..., 0] = (x * 255 // W).astype(np.uint8)
    bg[..., 1] = (y * 255 // H).astype(np.uint8)
    bg[..., 2] = 96
    return bg


def camera(prefix: str, stop, seconds: float) -> None:
    background = _pattern()
    with framebus.Producer.create(STREAM, "video", payload=W * H * 3, slots=8, prefix=prefix,
                                  hold_back=0.05) as cam:
        t0 = time.monotonic()
        n = 0
        while not stop.is_set() and time.monotonic() - t0 < seconds:
            loan = cam.loan_picture(W, H, "rgb24")
            frame = loan.array
            np.copyto(frame, background)  # the one write a real source makes
            bar = (n * 16) % W
            frame[:, bar : bar + 24] = 255  # a moving white bar
            bits = np.unpackbits(np.array([n], ">u4").view(np.uint8))  # frame number as 32 blocks
            frame[:16, : 32 * 16] = np.repeat(bits * 255, 16)[None, :, None]
            loan.send(pts=n, time_base=(1, FPS))
            n += 1
            delay = t0 + n / FPS - time.monotonic()
            if delay > 0:
                stop.wait(delay)


def _report(out, name: str, c: framebus.Consumer, lat: list[int], t: float) -> None:
    a = np.array(lat or [0]) / 1000
    out.put({"name": name, "t": t, "received": c.received, "missed": c.missed, "skipped": c.skipped,
             "p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99))})
    lat.clear()


def _frame_number(item: framebus.Item) -> int:
    bits = item.array[8, : 32 * 16 : 16, 0] > 127
    return int(np.packbits(bits).view(">u4")[0])


def reader(prefix: str, name: str, stop, out) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    c = framebus.Consumer.attach(STREAM, prefix=prefix, missing_ok=True, reliable=(name == "recorder"))
    lat: list[int] = []
    last = time.monotonic()
    bad = 0
    while not stop.is_set():
        if name == "vision":
            stop.wait(0.2)
            item = c.latest()
        else:
            item = c.receive(timeout=0.2)
        now = time.monotonic()
        if item is not None:
            lat.append(time.monotonic_ns() - item.publish_ns)
            if _frame_number(item) != item.pts or not item.valid():
                bad += 1
        if now - last >= 1.0:
            _report(out, name, c, lat, now)
            last = now
    out.put({"name": name, "final": True, "received": c.received, "missed": c.missed,
             "skipped": c.skipped, "bad": bad})
    c.close()


def viewer(prefix: str, stop, out) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        c = framebus.Consumer.attach(STREAM, prefix=prefix, missing_ok=True)
        lat: list[int] = []
        last = time.monotonic()
        while not stop.is_set():
            item = await c.receive_async(timeout=0.2)
            if item is not None:
                lat.append(time.monotonic_ns() - item.publish_ns)
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                _report(out, "viewer", c, lat, last)
        out.put({"name": "viewer", "final": True, "received": c.received, "missed": c.missed,
                 "skipped": c.skipped, "bad": 0})
        c.close()

    asyncio.run(main())


def run(seconds: float = 6.0, prefix: str | None = None) -> int:
    prefix = prefix or "edgeroom-demo"
    removed = framebus.gc(prefix)
    if removed:
        print(f"removed {len(removed)} stale bus object(s) left by a previous run")
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=reader, args=(prefix, n, stop, out), name=n) for n in ("vision", "recorder")]
    procs.append(ctx.Process(target=viewer, args=(prefix, stop, out), name="viewer"))
    cam = ctx.Process(target=camera, args=(prefix, stop, seconds), name="camera")
    print(f"edgeroom demo: synthetic camera {W}x{H} rgb24 at {FPS} frames/s on bus prefix {prefix!r}, "
          f"{seconds:g} s; Ctrl-C stops")
    for p in procs:
        p.start()
    cam.start()
    finals: dict[str, dict] = {}
    prev: dict[str, int] = {}
    try:
        while cam.is_alive():
            r = _next_report(out, finals)
            if r is None:
                continue
            rate = r["received"] - prev.get(r["name"], 0)
            prev[r["name"]] = r["received"]
            print(f"  {r['name']:<9} {rate:>3} frames/s  send->hold p50 {r['p50_us']:7.0f} us "
                  f"p99 {r['p99_us']:7.0f} us  missed {r['missed']}  skipped {r['skipped']}", flush=True)
            if r["name"] == "viewer":
                _print_bus(prefix)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        stop.set()
        cam.join(5)
        for p in procs:
            p.join(5)
        for _ in range(10):  # the readers' final reports, half a second each at most
            if len(finals) == len(procs):
                break
            _next_report(out, finals)
        for p in [cam, *procs]:
            if p.is_alive():
                p.kill()
        framebus.gc(prefix)
    bad = sum(f.get("bad", 0) for f in finals.values())
    print("summary: " + ", ".join(f"{n} received {f['received']} missed {f['missed']}"
                                  for n, f in sorted(finals.items())))
    print(f"frames whose picture did not match their number: {bad}")
    return 0 if cam.exitcode == 0 and bad == 0 else 1


def _next_report(out, finals: dict) -> dict | None:
    """The next per-second report from a reader; final reports are filed in `finals`."""
    try:
        r = out.get(timeout=0.5)
    except queue.Empty:
        return None
    if r.get("final"):
        finals[r["name"]] = r
        return None
    return r


def _print_bus(prefix: str) -> None:
    for s in framebus.list_streams(prefix):
        print(f"  bus: {s.stream} producer {s.producer_pid} {s.status} {s.rate_hz:.1f}/s, "
              f"{len(s.consumers)} consumers, drops {s.drops}, held back {s.held_s * 1000:.1f} ms total", flush=True)


if __name__ == "__main__":
    raise SystemExit(run())
