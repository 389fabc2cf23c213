"""The url source against a real RTSP server: GStreamer's gst-rtsp-server serving x264 on
loopback (tests/rtsp_server.py, run with the system python), the real capture service as a
process with its hub, the bus read with framebus, the access units decoded with the
decoder library.

What is proved, with figures where they matter:

* RTP over TCP and over UDP (the server allowing only the one asked for): Annex B access
  units on the bus, keyframes flagged exactly where the IDR pictures are, pts and capture
  times increasing, pts one frame apart across the 32-bit RTP clock's wrap and from the
  session's first access unit (which FFmpeg hands over without a timestamp) with no
  rebase, the SDP's parameter sets as the ring's extradata, pictures of the served size
  after decoding;
* a camera with audio (a second RTP stream, G.711): PCM s16 on NAME-audio, its pts
  counting samples without a gap, the tone intact, beside the video;
* a server that goes away (SIGKILL) and comes back on the same port: the service stays
  up, counts the failure and the reconnects, its status names the cause while it waits,
  and items flow again, pts carrying on (the restart marked as a discontinuity);
* a server that stalls (SIGSTOP): a timeout within read_timeout; flowing again after
  SIGCONT; and a SIGTERM while the source is blocked in a read stops the service within
  read_timeout, cleanly, counting nothing;
* nothing listening (connection refused) and a server that accepts and never answers: a
  clear error within connect_timeout, counted as connect and timeout, the service up and
  retrying on the backoff schedule, not in a tight loop;
* a URL with a password (right, wrong, and one nobody listens on): the password is in no
  log line, status, ctl output or metric.
"""
from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import framebus
from services.decode.decoder import Decoder, nal_spans
from tests import ports
from tests.appliance import metric_value, wait_for

HERE = Path(__file__).parent
SERVER = HERE / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv has no gi; Debian's python3-gi is for the system python
W, H, FPS, KEY_INT = 320, 240, 30, 15
TICKS = 90000 // FPS  # one frame in RTP's 90 kHz clock


def _gstreamer_missing() -> str | None:
    check = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
             "from gi.repository import Gst, GstRtspServer; Gst.init(None);"
             "elements = ('videotestsrc', 'x264enc', 'rtph264pay', 'audiotestsrc', 'alawenc', 'rtppcmapay');"
             "missing = [e for e in elements if not Gst.ElementFactory.find(e)];"
             "print(' '.join(missing))")
    try:
        out = subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no system python with GStreamer: {exc}"
    if out.returncode != 0:
        return "GStreamer's RTSP server is not installed (python3-gi, gir1.2-gst-rtsp-server-1.0)"
    if out.stdout.strip():
        return f"GStreamer elements missing: {out.stdout.strip()}"
    return None


_MISSING = _gstreamer_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


# ----------------------------------------------------------------------------- the peers
class RtspServer:
    """tests/rtsp_server.py as a child; stop() and start() again keep the same port: one of this test
    worker's own (tests/ports.py), which nothing else takes while the server is down."""

    def __init__(self, log: Path, *args: str) -> None:
        self.args, self.log = args, log
        self.port = ports.free_port(udp=False, tcp=True)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> int:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), "--port", str(self.port), *self.args],
                                         stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
        sel.close()
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.proc.kill()
            raise AssertionError(f"the RTSP server did not start: {line!r}; stderr:\n{self.log.read_text()[-2000:]}")
        self.port = int(line)
        return self.port

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def url(self, userinfo: str = "") -> str:
        return f"rtsp://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/test"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # works on a SIGSTOPped one too
            self.proc.wait(timeout=10)
        if self.proc is not None:
            self.proc.stdout.close()


@pytest.fixture
def rtsp(tmp_path):
    """rtsp(*args) -> a started RtspServer (more arguments go to tests/rtsp_server.py)."""
    made: list[RtspServer] = []

    def make(*args: str) -> RtspServer:
        server = RtspServer(tmp_path / f"rtsp{len(made)}.log", *args)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.close()


