"""The webcam source: a V4L2 device through OpenCV, each picture straight into a bus slot as bgr24.

    [sources.desk]
    kind = "webcam"
    device = "/dev/video0"      # or "0"
    width = 1280                # asked for; the device may give something else,
    height = 720                # which the status then says:
    fps = 30                    # "/dev/video0 640x480 YUYV at 30 fps (asked 1280x720 at 30 fps)"

Opening, and why it never hangs or spams:

* Before OpenCV touches the node, the node is checked the way `python -m
  services.capture.cameras` lists it (an O_NONBLOCK open and VIDIOC_QUERYCAP, no
  streaming): missing, permission denied (join the video group), not a V4L2 device, or a
  metadata node rather than the capture one each fail at once with
  `SourceError("device", ...)` naming the device, the cause and the capture devices
  present. A device OpenCV then cannot set up is reported busy with the processes that
  hold it open (from /proc/*/fd), or as having no pixel format OpenCV converts.
* OpenCV's own log goes to ERROR level unless OPENCV_LOG_LEVEL is set, so a camera that
  is away does not print OpenCV's warnings on every retry: our message (throttled by
  the service) carries the cause. Set OPENCV_LOG_LEVEL=INFO (or DEBUG) to see OpenCV's.
* A read waits in OpenCV's select() for at most OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT
  seconds (default here max(3, ceil(4 / fps)); OpenCV's own is 10), so a camera that
  stalls is reported, and `stop` honoured, within that bound. An unplugged camera's read
  fails (the driver answers ENODEV) and, its node gone, is reported as unplugged.

Mode: the device is asked for width x height at fps in its default pixel format (OpenCV
prefers uncompressed YUYV). When that falls short of the request — the usual case for
720p and up on USB 2, where YUYV gives 5-10 fps — MJPG is asked for too and kept if the
device then gives more pixels or more frames per second; otherwise the uncompressed
format stays (no JPEG decode per frame). What the device really gives is what the status
and the log say, and what goes on the bus.

Frames: OpenCV converts whatever the device sends (YUYV, MJPG, NV12...) to BGR; that is
published as "bgr24" as is, with no colour conversion of ours. `grab()` takes the next
buffer from the driver; capture_ns is CLOCK_MONOTONIC right after it returns, and pts is
that same clock (time base 1/1e9). `retrieve(image=slot)` then has OpenCV write its BGR
picture into the loaned bus slot: OpenCV's V4L2 backend converts into its own frame and
copies that into the destination it is given (cap_v4l.cpp, retrieveFrame), so passing
the slot saves the second copy (and an allocation) that `read()` + `np.copyto` would
cost. Measured through OpenCV's read path on MJPEG files (the FFmpeg backend, not V4L2:
no camera here; `python -m services.capture.sources.webcam --bench FILE_OR_DEVICE`), median per
frame over two runs on the 2-core build machine: 640x480 0.36-0.45 ms into the slot vs
0.45-0.57 ms for retrieve + copyto (the copyto alone 0.09-0.10 ms); 1280x720 1.05-1.34 ms
vs 1.32-1.78 ms (copyto 0.30-0.42 ms): about a fifth of the retrieve. When OpenCV hands
back a picture of another size than the slot (an MJPG frame of a new size), it
allocates a new array instead: that is detected, the loan is given back, and the picture
goes into a slot of its size (the sink makes a new ring) with one copy.

Failures while streaming: a read that fails -> SourceError("device", ...) (the service
reopens after a backoff); a picture OpenCV cannot decode (a corrupt MJPG frame) is
dropped and counted (`dropped{reason="corrupt"}`), and only a run of them is a failure.

Tests may pass another OpenCV backend and a target (`api=cv2.CAP_FFMPEG, target=FILE`,
or CAP_IMAGES with a printf pattern) to drive the same read path without a camera; the
V4L2 checks and mode negotiation are skipped then.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from services.capture.cameras import explain, list_cameras, querycap
from services.capture.sink import Sink
from services.capture.sources.base import Emit, SourceConfig, SourceError, source_kind
from services.runtime.schema import RESTART, setting

__all__ = ["WebcamSource", "device_path", "holders"]

log = logging.getLogger("edgeroom.capture.webcam")

NS_BASE = Fraction(1, 1_000_000_000)
MAX_BAD = 30          # consecutive undecodable pictures that make a failure


def device_path(device: str) -> str:
    """The config's device ("0" or "/dev/video0") as a path."""
    return f"/dev/video{int(device)}" if device.isdigit() else device


