"""The webcam source and the camera list, on a machine with no camera.

What is and is not a real V4L2 check here (each test's docstring says which it is):

* REAL V4L2, on this machine: that listing finds nothing and returns at once when the box
  has no /sys/class/video4linux and no /dev/video*; that a missing device fails promptly,
  naming the device, with OpenCV's real V4L2 backend never reached or printing nothing;
  that the capture service process keeps running, shows the cause and backs off.
* REAL KERNEL, NOT A CAMERA: a regular file standing in for a device node gets a real
  VIDIOC_QUERYCAP ioctl, which the kernel refuses with ENOTTY.
* SIMULATED: a camera's QUERYCAP answer (fcntl.ioctl replaced by one that fills the
  struct as uvcvideo would), permission denied, and "busy" (OpenCV's real V4L2 open fails
  on a regular file held open by another process; a real driver's EBUSY is not produced).
* REAL OPENCV READ PATH, NOT V4L2: frames go through the same WebcamSource code
  (grab, retrieve into the loaned slot, send) with OpenCV's FFmpeg backend reading an
  MJPEG file, or its image-sequence backend reading PNGs whose size changes mid-stream.

Not tested here (needs a camera or v4l2loopback): mode negotiation (size, fps, MJPG),
a real driver's EBUSY, unplugging mid-stream, and the cost of a V4L2 grab.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import framebus
from services.capture import cameras
from services.capture.cameras import CAP_META_CAPTURE, CAP_VIDEO_CAPTURE, VIDIOC_QUERYCAP, list_cameras
from services.capture.sink import Sink, SinkMetrics
from services.capture.sources import SourceError, webcam
from services.capture.sources.synthetic import Pattern, frame_number
from services.capture.sources.webcam import WebcamConfig, WebcamSource
from tests.appliance import Box, metric_value, wait_for

cv2 = pytest.importorskip("cv2")
av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parent.parent
NO_V4L2 = not os.path.isdir("/sys/class/video4linux") and not any(n.startswith("video") for n in os.listdir("/dev"))
CAP_STREAMING, CAP_DEVICE_CAPS = 0x04000000, 0x80000000


def webcam_cfg(**kw) -> WebcamConfig:
    return WebcamConfig(**{"kind": "webcam", "device": "/dev/video99", "width": 320, "height": 240, "fps": 30.0,
                           **kw})


# ---------------------------------------------------------------- a sink that also remembers
class _Count:
    def __init__(self) -> None:
        self.value = 0.0
        self.by: dict[str, _Count] = {}

    def inc(self, n: float = 1) -> None:
        self.value += n

    def observe(self, _v: float) -> None:
        self.value += 1

    def labels(self, reason: str) -> _Count:
        return self.by.setdefault(reason, _Count())


class RecordingSink(Sink):
    """The real sink (real rings on the bus), noting each picture as it is sent, paced so a
    reader on the bus sees every item."""

    def __init__(self, stream: str, prefix: str, pace: float = 0.0) -> None:
        super().__init__(stream, prefix, SinkMetrics(*(_Count() for _ in range(7))))
        self.sent: list[dict] = []
        self.pace = pace

    def send_picture(self, loan, *, pts, time_base, capture_ns, discontinuity=False) -> None:
        a = loan.array
        self.sent.append({"w": loan.array.shape[1], "h": loan.array.shape[0], "pts": pts, "tb": time_base,
                          "capture_ns": capture_ns, "pixel": a[a.shape[0] // 2, 2].copy(),
                          "number": frame_number(a), "in_slot": True})
        super().send_picture(loan, pts=pts, time_base=time_base, capture_ns=capture_ns, discontinuity=discontinuity)
        if self.pace:
            time.sleep(self.pace)


class Reader(threading.Thread):
    """Everything on stream NAME, as it arrives (following new rings), copied out."""

    def __init__(self, prefix: str, name: str) -> None:
        super().__init__(daemon=True)
        self.c = framebus.Consumer.attach(name, prefix=prefix, missing_ok=True)
        self.items: list[dict] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            item = self.c.receive(timeout=0.05)
            if item is None:
                continue
            row = {"w": item.width, "h": item.height, "format": item.format, "pts": item.pts,
                   "tb": item.time_base, "capture_ns": item.capture_ns, "pixel": item.array[item.height // 2, 2].copy(),
                   "number": frame_number(item.array)}
            if item.valid():
                self.items.append(row)

    def close(self) -> list[dict]:
        self.done.set()
        self.join(5)
        self.c.close()
        return self.items


def run_until_end(src: WebcamSource, sink: Sink, timeout: float = 10.0) -> SourceError:
    """Run the source on a thread like the service does; the SourceError its input's end raises."""
    out: dict = {}

    def body():
        try:
            out["ret"] = src.run(sink, threading.Event(), lambda *_: None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["exc"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the source did not return"
    assert isinstance(out.get("exc"), SourceError), out
    return out["exc"]


def mjpeg_file(path: Path, n: int, w: int, h: int) -> Path:
    """n pattern pictures numbered 0..n-1 (black/white blocks), the left half pure blue, as MJPEG in AVI."""
    pattern = Pattern(w, h)
    with av.open(str(path), "w") as out:
        s = out.add_stream("mjpeg", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuvj420p"
        s.options = {"q:v": "2"}
        rgb = np.empty((h, w, 3), np.uint8)
        for i in range(n):
            pattern.draw(rgb, i)
            rgb[h // 4:, : w // 2] = (0, 0, 255)   # RGB blue, below the number blocks
            for pkt in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


# ---------------------------------------------------------------- list_cameras
def test_list_cameras_on_this_machine_is_prompt():
    """REAL V4L2 (this box): the real /sys/class/video4linux and /dev, in well under a second;
    [] when the box has no V4L2 device (this build machine), and the CLI says so."""
    t0 = time.monotonic()
    rows = list_cameras()
    took = time.monotonic() - t0
    assert took < 1.0, f"list_cameras took {took:.2f} s"
    for r in rows:
        assert set(r) >= {"device", "index", "name", "driver", "bus", "capture", "error"}
    if NO_V4L2:
        assert rows == []
        out = subprocess.run([sys.executable, "-m", "services.capture.cameras", "--json"], capture_output=True,
                             text=True, timeout=10, cwd=ROOT)
        assert out.returncode == 0 and json.loads(out.stdout) == [], out.stderr
        text = subprocess.run([sys.executable, "-m", "services.capture.cameras"], capture_output=True, text=True,
                              timeout=10, cwd=ROOT).stdout
        assert "no V4L2 devices" in text


def test_list_cameras_on_a_fake_tree_reports_errors_not_raises(tmp_path):
    """REAL KERNEL, NOT A CAMERA: regular files stand in for device nodes, so the real
    VIDIOC_QUERYCAP ioctl fails with ENOTTY; nodes the kernel lists without a /dev entry,
    and /dev entries without a sysfs one, are listed too, in index order."""
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    for n, name, index in ((0, "HD Webcam C525", 0), (1, "HD Webcam C525", 1), (3, "Gone Cam", 0)):
        (sysfs / f"video{n}").mkdir(parents=True)
        (sysfs / f"video{n}" / "name").write_text(name + "\n")
        (sysfs / f"video{n}" / "index").write_text(f"{index}\n")
    (sysfs / "v4l-subdev0").mkdir()     # not a videoN node: ignored
    dev.mkdir()
    for n in (0, 1, 2, 10):
        (dev / f"video{n}").write_bytes(b"")
    t0 = time.monotonic()
    rows = list_cameras(str(sysfs), str(dev))
    assert time.monotonic() - t0 < 1.0
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 10]
    assert [r["device"] for r in rows] == [str(dev / f"video{n}") for n in (0, 1, 2, 3, 10)]
    by = {r["index"]: r for r in rows}
    assert by[0]["name"] == by[1]["name"] == "HD Webcam C525" and by[3]["name"] == "Gone Cam"
    assert by[2]["name"] == "" and by[0]["node"] == 0 and by[1]["node"] == 1
    for n in (0, 1, 2, 10):
        assert "not a V4L2 device" in by[n]["error"] and os.strerror(errno.ENOTTY) in by[n]["error"], by[n]
        assert by[n]["capture"] is False and by[n]["driver"] == ""
    assert "no device node" in by[3]["error"]
    out = subprocess.run([sys.executable, "-m", "services.capture.cameras", "--sysfs", str(sysfs), "--dev", str(dev)],
                         capture_output=True, text=True, timeout=10, cwd=ROOT)
    assert out.returncode == 0 and "HD Webcam C525" in out.stdout and "not a V4L2 device" in out.stdout


def test_querycap_answer_of_a_uvc_camera_is_read_right(tmp_path, monkeypatch):
    """SIMULATED: fcntl.ioctl answers VIDIOC_QUERYCAP the way uvcvideo does for a camera's two
    nodes (capabilities = the device's union, device_caps = this node's): the video node is
    a capture device, the metadata node is listed with capture False. Also: the request number
    is the kernel's (0x80685600)."""
    assert VIDIOC_QUERYCAP == 0x80685600
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    for n in (0, 1):
        (sysfs / f"video{n}").mkdir(parents=True)
        (sysfs / f"video{n}" / "name").write_text("HD Webcam C525\n")
        (dev / f"video{n}").write_bytes(b"")
    union = CAP_VIDEO_CAPTURE | CAP_META_CAPTURE | CAP_STREAMING | CAP_DEVICE_CAPS
    node_caps = {0: CAP_VIDEO_CAPTURE | CAP_STREAMING, 1: CAP_META_CAPTURE | CAP_STREAMING}
    real_ioctl = cameras.fcntl.ioctl

    def fake_ioctl(fd, request, buf, mutate=True):
        if request != VIDIOC_QUERYCAP:
            return real_ioctl(fd, request, buf, mutate)
        n = int(os.readlink(f"/proc/self/fd/{fd}")[-1])
        buf[:] = cameras._CAPABILITY.pack(b"uvcvideo", b"HD Webcam C525", b"usb-0000:00:14.0-1", 0x60800, union,
                                          node_caps[n])
        return 0

    monkeypatch.setattr(cameras.fcntl, "ioctl", fake_ioctl)
    rows = list_cameras(str(sysfs), str(dev))
    assert [(r["index"], r["capture"], r["driver"], r["bus"], r["error"]) for r in rows] == [
        (0, True, "uvcvideo", "usb-0000:00:14.0-1", ""), (1, False, "uvcvideo", "usb-0000:00:14.0-1", "")]


@pytest.mark.parametrize("code, words", [(errno.EACCES, "video group"), (errno.EPERM, "DeviceAllow")])
def test_permission_denied_says_what_to_do(tmp_path, monkeypatch, code, words):
    """SIMULATED (tests run as root here, so a real refusal cannot be had): the open refused
    with EACCES (file permissions: join the video group) or EPERM (a device cgroup: systemd's
    DeviceAllow= or a container, which the group does not fix)."""
    (tmp_path / "video0").write_bytes(b"")

    def denied(path):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(cameras, "querycap", denied)
    [row] = list_cameras(str(tmp_path / "nosys"), str(tmp_path))
    assert "permission denied" in row["error"] and words in row["error"], row


# ---------------------------------------------------------------- WebcamSource: failures
def test_a_missing_device_fails_promptly_naming_it_and_prints_nothing(capfd):
    """REAL V4L2 (this box): /dev/video99 and index 7 do not exist. Each open attempt fails
    with SourceError("device") naming the device in well under 2 s, and repeated attempts
    (the service's retries) print nothing to stderr: neither ours nor OpenCV's warnings."""
    for device, path in (("/dev/video99", "/dev/video99"), ("7", "/dev/video7")):
        src = WebcamSource(webcam_cfg(device=device))
        assert src.describe() == f"{path} (asking 320x240 at 30 fps)"
        for _ in range(5):
            t0 = time.monotonic()
            with pytest.raises(SourceError) as err:
                src.run(None, threading.Event(), lambda *_: None)
            assert time.monotonic() - t0 < 2.0
            assert err.value.reason == "device"
            assert path in str(err.value) and "no such device" in str(err.value)
            if NO_V4L2:
                assert "no V4L2 capture device on this box" in str(err.value)
    # OpenCV's own V4L2 open, asked directly in this process, stays quiet too (our log level)
    assert cv2.VideoCapture("/dev/video99", cv2.CAP_V4L2).isOpened() is False
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == "", captured


def test_a_node_that_is_not_v4l2_is_refused_before_opencv(tmp_path):
    """REAL KERNEL, NOT A CAMERA: a regular file as the device: the real QUERYCAP says ENOTTY."""
    node = tmp_path / "video0"
    node.write_bytes(b"\0" * 100)
    with pytest.raises(SourceError) as err:
        WebcamSource(webcam_cfg(device=str(node))).run(None, threading.Event(), lambda *_: None)
    assert err.value.reason == "device" and "is not a V4L2 device" in str(err.value) and str(node) in str(err.value)


def test_a_metadata_node_is_refused_naming_it(tmp_path, monkeypatch):
    """SIMULATED QUERYCAP answer: a node without the capture capability (a UVC metadata node)."""
    node = tmp_path / "video1"
    node.write_bytes(b"")
    monkeypatch.setattr(webcam, "querycap", lambda p: {"card": "HD Webcam C525", "capture": False})
    with pytest.raises(SourceError) as err:
        WebcamSource(webcam_cfg(device=str(node))).run(None, threading.Event(), lambda *_: None)
    assert "is not a video capture node" in str(err.value) and "HD Webcam C525" in str(err.value)


def test_a_device_held_by_another_process_is_reported_busy_with_the_holder(tmp_path, monkeypatch, capfd):
    """SIMULATED busy: the node passes our QUERYCAP check (patched), OpenCV's real V4L2 open
    then fails on it (a regular file), and another process has it open: the message names
    that process. A real driver's EBUSY is not produced here. Nothing on stderr."""
    node = tmp_path / "video0"
    node.write_bytes(b"")
    monkeypatch.setattr(webcam, "querycap", lambda p: {"card": "cam", "capture": True})
    with open(node, "rb") as f:
        holder = subprocess.Popen(["sleep", "30"], stdin=f)
    try:
        wait_for(lambda: webcam.holders(str(node)), 5, "the holder to show in /proc")
        t0 = time.monotonic()
        with pytest.raises(SourceError) as err:
            WebcamSource(webcam_cfg(device=str(node))).run(None, threading.Event(), lambda *_: None)
        assert time.monotonic() - t0 < 2.0
    finally:
        holder.kill()
        holder.wait()
    assert err.value.reason == "device"
    assert f"{node} is busy: held open by {holder.pid} (sleep)" in str(err.value)
    with pytest.raises(SourceError) as err:
        WebcamSource(webcam_cfg(device=str(node))).run(None, threading.Event(), lambda *_: None)
    assert "OpenCV could not set it up" in str(err.value)
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------- the capture service
def test_capture_service_with_a_missing_webcam_stays_up_and_backs_off(prefix):
    """REAL V4L2 + REAL PROCESSES: `edgeroom service capture cam` (with a hub) on
    [sources.cam] kind = "webcam", device = "/dev/video99". The process stays up (same pid,
    no restart), `edgeroom ctl status --json` shows it degraded with the cause, and
    edgeroom_capture_source_errors_total{reason="device"} grows at the backoff's pace
    (0.1 s doubling to 0.4 s: about 2.5 a second, not a tight loop). Its log has our
    throttled warning and no OpenCV output. SIGTERM stops it at once."""
    b = Box(prefix)
    try:
        b.set_source("cam", 'kind = "webcam"\ndevice = "/dev/video99"\nroom = "lobby"\nreconnect_min = 0.1\n'
                            'reconnect_max = 0.4')
        b.spawn("service", "hub")
        b.wait_ready("hub")
        proc = b.spawn("service", "capture", "cam")
        wait_for(lambda: b.services().get("capture@cam", {}).get("state") == "degraded", 10,
                 f"capture@cam degraded; log:\n{b.log()[-2000:]}")

        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
        env["EDGEROOM_CONFIG"] = str(b.config)
        out = subprocess.run([sys.executable, "-m", "services.cli", "ctl", "status", "--json"], capture_output=True,
                             text=True, timeout=10, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        row = {s["service"]: s for s in json.loads(out.stdout)["services"]}["capture@cam"]
        assert row["state"] == "degraded" and row["pid"] == proc.pid and row["restarts"] == 0
        assert row["status"].startswith("webcam: retrying in ") and "/dev/video99: no such device" in row["status"]

        def errors() -> float:
            return metric_value(b.scrape(), "edgeroom_capture_source_errors_total", service="capture@cam",
                                stream="cam", reason="device") or 0.0

        n1 = wait_for(lambda: (v := errors()) >= 4 and v, 10, "four source errors")
        t1 = time.monotonic()
        time.sleep(2.0)
        n2, t2 = errors(), time.monotonic()
        rate = (n2 - n1) / (t2 - t1)
        assert n2 > n1, "the errors stopped growing: the source is not retried"
        assert rate < 4.0, f"{rate:.1f} errors/s: retried faster than the 0.4 s backoff allows"
        assert proc.poll() is None and b.services()["capture@cam"]["pid"] == proc.pid

        log = b.log()
        assert "source cam: /dev/video99: no such device" in log
        assert "VIDEOIO" not in log and "[ WARN" not in log, log[-2000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 3.0
    finally:
        b.close()


# ---------------------------------------------------------------- the frame path (OpenCV, not V4L2)
def test_frames_reach_the_bus_as_bgr24_through_opencvs_read_path(tmp_path, prefix):
    """REAL OPENCV READ PATH, NOT V4L2: WebcamSource with the FFmpeg backend on a 320x240 MJPEG
    file of numbered pictures whose left half is blue. Every picture is grabbed, retrieved
    straight into the loaned slot (OpenCV writes the slot itself: no reallocation), and
    arrives on the bus as bgr24 320x240, in order, with capture_ns increasing, pts equal to
    it in 1/1e9, and blue in channel 0 (OpenCV's BGR published as is, no conversion). The
    file's end is a failed read: SourceError("device") counting the frames."""
    n = 24
    path = mjpeg_file(tmp_path / "cam.avi", n, 320, 240)
    sink = RecordingSink("cam", prefix, pace=0.01)
    reader = Reader(prefix, "cam")
    src = WebcamSource(webcam_cfg(), api=cv2.CAP_FFMPEG, target=str(path))
    resized = []
    real_resized = src._resized
    src._resized = lambda *a: resized.append(1) or real_resized(*a)
    t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    err = run_until_end(src, sink)
    time.sleep(0.2)
    items = reader.close()
    sink.close()
    assert err.reason == "device" and f"stopped delivering frames after {n}" in str(err)
    assert src.describe() == f"{path} 320x240 via FFMPEG"

    assert [s["number"] for s in sink.sent] == list(range(n))
    assert resized == [], "OpenCV did not write into the loaned slot"
    assert sink.m.dropped.by == {}
    assert [i["number"] for i in items] == list(range(n)), "the bus lost or reordered pictures"
    ns = [i["capture_ns"] for i in items]
    assert all(a < b for a, b in zip(ns, ns[1:])) and ns[0] > t0
    for i in items:
        assert (i["w"], i["h"], i["format"]) == (320, 240, "bgr24")
        assert i["pts"] == i["capture_ns"] and i["tb"] == Fraction(1, 1_000_000_000)
        b, g, r = (int(x) for x in i["pixel"])
        assert b > 200 and g < 60 and r < 60, f"left half should be blue in BGR order, got {i['pixel']}"


def test_stop_returns_promptly_mid_stream(tmp_path, prefix):
    """REAL OPENCV READ PATH, NOT V4L2: `stop` set while frames flow: run() returns False."""
    path = mjpeg_file(tmp_path / "long.avi", 300, 320, 240)
    sink = RecordingSink("cam", prefix, pace=0.005)
    stop = threading.Event()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ret", WebcamSource(
        webcam_cfg(), api=cv2.CAP_FFMPEG, target=str(path)).run(sink, stop, lambda *_: None)), daemon=True)
    t.start()
    wait_for(lambda: len(sink.sent) >= 10, 5, "ten frames")
    stop.set()
    t.join(2.0)
    sink.close()
    assert not t.is_alive() and out["ret"] is False
    assert 10 <= len(sink.sent) < 300


def test_a_size_change_mid_stream_makes_a_new_ring(tmp_path, prefix):
    """REAL OPENCV READ PATH, NOT V4L2: OpenCV's image-sequence backend on PNGs that are
    320x240 then 160x120 then 320x240 (the FFmpeg backend would scale every picture to the
    first size, a camera's MJPG decode does not). When OpenCV's picture no longer fits the
    slot it allocates instead of writing the slot; the source notices, puts the picture in
    a slot of its size (a new ring), and a reader on the bus follows. PNG is lossless, so
    the exact BGR values written are the ones on the bus: no colour conversion."""
    seq = tmp_path / "seq"
    seq.mkdir()
    sizes = [(320, 240)] * 4 + [(160, 120)] * 4 + [(320, 240)] * 2
    for i, (w, h) in enumerate(sizes):
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = (200, 100, i)                    # B, G, R: R carries the number
        cv2.imwrite(str(seq / f"{i:03d}.png"), img)
    sink = RecordingSink("cam", prefix, pace=0.02)
    reader = Reader(prefix, "cam")
    src = WebcamSource(webcam_cfg(), api=cv2.CAP_IMAGES, target=str(seq / "%03d.png"))
    err = run_until_end(src, sink)
    time.sleep(0.2)
    items = reader.close()
    sink.close()
    assert err.reason == "device"
    assert [(s["w"], s["h"]) for s in sink.sent] == sizes
    assert [(i["w"], i["h"]) for i in items] == sizes, "the reader did not follow the new rings"
    assert [tuple(int(x) for x in i["pixel"]) for i in items] == [(200, 100, i) for i in range(len(sizes))]
    assert {i["format"] for i in items} == {"bgr24"}
    assert src.describe().endswith("320x240 via CV_IMAGES")


def test_bench_runs_on_a_file(tmp_path, capsys):
    """The measuring tool (`python -m services.capture.sources.webcam --bench`) on a small file: it
    reports grab, retrieve into a slot, and retrieve + copyto."""
    path = mjpeg_file(tmp_path / "b.avi", 12, 320, 240)
    webcam._bench(str(path), 12)
    text = capsys.readouterr().out
    assert "320x240, 12 frames" in text and "retrieve into slot" in text and "retrieve + copyto" in text


# ---------------------------------------------------------------- decisions, against a simulated OpenCV
class FakeV4L2:
    """SIMULATED: OpenCV's V4L2 VideoCapture as properties go: a USB 2 camera offering
    YUYV and (optionally) MJPG at a few sizes, with the frame rates such cameras give;
    the size applies when the height is set after the width, as in OpenCV."""

    MODES = {"YUYV": {(640, 480): 30, (1280, 720): 10, (1920, 1080): 5},
             "MJPG": {(640, 480): 30, (1280, 720): 30, (1920, 1080): 30}}

    def __init__(self, mjpg: bool = True) -> None:
        self.modes = dict(self.MODES) if mjpg else {"YUYV": self.MODES["YUYV"]}
        self.fourcc, self.size, self.rate, self.pending_w = "YUYV", (640, 480), 30.0, 0
        self.asked_fourccs: list[str] = []

    def _fit(self) -> None:
        sizes = self.modes[self.fourcc]
        if self.size not in sizes:
            self.size = max(sizes)
        self.rate = min(self.rate, sizes[self.size])

    def set(self, prop: int, value: float) -> bool:
        if prop == cv2.CAP_PROP_FOURCC:
            code = "".join(chr((int(value) >> (8 * i)) & 0xFF) for i in range(4))
            self.asked_fourccs.append(code)
            if code not in self.modes:
                return False
            self.fourcc = code
        elif prop == cv2.CAP_PROP_FRAME_WIDTH:
            self.pending_w = int(value)
            return True
        elif prop == cv2.CAP_PROP_FRAME_HEIGHT:
            want = (self.pending_w, int(value))
            fits = [s for s in self.modes[self.fourcc] if s[0] <= want[0] and s[1] <= want[1]]
            self.size = max(fits) if fits else min(self.modes[self.fourcc])
        elif prop == cv2.CAP_PROP_FPS:
            self.rate = float(value)
        self._fit()
        return True

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FRAME_WIDTH: self.size[0], cv2.CAP_PROP_FRAME_HEIGHT: self.size[1],
                cv2.CAP_PROP_FPS: self.rate, cv2.CAP_PROP_FOURCC: cv2.VideoWriter_fourcc(*self.fourcc)}[prop]


@pytest.mark.parametrize("asked, mjpg, got, asked_fourccs, text", [
    ((640, 480, 30.0), True, ("YUYV", (640, 480), 30.0), [], "/dev/video0 640x480 YUYV at 30 fps"),
    ((1280, 720, 30.0), True, ("MJPG", (1280, 720), 30.0), ["MJPG"], "/dev/video0 1280x720 MJPG at 30 fps"),
    ((1280, 720, 30.0), False, ("YUYV", (1280, 720), 10.0), ["MJPG", "YUYV"],
     "/dev/video0 1280x720 YUYV at 10 fps (asked 1280x720 at 30 fps)"),
    ((1280, 720, 10.0), True, ("YUYV", (1280, 720), 10.0), [], "/dev/video0 1280x720 YUYV at 10 fps"),
    ((800, 600, 30.0), True, ("YUYV", (640, 480), 30.0), ["MJPG", "YUYV"],
     "/dev/video0 640x480 YUYV at 30 fps (asked 800x600 at 30 fps)"),
])
def test_mode_negotiation_takes_mjpg_only_when_it_gives_more(asked, mjpg, got, asked_fourccs, text):
    """SIMULATED OpenCV/V4L2 properties: the uncompressed format stays when it meets the
    request (or when MJPG would give no more); MJPG is taken when it gives the size or rate
    YUYV cannot; what the device really gives is what describe() says."""
    w, h, fps = asked
    cap = FakeV4L2(mjpg)
    src = WebcamSource(webcam_cfg(device="0", width=w, height=h, fps=fps))
    src._negotiate(cv2, cap)
    assert (cap.fourcc, cap.size, cap.rate) == got
    assert cap.asked_fourccs == asked_fourccs
    assert (src.fmt, src.size, src.fps) == got
    assert src.describe() == text


class FlakyCapture:
    """SIMULATED OpenCV reads: good pictures, with undecodable ones where `bad` says."""

    def __init__(self, bad: set[int], n: int, w: int = 64, h: int = 48) -> None:
        self.bad, self.n, self.i, self.w, self.h = bad, n, -1, w, h

    def grab(self) -> bool:
        self.i += 1
        return self.i < self.n

    def retrieve(self, image=None):
        if self.i in self.bad:
            return False, None
        image[:] = self.i % 256
        return True, image


def test_undecodable_pictures_are_counted_and_only_a_run_of_them_fails(prefix):
    """SIMULATED OpenCV reads (the webcam loop itself is real, on a real sink): a corrupt
    picture is dropped and counted as dropped{reason="corrupt"}, its slot given back, the
    stream goes on; MAX_BAD in a row is a SourceError("device")."""
    sink = RecordingSink("cam", prefix)
    try:
        src = WebcamSource(webcam_cfg())
        src.size = (64, 48)
        cap = FlakyCapture({2, 3, 7}, 10)
        with pytest.raises(SourceError) as err:
            src._stream(cv2, cap, sink, threading.Event())
        # the read that ends the simulation fails, and /dev/video99 does not exist: reported as unplugged
        assert str(err.value) == "/dev/video99 is gone (unplugged?) after 7 frames"
        assert sink.m.dropped.by["corrupt"].value == 3
        assert [int(s["pixel"][0]) for s in sink.sent] == [0, 1, 4, 5, 6, 8, 9]
        run = webcam.MAX_BAD
        with pytest.raises(SourceError) as err:
            src._stream(cv2, FlakyCapture(set(range(1, 1 + run)), 100), sink, threading.Event())
        assert err.value.reason == "device" and f"{run} pictures in a row OpenCV could not decode" in str(err.value)
        assert sink.m.dropped.by["corrupt"].value == 3 + run
        loan = sink.loan_picture(64, 48, "bgr24")    # no slot was left on loan
        loan.abort()
    finally:
        sink.close()