class SilentServer:
    """Accepts TCP connections on loopback and never says a word. Records when each was
    accepted and when the client gave up (closed it), and what the client sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[dict] = []
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._done.is_set():
            for key, _ in self._sel.select(0.05):
                if key.fileobj is self.sock:
                    conn, _ = self.sock.accept()
                    rec = {"accepted": time.monotonic(), "closed": None, "got": b""}
                    self.conns.append(rec)
                    self._sel.register(conn, selectors.EVENT_READ, rec)
                else:
                    data = key.fileobj.recv(4096)
                    if data:
                        key.data["got"] += data
                    else:
                        key.data["closed"] = time.monotonic()
                        self._sel.unregister(key.fileobj)
                        key.fileobj.close()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()


def free_port() -> int:
    """A loopback port nobody listens on, nor will: this test worker's own (tests/ports.py)."""
    return ports.closed_port()


def source(name: str, url: str, transport: str = "tcp", **keys) -> str:
    """A [sources.NAME] table for a url source with small timeouts and backoff."""
    values = {"kind": "url", "url": url, "transport": transport, "connect_timeout": 1.0, "read_timeout": 1.0,
              "reconnect_min": 0.2, "reconnect_max": 1.0, "decode": False, "room": "lobby", **keys}
    return f"[sources.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