def holders(path: str) -> list[str]:
    """'PID (COMMAND)' for each other process that has `path` open (those /proc lets us see)."""
    real = os.path.realpath(path)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != real:
                    continue
            except OSError:
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append(f"{pid} ({comm})")
            break
    return found


def _check_device(text: str) -> None:
    if not (text.isdigit() or text.startswith("/dev/")):
        raise ValueError(f"expected a device index like '0' or a path like '/dev/video0', got {text!r}")


@dataclass(frozen=True)
class WebcamConfig(SourceConfig):
    kind: str = setting("webcam", "webcam: a V4L2 camera.", RESTART)
    device: str = setting("0", "V4L2 device index ('0') or path ('/dev/video0').", RESTART, check=_check_device)
    width: int = setting(1280, "Picture width asked for, in pixels (even).", RESTART, min=16, max=7680, even=True)
    height: int = setting(720, "Picture height asked for, in pixels (even).", RESTART, min=16, max=4320, even=True)
    fps: float = setting(30.0, "Frames per second asked for.", RESTART, min=0.1, max=240)

    def target(self) -> str:
        return self.device

    def frame_interval(self) -> float:
        return 1.0 / self.fps


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise SourceError("unsupported", f"webcam needs OpenCV: pip install 'edgeroom[media]' ({exc})") from None
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    return cv2


def _fourcc(value: float) -> str:
    v = int(value)
    text = "".join(chr((v >> (8 * i)) & 0xFF) for i in range(4))
    return text.strip() if v and text.isprintable() else "?"


def _capture_nodes(exclude: str) -> str:
    rows = [r for r in list_cameras() if r["capture"] and r["device"] != exclude]
    if not rows:
        return "no V4L2 capture device on this box"
    return "capture devices present: " + ", ".join(f"{r['device']} ({r['name']})" for r in rows)


