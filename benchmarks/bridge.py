"""Bridge benchmark: a two-party RTP call bridged by edgeroom-bridge (pass-through, and a transcode for a VP8-only
peer), against a bare UDP relay, plain rtp@ forwarding and decoding and re-encoding every route.

Run from the repository root:

    .venv/bin/python benchmarks/bridge.py [--quick] [--json PATH] [--seconds S] [--max-calls N]

What it answers, on this machine: what bridging a two-party 720p30 2 Mbit/s H.264 call costs
(the time it adds between a packet entering call A and the same access unit's packets
leaving call B, the CPU per route and second of media) when both peers take H.264 (the
bridge only sets routes: pass-through) and when the target takes VP8 only (the bridge
decodes and encodes again: transcode), against the limit (a bare Python UDP relay, and
rtp@ forwarding a call's own stream: what benchmarks/rtp.py measures) and against the naive
path (decode and re-encode every route, as a bridge without codec matching does), and how
many bridged two-party calls the box carries with zero loss.

Method
------
Everything that is not the bridge is benchmarks/rtp.py's, imported from it: the clip (lavfi
testsrc2 1280x720 30 fps, libx264 2 Mbit/s CBR, a keyframe every 2 s, no B-frames, cut into
RTP payloads by the box's own packetizer at a 1200-byte MTU), the sending child (every
access unit's packets back to back at its frame time, the streams staggered over the frame
interval, CLOCK_MONOTONIC noted before each sendmsg), the receiver (the kernel's arrival
time of every packet: SO_TIMESTAMPNS; SO_RXQ_OVFL for its drops), the bare relay, the
matching of what came out to what went in (the box's sender reports trace its RTP time back
to capture time; forwarded payloads compared byte for byte) and the latency and CPU figures.

* Rows, one after the other, in the same run:
  - relay: rtp.py's bare Python UDP relay (`recvfrom` -> `sendto`), 2 streams (a two-party
    call's two directions);
  - forward: rtp.py's forward row, 2 calls `[rtp.fI]` each sending its own inbound video
    (`send_video = "fI"`): the same packets through rtp@ without the bridge;
  - pass-through: a private box (`python -m services.cli run`) with `[bridge] enabled = true,
    rooms = "*"` and, per two-party call I, `[rtp.aI]` and `[rtp.bI]` in room `cI`, H.264 both
    (mode 1), `decode = false`, no send_video/send_audio: the bridge routes aI's inbound video
    to bI and bI's to aI (`ctl bridge cI` says pass-through). The sender sends one stream into
    aI and one into bI; the receiver is both peers (aI's peer gets bI's stream, bI's gets
    aI's). Once with the default pacing (pacing_kbps = 20000), once without (1000000), as
    rtp.py does: pacing spreads a keyframe's packets over ~8 ms, which is the tail.
    `[services.rtp] start_timeout = 120`: 40 and more rtp@ interpreters started at once on 2
    cores are not all ready within the default 15 s, and the supervisor would kill and restart
    them together (measured: at 20-22 calls on a loaded minute; the sweep is about forwarding);
  - transcode: the same call, with bI's peer offering VP8 only (its SDP: `m=video ... 97`,
    `a=rtpmap:97 VP8/90000`): the bridge decodes aI's H.264 and encodes it in VP8
    (`aI-to-vp8`, its software or probed encoder at `[bridge] transcode_kbps`, 1000 kbit/s
    by default), which rtp@bI sends. One stream, into aI (bI's peer sends nothing: its route
    to aI, a transcode of nothing, waits and costs nothing);
  - naive: rtp.py's naive row, 2 calls: rtp@cI -> decode@cI -> encode@eI (H.264 2 Mbit/s) ->
    rtp@cI, what decoding and re-encoding every route costs (a two-party call has two routes);
  - the most calls: pass-through rows for N = 1, 2, 4, ... two-party calls (2N streams),
    doubling then halving the gap, the next N from the CPU a sustained N used
    (benchmarks/ingest.py's `next_n`), up to --max-calls. An N is sustained when every access
    unit sent in the window came out whole, nothing dropped anywhere, and the packet p99 is
    at most one frame interval (33.3 ms). The naive path's count (zero loss: every unit out
    whole, nothing dropped; its decode + encode latency, often above a frame interval on 2
    shared cores, is not held against it): 1 call when its row (one call's two routes) loses
    nothing, and what its CPU per call says the cores hold (an estimate; a full run checks it
    with one more naive row at that count when it is 2 or more).
* Latency, per access unit sent in the window, on CLOCK_MONOTONIC: packet (pass-through
  and relay: each packet's arrival less the send of the packet with the same payload),
  unit (the unit's last packet out less its last packet in: the only one a transcode has,
  its packets being new). "added": a box row's p99 less that of a stream through a relay of
  its own, sent and received at the same moments (the machine's load moves tails).
* CPU: per route (stream) and second of media, the time the threads of the box's media
  processes ran over the window (/proc/PID/task/*/schedstat, ns: the utime + stime of
  /proc/PID/stat in exact units; 10 ms ticks cannot see the bridge's few ms):
  rtp@* + bridge (pass-through, transcode), rtp@* (forward), rtp@* + decode@* + encode@*
  (naive), the relay. The bridge process is also shown alone.
* Targets: pass-through adds at most 2 ms p99 over the relay (packet latency, one call; at
  the default pacing, the verdict, and with pacing off, beside it); at least 4x as many calls
  as the naive path.
* Time: --quick ~1 minute (calls up to 2); a full run ~4 minutes (calls up to 32).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_ROOT)

from benchmarks import rtp  # noqa: E402
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
from services.control.client import ControlError  # noqa: E402

TARGET_ADDED_MS = rtp.TARGET_ADDED_MS      # 2 ms p99 over the relay
TARGET_CALLS_RATIO = 4.0                   # at least this many times the naive path's calls
VP8_PT = 97
READY_S = 120.0                            # a box of many calls takes a while to start on 2 cores
ROUTED_S = 30.0                            # the bridge has routed every call
HUB_S = 15.0                               # the hub's answer, once the box is up (a loaded 2-core machine is slow)


@dataclass
class Plan:
    seconds: float
    warmup_s: float
    max_calls: int
    check_naive: bool               # one more naive row at the count its CPU suggests

    def rtp_plan(self) -> rtp.Plan:
        return rtp.Plan(seconds=self.seconds, warmup_s=self.warmup_s, max_streams=2 * self.max_calls,
                        relay_at_best=False)


FULL = Plan(seconds=8.0, warmup_s=2.0, max_calls=32, check_naive=True)
QUICK = Plan(seconds=3.0, warmup_s=1.0, max_calls=2, check_naive=False)


# --------------------------------------------------------------------------------------
# The box


def vp8_sdp(port: int) -> str:
    """A peer that takes (and would send) VP8 only, receiving at `port` (RTCP on the next)."""
    return (f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=bench\nc=IN IP4 127.0.0.1\nt=0 0\n"
            f"m=video {port} RTP/AVP {VP8_PT}\na=rtpmap:{VP8_PT} VP8/90000\na=sendrecv\n")


class BridgeBox(BenchBox):
    """N two-party calls, call I: [rtp.aI] and [rtp.bI] in room cI, bridged. `vp8`: bI's peer takes VP8 only.
    `ports[I]`: (where aI's peer receives, where bI's peer receives)."""

    def __init__(self, tag: str, ports: list[tuple[int, int]], vp8: bool = False, keys: str = "") -> None:
        calls = len(ports)
        super().__init__(f"brb{os.getpid()}{tag}", "ebrb",
                         [x for i in range(calls) for x in (f"a{i + 1}", f"b{i + 1}")], client_timeout=3.0)
        self.calls, self.vp8 = calls, vp8
        lines = ["[services.vision]\nenabled = false", "[services.recorder]\nenabled = false",
                 "[sources]",   # none of the default camera: the calls only
                 # 40+ rtp@ interpreters started at once on 2 cores take longer than the default 15 s to be ready;
                 # the supervisor would kill and restart the whole herd (the sweep measures forwarding, not that)
                 f"[services.rtp]\nstart_timeout = {READY_S:g}",
                 '[bridge]\nenabled = true\nrooms = "*"']
        for i, (pa, pb) in enumerate(ports):
            sdp_b = vp8_sdp(pb) if vp8 else rtp.peer_sdp(pb)
            lines.append(f'[rtp.a{i + 1}]\nroom = "c{i + 1}"\nsdp = """{rtp.peer_sdp(pa)}"""\ndecode = false\n{keys}')
            lines.append(f'[rtp.b{i + 1}]\nroom = "c{i + 1}"\nsdp = """{sdp_b}"""\ndecode = false\n{keys}')
        self.write_config(lines)

    def services(self) -> list[str]:
        return [f"rtp@{c}" for c in self.streams] + ["bridge"]

    def wait_routed(self, timeout: float) -> dict[str, dict]:
        """Every call's routes planned and sent by the bridge, each on the path expected: {room: status}."""
        want = "transcode" if self.vp8 else "pass-through"
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                st = self.client.call("bridge.status", {})
            except ControlError as exc:
                last = str(exc)
                time.sleep(0.2)
                continue
            rooms = {r["room"]: r for r in st.get("rooms", [])}
            missing = []
            for i in range(self.calls):
                r = rooms.get(f"c{i + 1}")
                routes = {x["target"]: x for x in r["routes"]} if r else {}
                b = routes.get(f"b{i + 1}")
                if b is None or b["path"] != want or not b["sent"] or b["video"] != (
                        f"a{i + 1}-to-vp8" if self.vp8 else f"a{i + 1}"):
                    missing.append(f"c{i + 1}: b{i + 1} " + (f"{b['path']}, sent {b['sent']}" if b else "no route"))
                    continue
                if not self.vp8:
                    a = routes.get(f"a{i + 1}")
                    if a is None or a["path"] != "pass-through" or not a["sent"] or a["video"] != f"b{i + 1}":
                        missing.append(f"c{i + 1}: a{i + 1} " + (f"{a['path']}, sent {a['sent']}" if a else
                                                                  "no route"))
            if not missing:
                return rooms
            last = "; ".join(missing[:3])
            time.sleep(0.2)
        raise RuntimeError(f"the bridge did not route every call within {timeout:.0f} s ({last}): {self.log_tail()}")


