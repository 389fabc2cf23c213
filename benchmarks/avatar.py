"""Avatar benchmark: edgeroom-avatar (services/avatar/) against the reference WebSocket avatar server, from the
voice's capture to the face and the voice on the bus, at the caller, and in CPU, against the limit and against
the naive path (RoomKit's one blocking round trip per 40 ms chunk).

Run from the repository root:

    .venv/bin/python benchmarks/avatar.py [--quick] [--json PATH] [--seconds S] [--avatars N]

What it answers, on this machine, for avatars of 512x512 at 25 frames/s driven by a 16 kHz voice on the bus:
how long after a slice of voice is captured its frame and its audio are on the bus (p50/p99), how far the
mouth is from the voice at a caller of the room (the target: within 40 ms), and what the avatar service costs
in CPU per avatar, each against the limit and the naive path, in the same run.

Method
------
* The server: tests/avatar_server.py's `AvatarServer` (RoomKit's protocol, the mouth follows loudness), in a
  process of its own (`benchmarks/avatar.py --serve`), so nothing it does is counted as the service's CPU.
  Three settings, switched on its stdin between phases:
  - fast: as it is (a 512x512 frame drawn and sent in a few ms);
  - late 50 ms: every answer (frames and end marker) is sent 50 ms after it was made, while the next message
    is taken at once (a GPU server that pipelines, or one 50 ms away): a round trip above 40 ms that keeps
    up with real time;
  - busy 30 ms: the reference server's own `delay`: 30 ms of work per message, one message after the other
    (a server whose cost is per message, not per frame).
* The voice: this process publishes a 16 kHz mono stream per avatar (vI-audio) in 20 ms chunks (what a
  WebRTC or SIP call puts on the bus), each chunk when it is complete (its first sample's capture time plus
  20 ms) and stamped with its first sample's capture time: 0.4 s of 440 Hz at -6 dBFS, 0.4 s of silence, and
  so on (one turn per phase: a stream of silence is a turn whose mouth stays shut). A slice is one frame's
  voice (40 ms); slice k of a phase has the capture time t0 + 40 k ms.
* Latency (audio-in to the first frame on the bus): this process reads what each path publishes (NAME and
  NAME-audio) and pairs by capture time: a slice's latency is when its audio chunk is on the bus less its
  capture time (both paths put the picture on the bus just before its audio, stamped alike; a picture's
  own stamp is moved when a repeated picture went first, so the audio is the one to pair; the pictures
  paired by their own stamp are counted and their p50 shown beside). "Falls behind": the slope of the
  latency over the phase's slices, in ms per second (0 when it keeps up). Every slice sent is waited for
  (up to 3x the phase plus 3 s); those never out are "missing".
  - limit: a bare WebSocket client on the same server (`websockets.sync.client`, in this process, nothing
    else running): send one 40 ms slice, time until its frame is back, one slice every 40 ms. The limit of
    audio-in to frame is the slice's 40 ms (its last sample is captured 40 ms after its first) plus that
    round trip.
  - edgeroom-avatar: a private box (`python -m services.cli run`: the hub and the avatar service only) with
    [avatars.a1] (websocket, 512x512, 25 fps, audio v1-audio); a2..aN started by `avatar.start` for the N
    row. Phases: fast x1, late x1, fast xN, busy x1. The service's own counts (frames provider/held, late
    frames dropped, provider errors) from `avatar.list` before and after each phase.
  - naive (RoomKit's WebSocketAvatarProvider, roomkit/video/avatar/websocket.py): a process
    (`--naive`) with one thread per avatar doing what RoomKit's `feed_audio` does, one blocking round trip per
    40 ms chunk (`websockets.sync.client`: send the chunk, receive until the empty message, the frame's
    payload copied out of the message as RoomKit's `VideoFrame` is), and then what the box needs of any
    avatar: the picture and the chunk's audio (at 48 kHz, the same resampler) on the bus with the chunk's
    capture time. A reader thread queues the voice from the bus as it comes (RoomKit's queue before its
    provider thread), so a naive path that falls behind falls behind for good, as RoomKit did. It sends the
    reference image (RoomKit sent an empty one: the reference server would draw cheaper pictures). Phases:
    fast x1, fast xN, late x1, busy x1.
* Lip sync at the caller: tests/test_avatar.py's box (edgeroom-avatar, the bridge, the WebRTC service as
  processes, a tone file of 0.5 s of 440 Hz every 1.5 s driving [avatars.host] at 512x512) and its aiortc room
  caller (`call_in`: each picture and sound stamped with the arrival of its first RTP packet at the caller);
  `lip_sync` finds the tone's onsets in the audio (-30 dBFS) and the mouth's openings in the pictures and
  pairs each mouth onset with the nearest voice onset within 0.3 s: offset = mouth - voice. Target: every
  |offset| within 40 ms (PASS/FAIL on the largest; the mean shown beside). The fast server, its own process.
  Beside it, the same onsets found on the bus by capture time (the avatar's NAME pictures' mouth, its
  NAME-audio in 20 ms pieces as a caller's Opus frames): what the avatar itself puts out, before the bridge,
  the encoder and the call. (The reference server opens the mouth for the whole frame whose 40 ms of voice
  hold any of the tone, and the picture carries the capture time of that voice's first sample: on the bus
  the mouth leads the voice's onset by 0 to 40 ms by construction.) And how much of the voice the caller
  decoded in the call's span (a caller that loses audio finds its onsets late).
* CPU: the avatar service's process (and the naive process) over the phase's window less its first
  `warm` seconds, from /proc/PID/task/*/schedstat (benchmarks/rtp.py's `cpu_s`: the exact utime + stime), per
  avatar and second of media; the service's CPU with its one avatar idle (provider up, no voice: the idle face
  at 25 fps and the avatar's 10 ms clock) beside the x1 row. The limit: a process (`--copy`) that puts the
  same 512x512 rgb24 pictures (25/s) and 48 kHz audio (40 ms chunks) of N avatars on the bus through the box's
  `Sink`, with no provider. The server's CPU is shown beside, never counted.
* Time: --quick about a minute (3 s phases, 4 avatars, a 4.5 s call); a full run about 3 minutes (10 s phases,
  a 12 s call).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_ROOT)

from benchmarks.ingest import _on_sigterm, code_version, log, pct  # noqa: E402
from benchmarks.rtp import cpu_s  # noqa: E402

WIDTH = HEIGHT = 512
FPS = 25.0
RATE = 16000                        # the voice on the bus, and what the WebSocket server is sent
OUT_RATE = 48000                    # the voice the avatar puts on the bus
CHUNK = RATE // 50                  # 20 ms: what a call puts on the bus
SLICE = int(RATE / FPS)             # 40 ms: one frame's voice (RoomKit's chunk)
SLICE_NS = SLICE * 1_000_000_000 // RATE
TARGET_SYNC_MS = 40.0               # the lip-sync target at the caller
SETTINGS = {"fast": (0.0, 0.0), "late": (0.0, 0.05), "busy": (0.03, 0.0)}    # server (delay, lag) seconds
SETTING_NAMES = {"fast": "fast", "late": "late 50 ms", "busy": "busy 30 ms/message"}
ROOM = "bench"
READY_S = 60.0


@dataclass
class Plan:
    seconds: float                  # one phase's voice
    warm_s: float                   # the start of a phase left out of its CPU window
    avatars: int                    # N of the xN rows
    lip_s: float                    # the call's length (the tone's onsets every 1.5 s)
    rtt_slices: int                 # the bare client's round trips per setting
    idle_s: float                   # the service's CPU with its avatar idle (no voice)


FULL = Plan(seconds=10.0, warm_s=1.0, avatars=4, lip_s=12.0, rtt_slices=200, idle_s=4.0)
QUICK = Plan(seconds=3.0, warm_s=0.5, avatars=4, lip_s=4.5, rtt_slices=40, idle_s=1.5)


# --------------------------------------------------------------------------------------
# Pure helpers (tests/test_bench_avatar.py)


def voice_pattern(seconds: float, rate: int = RATE) -> list:
    """0.4 s of 440 Hz at -6 dBFS, 0.4 s of silence, ...: int16 mono, a whole number of slices."""
    import numpy as np

    n = int(round(seconds * FPS)) * SLICE * rate // RATE
    t = np.arange(n) / rate
    on = (t % 0.8) < 0.4
    return (np.sin(2 * np.pi * 440.0 * t) * 0.5 * 32767 * on).astype(np.int16)


def slice_times(t0_ns: int, slices: int) -> list[int]:
    """The capture times of a phase's slices (t0: the first sample's)."""
    return [t0_ns + k * SLICE_NS for k in range(slices)]


def first_arrivals(items: list[tuple[int, int]], wanted: set[int]) -> dict[int, int]:
    """{capture_ns: the first arrival_ns} of the (capture_ns, arrival_ns) items whose capture time is wanted."""
    out: dict[int, int] = {}
    for cap, arr in items:
        if cap in wanted and cap not in out:
            out[cap] = arr
    return out


def stats_ms(values_ms: list[float]) -> dict:
    """p50, p99, max, mean and count of latencies in ms (None when there are none)."""
    v = sorted(values_ms)
    if not v:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    return {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99), "max": v[-1], "mean": sum(v) / len(v)}


def behind_ms_per_s(points: list[tuple[int, float]]) -> float | None:
    """How fast the latency grows over a phase: the least-squares slope of latency (ms) over capture time
    (ns), in ms per second of voice; 0 for a path that keeps up, 500 for one that takes 1.5 s per second."""
    if len(points) < 3:
        return None
    xs = [(c - points[0][0]) / 1e9 for c, _ in points]
    ys = [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def latency_of(sent: list[int], video: list[tuple[int, int]], audio: list[tuple[int, int]]) -> dict:
    """A phase's figures for one or more avatars: `sent` the slices' capture times, `video` and `audio` the
    (capture_ns, arrival_ns) of what the path put on the bus (each avatar's slices are paired with its own
    items by the caller and the lists joined: pass them per avatar through `merge`)."""
    want = set(sent)
    a = first_arrivals(audio, want)
    v = first_arrivals(video, want)
    lat = [(cap, (a[cap] - cap) / 1e6) for cap in sent if cap in a]
    return {"slices": len(sent), "paired": len(a), "missing": len(sent) - len(a),
            "pictures_paired": len(v), "latency_ms": stats_ms([x for _, x in lat]),
            "picture_latency_ms": stats_ms([(v[cap] - cap) / 1e6 for cap in v]),
            "behind_ms_per_s": behind_ms_per_s(lat), "_lat": lat}


def merge(parts: list[dict]) -> dict:
    """One figure for the avatars of a phase: their slices' latencies together; the slope: the mean of theirs."""
    lat = [x for p in parts for x in p["_lat"]]
    slopes = [p["behind_ms_per_s"] for p in parts if p["behind_ms_per_s"] is not None]
    pics = [p["picture_latency_ms"]["p50"] for p in parts if p["picture_latency_ms"]["p50"] is not None]
    return {"slices": sum(p["slices"] for p in parts), "paired": sum(p["paired"] for p in parts),
            "missing": sum(p["missing"] for p in parts), "pictures_paired": sum(p["pictures_paired"] for p in parts),
            "latency_ms": stats_ms([x for _, x in lat]),
            "picture_latency_p50_ms": sorted(pics)[len(pics) // 2] if pics else None,
            "behind_ms_per_s": sum(slopes) / len(slopes) if slopes else None,
            "last_latency_ms": max(lat)[1] if lat else None}


def pair_onsets(voice: list[float], mouth: list[float], within: float = 0.3) -> list[float]:
    """Offsets mouth - voice (s): each mouth onset paired with the nearest voice onset within `within` s (as
    tests/test_avatar.py's lip_sync pairs them at the caller)."""
    out = []
    for m in mouth:
        near = min(voice, key=lambda v: abs(v - m), default=None)
        if near is not None and abs(near - m) < within:
            out.append(m - near)
    return out


def sync_verdict(offsets_s: list[float], target_ms: float = TARGET_SYNC_MS) -> dict:
    """Lip-sync offsets (mouth - voice onsets, s) against the target: mean, the largest |offset|, PASS when every
    one is within the target; no offsets: no verdict."""
    ms = [o * 1000 for o in offsets_s]
    if not ms:
        return {"offsets_ms": [], "n": 0, "mean_ms": None, "max_abs_ms": None, "target_ms": target_ms,
                "verdict": "NO DATA"}
    worst = max(abs(x) for x in ms)
    return {"offsets_ms": [round(x, 1) for x in ms], "n": len(ms), "mean_ms": sum(ms) / len(ms),
            "max_abs_ms": worst, "target_ms": target_ms, "verdict": "PASS" if worst <= target_ms else "FAIL"}


# --------------------------------------------------------------------------------------
# The server process (--serve): AvatarServer, its delay and lag set on stdin


def serve_main() -> int:
    """tests/avatar_server.py's server in this process; stdin lines `set DELAY LAG` and `stats` each answer one
    JSON line (its counters). LAG: every answer sent that much later, the next message taken at once."""
    import asyncio
    from collections import deque

    from aiohttp import web

    lag = [0.0]
    base = web.WebSocketResponse

    class Late(base):
        """A WebSocket reply whose sends go out `lag` late, in order, without holding the server's loop."""

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self._late: deque = deque()
            self._pump: asyncio.Task | None = None

        async def send_bytes(self, data, *a, **kw) -> None:
            if lag[0] <= 0 and not self._late:
                return await super().send_bytes(data, *a, **kw)
            loop = asyncio.get_running_loop()
            self._late.append((loop.time() + lag[0], data))
            if self._pump is None or self._pump.done():
                self._pump = loop.create_task(self._drain())

        async def _drain(self) -> None:
            loop = asyncio.get_running_loop()
            while self._late:
                due, data = self._late[0]
                await asyncio.sleep(max(0.0, due - loop.time()))
                self._late.popleft()
                try:
                    await base.send_bytes(self, data)
                except Exception:           # the client went away: what is left is nobody's
                    self._late.clear()
                    return

    web.WebSocketResponse = Late         # what tests/avatar_server.py makes for each stream (this process only)
    from tests.avatar_server import AvatarServer

    server = AvatarServer(fps=FPS).start()

    def counters() -> dict:
        return {"port": server.port, "pid": os.getpid(), "delay": server.delay, "lag": lag[0],
                "messages": server.messages, "frames": server.frames_sent, "connections": server.connections,
                "starts": server.starts}

    print(json.dumps(counters()), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["set"] and len(words) == 3:
            server.delay, lag[0] = float(words[1]), float(words[2])
        print(json.dumps(counters()), flush=True)
    server.close()
    return 0


class Server:
    """The server's process, driven from here."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_ROOT)
        first = self._answer()
        self.port, self.pid = first["port"], first["pid"]
        self.url = f"http://127.0.0.1:{self.port}"

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the avatar server's process exited: {self.proc.stderr.read()[-800:]}")
        return json.loads(line)

    def set(self, setting: str) -> dict:
        delay, lag = SETTINGS[setting]
        self.proc.stdin.write(f"set {delay} {lag}\n")
        self.proc.stdin.flush()
        return self._answer()

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_session(url: str, face: bytes) -> None:
    """POST /start as RoomKit does (with the reference image and the fps the service also sends)."""
    body = json.dumps({"reference_image": base64.b64encode(face).decode(), "width": WIDTH, "height": HEIGHT,
                       "sample_rate": RATE, "fps": FPS}).encode()
    req = urllib.request.Request(url + "/start", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


# --------------------------------------------------------------------------------------
# The naive path (--naive): RoomKit's one blocking round trip per 40 ms chunk


class _Null:
    def inc(self, *_) -> None:
        pass

    def observe(self, *_) -> None:
        pass

    def labels(self, *_) -> _Null:
        return self


def null_sink(stream: str, prefix: str):
    from services.capture.sink import Sink, SinkMetrics

    n = _Null()
    return Sink(stream, prefix, SinkMetrics(n, n, n, n, n, n, n))


def naive_main(cfg: dict) -> int:
    """One thread per avatar: RoomKit's feed_audio per 40 ms chunk, the frames and the chunk's audio on the bus."""
    import struct
    from fractions import Fraction

    import numpy as np
    from websockets.sync.client import connect

    import framebus
    from services.avatar.voice import Resampler, downmix

    prefix, url = cfg["prefix"], cfg["url"]
    face = Path(cfg["face"]).read_bytes()
    stop = threading.Event()
    queues: dict[str, queue.Queue] = {v: queue.Queue() for v, _ in cfg["pairs"]}
    header = struct.Struct("!HH")
    tb = Fraction(1, 90000)
    errors: list[str] = []

    def reader() -> None:          # RoomKit's audio queue before its provider thread: the voice as it comes
        cons = {v: framebus.Consumer.attach(v, prefix=prefix, missing_ok=True, start="next") for v in queues}
        try:
            while not stop.is_set():
                select.select([c.fileno() for c in cons.values()], [], [], 0.05)
                for v, c in cons.items():
                    while (item := c.poll()) is not None:
                        queues[v].put((downmix(item.array), item.capture_ns))
        finally:
            for c in cons.values():
                c.close()

    def avatar(voice: str, out: str, ws) -> None:
        sink = null_sink(out, prefix)
        up = Resampler(OUT_RATE)
        buf, buf_ns, next_pts = np.zeros(0, np.int16), 0, 0
        try:
            while not stop.is_set():
                try:
                    pcm, ns = queues[voice].get(timeout=0.1)
                except queue.Empty:
                    continue
                if not len(buf):
                    buf_ns = ns
                buf = np.concatenate((buf, pcm))
                while len(buf) >= SLICE:
                    chunk, cns = buf[:SLICE], buf_ns
                    buf, buf_ns = buf[SLICE:], buf_ns + SLICE_NS
                    ws.send(chunk.astype("<i2").tobytes())              # RoomKit's _stream_audio: send ...
                    frames = []
                    while True:                                         # ... and _recv_frames: until the end
                        msg = ws.recv(timeout=30)
                        if not isinstance(msg, bytes) or not msg:
                            break
                        w, h = header.unpack_from(msg)
                        payload = msg[header.size:]                     # VideoFrame(data=payload): a copy
                        if len(payload) == w * h * 3:
                            frames.append((w, h, payload))
                    for w, h, payload in frames:
                        loan = sink.loan_picture(w, h, "rgb24")
                        loan.array.reshape(h, w, 3)[...] = np.frombuffer(payload, np.uint8).reshape(h, w, 3)
                        sink.send_picture(loan, pts=cns * 9 // 100_000, time_base=tb, capture_ns=cns)
                    pts = max(cns * OUT_RATE // 1_000_000_000, next_pts)
                    audio = up(chunk, RATE).reshape(-1, 1)
                    sink.audio(audio, OUT_RATE, pts=pts, capture_ns=cns)
                    next_pts = pts + len(audio)
        except Exception as exc:         # reported on stdout; the benchmark sees its slices missing
            errors.append(f"{out}: {type(exc).__name__}: {exc}")
            print(json.dumps({"event": "error", "what": errors[-1]}), flush=True)
        finally:
            sink.close()

    threads = [threading.Thread(target=reader, daemon=True)]
    conns = []
    for voice, out in cfg["pairs"]:
        start_session(url, face)
        ws = connect(url.replace("http://", "ws://") + "/ws/stream", close_timeout=2)
        conns.append(ws)
        threads.append(threading.Thread(target=avatar, args=(voice, out, ws), daemon=True))
    for t in threads:
        t.start()
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
    sys.stdin.read()                     # until the benchmark closes it
    stop.set()
    for t in threads:
        t.join(5)
    for ws in conns:
        try:
            ws.close()
        except Exception:
            pass
    return 1 if errors else 0


# --------------------------------------------------------------------------------------
# The limit of CPU (--copy): the same pictures and audio on the bus, no provider


def copy_main(cfg: dict) -> int:
    from fractions import Fraction

    import numpy as np

    from tests.avatar_server import face_picture

    n, seconds, warm = cfg["avatars"], cfg["seconds"], cfg["warm"]
    sinks = [null_sink(f"c{i + 1}", cfg["prefix"]) for i in range(n)]
    pictures = [face_picture(None, WIDTH, HEIGHT, o) for o in (0.0, 0.8)]
    audio = (np.sin(np.arange(OUT_RATE // 25) / OUT_RATE * 2 * np.pi * 440) * 16000).astype(np.int16).reshape(-1, 1)
    tb = Fraction(1, 90000)
    t0 = time.monotonic_ns()
    period = int(1e9 / FPS)
    k, cpu0, w0 = 0, None, 0
    while True:
        due = t0 + k * period
        now = time.monotonic_ns()
        if cpu0 is None and now - t0 >= warm * 1e9:
            cpu0, w0 = cpu_s(os.getpid()), now
        if now - t0 >= (warm + seconds) * 1e9:
            break
        if due > now:
            time.sleep((due - now) / 1e9)
        for s in sinks:
            loan = s.loan_picture(WIDTH, HEIGHT, "rgb24")
            loan.array.reshape(HEIGHT, WIDTH, 3)[...] = pictures[(k // 10) % 2]
            s.send_picture(loan, pts=due * 9 // 100_000, time_base=tb, capture_ns=due)
            s.audio(audio, OUT_RATE, pts=k * len(audio), capture_ns=due)
        k += 1
    cpu1, w1 = cpu_s(os.getpid()), time.monotonic_ns()
    for s in sinks:
        s.close()
    print(json.dumps({"cpu_s": cpu1 - cpu0, "window_s": (w1 - w0) / 1e9, "frames": k * n}), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# Voice out, the bus read back


class Voice:
    """The voice streams v1..vN of the bus, published from here in real time."""

    def __init__(self, prefix: str, n: int) -> None:
        import framebus

        self.producers = [framebus.Producer.create(f"v{i + 1}-audio", "audio", payload=RATE // 10 * 2 * 2,
                                                   slots=256, prefix=prefix) for i in range(n)]
        self.pts = [0] * n

    def speak(self, which: list[int], seconds: float) -> tuple[threading.Thread, int, int]:
        """Start the pattern on voices `which` (indexes); (its thread, t0 ns, slices)."""
        pcm = voice_pattern(seconds)
        t0 = time.monotonic_ns() + 50_000_000
        chunks = len(pcm) // CHUNK

        def go() -> None:
            for j in range(chunks):
                due = t0 + (j + 1) * CHUNK * 1_000_000_000 // RATE        # the chunk is complete
                wait = (due - time.monotonic_ns()) / 1e9
                if wait > 0:
                    time.sleep(wait)
                part = pcm[j * CHUNK:(j + 1) * CHUNK].reshape(-1, 1)
                cap = t0 + j * CHUNK * 1_000_000_000 // RATE
                for i in which:
                    self.producers[i].publish_audio(part, RATE, pts=self.pts[i], time_base=(1, RATE), capture_ns=cap)
                    self.pts[i] += CHUNK

        t = threading.Thread(target=go, name="voice", daemon=True)
        t.start()
        return t, t0, len(pcm) // SLICE

    def close(self) -> None:
        for p in self.producers:
            p.close()


class Reader(threading.Thread):
    """(capture_ns, arrival_ns) of every item of the streams NAME and NAME-audio of each name, as they come."""

    def __init__(self, prefix: str, names: list[str]) -> None:
        import framebus

        super().__init__(name="reader", daemon=True)
        self.cons = {(n, kind): framebus.Consumer.attach(n if kind == "video" else f"{n}-audio", prefix=prefix,
                                                          missing_ok=True, start="next")
                     for n in names for kind in ("video", "audio")}
        self.items: dict[tuple[str, str], list[tuple[int, int]]] = {k: [] for k in self.cons}
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        fds = [c.fileno() for c in self.cons.values()]
        while not self.stop.is_set():
            select.select(fds, [], [], 0.02)
            for key, c in self.cons.items():
                while (item := c.poll()) is not None:
                    self.items[key].append((item.capture_ns, time.monotonic_ns()))

    def missed(self) -> int:
        return sum(c.missed for c in self.cons.values())

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        for c in self.cons.values():
            c.close()


class BusWatch(threading.Thread):
    """An avatar's face and voice on the bus by capture time: (s, mouth opening) of each picture, (s, rms) of
    each 20 ms of its audio (a caller's Opus frame), for the lip sync before the bridge and the call."""

    def __init__(self, prefix: str, name: str) -> None:
        import framebus

        super().__init__(name="buswatch", daemon=True)
        self.video = framebus.Consumer.attach(name, prefix=prefix, missing_ok=True, start="next")
        self.audio = framebus.Consumer.attach(f"{name}-audio", prefix=prefix, missing_ok=True, start="next")
        self.pictures: list[tuple[float, float]] = []
        self.sound: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        import numpy as np

        from tests.avatar_server import mouth_opening

        fds = [self.video.fileno(), self.audio.fileno()]
        while not self.stop.is_set():
            select.select(fds, [], [], 0.02)
            while (item := self.video.poll()) is not None:
                opening = mouth_opening(np.asarray(item.array).reshape(item.height, item.width, 3))
                if item.valid():
                    self.pictures.append((item.capture_ns / 1e9, opening))
            while (item := self.audio.poll()) is not None:
                pcm = np.array(item.array)[:, 0].astype(np.float64)
                step = item.rate // 50
                for i in range(0, len(pcm) - step + 1, step):
                    rms = float(np.sqrt(np.mean(pcm[i:i + step] ** 2)))
                    self.sound.append((item.capture_ns / 1e9 + i / item.rate, rms))

    def offsets(self) -> tuple[list[float], list[float], list[float]]:
        """(voice onsets, mouth onsets, offsets mouth - voice) by capture time, found as at the caller."""
        from tests.test_avatar import VOICE_RMS, onsets

        voice = onsets([t for t, _ in self.sound], [r > VOICE_RMS for _, r in self.sound])
        mouth = onsets([t for t, _ in self.pictures], [o > 0.5 for _, o in self.pictures])
        return voice, mouth, pair_onsets(voice, mouth)

    def missed(self) -> int:
        return self.video.missed + self.audio.missed

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.video.close()
        self.audio.close()


# --------------------------------------------------------------------------------------
# One phase: voice on N avatars, their latency and CPU


def phase(kind: str, setting: str, n: int, names: list[str], voice: Voice, reader: Reader, server: Server,
          plan: Plan, pid: int, status=None) -> dict:
    """`names[i]` is the output of voice i; the CPU of `pid` over the phase less its warm-up."""
    rec: dict = {"kind": kind, "setting": setting, "avatars": n, "server_delay_ms": SETTINGS[setting][0] * 1000,
                 "server_lag_ms": SETTINGS[setting][1] * 1000}
    server.set(setting)
    before = status() if status else None
    s0 = server.stats()
    thread, t0, slices = voice.speak(list(range(n)), plan.seconds)
    time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9 + plan.warm_s))
    w0, c0, sc0 = time.monotonic_ns(), cpu_s(pid), cpu_s(server.pid)
    time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9 + plan.seconds))
    w1, c1, sc1 = time.monotonic_ns(), cpu_s(pid), cpu_s(server.pid)
    thread.join()
    sent = slice_times(t0, slices)
    deadline = time.monotonic() + 3 * plan.seconds + 3.0
    while time.monotonic() < deadline:     # every slice out, however late (a naive path that fell behind)
        if all(set(sent) <= {c for c, _ in reader.items[(nm, "audio")]} for nm in names[:n]):
            break
        time.sleep(0.1)
    rec["drained_s"] = round(time.monotonic() - deadline + 3 * plan.seconds + 3.0, 2)
    s1 = server.stats()
    window = (w1 - w0) / 1e9
    parts = [latency_of(sent, reader.items[(nm, "video")], reader.items[(nm, "audio")]) for nm in names[:n]]
    rec.update(merge(parts))
    rec.update(window_s=round(window, 2), cpu_s=(c1 - c0) if c0 is not None and c1 is not None else None,
               server_cpu_per_s=(sc1 - sc0) / window if sc0 is not None and sc1 is not None else None,
               server_messages_per_slice=(s1["messages"] - s0["messages"]) / max(1, n * slices))
    rec["cpu_per_avatar_s"] = rec["cpu_s"] / (n * window) if rec["cpu_s"] is not None else None
    if status is not None:
        after = status()
        rec["service"] = {k: sum(after[nm][k] - before[nm][k] for nm in names[:n]) for k in after[names[0]]}
    return rec