@source_kind(WebcamConfig, "a V4L2 camera through OpenCV, straight into the slot as bgr24")
class WebcamSource:
    def __init__(self, cfg: WebcamConfig, *, api: int | None = None, target: str | None = None) -> None:
        self.cfg = cfg
        self.api = api                       # None: V4L2
        self.target = target or device_path(cfg.device)
        self.frames = 0                      # pictures sent since the last open
        self.size = (0, 0)                   # what the device gives (0, 0: not open yet)
        self.fmt = ""                        # its pixel format (YUYV, MJPG...) or "via BACKEND"
        self.fps = 0.0                       # the rate the device says it delivers

    # ------------------------------------------------------------ opening
    def _v4l2(self, cv2) -> bool:
        return self.api is None or self.api == cv2.CAP_V4L2

    def _check_node(self) -> None:
        """The V4L2 checks that say clearly why a device cannot be used; no OpenCV, no waiting."""
        path = self.target
        if not os.path.exists(path):
            raise SourceError("device", f"{path}: no such device (unplugged or never there?); "
                                        f"{_capture_nodes(path)}")
        try:
            cap = querycap(path)
        except OSError as exc:
            raise SourceError("device", explain(exc, path)) from None
        if not cap["capture"]:
            raise SourceError("device", f"{path} ({cap['card']}) is not a video capture node (a metadata node? "
                                        f"a camera's picture is usually its first node); {_capture_nodes(path)}")

    def _open(self, cv2):
        path = self.target
        if not self._v4l2(cv2):
            cap = cv2.VideoCapture(path, self.api)
            if not cap.isOpened():
                cap.release()
                raise SourceError("device", f"{path}: OpenCV could not open it")
            return cap
        self._check_node()
        # bound OpenCV's wait for a buffer (read once per process, at the first wait)
        os.environ.setdefault("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT", str(max(3, math.ceil(4 / self.cfg.fps))))
        cap = cv2.VideoCapture(path, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            held = holders(path)
            if held:
                raise SourceError("device", f"{path} is busy: held open by {', '.join(held)}")
            raise SourceError("device", f"{path}: OpenCV could not set it up (busy in another program or "
                                        f"container, or no pixel format OpenCV converts)")
        self._negotiate(cv2, cap)
        return cap

    def _mode(self, cv2, cap) -> tuple[int, int, float, str]:
        return (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                float(cap.get(cv2.CAP_PROP_FPS)), _fourcc(cap.get(cv2.CAP_PROP_FOURCC)))

    def _ask(self, cv2, cap, fourcc: str | None = None) -> tuple[int, int, float, str]:
        cfg = self.cfg
        if fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*fourcc))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)   # the pair applies on the second call
        cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        return self._mode(cv2, cap)

    def _negotiate(self, cv2, cap) -> None:
        cfg = self.cfg

        def score(m):
            return (min(m[0] * m[1], cfg.width * cfg.height), min(m[2], cfg.fps))

        plain = self._ask(cv2, cap)
        short = score(plain) < (cfg.width * cfg.height, cfg.fps * 0.95)
        if short and plain[3] != "MJPG":
            mjpg = self._ask(cv2, cap, "MJPG")
            if mjpg[3] != "MJPG" or score(mjpg) <= score(plain):
                self._ask(cv2, cap, plain[3] if plain[3] != "?" else None)
        w, h, self.fps, self.fmt = self._mode(cv2, cap)
        self.size = (w, h)
        log.info("opened %s", self.describe())

    # ------------------------------------------------------------ reading
    def run(self, sink: Sink, stop: threading.Event, emit: Emit) -> bool:
        cv2 = _cv2()
        cap = self._open(cv2)
        try:
            if not self._v4l2(cv2):
                self.size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
                self.fmt, self.fps = f"via {cap.getBackendName()}", 0.0
            self.frames = 0
            self._stream(cv2, cap, sink, stop)
        finally:
            cap.release()
        return False

    def _stream(self, cv2, cap, sink: Sink, stop: threading.Event) -> None:
        bad = 0
        while not stop.is_set():
            if not cap.grab():
                raise SourceError("device", self._lost())
            capture_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            w, h = self.size
            loan = sink.loan_picture(w, h, "bgr24") if w > 0 and h > 0 else None
            try:
                try:
                    ok, img = cap.retrieve(image=loan.array) if loan is not None else cap.retrieve()
                except cv2.error as exc:
                    ok, img = False, None
                    log.debug("%s: retrieve failed: %s", self.target, exc)
                if not ok or img is None or img.size == 0:
                    sink.m.dropped.labels("corrupt").inc()
                    bad += 1
                    if bad >= MAX_BAD:
                        raise SourceError("device", f"{self.target}: {bad} pictures in a row OpenCV could not "
                                                    f"decode")
                    continue
                bad = 0
                if loan is None or img.ctypes.data != loan.array.ctypes.data:
                    # OpenCV allocated: the picture is not the slot's size (or layout); a slot of its size, one copy
                    if loan is not None:
                        loan.abort()
                    loan = None
                    loan = self._resized(cv2, sink, img)   # (None first: a failure there aborts its own)
                sink.send_picture(loan, pts=capture_ns, time_base=NS_BASE, capture_ns=capture_ns)
                self.frames += 1
            finally:
                if loan is not None:
                    loan.abort()   # a no-op once sent; otherwise the slot goes back unsent

    def _resized(self, cv2, sink: Sink, img: np.ndarray):
        h, w = img.shape[:2]
        if (w, h) != self.size:
            if self.size != (0, 0):
                log.info("%s: pictures are now %dx%d (were %dx%d)", self.target, w, h, *self.size)
            self.size = (w, h)
        loan = sink.loan_picture(w, h, "bgr24")
        try:
            if img.ndim == 2:
                cv2.cvtColor(img, cv2.COLOR_GRAY2BGR, dst=loan.array)
            elif img.shape[2] == 4:
                cv2.cvtColor(img, cv2.COLOR_BGRA2BGR, dst=loan.array)
            else:
                np.copyto(loan.array, img)
        except BaseException:
            loan.abort()
            raise
        return loan

    def _lost(self) -> str:
        path = self.target
        if not os.path.exists(path):
            return f"{path} is gone (unplugged?) after {self.frames} frames"
        wait = os.environ.get("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT", "10")
        return (f"{path} stopped delivering frames after {self.frames} (the driver reported an error, or no "
                f"frame came within {wait} s)")

    def force_keyframe(self) -> str | None:
        return None  # raw pictures: each stands alone

    def describe(self) -> str:
        """What the device gives, and what was asked when that differs: for the status line."""
        cfg = self.cfg
        asked = f"{cfg.width}x{cfg.height} at {cfg.fps:g} fps"
        w, h = self.size
        if not w:
            return f"{self.target} (asking {asked})"
        text = (f"{self.target} {w}x{h}" + (f" {self.fmt}" if self.fmt else "")
                + (f" at {self.fps:g} fps" if self.fps > 0 else ""))
        if self.fmt.startswith("via ") or (w, h, self.fps) == (cfg.width, cfg.height, cfg.fps):
            return text
        return f"{text} (asked {asked})"