def scrape(url: str) -> dict:
    """{(sample name, reason or ''): value} of the box's edgeroom_rtp_ / route_ / bridge_ samples."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=HUB_S) as resp:
        text = resp.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(("edgeroom_rtp_", "edgeroom_route_", "edgeroom_bridge_")):
            continue
        for s in fam.samples:
            if s.name.endswith(("_created", "_bucket", "_sum", "_count")):
                continue
            key = (s.name, s.labels.get("reason", "") or s.labels.get("type", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


# --------------------------------------------------------------------------------------
# One bridged row

NAMES = {"pass-through": "bridge pass-through (a -> bus -> b, routes only)",
         "transcode": "bridge transcode H.264 -> VP8 (a -> bus -> bridge -> bus -> b)"}


def run_bridge_row(path: str, calls: int, plan: Plan, clip: dict, tmp: Path, tag: str,
                   pacing_kbps: int | None = None) -> dict:
    """`calls` two-party calls bridged on `path` (pass-through: both ways; transcode: a -> b only)."""
    vp8 = path == "transcode"
    n = calls if vp8 else 2 * calls          # the streams sent (and routes carrying media)
    rec: dict = {"kind": path, "name": NAMES[path], "calls": calls, "streams": n,
                 "pacing_kbps": pacing_kbps or rtp.DEFAULT_PACING_KBPS}
    if pacing_kbps:
        rec["name"] += f", pacing_kbps = {pacing_kbps}"
    rx = rtp.Receiver(n + 1)                 # the last: a stream through a bare relay beside the box's
    spare: list[socket.socket] = []          # where aI's peer would get bI's (never sent: its peer sends nothing)
    box: BridgeBox | None = None
    relay: subprocess.Popen | None = None
    tap: rtp.BusTap | None = None
    out_tap: rtp.BusTap | None = None
    sender: rtp.Sender | None = None
    t_start = time.monotonic()
    try:
        offset0, unc0 = rtp.clock_offset_ns()
        relay = subprocess.Popen([sys.executable, "-c", rtp.RELAY, json.dumps([["127.0.0.1", rx.ports[n]]])],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = relay.stdout.readline()
        if not line:
            raise RuntimeError(f"the relay did not start: {relay.stderr.read()[-800:]}")
        relay_ports = json.loads(line)
        # sender stream s enters one call and comes out of its partner to receiver socket s
        if vp8:
            for _ in range(calls):
                spare.extend(rtp.bind_pair())
            ports = [(spare[2 * i].getsockname()[1], rx.ports[i]) for i in range(calls)]
        else:
            ports = [(rx.ports[2 * i + 1], rx.ports[2 * i]) for i in range(calls)]
        box = BridgeBox(tag, ports, vp8, f"pacing_kbps = {pacing_kbps}" if pacing_kbps else "")
        rec["prefix"] = box.prefix
        box.start()
        st = box.wait_ready(READY_S, box.services())
        rooms = box.wait_routed(ROUTED_S)
        rec["startup_s"] = round(time.monotonic() - t_start, 1)
        one = rooms["c1"]
        rec["routes_c1"] = [{k: x[k] for k in ("target", "source", "video", "path", "codec", "note")}
                            for x in one["routes"]]
        video_ports = {c: box.client.call("sdp", {"session": c}, timeout=HUB_S)["ports"]["video"]["rtp"]
                       for c in box.streams}
        inputs = [f"a{i + 1}" for i in range(calls)] if vp8 else box.streams
        dests = [video_ports[c] for c in inputs] + relay_ports
        pids = {r["service"]: r["pid"] for r in box.client.call("status", timeout=HUB_S)["services"] if r.get("pid")}
        rtp_pids = [pid for svc, pid in pids.items() if svc.startswith("rtp@")]
        bridge_pids = [pid for svc, pid in pids.items() if svc == "bridge"]
        measured = rtp_pids + bridge_pids
        beside = [pid for pid in pids.values() if pid not in measured] + [box.proc.pid]
        rec["metrics_url"] = st["metrics_url"]
        tap = rtp.BusTap(box.prefix, inputs)
        tap.start()
        if vp8:
            out_tap = rtp.BusTap(box.prefix, [f"a{i + 1}-to-vp8" for i in range(calls)])
            out_tap.start()
        rx.start()
        sender = rtp.Sender(tmp / "clip.pickle", dests, tmp,
                            max_s=rtp.FIRST_OUT_S + plan.warmup_s + plan.seconds + 30)
        deadline = time.monotonic() + rtp.FIRST_OUT_S
        while None in rx.first_at and time.monotonic() < deadline:
            if sender.proc.poll() is not None:
                raise RuntimeError(f"the sender exited {sender.proc.returncode}: {sender.proc.stderr.read()[-800:]}")
            time.sleep(0.05)
        if None in rx.first_at:
            waiting = [i + 1 for i, t in enumerate(rx.first_at) if t is None]
            raise RuntimeError(f"nothing came out of stream(s) {waiting[:8]} within {rtp.FIRST_OUT_S:.0f} s: "
                               f"{box.log_tail()}")
        rec["first_out_s"] = round((max(rx.first_at) - sender.start["t0"]) / 1e9, 2)
        time.sleep(plan.warmup_s)
        w0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        busy0, own0, snd0 = machine_busy_s()[0], self_cpu_s(), rtp._cpu([sender.proc.pid, relay.pid])
        c0, br0, b0 = rtp._cpu(rtp_pids), rtp._cpu(bridge_pids), rtp._cpu(beside)
        time.sleep(plan.seconds)
        c1, br1, b1 = rtp._cpu(rtp_pids), rtp._cpu(bridge_pids), rtp._cpu(beside)
        busy1, own1, snd1 = machine_busy_s()[0], self_cpu_s(), rtp._cpu([sender.proc.pid, relay.pid])
        w1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        time.sleep(rtp.TAIL_S)
        sent = sender.stop()
        sender = None
        rx.close()
        tap.close()
        if out_tap is not None:
            out_tap.close()
        offset1, unc1 = rtp.clock_offset_ns()
        window = (w1 - w0) / 1e9
        rtp_cpu, bridge_cpu, side = c1 - c0, br1 - br0, b1 - b0
        cpu, snd, own = rtp_cpu + bridge_cpu, snd1 - snd0, own1 - own0
        rec.update(window_s=round(window, 2), cpu_s=cpu, cpu_per_stream_s=cpu / (n * window),
                   rtp_cpu_per_stream_s=rtp_cpu / (n * window), bridge_cpu_per_s=bridge_cpu / window,
                   bridge_cpu_per_stream_s=bridge_cpu / (n * window), box_other_cpu_per_s=side / window,
                   sender_cpu_per_s=snd / window, receiver_cpu_per_s=own / window,
                   cores_busy=(cpu + side + snd + own) / window,
                   other_load_pct=100 * max(0.0, (busy1 - busy0) - cpu - side - snd - own) / window,
                   clock_offset_drift_us=(offset1 - offset0) / 1e3,
                   clock_offset_uncertainty_us=max(unc0, unc1) / 1e3)
        hashes = [[hash(p) for p in ps] for _, ps in clip["aus"]]
        keyframes = [k for k, _ in clip["aus"]]
        offset = (offset0 + offset1) // 2
        rec.update(rtp.analyse("naive" if vp8 else "forward", sent, rx, hashes, keyframes, w0, w1, offset,
                               tap.items, streams=list(range(n))))
        beside_it = rtp.analyse("relay", sent, rx, hashes, keyframes, w0, w1, offset, streams=[n])
        rec["relay_beside"] = {k: beside_it[k] for k in (
            "sent_units", "matched_units", "missing_units", "packet_p50_ms", "packet_p99_ms", "packet_max_ms",
            "unit_p50_ms", "unit_p99_ms")}
        if out_tap is not None:          # the transcode's output on the bus: its time from the source's capture
            made = sorted((pub - cap) / 1e6 for items in out_tap.items for cap, pub in items)
            rec.update(transcode_units=len(made), transcode_capture_to_bus_p50_ms=pct(made, 50),
                       transcode_capture_to_bus_p99_ms=pct(made, 99))
        rec["receiver_dropped"] = sum(rx.overflow)
        rec["rtcp_from_box"] = dict(rx.rtcp_kinds)
        rec["box_socket_drops"] = rtp.udp_drops(dests[:n])
        try:
            st1 = box.client.call("bridge.status", {"room": "c1"}, timeout=HUB_S)
            rec["transcodes_c1"] = [{k: v for k, v in t.items() if not isinstance(v, (dict, list))}
                                    for t in st1.get("transcodes", [])]
        except ControlError as exc:
            rec["transcodes_c1"] = f"ControlError: {exc}"
        m = scrape(rec.pop("metrics_url"))
        rec["box_lost_packets"] = int(m.get(("edgeroom_rtp_lost_packets_total", ""), 0))
        rec["box_dropped"] = {f"{name.replace('edgeroom_', '').replace('_total', '')}:{why}": int(v)
                              for (name, why), v in m.items() if v and name in (
                                  "edgeroom_rtp_dropped_packets_total", "edgeroom_rtp_dropped_units_total",
                                  "edgeroom_rtp_unsent_units_total", "edgeroom_route_dropped_items_total",
                                  "edgeroom_bridge_transcode_dropped_frames_total")}
        rec["warnings"] = box.warning_lines()[:6]
        why = []
        differ = rec.get("differing_units") or 0
        if rec["missing_units"] - differ > 0:
            why.append(f"{rec['missing_units'] - differ} of {rec['sent_units']} units did not come out whole")
        if differ:
            text = f"{differ} of {rec['sent_units']} units came out but not as the unit sent at their capture time"
            late = rec.get("sender_late_p99_ms")
            if late is not None and late > rtp.LAT_BOUND_MS / 2:
                # the box takes a sender that falls behind for a slow clock (its capture times creep up to follow
                # it), so units are traced to the wrong frame: the machine is out of CPU, not only the box
                text += f" (the sender ran {late:.0f} ms behind its schedule, p99: the machine is saturated)"
            why.append(text)
        if rec["receiver_dropped"]:
            why.append(f"the receiver's sockets dropped {rec['receiver_dropped']} (the machine, not the box)")
        if rec["box_socket_drops"]:
            why.append(f"the box's sockets dropped {rec['box_socket_drops']}")
        p99 = rec["packet_p99_ms"] if rec["packet_p99_ms"] is not None else rec["unit_p99_ms"]
        if p99 is None:
            why.append("no latency measured")
        elif p99 > rtp.LAT_BOUND_MS:
            why.append(f"p99 {p99:.1f} ms > {rtp.LAT_BOUND_MS:.1f} ms")
        rec["sustained"] = not why
        rec["why"] = "; ".join(why)
        return rec
    except (RuntimeError, ControlError, OSError, KeyError, ValueError) as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
        rec["sustained"] = False
        rec["why"] = "failed"
        if box is not None:
            rec["warnings"] = box.warning_lines()[:12]
        log(f"   FAILED: {rec['failure'][:2000]}")
        return rec
    finally:
        if sender is not None:
            sender.kill()
        rx.close()
        for t in (tap, out_tap):
            if t is not None:
                t.close()
        for s in spare:
            s.close()
        if relay is not None:
            relay.kill()
            relay.wait()
        if box is not None:
            box.close()
        rec["took_s"] = round(time.monotonic() - t_start, 1)


def log_row(r: dict) -> None:
    if r.get("failure"):
        return
    log(f"   {r['kind']:>12s} x{r['streams']:<2d} cpu/route-s={1000 * r['cpu_per_stream_s']:.1f} ms  "
        f"packet p50/p99={rtp._ms(r['packet_p50_ms'])}/{rtp._ms(r['packet_p99_ms'])} ms  "
        f"unit p50/p99={rtp._ms(r['unit_p50_ms'])}/{rtp._ms(r['unit_p99_ms'])} ms  "
        f"units {r['matched_units']}/{r['sent_units']}  "
        f"{'sustained' if r['sustained'] else 'NOT sustained: ' + r['why']}  ({r['took_s']:.0f} s)")


# --------------------------------------------------------------------------------------
# The run


def usable_cores(rec: dict) -> float:
    return max(0.5, (os.cpu_count() or 1) * USABLE_SHARE - rec.get("other_load_pct", 0.0) / 100)


def lossless(rec: dict) -> bool:
    """Every unit sent in the window came out whole and no socket dropped anything (latency aside)."""
    return not rec.get("failure") and rec.get("missing_units") == 0 and not rec.get("receiver_dropped") \
        and not rec.get("box_socket_drops")


def calls_estimate(rec: dict, need_sustained: bool = True) -> float | None:
    """How many two-party calls the cores hold, from a row's CPU (box, sender and receiver together; a call is
    two routes): a sustained row's, or (need_sustained False) a lossless one's."""
    busy = rec.get("cores_busy")
    if not busy or not (rec.get("sustained") if need_sustained else lossless(rec)):
        return None
    return (rec["streams"] / 2) * usable_cores(rec) / busy


def run(plan: Plan) -> tuple[list[dict], dict]:
    path = encode_testsrc(rtp.clip_path(), rtp.WIDTH, rtp.HEIGHT, rtp.FPS, rtp.CLIP_S, rtp.KBPS, rtp.GOP, log=log)
    clip = rtp.load_clip(path)
    info = {k: v for k, v in clip.items() if k != "aus"}
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="ebrb", dir="/tmp"))
    rplan = plan.rtp_plan()
    try:
        with open(tmp / "clip.pickle", "wb") as f:
            pickle.dump(clip["aus"], f)
        counter = [0]

        def add(r: dict, sweep: bool = False) -> dict:
            r.setdefault("calls", r["streams"] / 2)
            r["sweep"] = sweep
            (log_row if r["kind"] in NAMES else rtp.log_row)(r)
            rows.append(r)
            return r

        def rtp_row(kind: str, streams: int) -> dict:
            counter[0] += 1
            log(f"-- {kind} (benchmarks/rtp.py) N={streams} streams")
            return add(rtp.run_row(kind, streams, rplan, clip, tmp, f"r{counter[0]}"))

        def bridge_row(kind: str, calls: int, sweep: bool = False, pacing_kbps: int | None = None) -> dict:
            counter[0] += 1
            log(f"-- bridge {kind} {calls} call(s)" + (f" pacing_kbps={pacing_kbps}" if pacing_kbps else ""))
            return add(run_bridge_row(kind, calls, plan, clip, tmp, f"r{counter[0]}", pacing_kbps), sweep)

        rtp_row("relay", 2)
        rtp_row("forward", 2)
        first = bridge_row("pass-through", 1, sweep=True)
        bridge_row("pass-through", 1, pacing_kbps=rtp.NO_PACING_KBPS)
        bridge_row("transcode", 1)
        naive = rtp_row("naive", 2)
        tried, est = {1: first["sustained"]}, {}
        if (e := calls_estimate(first)) is not None:
            est[1] = first["capacity_estimate_calls"] = e
        while (n := next_n(tried, plan.max_calls, False, est)) is not None:
            r = bridge_row("pass-through", n, sweep=True)
            tried[n] = r["sustained"]
            if (e := calls_estimate(r)) is not None:
                est[n] = r["capacity_estimate_calls"] = e
        if (e := calls_estimate(naive, need_sustained=False)) is not None:
            naive["capacity_estimate_calls"] = e
            if plan.check_naive and math.floor(e) >= 2:   # one more naive row at the count its CPU suggests
                rtp_row("naive", 2 * math.floor(e))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, info


# --------------------------------------------------------------------------------------
# The report


def row_of(rows: list[dict], kind: str, streams: int | None = None, **match) -> dict | None:
    return next((r for r in rows if r["kind"] == kind and not r.get("failure")
                 and (streams is None or r["streams"] == streams)
                 and all(r.get(k) == v for k, v in match.items())), None)


def annotate(rows: list[dict]) -> None:
    relay = row_of(rows, "relay")
    fwd = row_of(rows, "forward", pacing_kbps=rtp.DEFAULT_PACING_KBPS)
    for r in rows:
        if r.get("failure") or r["kind"] == "relay":
            continue
        ref = r.get("relay_beside")
        if r.get("packet_p99_ms") is not None and ref and ref.get("packet_p99_ms") is not None:
            r["added_packet_p99_ms"] = r["packet_p99_ms"] - ref["packet_p99_ms"]
            r["added_packet_p50_ms"] = r["packet_p50_ms"] - ref["packet_p50_ms"]
        if r.get("unit_p99_ms") is not None and ref and ref.get("unit_p99_ms") is not None:
            r["added_unit_p99_ms"] = r["unit_p99_ms"] - ref["unit_p99_ms"]
            r["added_unit_p50_ms"] = r["unit_p50_ms"] - ref["unit_p50_ms"]
        if relay is not None and relay.get("cpu_per_stream_s"):
            r["cpu_vs_relay"] = r["cpu_per_stream_s"] / relay["cpu_per_stream_s"]
        if r["kind"] in NAMES and fwd is not None:
            if r.get("packet_p99_ms") is not None and fwd.get("packet_p99_ms") is not None:
                r["vs_forward_packet_p99_ms"] = r["packet_p99_ms"] - fwd["packet_p99_ms"]
            if fwd.get("cpu_per_stream_s"):
                r["cpu_vs_forward"] = r["cpu_per_stream_s"] / fwd["cpu_per_stream_s"]


def sweep_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "pass-through" and r.get("sweep")]


def highest(rows: list[dict]) -> int:
    return max((r["calls"] for r in sweep_rows(rows) if r.get("sustained")), default=0)


def _latency_note(r: dict) -> str:
    p99 = r.get("unit_p99_ms")
    if p99 is None:
        return ""
    return f", unit p99 {p99:.1f} ms" + (f": above one frame interval ({rtp.LAT_BOUND_MS:.1f} ms)"
                                          if p99 > rtp.LAT_BOUND_MS else "")


def naive_calls(rows: list[dict]) -> tuple[float, str]:
    """The naive path's two-party calls with zero loss (every unit out whole, no drop: its latency is not held
    against it), and how that was found."""
    first = row_of(rows, "naive", 2)
    if first is None:
        return 0.0, "its row failed"
    check = next((r for r in rows if r["kind"] == "naive" and r["streams"] > 2 and not r.get("failure")), None)
    if check is not None and lossless(check):
        return check["streams"] / 2, f"measured: {check['streams'] // 2} calls with zero loss{_latency_note(check)}"
    if not lossless(first):
        return 0.0, f"measured: not even one call without loss ({first['why']})"
    e = first.get("capacity_estimate_calls")
    base = f"measured: 1 call with zero loss{_latency_note(first)}"
    if check is not None:
        base += f"; {check['streams'] // 2} calls lost units ({check['why']})"
        return 1.0, base
    if e is not None and math.floor(e) >= 2:
        return float(math.floor(e)), base + f"; estimated {e:.1f} from its CPU per call (not run)"
    return 1.0, base + (f"; its CPU says the cores hold {e:.1f}" if e is not None else "")


def table(rows: list[dict]) -> str:
    out = ["| row | calls | routes | ms CPU per route-s (bridge alone) | packet p50 / p99 ms | unit p50 / p99 / max ms "
           "| relay beside it: packet p99 ms | added p50 / p99 ms (packet; unit) | units out / sent | other load % "
           "| notes |",
           "|---|---:|---:|---|---|---|---:|---|---|---:|---|"]
    for r in rows:
        calls = f"{r['calls']:g}"
        if r.get("failure"):
            out.append(f"| {r['name']} | {calls} | {r['streams']} | FAILED | | | | | | | {r['failure'][:160]} |")
            continue
        notes = []
        if r["kind"] in ("forward", "pass-through"):
            notes.append(f"bytes identical {r.get('identical_units', 0)}/{r['matched_units']}")
        if r["kind"] == "transcode":
            t = next((x for x in r.get("transcodes_c1") or [] if isinstance(x, dict) and x.get("out") == "a1-to-vp8"),
                     None)
            if t is not None:
                notes.append(f"encoder {t.get('encoder')} {t.get('size')} {t.get('kbps')} kbit/s")
            if r.get("transcode_capture_to_bus_p50_ms") is not None:
                notes.append(f"capture -> a1-to-vp8 on the bus {rtp._ms(r['transcode_capture_to_bus_p50_ms'])} / "
                             f"{rtp._ms(r['transcode_capture_to_bus_p99_ms'])} ms p50/p99")
        if r.get("box_other_cpu_per_s") and r["kind"] != "relay":
            notes.append(f"hub + run {1000 * r['box_other_cpu_per_s']:.0f} ms/s")
        if r.get("cpu_vs_relay"):
            notes.append(f"{r['cpu_vs_relay']:.1f}x the relay's CPU")
        if r.get("box_dropped"):
            notes.append(f"box: {r['box_dropped']}")
        notes.append("sustained" if r["sustained"] else f"NOT sustained: {r['why']}")
        cpu = f"{1000 * r['cpu_per_stream_s']:.1f}"
        if r.get("bridge_cpu_per_stream_s") is not None:
            cpu += f" ({1000 * r['bridge_cpu_per_stream_s']:.1f})"
        added = ""
        if r["kind"] != "relay":
            added = (f"{rtp._ms(r.get('added_packet_p50_ms'))} / {rtp._ms(r.get('added_packet_p99_ms'))}; "
                     f"{rtp._ms(r.get('added_unit_p50_ms'))} / {rtp._ms(r.get('added_unit_p99_ms'))}")
        beside = rtp._ms(r["relay_beside"]["packet_p99_ms"]) if r.get("relay_beside") else ""
        out.append(f"| {r['name']} | {calls} | {r['streams']} | {cpu} | "
                   f"{rtp._ms(r['packet_p50_ms'])} / {rtp._ms(r['packet_p99_ms'])} | {rtp._ms(r['unit_p50_ms'])} / "
                   f"{rtp._ms(r['unit_p99_ms'])} / {rtp._ms(r['unit_max_ms'])} | {beside} | {added} | "
                   f"{r['matched_units']} / {r['sent_units']} | {r['other_load_pct']:.0f} | {'; '.join(notes)} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> dict:
    """The figures the brief asks for, in one place."""
    pt = next((r for r in sweep_rows(rows) if r["calls"] == 1 and not r.get("failure")), None)
    free = row_of(rows, "pass-through", pacing_kbps=rtp.NO_PACING_KBPS)
    tc = row_of(rows, "transcode")
    relay, fwd, naive = row_of(rows, "relay"), row_of(rows, "forward"), row_of(rows, "naive", 2)
    n_naive, how = naive_calls(rows)

    def lat(r: dict | None) -> dict | None:
        if r is None:
            return None
        return {k: r.get(k) for k in ("packet_p50_ms", "packet_p99_ms", "unit_p50_ms", "unit_p99_ms",
                                      "added_packet_p50_ms", "added_packet_p99_ms", "added_unit_p50_ms",
                                      "added_unit_p99_ms", "vs_forward_packet_p99_ms")}

    def cpu(r: dict | None) -> float | None:
        return None if r is None else r["cpu_per_stream_s"] * 1000

    best = highest(rows)
    return {"pass_through": lat(pt), "pass_through_no_pacing": lat(free), "transcode": lat(tc),
            "relay": lat(relay), "forward": lat(fwd),
            "transcode_bridge_cpu_ms_per_media_s": None if tc is None else 1000 * tc["bridge_cpu_per_stream_s"],
            "cpu_ms_per_route_s": {"relay": cpu(relay), "forward": cpu(fwd), "pass_through": cpu(pt),
                                   "transcode": cpu(tc), "naive": cpu(naive)},
            "pass_through_bridge_cpu_ms_per_route_s": None if pt is None else 1000 * pt["bridge_cpu_per_stream_s"],
            "calls_pass_through": best, "calls_naive": n_naive, "calls_naive_how": how,
            "calls_ratio": (best / n_naive) if n_naive else None}


def targets(rows: list[dict], plan: Plan) -> list[tuple[str, str, str]]:
    out = []
    s = summary(rows)
    pt = next((r for r in sweep_rows(rows) if r["calls"] == 1 and not r.get("failure")), None)
    if pt is not None and pt.get("added_packet_p99_ms") is not None:
        added = pt["added_packet_p99_ms"]
        detail = (f"{added:+.2f} ms (pass-through p99 {pt['packet_p99_ms']:.2f} ms, the relay's stream beside it "
                  f"{pt['relay_beside']['packet_p99_ms']:.2f} ms; keyframe units "
                  f"{rtp._ms(pt.get('keyframe_unit_p50_ms'))} ms p50, the others "
                  f"{rtp._ms(pt.get('delta_unit_p50_ms'))} / {rtp._ms(pt.get('delta_unit_p99_ms'))} ms p50/p99)")
        fwd = row_of(rows, "forward")
        if fwd is not None and fwd.get("added_packet_p99_ms") is not None:
            detail += (f"; rtp@ forward without the bridge in this run {fwd['added_packet_p99_ms']:+.2f} ms "
                       f"(p99 {fwd['packet_p99_ms']:.2f} ms)")
        free = s["pass_through_no_pacing"]
        if free is not None and free.get("added_packet_p99_ms") is not None:
            detail += f"; pass-through without pacing {free['added_packet_p99_ms']:+.2f} ms"
        out.append(("PASS" if added <= TARGET_ADDED_MS else "FAIL",
                    f"pass-through adds at most {TARGET_ADDED_MS:g} ms p99 over the relay (packet latency, one call, "
                    f"pacing_kbps = {rtp.DEFAULT_PACING_KBPS}, the default)", detail))
        free_row = row_of(rows, "pass-through", pacing_kbps=rtp.NO_PACING_KBPS)
        if free_row is not None and free_row.get("added_packet_p99_ms") is not None:
            fa = free_row["added_packet_p99_ms"]
            out.append(("PASS" if fa <= TARGET_ADDED_MS else "FAIL",
                        f"pass-through adds at most {TARGET_ADDED_MS:g} ms p99 over the relay with pacing off "
                        f"(packet latency, one call, pacing_kbps = {rtp.NO_PACING_KBPS})",
                        f"{fa:+.2f} ms (p99 {free_row['packet_p99_ms']:.2f} ms, the relay's stream beside it "
                        f"{free_row['relay_beside']['packet_p99_ms']:.2f} ms; p50 {free_row['packet_p50_ms']:.2f} ms, "
                        f"{free_row.get('added_packet_p50_ms', 0):+.2f} ms)"))
    best, n_naive = s["calls_pass_through"], s["calls_naive"]
    row = next((r for r in sweep_rows(rows) if r["calls"] == best), None)
    detail = f"{best} bridged call(s) sustained"
    if row is not None:
        detail += f" ({row['cores_busy']:.2f} cores busy with the sender and receiver, packet p99 " \
                  f"{rtp._ms(row['packet_p99_ms'])} ms)"
    fail = min((r["calls"] for r in sweep_rows(rows) if not r.get("sustained")), default=None)
    if fail is not None:
        first_fail = next(r for r in sweep_rows(rows) if r["calls"] == fail)
        detail += f"; {fail} calls: {first_fail['why']}"
    elif best >= plan.max_calls:
        detail += f" (the cap, --max-calls {plan.max_calls}: the box may hold more)"
    detail += f"; naive: {n_naive:g} ({s['calls_naive_how']})"
    if n_naive:
        ratio = best / n_naive
        capped = fail is None and best >= plan.max_calls
        naive_row = row_of(rows, "naive", 2)
        e = naive_row.get("capacity_estimate_calls") if naive_row else None
        if e:
            detail += f"; against the naive path's CPU estimate ({e:.1f} calls) {best / e:.1f}x"
        if capped and ratio < TARGET_CALLS_RATIO:
            detail += f"; the cap (--max-calls {plan.max_calls}) holds the count down: no verdict"
        out.append(("PASS" if ratio >= TARGET_CALLS_RATIO else "INFO" if capped else "FAIL",
                    f"at least {TARGET_CALLS_RATIO:g}x as many two-party calls as the naive path (bridged: zero loss "
                    f"and packet p99 within one frame interval; naive: zero loss)",
                    f"{'at least ' if capped else ''}{ratio:.1f}x: " + detail))
    else:
        out.append(("INFO", "the most bridged two-party calls with zero loss", detail))
    return out


def report(rows: list[dict], clip: dict, plan: Plan, name: str, elapsed: float, load: tuple) -> str:
    tg = targets(rows, plan)
    s = summary(rows)
    text = [f"## Bridge benchmark ({name}, {elapsed:.0f} s, code {code_version()}, {os.cpu_count()} CPUs, "
            f"load average {' '.join(f'{x:.2f}' for x in load)} at start, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end, {tool_version(['ffmpeg', '-version'])})",
            "", table(rows), "", "## targets", ""]
    text += [f"- {v}  {t}: {d}" for v, t, d in tg]
    c = s["cpu_ms_per_route_s"]
    text += ["", "## CPU per route-second of media (ms)", "",
             "| relay | rtp@ forward | bridge pass-through (bridge alone) | bridge transcode (bridge alone) | "
             "decode + re-encode |", "|---:|---:|---:|---:|---:|",
             f"| {rtp._ms(c['relay'], 1)} | {rtp._ms(c['forward'], 1)} | {rtp._ms(c['pass_through'], 1)} "
             f"({rtp._ms(s['pass_through_bridge_cpu_ms_per_route_s'], 1)}) | {rtp._ms(c['transcode'], 1)} "
             f"({rtp._ms(s['transcode_bridge_cpu_ms_per_media_s'], 1)}) | {rtp._ms(c['naive'], 1)} |"]
    text += ["", "## notes", "",
             f"- clip: {rtp.WIDTH}x{rtp.HEIGHT} {rtp.FPS} fps H.264, {clip['kbps']} kbit/s, {clip['frames']} frames, "
             f"a keyframe every {rtp.GOP} frames (up to {clip['keyframe_packets']} packets), {clip['packets_per_s']} "
             f"packets/s at a {rtp.MTU}-byte MTU; one stream per route, the streams staggered over the frame interval.",
             "- a two-party call: [rtp.aI] and [rtp.bI] in room cI, bridged (rooms = '*'), no send_video: the "
             "bridge routes each one's inbound video to the other. relay, forward and naive are benchmarks/rtp.py's "
             "rows with 2 streams (a call's two routes).",
             "- packet latency: each packet's arrival at the receiver (kernel time) less the send of the packet with "
             "the same payload; unit: the last packet out less the last in (a transcode has new packets: unit only). "
             "added: against the relay's stream beside the box's, at the same moments.",
             "- CPU: rtp@* + bridge (bridge rows; the bridge alone in brackets), rtp@* (forward), rtp@* + decode@* + "
             "encode@* (naive), per route (stream) and second of the window, from /proc/PID/task/*/schedstat. "
             "other load: CPU the machine spent outside this benchmark's processes, % of one core.",
             f"- sustained: every unit sent in the window out whole, no drop anywhere, p99 <= "
             f"{rtp.LAT_BOUND_MS:.1f} ms (packet; unit where there are no packets to pair)."]
    for r in rows:
        if r.get("warnings"):
            text.append(f"- {r['name']} x{r['streams']}: the box logged: " + " | ".join(r["warnings"]))
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S = 3, calls up to 2 (ends within ~2 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--seconds", type=float, help="the measured window per row (default 8, --quick 3)")
    ap.add_argument("--max-calls", type=int, help="the sweep's cap on two-party calls (default 32, --quick 2)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        if args.seconds < 1:
            ap.error("--seconds: at least 1")
        plan.seconds = args.seconds
    if args.max_calls is not None:
        if args.max_calls < 1:
            ap.error("--max-calls: at least 1")
        plan.max_calls = args.max_calls
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
        f", --{k.replace('_', '-')} {v:g}" for k, v in (("seconds", args.seconds), ("max_calls", args.max_calls))
        if v is not None)
    print(report(rows, clip, plan, name, time.monotonic() - t0, load), flush=True)
    if args.json:
        tg = targets(rows, plan)
        out = {"plan": name, "seconds": plan.seconds, "max_calls": plan.max_calls, "cpus": os.cpu_count(),
               "loadavg_start": [round(x, 2) for x in load], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "elapsed_s": round(time.monotonic() - t0, 1), "code": code_version(), "clip": clip,
               "summary": summary(rows), "highest_sustained_calls": highest(rows),
               "targets": [{"verdict": v, "target": t, "detail": d} for v, t, d in tg],
               "rows": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failure") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
