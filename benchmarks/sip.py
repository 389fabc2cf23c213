"""SIP benchmark: call set-up time and concurrent audio+video calls through the SIP service, against
SIPp's own UAS (the signalling limit) and against decoding and re-encoding every call (the naive path).

Run from the repository root:

    .venv/bin/python benchmarks/sip.py [--quick] [--calls N] [--max-calls M] [--seconds S] [--json PATH]

What it answers, on this machine: how long the SIP service (`sip`, services/sip/service.py) takes
from an INVITE to its 200 OK and to the caller's first picture on the bus, against a C SIP stack
answering the same INVITEs with no media (SIPp's built-in UAS); how many audio+video calls
(720p30 H.264 forwarded as it is, not transcoded, and PCMU) it carries with zero loss when held
to 2 cores, and its CPU per call, against what RoomKit's in-process path costs per call
(decode every inbound picture, encode what it sends).

Method
------
* Clip: benchmarks/rtp.py's (made once with ffmpeg and cached): testsrc2 1280x720 30 fps,
  libx264, 2 Mbit/s CBR, a keyframe every 2 s, no B-frames; its access units cut into RTP
  payloads (mode 1, 1200-byte packets) by the box's own packetizer, SPS/PPS before every IDR.
* The box: a private `edgeroom run` (benchmarks/benchbox.py) with one source, `[sources.cam]`
  (synthetic, H.264 720p30 2 Mbit/s in-process, a keyframe every 2 s, audio on, no decode@),
  and `[sip]`: auth = "allow" (127.0.0.1), answered at once (answer_after_ms = 0), every
  call sent `cam` and `cam-audio`; max_calls 100, the rate limits out of the way.
* Rows, in this order, in the same run:
  - naive: a child process (its own interpreter) does per call what RoomKit does: every
    inbound picture decoded (PyAV h264, 1 thread, as decode@ does) and every outbound one
    encoded (services/encode/encoder.py's libx264 for calls: veryfast, zerolatency,
    baseline, 2 Mbit/s, 1 thread), paced at 30 fps for S seconds; its CPU (getrusage) over
    the window, per call-second. Measured before the box starts, so nothing else runs.
    (The audio side, PCMU <-> PCM, is left out: it is small next to the video.)
  - set-up, the limit: SIPp (benchmarks/sipp/uac_setup.xml: INVITE with PCMU + H.264
    mode 1 pt 96, 200, ACK, a pause, BYE) against `sipp -sn uas` on loopback, --calls calls
    at a steady rate; INVITE -> 200 from SIPp's message trace (-trace_msg: microsecond
    timestamps; SIPp's own response times count whole milliseconds).
  - set-up, the box: the same SIPp scenario, the same calls, against the box; every 200
    checked to carry an m=video with a port.
  - first picture: a Python UAC (INVITEs built with the box's own services/sip/message.py)
    calls the box, and at the 200 sends the clip as RTP from its first keyframe; this
    process reads the call's stream (`sip-XXXXXX`) off the bus (framebus.Consumer) and
    decodes it with PyAV: INVITE -> the first access unit on the bus (its publish time)
    and INVITE -> the first decoded picture, over --pictures calls (one at a time).
  - concurrent calls: N calls at once, each sending 720p30 H.264 (benchmarks/rtp.py's
    sender child: every unit's packets back to back at its frame time, the N staggered
    over the frame interval) and PCMU (20 ms packets, a child of this file), and receiving
    the box's cam + audio (benchmarks/rtp.py's receiver: a socket pair per media, every
    packet and SO_RXQ_OVFL drops). The `sip` process's threads are pinned to cores {0, 1}
    (sched_setaffinity); on a machine with more cores this benchmark and its children run
    on the others. N = 1, 2, then up by the CPU the last N used (benchmarks/ingest.py's
    next_n: doubling or the estimate, then halving), up to --max-calls.
    Sustained: every call answered 200, every call's `lost` is 0 both media, the box got every
    packet sent to it (`packets_in` of `call.list` = what the senders sent, read after they
    stopped), the box's sockets dropped nothing, and what it sent came out with no sequence
    gap. An INVITE the box refuses or leaves unanswered (8 s) ends that N as not sustained,
    with the box's own warning or error as the reason, and no N above that call is tried.
    CPU per call: the `sip` process's threads' run time (/proc/PID/task/*/schedstat) over
    the window, per call-second; beside it, the share above the process's own CPU with no
    call (measured before the first step). "box other": hub, capture@cam (the one cam encode
    every call gets), `edgeroom run`; "load gen": the senders and this process (the receivers);
    "other load": what the machine spent outside all of these (other work, softirq).
* Time: --quick ~30-60 s (5 set-up calls each, 3 pictures, N up to 2); a full run 4-8 minutes.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
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
    code_version,
    log,
    machine_busy_s,
    next_n,
    pct,
    self_cpu_s,
    tool_version,
)
from benchmarks.rtp import (  # noqa: E402
    CLIP_S,
    FPS,
    GOP,
    HEIGHT,
    KBPS,
    PT,
    WIDTH,
    Receiver,
    Sender,
    _ms,
    bind_pair,
    clip_path,
    clock_offset_ns,
    cpu_s,
    load_clip,
    out_units,
    udp_drops,
)
from services.control.client import ControlError  # noqa: E402
from tests.sip_peers import free_udp_block  # noqa: E402  (the tests' port picker: even, a free block)
from tests.sip_peers import parse_sipp_stats as sipp_stats  # noqa: E402

SCENARIO = Path(_HERE) / "sipp" / "uac_setup.xml"
LOOPBACK = "127.0.0.1"
PINNED = {0, 1}                   # the cores the sip process is held to
AUDIO_PT = 0                      # PCMU
AUDIO_MS = 20
T1 = 0.5                          # SIP's retransmit interval (RFC 3261), doubled per try
FIRST_PICTURE_S = 5.0             # how long a call may take to show its first picture
TAIL_S = 0.7                      # after the senders stop: the last packets reach the box and the receivers
SIPP_SLACK_S = 30.0


@dataclass
class Plan:
    setup_calls: int                # SIPp calls timed per set-up row
    setup_rate: float               # SIPp calls started a second
    hold_ms: int                    # SIPp's pause between ACK and BYE
    pictures: int                   # first-picture calls
    seconds: float                  # the measured window of a concurrent-calls step (and of the naive row)
    warmup_s: float
    max_calls: int


FULL = Plan(setup_calls=200, setup_rate=20.0, hold_ms=200, pictures=20, seconds=10.0, warmup_s=2.0, max_calls=64)
QUICK = Plan(setup_calls=5, setup_rate=10.0, hold_ms=100, pictures=3, seconds=3.0, warmup_s=1.0, max_calls=2)


# --------------------------------------------------------------------------------------
# Ports, pinning


def pin_threads(pid: int, cores: set[int]) -> int:
    """Every thread of `pid` held to `cores` (threads it starts later inherit it): how many were pinned."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n