# ---------------------------------------------------------------- measuring
def _bench(target: str, frames: int) -> None:
    """Per frame: grab, retrieve into a bus slot, retrieve + np.copyto into the slot (alternating)."""
    import framebus
    cv2 = _cv2()
    api = cv2.CAP_V4L2 if target.startswith("/dev/") or target.isdigit() else cv2.CAP_FFMPEG
    cap = cv2.VideoCapture(device_path(target) if target.isdigit() else target, api)
    if not cap.isOpened():
        raise SystemExit(f"cannot open {target}")
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    prefix = f"webcambench{os.getpid()}"
    times: dict[str, list[int]] = {"grab": [], "retrieve into slot": [], "retrieve + copyto": [], "copyto": []}
    with framebus.Producer.create("bench", "video", payload=w * h * 3, slots=8, prefix=prefix) as p:
        for i in range(frames):
            t0 = time.perf_counter_ns()
            if not cap.grab():
                break
            t1 = time.perf_counter_ns()
            loan = p.loan_picture(w, h, "bgr24")
            if i % 2 == 0:
                cap.retrieve(image=loan.array)
                times["retrieve into slot"].append(time.perf_counter_ns() - t1)
            else:
                _, img = cap.retrieve()
                t2 = time.perf_counter_ns()
                np.copyto(loan.array, img)
                t3 = time.perf_counter_ns()
                times["retrieve + copyto"].append(t3 - t1)
                times["copyto"].append(t3 - t2)
            times["grab"].append(t1 - t0)
            loan.send(pts=i, time_base=(1, 30))
    framebus.gc(prefix)
    cap.release()
    print(f"{target}: {w}x{h}, {len(times['grab'])} frames; per frame, median / p90 in ms")
    for k, v in times.items():
        if v:
            print(f"  {k:20s} {np.median(v) / 1e6:6.2f} / {np.percentile(v, 90) / 1e6:6.2f}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m services.capture.sources.webcam")
    ap.add_argument("--bench", metavar="DEVICE_OR_FILE", required=True,
                    help="measure grab and the copy into a bus slot on a device (/dev/video0, 0) or a video file")
    ap.add_argument("--frames", type=int, default=300)
    args = ap.parse_args()
    _bench(args.bench, args.frames)