class Capture:
    """capture@NAME as a process, and the hub's view of it."""

    def __init__(self, box, name: str) -> None:
        self.box, self.name, self.id = box, name, f"capture@{name}"
        self.proc = box.spawn("service", "capture", name)

    def row(self) -> dict:
        return self.box.services().get(self.id, {})

    def up(self, timeout: float = 15.0) -> dict:
        """Running and heard by the hub (ready, or degraded when the source fails at once)."""
        return wait_for(lambda: (r := self.row()).get("state") in ("ready", "degraded") and r, timeout,
                        f"{self.id} up; log:\n{self.box.log()[-3000:]}")

    def status(self) -> str:
        return self.row().get("status", "")

    def wait_status(self, pattern: str, timeout: float = 5.0) -> str:
        return wait_for(lambda: s if re.search(pattern, s := self.status()) else None, timeout,
                        f"{self.id} status matching {pattern!r} (now {self.status()!r})", interval=0.02)

    def metric(self, name: str, page: str | None = None, **labels: str) -> float:
        return metric_value(page or self.box.scrape(), name, service=self.id, stream=self.name, **labels) or 0

    def errors(self, reason: str) -> float:
        return self.metric("edgeroom_capture_source_errors_total", reason=reason)

    def wait_metric(self, name: str, at_least: float, timeout: float = 5.0, **labels: str) -> float:
        return wait_for(lambda: (v := self.metric(name, **labels)) >= at_least and v, timeout,
                        f"{self.id} {name}{labels} >= {at_least} (now {self.metric(name, **labels)}); status "
                        f"{self.status()!r}", interval=0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None


def start(box, *names: str) -> list[Capture]:
    box.spawn("service", "hub")
    box.wait_ready("hub")
    caps = [Capture(box, n) for n in names]
    for c in caps:
        c.up()
    return caps


class Got:
    """An item read off the bus, copied out."""

    def __init__(self, item, now_ns: int) -> None:
        self.data = bytes(item.array)
        self.pts, self.capture_ns, self.flags = item.pts, item.capture_ns, item.flags
        self.keyframe, self.codec, self.time_base = item.keyframe, item.codec, item.time_base
        self.received_ns = now_ns
        self.ok = item.valid()

    def nal_types(self) -> list[int]:
        return [self.data[s] & 0x1F for s, _ in nal_spans(self.data)]


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def take(consumer: framebus.Consumer, want: int, timeout: float, after_ns: int = 0) -> list[Got]:
    """`want` items captured after `after_ns` (or fewer when `timeout` passes)."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        item = consumer.receive(timeout=0.1)
        if item is not None and item.capture_ns > after_ns:
            got = Got(item, now_ns())
            if got.ok:
                out.append(got)
    return out


def check_access_units(items: list[Got], want: int, jitter: int = 0) -> list[Got]:
    """The checks every encoded stream on the bus passes; the items from the first keyframe on.

    The test's reader attaches when the ring appears, with the first item, so it may begin a
    few items in; decoding begins at the first keyframe, as any decoder's does.
    jitter: how far (ticks) a pts step may be from one frame. With more than one stream,
    FFmpeg maps RTP time through the RTCP sender reports' NTP time, so the steps move by a
    few ticks when a report comes."""
    assert len(items) >= want, f"{len(items)} items, wanted {want}"
    assert {i.codec for i in items} == {"h264"} and {i.time_base for i in items} == {Fraction(1, 90000)}
    for n, i in enumerate(items):
        assert i.data.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")), f"item {n} is not Annex B"
        types = i.nal_types()
        assert i.keyframe == (5 in types), f"item {n}: keyframe flag {i.keyframe}, NAL units {types}"
        if i.keyframe:
            assert 7 in types and 8 in types, f"keyframe {n} without its SPS/PPS: {types}"
        assert [t for t in types if t in (1, 5)], f"item {n} holds no picture: {types}"
        assert not i.flags & framebus.FLAG_CORRUPT
    keys = [n for n, i in enumerate(items) if i.keyframe]
    assert keys and keys[0] < KEY_INT, f"keyframes at {keys}"
    assert all(b - a == KEY_INT for a, b in zip(keys, keys[1:])), f"a keyframe every {KEY_INT} items: {keys}"
    caps = [i.capture_ns for i in items]
    assert all(b > a for a, b in zip(caps, caps[1:])), "capture_ns increasing"
    assert all(i.received_ns - i.capture_ns < 2e9 for i in items), "capture_ns is this box's CLOCK_MONOTONIC"
    pts = [i.pts for i in items]
    steps = {b - a for a, b in zip(pts, pts[1:])}
    assert all(abs(step - TICKS) <= jitter for step in steps), \
        f"pts advance by one frame ({TICKS} ticks, +-{jitter}) per access unit, got steps {sorted(steps)}"
    assert not [n for n, i in enumerate(items) if i.flags & framebus.FLAG_DISCONTINUITY], \
        "a session's first items are no discontinuity"
    return items[keys[0]:]


def decode_all(items: list[Got], extradata: bytes | None) -> list:
    dec = Decoder("h264", hw="off", threads=2, extradata=extradata)
    try:
        pictures = [d.frame for i in items for d in dec.decode(i.data, pts=i.pts)]
        pictures += [d.frame for d in dec.flush()]  # also: never drop a frame-threaded decoder with work in it
    finally:
        dec.close()
    return pictures


# ----------------------------------------------------------------------------- transports
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_access_units_arrive_on_the_bus_and_decode(box, prefix, rtsp, transport):
    # the server refuses the other transport, and its 32-bit RTP clock wraps 0.8 s in
    wrap = int(0.8 * 90000)
    server = rtsp("--protocols", transport, "--rtp-offset", str(2**32 - wrap))
    b = box(source("cam1", server.url(), transport))
    with framebus.Consumer.attach("cam1", prefix=prefix, missing_ok=True, start="oldest") as c:
        t0 = time.monotonic()
        (cap,) = start(b, "cam1")
        items = take(c, 2 * KEY_INT + 1, timeout=10)
        first_after = (items[0].received_ns / 1e9 - t0) if items else None
        extradata = c.extradata()
    decodable = check_access_units(items, 2 * KEY_INT + 1)  # pts steady across the wrap: no step, no rebase
    assert items[0].pts < wrap - 9000 and items[-1].pts > wrap + 9000, "the items span the RTP clock's wrap"
    assert extradata is not None and extradata[0] == "h264"
    params = {extradata[1][s] & 0x1F for s, _ in nal_spans(extradata[1])}
    assert extradata[1].startswith(b"\x00\x00\x00\x01") and {7, 8} <= params, "the SDP's SPS/PPS as extradata"
    pictures = decode_all(decodable, extradata[1])
    assert len(pictures) == len(decodable), f"{len(decodable)} access units gave {len(pictures)} pictures"
    assert {(p.width, p.height) for p in pictures} == {(W, H)}
    cap.wait_metric("edgeroom_capture_source_up", 1)
    page = b.scrape()
    assert cap.metric("edgeroom_capture_keyframes_total", page) >= 3
    assert cap.metric("edgeroom_capture_source_errors_total", page) == 0
    # FFmpeg leaves the session's first access unit without a timestamp: it must not cost a rebase
    assert cap.metric("edgeroom_capture_timestamp_rebases_total", page) == 0
    assert re.search(rf"url h264 {W}x{H} -> h264 at \d+\.\d fps", cap.status()), cap.status()
    wait_for(lambda: cap.row()["state"] == "ready", 5, "capture ready while it delivers")
    print(f"\n{transport}: first access unit on the bus {first_after:.2f} s after the service was spawned")


def test_a_cameras_audio_arrives_as_pcm_beside_its_video(box, prefix, rtsp):
    server = rtsp("--audio")  # a second stream: a 1 kHz tone, G.711 A-law at 8 kHz
    b = box(source("mic", server.url(), audio=True))
    chunks = []
    with framebus.Consumer.attach("mic", prefix=prefix, missing_ok=True, start="oldest") as v, \
            framebus.Consumer.attach("mic-audio", prefix=prefix, missing_ok=True, start="oldest") as a:
        start(b, "mic")
        video = take(v, 2 * KEY_INT + 1, timeout=10)
        deadline = time.monotonic() + 5
        while len(chunks) < 8 and time.monotonic() < deadline:
            item = a.receive(timeout=0.1)
            if item is not None:
                row = (item.pts, item.capture_ns, item.rate, item.channels, item.array.copy())
                if item.valid():
                    chunks.append(row)
    check_access_units(video, 2 * KEY_INT + 1, jitter=90)  # 1 ms
    assert len(chunks) == 8, f"{len(chunks)} audio chunks"
    assert {(rate, ch) for _, _, rate, ch, _ in chunks} == {(8000, 1)}
    assert all(b[0] == a[0] + len(a[4]) for a, b in zip(chunks, chunks[1:])), "pts count samples, no gaps"
    assert all(b[1] > a[1] for a, b in zip(chunks, chunks[1:]))
    pcm = np.concatenate([c[4][:, 0] for c in chunks]).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(pcm))
    peak = np.fft.rfftfreq(len(pcm), 1 / 8000)[int(spectrum.argmax())]
    assert abs(peak - 1000) < 10 and np.abs(pcm).max() > 5000, f"a 1 kHz tone, got a peak at {peak:.0f} Hz"

    def tracks():
        rows = [s for s in b.call("sessions") if s["session"] == "mic"]
        found = {t["id"]: t for t in rows[0]["tracks"]} if rows else {}
        return found if {"audio", "video"} <= set(found) else None

    tracks = wait_for(tracks, 5, "the session's audio and video tracks")
    assert tracks["audio"]["rate"] == 8000 and tracks["video"]["format"] == "h264"


# ----------------------------------------------------------------------------- failures
def test_a_server_that_goes_away_and_comes_back(box, prefix, rtsp):
    server = rtsp()
    # the status shows the cause while the service waits to reopen; a reopen that is under way
    # shows the source again, so the waits here are long enough to be seen between heartbeats
    b = box(source("door", server.url(), reconnect_min=0.6, reconnect_max=1.2))
    with framebus.Consumer.attach("door", prefix=prefix, missing_ok=True, start="oldest") as c:
        (cap,) = start(b, "door")
        before = take(c, KEY_INT, timeout=10)
        assert len(before) == KEY_INT
        cap.wait_metric("edgeroom_capture_source_up", 1)

        killed = time.monotonic()
        server.stop(signal.SIGKILL)
        cap.wait_metric("edgeroom_capture_source_errors_total", 1, reason="read")
        detected = time.monotonic() - killed
        status = cap.wait_status(r"retrying in \d+\.\d s: rtsp://127\.0\.0\.1:\d+/test ended the stream")
        # while it is down: refused, counted, retried on the backoff, the status says why
        cap.wait_metric("edgeroom_capture_source_errors_total", 2, timeout=5, reason="connect")
        cap.wait_status("retrying in .*: cannot open rtsp://127.0.0.1:\\d+/test: Connection refused")
        assert cap.wait_metric("edgeroom_capture_reconnects_total", 2) >= 2
        wait_for(lambda: cap.row()["state"] == "degraded", 3, "the service degraded while its source is away")
        assert cap.alive()
        assert cap.metric("edgeroom_capture_source_up") == 0
        last = before[-1]
        while (item := c.receive(timeout=0.2)) is not None:  # what came before the server died
            last = Got(item, now_ns())

        server.start()  # the same port
        back = time.monotonic()
        after = take(c, KEY_INT, timeout=10, after_ns=int(back * 1e9))
        recovered = (after[0].received_ns / 1e9 - back) if after else None
    assert len(after) == KEY_INT, f"items flow again after the server returned (got {len(after)})"
    assert after[0].keyframe and after[0].pts > last.pts, (last.pts, after[0].pts)
    assert after[0].flags & framebus.FLAG_DISCONTINUITY, "the new session's clock restarts: marked"
    assert all(b.pts - a.pts == TICKS for a, b in zip(after, after[1:]))
    assert detected < 1.0, f"a server that died was noticed after {detected:.2f} s"
    assert recovered < 1.2 + 2.5, f"items flowed {recovered:.2f} s after the server came back (reconnect_max 1.2)"
    assert cap.wait_status(r"url h264 .* fps") and cap.alive()
    page = b.scrape()
    assert cap.metric("edgeroom_capture_source_errors_total", page, reason="read") == 1
    assert cap.metric("edgeroom_capture_reconnects_total", page) >= 2
    assert cap.wait_metric("edgeroom_capture_timestamp_rebases_total", 1) == 1, "one rebase: the reconnect"
    print(f"\nkilled server noticed in {detected:.2f} s ({status!r}); items again {recovered:.2f} s after it "
          f"came back")


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_a_stalled_server_times_out_and_a_stop_does_not_wait_for_it(box, prefix, rtsp, transport):
    server = rtsp("--protocols", transport)
    b = box(source("stall", server.url(), transport, read_timeout=1.0, reconnect_min=0.6, reconnect_max=0.6))
    with framebus.Consumer.attach("stall", prefix=prefix, missing_ok=True, start="oldest") as c:
        (cap,) = start(b, "stall")
        assert len(take(c, 5, timeout=10)) == 5
        server.signal(signal.SIGSTOP)
        stalled = time.monotonic()
        cap.wait_metric("edgeroom_capture_source_errors_total", 1, timeout=5, reason="timeout")
        detected = time.monotonic() - stalled
        status = cap.wait_status(r"retrying in .*no data for 1\.\d s")
        assert cap.alive()
        server.signal(signal.SIGCONT)
        resumed = time.monotonic()
        again = take(c, 5, timeout=10, after_ns=int(resumed * 1e9))
        recovered = time.monotonic() - resumed
        assert len(again) == 5, "items flow again once the server answers"

        # blocked in a read when told to stop: the stop takes effect within read_timeout
        server.signal(signal.SIGSTOP)
        time.sleep(0.3)  # let the reader block in the read
        mark = len(b.log())
        t = time.monotonic()
        cap.proc.send_signal(signal.SIGTERM)
        rc = cap.proc.wait(timeout=10)
        took = time.monotonic() - t
    assert rc == 0
    assert took < 1.0 + 1.0, f"stopping took {took:.2f} s with the source blocked in a read"
    assert "leaving its thread behind" not in b.log()
    assert not [s for s in framebus.list_streams(prefix) if s.stream == "stall"], "the ring went with the service"
    assert "source stall:" not in b.log()[mark:], "an error after the stop is no failure"
    assert 0.9 < detected < 1.0 + 1.0, f"a stalled server was noticed after {detected:.2f} s (read_timeout 1.0)"
    print(f"\n{transport}: stalled server noticed in {detected:.2f} s ({status!r}); items again {recovered:.2f} s "
          f"after SIGCONT; SIGTERM while blocked in a read: exited in {took:.2f} s")


def test_refused_and_silent_servers_fail_clearly_and_back_off(box, prefix):
    silent = SilentServer()
    try:
        b = box(source("nobody", f"rtsp://127.0.0.1:{free_port()}/test")
                + source("mute", f"rtsp://127.0.0.1:{silent.port}/test"))
        nobody, mute = start(b, "nobody", "mute")

        # nothing listening: refused at once, and retried on the backoff (0.2 s doubling up to 1.0 s)
        first = nobody.wait_metric("edgeroom_capture_source_errors_total", 1, reason="connect")
        since = time.monotonic()
        nobody.wait_status(r"retrying in \d\.\d s: cannot open rtsp://127\.0\.0\.1:\d+/test: Connection refused")
        # accepted, never answered: given up after connect_timeout, as the server sees it; three tries
        wait_for(lambda: len(silent.conns) >= 3 and silent.conns[1]["closed"], 10,
                 f"three tries on the silent server (so far {silent.conns})")
        mute.wait_metric("edgeroom_capture_source_errors_total", 1, reason="timeout")
        mute.wait_status(r"retrying in .*: cannot open rtsp://127\.0\.0\.1:\d+/test: no answer within 1\.\d s")
        for cap in (nobody, mute):  # (while a reopen is under way it reports ready: see the service)
            wait_for(lambda c=cap: c.row().get("state") == "degraded", 5, f"{cap.id} degraded")

        window = 3.0
        time.sleep(max(0.0, since + window - time.monotonic()))  # a measured interval, not a poll
        page = b.scrape()
        refused = nobody.metric("edgeroom_capture_source_errors_total", page, reason="connect") - first
        reconnects = nobody.metric("edgeroom_capture_reconnects_total", page)
        conns = list(silent.conns)
        assert nobody.alive() and mute.alive()
    finally:
        silent.close()
    # after a failure the waits are 0.2, 0.4, 0.8, 1.0, 1.0 s: 3 to 5 tries fit in any 3 s (a tight
    # loop would make thousands)
    assert 2 <= refused <= 6, f"{refused:.0f} refused tries in {window} s"
    assert reconnects >= first + refused - 1
    waited = [c["closed"] - c["accepted"] for c in conns[:2]]
    assert all(0.95 < w < 1.0 + 0.5 for w in waited), f"the silent server was given up on after {waited} s"
    assert all(c["got"].startswith(b"OPTIONS rtsp://127.0.0.1:") for c in conns[:3]), conns[0]["got"][:80]
    gaps = [b["accepted"] - a["accepted"] for a, b in zip(conns, conns[1:3])]
    assert 1.0 + 0.2 <= gaps[0] and gaps[0] + 0.15 < gaps[1], f"tries {gaps} s apart: 1 s each, then 0.2, 0.4 s"
    print(f"\nrefused: {refused:.0f} more tries in {window} s after the first; silent: given up after "
          f"{', '.join(f'{w:.2f}' for w in waited)} s, tries {', '.join(f'{g:.2f}' for g in gaps)} s apart")


def test_a_password_never_shows(box, prefix, rtsp):
    secret, wrong, other = "Pa55-SECRET-one", "WRONG-SECRET-two", "Pa55-SECRET-three"
    server = rtsp("--user", "viewer", "--password", secret)
    b = box(source("priv", server.url(f"viewer:{secret}"))
            + source("deny", server.url(f"viewer:{wrong}"))
            + source("gone", f"rtsp://viewer:{other}@127.0.0.1:{free_port()}/test"))
    with framebus.Consumer.attach("priv", prefix=prefix, missing_ok=True, start="oldest") as c:
        priv, deny, gone = start(b, "priv", "deny", "gone")
        assert len(take(c, 5, timeout=10)) == 5, "the right password lets the stream through"
    deny.wait_metric("edgeroom_capture_source_errors_total", 1, reason="http")
    denied = deny.wait_status(r"cannot open rtsp://viewer:\*\*\*@127\.0\.0\.1:\d+/test: .*401 Unauthorized")
    gone.wait_metric("edgeroom_capture_source_errors_total", 1, reason="connect")
    refused = gone.wait_status(r"cannot open rtsp://viewer:\*\*\*@127\.0\.0\.1:\d+/test: Connection refused")
    wait_for(lambda: "source deny:" in b.log() and "source gone:" in b.log(), 5, "the failures logged")

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
    env["EDGEROOM_CONFIG"] = str(b.config)
    shown = [subprocess.run([sys.executable, "-m", "services.cli", "ctl", *args], capture_output=True, text=True,
                            env=env, timeout=30) for args in (["status"], ["status", "--json"], ["sessions"])]
    assert all(r.returncode == 0 for r in shown), [r.stderr for r in shown]
    texts = {"log": b.log(), "status rows": json.dumps(b.services()), "metrics": b.scrape(),
             **{f"ctl {i}": r.stdout + r.stderr for i, r in enumerate(shown)}}
    assert "viewer:***@" in texts["log"] and "viewer:***@" in texts["ctl 0"]
    for where, text in texts.items():
        for word in (secret, wrong, other):
            assert word not in text, f"{word} shows in the {where}"
    assert priv.alive() and deny.alive() and gone.alive()
    print(f"\nstatus: {denied!r}\nstatus: {refused!r}")
