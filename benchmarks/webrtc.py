"""WebRTC benchmark: glass-to-glass latency from the synthetic camera to Chromium over WHEP, CPU per WHEP viewer
passed through (edgeroom-webrtc) against decoded and re-encoded per viewer (the naive path), and the most
720p30 viewers the box sustains on this machine.

Run from the repository root:

    .venv/bin/python benchmarks/webrtc.py [--quick] [--seconds S] [--latency-seconds L] [--max-viewers N]
                                          [--json PATH]

What it answers, on this machine: how long a picture takes from the camera to a browser's screen
through the box's WHEP (issue 18), against the camera to the bus alone (the limit: nothing of the
box's WebRTC in it); what one more WHEP viewer costs the webrtc process when the camera's H.264 is
passed through as it is, against what RoomKit's FastRTC backend does (every picture decoded and
encoded again for each viewer by aiortc); and how many 720p30 viewers play at full rate with no
loss.

Method
------
* The box: a private `edgeroom run` (benchmarks/benchbox.py) with one source, `[sources.cam]`
  (synthetic 1280x720 30 fps, H.264 encoded in-process by libx264 veryfast/zerolatency at
  2000 kbit/s, a keyframe every 2 s, no audio, no decode@), and `[webrtc]` on 127.0.0.1:0
  with ice_addresses = 127.0.0.1 and a bearer token; vision and the recorder off.
* A bus tap (a thread of this process) reads every access unit of `cam` (capture_ns,
  publish_ns, size, and a key of its NAL units). The camera stamps frame N with
  capture_ns = t0 + round(N x 1e9/30) on CLOCK_MONOTONIC and draws N in the picture as 32
  black/white blocks (services/capture/sources/synthetic.py): one keyframe decoded (PyAV)
  gives t0, and so the capture time of every frame number.
* Glass-to-glass: headless Chromium (tests/browser.py) opens a document of the box's own origin
  (/style.css: none of the web page's players run) and plays `cam` by WHEP (video only,
  recvonly, the box's H.264 High passed through). For each frame presented,
  `requestVideoFrameCallback` draws the top strip into a canvas, reads the 32 blocks back
  (the frame number) and keeps rVFC's receiveTime (its last packet in), presentationTime
  (handed to the compositor) and expectedDisplayTime (on the glass; headless, a vsync estimate:
  the glass is the later of the two). The page's clock is
  mapped to CLOCK_MONOTONIC by the tightest of 15 CDP round trips that read performance.now()
  (the midpoint; its half width is the uncertainty), taken before and after the window;
  performance.timeOrigin + Date-style wall time against CLOCK_REALTIME - CLOCK_MONOTONIC is
  computed too, as a check of the mapping. Each stage is that time less the frame's
  capture_ns; the limit is publish_ns - capture_ns of every unit on the bus in the window
  (drawing + libx264 + the ring). "WebRTC adds": glass less the limit, p50 and p99.
* Viewers (the load generator): aiortc peers in this process (one asyncio thread), recvonly
  H.264 (offering High, as Chromium does), that do not decode: the receiver's access units are
  taken before its decoder (services/webrtc/peer.py `tap_video`) and counted, with their RTP
  time and arrival. Per viewer in the window: units received (fps), frames missing (RTP time
  gaps beyond those of the camera itself on the bus), and, for the first viewer, whether its
  access units are the bus's byte for byte (NAL units compared; SPS/PPS included).
* CPU: utime + stime of a process (/proc/PID/stat: every thread, those that ended too, as aiortc's
  encoders do when REMB moves the bit rate) over the window, as % of one core. Pass-through:
  the webrtc process with N viewers, less the same process with none (measured first), per
  viewer. Naive: a child of this file (`--naive-server`), an aiohttp +
  aiortc WHEP server that reads `cam` off the bus, decodes it once (PyAV, aiortc's own
  H264Decoder settings, in a thread) and gives every viewer a track of those av.VideoFrames,
  which aiortc encodes per viewer (its H264Encoder: libx264 Baseline, zerolatency, 1-3 Mbit/s
  by REMB); rows: the process idle, decoding with no viewer, and with 1 (and 2) viewers; per
  viewer = (N viewers - idle) / N, encode per viewer = (N - decoding) / N. The same viewers,
  the same box running beside.
* Viewers sustained: N = 0, 1, 2, 4, 10, 16, 24, 32, 48, 64 (up to --max-viewers), then halving
  the gap between the highest sustained and the lowest failed. Each step adds (or closes)
  viewers, waits for every viewer's first unit and two heartbeats of the service (the warm-up;
  metrics are read as of a heartbeat), then measures S seconds. Sustained: every viewer up,
  every viewer >= 28 fps in the window, no frame missing beyond the camera's own gaps, and
  `edgeroom_webrtc_viewer_dropped_total` unchanged (any reason). On this 2-core machine the
  camera's encode, the hub, the load generator and the webrtc process share the two cores (on
  a machine with more, the webrtc process is pinned to two and this benchmark runs on the rest).
* Time: --quick ~60 s (L = 5 s, S = 3 s, N up to 10, naive with 1 viewer); a full run 3-5 min.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_ROOT)


import framebus  # noqa: E402
from benchmarks.benchbox import BenchBox  # noqa: E402
from benchmarks.ingest import _on_sigterm, code_version, log, machine_busy_s, pct, proc_cpu_s  # noqa: E402
from benchmarks.rtp import clock_offset_ns  # noqa: E402

WIDTH, HEIGHT, FPS, GOP_S, KBPS = 1280, 720, 30, 2.0, 2000
PERIOD_NS = 1_000_000_000 / FPS          # the synthetic source's own period (a float, as it computes it)
STREAM = "cam"
TOKEN = "bench-webrtc-token-0123456789"
LOOPBACK = "127.0.0.1"
MIN_FPS = 28.0                           # a viewer below this in the window: not sustained
TARGET_G2G_MS = 500.0
PINNED = {0, 1}
VIDEO_CLOCK = 90000
NS = 1_000_000_000


@dataclass
class Plan:
    latency_s: float          # the glass-to-glass window
    seconds: float            # the measured window of a CPU / viewers step
    max_viewers: int
    naive_viewers: tuple      # the naive rows' viewer counts (after idle and decoding)
    budget_s: float           # the sweep stops starting new steps past this (since the start of the run)
    ladder: tuple = (1, 2, 4, 10, 16, 24, 32, 48, 64)   # the viewer counts tried until one fails


FULL = Plan(latency_s=20.0, seconds=8.0, max_viewers=64, naive_viewers=(1, 2), budget_s=270.0)
QUICK = Plan(latency_s=5.0, seconds=3.0, max_viewers=10, naive_viewers=(1,), budget_s=50.0, ladder=(1, 10))


# --------------------------------------------------------------------------------------
# Small helpers


def nal_key(au: bytes) -> int:
    """The access unit's NAL units (start codes and trailing zeros aside): equal keys, equal bytes."""
    return hash(tuple(p.rstrip(b"\x00") for p in au.split(b"\x00\x00\x01") if p.rstrip(b"\x00")))


def dist(vals: list[float]) -> dict:
    s = sorted(vals)
    return {"n": len(s), "p50_ms": pct(s, 50), "p99_ms": pct(s, 99), "min_ms": s[0] if s else None,
            "max_ms": s[-1] if s else None}