def pinning() -> tuple[set[int], set[int] | None, str]:
    """(the sip process's cores, this benchmark's or None, a note)."""
    have = sorted(os.sched_getaffinity(0))
    if len(have) < 2:
        return set(have), None, f"this machine lets the benchmark have {len(have)} core: the sip process " \
                                "shares it with everything else"
    pinned = set(have[:2]) if not PINNED <= set(have) else PINNED
    rest = set(have) - pinned
    if not rest:
        return pinned, None, f"this machine has {len(have)} cores: the sip process is pinned to {sorted(pinned)}, " \
                             "all of them, and shares them with the callers, the receivers and the box's cam encode"
    return pinned, rest, f"the sip process pinned to {sorted(pinned)}; this benchmark, its senders and receivers on " \
                         f"{len(rest)} other core(s); the hub and the cam encode unpinned"


# --------------------------------------------------------------------------------------
# SIPp


def sipp_times(message_file: Path) -> dict:
    """Per Call-ID, from SIPp's -trace_msg: INVITE first sent -> first response, -> 200, and whether the 200's SDP
    has a video m= line with a port."""
    if not message_file.exists():
        return {}
    text = message_file.read_text(errors="replace")
    calls: dict[str, dict] = {}
    for block in re.split(r"^-{20,} ", text, flags=re.M)[1:]:
        head, _, rest = block.partition("\n")
        try:
            at = datetime.datetime.strptime(head.strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        sent = "message sent" in rest[:80]
        msg = rest.split("\n", 2)[-1].lstrip("\n")
        first = msg.split("\n", 1)[0].strip()
        cid = re.search(r"^Call-ID:\s*(\S+)", msg, re.M | re.I)
        cseq = re.search(r"^CSeq:\s*\d+\s+(\S+)", msg, re.M | re.I)
        if not cid or not cseq or cseq.group(1).upper() != "INVITE":
            continue
        c = calls.setdefault(cid.group(1), {})
        if sent and first.startswith("INVITE "):
            c.setdefault("invite", at)
        elif not sent and first.startswith("SIP/2.0 "):
            c.setdefault("first", at)
            if first.split()[1] == "200" and "ok" not in c:
                c["ok"] = at
                c["video"] = bool(re.search(r"^m=video [1-9]\d* ", msg, re.M))
    return calls


def sipp_version() -> str:
    try:
        out = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "SIPp ?"
    return next((line.strip().rstrip(".") for line in out.splitlines() if "SIPp v" in line), "SIPp ?")


def sipp_argv(workdir: Path) -> list[str]:
    return ["-i", LOOPBACK, "-mi", LOOPBACK, "-mp", str(free_udp_block(4)), "-ci", LOOPBACK,
            "-cp", str(free_udp_block(1)), "-nostdin", "-trace_err", "-error_file", str(workdir / "errors.log")]


def run_sipp_uac(target: str, plan: Plan, workdir: Path) -> dict:
    """The scenario against `target` (host:port): --calls calls at the plan's rate; the set-up times."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_udp_block(1)
    limit = plan.setup_calls / plan.setup_rate + plan.hold_ms / 1000 + SIPP_SLACK_S
    argv = ["sipp", target, "-sf", str(SCENARIO), "-p", str(port), *sipp_argv(workdir), "-s", "bench",
            "-m", str(plan.setup_calls), "-r", str(plan.setup_rate), "-d", str(plan.hold_ms),
            "-timeout", f"{int(limit)}s", "-timeout_error", "-trace_msg", "-message_file", str(workdir / "msg.log")]
    t = time.monotonic()
    r = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=limit + 15)
    took = time.monotonic() - t
    calls = sipp_times(workdir / "msg.log")
    setup = sorted(1000 * (c["ok"] - c["invite"]) for c in calls.values() if "ok" in c and "invite" in c)
    first = sorted(1000 * (c["first"] - c["invite"]) for c in calls.values() if "first" in c and "invite" in c)
    stats = sipp_stats(r.stdout)
    rec = {"calls": plan.setup_calls, "rate": plan.setup_rate, "hold_ms": plan.hold_ms, "sipp_rc": r.returncode,
           "successful": stats.get("successful", 0), "failed": stats.get("failed", 0), "answered": len(setup),
           "answered_with_video": sum(1 for c in calls.values() if c.get("video")),
           "p50_ms": pct(setup, 50), "p99_ms": pct(setup, 99), "max_ms": setup[-1] if setup else None,
           "mean_ms": sum(setup) / len(setup) if setup else None,
           "first_response_p50_ms": pct(first, 50), "first_response_p99_ms": pct(first, 99), "took_s": round(took, 1)}
    if r.returncode != 0 or not setup:
        err = (workdir / "errors.log").read_text(errors="replace")[-600:] if (workdir / "errors.log").exists() else ""
        rec["sipp_errors"] = (err or r.stderr[-600:] or r.stdout[-600:]).strip()
    return rec


class SippUas:
    """`sipp -sn uas` on loopback for the limit row."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_block(1)
        self.proc = subprocess.Popen(["sipp", "-sn", "uas", "-p", str(self.port), *sipp_argv(workdir)], cwd=workdir,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:                 # bound: the port is no longer free
            if self.proc.poll() is not None:
                raise RuntimeError(f"sipp -sn uas exited {self.proc.returncode}: {self.proc.stderr.read()[-500:]!r}")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind((LOOPBACK, self.port))
                except OSError:
                    return
            time.sleep(0.02)
        raise RuntimeError("sipp -sn uas did not bind its port")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------------------
# A Python UAC: the box's own message module builds and reads the SIP


def offer_sdp(audio_port: int, video_port: int) -> str:
    """The caller's offer: PCMU (+ telephone-event) and H.264 mode 1 as pt 96, sendrecv, RTCP on port + 1."""
    return (f"v=0\r\no=bench {random.getrandbits(31)} 1 IN IP4 {LOOPBACK}\r\ns=-\r\nc=IN IP4 {LOOPBACK}\r\nt=0 0\r\n"
            f"m=audio {audio_port} RTP/AVP {AUDIO_PT} 101\r\na=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
            f"m=video {video_port} RTP/AVP {PT}\r\na=rtpmap:{PT} H264/90000\r\n"
            f"a=fmtp:{PT} profile-level-id=42e01f;packetization-mode=1\r\na=rtcp-fb:{PT} nack\r\n"
            f"a=rtcp-fb:{PT} nack pli\r\na=sendrecv\r\n")


class Uac:
    """One UDP socket, calls made one at a time (INVITE, its 200, ACK; BYE later); whatever the box asks
    meanwhile (OPTIONS, BYE, INFO) is answered 200."""

    def __init__(self, box: tuple[str, int]) -> None:
        self.box = box
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.host, self.port = self.sock.getsockname()
        self.acks: dict[str, bytes] = {}              # call-id -> its ACK (sent again on a 200 sent again)
        self.asked: collections.Counter = collections.Counter()

    def _via(self) -> str:
        from services.sip.message import new_branch
        return f"SIP/2.0/UDP {self.host}:{self.port};branch={new_branch()};rport"

    def _await(self, data: bytes, call_id: str, method: str, final_only: bool = True,
               budget: float = 8.0) -> tuple[object | None, int | None]:
        """Send `data` (again at T1, 2 T1, ...) until a final response to `method` of `call_id`: (it, the monotonic
        ns of the first response)."""
        from services.sip.message import SipError, parse, response

        first_ns = None
        interval, deadline = T1, time.monotonic() + budget
        self.sock.sendto(data, self.box)
        resend = time.monotonic() + interval
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None, first_ns
            if now >= resend:
                self.sock.sendto(data, self.box)
                interval = min(2 * interval, 4.0)
                resend = now + interval
            self.sock.settimeout(max(0.001, min(resend, deadline) - now))
            try:
                raw, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            at = time.monotonic_ns()
            try:
                msg = parse(raw)
            except SipError:
                continue
            if msg.is_request:
                self.asked[msg.method] += 1
                if msg.method != "ACK":
                    self.sock.sendto(response(msg, 200).encode(), addr)
                continue
            number, m = msg.cseq
            if msg.call_id != call_id or m != method:
                if m == "INVITE" and msg.status == 200 and msg.call_id in self.acks:
                    self.sock.sendto(self.acks[msg.call_id], addr)     # a 200 again: our ACK was lost
                continue
            if first_ns is None:
                first_ns = at
            if msg.status >= 200 or not final_only:
                return msg, first_ns

    def invite(self, user: str, sdp_text: str) -> dict:
        """A call: {status, call_id, invite_ns, first_ns, ok_ns, answer, dialog}; status 0 when nothing came."""
        from services.sip.message import new_call_id, new_tag, parse_name_addr, request

        call_id = new_call_id(self.host)
        local = f"<sip:{user}@{self.host}:{self.port}>;tag={new_tag()}"
        uri = f"sip:bench@{self.box[0]}:{self.box[1]}"
        req = request("INVITE", uri, call_id=call_id, from_=local, to=f"<{uri}>", cseq=1, via=self._via(),
                      contact=f"<sip:{user}@{self.host}:{self.port}>", body=sdp_text.encode(),
                      content_type="application/sdp")
        data = req.encode()
        t0 = time.monotonic_ns()
        resp, first_ns = self._await(data, call_id, "INVITE")
        ok_ns = time.monotonic_ns()
        out = {"call_id": call_id, "invite_ns": t0, "first_ns": first_ns, "status": resp.status if resp else 0}
        if resp is None or resp.status != 200:
            return out
        contact = resp.get("Contact")
        target = parse_name_addr(contact).uri if contact else uri
        ack = request("ACK", target, call_id=call_id, from_=local, to=resp.get("To") or "", cseq=1, via=self._via())
        self.acks[call_id] = ack.encode()
        self.sock.sendto(self.acks[call_id], self.box)
        out.update(ok_ns=ok_ns, answer=resp.body.decode("utf-8", "replace"),
                   dialog={"target": target, "from": local, "to": resp.get("To") or ""})
        return out

    def bye(self, call: dict) -> int:
        """BYE: the status of its answer (0: none)."""
        from services.sip.message import request

        d = call["dialog"]
        req = request("BYE", d["target"], call_id=call["call_id"], from_=d["from"], to=d["to"], cseq=2,
                      via=self._via())
        resp, _ = self._await(req.encode(), call["call_id"], "BYE", budget=4.0)
        self.acks.pop(call["call_id"], None)
        return resp.status if resp is not None else 0

    def close(self) -> None:
        self.sock.close()


def answer_ports(answer: str) -> dict[str, int]:
    """{kind: the box's RTP port} of a 200's SDP."""
    from services.rtp import sdp

    return {m.kind: m.port for m in sdp.parse(answer).media}


def box_call(rows: list[dict], video_port: int) -> dict | None:
    """The `call.list` row of the call whose video the box takes on `video_port`."""
    return next((r for r in rows if r.get("media", {}).get("video", {}).get("port") == video_port), None)


# --------------------------------------------------------------------------------------
# PCMU sender (a child, like benchmarks/rtp.py's video sender)

AUDIO_SENDER = r'''
import json, random, select, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
dests = [tuple(d) for d in cfg["dests"]]
n, ms, pt, max_s = len(dests), cfg["ms"], cfg["pt"], cfg["max_s"]
step_ns, samples = ms * 1_000_000, 8 * ms
socks = []
for _ in dests:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
ssrc = [random.getrandbits(32) for _ in dests]
seq = [random.getrandbits(16) for _ in dests]
ts = [random.getrandbits(32) for _ in dests]
sent = [0] * n
payload = bytes([0xFF]) * samples      # mu-law silence: the box decodes it all the same
head = struct.Struct("!BBHII").pack
now = time.monotonic_ns
t0 = now() + 20_000_000
stagger = step_ns // max(1, n)
print(json.dumps({"t0": t0}), flush=True)
k = 0
while k * step_ns < max_s * 1e9:
    if select.select([sys.stdin], [], [], 0)[0]:
        break
    for s in range(n):
        wait = t0 + k * step_ns + s * stagger - now()
        if wait > 0:
            time.sleep(wait / 1e9)
        socks[s].sendto(head(0x80, (0x80 if k == 0 else 0) | pt, seq[s], ts[s], ssrc[s]) + payload, dests[s])
        seq[s] = (seq[s] + 1) & 0xFFFF
        ts[s] = (ts[s] + samples) & 0xFFFFFFFF
        sent[s] += 1
    k += 1
print(json.dumps({"sent": sent}), flush=True)
'''


class AudioSender:
    def __init__(self, dests: list[int], max_s: float) -> None:
        cfg = {"dests": [[LOOPBACK, p] for p in dests], "ms": AUDIO_MS, "pt": AUDIO_PT, "max_s": max_s}
        self.proc = subprocess.Popen([sys.executable, "-c", AUDIO_SENDER, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not self.proc.stdout.readline():
            raise RuntimeError(f"the audio sender did not start: {self.proc.stderr.read()[-800:]}")

    def stop(self) -> list[int]:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        out = self.proc.stdout.readline()
        self.proc.wait(timeout=10)
        if not out:
            raise RuntimeError(f"the audio sender exited {self.proc.returncode}: {self.proc.stderr.read()[-800:]}")
        return json.loads(out)["sent"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------------------
# The naive row: decode + encode per call (a child)

NAIVE = r'''
import json, resource, sys, time
import av
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])
from services.encode.encoder import Encoder
with av.open(cfg["clip"]) as c:
    v = c.streams.video[0]
    extradata = bytes(v.codec_context.extradata or b"")
    packets = [(bytes(p), bool(p.is_keyframe)) for p in c.demux(v) if p.size]
dec = av.CodecContext.create("h264", "r")
dec.extradata = extradata
dec.thread_count = 1                                  # as decode@ by default: a unit in, its picture out
enc = Encoder("libx264", "h264", cfg["width"], cfg["height"], "yuv420p", kbps=cfg["kbps"], fps=cfg["fps"],
              gop=cfg["gop_s"], hardware=False, threads=1)
fps, warm, window = cfg["fps"], cfg["warmup_s"], cfg["seconds"]
frame_ns = int(1e9 / fps)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0 = time.monotonic_ns()
total = int((warm + window) * fps)
dec_ms, enc_ms, late, out_bytes, cpu0, w0 = [], [], 0, 0, None, None
for k in range(total):
    if k == int(warm * fps):
        cpu0, w0 = cpu(), time.monotonic_ns()
    due = t0 + k * frame_ns
    wait = due - time.monotonic_ns()
    if wait > 0:
        time.sleep(wait / 1e9)
    elif wait < -frame_ns:
        late += 1
    data, key = packets[k % len(packets)]
    a = time.perf_counter_ns()
    frames = dec.decode(av.Packet(data))
    b = time.perf_counter_ns()
    for f in frames:
        for p in enc.encode(f, k * 3000, keyframe=k % cfg["gop"] == 0):
            out_bytes += p.size
    c = time.perf_counter_ns()
    if cpu0 is not None:
        dec_ms.append((b - a) / 1e6)
        enc_ms.append((c - b) / 1e6)
w1, cpu1 = time.monotonic_ns(), cpu()
dec_ms.sort(); enc_ms.sort()
print(json.dumps({"cpu_s": cpu1 - cpu0, "window_s": (w1 - w0) / 1e9, "frames": len(dec_ms), "late": late,
                  "decode_p50_ms": dec_ms[len(dec_ms) // 2], "encode_p50_ms": enc_ms[len(enc_ms) // 2],
                  "encode_p99_ms": enc_ms[min(len(enc_ms) - 1, int(0.99 * len(enc_ms)))],
                  "out_kbps": out_bytes * 8 / 1000 / ((w1 - w0) / 1e9) if w1 > w0 else 0}))
'''


def naive_row(path: Path, plan: Plan) -> dict:
    cfg = {"root": _ROOT, "clip": str(path), "width": WIDTH, "height": HEIGHT, "fps": FPS, "kbps": KBPS,
           "gop": GOP, "gop_s": GOP / FPS, "warmup_s": min(1.0, plan.warmup_s), "seconds": plan.seconds}
    rec: dict = {"kind": "naive", "name": "naive: decode + re-encode per call (PyAV h264 + libx264 veryfast "
                 "zerolatency, 720p30)", "calls": 1}
    t = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", NAIVE, json.dumps(cfg)], capture_output=True, text=True,
                           timeout=plan.seconds + 120, cwd=_ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"exited {r.returncode}: {r.stderr[-800:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
        return rec
    rec.update(out)
    rec["cpu_per_call_ms"] = 1000 * out["cpu_s"] / out["window_s"]
    rec["calls_on_2_cores"] = 2000 * USABLE_SHARE / rec["cpu_per_call_ms"] if rec["cpu_per_call_ms"] else None
    rec["took_s"] = round(time.monotonic() - t, 1)
    return rec


# --------------------------------------------------------------------------------------
# The box


class Box(BenchBox):
    """hub + capture@cam (synthetic 720p30 H.264 + audio) + sip."""

    def __init__(self, tag: str) -> None:
        super().__init__(f"sipb{os.getpid()}{tag}", "esipb", [], client_timeout=5.0)
        self.write_config([
            "[services.vision]\nenabled = false", "[services.recorder]\nenabled = false", "[sources]",
            f'[sources.cam]\nkind = "synthetic"\nencode = "h264"\nwidth = {WIDTH}\nheight = {HEIGHT}\nfps = {FPS}\n'
            f'bitrate = {KBPS}\ngop = {GOP / FPS:g}\naudio = true\ndecode = false\nroom = "bench"',
            '[sip]\nenabled = true\nport = 0\nauth = "allow"\nallow = "127.0.0.1"\nroom = "bench"\n'
            'send_video = "cam"\nsend_audio = "cam-audio"\nanswer_after_ms = 0\nmax_calls = 100\n'
            "invite_rate = 1000\nrate = 10000"])

    def pids(self) -> dict[str, int]:
        return {r["service"]: r["pid"] for r in self.status()["services"] if r.get("pid")}

    def calls(self) -> list[dict]:
        return self.client.call("call.list")["calls"]


def sip_address(box: Box) -> tuple[str, int]:
    host, _, port = box.client.call("call.list")["listen"].rpartition(":")
    return host, int(port)


# --------------------------------------------------------------------------------------
# First picture


def send_clip(sock: socket.socket, dest: tuple[str, int], aus: list, halt: threading.Event) -> None:
    """The clip's units as RTP (pt 96) at 30 fps from its first keyframe, at once, until `halt`."""
    head = struct.Struct("!BBHII").pack
    ssrc, seq, ts0 = random.getrandbits(32), random.getrandbits(16), random.getrandbits(32)
    t0 = time.monotonic_ns()
    k = 0
    while not halt.is_set() and k < len(aus):
        wait = t0 + k * 1_000_000_000 // FPS - time.monotonic_ns()
        if wait > 0 and halt.wait(wait / 1e9):
            return
        payloads = aus[k][1]
        for j, payload in enumerate(payloads):
            mark = 0x80 if j == len(payloads) - 1 else 0
            sock.sendto(head(0x80, mark | PT, seq, (ts0 + k * 3000) & 0xFFFFFFFF, ssrc) + payload, dest)
            seq = (seq + 1) & 0xFFFF
        k += 1


def first_picture(box: Box, uac: Uac, aus: list, i: int) -> dict:
    """One call: INVITE -> 200, the clip sent from the 200 on; INVITE -> first unit on the bus, -> first picture."""
    import av

    import framebus

    a_rtp, a_rtcp = bind_pair()
    v_rtp, v_rtcp = bind_pair()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((LOOPBACK, 0))
    halt = threading.Event()
    sender = None
    consumer = None
    rec: dict = {"call": None}
    try:
        call = uac.invite(f"picture{i}", offer_sdp(a_rtp.getsockname()[1], v_rtp.getsockname()[1]))
        rec["status"] = call["status"]
        if call["status"] != 200:
            return rec
        t0 = call["invite_ns"]
        rec["invite_200_ms"] = (call["ok_ns"] - t0) / 1e6
        ports = answer_ports(call["answer"])
        sender = threading.Thread(target=send_clip, args=(tx, (LOOPBACK, ports["video"]), aus, halt), daemon=True)
        sender.start()
        row = box_call(box.calls(), ports["video"])
        if row is None:
            rec["error"] = "the call is not in call.list"
            uac.bye(call)
            return rec
        rec["call"] = row["call"]
        consumer = framebus.Consumer.attach(row["call"], prefix=box.prefix, missing_ok=True, start="oldest")
        dec = av.CodecContext.create("h264", "r")
        dec.thread_count = 1
        deadline = time.monotonic() + FIRST_PICTURE_S
        units = 0
        while time.monotonic() < deadline:
            item = consumer.receive(timeout=0.1)
            if item is None:
                continue
            units += 1
            if units == 1:
                rec["bus_ms"] = (item.publish_ns - t0) / 1e6
                rec["first_unit_keyframe"] = item.keyframe
            data = bytes(item.array)
            if not item.valid():
                continue
            try:
                frames = dec.decode(av.Packet(data))
            except av.FFmpegError as exc:
                rec["decode_error"] = str(exc)[:200]
                continue
            if frames:
                rec["picture_ms"] = (time.monotonic_ns() - t0) / 1e6
                rec["size"] = [frames[0].width, frames[0].height]
                rec["units_before_picture"] = units
                break
        halt.set()
        rec["bye"] = uac.bye(call)
        return rec
    finally:
        halt.set()
        if sender is not None:
            sender.join(2)
        if consumer is not None:
            consumer.close()
        for s in (a_rtp, a_rtcp, v_rtp, v_rtcp, tx):
            s.close()


def first_picture_row(box: Box, uac: Uac, aus: list, plan: Plan) -> dict:
    trials = []
    for i in range(plan.pictures):
        trials.append(first_picture(box, uac, aus, i))
        time.sleep(0.1)
    ok = [t for t in trials if "picture_ms" in t]
    setup = sorted(t["invite_200_ms"] for t in trials if "invite_200_ms" in t)
    bus = sorted(t["bus_ms"] for t in ok if "bus_ms" in t)
    pic = sorted(t["picture_ms"] for t in ok)
    return {"kind": "first_picture", "name": "set-up: INVITE -> first decoded picture (box, Python UAC + PyAV)",
            "calls": len(trials), "pictures": len(ok), "p50_ms": pct(pic, 50), "p99_ms": pct(pic, 99),
            "max_ms": pic[-1] if pic else None, "bus_p50_ms": pct(bus, 50), "bus_p99_ms": pct(bus, 99),
            "invite_200_p50_ms": pct(setup, 50), "invite_200_p99_ms": pct(setup, 99), "trials": trials}


# --------------------------------------------------------------------------------------
# Concurrent calls


def media_row(stats: dict, kind: str) -> dict:
    m = stats.get(kind, {})
    return {k: m.get(k) for k in ("codec", "pt", "port", "packets_in", "packets_out", "lost", "jitter")}


def calls_row(box: Box, uac: Uac, n: int, plan: Plan, clip_file: Path, tmp: Path, sip_pid: int,
              idle: float) -> dict:
    rec: dict = {"kind": "calls", "name": "concurrent audio+video calls (720p30 H.264 forwarded + PCMU)",
                 "calls": n, "streams": n}
    rxv = rxa = None
    vsend: Sender | None = None
    asend: AudioSender | None = None
    calls: list[dict] = []
    t_start = time.monotonic()
    logged = len(box.warning_lines())
    try:
        rxv, rxa = Receiver(n), Receiver(n)
        rxv.start()
        rxa.start()
        offset0, _ = clock_offset_ns()
        for i in range(n):
            c = uac.invite(f"caller{i + 1}", offer_sdp(rxa.ports[i], rxv.ports[i]))
            if c["status"] != 200:     # the box does not take the call: N is past what it carries
                said = box_said(box.warning_lines()[logged:])
                got = f"{c['status']}" if c["status"] else \
                    "no final answer" + (" (only provisional ones)" if c["first_ns"] else "")
                rec.update(refused={"call": i + 1, "status": c["status"], "box_said": said}, sustained=False,
                           why=f"call {i + 1} of {n}: its INVITE got {got}" + (f"; the box: {said}" if said else ""))
                return rec
            c["ports"] = answer_ports(c["answer"])
            calls.append(c)
        rec["setup_p50_ms"] = pct(sorted((c["ok_ns"] - c["invite_ns"]) / 1e6 for c in calls), 50)
        rows = box.calls()
        ids = []
        for c in calls:
            row = box_call(rows, c["ports"].get("video"))
            if row is None or "audio" not in c["ports"]:
                raise RuntimeError(f"a call's video port {c['ports']} is not in call.list")
            ids.append(row["call"])
        vsend = Sender(clip_file, [c["ports"]["video"] for c in calls], tmp, max_s=plan.warmup_s + plan.seconds + 60)
        asend = AudioSender([c["ports"]["audio"] for c in calls], max_s=plan.warmup_s + plan.seconds + 60)
        time.sleep(plan.warmup_s)
        pids = box.pids()
        beside = [p for s, p in pids.items() if s != "sip"] + [box.proc.pid]
        gen = [vsend.proc.pid, asend.proc.pid]
        w0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        busy0, own0 = machine_busy_s()[0], self_cpu_s()
        c0, b0, g0 = cpu_s(sip_pid) or 0.0, sum(cpu_s(p) or 0.0 for p in beside), sum(cpu_s(p) or 0.0 for p in gen)
        time.sleep(plan.seconds)
        c1, b1, g1 = cpu_s(sip_pid) or 0.0, sum(cpu_s(p) or 0.0 for p in beside), sum(cpu_s(p) or 0.0 for p in gen)
        busy1, own1 = machine_busy_s()[0], self_cpu_s()
        w1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        sent_v = collections.Counter(vsend.stop()["s"])
        vsend = None
        sent_a = asend.stop()
        asend = None
        time.sleep(TAIL_S)
        rows = box.calls()
        rxv.close()
        rxa.close()
        offset1, _ = clock_offset_ns()
        offset = (offset0 + offset1) // 2
        window = (w1 - w0) / 1e9
        sip, other, lg, own = c1 - c0, b1 - b0, g1 - g0, own1 - own0
        rec.update(window_s=round(window, 2), sip_cpu_s=sip, cpu_per_call_ms=1000 * sip / (n * window),
                   marginal_cpu_per_call_ms=1000 * (sip / window - idle) / n,
                   sip_cores=sip / window, box_other_cores=other / window, loadgen_cores=(lg + own) / window,
                   cores_busy=(sip + other + lg + own) / window,
                   other_load_pct=100 * max(0.0, (busy1 - busy0) - sip - other - lg - own) / window)
        per_call = []
        for i, cid in enumerate(ids):
            row = next((r for r in rows if r["call"] == cid), None)
            stats = row.get("media", {}) if row else {}
            v_units, v_gaps = out_units(rxv.packets[i], offset)
            _, a_gaps = out_units(rxa.packets[i], offset)
            in_window = sum(1 for u in v_units if u["rx"] and w0 <= u["rx"][0] < w1)
            per_call.append({"call": cid, "state": row.get("state") if row else "gone",
                             "video": {**media_row(stats, "video"), "sent": sent_v.get(i, 0)},
                             "audio": {**media_row(stats, "audio"), "sent": sent_a[i]},
                             "received": {"video_packets": len(rxv.packets[i]), "video_units": len(v_units),
                                          "video_fps": in_window / window, "video_gaps": v_gaps,
                                          "audio_packets": len(rxa.packets[i]), "audio_gaps": a_gaps}})
        rec["per_call"] = per_call
        rec["box_socket_drops"] = udp_drops([p for c in calls for p in c["ports"].values()])
        rec["receiver_dropped"] = sum(rxv.overflow) + sum(rxa.overflow)
        lost = [(p[k]["lost"] or 0) for p in per_call for k in ("video", "audio")]
        short = sum(max(0, p[k]["sent"] - (p[k]["packets_in"] or 0)) for p in per_call for k in ("video", "audio"))
        rec.update(lost_total=sum(lost), lost_max=max(lost, default=0), in_short=short,
                   sent_packets=sum(p[k]["sent"] for p in per_call for k in ("video", "audio")),
                   out_gaps=sum(p["received"]["video_gaps"] + p["received"]["audio_gaps"] for p in per_call),
                   out_fps_min=min(p["received"]["video_fps"] for p in per_call),
                   out_packets=sum(p["received"]["video_packets"] + p["received"]["audio_packets"]
                                   for p in per_call))
        why = []
        if rec["lost_total"]:
            why.append(f"the box counted {rec['lost_total']} packets lost")
        if short:
            why.append(f"{short} of {rec['sent_packets']} packets sent did not reach the box's calls")
        if rec["box_socket_drops"]:
            why.append(f"the box's sockets dropped {rec['box_socket_drops']}")
        if rec["out_gaps"]:
            why.append(f"{rec['out_gaps']} packets missing in what the box sent")
        if rec["receiver_dropped"]:
            why.append(f"the receivers' sockets dropped {rec['receiver_dropped']} (this machine, not the box)")
        if not rec["out_packets"]:
            why.append("nothing came back from the box")
        rec["sustained"] = not why
        rec["why"] = "; ".join(why)
        rec["warnings"] = box.warning_lines()[logged:][-4:]
        return rec
    except (RuntimeError, ControlError, OSError, KeyError, ValueError) as exc:
        rec.update(failure=f"{type(exc).__name__}: {exc}", sustained=False, why="failed")
        log(f"   FAILED: {rec['failure']}")
        return rec
    finally:
        for s in (vsend, asend):
            if s is not None:
                s.kill()
        for rx in (rxv, rxa):
            if rx is not None:
                rx.close()
        byes = [uac.bye(c) for c in calls] if box.proc.poll() is None else []
        rec["byes_ok"] = sum(1 for b in byes if b == 200)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:            # every call gone before the next step
            try:
                if not box.calls():
                    break
            except ControlError:
                pass
            time.sleep(0.1)
        rec["took_s"] = round(time.monotonic() - t_start, 1)


def box_said(lines: list[str]) -> str:
    """The gist of the box's last warning or error: its message, without the time or a traceback."""
    if not lines:
        return ""
    line = lines[-1].split(" | Traceback")[0]
    return re.sub(r"^\S+\s+\S+\s+", "", line)[:240]


def idle_cores(pid: int, seconds: float) -> float:
    """The sip process's CPU with no call, in cores: what every call's share of it is measured beside."""
    c0, t0 = cpu_s(pid) or 0.0, time.monotonic()
    time.sleep(seconds)
    return ((cpu_s(pid) or 0.0) - c0) / (time.monotonic() - t0)


def capacity_estimate(rec: dict, pinned: set[int], shared: bool) -> float | None:
    """The calls the pinned cores hold, from a sustained step: the sip process's share, and on a machine where the
    callers share those cores, everything's."""
    if not rec.get("sustained") or not rec.get("sip_cores"):
        return None
    est = rec["calls"] * len(pinned) * USABLE_SHARE / rec["sip_cores"]
    if shared and rec.get("cores_busy"):
        usable = max(0.5, len(pinned) * USABLE_SHARE - rec.get("other_load_pct", 0.0) / 100)
        est = min(est, rec["calls"] * usable / rec["cores_busy"])
    return est


def log_calls(r: dict) -> None:
    if r.get("failure"):
        return
    if r.get("refused"):
        log(f"   calls x{r['calls']:<2d} NOT sustained: {r['why']}  ({r['took_s']:.0f} s)")
        return
    log(f"   calls x{r['calls']:<2d} sip {r['cpu_per_call_ms']:.1f} ms/call-s ({r['sip_cores']:.2f} cores), "
        f"all {r['cores_busy']:.2f} cores; lost {r['lost_total']}, short {r['in_short']}, out gaps {r['out_gaps']}, "
        f"out fps min {r['out_fps_min']:.1f}  {'sustained' if r['sustained'] else 'NOT sustained: ' + r['why']}  "
        f"({r['took_s']:.0f} s)")


# --------------------------------------------------------------------------------------
# The run


def run(plan: Plan) -> tuple[list[dict], dict]:
    path = encode_testsrc(clip_path(), WIDTH, HEIGHT, FPS, CLIP_S, KBPS, GOP, log=log)
    clip = load_clip(path)
    info = {k: v for k, v in clip.items() if k != "aus"}
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="esipb", dir="/tmp"))
    pinned, own_cores, pin_note = pinning()
    info["pinning"] = pin_note
    box: Box | None = None
    uac: Uac | None = None
    uas: SippUas | None = None
    try:
        with open(tmp / "clip.pickle", "wb") as f:
            pickle.dump(clip["aus"], f)

        log("-- naive: decode + encode per call")
        r = naive_row(path, plan)
        rows.append(r)
        if not r.get("failure"):
            log(f"   {r['cpu_per_call_ms']:.0f} ms CPU per call-second (decode {r['decode_p50_ms']:.1f} ms, encode "
                f"{r['encode_p50_ms']:.1f} ms p50 a frame, {r['late']} late)")

        log(f"-- set-up: SIPp UAC -> sipp -sn uas, {plan.setup_calls} calls")
        t = time.monotonic()
        uas = SippUas(tmp / "uas")
        r = {"kind": "setup_limit", "name": "set-up: INVITE -> 200, SIPp UAS (the signalling limit, no media)",
             **run_sipp_uac(f"{LOOPBACK}:{uas.port}", plan, tmp / "uac-limit")}
        uas.close()
        uas = None
        rows.append(r)
        log(f"   p50/p99 {_ms(r['p50_ms'], 3)}/{_ms(r['p99_ms'], 3)} ms, {r['successful']}/{r['calls']} calls "
            f"({time.monotonic() - t:.0f} s)")

        log("-- the box")
        t = time.monotonic()
        box = Box("a")
        box.start()
        box.wait_ready(90, ["sip", "capture@cam"])
        sip_pid = box.pids()["sip"]
        target = sip_address(box)
        info["box_startup_s"] = round(time.monotonic() - t, 1)
        info["prefix"] = box.prefix
        time.sleep(1.0)                                    # the cam's first keyframe is on the bus

        log(f"-- set-up: SIPp UAC -> the box, {plan.setup_calls} calls")
        t = time.monotonic()
        r = {"kind": "setup_box", "name": "set-up: INVITE -> 200, the box (SIPp UAC)",
             **run_sipp_uac(f"{target[0]}:{target[1]}", plan, tmp / "uac-box")}
        rows.append(r)
        log(f"   p50/p99 {_ms(r['p50_ms'], 3)}/{_ms(r['p99_ms'], 3)} ms, {r['successful']}/{r['calls']} calls "
            f"({time.monotonic() - t:.0f} s)")

        uac = Uac(target)
        log(f"-- set-up: INVITE -> first picture, {plan.pictures} calls")
        t = time.monotonic()
        r = first_picture_row(box, uac, clip["aus"], plan)
        rows.append(r)
        log(f"   p50/p99 {_ms(r['p50_ms'], 1)}/{_ms(r['p99_ms'], 1)} ms, {r['pictures']}/{r['calls']} pictures "
            f"({time.monotonic() - t:.0f} s)")

        log(f"-- concurrent calls ({pin_note})")
        pin_threads(sip_pid, pinned)
        if own_cores:
            os.sched_setaffinity(0, own_cores)
        info["sip_idle_cores"] = idle = idle_cores(sip_pid, min(2.0, plan.seconds))
        tried: dict[int, bool] = {}
        est: dict[int, float] = {}
        while (n := next_n(tried, plan.max_calls, False, est)) is not None:
            log(f"-- calls N={n}")
            r = calls_row(box, uac, n, plan, tmp / "clip.pickle", tmp, sip_pid, idle)
            log_calls(r)
            rows.append(r)
            tried[n] = bool(r.get("sustained"))
            if r.get("refused"):                       # no more than refused["call"] - 1 calls at once either
                tried.setdefault(r["refused"]["call"], False)
            if (e := capacity_estimate(r, pinned, own_cores is None)) is not None:
                est[n] = r["capacity_estimate"] = e
            if box.proc.poll() is not None or sip_pid not in box.pids().values():
                info["box_trouble"] = f"the sip process is gone after N={n}: {box.log_tail(10)}"
                log(f"   {info['box_trouble']}")
                break
        info["box_warnings"] = box.warning_lines()[-8:]
        info["box_log"] = str(box.log_path)
    finally:
        if uac is not None:
            uac.close()
        if uas is not None:
            uas.close()
        if box is not None:
            box.close(keep_dir=bool(info.get("box_trouble")))
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, info


# --------------------------------------------------------------------------------------
# The report


def highest(rows: list[dict]) -> int:
    return max((r["calls"] for r in rows if r["kind"] == "calls" and r.get("sustained")), default=0)


def table(rows: list[dict]) -> str:
    out = ["| row | calls | p50 ms | p99 ms | max ms | loss (box lost / short / out gaps) | ms CPU per call-s | "
           "notes |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        if r.get("failure"):
            out.append(f"| {r['name']} | {r.get('calls', '')} | | | | | FAILED | {r['failure'][:160]} |")
            continue
        k = r["kind"]
        if k in ("setup_box", "setup_limit"):
            notes = f"{r['successful']}/{r['calls']} calls ok at {r['rate']:g}/s; first response p50 " \
                    f"{_ms(r['first_response_p50_ms'], 3)} ms"
            if k == "setup_box":
                notes += f"; {r['answered_with_video']} answers with video"
            if r.get("sipp_errors"):
                notes += f"; SIPp: {r['sipp_errors'][:120]}"
            out.append(f"| {r['name']} | {r['answered']} | {_ms(r['p50_ms'], 3)} | {_ms(r['p99_ms'], 3)} | "
                       f"{_ms(r['max_ms'], 3)} | | | {notes} |")
        elif k == "first_picture":
            out.append(f"| {r['name']} | {r['pictures']}/{r['calls']} | {_ms(r['p50_ms'], 1)} | {_ms(r['p99_ms'], 1)} "
                       f"| {_ms(r['max_ms'], 1)} | | | INVITE -> 200 p50/p99 {_ms(r['invite_200_p50_ms'], 2)}/"
                       f"{_ms(r['invite_200_p99_ms'], 2)} ms, -> first unit on the bus {_ms(r['bus_p50_ms'], 1)}/"
                       f"{_ms(r['bus_p99_ms'], 1)} ms (Python UAC) |")
        elif k == "calls" and r.get("refused"):
            out.append(f"| concurrent calls N={r['calls']} | {r['refused']['call'] - 1} up | | | | | | "
                       f"NOT sustained: {r['why']} |")
        elif k == "calls":
            notes = [f"{r['marginal_cpu_per_call_ms']:.1f} ms/call-s above the idle process",
                     f"sip {r['sip_cores']:.2f} cores, box other {r['box_other_cores']:.2f}, load gen "
                     f"{r['loadgen_cores']:.2f}, other load {r['other_load_pct']:.0f} %",
                     f"out {r['out_fps_min']:.1f} fps min"]
            notes.append("sustained" if r["sustained"] else f"NOT sustained: {r['why']}")
            out.append(f"| concurrent calls N={r['calls']} | {r['calls']} | | | | {r['lost_total']} / {r['in_short']} "
                       f"/ {r['out_gaps']} (of {r['sent_packets']} in, {r['out_packets']} out) | "
                       f"{r['cpu_per_call_ms']:.1f} | {'; '.join(notes)} |")
        elif k == "naive":
            out.append(f"| {r['name']} | 1 | | | | | {r['cpu_per_call_ms']:.1f} | decode {r['decode_p50_ms']:.1f} ms + "
                       f"encode {r['encode_p50_ms']:.1f} ms p50 a frame, {r['late']} frames late; "
                       f"~{r['calls_on_2_cores']:.1f} calls on 2 cores |")
    return "\n".join(out)


def summary(rows: list[dict], plan: Plan) -> list[str]:
    out = []
    box = next((r for r in rows if r["kind"] == "setup_box" and not r.get("failure")), None)
    lim = next((r for r in rows if r["kind"] == "setup_limit" and not r.get("failure")), None)
    if box and lim and box["p50_ms"] and lim["p50_ms"]:
        out.append(f"- set-up INVITE -> 200: the box {box['p50_ms']:.2f} ms p50 / {box['p99_ms']:.2f} ms p99, SIPp's "
                   f"UAS {lim['p50_ms']:.2f} / {lim['p99_ms']:.2f} ms (the box {box['p50_ms'] / lim['p50_ms']:.1f}x "
                   "at p50)")
    best = highest(rows)
    steps = [r for r in rows if r["kind"] == "calls"]
    fail = min((r["calls"] for r in steps if not r.get("sustained")), default=None)
    line = f"- the most concurrent audio+video calls with zero loss: {best}"
    row = next((r for r in steps if r["calls"] == best), None)
    if row is not None:
        line += f" ({row['cpu_per_call_ms']:.1f} ms of the sip process's CPU per call-second, " \
                f"{row['cores_busy']:.2f} cores busy in all)"
    if fail is not None:
        first = next((r for r in steps if r["calls"] == fail), None)
        if first is None:                               # known from a larger N refused at call `fail`
            first = next(r for r in steps if r.get("refused", {}).get("call") == fail)
        line += f"; N={fail}: {first['why']}"
    elif best >= plan.max_calls:
        line += f" (the cap, --max-calls {plan.max_calls})"
    out.append(line)
    naive = next((r for r in rows if r["kind"] == "naive" and not r.get("failure")), None)
    if naive and row is not None and row.get("cpu_per_call_ms"):
        ratio = naive["cpu_per_call_ms"] / row["cpu_per_call_ms"]
        out.append(f"- CPU per call: forwarded {row['cpu_per_call_ms']:.1f} ms/call-s, decode + re-encode "
                   f"{naive['cpu_per_call_ms']:.0f} ms/call-s ({ratio:.1f}x)")
    return out


def report(rows: list[dict], info: dict, plan: Plan, name: str, elapsed: float, load: tuple) -> str:
    text = [f"## SIP benchmark ({name}, {elapsed:.0f} s, code {code_version()}, {os.cpu_count()} CPUs, load average "
            f"{' '.join(f'{x:.2f}' for x in load)} at start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end, "
            f"{sipp_version()}, {tool_version(['ffmpeg', '-version'])})",
            "", table(rows), "", "## summary", ""]
    text += summary(rows, plan)
    text += ["", "## notes", "",
             f"- calls: each sends {WIDTH}x{HEIGHT} {FPS} fps H.264 ({info['kbps']} kbit/s, {info['packets_per_s']} "
             f"packets/s) and PCMU ({1000 // AUDIO_MS} packets/s) and gets the box's cam (synthetic {WIDTH}x{HEIGHT} "
             f"{FPS} fps H.264, {KBPS} kbit/s, encoded once by capture@cam) and its audio; {info['pinning']}.",
             f"- the sip process alone (no call) used {info.get('sip_idle_cores', 0) * 1000:.0f} ms/s; 'above the "
             "idle process' is a call's share of the rest.",
             "- loss: the box's `lost` (both media, every call), packets sent that its `packets_in` lacks (read after "
             "the senders stopped), and sequence gaps in what it sent back. CPU: the sip process's threads over "
             "the window, per call-second.",
             "- set-up: INVITE (first send) -> 200 (received), from SIPp's message trace; the same scenario, rate "
             "and calls against both. SIPp's UAS answers audio only, from its 1 ms event loop.",
             "- naive: one call's decode + encode measured alone before the box starts (the same clip, paced at "
             f"{FPS} fps); 'calls on 2 cores' = {USABLE_SHARE:g} x 2000 ms over it."]
    for r in rows:
        if r.get("warnings"):
            text.append(f"- N={r['calls']}: the sip service logged: " + " | ".join(r["warnings"]))
    if info.get("box_trouble"):
        text.append(f"- {info['box_trouble']} (the box's log: {info.get('box_log')})")
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 set-up calls, 3 pictures, N up to 2, S = 3 (~30-60 s)")
    ap.add_argument("--calls", type=int, help="calls timed by each set-up row (default 200, --quick 5)")
    ap.add_argument("--pictures", type=int, help="first-picture calls (default 20, --quick 3)")
    ap.add_argument("--max-calls", type=int, help="the most concurrent calls tried (default 64, --quick 2)")
    ap.add_argument("--seconds", type=float, help="the measured window per concurrent step (default 10, --quick 3)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    for key, attr, least in (("calls", "setup_calls", 1), ("pictures", "pictures", 1),
                             ("max_calls", "max_calls", 1), ("seconds", "seconds", 1)):
        v = getattr(args, key)
        if v is not None:
            if v < least:
                ap.error(f"--{key.replace('_', '-')}: at least {least}")
            setattr(plan, attr, v)
    for tool in ("ffmpeg", "sipp"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (apt-get install {'sip-tester' if tool == 'sipp' else tool})")
    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    load = os.getloadavg()
    try:
        rows, info = run(plan)
    except KeyboardInterrupt:
        log("interrupted: every child stopped, temp dirs and bus objects removed")
        return 130
    name = ("quick" if args.quick else "full") + "".join(
        f", --{k.replace('_', '-')} {v:g}" for k, v in (("calls", args.calls), ("pictures", args.pictures),
                                                         ("max_calls", args.max_calls), ("seconds", args.seconds))
        if v is not None)
    print(report(rows, info, plan, name, time.monotonic() - t0, load), flush=True)
    if args.json:
        out = {"plan": name, "setup_calls": plan.setup_calls, "pictures": plan.pictures, "seconds": plan.seconds,
               "max_calls": plan.max_calls, "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load],
               "loadavg_end": [round(x, 2) for x in os.getloadavg()], "code": code_version(), "info": info,
               "highest_sustained": highest(rows), "summary": summary(rows, plan),
               "rows": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failure") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
