"""decode@NAME as a real process: real x264 access units in on NAME, pictures out on NAME-raw.

The test is the producer of NAME (no capture process): it encodes pattern pictures with
PyAV's libx264, each carrying its frame number as 32 black/white blocks and a white bar
at a position that depends on the number, and publishes the access units on the bus.
A thread reads NAME-raw and checks every picture it gets: the number read back from the
decoded luma (or RGB), the bar, the difference from the source picture, and the
metadata passed through (pts, time base, capture_ns). One hub runs for the whole module,
so status and metrics are read the way an operator reads them (`status`, the scrape URL).
"""
from __future__ import annotations

import functools
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import framebus
from services.capture.sources.synthetic import Pattern
from services.decode.decoder import nal_spans
from services.runtime.streams import raw_stream
from tests.appliance import Box, metric_value, wait_for
from tests.conftest import shm_leftovers

W, H, GOP = 320, 240, 30
TB = Fraction(1, 90000)
STEP = 3000  # pts step: 30 fps in a 90 kHz time base
X264 = {"preset": "ultrafast", "tune": "zerolatency", "keyint": str(GOP), "min-keyint": str(GOP),
        "scenecut": "0", "bframes": "0", "threads": "2"}  # zerolatency: sliced threads, 2 slices a picture
GPU = os.path.exists("/dev/nvidiactl")

SOURCES = """
[sources.whole]
hw_decode = "auto"
decode_threads = 2
[sources.nals]
hw_decode = "auto"
decode_threads = 2
[sources.bad]
hw_decode = "off"
decode_threads = 2
[sources.restart]
hw_decode = "off"
decode_threads = 2
[sources.behind]
hw_decode = "off"
decode_threads = 2
[sources.nv]
pixel_format = "nv12"
hw_decode = "h264_cuvid"
decode_threads = 2
[sources.rgb]
pixel_format = "rgb24"
hw_decode = "off"
decode_threads = 2
[sources.late]
hw_decode = "off"
decode_threads = 2
[sources.long]
hw_decode = "off"
decode_threads = 2
[sources.rawcam]
encode = "raw"
"""