def capture_of(n: int, t0: int) -> int:
    return t0 + round(n * PERIOD_NS)


def _pc(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def pinning() -> tuple[set[int] | None, set[int] | None, str]:
    """(the webrtc process's cores, this benchmark's, a note); (None, None) on 2 cores or fewer."""
    have = sorted(os.sched_getaffinity(0))
    if len(have) <= 2:
        return None, None, f"this machine lets the benchmark have {len(have)} cores: the webrtc process, the " \
                           "camera's encode, the hub, the naive server and the viewers (the load generator) share " \
                           "them"
    pinned = PINNED if PINNED <= set(have) else set(have[:2])
    rest = set(have) - pinned
    return pinned, rest, f"the webrtc process pinned to cores {sorted(pinned)}; this benchmark (the viewers) and " \
                         f"the naive server on {len(rest)} other core(s); the camera and hub unpinned"


def pin_threads(pid: int, cores: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------------------
# The box and its bus


class Box(BenchBox):
    def __init__(self, max_viewers: int) -> None:
        super().__init__(f"wrtcb{os.getpid()}", "ewrtcb", [STREAM], client_timeout=5.0)
        self.write_config([
            "[services.vision]\nenabled = false", "[services.recorder]\nenabled = false",
            f'[sources.{STREAM}]\nkind = "synthetic"\nwidth = {WIDTH}\nheight = {HEIGHT}\nfps = {FPS}.0\n'
            f'encode = "h264"\nbitrate = {KBPS}\ngop = {GOP_S}\naudio = false\ndecode = false\nroom = "bench"',
            f'[webrtc]\nenabled = true\nport = 0\naddress = "{LOOPBACK}"\nice_addresses = "{LOOPBACK}"\n'
            f'tokens = "bench:{TOKEN}"\nmax_viewers = {max_viewers + 8}\nmax_sessions = {max_viewers + 16}'])
        self.url = ""

    def up(self, timeout: float = 60.0) -> None:
        self.start()
        self.wait_ready(timeout, ["webrtc", f"capture@{STREAM}"])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            row = next(r for r in self.status()["services"] if r["service"] == "webrtc")
            address = str(row.get("status", "")).split("://", 1)[-1].split(";", 1)[0]
            if address and not address.endswith(":0"):
                self.url = "http://" + address
                return
            time.sleep(0.2)
        raise RuntimeError(f"the webrtc service never said where it listens: {self.log_tail()}")

    def pids(self) -> dict[str, int]:
        return {r["service"]: r["pid"] for r in self.status()["services"] if r.get("pid")}

    def api(self, path: str) -> dict:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def webrtc_metrics(self) -> tuple[float, dict[str, float]]:
        """(the webrtc service's heartbeats, viewer_dropped_total by reason), as of its last heartbeat."""
        from prometheus_client.parser import text_string_to_metric_families

        url = self.status()["metrics_url"]
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        beats, dropped = 0.0, {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "edgeroom_service_heartbeats_total" and s.labels.get("service") == "webrtc":
                    beats = s.value
                elif s.name == "edgeroom_webrtc_viewer_dropped_total":
                    dropped[s.labels.get("reason", "")] = dropped.get(s.labels.get("reason", ""), 0.0) + s.value
        return beats, dropped

    def settled_dropped(self, timeout: float = 6.0) -> dict[str, float]:
        """viewer_dropped_total by reason as of a heartbeat taken after this call (two beats on)."""
        start, _ = self.webrtc_metrics()
        deadline = time.monotonic() + timeout
        while True:
            beats, dropped = self.webrtc_metrics()
            if beats >= start + 2 or time.monotonic() > deadline:
                return dropped
            time.sleep(0.1)


class BusTap(threading.Thread):
    """Every access unit of `cam`: (capture_ns, publish_ns, size, keyframe, NAL key); the first keyframe's bytes."""

    def __init__(self, prefix: str) -> None:
        super().__init__(name="bus-tap", daemon=True)
        self.consumer = framebus.Consumer.attach(STREAM, prefix=prefix, missing_ok=True, start="oldest")
        self.units: list[tuple[int, int, int, bool, int]] = []
        self.by_capture: dict[int, int] = {}       # capture_ns -> index in units
        self.keys: set[int] = set()
        self.keyframe: tuple[int, bytes] | None = None
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.halt.is_set():
            item = self.consumer.receive(timeout=0.2)
            if item is None:
                continue
            data = bytes(item.copy())
            key = nal_key(data)
            with self.lock:
                self.by_capture[item.capture_ns] = len(self.units)
                self.units.append((item.capture_ns, item.publish_ns, len(data), item.keyframe, key))
                self.keys.add(key)
                if self.keyframe is None and item.keyframe:
                    self.keyframe = (item.capture_ns, data)

    def t0(self, timeout: float = 10.0) -> int:
        """The camera's t0: its first keyframe decoded, its frame number read (capture_ns - round(N x period))."""
        import av

        from services.capture.sources.synthetic import frame_number
        deadline = time.monotonic() + timeout
        while self.keyframe is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no keyframe of the camera on the bus")
            time.sleep(0.05)
        capture, data = self.keyframe
        codec = av.CodecContext.create("h264", "r")
        frames = list(codec.decode(av.Packet(data))) + list(codec.decode(None))
        luma = frames[0].to_ndarray(format="gray")
        return capture - round(frame_number(luma) * PERIOD_NS)

    def window(self, m0: int, m1: int) -> list[tuple[int, int, int, bool, int]]:
        with self.lock:
            return [u for u in self.units if m0 <= u[0] < m1]

    def close(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(5)
        self.consumer.close()


def camera_gaps(units: list) -> int:
    """Frames the camera itself skipped between consecutive units (capture times more than 1.5 periods apart)."""
    caps = [u[0] for u in units]
    return sum(max(0, round((b - a) / PERIOD_NS) - 1) for a, b in zip(caps, caps[1:]))


# --------------------------------------------------------------------------------------
# Glass-to-glass in Chromium

PAGE_JS = r"""
(async () => {
  const pc = new RTCPeerConnection();
  window.__pc = pc;
  pc.addTransceiver('video', {direction: 'recvonly'});
  const video = document.createElement('video');
  video.muted = true; video.autoplay = true; video.playsInline = true;
  video.style.cssText = 'position:fixed;left:0;top:0;width:640px;height:360px;z-index:99999;background:#000';
  document.body.appendChild(video);
  pc.ontrack = e => { video.srcObject = new MediaStream([e.track]); video.play().catch(() => {}); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => {
    if (pc.iceGatheringState === 'complete') return r();
    pc.addEventListener('icegatheringstatechange', () => { if (pc.iceGatheringState === 'complete') r(); });
    setTimeout(r, 3000);
  });
  const resp = await fetch('/whep/__STREAM__', {method: 'POST', body: pc.localDescription.sdp,
    headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer __TOKEN__'}});
  const text = await resp.text();
  if (resp.status !== 201) throw new Error('WHEP ' + resp.status + ': ' + text);
  window.__location = resp.headers.get('Location');
  await pc.setRemoteDescription({type: 'answer', sdp: text});
  const canvas = document.createElement('canvas');
  canvas.width = 32 * __BLOCK__; canvas.height = __BLOCK__;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const rec = window.__rec = [];
  const onFrame = (now, md) => {
    ctx.drawImage(video, 0, 0, canvas.width, canvas.height, 0, 0, canvas.width, canvas.height);
    const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const b = __BLOCK__, half = b >> 1;
    let n = 0, margin = 255;
    for (let i = 0; i < 32; i++) {
      const o = (half * canvas.width + half + b * i) * 4;
      const v = (px[o] + px[o + 1] + px[o + 2]) / 3;
      n = n * 2 + (v > 127 ? 1 : 0);
      margin = Math.min(margin, Math.abs(v - 127));
    }
    rec.push([n, md.presentationTime, md.expectedDisplayTime, md.receiveTime ?? null, now, performance.now(),
              md.presentedFrames, md.width, md.height, margin, md.rtpTimestamp ?? null]);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  return 'playing';
})()
"""


def page_clock(page, tries: int = 15) -> tuple[float, float]:
    """(offset, half width) in ms: CLOCK_MONOTONIC ms = the page's performance.now() + offset."""
    best: tuple[float, float] | None = None
    for _ in range(tries):
        m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        p = page.evaluate("performance.now()")
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or (m1 - m0) / 2e6 < best[1]:
            best = ((m0 + m1) / 2e6 - p, (m1 - m0) / 2e6)
    assert best is not None
    return best


def wall_offset(page) -> float:
    """The same offset from the page's wall clock: performance.timeOrigin (Unix ms) against CLOCK_REALTIME."""
    origin = page.evaluate("performance.timeOrigin")
    real_minus_mono, _ = clock_offset_ns()
    return origin - real_minus_mono / 1e6


def latency_row(box: Box, tap: BusTap, plan: Plan) -> dict:
    from tests.browser import Browser

    rec: dict = {"kind": "latency", "name": "glass-to-glass (Chromium, WHEP pass-through)"}
    t0 = tap.t0()
    block = max(1, min(16, WIDTH // 32))
    js = PAGE_JS.replace("__STREAM__", STREAM).replace("__TOKEN__", TOKEN).replace("__BLOCK__", str(block))
    c0 = proc_cpu_s(os.getpid()) or 0.0
    with Browser() as browser:
        rec["chromium"] = browser.send("Browser.getVersion").get("product", "?")
        page = browser.open(box.url + "/style.css")     # the box's origin, none of its page's players
        try:
            page.evaluate(js, timeout=20)
            page.wait_for("window.__rec && window.__rec.length >= 10", timeout=15)
            off0, err0 = page_clock(page)
            wall0 = wall_offset(page)
            w0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            chrome0 = _group_cpu(browser.proc.pid)
            time.sleep(plan.latency_s)
            w1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            chrome1 = _group_cpu(browser.proc.pid)
            off1, err1 = page_clock(page)
            wall1 = wall_offset(page)
            frames = page.evaluate("window.__rec")
            stats = page.evaluate("window.__pc.getStats().then(r => { for (const s of r.values()) "
                                  "if (s.type === 'inbound-rtp' && s.kind === 'video') return {decoded: "
                                  "s.framesDecoded, dropped: s.framesDropped, lost: s.packetsLost, codec: "
                                  "s.decoderImplementation, jitter_buffer_ms: s.jitterBufferDelay / "
                                  "Math.max(1, s.jitterBufferEmittedCount) * 1000, freezes: s.freezeCount}; "
                                  "return null; })")
            with_location = page.evaluate("window.__location")
            deleted = page.evaluate(f"fetch(window.__location, {{method: 'DELETE', headers: {{Authorization: "
                                    f"'Bearer {TOKEN}'}}}}).then(r => r.status)")
            page.evaluate("window.__pc.close()")
        except Exception as exc:
            raise RuntimeError(f"{exc}; the page said: {' | '.join(page.console[-8:])}"[:1500]) from None
    off = (off0 + off1) / 2
    rec.update({"clock_offset_drift_ms": off1 - off0, "clock_uncertainty_ms": max(err0, err1),
                "clock_wall_check_ms": (wall0 + wall1) / 2 - off,
                "chromium_cores": (chrome1 - chrome0) / ((w1 - w0) / 1e9),
                "browser_stats": stats, "whep_location": with_location, "whep_delete": deleted,
                "window_s": (w1 - w0) / 1e9})
    seen: set[int] = set()
    stages: dict[str, list[float]] = {"received": [], "presented": [], "expected": [], "glass": [], "read": [],
                                      "bus_to_glass": []}
    misread = unmatched = 0
    renumbered, frames = renumber(frames)
    for n, presented, expected, received, _now, after, _count, w, h, margin, rtp in frames:
        m = presented + off
        if not (w0 / 1e6 <= m < w1 / 1e6) or n in seen:
            continue
        seen.add(n)
        if (margin < 40 and rtp is None) or (w, h) != (WIDTH, HEIGHT):
            misread += 1
            continue
        c = capture_of(n, t0)
        if c not in tap.by_capture:
            unmatched += 1
            continue
        cms = c / 1e6
        stages["presented"].append(m - cms)
        glass = max(presented, expected) + off     # headless: expectedDisplayTime is a vsync estimate, at times before
        stages["glass"].append(glass - cms)
        stages["expected"].append(expected + off - cms)
        stages["read"].append(after + off - cms)
        stages["bus_to_glass"].append(glass - tap.units[tap.by_capture[c]][1] / 1e6)
        if received is not None:
            stages["received"].append(received + off - cms)
    bus = tap.window(w0, w1)
    rec["bus"] = dist([(p - c) / 1e6 for c, p, *_ in bus])
    rec["renumbered"] = renumbered
    for k, v in stages.items():
        rec[k] = dist(v)
    rec.update({"frames_presented": len(seen), "frames_matched": len(stages["glass"]), "misread": misread,
                "unmatched": unmatched, "bus_units": len(bus), "camera_gaps": camera_gaps(bus),
                "presented_fps": len(seen) / rec["window_s"],
                "loadgen_cores": ((proc_cpu_s(os.getpid()) or 0.0) - c0) / rec["window_s"]})
    g, b = rec["glass"], rec["bus_to_glass"]
    if b["n"]:
        rec["adds_p50_ms"], rec["adds_p99_ms"] = b["p50_ms"], b["p99_ms"]
    if not g["n"]:
        rec["failure"] = f"no frame number read back in the page ({len(frames)} callbacks, {misread} misread, " \
                         f"{unmatched} not on the bus)"
    return rec


def _signed32(v: int) -> int:
    v %= 2**32
    return v - 2**32 if v >= 2**31 else v


def renumber(frames: list) -> tuple[int, list]:
    """The frame number of each callback from its rtpTimestamp (the metadata's own frame): the drawn numbers give
    the RTP time of frame 0 (their median offset; 3000 ticks a frame), and a callback whose canvas caught a newer
    frame than its metadata describes is counted and renumbered. (how many were renumbered, the frames)"""
    with_rtp = [f for f in frames if f[10] is not None and f[9] >= 40]     # well read: far from mid-grey
    if len(with_rtp) < 10:
        return 0, frames
    n0, r0 = with_rtp[0][0], with_rtp[0][10]
    step = VIDEO_CLOCK / FPS
    offsets = sorted(_signed32(f[10] - r0) - step * (f[0] - n0) for f in with_rtp)
    base = offsets[len(offsets) // 2]
    out, moved = [], 0
    for f in frames:
        if f[10] is None:
            out.append(f)
            continue
        n = n0 + round((_signed32(f[10] - r0) - base) / step)
        moved += n != f[0]
        out.append([n, *f[1:]])
    return moved, out


def _group_cpu(pgid: int) -> float:
    """CPU seconds of every process in group `pgid` (Chromium's browser, renderer, GPU and utility processes)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += proc_cpu_s(int(pid)) or 0.0
    return total


# --------------------------------------------------------------------------------------
# Viewers: aiortc peers that count access units and never decode


class Viewer:
    def __init__(self, keep_keys: bool) -> None:
        self.pc = None
        self.location = ""
        self.base = ""
        self.arrivals: list[int] = []
        self.stamps: list[int] = []
        self.sizes: list[int] = []
        self.keys: list[int] | None = [] if keep_keys else None

    def on_unit(self, codec: str, data: bytes, timestamp: int) -> None:
        self.arrivals.append(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        self.stamps.append(timestamp)
        self.sizes.append(len(data))
        if self.keys is not None:
            self.keys.append(nal_key(data))

    def window(self, m0: int, m1: int) -> tuple[int, int, int, list[int]]:
        """(units, bytes, frames missing by RTP time, keys) of what arrived in [m0, m1)."""
        n = min(len(self.sizes), len(self.keys) if self.keys is not None else len(self.sizes))
        idx = [i for i, t in enumerate(self.arrivals[:n]) if m0 <= t < m1]
        stamps = [self.stamps[i] for i in idx]
        missing = sum(max(0, round(((b - a) % 2**32) / (VIDEO_CLOCK / FPS)) - 1) for a, b in zip(stamps, stamps[1:]))
        keys = [self.keys[i] for i in idx] if self.keys is not None else []
        return len(idx), sum(self.sizes[i] for i in idx), missing, keys


class Viewers:
    """N viewers of one WHEP URL on a private asyncio loop (a thread of this process)."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url, token
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="viewers", daemon=True)
        self.thread.start()
        self.viewers: list[Viewer] = []

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _open(self, keep_keys: bool) -> Viewer:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        from services.webrtc.peer import tap_video
        from tests.webrtc_peers import gathered, post_offer, prefer
        v = Viewer(keep_keys)
        pc = v.pc = RTCPeerConnection()
        tr = pc.addTransceiver("video", direction="recvonly")
        prefer(tr, "h264")
        tap_video(tr.receiver, v.on_unit)       # before the receiver starts: its decoder thread waits on the tap
        r = await post_offer(self.url, await gathered(pc), self.token)
        if r.status_code != 201:
            await pc.close()
            raise RuntimeError(f"WHEP {r.status_code}: {r.text[:200]}")
        v.location = r.headers.get("Location", "")
        await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
        return v

    async def _grow(self, n: int) -> list[str]:
        errors = []
        want = n - len(self.viewers)
        for start in range(0, want, 8):              # 8 offers at a time
            batch = await asyncio.gather(*(self._open(not self.viewers and i == 0)
                                           for i in range(start, min(want, start + 8))), return_exceptions=True)
            for v in batch:
                if isinstance(v, BaseException):
                    errors.append(f"{type(v).__name__}: {v}"[:200])
                else:
                    self.viewers.append(v)
        return errors

    async def _shrink(self, n: int) -> None:
        from tests.webrtc_peers import request
        gone, self.viewers = self.viewers[n:], self.viewers[:n]
        for v in gone:
            if v.location:
                base = self.url.split("/whep/", 1)[0]
                try:
                    await request("DELETE", base + v.location, token=self.token)
                except Exception:
                    pass
            await v.pc.close()

    def resize(self, n: int) -> list[str]:
        """Open or close viewers until there are n: the errors of those that did not open."""
        if n > len(self.viewers):
            return self.call(self._grow(n), timeout=30 + 3 * n)
        if n < len(self.viewers):
            self.call(self._shrink(n), timeout=30 + n)
        return []

    def wait_flowing(self, timeout: float) -> int:
        """Waits until every viewer has had a unit: how many have not."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = sum(1 for v in self.viewers if not v.arrivals)
            if not waiting or time.monotonic() > deadline:
                return waiting
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self.call(self._shrink(0), timeout=30)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --------------------------------------------------------------------------------------
# The naive path: a child process that decodes once and lets aiortc encode per viewer

NAIVE_STATS = "/stats"


def naive_server_main(prefix: str) -> int:
    """`--naive-server PREFIX`: WHEP on 127.0.0.1:0 (the port printed), POST /decode starts reading the camera."""
    import concurrent.futures

    import av
    from aiohttp import web
    from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

    from services.webrtc.peer import limit_host_addresses
    limit_host_addresses([LOOPBACK])

    class Pictures:
        def __init__(self) -> None:
            self.frame = None
            self.seq = 0
            self.decoded = 0
            self.changed: asyncio.Condition | None = None

    pics = Pictures()
    pcs: dict[str, tuple] = {}
    decoder_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decoder")

    class Transcoded(MediaStreamTrack):
        """The newest decoded picture, each once: aiortc's sender encodes it (its own libx264 per viewer)."""

        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self.seen = 0
            self.given = 0

        async def recv(self):
            async with pics.changed:
                await pics.changed.wait_for(lambda: pics.seq > self.seen or self.readyState != "live")
            if self.readyState != "live":
                from aiortc.mediastreams import MediaStreamError
                raise MediaStreamError
            self.seen = pics.seq
            self.given += 1
            return pics.frame

    async def read_camera() -> None:
        codec = av.CodecContext.create("h264", "r")      # as aiortc's H264Decoder makes it
        consumer = framebus.Consumer.attach(STREAM, prefix=prefix, missing_ok=True, start="next")
        loop = asyncio.get_running_loop()
        t0 = None
        synced = False
        while True:
            item = await consumer.receive_async(1.0)
            if item is None:
                continue
            if not synced and not item.keyframe:
                continue
            synced = True
            data, capture = bytes(item.copy()), item.capture_ns
            frames = await loop.run_in_executor(decoder_pool, lambda d=data: list(codec.decode(av.Packet(d))))
            for f in frames:
                t0 = capture if t0 is None else t0
                f.pts, f.time_base = (capture - t0) * VIDEO_CLOCK // NS, Fraction(1, VIDEO_CLOCK)
                pics.decoded += 1
                async with pics.changed:
                    pics.frame, pics.seq = f, pics.seq + 1
                    pics.changed.notify_all()

    async def whep(request: web.Request) -> web.Response:
        offer = await request.text()
        pc = RTCPeerConnection()
        track = Transcoded()
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        pc.addTrack(track)
        await pc.setLocalDescription(await pc.createAnswer())
        ident = f"v{len(pcs) + 1}"
        pcs[ident] = (pc, track)
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/whep/{STREAM}/{ident}"})

    async def delete(request: web.Request) -> web.Response:
        pc, track = pcs.pop(request.match_info["ident"], (None, None))
        if pc is not None:
            track.stop()
            async with pics.changed:
                pics.changed.notify_all()
            await pc.close()
        return web.Response(status=200 if pc else 404)

    async def decode(request: web.Request) -> web.Response:
        if not getattr(app, "reading", None):
            app.reading = asyncio.ensure_future(read_camera())
        return web.json_response({"ok": True})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"decoded": pics.decoded, "given": [t.given for _, t in pcs.values()]})

    app = web.Application()
    app.router.add_post("/whep/{stream}", whep)
    app.router.add_delete("/whep/{stream}/{ident}", delete)
    app.router.add_post("/decode", decode)
    app.router.add_get(NAIVE_STATS, stats)

    async def serve() -> None:
        pics.changed = asyncio.Condition()
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for pc, _ in list(pcs.values()):
            await pc.close()
        await runner.cleanup()

    asyncio.run(serve())
    return 0


class Naive:
    def __init__(self, prefix: str, log_path: Path) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--naive-server", prefix],
                                     cwd=_ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)
        line = ""
        deadline = time.monotonic() + 30
        while not line.strip().isdigit():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the naive server did not start (rc {self.proc.poll()}); see {log_path}")
            line = self.proc.stdout.readline()
        self.url = f"http://{LOOPBACK}:{int(line)}"

    def post(self, path: str) -> dict:
        req = urllib.request.Request(self.url + path, data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + NAIVE_STATS, timeout=5) as r:
            return json.loads(r.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------------------
# One measured step


def measure(box: Box, tap: BusTap, viewers: Viewers | None, seconds: float, pid: int, *, kind: str, n: int,
            dropped: bool) -> dict:
    """CPU of `pid` (and the rest), the viewers' units, the camera's and (with `dropped`) the service's drops over
    one window of `seconds`."""
    pids = box.pids()
    others = {"capture": pids.get(f"capture@{STREAM}"), "hub": pids.get("hub"), "run": box.proc.pid,
              "webrtc": pids.get("webrtc")}
    others = {k: v for k, v in others.items() if v and v != pid}
    d0 = box.settled_dropped() if dropped else {}
    busy0 = machine_busy_s()[0]
    c0 = {k: proc_cpu_s(p) or 0.0 for k, p in {**others, "process": pid, "loadgen": os.getpid()}.items()}
    m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    time.sleep(seconds)
    m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    c1 = {k: proc_cpu_s(p) or 0.0 for k, p in {**others, "process": pid, "loadgen": os.getpid()}.items()}
    busy1 = machine_busy_s()[0]
    d1 = box.settled_dropped() if dropped else {}
    win = (m1 - m0) / 1e9
    cores = {k: (c1[k] - c0[k]) / win for k in c0}
    bus = tap.window(m0, m1)
    gaps = camera_gaps(bus)
    rec = {"kind": kind, "viewers": n, "window_s": win, "process_pct": 100 * cores.pop("process"),
           "loadgen_pct": 100 * cores.pop("loadgen"), "others_pct": {k: 100 * v for k, v in cores.items()},
           "machine_busy_pct": 100 * (busy1 - busy0) / win, "camera_fps": len(bus) / win, "camera_gaps": gaps,
           "camera_kbps": sum(u[2] for u in bus) * 8 / win / 1000}
    rec["other_load_pct"] = rec["machine_busy_pct"] - rec["process_pct"] - rec["loadgen_pct"] - \
        sum(rec["others_pct"].values())
    if dropped:
        rec["dropped"] = {k: round(d1.get(k, 0.0) - d0.get(k, 0.0)) for k in set(d0) | set(d1)
                          if round(d1.get(k, 0.0) - d0.get(k, 0.0))}
    if viewers is not None and viewers.viewers:
        per = [v.window(m0, m1) for v in viewers.viewers]
        fps = [u / win for u, *_ in per]
        lost = [max(0, miss - gaps) for _, _, miss, _ in per]
        rec.update({"fps_min": min(fps), "fps_mean": sum(fps) / len(fps), "lost_max": max(lost),
                    "lost_total": sum(lost), "kbps_mean": sum(b for _, b, _, _ in per) * 8 / win / 1000 / len(per)})
        keys = per[0][3]
        if keys:
            rec["identical_units"] = sum(1 for k in keys if k in tap.keys)
            rec["checked_units"] = len(keys)
    return rec


# --------------------------------------------------------------------------------------
# The run


def passthrough_step(box: Box, tap: BusTap, viewers: Viewers, n: int, plan: Plan, webrtc_pid: int) -> dict:
    t = time.monotonic()
    errors = viewers.resize(n)
    name = f"pass-through N={n}"
    if errors:
        return {"kind": "pass-through", "name": name, "viewers": n, "sustained": False, "opened": len(viewers.viewers),
                "why": f"{len(errors)} viewer(s) not opened: {errors[0]}"}
    silent = viewers.wait_flowing(10.0)
    if silent:
        return {"kind": "pass-through", "name": name, "viewers": n, "sustained": False,
                "why": f"{silent} viewer(s) got no video in 10 s"}
    connect_s = time.monotonic() - t
    rec = measure(box, tap, viewers, plan.seconds, webrtc_pid, kind="pass-through", n=n, dropped=True)
    rec["name"], rec["connect_s"] = name, connect_s
    if n:
        listing = box.api("/api/webrtc").get("sessions", [])
        mine = [s for s in listing if s.get("kind") == "viewer"]
        rec["paths"] = sorted({s.get("path", "?") for s in mine})
        rec["codecs"] = sorted({s.get("video_codec") or "?" for s in mine})
        rec["sessions"] = len(mine)
        why = []
        if rec["fps_min"] < MIN_FPS:
            why.append(f"a viewer at {rec['fps_min']:.1f} fps (< {MIN_FPS:g})")
            if rec["camera_fps"] < MIN_FPS and not rec["lost_max"] and not rec.get("dropped"):
                rec["cause"] = "camera"
                why.append(f"the camera itself made {rec['camera_fps']:.1f} fps ({rec['camera_gaps']} frames skipped, "
                           f"other load {rec['other_load_pct']:.0f} % of a core): every frame it made reached every "
                           "viewer")
        if rec["lost_max"]:
            why.append(f"up to {rec['lost_max']} frame(s) missing at a viewer")
        if rec.get("dropped"):
            why.append("the service dropped " + ", ".join(f"{v} {k}" for k, v in sorted(rec["dropped"].items())))
        if len(mine) != n:
            why.append(f"{len(mine)} viewer sessions listed")
        rec["sustained"] = not why
        rec["why"] = "; ".join(why)
    return rec


def naive_rows(box: Box, tap: BusTap, plan: Plan, tmp_log: Path) -> list[dict]:
    rows = []
    naive = Naive(box.prefix, tmp_log)
    viewers = None
    try:
        _, rest, _ = pinning()
        if rest:
            pin_threads(naive.proc.pid, rest)
        time.sleep(1.0)
        r = measure(box, tap, None, plan.seconds, naive.proc.pid, kind="naive", n=0, dropped=False)
        rows.append({**r, "name": "naive: the server idle", "stage": "idle"})
        naive.post("/decode")
        time.sleep(1.0)
        s0 = naive.stats()
        r = measure(box, tap, None, plan.seconds, naive.proc.pid, kind="naive", n=0, dropped=False)
        s1 = naive.stats()
        rows.append({**r, "name": "naive: decoding, no viewer", "stage": "decoding",
                     "decoded_fps": (s1["decoded"] - s0["decoded"]) / r["window_s"]})
        viewers = Viewers(naive.url + f"/whep/{STREAM}", None)
        for n in plan.naive_viewers:
            errors = viewers.resize(n)
            if errors:
                rows.append({"kind": "naive", "name": f"naive N={n}", "viewers": n, "stage": "viewers",
                             "failure": errors[0]})
                break
            silent = viewers.wait_flowing(15.0)
            if silent:
                rows.append({"kind": "naive", "name": f"naive N={n}", "viewers": n, "stage": "viewers",
                             "failure": f"{silent} viewer(s) got no video in 15 s"})
                break
            time.sleep(2.0)    # the encoders settle (aiortc's bit rate follows REMB)
            s0 = naive.stats()
            r = measure(box, tap, viewers, plan.seconds, naive.proc.pid, kind="naive", n=n, dropped=False)
            s1 = naive.stats()
            given = [b - a for a, b in zip(s0["given"], s1["given"])]
            rows.append({**r, "name": f"naive N={n}", "stage": "viewers",
                         "decoded_fps": (s1["decoded"] - s0["decoded"]) / r["window_s"],
                         "encoded_fps_min": min(given) / r["window_s"] if given else 0.0})
    finally:
        if viewers is not None:
            viewers.close()
        naive.close()
    return rows


def next_n(tried: dict[int, bool], max_n: int, ladder: tuple) -> int | None:
    lo = max((n for n, ok in tried.items() if ok), default=0)
    hi = min((n for n, ok in tried.items() if not ok), default=None)
    if hi is None:
        up = next((n for n in ladder if n > lo), None)
        return None if lo >= max_n else min(up if up is not None else 2 * lo, max_n)
    if hi - lo <= max(1, lo // 8):
        return None
    return (lo + hi) // 2


def run(plan: Plan, started: float) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    box = Box(plan.max_viewers)
    tap = viewers = None
    info: dict = {"prefix": box.prefix}
    try:
        log(f"-- the box ({box.dir})")
        box.up()
        pinned, _rest, info["pinning"] = pinning()
        pids = box.pids()
        webrtc_pid = pids["webrtc"]
        if pinned:
            pin_threads(webrtc_pid, pinned)
        from services.webrtc.peer import add_h264_profiles
        from tests.webrtc_peers import loopback_ice
        loopback_ice()
        add_h264_profiles()       # the viewers offer H.264 High too, as Chromium does: the camera passes through
        tap = BusTap(box.prefix)
        tap.start()
        time.sleep(1.0)

        log(f"-- glass-to-glass: Chromium plays {STREAM} by WHEP for {plan.latency_s:g} s")
        try:
            rows.append(latency_row(box, tap, plan))
        except Exception as exc:     # noqa: BLE001 (a row that fails is reported, the others still run)
            rows.append({"kind": "latency", "name": "glass-to-glass (Chromium, WHEP pass-through)",
                         "failure": f"{type(exc).__name__}: {exc}"[:600]})
        log_row(rows[-1])
        time.sleep(1.0)             # Chromium's connection ends in the service

        viewers = Viewers(box.url + f"/whep/{STREAM}", TOKEN)
        tried: dict[int, bool] = {}
        r = passthrough_step(box, tap, viewers, 0, plan, webrtc_pid)
        r["sustained"] = True
        rows.append(r)
        log_row(r)
        n = next_n(tried, plan.max_viewers, plan.ladder)
        while n is not None:
            if time.monotonic() - started > plan.budget_s and 10 in tried:
                info["sweep_stopped"] = f"the time budget ({plan.budget_s:g} s) was spent"
                break
            r = passthrough_step(box, tap, viewers, n, plan, webrtc_pid)
            rows.append(r)
            log_row(r)
            if r.get("cause") == "camera":      # the camera starved (by this load or another's): one more look
                r["retried"] = True
                r = passthrough_step(box, tap, viewers, n, plan, webrtc_pid)
                r["name"] += " (again)"
                rows.append(r)
                log_row(r)
            tried[n] = bool(r.get("sustained"))
            if not tried[n]:     # what the failed step queued drains, the viewers' gates reopen on a keyframe, and
                time.sleep(2 * GOP_S + 2)      # the camera's rate control pays back the keyframes they asked for
            if box.proc.poll() is not None or webrtc_pid not in box.pids().values():
                info["sweep_stopped"] = "the webrtc process ended"
                break
            n = next_n(tried, plan.max_viewers, plan.ladder)
        viewers.close()
        viewers = None

        log("-- the naive path: decode once, aiortc encodes per viewer")
        try:
            for r in naive_rows(box, tap, plan, box.dir / "naive.log"):
                rows.append(r)
                log_row(r)
        except Exception as exc:     # noqa: BLE001
            rows.append({"kind": "naive", "name": "naive", "failure": f"{type(exc).__name__}: {exc}"[:600]})
            log_row(rows[-1])
        info["box_warnings"] = box.warning_lines()[-8:]
        try:
            info["naive_log"] = (box.dir / "naive.log").read_text(errors="replace")[-1500:]
        except OSError:
            pass
    finally:
        if viewers is not None:
            viewers.close()
        if tap is not None:
            tap.close()
        box.close()
    return rows, info


def log_row(r: dict) -> None:
    if r.get("failure"):
        log(f"   {r['name']}: FAILED {r['failure'][:300]}")
    elif r["kind"] == "latency":
        log(f"   glass p50 {_pc(r['glass']['p50_ms'])} ms p99 {_pc(r['glass']['p99_ms'])} ms; bus p50 "
            f"{_pc(r['bus']['p50_ms'], 2)} ms; {r['frames_matched']} frames, {r['misread']} misread, "
            f"{r['unmatched']} unmatched")
    elif "process_pct" not in r:
        log(f"   {r['name']}: NOT sustained: {r.get('why')}")
    else:
        extra = f", fps min {r['fps_min']:.1f}, lost {r['lost_max']}" if "fps_min" in r else ""
        log(f"   {r['name']}: process {r['process_pct']:.1f} % of a core{extra}, load gen {r['loadgen_pct']:.0f} %, "
            f"machine {r['machine_busy_pct']:.0f} %" + (f"; {r['why']}" if r.get("why") else ""))


# --------------------------------------------------------------------------------------
# Figures


def annotate(rows: list[dict]) -> dict:
    """Per-viewer CPU on every measured row; the summary figures."""
    pt = {r["viewers"]: r for r in rows if r["kind"] == "pass-through" and "process_pct" in r}
    idle = pt.get(0)
    for n, r in pt.items():
        if n and idle:
            r["per_viewer_pct"] = (r["process_pct"] - idle["process_pct"]) / n
    nv = {r.get("stage"): r for r in rows if r["kind"] == "naive" and "process_pct" in r and r["viewers"] == 0}
    for r in rows:
        if r["kind"] == "naive" and r.get("stage") == "viewers" and "process_pct" in r:
            if "idle" in nv:
                r["per_viewer_pct"] = (r["process_pct"] - nv["idle"]["process_pct"]) / r["viewers"]
            if "decoding" in nv:
                r["encode_per_viewer_pct"] = (r["process_pct"] - nv["decoding"]["process_pct"]) / r["viewers"]
    s: dict = {}
    lat = next((r for r in rows if r["kind"] == "latency" and not r.get("failure")), None)
    if lat:
        s.update({"glass_p50_ms": lat["glass"]["p50_ms"], "glass_p99_ms": lat["glass"]["p99_ms"],
                  "bus_p50_ms": lat["bus"]["p50_ms"], "bus_p99_ms": lat["bus"]["p99_ms"],
                  "webrtc_adds_p50_ms": lat.get("adds_p50_ms"), "webrtc_adds_p99_ms": lat.get("adds_p99_ms")})
    per = [(n, r["per_viewer_pct"]) for n, r in sorted(pt.items()) if "per_viewer_pct" in r and r.get("sustained")] \
        or [(n, r["per_viewer_pct"]) for n, r in sorted(pt.items()) if "per_viewer_pct" in r]
    per = [p for p in per if p[0] == 10] or per        # N=10 (the target's N) when measured
    if per:
        s["passthrough_per_viewer_pct"] = per[-1][1]
        s["passthrough_per_viewer_at"] = per[-1][0]
    ten = pt.get(10)
    if ten and idle:
        s["passthrough_10_viewers_pct"] = ten["process_pct"] - idle["process_pct"]
    one = next((r for r in rows if r["kind"] == "naive" and r.get("stage") == "viewers" and r["viewers"] == 1
                and "per_viewer_pct" in r), None)
    if one:
        s["one_transcode_pct"] = one["per_viewer_pct"]
    if one:          # one viewer: the naive rows with more may not keep up (fewer frames encoded, less CPU each)
        s["transcode_per_viewer_pct"] = one["per_viewer_pct"]
        s["transcode_encode_per_viewer_pct"] = one.get("encode_per_viewer_pct")
    ok = [n for n, r in pt.items() if n and r.get("sustained")]
    s["highest_sustained"] = max(ok, default=0)
    failed = sorted(r["viewers"] for r in rows if r["kind"] == "pass-through" and r["viewers"]
                    and not r.get("sustained") and not r.get("retried"))
    s["lowest_failed"] = failed[0] if failed else None
    checked = [r for r in rows if r.get("checked_units") and r["kind"] == "pass-through"]
    if checked:
        s["identical_units"] = sum(r["identical_units"] for r in checked)
        s["checked_units"] = sum(r["checked_units"] for r in checked)
    return s


def targets(s: dict, plan: Plan) -> list[tuple[str, str, str]]:
    out = []
    pv, tv = s.get("passthrough_per_viewer_pct"), s.get("transcode_per_viewer_pct")
    same = s.get("identical_units"), s.get("checked_units")
    if pv is not None and tv is not None:
        detail = f"{pv:.2f} % of a core per viewer passed through (at N={s['passthrough_per_viewer_at']}) against " \
                 f"{tv:.1f} % per viewer decoded and re-encoded ({tv / max(pv, 1e-6):.0f}x)"
        if same[1]:
            detail += f"; the first viewer's access units were the bus's byte for byte: {same[0]}/{same[1]}"
        out.append(("PASS" if pv < tv and (not same[1] or same[0] == same[1]) else "FAIL",
                    "pass-through adds no decode and no encode", detail))
    ten, one = s.get("passthrough_10_viewers_pct"), s.get("one_transcode_pct")
    if ten is not None and one is not None:
        out.append(("PASS" if ten < one else "FAIL", "10 viewers cost less CPU than one transcode",
                    f"10 viewers passed through: {ten:.1f} % of a core above the idle service; one viewer "
                    f"transcoded: {one:.1f} % above the idle server"))
    g = s.get("glass_p50_ms")
    if g is not None:
        out.append(("PASS" if g < TARGET_G2G_MS else "FAIL", f"glass-to-glass p50 under {TARGET_G2G_MS:g} ms",
                    f"p50 {g:.1f} ms, p99 {s['glass_p99_ms']:.1f} ms; the camera to the bus alone p50 "
                    f"{s['bus_p50_ms']:.1f} ms: WebRTC (service, network, Chromium's jitter buffer, decode and "
                    f"render) adds {s['webrtc_adds_p50_ms']:.1f} ms p50 / {s['webrtc_adds_p99_ms']:.1f} ms p99"))
    best = s.get("highest_sustained", 0)
    detail = f"{best}"
    if s.get("lowest_failed") is not None:
        detail += f"; {s['lowest_failed']} failed"
    elif best >= plan.max_viewers:
        detail += f" (the cap, --max-viewers {plan.max_viewers})"
    out.append(("INFO", f"the most 720p30 viewers with zero loss (>= {MIN_FPS:g} fps each, nothing dropped)", detail))
    return out


def table(rows: list[dict]) -> str:
    out = ["| row | viewers | process CPU % | per viewer % | fps min (mean) | lost / dropped | camera fps | "
           "load gen % | other load % | notes |", "|---|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["kind"] == "latency":
            continue
        if r.get("failure"):
            out.append(f"| {r['name']} | {r.get('viewers', '')} | FAILED | | | | | | | {r['failure'][:160]} |")
            continue
        if "process_pct" not in r:
            out.append(f"| {r['name']} | {r['viewers']} | | | | | | | | NOT sustained: {r.get('why', '')[:160]} |")
            continue
        notes = []
        if r["kind"] == "pass-through" and r["viewers"]:
            notes.append("sustained" if r.get("sustained") else f"NOT sustained: {r.get('why')}")
            notes.append(f"{r.get('kbps_mean', 0):.0f} kbit/s each; path {'/'.join(r.get('paths', []))} "
                         f"{'/'.join(r.get('codecs', []))}")
            if r.get("checked_units"):
                notes.append(f"{r['identical_units']}/{r['checked_units']} units the bus's bytes")
        if r["kind"] == "naive":
            if "decoded_fps" in r:
                notes.append(f"decoded {r['decoded_fps']:.1f} fps")
            if "encoded_fps_min" in r:
                notes.append(f"encoded {r['encoded_fps_min']:.1f} fps per viewer (min), {r.get('kbps_mean', 0):.0f} "
                             "kbit/s each")
            if r.get("encode_per_viewer_pct") is not None:
                notes.append(f"encode {r['encode_per_viewer_pct']:.1f} % per viewer")
            if r.get("checked_units"):
                notes.append(f"{r['identical_units']}/{r['checked_units']} units the bus's bytes (re-encoded)")
        o = r["others_pct"]
        notes.append("camera " + _pc(o.get("capture"), 0) + f" % ({r['camera_kbps']:.0f} kbit/s), hub "
                     + _pc(o.get("hub"), 0) + " %")
        fps = f"{r['fps_min']:.1f} ({r['fps_mean']:.1f})" if "fps_min" in r else ""
        lost = f"{r.get('lost_max', '')} / {sum(r.get('dropped', {}).values()) if 'dropped' in r else '-'}" \
            if "fps_min" in r else ""
        out.append(f"| {r['name']} | {r['viewers']} | {r['process_pct']:.1f} | {_pc(r.get('per_viewer_pct'), 2)} | "
                   f"{fps} | {lost} | {r['camera_fps']:.1f} | {r['loadgen_pct']:.0f} | {r['other_load_pct']:.0f} | "
                   f"{'; '.join(notes)} |")
    return "\n".join(out)


def latency_table(rows: list[dict]) -> str:
    r = next((x for x in rows if x["kind"] == "latency"), None)
    if r is None:
        return ""
    if r.get("failure"):
        return f"glass-to-glass: FAILED: {r['failure']}"
    out = ["| from capture_ns to | frames | p50 ms | p99 ms | min ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("bus", "the bus (publish_ns): the limit"),
                       ("received", "Chromium has the frame (rVFC receiveTime)"),
                       ("presented", "presented (rVFC presentationTime)"),
                       ("expected", "rVFC expectedDisplayTime (headless: a vsync estimate)"),
                       ("glass", "on the glass: the later of the two"),
                       ("read", "its number read back in JS")):
        d = r[key]
        out.append(f"| {label} | {d['n']} | {_pc(d['p50_ms'], 2)} | {_pc(d['p99_ms'], 2)} | {_pc(d['min_ms'], 2)} | "
                   f"{_pc(d['max_ms'], 2)} |")
    d = r["bus_to_glass"]
    out.append(f"| what WebRTC adds: the bus (publish_ns) -> the glass, per frame | {d['n']} | {_pc(d['p50_ms'], 2)} | "
               f"{_pc(d['p99_ms'], 2)} | {_pc(d['min_ms'], 2)} | {_pc(d['max_ms'], 2)} |")
    st = r.get("browser_stats") or {}
    out += ["", f"{r['frames_presented']} frames presented in {r['window_s']:.1f} s ({r['presented_fps']:.1f} fps), "
            f"{r['frames_matched']} read and matched ({r['renumbered']} renumbered by their rtpTimestamp: the "
            f"canvas had caught the next frame), {r['misread']} misread, {r['unmatched']} not on the bus; "
            f"camera {r['bus_units']} units, {r['camera_gaps']} skipped; Chromium {r['chromium_cores'] * 100:.0f} % "
            f"of a core, jitter buffer {_pc(st.get('jitter_buffer_ms'))} ms, "
            f"{st.get('freezes', '?')} freezes, {st.get('lost', '?')} packets lost; page clock +-"
            f"{r['clock_uncertainty_ms']:.2f} ms (drift {r['clock_offset_drift_ms']:.2f} ms, wall-clock check "
            f"{r['clock_wall_check_ms']:+.1f} ms)"]
    return "\n".join(out)


def report(rows: list[dict], info: dict, s: dict, plan: Plan, name: str, elapsed: float, load: tuple) -> str:
    lat = next((r for r in rows if r["kind"] == "latency"), {})
    text = [f"## WebRTC benchmark ({name}, {elapsed:.0f} s, code {code_version()}, {os.cpu_count()} CPUs, load average "
            f"{' '.join(f'{x:.2f}' for x in load)} at start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end, "
            f"{lat.get('chromium', 'Chromium ?')})", "", "### glass-to-glass: synthetic camera -> WHEP -> Chromium",
            "", latency_table(rows), "", "### CPU per viewer and viewers sustained (720p30, one camera)", "",
            table(rows), "", "## targets", ""]
    text += [f"- {v}  {t}: {d}" for v, t, d in targets(s, plan)]
    text += ["", "## notes", "",
             f"- camera: synthetic {WIDTH}x{HEIGHT} {FPS} fps, libx264 veryfast/zerolatency in capture@{STREAM}, "
             f"{KBPS} kbit/s target, a keyframe every {GOP_S:g} s; {info.get('pinning', '')}.",
             "- CPU: % of one core, utime + stime of the process over the window (/proc/PID/stat). "
             "pass-through: the webrtc process; per viewer: above the same process with no viewer (N=0). naive: the "
             "naive server process; per viewer: above the server idle (decode + encode + send), encode: above it "
             "decoding with no viewer. load gen: this process (the aiortc viewers, the bus tap). "
             "other load: what the machine spent outside all of these (other work on this machine, softirq).",
             f"- sustained: every viewer >= {MIN_FPS:g} fps in the window, no frame missing beyond the camera's own "
             "gaps, edgeroom_webrtc_viewer_dropped_total unchanged. The viewers do not decode (aiortc's receiver "
             "tapped before its decoder).",
             "- glass-to-glass: the frame number drawn by the camera read back from each frame Chromium presents "
             "(requestVideoFrameCallback, a canvas), against the frame's capture_ns; the page's performance.now() "
             "mapped to CLOCK_MONOTONIC by CDP round trips. Headless Chromium composites without a display: "
             "its expectedDisplayTime is an estimate of a vsync, at times before the frame's presentationTime; the "
             "glass is the later of the two, per frame."]
    if info.get("sweep_stopped"):
        text.append(f"- the sweep stopped early: {info['sweep_stopped']}")
    if info.get("box_warnings"):
        text.append("- the box logged: " + " | ".join(info["box_warnings"][-4:]))
    return "\n".join(text)


def _round(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--naive-server":
        return naive_server_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="L = 5, S = 3, N up to 10, naive N = 1 (~60 s)")
    ap.add_argument("--seconds", type=float, help="the measured window of a CPU / viewers step (default 8, --quick 3)")
    ap.add_argument("--latency-seconds", type=float, help="the glass-to-glass window (default 20, --quick 5)")
    ap.add_argument("--max-viewers", type=int, help="the most viewers tried (default 64, --quick 10)")
    ap.add_argument("--json", metavar="PATH", help="write the result as JSON (it is printed too)")
    args = ap.parse_args(argv)
    plan = replace(QUICK if args.quick else FULL)
    for key, attr, least in (("seconds", "seconds", 1), ("latency_seconds", "latency_s", 1),
                             ("max_viewers", "max_viewers", 1)):
        v = getattr(args, key)
        if v is not None:
            if v < least:
                ap.error(f"--{key.replace('_', '-')}: at least {least}")
            setattr(plan, attr, v)
    if not os.access("/usr/bin/chromium", os.X_OK):
        ap.error("chromium is not installed (/usr/bin/chromium; apt-get install chromium)")
    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    load = os.getloadavg()
    try:
        rows, info = run(plan, t0)
    except KeyboardInterrupt:
        log("interrupted: every child stopped, temp dirs and bus objects removed")
        return 130
    s = annotate(rows)
    name = ("quick" if args.quick else "full") + "".join(
        f", --{k.replace('_', '-')} {v:g}" for k, v in (("seconds", args.seconds),
                                                         ("latency_seconds", args.latency_seconds),
                                                         ("max_viewers", args.max_viewers)) if v is not None)
    print(report(rows, info, s, plan, name, time.monotonic() - t0, load), flush=True)
    out = _round({"plan": name, "seconds": plan.seconds, "latency_seconds": plan.latency_s,
                  "max_viewers": plan.max_viewers, "cpus": os.cpu_count(),
                  "loadavg_start": list(load), "loadavg_end": list(os.getloadavg()), "code": code_version(),
                  "camera": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "kbps": KBPS, "gop_s": GOP_S},
                  "info": info, "summary": s,
                  "targets": [{"verdict": v, "target": t, "detail": d} for v, t, d in targets(s, plan)],
                  "rows": rows})
    print("\n## JSON\n\n" + json.dumps(out), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failure") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