def log_phase(r: dict) -> None:
    if r.get("failure"):
        log(f"   FAILED: {r['failure'][:1500]}")
        return
    lat = r["latency_ms"]
    log(f"   {r['kind']:>8s} {SETTING_NAMES[r['setting']]:>18s} x{r['avatars']}: audio-in -> bus p50/p99/max "
        f"{_ms(lat['p50'])}/{_ms(lat['p99'])}/{_ms(lat['max'])} ms, behind {_ms(r['behind_ms_per_s'])} ms/s, "
        f"missing {r['missing']}/{r['slices']}, cpu/avatar-s {_ms(_k(r.get('cpu_per_avatar_s')))} ms"
        + (f", service {r['service']}" if r.get("service") else ""))


def _ms(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _k(v):
    return None if v is None else 1000 * v


# --------------------------------------------------------------------------------------
# The rows


def rtt_row(server: Server, setting: str, face: bytes, plan: Plan) -> dict:
    """The limit: a bare client's round trip of one 40 ms slice (send -> its frame back), paced in real time."""
    from websockets.sync.client import connect

    rec: dict = {"kind": "limit", "setting": setting, "avatars": 1}
    try:
        server.set(setting)
        start_session(server.url, face)
        pcm = voice_pattern(0.4)[:SLICE].astype("<i2").tobytes()
        rtts = []
        with connect(server.url.replace("http://", "ws://") + "/ws/stream", max_size=None) as ws:
            t0 = time.monotonic()
            for k in range(plan.rtt_slices):
                wait = t0 + k / FPS - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                sent = time.monotonic()
                ws.send(pcm)
                got = None
                while True:
                    msg = ws.recv(timeout=10)
                    if not msg:
                        break
                    got = got or time.monotonic()
                if got is None:
                    raise RuntimeError("the server answered a slice with no frame")
                rtts.append((got - sent) * 1000)
        rec["rtt_ms"] = stats_ms(rtts)
        rec["latency_ms"] = stats_ms([1000 / FPS + x for x in rtts])
        rec["slices"] = rec["paired"] = len(rtts)
        rec["missing"] = 0
    except Exception as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
    log(f"   limit {SETTING_NAMES[setting]:>18s}: round trip p50/p99 {_ms(rec.get('rtt_ms', {}).get('p50'))}/"
        f"{_ms(rec.get('rtt_ms', {}).get('p99'))} ms" if not rec.get("failure") else f"   FAILED: {rec['failure']}")
    return rec


def service_rows(plan: Plan, prefix: str, server: Server, voice: Voice, face_path: Path) -> list[dict]:
    """edgeroom-avatar in a private box: fast x1, late x1, fast xN, busy x1."""
    from benchmarks.benchbox import BenchBox

    n = plan.avatars
    rows: list[dict] = []
    q = json.dumps

    def table(i: int) -> str:
        return (f"[avatars.a{i}]\nroom = {q(ROOM)}\naudio = \"v{i}-audio\"\nprovider = \"websocket\"\n"
                f"url = {q(server.url)}\nimage = {q(str(face_path))}\nsize = \"{WIDTH}x{HEIGHT}\"\nfps = {FPS}")

    box = BenchBox(prefix, "eavb", [])
    box.write_config(["[services.vision]\nenabled = false", "[services.recorder]\nenabled = false", "[sources]",
                      "[avatar]\nenabled = true", table(1)])
    reader = Reader(prefix, [f"a{i + 1}" for i in range(n)])
    names = [f"a{i + 1}" for i in range(n)]
    try:
        box.start()
        st = box.wait_ready(READY_S, ["avatar"])
        pid = next(r["pid"] for r in st["services"] if r["service"] == "avatar")

        def listing() -> dict:
            return {a["name"]: a for a in box.client.call("avatar.list", {}, timeout=10)["avatars"]}

        def status() -> dict:
            out = {}
            for name, a in listing().items():
                out[name] = {"provider": a["frames"]["provider"], "held": a["frames"]["held"],
                             "repeated": a["frames"]["repeated"], "late": a["dropped"]["late"],
                             "errors": a["errors"], "connects": a["connects"]}
            return out

        def wait_up(count: int) -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                got = listing()
                if len(got) >= count and all(a["state"] == "ready" for a in got.values()):
                    return
                time.sleep(0.2)
            raise RuntimeError(f"the avatars are not ready: {listing()} {box.log_tail()}")

        wait_up(1)
        time.sleep(plan.warm_s)
        w0, c0 = time.monotonic(), cpu_s(pid)
        time.sleep(plan.idle_s)
        idle = (cpu_s(pid) - c0) / (time.monotonic() - w0)
        log(f"   idle (the provider up, no voice): {1000 * idle:.1f} ms CPU per second")

        def one(setting: str, k: int) -> None:
            log(f"-- edgeroom-avatar, server {SETTING_NAMES[setting]}, {k} avatar(s)")
            seen = len(box.warning_lines())
            try:
                r = phase("service", setting, k, names, voice, reader, server, plan, pid, status)
            except Exception as exc:
                r = {"kind": "service", "setting": setting, "avatars": k, "failure": f"{type(exc).__name__}: {exc}"}
            r["name"] = "edgeroom-avatar"
            r["warnings"] = box.warning_lines()[seen:][:6]      # what the box logged during this phase
            log_phase(r)
            rows.append(r)
            time.sleep(0.6)              # the turn ends (turn_gap 0.3 s) and the provider flushes

        one("fast", 1)
        rows[-1]["idle_cpu_per_avatar_s"] = idle
        one("late", 1)
        for i in range(2, n + 1):
            box.client.call("avatar.start", {"name": f"a{i}", "room": ROOM, "image": str(face_path),
                                             "audio": f"v{i}-audio", "provider": "websocket", "url": server.url,
                                             "size": f"{WIDTH}x{HEIGHT}", "fps": FPS}, timeout=10)
        wait_up(n)
        time.sleep(0.5)
        one("fast", n)
        one("busy", 1)
    except Exception as exc:
        rows.append({"kind": "service", "setting": "fast", "avatars": 1, "name": "edgeroom-avatar",
                     "failure": f"{type(exc).__name__}: {exc} {box.log_tail()}"})
        log(f"   FAILED: {rows[-1]['failure'][:2000]}")
    finally:
        reader.close()
        box.close()
        server.set("fast")
    return rows


def naive_rows(plan: Plan, prefix: str, server: Server, voice: Voice, face_path: Path) -> list[dict]:
    """RoomKit's path in a process of its own: fast x1, fast xN, late x1, busy x1."""
    n = plan.avatars
    rows: list[dict] = []
    names = [f"n{i + 1}" for i in range(n)]
    cfg = {"prefix": prefix, "url": server.url, "face": str(face_path),
           "pairs": [[f"v{i + 1}-audio", names[i]] for i in range(n)]}
    reader = Reader(prefix, names)
    proc = subprocess.Popen([sys.executable, __file__, "--naive", json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_ROOT)
    events: list[dict] = []
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the naive client exited: {proc.stderr.read()[-800:]}")
        threading.Thread(target=lambda: [events.append(json.loads(x)) for x in proc.stdout], daemon=True).start()
        for setting, k in (("fast", 1), ("fast", n), ("late", 1), ("busy", 1)):
            log(f"-- naive (RoomKit: a blocking round trip per 40 ms chunk), server {SETTING_NAMES[setting]}, "
                f"{k} avatar(s)")
            try:
                r = phase("naive", setting, k, names, voice, reader, server, plan, proc.pid)
            except Exception as exc:
                r = {"kind": "naive", "setting": setting, "avatars": k, "failure": f"{type(exc).__name__}: {exc}"}
            r["name"] = "naive (RoomKit)"
            log_phase(r)
            rows.append(r)
            time.sleep(0.3)
        errs = [e["what"] for e in events if e.get("event") == "error"]
        for r in rows:
            r["warnings"] = errs[:6]
    except Exception as exc:
        rows.append({"kind": "naive", "setting": "fast", "avatars": 1, "name": "naive (RoomKit)",
                     "failure": f"{type(exc).__name__}: {exc}"})
        log(f"   FAILED: {rows[-1]['failure'][:2000]}")
    finally:
        reader.close()
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.set("fast")
    return rows


def copy_row(plan: Plan, prefix: str, n: int) -> dict:
    rec: dict = {"kind": "copy", "setting": "-", "avatars": n, "name": "limit: the pictures and audio onto the bus"}
    log(f"-- limit of CPU: {n} avatar(s)' pictures and audio put on the bus, no provider")
    cfg = {"prefix": prefix, "avatars": n, "seconds": plan.seconds, "warm": plan.warm_s}
    r = subprocess.run([sys.executable, __file__, "--copy", json.dumps(cfg)], capture_output=True, text=True,
                       cwd=_ROOT, timeout=60 + plan.seconds)
    try:
        got = json.loads(r.stdout.strip().splitlines()[-1])
        rec.update(cpu_s=got["cpu_s"], window_s=round(got["window_s"], 2), frames=got["frames"],
                   cpu_per_avatar_s=got["cpu_s"] / (n * got["window_s"]))
        log(f"   copy x{n}: cpu/avatar-s {1000 * rec['cpu_per_avatar_s']:.1f} ms")
    except (IndexError, ValueError, KeyError) as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}: {r.stderr[-800:]}"
        log(f"   FAILED: {rec['failure']}")
    return rec


def lip_row(plan: Plan, server: Server, tmp: Path) -> dict:
    """A real box and an aiortc caller (tests/test_avatar.py): mouth - voice onsets at the caller."""
    rec: dict = {"kind": "lip-sync", "setting": "fast", "avatars": 1, "name": "lip sync at the caller (box + aiortc)"}
    log(f"-- lip sync at an aiortc caller of the room, {plan.lip_s:g} s (box: avatar + bridge + webrtc)")
    from tests.appliance import Box
    from tests.test_avatar import avatar_box, call_in, lip_sync
    from tests.test_avatar_units import write_face
    from tests.test_bridge import base_url, run

    made: list[Box] = []
    prefix = rec["prefix"] = f"avl{os.getpid()}"
    face = write_face(tmp / "lipface.png")

    def make(extra: str = "") -> Box:
        made.append(Box(prefix, extra))
        return made[-1]

    table = (f'[avatars.host]\nroom = "meet"\naudio = "tone-audio"\nprovider = "websocket"\nurl = "{server.url}"\n'
             f'image = "{face}"\nsize = "{WIDTH}x{HEIGHT}"\nfps = {FPS}\n')
    t = time.monotonic()
    watch = BusWatch(prefix, "host")
    try:
        b = avatar_box(make, tmp, server.url, avatar=table)
        rec["startup_s"] = round(time.monotonic() - t, 1)
        url = base_url(b)
        got = run(call_in(url, plan.lip_s))
        voice_on, mouth_on, offsets = lip_sync(got)
        status = b.call("avatar.list")["avatars"][0]
        rec.update(sync_verdict(offsets))
        span = (got.sound[-1][0] - got.sound[0][0]) if len(got.sound) > 1 else 0.0
        rec.update(voice_onsets=len(voice_on), mouth_onsets=len(mouth_on), pictures=len(got.pictures),
                   sounds=len(got.sound), sizes=sorted(got.sizes), caller_span_s=span,
                   caller_audio_s=sum(n / rate for _, _, rate, n in got.sound),
                   caller_picture_span_s=(got.pictures[-1][0] - got.pictures[0][0]) if got.pictures else 0.0,
                   service_latency_p50_ms=status.get("latency_p50_ms"),
                   service_latency_p99_ms=status.get("latency_p99_ms"), held=status["frames"]["held"])
        bus_voice, bus_mouth, bus_offsets = watch.offsets()
        bus = sync_verdict(bus_offsets)
        rec["bus"] = {"offsets_ms": bus["offsets_ms"], "mean_ms": bus["mean_ms"], "max_abs_ms": bus["max_abs_ms"],
                      "voice_onsets": len(bus_voice), "mouth_onsets": len(bus_mouth), "missed": watch.missed()}
        log(f"   at the caller, mouth - voice {rec['offsets_ms']} ms: mean {_ms(rec['mean_ms'])}, max |offset| "
            f"{_ms(rec['max_abs_ms'])} ms ({rec['verdict']} against {TARGET_SYNC_MS:g} ms); on the bus (capture "
            f"times) {bus['offsets_ms']} ms")
    except Exception as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
        rec["verdict"] = "NO DATA"
        log(f"   FAILED: {rec['failure'][:2000]}")
    finally:
        watch.close()
        for b in made:
            b.close()
        import framebus
        framebus.gc(prefix)
        rec["took_s"] = round(time.monotonic() - t, 1)
    return rec


def run(plan: Plan, lip: bool = True) -> list[dict]:
    from tests.test_avatar_units import write_face

    tmp = Path(tempfile.mkdtemp(prefix="eavb", dir="/tmp"))
    prefix = f"avb{os.getpid()}"
    rows: list[dict] = []
    server: Server | None = None
    voice: Voice | None = None
    try:
        face_path = write_face(tmp / "face.png")
        face = face_path.read_bytes()
        server = Server()
        log(f"-- the avatar server (tests/avatar_server.py) in process {server.pid}; the limit: a bare client's "
            "round trip")
        for setting in SETTINGS:
            rows.append(rtt_row(server, setting, face, plan))
        server.set("fast")
        voice = Voice(prefix, plan.avatars)
        rows += service_rows(plan, prefix, server, voice, face_path)
        rows += naive_rows(plan, prefix, server, voice, face_path)
        rows.append(copy_row(plan, prefix, 1))
        rows.append(copy_row(plan, prefix, plan.avatars))
        if lip:
            rows.append(lip_row(plan, server, tmp))
    finally:
        if voice is not None:
            voice.close()
        if server is not None:
            server.close()
        import framebus
        framebus.gc(prefix)
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        for k in [k for k in r if k.startswith("_")]:
            del r[k]
        r.setdefault("prefix", prefix)
    return rows


# --------------------------------------------------------------------------------------
# The report


def row_of(rows: list[dict], kind: str, setting: str, avatars: int = 1) -> dict | None:
    return next((r for r in rows if r["kind"] == kind and r["setting"] == setting and r["avatars"] == avatars
                 and not r.get("failure")), None)


def summary(rows: list[dict], plan: Plan) -> dict:
    n = plan.avatars

    def lat(r: dict | None) -> dict | None:
        if r is None:
            return None
        out = {k: r["latency_ms"][k] for k in ("p50", "p99", "max")}
        out["behind_ms_per_s"] = r.get("behind_ms_per_s")
        out["missing"] = r.get("missing")
        out["messages_per_slice"] = r.get("server_messages_per_slice", 1.0)
        if r["kind"] == "limit":
            out["round_trip_p50"], out["round_trip_p99"] = r["rtt_ms"]["p50"], r["rtt_ms"]["p99"]
        return out

    def cpu(r: dict | None) -> float | None:
        return None if r is None or r.get("cpu_per_avatar_s") is None else 1000 * r["cpu_per_avatar_s"]

    lip = next((r for r in rows if r["kind"] == "lip-sync"), None)
    return {
        "latency_ms": {s: {"limit": lat(row_of(rows, "limit", s)), "service": lat(row_of(rows, "service", s)),
                           "naive": lat(row_of(rows, "naive", s))} for s in SETTINGS},
        "latency_ms_avatars_n": {"avatars": n, "service": lat(row_of(rows, "service", "fast", n)),
                                 "naive": lat(row_of(rows, "naive", "fast", n))},
        "cpu_ms_per_avatar_s": {"service_1": cpu(row_of(rows, "service", "fast")),
                                "service_n": cpu(row_of(rows, "service", "fast", n)),
                                "naive_1": cpu(row_of(rows, "naive", "fast")),
                                "naive_n": cpu(row_of(rows, "naive", "fast", n)),
                                "copy_1": cpu(row_of(rows, "copy", "-")), "copy_n": cpu(row_of(rows, "copy", "-", n)),
                                "avatars_n": n},
        "lip_sync": None if lip is None else {k: lip.get(k) for k in (
            "offsets_ms", "n", "mean_ms", "max_abs_ms", "target_ms", "verdict", "voice_onsets", "mouth_onsets",
            "caller_audio_s", "caller_span_s", "bus")},
    }


def targets(rows: list[dict], plan: Plan) -> list[tuple[str, str, str]]:
    out = []
    s = summary(rows, plan)
    lip = s["lip_sync"]
    if lip is not None:
        detail = (f"max |offset| {_ms(lip['max_abs_ms'])} ms, mean {_ms(lip['mean_ms'])} ms over {lip['n']} onsets "
                  f"({lip['offsets_ms']} ms)" if lip["n"] else "no onsets paired at the caller")
        out.append((lip["verdict"] if lip["verdict"] != "NO DATA" else "FAIL",
                    f"lip sync at the caller within {TARGET_SYNC_MS:g} ms (mouth - voice onsets, every one)", detail))
        heard, span = lip.get("caller_audio_s"), lip.get("caller_span_s")
        if heard is not None and span:
            out.append(("PASS" if heard >= 0.95 * span else "FAIL", "the caller hears all the avatar's voice",
                        f"{heard:.2f} s of sound decoded in {span:.2f} s of call ({100 * heard / span:.0f}%)"))
    for setting in SETTINGS:
        lat = s["latency_ms"][setting]
        ours, naive, limit = lat["service"], lat["naive"], lat["limit"]
        if ours is None or naive is None or ours["p99"] is None or naive["p99"] is None:
            continue
        detail = (f"edgeroom-avatar p50/p99 {_ms(ours['p50'])}/{_ms(ours['p99'])} ms (behind "
                  f"{_ms(ours['behind_ms_per_s'])} ms/s, {ours['messages_per_slice']:.2f} messages per slice), "
                  f"naive {_ms(naive['p50'])}/{_ms(naive['p99'])} ms (behind {_ms(naive['behind_ms_per_s'])} ms/s, "
                  f"{naive['messages_per_slice']:.2f} messages per slice)")
        if limit is not None:
            detail += f", limit {_ms(limit['p50'])}/{_ms(limit['p99'])} ms"
        held = (row_of(rows, "service", setting) or {}).get("service", {}).get("held")
        if held:
            detail += f"; edgeroom-avatar held {held} slices' pictures (their frames later than max_delay 0.4 s)"
        verdict = "PASS" if ours["p99"] < naive["p99"] else "FAIL"
        out.append((verdict if setting != "fast" else "INFO",
                    f"audio-in to frame on the bus, p99 below the naive path's, server {SETTING_NAMES[setting]}",
                    detail))
    c = s["cpu_ms_per_avatar_s"]
    if c["service_1"] is not None and c["naive_1"] is not None:
        detail = (f"edgeroom-avatar {_ms(c['service_1'])} ms (x{plan.avatars}: {_ms(c['service_n'])}), naive "
                  f"{_ms(c['naive_1'])} ms (x{plan.avatars}: {_ms(c['naive_n'])}), the limit (the bus copy) "
                  f"{_ms(c['copy_1'])} ms (x{plan.avatars}: {_ms(c['copy_n'])})")
        if c["copy_1"] and c["naive_1"]:
            detail += f"; edgeroom-avatar / naive {c['service_1'] / c['naive_1']:.2f}x, / the limit " \
                      f"{c['service_1'] / c['copy_1']:.1f}x"
            if c["service_n"] and c["naive_n"] and c["copy_n"]:
                detail += (f" (x{plan.avatars}: {c['service_n'] / c['naive_n']:.2f}x, "
                           f"{c['service_n'] / c['copy_n']:.1f}x)")
        out.append(("INFO", "CPU per avatar and second of media at 512x512x25", detail))
    return out


def table(rows: list[dict]) -> str:
    out = ["| row | server | avatars | audio-in -> frame on the bus p50 / p99 / max ms | falls behind ms/s "
           "| slices out / sent | CPU ms per avatar-s | server: ms CPU/s, messages/slice | notes |",
           "|---|---|---:|---|---:|---|---:|---|---|"]
    for r in rows:
        if r["kind"] == "lip-sync":
            continue
        name = {"limit": "limit: bare client (40 ms + round trip)"}.get(r["kind"], r.get("name", r["kind"]))
        setting = SETTING_NAMES.get(r["setting"], r["setting"])
        if r.get("failure"):
            out.append(f"| {name} | {setting} | {r['avatars']} | FAILED | | | | | {r['failure'][:160]} |")
            continue
        notes = []
        lat = r.get("latency_ms")
        if r["kind"] == "limit":
            notes.append(f"round trip p50/p99 {_ms(r['rtt_ms']['p50'])}/{_ms(r['rtt_ms']['p99'])} ms")
        if r.get("picture_latency_p50_ms") is not None:
            notes.append(f"pictures paired {r['pictures_paired']} (p50 {_ms(r['picture_latency_p50_ms'])} ms)")
        sv = r.get("service")
        if sv:
            notes.append(f"provider {sv['provider']}, held {sv['held']}, repeated {sv['repeated']}, late dropped "
                         f"{sv['late']}, errors {sv['errors']}")
        if r.get("idle_cpu_per_avatar_s") is not None:
            notes.append(f"idle (no voice) {1000 * r['idle_cpu_per_avatar_s']:.1f} ms CPU/s")
        if r.get("missing"):
            notes.append(f"{r['missing']} never out")
        if r.get("warnings"):
            notes.append("logged: " + " | ".join(w[-120:] for w in r["warnings"][:2]))
        lat_s = f"{_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])}" if lat else ""
        srv = ""
        if r.get("server_cpu_per_s") is not None:
            srv = f"{1000 * r['server_cpu_per_s']:.0f}, {r['server_messages_per_slice']:.2f}"
        out.append(f"| {name} | {setting} | {r['avatars']} | {lat_s} | {_ms(r.get('behind_ms_per_s'))} | "
                   f"{r.get('paired', '')}{' / ' + str(r['slices']) if 'slices' in r else ''} | "
                   f"{_ms(_k(r.get('cpu_per_avatar_s')))} | {srv} | {'; '.join(notes)} |")
    return "\n".join(out)


def report(rows: list[dict], plan: Plan, name: str, elapsed: float, load: tuple) -> str:
    text = [f"## Avatar benchmark ({name}, {elapsed:.0f} s, code {code_version()}, {os.cpu_count()} CPUs, "
            f"load average {' '.join(f'{x:.2f}' for x in load)} at start, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end)", "", table(rows)]
    lip = next((r for r in rows if r["kind"] == "lip-sync"), None)
    if lip is not None:
        text += ["", "## lip sync at the caller", ""]
        if lip.get("failure"):
            text.append(f"- FAILED: {lip['failure'][:400]}")
        else:
            text.append(f"- offsets mouth - voice onsets: {lip['offsets_ms']} ms; mean {_ms(lip['mean_ms'])} ms, "
                        f"max |offset| {_ms(lip['max_abs_ms'])} ms ({lip['voice_onsets']} voice onsets, "
                        f"{lip['mouth_onsets']} mouth onsets, {lip['pictures']} pictures {lip['sizes']}); the "
                        f"service's own audio-to-frame p50/p99 {lip['service_latency_p50_ms']}/"
                        f"{lip['service_latency_p99_ms']} ms, held {lip['held']}")
            text.append(f"- the caller heard {lip['caller_audio_s']:.2f} s of the avatar's voice in "
                        f"{lip['caller_span_s']:.2f} s (pictures over {lip['caller_picture_span_s']:.2f} s)")
            bus = lip["bus"]
            text.append(f"- the same onsets on the bus (the avatar's NAME and NAME-audio by capture time, before the "
                        f"bridge and the call): {bus['offsets_ms']} ms; mean {_ms(bus['mean_ms'])} ms, max |offset| "
                        f"{_ms(bus['max_abs_ms'])} ms ({bus['voice_onsets']} voice onsets, {bus['mouth_onsets']} "
                        f"mouth onsets, {bus['missed']} items missed by this reader)")
    text += ["", "## targets", ""]
    text += [f"- {v}  {t}: {d}" for v, t, d in targets(rows, plan)]
    text += ["", "## notes", "",
             f"- {WIDTH}x{HEIGHT} rgb24 at {FPS:g} fps; the voice: {RATE} Hz mono in 20 ms chunks, each published "
             "when complete, stamped with its first sample's capture time; a slice (one frame's voice) is 40 ms.",
             "- audio-in -> frame on the bus: a slice's audio chunk on the bus (published right after its "
             "picture) less the slice's capture time; the limit: 40 ms (the slice) + a bare client's round trip.",
             "- falls behind: the slope of the latency over the phase (ms per second of voice); a path that keeps "
             "up: ~0.",
             "- server settings: fast (as it is); late 50 ms (every answer 50 ms late, the next message taken at "
             "once: a pipelined or distant server); busy 30 ms/message (the reference server's delay: one message "
             "after the other).",
             "- CPU: the avatar service's process (the naive client's process; the copy's) over the phase less its "
             "warm-up, /proc/PID/task/*/schedstat, per avatar and second; the server's CPU beside, never counted."]
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s phases, a 4.5 s call (about a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--seconds", type=float, help="one phase's voice (default 10, --quick 3)")
    ap.add_argument("--avatars", type=int, help="N of the xN rows (default 4)")
    ap.add_argument("--no-lip", action="store_true", help="leave out the lip-sync row (its box and caller)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--naive", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--copy", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve_main()
    if args.naive:
        return naive_main(json.loads(args.naive))
    if args.copy:
        return copy_main(json.loads(args.copy))
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        if args.seconds < 1:
            ap.error("--seconds: at least 1")
        plan.seconds = args.seconds
    if args.avatars is not None:
        if not 1 <= args.avatars <= 8:
            ap.error("--avatars: 1 to 8 ([avatar] max_avatars)")
        plan.avatars = args.avatars
    if shutil.which("ffmpeg") is None and not args.no_lip:
        ap.error("ffmpeg is not installed (apt-get install ffmpeg): the lip-sync row's tone file needs it")
    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    load = os.getloadavg()
    try:
        rows = run(plan, lip=not args.no_lip)
    except KeyboardInterrupt:
        log("interrupted: every child stopped, temp dirs and bus objects removed")
        return 130
    name = ("quick" if args.quick else "full") + "".join(
        f", --{k} {v:g}" for k, v in (("seconds", args.seconds), ("avatars", args.avatars)) if v is not None)
    print(report(rows, plan, name, time.monotonic() - t0, load), flush=True)
    if args.json:
        out = {"plan": name, "seconds": plan.seconds, "avatars": plan.avatars, "cpus": os.cpu_count(),
               "loadavg_start": [round(x, 2) for x in load], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "elapsed_s": round(time.monotonic() - t0, 1), "code": code_version(),
               "summary": summary(rows, plan),
               "targets": [{"verdict": v, "target": t, "detail": d} for v, t, d in targets(rows, plan)],
               "rows": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failure") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
