"""RTP forwarding benchmark: RTP in -> bus -> RTP out through rtp@NAME, against a bare UDP relay and
against decoding and re-encoding.

Run from the repository root:

    .venv/bin/python benchmarks/rtp.py [--quick] [--json PATH] [--seconds S] [--max-streams N]

What it answers, on this machine: what forwarding a 720p30 2 Mbit/s H.264 call through the
box costs (the time it adds between a packet entering the box and the same access unit's
packets leaving it, and the rtp@ process's CPU per second of media) against the physical
limit (a bare Python UDP relay: recvfrom/sendto, no parsing) and against the naive path
(decode and re-encode, as RoomKit does), and how many such forwarded calls the box carries
with zero loss.

Method
------
* Clip: made once with the system's ffmpeg and cached under $XDG_CACHE_HOME (or
  ~/.cache)/edgeroom-bench: lavfi `testsrc2` 1280x720 30 fps, libx264 preset fast, 2 Mbit/s
  CBR (VBV), a keyframe every 2 s, no B-frames, 20 s (looped). Its access units are cut into
  RTP payloads (mode 1, 1200-byte packets) by the box's own packetizer
  (services/rtp/h264.py, `H264Packetizer`), SPS/PPS before every IDR.
* Sender: a child process (its own interpreter, so nothing else holds it up between the
  clock read and the send) sends N streams, one socket and SSRC each, every access unit's
  packets back to back at its frame time (30 fps, as `ffmpeg -re -f rtp` does), the N
  streams staggered evenly over the frame interval. It notes CLOCK_MONOTONIC just before
  each packet's sendmsg: on loopback the packet is in the box's socket when sendmsg returns.
* Receiver: one thread of this process, a socket pair (RTP, RTCP) per stream; the arrival
  time of every packet is the kernel's (SO_TIMESTAMPNS: CLOCK_REALTIME when the packet
  reached the socket, taken to CLOCK_MONOTONIC by the offset between the two clocks,
  measured at the start and the end), so the receiver's own scheduling is not counted.
  SO_RXQ_OVFL counts what its sockets dropped.
* Rows, one after the other, in the same run:
  - limit: a bare Python UDP relay (a child: `recvfrom` -> `sendto`, no parsing; one
    process for the N streams), N=1 (and at the highest forwarding N found); and beside
    every box row, one more stream through a relay of its own, sent and received at the
    same moments as the box's: the limit under the same load (this 2-core machine is
    shared, and its load moves the tails from one minute to the next);
  - forward: a private box (`python -m services.cli run`) with N calls `[rtp.fI]`, each
    with `send_video = "fI"`: its own inbound video, put on the bus by inbound.py and read
    back by the call's RouteReader, re-packetized and sent to the receiver; `decode =
    false`, `jitter_ms` at its default (50 ms: a packet after a gap waits at most that for
    the missing ones; packets in order go through at once, so on a clean LAN it adds
    nothing);
  - naive: a box with `[rtp.cI]` (decode = true: decode@cI puts cI-raw on the bus),
    `[encoders.eI]` (cI-raw -> H.264 2000 kbit/s, gop 2 s: encode@eI) and the call sending
    eI: the decode and re-encode RoomKit does for every forwarded stream;
  - the most forwarded streams: forward rows for N = 1, 2, 4, ... (doubling, then halving
    the gap, like benchmarks/ingest.py; the next N from the CPU a sustained N used), up to
    --max-streams. An N is sustained when every access unit sent in the window came out
    whole, the box and the receiver dropped nothing, and the packet latency p99 is at most
    one frame interval (33.3 ms: more means the box queues frames).
* Matching: the relay leaves packets as they are (sequence numbers match). The box sends
  its own SSRC, sequence numbers and RTP time (from the unit's capture_ns, so its clock
  is the box's CLOCK_MONOTONIC); its sender reports (each second, to the receiver's RTCP
  port) give the RTP time of a monotonic instant, so every access unit that comes out is
  traced to its capture time and so to the access unit sent at that time (the capture
  time of an RTP unit is its earliest arrival: within a fraction of a millisecond of when
  it was sent; units are 33 ms apart). Forwarded units are checked byte for byte against
  what was sent: payload by payload (the same packetizer makes the same payloads).
* Latency, per access unit sent in the window (after a warm-up, from when every stream's
  first unit came out), all on this machine's CLOCK_MONOTONIC:
  - packet: each packet's arrival at the receiver less the send time of the same packet
    (relay) or of the packet with the same payload (forward): the brief's "added latency";
    it includes the wait for the unit's last packet (the box forwards whole units);
  - unit: the unit's last packet at the receiver less its last packet sent: when a
    decoder behind the box can have the picture, against when it could have it without
    the box (the only figure the naive path has, whose packets are new).
  "added" is a box row's p99 less that of the relay's stream beside it.
* CPU: the rtp@ processes (forward), rtp@ + decode@ + encode@ (naive) or the relay
  process: the time their threads ran (/proc/PID/task/*/schedstat, ns: /proc/PID/stat's
  10 ms ticks cannot see a relay's few ms), over the window, per stream-second.
  The hub and `edgeroom run` are shown beside ("box other"); "other load" is the CPU the
  machine spent outside this benchmark's processes (% of one core).
* Target (issue 16): forwarding adds at most 2 ms p99 over the relay (packet latency, N=1).
* Time: --quick ~60 s (N up to 2); a full run several minutes (N up to 48).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import selectors
import shutil
import signal
import socket
import statistics
import struct
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

from benchmarks.benchbox import BenchBox, encode_testsrc  # noqa: E402
from benchmarks.ingest import (  # noqa: E402
    USABLE_SHARE,
    _on_sigterm,
    cache_dir,
    code_version,
    log,
    machine_busy_s,
    next_n,
    pct,
    proc_cpu_s,
    self_cpu_s,
    tool_version,
)
from services.control.client import ControlError  # noqa: E402
from services.rtp.spec import RtpConfig  # noqa: E402

DEFAULT_PACING_KBPS = RtpConfig.__dataclass_fields__["pacing_kbps"].default

FPS = 30
FRAME_NS = 1_000_000_000 // FPS
WIDTH, HEIGHT = 1280, 720
KBPS = 2000
GOP = 2 * FPS
CLIP_S = 20
CLIP_VERSION = 1
MTU = 1200
PT = 96
CLOCK = 90000
TARGET_ADDED_MS = 2.0
LAT_BOUND_MS = 1000 / FPS          # packet p99 above one frame interval: the box is queueing frames
TAIL_S = 1.0                       # after the window: the window's last units come out
FIRST_OUT_S = 20.0                 # how long every stream may take to send its first unit out
SO_TIMESTAMPNS = 35                # Linux (asm-generic): the kernel's arrival time (CLOCK_REALTIME)
SO_RXQ_OVFL = 40                   # Linux: the socket's drop counter with each datagram
RCVBUF = 4 << 20
NO_PACING_KBPS = 1_000_000         # the key's most: the rate a tick allows (125 kB) is more than a keyframe


@dataclass
class Plan:
    seconds: float
    warmup_s: float
    max_streams: int
    relay_at_best: bool             # the relay again at the highest forwarding N (the limit under the same load)


FULL = Plan(seconds=10.0, warmup_s=2.0, max_streams=48, relay_at_best=True)
QUICK = Plan(seconds=4.0, warmup_s=1.0, max_streams=2, relay_at_best=False)


# --------------------------------------------------------------------------------------
# The clip as RTP payloads


def clip_path() -> Path:
    return cache_dir() / f"rtp-v{CLIP_VERSION}-testsrc2-{WIDTH}x{HEIGHT}-{FPS}fps-{CLIP_S}s-{KBPS}k-gop{GOP}-bf0.mp4"


def annexb(sample: bytes) -> bytes:
    """An MP4 sample (4-byte NAL lengths) as Annex B (a few NAL units a sample: not a loop over bytes)."""
    out, pos = [], 0
    while pos + 4 <= len(sample):
        size = int.from_bytes(sample[pos:pos + 4], "big")
        out.append(b"\x00\x00\x00\x01" + sample[pos + 4:pos + 4 + size])
        pos += 4 + size
    return b"".join(out)


def load_clip(path: Path) -> dict:
    """The clip's access units as the payloads the box's own packetizer makes: [(keyframe, [payload, ...])]."""
    import av

    from services.rtp.h264 import H264Packetizer
    from services.rtp.outbound import _annexb

    packetizer = H264Packetizer(1, MTU - 12)
    aus: list[tuple[bool, list[bytes]]] = []
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        packetizer.parameter_sets(_annexb(bytes(v.codec_context.extradata or b"")))
        for p in c.demux(v):
            if p.size:
                aus.append((bool(p.is_keyframe), packetizer.packetize(annexb(bytes(p)))))
    packets = [len(ps) for _, ps in aus]
    nbytes = sum(len(x) for _, ps in aus for x in ps)
    keys = [len(ps) for k, ps in aus if k]
    return {"aus": aus, "path": str(path), "frames": len(aus), "kbps": round(nbytes * 8 / (len(aus) / FPS) / 1000),
            "packets_per_s": round(sum(packets) / (len(aus) / FPS)), "packets_per_unit_mean": sum(packets) / len(aus),
            "keyframe_packets": max(keys, default=0), "keyframe_bytes_max": max(
                (sum(len(x) for x in ps) for k, ps in aus if k), default=0)}


# --------------------------------------------------------------------------------------
# The sender (a child process), the receiver (a thread), the relay (a child process)

SENDER = r'''
import array, json, os, pickle, random, select, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
with open(cfg["clip"], "rb") as f:
    aus = [ps for _, ps in pickle.load(f)]
dests = [tuple(d) for d in cfg["dests"]]
n, fps, pt, max_s = len(dests), cfg["fps"], cfg["pt"], cfg["max_s"]
frame_ns = 1_000_000_000 // fps
stagger = frame_ns // n
socks = []
for _ in dests:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
ssrc = [random.getrandbits(32) for _ in dests]
seq = [random.getrandbits(16) for _ in dests]
ts0 = [random.getrandbits(32) for _ in dests]
seq0 = list(seq)
rec_t, rec_s, rec_k, rec_j = array.array("q"), array.array("h"), array.array("i"), array.array("h")
late = array.array("q")
head = struct.Struct("!BBHII").pack
now = time.clock_gettime_ns
MONO = time.CLOCK_MONOTONIC
t0 = now(MONO) + 50_000_000
print(json.dumps({"t0": t0, "frame_ns": frame_ns, "stagger_ns": stagger}), flush=True)
frames = int(max_s * fps)
k = 0
stdin = sys.stdin
while k < frames:
    if select.select([stdin], [], [], 0)[0]:
        break                                       # "stop" (or EOF): the parent has what it needs
    payloads = aus[k % len(aus)]
    last = len(payloads) - 1
    for s in range(n):
        due = t0 + k * frame_ns + s * stagger
        wait = due - now(MONO)
        if wait > 0:
            time.sleep(wait / 1e9)
        late.append(now(MONO) - due)
        sock, dest, ts = socks[s], dests[s], (ts0[s] + k * 3000) & 0xFFFFFFFF
        for j, payload in enumerate(payloads):
            hdr = head(0x80, (0x80 if j == last else 0) | pt, seq[s], ts, ssrc[s])
            t = now(MONO)
            sock.sendmsg((hdr, payload), (), 0, dest)
            rec_t.append(t); rec_s.append(s); rec_k.append(k); rec_j.append(j)
            seq[s] = (seq[s] + 1) & 0xFFFF
    k += 1
with open(cfg["out"], "wb") as f:
    pickle.dump({"t": rec_t, "s": rec_s, "k": rec_k, "j": rec_j, "late": late, "ssrc": ssrc, "seq0": seq0,
                 "ts0": ts0, "frames": k, "t0": t0, "frame_ns": frame_ns, "stagger_ns": stagger}, f)
print(json.dumps({"frames": k}), flush=True)
'''

RELAY = r'''
import json, selectors, socket, sys
dests = [tuple(d) for d in json.loads(sys.argv[1])]
socks = []
for _ in dests:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(json.dumps([s.getsockname()[1] for s in socks]), flush=True)
if len(socks) == 1:
    s, d = socks[0], dests[0]
    recvfrom, sendto = s.recvfrom, s.sendto
    while True:
        data, _ = recvfrom(65536)
        sendto(data, d)
sel = selectors.DefaultSelector()
for s, d in zip(socks, dests):
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, d)
while True:
    for key, _ in sel.select():
        s, d = key.fileobj, key.data
        while True:
            try:
                data, _ = s.recvfrom(65536)
            except BlockingIOError:
                break
            s.sendto(data, d)
'''


def clock_offset_ns() -> tuple[int, int]:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, from the tightest of 50 bracketed reads: (offset, its uncertainty)."""
    best = None
    for _ in range(50):
        m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or m1 - m0 < best[1]:
            best = (r - (m0 + m1) // 2, m1 - m0)
    assert best is not None
    return best


def bind_pair() -> tuple[socket.socket, socket.socket]:
    """A receiving RTP socket and its RTCP one on the next port (127.0.0.1, picked with 0)."""
    for _ in range(100):
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind(("127.0.0.1", 0))
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            b.bind(("127.0.0.1", a.getsockname()[1] + 1))
        except OSError:
            a.close()
            b.close()
            continue
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
            s.setblocking(False)
        return a, b
    raise OSError("no free pair of UDP ports on 127.0.0.1")


class Receiver(threading.Thread):
    """Every packet that reaches the N receiving sockets, with the kernel's arrival time; the box's SRs."""

    ANC = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(4)

    def __init__(self, n: int) -> None:
        super().__init__(daemon=True)
        self.pairs = [bind_pair() for _ in range(n)]
        self.ports = [a.getsockname()[1] for a, _ in self.pairs]
        # per stream: (seq, rtp ts, marker, arrival CLOCK_REALTIME ns, hash of the payload)
        self.packets: list[list[tuple[int, int, int, int, int]]] = [[] for _ in range(n)]
        self.srs: list[list[tuple[int, int]]] = [[] for _ in range(n)]    # (NTP, RTP time) of the box's SRs
        self.rtcp_kinds: dict[str, int] = {}
        self.overflow = [0] * n
        self.first_at: list[int | None] = [None] * n
        self.halt = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for i, (a, b) in enumerate(self.pairs):
            sel.register(a, selectors.EVENT_READ, (i, False))
            sel.register(b, selectors.EVENT_READ, (i, True))
        while not self.halt.is_set():
            for key, _ in sel.select(0.1):
                i, rtcp = key.data
                self._drain(key.fileobj, i, rtcp)
        sel.close()

    def _drain(self, sock: socket.socket, i: int, rtcp: bool) -> None:
        unpack = struct.unpack_from
        out = self.packets[i]
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(2048, self.ANC)
            except BlockingIOError:
                return
            rt = 0
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = unpack("qq", cdata)
                    rt = sec * 1_000_000_000 + nsec
                elif level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL:
                    self.overflow[i] = unpack("I", cdata)[0]
            if rtcp:
                self._rtcp(i, data)
                continue
            if len(data) < 12:
                continue
            seq, ts = unpack("!HI", data, 2)
            out.append((seq, ts, data[1] >> 7, rt, hash(data[12:])))
            if self.first_at[i] is None:
                self.first_at[i] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def _rtcp(self, i: int, data: bytes) -> None:
        from aiortc.rtp import RtcpPacket, RtcpSrPacket

        try:
            packets = RtcpPacket.parse(data)
        except ValueError:
            self.rtcp_kinds["unreadable"] = self.rtcp_kinds.get("unreadable", 0) + 1
            return
        for p in packets:
            name = type(p).__name__
            self.rtcp_kinds[name] = self.rtcp_kinds.get(name, 0) + 1
            if isinstance(p, RtcpSrPacket):
                self.srs[i].append((p.sender_info.ntp_timestamp, p.sender_info.rtp_timestamp))

    def close(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(5)
        for a, b in self.pairs:
            a.close()
            b.close()


class BusTap(threading.Thread):
    """(capture_ns, publish_ns) of every access unit the calls put on the bus: where the time goes."""

    def __init__(self, prefix: str, streams: list[str]) -> None:
        import framebus

        super().__init__(daemon=True)
        self.items: list[list[tuple[int, int]]] = [[] for _ in streams]
        self.consumers = [framebus.Consumer.attach(s, prefix=prefix, missing_ok=True, start="oldest")
                          for s in streams]
        self.halt = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for i, c in enumerate(self.consumers):
            sel.register(c.fileno(), selectors.EVENT_READ, i)
        while not self.halt.is_set():
            for key, _ in sel.select(0.1):
                i = key.data
                while (item := self.consumers[i].poll()) is not None:
                    self.items[i].append((item.capture_ns, item.publish_ns))
        sel.close()

    def close(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(5)
        for c in self.consumers:
            c.close()


class Sender:
    """The sending child: started with the clip and the destinations, stopped with a line on its stdin."""

    def __init__(self, clip_file: Path, dests: list[int], tmp: Path, max_s: float) -> None:
        self.out = tmp / f"sent{os.getpid()}-{time.monotonic_ns()}.pickle"
        cfg = {"clip": str(clip_file), "dests": [["127.0.0.1", p] for p in dests], "fps": FPS, "pt": PT,
               "max_s": max_s, "out": str(self.out)}
        self.proc = subprocess.Popen([sys.executable, "-c", SENDER, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the sender did not start: {self.proc.stderr.read()[-800:]}")
        self.start = json.loads(line)

    def stop(self) -> dict:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0:
            raise RuntimeError(f"the sender exited {self.proc.returncode}: {self.proc.stderr.read()[-800:]}")
        with open(self.out, "rb") as f:
            sent = pickle.load(f)
        self.out.unlink(missing_ok=True)
        return sent

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# The box


def peer_sdp(port: int) -> str:
    """The peer's SDP: it sends H.264 mode 1 from 127.0.0.1 and receives at `port` (RTCP on the next)."""
    return (f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=bench\nc=IN IP4 127.0.0.1\nt=0 0\n"
            f"m=video {port} RTP/AVP {PT}\na=rtpmap:{PT} H264/90000\na=fmtp:{PT} packetization-mode=1\n"
            "a=sendrecv\n")


class Box(BenchBox):
    """N calls: forward (fI sends fI) or naive (cI sends eI, encode@eI of decode@cI's cI-raw)."""

    def __init__(self, tag: str, path: str, ports: list[int], keys: str = "") -> None:
        prefix = "f" if path == "forward" else "c"
        super().__init__(f"rtpb{os.getpid()}{tag}", "ertpb", [f"{prefix}{i + 1}" for i in range(len(ports))],
                         client_timeout=3.0)
        self.path = path
        lines = ["[services.vision]\nenabled = false", "[services.recorder]\nenabled = false",
                 "[sources]"]   # none of the default camera: the calls only
        for i, (call, port) in enumerate(zip(self.streams, ports)):
            if path == "forward":
                lines.append(f'[rtp.{call}]\nroom = "bench"\nsdp = """{peer_sdp(port)}"""\nsend_video = "{call}"\n'
                             f"decode = false\n{keys}")
            else:
                enc = f"e{i + 1}"
                lines.append(f'[rtp.{call}]\nroom = "bench"\nsdp = """{peer_sdp(port)}"""\nsend_video = "{enc}"\n'
                             f"decode = true\n{keys}")
                lines.append(f'[encoders.{enc}]\ninput = "{call}-raw"\ncodec = "h264"\nbitrate = {KBPS}\n'
                             f"gop = {GOP / FPS}")
        self.write_config(lines)

    def services(self) -> list[str]:
        want = [f"rtp@{c}" for c in self.streams]
        if self.path == "naive":
            want += [f"decode@{c}" for c in self.streams] + [f"encode@e{i + 1}" for i in range(len(self.streams))]
        return want


def scrape(url: str) -> dict:
    """{(sample name, reason or ''): value} of the box's edgeroom_rtp_ / route_ / encode_ / decode_ samples."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(("edgeroom_rtp_", "edgeroom_route_", "edgeroom_encode_", "edgeroom_decode_")):
            continue
        for s in fam.samples:
            if s.name.endswith(("_created", "_bucket", "_sum", "_count")):
                continue
            key = (s.name, s.labels.get("reason", "") or s.labels.get("type", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def udp_drops(ports: list[int]) -> int:
    """The kernel's drop counter of the 127.0.0.1 UDP sockets on `ports` (/proc/net/udp)."""
    want = {f"0100007F:{p:04X}" for p in ports}
    total = 0
    try:
        with open("/proc/net/udp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] in want:
                    total += int(fields[-1])
    except OSError:
        return -1
    return total


# --------------------------------------------------------------------------------------
# Matching what came out to what went in


def _ext16(seqs: list[int]) -> list[int]:
    """16-bit sequence numbers extended past their wrap, in arrival order."""
    out, last = [], None
    for s in seqs:
        if last is None:
            cur = s
        else:
            d = (s - last) & 0xFFFF
            cur = out[-1] + (d - 0x10000 if d >= 0x8000 else d)
        out.append(cur)
        last = s
    return out


def out_units(packets: list[tuple[int, int, int, int, int]], offset_ns: int) -> tuple[list[dict], int]:
    """The units that came out of one stream (packets in sequence order, grouped by RTP time), and the
    sequence numbers missing among them."""
    if not packets:
        return [], 0
    ext = _ext16([p[0] for p in packets])
    order = sorted(range(len(packets)), key=ext.__getitem__)
    units: list[dict] = []
    gaps = 0
    prev = None
    for i in order:
        seq, ts, marker, rt, h = packets[i]
        e = ext[i]
        if prev is not None and e == prev:
            continue                                  # a duplicate
        gap = prev is not None and e != prev + 1
        if gap:
            gaps += e - prev - 1
        if not units or units[-1]["ts"] != ts or units[-1]["ended"] or gap:
            units.append({"ts": ts, "seq": [], "rx": [], "hash": [], "ended": False, "whole": not gap})
        u = units[-1]
        u["seq"].append(seq)
        u["rx"].append(rt - offset_ns)
        u["hash"].append(h)
        u["ended"] = bool(marker)
        prev = e
    return units, gaps


def ts_base(srs: list[tuple[int, int]], offset_ns: int) -> int | None:
    """The box's outbound RTP time at CLOCK_MONOTONIC 0 (mod 2^32), from its sender reports (the median)."""
    from services.rtp.rtcp import wall_of_ntp

    bases = []
    for ntp, rtp in srs:
        mono = wall_of_ntp(ntp) - offset_ns
        bases.append((rtp - (mono * CLOCK + 500_000_000) // 1_000_000_000) & 0xFFFFFFFF)
    if not bases:
        return None
    ref = bases[0]
    return (ref + int(statistics.median(((b - ref + 0x80000000) & 0xFFFFFFFF) - 0x80000000 for b in bases))) \
        & 0xFFFFFFFF


def capture_ns(ts: int, base: int, near_ns: int) -> int:
    """The CLOCK_MONOTONIC instant the box's RTP time `ts` stands for, the one closest below `near_ns`."""
    rel = (ts - base) & 0xFFFFFFFF
    near = near_ns * CLOCK // 1_000_000_000
    ticks = near - ((near - rel) & 0xFFFFFFFF)
    return ticks * 1_000_000_000 // CLOCK


def analyse(kind: str, sent: dict, rx: Receiver, hashes: list[list[int]], keyframes: list[bool], w0: int,
            w1: int, offset_ns: int, bus: list[list[tuple[int, int]]] | None = None,
            streams: list[int] | None = None) -> dict:
    """Per stream (`streams`, default all): the units sent in [w0, w1) against what came out; latencies in ms
    over those streams."""
    n = len(rx.packets)
    frame_ns, stagger, t0 = sent["frame_ns"], sent["stagger_ns"], sent["t0"]
    # what went in: per stream, frame k -> [send ns of packet j]
    tx: list[dict[int, list[int]]] = [{} for _ in range(n)]
    for t, s, k in zip(sent["t"], sent["s"], sent["k"]):
        tx[s].setdefault(k, []).append(t)
    clip_len = len(hashes)
    packet_ms: list[float] = []
    unit_ms: list[float] = []
    key_ms: list[float] = []
    delta_ms: list[float] = []
    first_ms: list[float] = []
    phase_ms: list[float] = []
    in_bus_ms: list[float] = []
    bus_out_ms: list[float] = []
    sent_units = matched = identical = differ = gaps = unmatched = matched_packets = 0
    no_sr = 0
    for s in (range(n) if streams is None else streams):
        units, g = out_units(rx.packets[s], offset_ns)
        gaps += g
        want = {k for k, pkts in tx[s].items() if w0 <= t0 + k * frame_ns + s * stagger < w1}
        sent_units += len(want)
        base = None
        if kind != "relay":
            base = ts_base(rx.srs[s], offset_ns)
            if base is None:
                no_sr += 1
                continue
        seq_to = {}
        if kind == "relay":
            seq0 = sent["seq0"][s]       # the relay keeps the sender's numbers: packet i of stream s is seq0 + i
            i = 0
            for k in sorted(tx[s]):
                for j in range(len(tx[s][k])):
                    seq_to[(seq0 + i) & 0xFFFF] = (k, j)
                    i += 1
        published: dict[int, int] = {}
        for cap, pub in (bus[s] if bus is not None else []):
            published[round((cap - t0 - s * stagger) / frame_ns)] = pub
        got: set[int] = set()
        for u in units:
            if not (u["ended"] and u["whole"]):
                continue
            if kind == "relay":
                kj = [seq_to.get(q) for q in u["seq"]]
                if None in kj or len({x[0] for x in kj}) != 1 or [x[1] for x in kj] != list(range(len(kj))):
                    unmatched += 1
                    continue
                k = kj[0][0]
                if len(kj) != len(tx[s][k]):
                    continue
            else:
                cap = capture_ns(u["ts"], base, u["rx"][-1])
                k = round((cap - t0 - s * stagger) / frame_ns)
                if k not in tx[s]:
                    unmatched += 1
                    continue
                phase_ms.append((cap - (t0 + k * frame_ns + s * stagger)) / 1e6)
            if k not in want or k in got:
                continue
            pk = tx[s][k]
            if kind == "forward":
                if u["hash"] == hashes[k % clip_len]:
                    identical += 1
                else:
                    differ += 1
                    continue
            got.add(k)
            matched += 1
            matched_packets += len(pk)
            unit_ms.append((u["rx"][-1] - pk[-1]) / 1e6)
            (key_ms if keyframes[k % clip_len] else delta_ms).append(unit_ms[-1])
            if k in published:
                in_bus_ms.append((published[k] - pk[-1]) / 1e6)
                bus_out_ms.append((u["rx"][-1] - published[k]) / 1e6)
            first_ms.append((u["rx"][0] - pk[0]) / 1e6)
            if kind != "naive" and len(u["rx"]) == len(pk):
                packet_ms.extend((a - b) / 1e6 for a, b in zip(u["rx"], pk))
    packet_ms.sort()
    unit_ms.sort()
    first_ms.sort()
    key_ms.sort()
    delta_ms.sort()
    late = sorted(x / 1e6 for x in sent["late"])
    out = {"sent_units": sent_units, "matched_units": matched, "missing_units": sent_units - matched,
           "out_seq_gaps": gaps, "unmatched_units": unmatched, "streams_without_sr": no_sr,
           "packets_matched": len(packet_ms), "packets_of_matched_units": matched_packets,
           "packet_p50_ms": pct(packet_ms, 50), "packet_p99_ms": pct(packet_ms, 99),
           "packet_max_ms": packet_ms[-1] if packet_ms else None,
           "unit_p50_ms": pct(unit_ms, 50), "unit_p99_ms": pct(unit_ms, 99),
           "unit_max_ms": unit_ms[-1] if unit_ms else None,
           "keyframe_units": len(key_ms), "keyframe_unit_p50_ms": pct(key_ms, 50),
           "keyframe_unit_max_ms": key_ms[-1] if key_ms else None, "delta_unit_p50_ms": pct(delta_ms, 50),
           "delta_unit_p99_ms": pct(delta_ms, 99),
           "first_packet_p50_ms": pct(first_ms, 50), "first_packet_p99_ms": pct(first_ms, 99),
           "sender_late_p99_ms": pct(late, 99), "sender_late_max_ms": late[-1] if late else None}
    if kind == "forward":
        out.update(identical_units=identical, differing_units=differ)
    if in_bus_ms:
        in_bus_ms.sort()
        bus_out_ms.sort()
        out.update(in_to_bus_p50_ms=pct(in_bus_ms, 50), in_to_bus_p99_ms=pct(in_bus_ms, 99),
                   bus_to_out_p50_ms=pct(bus_out_ms, 50), bus_to_out_p99_ms=pct(bus_out_ms, 99))
    if phase_ms:
        phase_ms.sort()
        out.update(capture_vs_send_p50_ms=pct(phase_ms, 50), capture_vs_send_max_ms=phase_ms[-1])
    return out


# --------------------------------------------------------------------------------------
# One row


def cpu_s(pid: int) -> float | None:
    """CPU seconds a process's threads have run: /proc/PID/task/*/schedstat (ns, exact; /proc/PID/stat counts
    10 ms ticks, too coarse for a relay's 10 ms over a short window), else /proc/PID/stat."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return proc_cpu_s(pid)
    return total / 1e9


def _cpu(pids: list[int]) -> float:
    return sum(cpu_s(p) or 0.0 for p in pids)


def run_row(kind: str, n: int, plan: Plan, clip: dict, tmp: Path, tag: str, pacing_kbps: int | None = None) -> dict:
    names = {"relay": "bare Python UDP relay", "forward": "rtp@ forward (bus, no decode)",
             "naive": "decode + re-encode (rtp@ -> decode@ -> encode@ -> rtp@)"}
    rec: dict = {"kind": kind, "name": names[kind], "streams": n}
    if kind != "relay":
        rec["pacing_kbps"] = pacing_kbps or DEFAULT_PACING_KBPS
        if pacing_kbps:
            rec["name"] += f", pacing_kbps = {pacing_kbps}"
    control = kind != "relay"            # a stream through a bare relay beside the box's: the same moments
    rx = Receiver(n + control)
    box: Box | None = None
    relay: subprocess.Popen | None = None
    tap: BusTap | None = None
    sender: Sender | None = None
    t_start = time.monotonic()
    try:
        offset0, unc0 = clock_offset_ns()
        relay = subprocess.Popen([sys.executable, "-c", RELAY, json.dumps([["127.0.0.1", p] for p in rx.ports[n:]]
                                                                          if control else
                                                                          [["127.0.0.1", p] for p in rx.ports])],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = relay.stdout.readline()
        if not line:
            raise RuntimeError(f"the relay did not start: {relay.stderr.read()[-800:]}")
        relay_ports = json.loads(line)
        if kind == "relay":
            dests = relay_ports
            measured, beside = [relay.pid], []
        else:
            box = Box(tag, kind, rx.ports[:n], f"pacing_kbps = {pacing_kbps}" if pacing_kbps else "")
            rec["prefix"] = box.prefix
            box.start()
            st = box.wait_ready(90, box.services())
            rec["startup_s"] = round(time.monotonic() - t_start, 1)
            dests = [box.client.call("sdp", {"session": c})["ports"]["video"]["rtp"] for c in box.streams]
            pids = {r["service"]: r["pid"] for r in box.status()["services"] if r.get("pid")}
            measured = [pid for svc, pid in pids.items() if svc.split("@")[0] in ("rtp", "decode", "encode")]
            beside = [pid for svc, pid in pids.items() if pid not in measured] + [box.proc.pid]
            rec["metrics_url"] = st["metrics_url"]
            if kind == "forward":
                tap = BusTap(box.prefix, box.streams)
                tap.start()
            dests += relay_ports
        rx.start()
        sender = Sender(tmp / "clip.pickle", dests, tmp, max_s=FIRST_OUT_S + plan.warmup_s + plan.seconds + 30)
        deadline = time.monotonic() + FIRST_OUT_S
        while None in rx.first_at and time.monotonic() < deadline:
            if sender.proc.poll() is not None:
                raise RuntimeError(f"the sender exited {sender.proc.returncode}: {sender.proc.stderr.read()[-800:]}")
            time.sleep(0.05)
        if None in rx.first_at:
            waiting = [i + 1 for i, t in enumerate(rx.first_at) if t is None]
            raise RuntimeError(f"nothing came out of stream(s) {waiting[:8]} within {FIRST_OUT_S:.0f} s" +
                               (f": {box.log_tail()}" if box else ""))
        rec["first_out_s"] = round((max(rx.first_at) - sender.start["t0"]) / 1e9, 2)
        time.sleep(plan.warmup_s)
        w0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        busy0, own0, snd0 = machine_busy_s()[0], self_cpu_s(), _cpu([sender.proc.pid] + ([relay.pid] * control))
        c0, b0 = _cpu(measured), _cpu(beside)
        time.sleep(plan.seconds)
        c1, b1 = _cpu(measured), _cpu(beside)
        busy1, own1, snd1 = machine_busy_s()[0], self_cpu_s(), _cpu([sender.proc.pid] + ([relay.pid] * control))
        w1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        time.sleep(TAIL_S)
        sent = sender.stop()
        sender = None
        rx.close()
        if tap is not None:
            tap.close()
        offset1, unc1 = clock_offset_ns()
        window = (w1 - w0) / 1e9
        cpu, side, snd, own = c1 - c0, b1 - b0, snd1 - snd0, own1 - own0
        rec.update(window_s=round(window, 2), cpu_s=cpu, cpu_per_stream_s=cpu / (n * window),
                   box_other_cpu_per_s=side / window, sender_cpu_per_s=snd / window,
                   receiver_cpu_per_s=own / window,
                   cores_busy=(cpu + side + snd + own) / window,
                   other_load_pct=100 * max(0.0, (busy1 - busy0) - cpu - side - snd - own) / window,
                   clock_offset_drift_us=(offset1 - offset0) / 1e3, clock_offset_uncertainty_us=max(unc0, unc1) / 1e3)
        hashes = [[hash(p) for p in ps] for _, ps in clip["aus"]]
        keyframes = [k for k, _ in clip["aus"]]
        offset = (offset0 + offset1) // 2
        rec.update(analyse(kind, sent, rx, hashes, keyframes, w0, w1, offset, tap.items if tap is not None else None,
                           streams=list(range(n))))
        if control:
            beside_it = analyse("relay", sent, rx, hashes, keyframes, w0, w1, offset, streams=[n])
            rec["relay_beside"] = {k: beside_it[k] for k in (
                "sent_units", "matched_units", "missing_units", "packet_p50_ms", "packet_p99_ms", "packet_max_ms",
                "unit_p50_ms", "unit_p99_ms")}
        rec["receiver_dropped"] = sum(rx.overflow)
        rec["rtcp_from_box"] = dict(rx.rtcp_kinds)
        if box is not None:
            rec["box_socket_drops"] = udp_drops(dests[:n])
            m = scrape(rec.pop("metrics_url"))
            rec["box_lost_packets"] = int(m.get(("edgeroom_rtp_lost_packets_total", ""), 0))
            rec["box_dropped"] = {f"{name.replace('edgeroom_', '').replace('_total', '')}:{why}": int(v)
                                  for (name, why), v in m.items() if v and name in (
                                      "edgeroom_rtp_dropped_packets_total", "edgeroom_rtp_dropped_units_total",
                                      "edgeroom_rtp_unsent_units_total", "edgeroom_route_dropped_items_total",
                                      "edgeroom_encode_dropped_frames_total", "edgeroom_decode_dropped_frames_total")}
            rec["warnings"] = box.warning_lines()[:6]
        else:
            rec["box_socket_drops"] = udp_drops(dests)
        why = []
        if rec["missing_units"]:
            why.append(f"{rec['missing_units']} of {rec['sent_units']} units did not come out whole")
        if rec["receiver_dropped"]:
            why.append(f"the receiver's sockets dropped {rec['receiver_dropped']} (the machine, not the box)")
        if rec["box_socket_drops"]:
            why.append(f"the box's sockets dropped {rec['box_socket_drops']}")
        p99 = rec["packet_p99_ms"] if rec["packet_p99_ms"] is not None else rec["unit_p99_ms"]
        if p99 is None:
            why.append("no latency measured")
        elif p99 > LAT_BOUND_MS:
            why.append(f"p99 {p99:.1f} ms > {LAT_BOUND_MS:.1f} ms")
        rec["sustained"] = not why
        rec["why"] = "; ".join(why)
        return rec
    except (RuntimeError, ControlError, OSError, KeyError, ValueError) as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
        rec["sustained"] = False
        rec["why"] = "failed"
        log(f"   FAILED: {rec['failure']}")
        return rec
    finally:
        if sender is not None:
            sender.kill()
        rx.close()
        if tap is not None:
            tap.close()
        if relay is not None:
            relay.kill()
            relay.wait()
        if box is not None:
            box.close()
        rec["took_s"] = round(time.monotonic() - t_start, 1)


def log_row(r: dict) -> None:
    if r.get("failure"):
        return
    log(f"   {r['kind']:>7s} x{r['streams']:<2d} cpu/stream-s={1000 * r['cpu_per_stream_s']:.1f} ms  "
        f"packet p50/p99={_ms(r['packet_p50_ms'])}/{_ms(r['packet_p99_ms'])} ms  "
        f"unit p50/p99={_ms(r['unit_p50_ms'])}/{_ms(r['unit_p99_ms'])} ms  "
        f"units {r['matched_units']}/{r['sent_units']}  "
        f"{'sustained' if r['sustained'] else 'NOT sustained: ' + r['why']}  ({r['took_s']:.0f} s)")


# --------------------------------------------------------------------------------------
# The run


def capacity_estimate(rec: dict) -> float | None:
    """How many streams the cores hold, from a sustained row's CPU (box, sender and receiver together)."""
    busy = rec.get("cores_busy")
    if not rec.get("sustained") or not busy:
        return None
    usable = max(0.5, (os.cpu_count() or 1) * USABLE_SHARE - rec.get("other_load_pct", 0.0) / 100)
    return rec["streams"] * usable / busy


def run(plan: Plan) -> tuple[list[dict], dict]:
    path = encode_testsrc(clip_path(), WIDTH, HEIGHT, FPS, CLIP_S, KBPS, GOP, log=log)
    clip = load_clip(path)
    info = {k: v for k, v in clip.items() if k != "aus"}
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="ertpb", dir="/tmp"))
    try:
        with open(tmp / "clip.pickle", "wb") as f:
            pickle.dump(clip["aus"], f)
        counter = [0]

        def row(kind: str, n: int, sweep: bool = False, pacing_kbps: int | None = None) -> dict:
            counter[0] += 1
            log(f"-- {kind} N={n}" + (f" pacing_kbps={pacing_kbps}" if pacing_kbps else ""))
            r = run_row(kind, n, plan, clip, tmp, f"r{counter[0]}", pacing_kbps)
            r["sweep"] = sweep
            log_row(r)
            rows.append(r)
            return r

        row("relay", 1)
        first = row("forward", 1, sweep=True)
        row("forward", 1, pacing_kbps=NO_PACING_KBPS)
        row("naive", 1)
        tried, est = {1: first["sustained"]}, {}
        if (e := capacity_estimate(first)) is not None:
            est[1] = first["capacity_estimate"] = e
        while (n := next_n(tried, plan.max_streams, False, est)) is not None:
            r = row("forward", n, sweep=True)
            tried[n] = r["sustained"]
            if (e := capacity_estimate(r)) is not None:
                est[n] = r["capacity_estimate"] = e
        best = max((n for n, ok in tried.items() if ok), default=0)
        if best > 1 and plan.relay_at_best:
            row("relay", best)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, info


# --------------------------------------------------------------------------------------
# The report


def _ms(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def relay_of(rows: list[dict], n: int) -> dict | None:
    return next((r for r in rows if r["kind"] == "relay" and r["streams"] == n and not r.get("failure")), None)


def annotate(rows: list[dict]) -> None:
    for r in rows:
        if r.get("failure") or r["kind"] == "relay":
            continue
        ref = r.get("relay_beside")          # the relay's stream at the same moments: what the machine's load did
        if r.get("packet_p99_ms") is not None and ref and ref.get("packet_p99_ms") is not None:
            r["added_packet_p99_ms"] = r["packet_p99_ms"] - ref["packet_p99_ms"]
        if r.get("unit_p99_ms") is not None and ref and ref.get("unit_p99_ms") is not None:
            r["added_unit_p99_ms"] = r["unit_p99_ms"] - ref["unit_p99_ms"]
        alone = relay_of(rows, r["streams"]) or relay_of(rows, 1)
        if alone is not None and alone.get("cpu_per_stream_s"):
            r["cpu_vs_relay"] = r["cpu_per_stream_s"] / alone["cpu_per_stream_s"]


def sweep_rows(rows: list[dict]) -> list[dict]:
    """The forward rows of the sweep (the config's default pacing)."""
    return [r for r in rows if r["kind"] == "forward" and r.get("sweep")]


def highest(rows: list[dict]) -> int:
    return max((r["streams"] for r in sweep_rows(rows) if r.get("sustained")), default=0)


def table(rows: list[dict]) -> str:
    out = ["| row | N | ms CPU per stream-s | packet p50 / p99 ms | unit p50 / p99 / max ms | relay beside it: packet "
           "p99 ms | added p99 ms (packet / unit) | units out / sent | other load % | notes |",
           "|---|---:|---:|---|---|---:|---|---|---:|---|"]
    for r in rows:
        if r.get("failure"):
            out.append(f"| {r['name']} | {r['streams']} | FAILED | | | | | | | {r['failure'][:160]} |")
            continue
        notes = []
        if r["kind"] == "forward":
            notes.append(f"bytes identical {r.get('identical_units', 0)}/{r['matched_units']}")
        if r.get("box_other_cpu_per_s") and r["kind"] != "relay":
            notes.append(f"hub + run {1000 * r['box_other_cpu_per_s']:.0f} ms/s")
        if r.get("cpu_vs_relay"):
            notes.append(f"{r['cpu_vs_relay']:.1f}x the relay's CPU")
        if r.get("box_dropped"):
            notes.append(f"box: {r['box_dropped']}")
        notes.append("sustained" if r["sustained"] else f"NOT sustained: {r['why']}")
        added = f"{_ms(r.get('added_packet_p99_ms'))} / {_ms(r.get('added_unit_p99_ms'))}" \
            if r["kind"] != "relay" else ""
        beside = _ms(r["relay_beside"]["packet_p99_ms"]) if r.get("relay_beside") else ""
        out.append(f"| {r['name']} | {r['streams']} | {1000 * r['cpu_per_stream_s']:.1f} | "
                   f"{_ms(r['packet_p50_ms'])} / {_ms(r['packet_p99_ms'])} | {_ms(r['unit_p50_ms'])} / "
                   f"{_ms(r['unit_p99_ms'])} / {_ms(r['unit_max_ms'])} | {beside} | {added} | "
                   f"{r['matched_units']} / {r['sent_units']} | {r['other_load_pct']:.0f} | {'; '.join(notes)} |")
    return "\n".join(out)


def targets(rows: list[dict], plan: Plan) -> list[tuple[str, str, str]]:
    out = []
    fwd = next((r for r in sweep_rows(rows) if r["streams"] == 1 and not r.get("failure")), None)
    if fwd is not None and fwd.get("added_packet_p99_ms") is not None:
        added = fwd["added_packet_p99_ms"]
        relay = fwd["relay_beside"]
        detail = (f"{added:+.2f} ms (forward p99 {fwd['packet_p99_ms']:.2f} ms, the relay's stream beside it "
                  f"{relay['packet_p99_ms']:.2f} ms; "
                  f"keyframe units {_ms(fwd.get('keyframe_unit_p50_ms'))} ms p50, the others "
                  f"{_ms(fwd.get('delta_unit_p50_ms'))} ms p50 / {_ms(fwd.get('delta_unit_p99_ms'))} ms p99, last "
                  f"packet in -> out); per unit {fwd.get('added_unit_p99_ms', 0):+.2f} ms")
        free = next((r for r in rows if r["kind"] == "forward" and r.get("pacing_kbps") == NO_PACING_KBPS
                     and r.get("added_packet_p99_ms") is not None), None)
        if free is not None:
            detail += (f"; without pacing (pacing_kbps = {NO_PACING_KBPS}) {free['added_packet_p99_ms']:+.2f} ms "
                       f"(keyframe units {_ms(free.get('keyframe_unit_p50_ms'))} ms p50)")
        out.append(("PASS" if added <= TARGET_ADDED_MS else "FAIL",
                    f"forwarding adds at most {TARGET_ADDED_MS:g} ms p99 over the relay (packet latency, N=1, "
                    f"pacing_kbps = {DEFAULT_PACING_KBPS}, the default)", detail))
    best = highest(rows)
    row = next((r for r in sweep_rows(rows) if r["streams"] == best), None)
    fail = min((r["streams"] for r in sweep_rows(rows) if not r.get("sustained")), default=None)
    detail = f"{best} stream(s) sustained"
    if row is not None:
        detail += f" ({row['cores_busy']:.2f} cores busy with the sender and receiver, packet p99 " \
                  f"{_ms(row['packet_p99_ms'])} ms)"
    if fail is not None:
        first_fail = next(r for r in sweep_rows(rows) if r["streams"] == fail)
        detail += f"; N={fail}: {first_fail['why']}"
    elif best >= plan.max_streams:
        detail += f" (the cap, --max-streams {plan.max_streams})"
    out.append(("INFO", "the most forwarded streams with zero loss and packet p99 within one frame interval", detail))
    return out


def report(rows: list[dict], clip: dict, plan: Plan, name: str, elapsed: float, load: tuple) -> str:
    tg = targets(rows, plan)
    text = [f"## RTP forwarding benchmark ({name}, {elapsed:.0f} s, code {code_version()}, {os.cpu_count()} CPUs, "
            f"load average {' '.join(f'{x:.2f}' for x in load)} at start, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end, {tool_version(['ffmpeg', '-version'])})",
            "", table(rows), "", "## targets", ""]
    text += [f"- {v}  {t}: {d}" for v, t, d in tg]
    text += ["", "## notes", "",
             f"- clip: {WIDTH}x{HEIGHT} {FPS} fps H.264, {clip['kbps']} kbit/s, {clip['frames']} frames, a keyframe "
             f"every {GOP} frames (up to {clip['keyframe_packets']} packets, {clip['keyframe_bytes_max']} bytes), "
             f"{clip['packets_per_s']} packets/s at a {MTU}-byte MTU; each unit's packets sent back to back at its "
             f"frame time, N streams staggered over the frame interval.",
             "- packet latency: each packet's arrival at the receiver (the kernel's time) less the same packet's "
             "send time (the relay's, or the forwarded one with the same payload); unit: the last packet out less "
             "the last packet in. The box forwards whole units, so a unit's early packets wait for its last. "
             "added: against the relay's stream beside the box's (sent and received at the same moments).",
             "- box: counters over the box's whole run (start-up included), not the window.",
             "- CPU: rtp@ (forward), rtp@ + decode@ + encode@ (naive), the relay process; the time their threads ran "
             "(/proc/PID/task/*/schedstat) over the window, per stream-second. other load: CPU the machine spent "
             "outside this benchmark's processes, % of one core.",
             f"- the jitter buffer at its default (jitter_ms = 50): packets in order go through at once; it holds "
             f"only what follows a gap. Sustained: every unit sent in the window out whole, no drop anywhere, "
             f"packet p99 <= {LAT_BOUND_MS:.1f} ms."]
    for r in rows:
        if r.get("warnings"):
            text.append(f"- {r['name']} N={r['streams']}: the box logged: " + " | ".join(r["warnings"]))
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S = 4, N up to 2 (ends within ~60-90 s)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--seconds", type=float, help="the measured window per row (default 10, --quick 4)")
    ap.add_argument("--max-streams", type=int, help="the sweep's cap on forwarded streams (default 48, --quick 2)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        if args.seconds < 1:
            ap.error("--seconds: at least 1")
        plan.seconds = args.seconds
    if args.max_streams is not None:
        if args.max_streams < 1:
            ap.error("--max-streams: at least 1")
        plan.max_streams = args.max_streams
    if shutil.which("ffmpeg") is None:
        ap.error("ffmpeg is not installed (apt-get install ffmpeg): it makes the clip")
    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    load = os.getloadavg()
    try:
        rows, clip = run(plan)
    except KeyboardInterrupt:
        log("interrupted: every child stopped, temp dirs and bus objects removed")
        return 130
    annotate(rows)
    name = ("quick" if args.quick else "full") + "".join(
        f", --{k.replace('_', '-')} {v:g}" for k, v in (("seconds", args.seconds), ("max_streams", args.max_streams))
        if v is not None)
    print(report(rows, clip, plan, name, time.monotonic() - t0, load), flush=True)
    if args.json:
        tg = targets(rows, plan)
        out = {"plan": name, "seconds": plan.seconds, "max_streams": plan.max_streams, "cpus": os.cpu_count(),
               "loadavg_start": [round(x, 2) for x in load], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "code": code_version(), "clip": clip, "highest_sustained": highest(rows),
               "targets": [{"verdict": v, "target": t, "detail": d} for v, t, d in tg],
               "rows": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failure") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
