"""encode@NAME as a real process: raw pictures in, H.264 or VP8 access units out on NAME, checked by
decoding what it published (PyAV, ffprobe) and reading back the frame number drawn into every picture.

Two kinds of input: a real box (`edgeroom run`: a raw synthetic camera, or an H.264 one and its
decode@), and the test itself as the producer of the input stream (pictures of every format and
size, access units instead of pictures, a producer SIGKILLed), with encode@ and the hub as the only
services. A thread reads the encoder's output stream from its first access unit on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

import framebus
from framebus.formats import picture_geometry
from services.capture.sources.synthetic import Pattern, frame_number
from services.decode.decoder import nal_spans
from services.recorder import encoder as encoders
from tests.appliance import Box, metric_value, wait_for

PERIOD_NS = 1_000_000_000 / 30
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class AU:
    data: bytes
    keyframe: bool
    codec: str
    pts: int
    time_base: Fraction
    capture_ns: int
    publish_ns: int
    width: int
    height: int
    flags: int


class Reader(threading.Thread):
    """Every access unit of `stream` from the first one the ring holds, copied (and checked whole)."""

    def __init__(self, prefix: str, stream: str) -> None:
        super().__init__(daemon=True)
        self.prefix, self.stream = prefix, stream
        self.aus: list[AU] = []
        self.torn = 0
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        with framebus.Consumer.attach(self.stream, prefix=self.prefix, missing_ok=True, start="oldest") as c:
            while not self._halt.is_set():
                item = c.receive(timeout=0.05)
                if item is None:
                    continue
                au = AU(bytes(item.array), item.keyframe, item.codec or item.kind, item.pts, item.time_base,
                        item.capture_ns, item.publish_ns, item.width, item.height, item.flags)
                if item.valid():
                    self.aus.append(au)
                else:
                    self.torn += 1
            self.missed = c.missed

    def wait(self, n: int, timeout: float) -> list[AU]:
        wait_for(lambda: len(self.aus) >= n, timeout, f"{n} access units on {self.stream} (have {len(self.aus)})")
        return list(self.aus)

    def stop(self) -> list[AU]:
        self._halt.set()
        self.join(5)
        return list(self.aus)


def decode(aus: list[AU], codec: str, size: tuple[int, int] | None = None) -> list[int]:
    """The frame number of every picture the access units decode to, in order (luma scaled to `size`
    first: the number's blocks are drawn at the input's size)."""
    dec = av.CodecContext.create(codec, "r")
    frames = []
    for au in aus:
        frames += dec.decode(av.Packet(au.data))
    frames += dec.decode(None)
    out = []
    for f in frames:
        luma = f.to_ndarray(format="gray")
        if size is not None and (luma.shape[1], luma.shape[0]) != size:
            luma = cv2.resize(luma, size, interpolation=cv2.INTER_AREA if luma.shape[1] > size[0] else cv2.INTER_LINEAR)
        out.append(frame_number(luma))
    return out


def nal_types(data: bytes) -> list[int]:
    return [data[s] & 0x1F for s, _ in nal_spans(data)]


def ffprobe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_name,profile,has_b_frames,width,height,nb_read_frames", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"][0]


def scraped(b: Box, name: str, **labels: str) -> float | None:
    return metric_value(b.scrape(), name, **labels)


def wait_status(b: Box, service: str, text: str, timeout: float = 10.0) -> dict:
    def row():
        r = b.services().get(service, {})
        return r if text in r.get("status", "") else None
    return wait_for(row, timeout, f"{service} status with {text!r} (now {b.services().get(service)})")


# ---------------------------------------------------------------------- a real box
def test_a_raw_camera_encoded_to_h264_every_picture_in_order_baseline_no_b_frames(box, tmp_path):
    b = box('[encoders.call]\ninput = "cam"\nbitrate = 600\ngop = 1.0\n')  # cam: rgb24 320x240 at 30 fps
    reader = Reader(b.prefix, "call")
    b.run()
    rows = b.wait_ready("capture@cam", "encode@call")
    aus = reader.wait(100, 20)
    reader.stop()
    assert {(a.codec, a.width, a.height) for a in aus} == {("h264", 320, 240)}
    # the picture's own timing rides along: the synthetic camera's pts is its capture time in ns
    assert all(a.pts == a.capture_ns and a.time_base == Fraction(1, 10**9) for a in aus)
    assert all(a.publish_ns >= a.capture_ns for a in aus)
    numbers = decode(aus, "h264")
    assert len(numbers) == len(aus)
    # each access unit is the picture its capture time says (the camera draws picture n at t0 + n / fps)...
    assert [round((a.capture_ns - aus[0].capture_ns) / PERIOD_NS) for a in aus] == \
        [n - numbers[0] for n in numbers]
    # ...and every picture came, in order (a gap would be one the camera itself dropped, counted as late)
    late = scraped(b, "edgeroom_capture_dropped_frames_total", stream="cam", reason="late") or 0
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), f"camera late drops: {late}"
    keys = [i for i, a in enumerate(aus) if a.keyframe]
    assert keys[0] == 0 and len(keys) >= 3
    for i in keys:
        types = nal_types(aus[i].data)
        assert types[:2] == [7, 8] and 5 in types, f"keyframe {i}: NAL types {types}"
    gaps = [(aus[j].capture_ns - aus[i].capture_ns) / 1e9 for i, j in zip(keys, keys[1:])]
    assert all(abs(g - 1.0) < 0.04 for g in gaps), gaps  # gop = 1.0 s of capture time
    path = tmp_path / "call.h264"
    path.write_bytes(b"".join(a.data for a in aus))
    info = ffprobe(path)
    assert info["profile"] == "Constrained Baseline" and info["has_b_frames"] == 0
    assert int(info["nb_read_frames"]) == len(aus)
    row = b.services()["encode@call"]
    assert "(software: libx264)" in row["status"] and "cam -> h264 320x240" in row["status"]
    assert rows["encode@call"]["restarts"] == 0
    page = b.scrape()
    assert metric_value(page, "edgeroom_encode_hardware", stream="call", backend="libx264") == 0.0
    assert not metric_value(page, "edgeroom_encode_dropped_frames_total", stream="call", reason="missed")
    streams = {s["stream"]: s for s in b.call("streams")}
    assert streams["call"]["service"] == "encode@call" and streams["call"]["kind"] == "encoded"


def test_a_decoded_stream_encoded_to_vp8_at_half_the_size(box, tmp_path):
    """An H.264 camera, its decode@ (yuv420p on cam-raw), encoded to VP8 at half the size (scaled plane by
    plane): every picture decodes, in order."""
    b = box('[encoders.vp]\ninput = "cam-raw"\ncodec = "vp8"\nwidth = 160\nbitrate = 300\n')
    b.set_source("cam", 'kind = "synthetic"\nwidth = 320\nheight = 240\nfps = 30.0\nroom = "lobby"\nencode = "h264"')
    reader = Reader(b.prefix, "vp")
    b.run()
    b.wait_ready("capture@cam", "decode@cam", "encode@vp")
    aus = reader.wait(60, 20)
    reader.stop()
    assert {(a.codec, a.width, a.height) for a in aus} == {("vp8", 160, 120)}
    assert aus[0].keyframe and all((a.data[0] & 1) == (0 if a.keyframe else 1) for a in aus)
    numbers = decode(aus, "vp8", size=(320, 240))
    assert len(numbers) == len(aus) and numbers == sorted(set(numbers))  # every access unit a picture, in order
    # decode@ starts with a burst (the camera's ring history, decoded as fast as it can) while the encoder
    # opens: encode jumps to the newest picture then, and counts what it jumped over; never a silent gap
    gaps = numbers[-1] - numbers[0] + 1 - len(numbers)
    page = b.scrape()
    counted = sum(metric_value(page, "edgeroom_encode_dropped_frames_total", stream="vp", reason=r) or 0
                  for r in ("late", "missed"))
    assert gaps <= counted, f"{gaps} pictures missing, {counted} counted"
    assert numbers[-30:] == list(range(numbers[-30], numbers[-30] + 30))  # running: every picture
    with av.open(str(tmp_path / "vp.ivf"), "w", format="ivf") as out:  # ffprobe reads what a peer would
        st = out.add_stream("vp8")
        st.width, st.height, st.time_base = 160, 120, Fraction(1, 30)
        for i, a in enumerate(aus):
            p = av.Packet(a.data)
            p.stream, p.pts, p.dts, p.time_base = st, i, i, Fraction(1, 30)
            p.is_keyframe = a.keyframe
            out.mux(p)
    info = ffprobe(tmp_path / "vp.ivf")
    assert info["codec_name"] == "vp8" and int(info["nb_read_frames"]) == len(aus)
    assert "cam-raw -> vp8 160x120" in b.services()["encode@vp"]["status"]
    assert "(software: libvpx)" in b.services()["encode@vp"]["status"]


def test_ctl_keyframe_gives_an_idr_within_one_frame(box):
    """The camera's GOP and the encoder's are a minute: every keyframe after the first came from a request."""
    b = box('[encoders.call]\ninput = "cam"\ngop = 60.0\n')
    reader = Reader(b.prefix, "call")
    b.run()
    b.wait_ready("capture@cam", "encode@call")
    reader.wait(20, 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
    env["EDGEROOM_CONFIG"] = str(b.config)
    cli = subprocess.run([sys.executable, "-m", "services.cli", "ctl", "keyframe", "call", "--reason", "a test"],
                         capture_output=True, text=True, env=env, timeout=30, cwd=ROOT)
    assert cli.returncode == 0 and "keyframe asked for (idr)" in cli.stdout, cli.stdout + cli.stderr
    wait_for(lambda: sum(a.keyframe for a in reader.aus) >= 2, 5, "the requested IDR")
    # now timed, from here: one request, the IDR is the next picture encoded
    time.sleep(0.6)  # past the throttle
    count = len(reader.aus)
    asked = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    answer = b.call("keyframe", {"stream": "call", "reason": "timed"})
    assert answer["made"] is True and answer["how"] == "idr" and answer["throttled"] is False
    assert b.call("keyframe", {"stream": "call"})["throttled"] is True  # a second reader: the same IDR serves
    wait_for(lambda: any(a.keyframe for a in reader.aus[count:]), 3, "the IDR after the timed request")
    time.sleep(0.3)
    aus = reader.stop()
    after = [a for a in aus[count:] if a.publish_ns > asked]
    idr = next(i for i, a in enumerate(after) if a.keyframe)
    assert idr <= 1, f"the IDR was access unit {idr} after the request (the one being encoded may come first)"
    assert sum(a.keyframe for a in after) == 1  # two requests, one IDR
    assert (after[idr].publish_ns - asked) / 1e9 < 0.25
    assert nal_types(after[idr].data)[:2] == [7, 8]

    def satisfied() -> str | None:
        page = b.scrape()
        return page if metric_value(page, "edgeroom_keyframe_satisfied_total", stream="call") == 2.0 else None
    page = wait_for(satisfied, 5, "both requests satisfied")
    # the encoder's side: from a request reaching it to the IDR on the bus, within one frame interval (+ encoding)
    took = metric_value(page, "edgeroom_keyframe_seconds_sum", stream="call") / 2
    assert took < 1 / 30 + 0.02, f"request to IDR took {took * 1000:.1f} ms on average"
    assert metric_value(page, "edgeroom_keyframe_requests_total", stream="call", outcome="throttled") == 1.0


# ---------------------------------------------------------------------- the test as the producer
class Feed:
    """The encoder's input, made by this test: pictures with their frame number drawn, paced at 30 fps,
    each phase a new ring (a new producer generation), as decode makes one when the size changes."""

    def __init__(self, prefix: str, stream: str = "feed") -> None:
        self.prefix, self.stream = prefix, stream
        self.n = 0
        self.producer: framebus.Producer | None = None
        self.starts: list[tuple[int, str, int, int]] = []  # (first frame number, format, width, height)

    def phase(self, fmt: str, w: int, h: int, count: int) -> None:
        self.close()
        self.producer = framebus.Producer.create(self.stream, "video", payload=picture_geometry(fmt, w, h).size,
                                                 slots=8, prefix=self.prefix)
        self.starts.append((self.n, fmt, w, h))
        pattern, rgb = Pattern(w, h), np.empty((h, w, 3), np.uint8)
        t0 = time.monotonic()
        for i in range(count):
            pattern.draw(rgb, self.n)
            loan = self.producer.loan_picture(w, h, fmt)
            _draw(loan.planes, rgb, fmt)
            loan.send(pts=self.n, time_base=(1, 30), capture_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
            self.n += 1
            time.sleep(max(0.0, t0 + (i + 1) / 30 - time.monotonic()))

    def access_units(self, count: int) -> None:
        """Encoded items on the input: not pictures."""
        self.close()
        self.producer = framebus.Producer.create(self.stream, "encoded", payload=4096, slots=8, prefix=self.prefix)
        for i in range(count):
            self.producer.publish_encoded(b"\x00\x00\x00\x01\x09\xf0", "h264", keyframe=False, pts=i)
            time.sleep(1 / 30)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
            self.producer = None


def _draw(planes, rgb: np.ndarray, fmt: str) -> None:
    h, w = rgb.shape[:2]
    if fmt == "rgb24":
        np.copyto(planes[0], rgb)
        return
    if fmt == "gray":
        np.copyto(planes[0], cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        return
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    cw, ch = w // 2, h // 2
    y, u, v = i420[: w * h].reshape(h, w), i420[w * h: w * h + cw * ch].reshape(ch, cw), \
        i420[w * h + cw * ch:].reshape(ch, cw)
    np.copyto(planes[0], y)
    if fmt == "yuv420p":
        np.copyto(planes[1], u)
        np.copyto(planes[2], v)
    else:  # nv12
        np.copyto(planes[1][..., 0], u)
        np.copyto(planes[1][..., 1], v)


KILLABLE = r'''
import sys, time
sys.path.insert(0, sys.argv[2])
import numpy as np, framebus
from services.capture.sources.synthetic import Pattern
p = framebus.Producer.create("feed", "video", payload=320 * 240 * 3, slots=8, prefix=sys.argv[1])
pattern, n = Pattern(320, 240), int(sys.argv[3])
print("ready", flush=True)
while True:
    loan = p.loan_picture(320, 240, "rgb24")
    pattern.draw(loan.array, n)
    loan.send(pts=n, time_base=(1, 30), capture_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    n += 1
    time.sleep(1 / 30)
'''


def test_bad_input_missing_changing_not_pictures_and_a_dead_producer(box):
    b = box('[encoders.call]\ninput = "feed"\ngop = 60.0\n'
            '[encoders.nv]\ninput = "feed"\nhw_encode = "h264_nvenc"\n')
    b.spawn("service", "hub")
    b.wait_ready("hub")
    enc = b.spawn("service", "encode", "call")
    b.spawn("service", "encode", "nv")
    b.wait_ready("encode@call", "encode@nv")
    wait_status(b, "encode@call", "waiting for stream feed")
    reader = Reader(b.prefix, "call")
    feed = Feed(b.prefix)
    try:
        # every change of size or format: the encoder reopened, an IDR, nothing lost
        phases = [("rgb24", 320, 240), ("nv12", 320, 240), ("yuv420p", 640, 480), ("gray", 322, 242),
                  ("rgb24", 321, 241), ("rgb24", 320, 240)]
        sizes = {}
        for fmt, w, h in phases:
            first = feed.n
            feed.phase(fmt, w, h, 20)
            got = reader.wait(feed.n, 10)
            sizes[first] = (got[first].width, got[first].height)
        assert list(sizes.values()) == [(320, 240), (320, 240), (640, 480), (322, 242), (320, 240), (320, 240)]
        aus = list(reader.aus)
        numbers = decode(aus, "h264")
        assert numbers == list(range(feed.n)), numbers
        keys = [i for i, a in enumerate(aus) if a.keyframe]
        assert keys == [0, 20, 40, 60, 80], keys  # the last phase: same output, same encoder, no IDR needed
        assert [i for i, a in enumerate(aus) if a.flags & framebus.FLAG_DISCONTINUITY] == [20, 40, 60, 80, 100]
        assert all(a.pts == i for i, a in enumerate(aus))  # the input's pts, carried
        page = b.settled_scrape("encode@call")  # its last pictures may follow its last heartbeat
        assert [metric_value(page, f"edgeroom_encode_{n}_total", stream="call")
                for n in ("reopens", "frames_in", "frames_out")] == [5.0, 120.0, 120.0]

        # access units where pictures belong: said and counted, nothing published
        feed.access_units(10)
        wait_status(b, "encode@call", "feed carries h264 access units, not pictures")
        wait_for(lambda: (scraped(b, "edgeroom_encode_dropped_frames_total", stream="call",
                                  reason="not_pictures") or 0) >= 5, 5, "not_pictures counted")
        assert len(reader.aus) == 120
        feed.close()

        # a producer that dies: said; a new one: encoding goes on, the first access unit marked
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, b.prefix, str(ROOT), str(feed.n)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        reader.wait(130, 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_status(b, "encode@call", "input feed stalled (its producer died)", timeout=5)
        at = len(reader.aus)
        feed.n = 1000
        feed.phase("rgb24", 320, 240, 15)
        aus = reader.wait(at + 15, 10)
        assert "stalled" not in b.services()["encode@call"]["status"]
        assert aus[at].flags & framebus.FLAG_DISCONTINUITY and aus[at].pts == 1000
        assert decode(aus, "h264")[-15:] == list(range(1000, 1015))
        assert enc.poll() is None and b.services()["encode@call"]["state"] == "ready"
        # a named hardware encoder that cannot encode here: software, and it says why
        row = b.services()["encode@nv"]
        if encoders.probe("h264_nvenc", 320, 240) is not None:
            assert "(software: libx264, h264_nvenc unusable)" in row["status"], row
            assert metric_value(b.scrape(), "edgeroom_encode_hardware", stream="nv", backend="libx264") == 0.0
        else:
            assert "(hardware: h264_nvenc)" in row["status"], row
    finally:
        feed.close()
        reader.stop()