# ---------------------------------------------------------------------- the encoded clip
@functools.cache
def clip(n: int = 120) -> tuple[tuple[bytes, bool], ...]:
    """n pattern pictures numbered 0..n-1 as H.264 access units (Annex B, SPS/PPS before each IDR)."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = W, H, "yuv420p"
    enc.time_base = Fraction(1, 30)
    enc.framerate = Fraction(30, 1)
    enc.gop_size = GOP
    enc.max_b_frames = 0
    enc.options = X264
    out = []
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(reference_rgb(i), format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        out += [(bytes(p), p.is_keyframe) for p in enc.encode(frame)]
    out += [(bytes(p), p.is_keyframe) for p in enc.encode(None)]
    assert len(out) == n and [i for i, (_, k) in enumerate(out) if k] == list(range(0, n, GOP))
    for i in range(n):
        reference_y(i)  # ready before the reader thread needs them: it must keep up with decode
    return tuple(out)


@functools.cache
def _pattern() -> Pattern:
    return Pattern(W, H)


@functools.lru_cache(maxsize=256)
def reference_rgb(n: int) -> np.ndarray:
    img = np.empty((H, W, 3), np.uint8)
    _pattern().draw(img, n)
    return img


@functools.lru_cache(maxsize=256)
def reference_y(n: int) -> np.ndarray:
    return av.VideoFrame.from_ndarray(reference_rgb(n), format="rgb24").reformat(format="yuv420p").to_ndarray()[:H]


def number_in(plane: np.ndarray) -> int:
    """The frame number drawn by Pattern, read from a luma plane (h, w) or an RGB picture (h, w, 3)."""
    b = max(1, min(16, plane.shape[1] // 32))
    row = plane[b // 2, b // 2: 32 * b: b]
    bits = (row[:, 0] if row.ndim == 2 else row) > 127
    return int(np.packbits(bits).view(">u4")[0])


def bar_at(plane: np.ndarray, n: int) -> bool:
    """Pattern's white bar (16 columns at (8 n) mod W, below the number blocks) is where n puts it."""
    x = (n * 8) % W
    y = plane[H // 2:, x + 3: min(W, x + 13)]
    return float(y.mean()) > 200


# ---------------------------------------------------------------------- the two ends
@dataclass
class Pic:
    """A picture as read from NAME-raw: its metadata and a private copy of the plane checked."""
    plane: np.ndarray  # the luma plane, or the RGB picture
    pts: int
    time_base: Fraction
    capture_ns: int
    publish_ns: int
    width: int
    height: int
    format: str
    flags: int
    seq: int

    @functools.cached_property
    def number(self) -> int:
        return number_in(self.plane)

    @property
    def bar(self) -> bool:
        return bar_at(self.plane if self.plane.ndim == 2 else self.plane[..., 0], self.number)

    @property
    def diff(self) -> float:
        """Mean absolute difference from the source picture (luma, or RGB)."""
        n = self.number
        if n >= 1 << 20:
            return 255.0
        ref = reference_y(n) if self.plane.ndim == 2 else reference_rgb(n)
        return float(np.abs(self.plane.astype(np.int16) - ref).mean())


def examine(item: framebus.Item) -> Pic:
    """Cheap, so the reader keeps up with decode at full speed: a copy now, the checks later."""
    fmt = item.format
    plane = item.array if fmt in ("rgb24", "bgr24") else item.planes()[0]
    if fmt == "bgr24":
        plane = plane[..., ::-1]
    return Pic(plane.copy(), item.pts, item.time_base, item.capture_ns, item.publish_ns, item.width, item.height,
               fmt, item.flags, item.seq)


_open: list = []  # every Raw and Feed of the running test, closed after it whatever happened


@pytest.fixture(autouse=True)
def _close_ends():
    yield
    while _open:
        end = _open.pop()
        try:
            end.close(check=False) if isinstance(end, Raw) else end.close()
        except Exception:
            pass


class Raw:
    """Reads NAME-raw on a thread (it may not exist yet), keeping what every picture showed."""

    def __init__(self, prefix: str, name: str) -> None:
        _open.append(self)
        self.consumer = framebus.Consumer.attach(raw_stream(name), prefix=prefix, missing_ok=True)
        self.pics: list[Pic] = []
        self.torn = 0
        self.failure: BaseException | None = None
        self.generations: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self.consumer.receive(timeout=0.05)
                if item is None:
                    continue
                pic = examine(item)
                if item.valid():
                    self.pics.append(pic)
                    self.generations.add(item.generation)
                else:
                    self.torn += 1
        except BaseException as exc:  # surfaces in the test, not as a silent dead thread
            self.failure = exc

    def wait(self, count: int, timeout: float = 10.0) -> list[Pic]:
        wait_for(lambda: len(self.pics) >= count or self.failure, timeout,
                 f"{count} pictures (have {len(self.pics)}: {[(p.number, p.seq) for p in self.pics]}, "
                 f"missed {self.consumer.missed})")
        if self.failure:
            raise self.failure
        return self.pics

    def numbers(self) -> list[int]:
        return [p.number for p in self.pics]

    def close(self, check: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()
        if check:
            assert self.consumer.missed == 0 and self.torn == 0, "the test's own reader lost pictures"


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def readers(prefix: str, name: str) -> list:
    return [c for s in framebus.list_streams(prefix) if s.stream == name for c in s.consumers if c.alive]


def wait_reader(prefix: str, name: str, timeout: float = 10.0) -> None:
    wait_for(lambda: readers(prefix, name), timeout, f"decode attached to {name}", interval=0.01)


def wait_lag(prefix: str, name: str, max_lag: int, timeout: float = 10.0) -> None:
    """decode (the stream's one reader) has read all but `max_lag` items and asked for more, and
    the readers of NAME-raw (this test's) are as close behind decode."""
    out = raw_stream(name)

    def close_behind():
        lags = {s.stream: [c.lag for c in s.consumers if c.alive] for s in framebus.list_streams(prefix)
                if s.stream in (name, out)}
        return lags.get(name) and max(lags[name]) <= max_lag and max(lags.get(out) or [0]) <= max(max_lag, 1)

    wait_for(close_behind, timeout, f"decode within {max_lag} items of {name}", interval=0.002)


class Feed:
    """The producer of NAME: encoded items, paced so decode (its one reader) stays within `max_lag`
    items, so this test's reader of NAME-raw (8 slots) is never lapped."""

    def __init__(self, prefix: str, name: str, kind: str = "encoded", slots: int = 64) -> None:
        self.prefix, self.name = prefix, name
        self.producer = framebus.Producer.create(name, kind, payload=1 << 20, slots=slots, prefix=prefix)
        self.captured: dict[int, int] = {}  # pts -> capture_ns sent
        self.primed = False
        _open.append(self)

    def wait_reader(self, timeout: float = 10.0) -> None:
        wait_reader(self.prefix, self.name, timeout)

    def wait_lag(self, max_lag: int, timeout: float = 10.0) -> None:
        wait_lag(self.prefix, self.name, max_lag, timeout)

    def send(self, data: bytes, key: bool, pts: int, *, max_lag: int | None = 3, flags: int = 0,
             capture_ns: int | None = None) -> None:
        if max_lag is not None:
            self.wait_lag(max_lag)
        self.captured[pts] = cap = capture_ns or now_ns()
        self.producer.publish_encoded(data, "h264", keyframe=key, pts=pts, time_base=TB, capture_ns=cap, flags=flags)
        if not self.primed:
            self._prime()

    def _prime(self) -> None:
        """Until the test's reader is on NAME-raw, one item at a time: decode makes NAME-raw at its
        first picture, and a ring nobody reads keeps only its last 8 items, so the reader must be
        attached before more come."""
        self.wait_lag(0)
        out = raw_stream(self.name)
        if any(s.stream == out for s in framebus.list_streams(self.prefix)):
            wait_reader(self.prefix, out)
            self.primed = True

    def send_clip(self, numbers, **kw) -> None:
        units = clip()
        for n in numbers:
            au, key = units[n]
            self.send(au, key, n * STEP, **kw)

    def close(self) -> None:
        self.producer.close()


# ---------------------------------------------------------------------- the box
@pytest.fixture(scope="module")
def box():  # this module's own: one Box and its hub for every test here (conftest's `box` makes one per test)
    prefix = f"t{os.getpid()}dec"
    b = Box(prefix, SOURCES)
    b.spawn("service", "hub")
    b.wait_ready("hub")
    yield b
    b.close()
    framebus.gc(prefix)
    left = shm_leftovers(prefix)
    for f in left:
        Path(f"/dev/shm/{f}").unlink(missing_ok=True)
    assert not left, f"segments left behind: {left}"


class Decode:
    """One decode@NAME process and the hub's view of it."""

    def __init__(self, box: Box, name: str) -> None:
        self.box, self.name, self.id = box, name, f"decode@{name}"
        self.proc = box.spawn("service", "decode", name)
        self.row = box.wait_ready(self.id)[self.id]

    def status(self) -> str:
        return self.box.services()[self.id]["status"]

    def wait_status(self, text: str, timeout: float = 5.0) -> dict:
        def row():
            r = self.box.services()[self.id]
            return r if text in r["status"] else None
        return wait_for(row, timeout, f"{self.id} status with {text!r} (now {self.status()!r})")

    def metric(self, name: str, **labels: str) -> float | None:
        return metric_value(self.box.scrape(), name, service=self.id, stream=self.name, **labels)

    def wait_metric(self, name: str, value: float, timeout: float = 5.0, **labels: str) -> str:
        """Wait until the scrape URL shows `value` (heartbeats carry snapshots); the page."""
        def page():
            text = self.box.scrape()
            return text if metric_value(text, name, service=self.id, stream=self.name, **labels) == value else None
        return wait_for(page, timeout, f"{name}{labels} == {value} (now {self.metric(name, **labels)})")

    def stop(self) -> int:
        """SIGTERM; the exit status. Its ring NAME-raw must be gone and its consumer entry freed."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=10)
        prefix = self.box.prefix
        streams = {s.stream: s for s in framebus.list_streams(prefix)}
        assert raw_stream(self.name) not in streams, f"{raw_stream(self.name)} left on the bus"
        if self.name in streams:
            assert not [c for c in streams[self.name].consumers if c.pid == self.proc.pid]
        return rc


def settle(dec: Decode, raw: Raw, timeout: float = 5.0) -> str:
    """Wait until the reader has every picture decode says it published; the scrape page."""
    def same():
        page = dec.box.scrape()
        v = metric_value(page, "edgeroom_decode_frames_out_total", service=dec.id, stream=dec.name)
        return page if v == len(raw.pics) else None
    return wait_for(same, timeout, f"{dec.id}: the reader has every picture published")


def dropped(page: str, name: str) -> dict[str, float]:
    out = {}
    for reason in ("waiting_keyframe", "corrupt", "missed", "bus_full"):
        v = metric_value(page, "edgeroom_decode_dropped_frames_total", service=f"decode@{name}", stream=name,
                         reason=reason)
        if v:
            out[reason] = v
    return out


def assert_pictures_ok(pics: list[Pic], feed: Feed | None = None) -> None:
    """Every picture is the one its pts says, intact (no smear), with its AU's metadata."""
    for p in pics:
        assert p.pts == p.number * STEP, f"picture {p.number} carries pts {p.pts}"
        assert p.bar, f"picture {p.number}: the bar is not where it belongs"
        # measured: <= 0.4 (luma) and 1.3 (RGB) from the source; the next picture is 2.4 away in luma
        assert p.diff < (3.0 if p.format in ("rgb24", "bgr24") else 1.5), f"picture {p.number} differs by {p.diff:.2f}"
        assert p.time_base == TB
        if feed is not None:
            assert p.capture_ns == feed.captured[p.pts]
        assert p.publish_ns >= p.capture_ns


# ---------------------------------------------------------------------- the tests
def test_whole_access_units_in_pictures_out(box):
    """decode starts before its stream exists, attaches when it appears, and turns N whole AUs
    into N pictures: right size and format, in order, each the right one, metadata passed through."""
    dec = Decode(box, "whole")
    assert dec.wait_status("waiting for stream whole")["streams"] == []
    raw = Raw(box.prefix, "whole")
    feed = Feed(box.prefix, "whole")
    feed.wait_reader()
    n = 60
    feed.send_clip(range(n))
    row = dec.wait_status("h264 -> yuv420p 320x240 at")
    assert row["streams"] == ["whole-raw"]
    feed.close()  # end of stream: decode flushes what its frame threads still hold
    pics = raw.wait(n)
    assert raw.numbers() == list(range(n))
    assert {(p.width, p.height, p.format) for p in pics} == {(W, H, "yuv420p")}
    assert_pictures_ok(pics, feed)
    assert not any(p.flags & framebus.FLAG_DISCONTINUITY for p in pics)
    page = dec.wait_metric("edgeroom_decode_frames_out_total", n)
    assert metric_value(page, "edgeroom_decode_frames_in_total", service=dec.id, stream="whole") == n
    assert metric_value(page, "edgeroom_decode_errors_total", service=dec.id, stream="whole") == 0
    assert dropped(page, "whole") == {}
    assert metric_value(page, "edgeroom_decode_seconds_count", service=dec.id, stream="whole") == n
    assert metric_value(page, "edgeroom_decode_capture_to_raw_seconds_count", service=dec.id, stream="whole") == n
    if not GPU:  # auto: the probe finds no hardware decoder here, and says so
        assert metric_value(page, "edgeroom_decode_hardware", service=dec.id, stream="whole", backend="h264") == 0
        dec.wait_status("(software: h264)")
    assert "decoding h264 from whole in " in box.log()
    raw.close()
    assert dec.stop() == 0


def test_one_nal_per_item(box):
    """RTP-style input: SPS, PPS and each slice as separate items, no start codes."""
    dec = Decode(box, "nals")
    raw = Raw(box.prefix, "nals")
    feed = Feed(box.prefix, "nals")
    feed.wait_reader()
    n, items = 45, 0
    for i, (au, key) in enumerate(clip()[:n]):
        cap = now_ns()  # one capture time for the whole AU, as an RTP source has one timestamp
        for s, e in nal_spans(au):
            feed.send(au[s:e], key, i * STEP, capture_ns=cap)
            items += 1
    assert items >= 2 * n + 4  # two slices a picture, SPS and PPS before both IDRs
    feed.close()
    pics = raw.wait(n)
    assert raw.numbers() == list(range(n))
    assert_pictures_ok(pics, feed)
    page = dec.wait_metric("edgeroom_decode_frames_out_total", n)
    assert metric_value(page, "edgeroom_decode_frames_in_total", service=dec.id, stream="nals") == n
    assert metric_value(page, "edgeroom_decode_errors_total", service=dec.id, stream="nals") == 0
    raw.close()
    assert dec.stop() == 0


def test_decode_started_after_its_stream_reads_what_the_ring_still_holds(box):
    """decode (re)started while capture runs: it reads from the oldest item still in the ring,
    here the keyframe 0 (a lagging reader keeps the ring full), so nothing waits for a keyframe."""
    feed = Feed(box.prefix, "late")
    feed.primed = True  # no reader of late-raw in this test: decode's counts tell what it read
    with framebus.Consumer.attach("late", prefix=box.prefix, start="oldest"):  # lags: the ring keeps all
        feed.send_clip(range(20), max_lag=None)
        dec = Decode(box, "late")
        wait_for(lambda: [c for c in readers(box.prefix, "late") if c.pid == dec.proc.pid and c.lag == 0], 10,
                 "decode read all 20")
    feed.send_clip(range(20, 40), max_lag=None)
    feed.close()
    page = dec.wait_metric("edgeroom_decode_frames_out_total", 40)
    assert metric_value(page, "edgeroom_decode_frames_in_total", service=dec.id, stream="late") == 40
    assert dropped(page, "late") == {}
    assert dec.stop() == 0


def test_decode_that_joins_a_long_history_takes_only_its_last_64_items(box):
    """Capture's rings keep seconds of history (for a recorder's restarts); a decode that starts
    on a running stream decodes only the last 64 items of it (what the rings held before), not
    a burst of seconds of stale pictures, and counts nothing it skipped as missed."""
    feed = Feed(box.prefix, "long", slots=256)
    feed.primed = True  # no reader of long-raw in this test: decode's counts tell what it read
    with framebus.Consumer.attach("long", prefix=box.prefix, start="oldest"):  # lags: the ring keeps all
        feed.send_clip(range(120), max_lag=None)
        dec = Decode(box, "long")
        wait_for(lambda: [c for c in readers(box.prefix, "long") if c.pid == dec.proc.pid and c.lag == 0], 10,
                 "decode caught up")
    page = dec.wait_metric("edgeroom_decode_frames_in_total", 64)
    assert metric_value(page, "edgeroom_decode_frames_in_total", service=dec.id, stream="long") == 64
    assert dropped(page, "long").get("missed", 0) == 0
    feed.close()
    assert dec.stop() == 0


def corrupt(au: bytes) -> bytes:
    b = bytearray(au)
    third = len(b) // 3
    for j in range(third, third + 20):
        b[j] ^= 0x5A
    return bytes(b)


def test_corrupt_data_is_never_published_and_decoding_resumes_at_the_next_keyframe(box):
    """A damaged P picture (10), garbage items (a bogus IDR, random bytes) after picture 45, and
    an intact picture marked FLAG_CORRUPT by its source (75: data before it was lost): nothing
    wrong is published, pictures come back at each next keyframe, the errors and drops are
    counted, and the process stays up."""
    dec = Decode(box, "bad")
    raw = Raw(box.prefix, "bad")
    feed = Feed(box.prefix, "bad")
    feed.wait_reader()
    units = clip()
    rnd = random.Random(7)
    for i in range(120):
        au, key = units[i]
        feed.send(corrupt(au) if i == 10 else au, key, i * STEP, flags=framebus.FLAG_CORRUPT if i == 75 else 0)
        if i == 45:
            feed.send(b"\x00\x00\x00\x01\x65" + rnd.randbytes(300), False, 1000 * STEP)
            feed.send(rnd.randbytes(50), False, 1001 * STEP)
    feed.close()
    wait_for(lambda: raw.pics and raw.pics[-1].number == 119, 10, "the last picture")
    got = raw.numbers()
    assert_pictures_ok(raw.pics, feed)
    assert got == sorted(got) and len(set(got)) == len(got)
    assert got[:10] == list(range(10)) and not set(got) & set(range(10, GOP))
    assert set(range(GOP, 46)) <= set(got), "pictures before the garbage all come out"
    assert [n for n in got if n >= 60] == list(range(60, 75)) + list(range(90, 120)), \
        "the garbage is over at the keyframe 60; FLAG_CORRUPT at 75 closes the gate until 90"
    page = dec.wait_metric("edgeroom_decode_frames_out_total", len(got))
    errors = metric_value(page, "edgeroom_decode_errors_total", service=dec.id, stream="bad")
    drops = dropped(page, "bad")
    frames_in = metric_value(page, "edgeroom_decode_frames_in_total", service=dec.id, stream="bad")
    assert errors >= 1 and drops.get("corrupt", 0) >= 1
    assert drops["corrupt"] + drops["waiting_keyframe"] >= (GOP - 10) + (90 - 75)
    # every AU is a picture or a counted drop; FFmpeg may swallow a garbage item without a
    # picture or an error, so the two garbage items may be in frames_in only
    assert 0 <= frames_in - (len(got) + sum(drops.values())) <= 2, drops
    assert dec.proc.poll() is None
    dec.wait_status("h264 -> yuv420p 320x240")
    assert "access unit 77 is marked damaged (FLAG_CORRUPT)" in box.log()
    raw.close()
    assert dec.stop() == 0


PRODUCER = """
import os, pickle, sys, time
sys.path.insert(0, {root!r})
import framebus
units, prefix, name = pickle.load(open({path!r}, "rb"))
p = framebus.Producer.create(name, "encoded", payload=1 << 20, slots=64, prefix=prefix)
print("ready", flush=True)
sys.stdin.readline()
for n, (au, key, cap) in enumerate(units):
    p.publish_encoded(au, "h264", keyframe=key, pts=n * {step}, time_base=(1, 90000), capture_ns=cap)
    time.sleep(0.003)  # a camera's pace, roughly: the test's reader of NAME-raw keeps up
print("sent", flush=True)
time.sleep(3600)
"""


def test_producer_restarts_decode_follows(box, tmp_path):
    """The producer closes and re-creates the ring (clean: decode flushes; the new generation
    starts mid-GOP: decode waits for its keyframe), then a producer is SIGKILLed and a new one
    takes the ring over: decode publishes what it had in flight, says the stream stalled,
    follows the new generation and goes on from its keyframe."""
    dec = Decode(box, "restart")
    raw = Raw(box.prefix, "restart")
    units = clip()
    # 1. the first producer: 0..44, then a clean close
    feed1 = Feed(box.prefix, "restart")
    feed1.wait_reader()
    feed1.send_clip(range(45))
    feed1.close()
    raw.wait(45)
    assert raw.numbers() == list(range(45))
    assert_pictures_ok(raw.pics, feed1)
    # 2. a new generation starting at 50 (mid-GOP): nothing until the keyframe at 60
    feed2 = Feed(box.prefix, "restart")
    feed2.wait_reader()
    feed2.send_clip(range(50, 90))
    feed2.close()
    raw.wait(45 + 30)
    assert raw.numbers() == list(range(45)) + list(range(60, 90))
    assert raw.pics[45].flags & framebus.FLAG_DISCONTINUITY, "the first picture of a new generation says so"
    assert not any(p.flags & framebus.FLAG_DISCONTINUITY for p in raw.pics[:45] + raw.pics[46:])
    assert_pictures_ok(raw.pics[45:], feed2)
    # 3. a producer in another process, SIGKILLed after 0..29 (decode held one picture in
    #    flight: it comes out when decode sees the producer is gone)
    sent = [(au, k, now_ns() + n) for n, (au, k) in enumerate(units[:GOP])]
    path = tmp_path / "units.pickle"
    path.write_bytes(pickle.dumps((sent, box.prefix, "restart")))
    root = str(Path(__file__).resolve().parents[1])
    code = PRODUCER.format(root=root, path=str(path), step=STEP)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        wait_reader(box.prefix, "restart")
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "sent"
        wait_lag(box.prefix, "restart", 0)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    row = dec.wait_status("stalled (its producer died)")
    assert row["state"] == "ready"
    settle(dec, raw)
    before = len(raw.pics)
    assert raw.numbers()[75:] == list(range(GOP))
    assert [p.capture_ns for p in raw.pics[75:]] == [cap for _, _, cap in sent]
    # 4. a new producer takes the dead one's ring over: the next keyframe brings pictures back
    feed4 = Feed(box.prefix, "restart")
    feed4.wait_reader()
    feed4.send_clip(range(60, 75))
    feed4.close()
    raw.wait(before + 15)
    assert raw.numbers()[before:] == list(range(60, 75))
    assert raw.pics[before].flags & framebus.FLAG_DISCONTINUITY
    assert_pictures_ok(raw.pics[before:], feed4)
    assert len(raw.generations) == 1, "decode's own ring stayed the same"
    page = settle(dec, raw)
    drops = dropped(page, "restart")
    frames_in = metric_value(page, "edgeroom_decode_frames_in_total", service=dec.id, stream="restart")
    assert drops == {"waiting_keyframe": 10}  # 50..59 of the second generation
    assert frames_in == 45 + 40 + GOP + 15 == len(raw.pics) + sum(drops.values())
    assert metric_value(page, "edgeroom_decode_errors_total", service=dec.id, stream="restart") == 0
    raw.close()
    assert dec.stop() == 0


def test_decode_that_falls_behind_counts_what_it_missed(box):
    """decode stopped (SIGSTOP) while 100 AUs go by on a 64-slot ring: it misses 36, says so
    in dropped{missed}, publishes the picture it held (from before the gap) and nothing
    wrong, and goes on from the next keyframe."""
    dec = Decode(box, "behind")
    raw = Raw(box.prefix, "behind")
    feed = Feed(box.prefix, "behind")
    feed.wait_reader()
    feed.send_clip(range(20))
    feed.wait_lag(0)
    os.kill(dec.proc.pid, signal.SIGSTOP)
    try:
        feed.send_clip(range(20, 120), max_lag=None)
    finally:
        os.kill(dec.proc.pid, signal.SIGCONT)
    feed.close()
    expected = list(range(20)) + list(range(60, 120))
    page = dec.wait_metric("edgeroom_decode_frames_out_total", len(expected), timeout=10)
    wait_for(lambda: raw.pics and raw.pics[-1].seq == len(expected) - 1, 5, "the last picture")
    # decode publishes the 60 pictures after the gap as fast as it decodes them; this test's
    # reader may be lapped on the 8-slot ring, but then framebus counts what it missed, and
    # every picture it did see is the one decode published at that place (item seq)
    assert [p.number for p in raw.pics] == [expected[p.seq] for p in raw.pics]
    assert len(raw.pics) + raw.consumer.missed + raw.torn == len(expected)
    assert_pictures_ok(raw.pics, feed)
    drops = dropped(page, "behind")
    assert drops == {"missed": 36, "waiting_keyframe": 4}  # 20..55 overwritten; 56..59 before the keyframe
    frames_in = metric_value(page, "edgeroom_decode_frames_in_total", service=dec.id, stream="behind")
    assert frames_in == 20 + 64
    raw.close(check=False)
    assert dec.stop() == 0


def test_nv12_and_rgb24(box):
    """Two more output formats, from two decode processes at once. nv12's source asks for
    h264_cuvid: where no NVIDIA decoder works, decode falls back and says so."""
    decs = {name: Decode(box, name) for name in ("nv", "rgb")}
    raws = {name: Raw(box.prefix, name) for name in decs}
    feeds = {name: Feed(box.prefix, name) for name in decs}
    for feed in feeds.values():
        feed.wait_reader()
    for i in range(40):
        au, key = clip()[i]
        for feed in feeds.values():
            feed.send(au, key, i * STEP)
    for feed in feeds.values():
        feed.close()
    for name, fmt in (("nv", "nv12"), ("rgb", "rgb24")):
        pics = raws[name].wait(40)
        assert raws[name].numbers() == list(range(40))
        assert {(p.width, p.height, p.format) for p in pics} == {(W, H, fmt)}
        assert_pictures_ok(pics, feeds[name])
        raws[name].close()
    status = decs["nv"].wait_status("h264 -> nv12 320x240")["status"]
    if not GPU:
        assert "(software: h264, h264_cuvid unusable)" in status
        assert "decoder 'h264_cuvid' for h264" in box.log()
    decs["rgb"].wait_status("h264 -> rgb24 320x240")
    for dec in decs.values():
        assert dec.stop() == 0


def test_raw_pictures_on_the_stream_are_left_alone(box):
    """A source that puts pictures (not access units) on NAME: decode says so and counts nothing."""
    dec = Decode(box, "rawcam")
    feed = Feed(box.prefix, "rawcam", kind="video", slots=8)
    feed.wait_reader()
    for n in range(5):
        feed.producer.publish_picture(reference_rgb(n), "rgb24")
    feed.wait_lag(0)
    row = dec.wait_status("rawcam carries raw pictures (rgb24 320x240): nothing to decode")
    assert row["streams"] == []
    page = box.scrape()
    assert metric_value(page, "edgeroom_decode_errors_total", service=dec.id, stream="rawcam") == 0
    assert metric_value(page, "edgeroom_decode_frames_in_total", service=dec.id, stream="rawcam") == 0
    assert dropped(page, "rawcam") == {}
    assert raw_stream("rawcam") not in [s.stream for s in framebus.list_streams(box.prefix)]
    feed.close()
    assert dec.stop() == 0
