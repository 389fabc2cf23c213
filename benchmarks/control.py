"""Control-plane benchmark: the hub against the ZeroMQ transport limit and an HTTP JSON API.

Run from the repository root:

    .venv/bin/python benchmarks/control.py [--quick] [--json PATH]
                                           [--services 1,200] [--window 64]

Three paths, one row each (every server runs in a process of its own; the client or
subscriber is this process):

* `limit`: what the transport costs. A ZeroMQ ROUTER in a child process answers a DEALER
  over ipc:// with no parsing at all (round trips: the request bytes echoed; heartbeats: a
  fixed reply of the hub's size), and a PUB child sends to a SUB here with no hub between.
* `edgeroom`: a real hub (`python -m services.cli service hub`, a private runtime dir under
  /tmp, its own config) reached the way the box reaches it: `Client.call("ping")`, a service's
  DEALER sending `service.heartbeat`, a service's PUB into events-in and a `Subscriber` on
  events (subscribed to '*', confirmed with `Subscriber.wait_ready`).
* `naive`: a REST control plane in Python: `http.server.ThreadingHTTPServer` (HTTP/1.1,
  keep-alive, TCP_NODELAY) in a child process answering POST /ping and POST /heartbeat with
  JSON (json.loads of the request, json.dumps of the reply), driven by one
  `http.client.HTTPConnection`. HTTP has no fan-out, so it has no event figures.

Method
------
* Round trip: `n` sequential requests (5,000; --quick 1,000) after a warm-up of `n/10`; each
  timed with perf_counter_ns around send-and-receive (the edgeroom client also parses the
  reply's JSON, as `Client.call` does; so does the HTTP client). req/s = n / the loop's time.
  The limit and the hub get the same request bytes (`protocol.encode_request(..., "ping")`).
* Server CPU per request: the server process's CPU time over the loop, every thread
  (ZeroMQ's I/O thread included), from /proc/PID/task/*/schedstat (ns), divided by n. The
  client's own CPU per request (time.process_time) is in the JSON.
* A fourth round-trip figure, in the notes and the limit row's JSON (rt_loop_echo): the same
  raw echo served from services.runtime.loop.Loop the way the hub serves (zmq.Poller, recv
  NOBLOCK until Again, send NOBLOCK): the hub's structure without its work.
* Heartbeats: a realistic body (the fields of `Service.heartbeat_body`, `metrics` =
  `services.runtime.metrics.snapshot()` of a registry with 20 families, a labelled histogram
  among them; one session with one track), from `--services` distinct service ids in turn
  (each registered by one heartbeat before timing, and said goodbye to after). One DEALER
  keeps `--window` requests in flight (send until the window is full, then one reply per
  send): pipelined, without overrunning the 1,000-message queues whose overflow loses
  replies. Bodies are encoded once, so the client spends its core on sockets only.
  The naive row sends the same JSON body sequentially (http.client does not pipeline).
  "services @ 1 Hz, 1 core": how many services heartbeating once a second one core of the
  server absorbs, S with S * c(S) = 1 s, c = the server's CPU per heartbeat. The hub's c
  grows with the services it knows, so with two or more --services counts c(S) = a + k*S is
  fitted; the limit and naive servers keep no state (c constant). After each run the hub's
  status is read: a bench service not `ready` means the hub fell behind.
* Events: a publisher child sends pre-encoded `encode_event` frames (topic bench.ev, a
  small data dict) as fast as it can for a fixed time (3 s; --quick 1 s) on a PUB with the
  HubLink's high-water mark (1,000); the subscriber here counts the bench.ev frames it
  receives (raw recv_multipart, no parsing: the same work in both rows). Before timing, the
  publisher sends bench.warm frames until one arrives (ZeroMQ's slow joiner); after it, it
  sends bench.end frames until one arrives, so the backlog is drained. PUB, XSUB and XPUB drop
  at their high-water marks by design: sent, received and dropped are all reported, and
  events/s = received / (last arrival - first arrival). For the hub, the notes also split the
  loss by where it happened (the hub's edgeroom_events_published counter).
* The reading breaks the hub's time down: a real Hub object set up in this process (its own
  runtime dir, metrics off) runs `Hub._handle` on the same request bytes (parse, command
  table, command, reply and its send; no poll, no recv), and the pieces alone (parse_request,
  the heartbeat command, SessionBook.rooms/update/save, Hub.store_snapshot, parse_event),
  against the hub's measured CPU per request; the rest is ZeroMQ, the wake-ups and the loop.
* Machine: this runs client, server and (events) publisher on the same cores; the CPU count
  and load average are printed. Every child is stopped and the temp dir removed on exit,
  Ctrl-C and SIGTERM included.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# Run as a script, this file's directory is sys.path[0]; the repository root is what we need.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_ROOT)

import zmq  # noqa: E402
from prometheus_client import Counter, Gauge, Histogram  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: E402

from services.control import protocol  # noqa: E402
from services.control.client import Client, Subscriber  # noqa: E402
from services.runtime.metrics import Derived, new_registry, snapshot  # noqa: E402

PATHS = ("limit", "edgeroom", "naive")
HUB_READY_TIMEOUT = 30.0
RECV_TIMEOUT_MS = 5000
EV_TOPIC = protocol.topic_frame("bench.ev")
WARM_TOPIC = protocol.topic_frame("bench.warm")
END_TOPIC = protocol.topic_frame("bench.end")
EV_DATA = {"stream": "cam-lobby", "objects": 2, "score": 0.93}


@dataclass
class Plan:
    rt_n: int  # sequential round trips per path
    hb_n: int  # heartbeats per path (the naive one sends fewer, it is slower)
    ev_s: float  # seconds the event publisher sends


FULL = Plan(rt_n=5000, hb_n=10000, ev_s=3.0)
QUICK = Plan(rt_n=1000, hb_n=2000, ev_s=1.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


# --------------------------------------------------------------------------------------
# small helpers


def proc_cpu_s(pid: int) -> float:
    """CPU seconds a process has run, all its threads (ZeroMQ's I/O thread included).

    From /proc/PID/task/*/schedstat (nanoseconds); /proc/PID/stat (10 ms ticks) where the
    kernel has no schedstat.
    """
    total, found = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        tasks = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
                found = True
        except (FileNotFoundError, ProcessLookupError):
            continue
    if found:
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(sorted_vals: list, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def latency_stats(lat_ns: list[int], elapsed_s: float, server_cpu_s: float, client_cpu_s: float) -> dict:
    lat = sorted(lat_ns)
    n = len(lat)
    return {"rt_n": n, "rt_p50_us": round(pct(lat, 50) / 1e3, 1), "rt_p99_us": round(pct(lat, 99) / 1e3, 1),
            "rt_max_us": round(lat[-1] / 1e3, 1), "rt_per_s": round(n / elapsed_s, 1),
            "rt_server_cpu_us": round(server_cpu_s / n * 1e6, 1),
            "rt_client_cpu_us": round(client_cpu_s / n * 1e6, 1)}


class Meter:
    """Wall time, the server's CPU and this process's CPU (every thread) over a measured loop."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid

    def __enter__(self) -> Meter:
        self.cpu0, self.own0, self.t0 = proc_cpu_s(self.pid), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self.server_cpu = proc_cpu_s(self.pid) - self.cpu0
        self.client_cpu = time.process_time() - self.own0


def _child_init() -> None:
    """In a forked child: the parent decides when we stop (Ctrl-C goes to the whole group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Children:
    """Every process this benchmark starts, stopped in reverse order by close()."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("fork")
        self.procs: list = []
        self.hub: subprocess.Popen | None = None

    def start(self, target, *args, name: str):
        p = self.ctx.Process(target=target, args=args, name=name, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def stop(self, p) -> None:
        if p.is_alive():
            p.terminate()
            p.join(3)
        if p.is_alive():
            p.kill()
            p.join()
        if p in self.procs:
            self.procs.remove(p)

    def stop_hub(self) -> None:
        hub, self.hub = self.hub, None
        if hub is None or hub.poll() is not None:
            return
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(hub.pid, signal.SIGKILL)
            hub.wait()

    def close(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)
        self.stop_hub()


# --------------------------------------------------------------------------------------
# The realistic heartbeat body


def service_registry():
    """A capture-like service's registry: the base Service's families plus ~15 of its own."""
    r = new_registry()
    Counter("edgeroom_service_heartbeats", "Heartbeats sent to the hub.", registry=r).inc(3600)
    Counter("edgeroom_service_hub_reconnects", "Times the hub stopped answering.", registry=r).inc(1)
    reloads = Counter("edgeroom_service_reloads", "Config reloads (SIGHUP), by result.", ["result"], registry=r)
    reloads.labels("applied").inc(2)
    reloads.labels("rejected").inc(1)
    r.register(Derived(lambda: [
        CounterMetricFamily("edgeroom_service_cpu_seconds", "CPU time this process has used.", value=123.4),
        GaugeMetricFamily("edgeroom_service_resident_memory_bytes", "Resident memory.", value=85_000_000),
        GaugeMetricFamily("edgeroom_service_start_time_seconds", "Start time.", value=time.time() - 3600)]))
    streams = ("cam-lobby", "cam-lobby.small")
    frames = Counter("edgeroom_capture_frames", "Frames put on the bus.", ["stream"], registry=r)
    dropped = Counter("edgeroom_capture_dropped_frames", "Frames not captured, by reason.",
                      ["stream", "reason"], registry=r)
    fps = Gauge("edgeroom_capture_fps", "Frames per second over the last second.", ["stream"], registry=r)
    lat = Histogram("edgeroom_capture_to_bus_seconds", "From capture to the frame on the bus.", ["stream"],
                    registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1))
    for i, s in enumerate(streams):
        frames.labels(s).inc(108000 + i)
        fps.labels(s).set(29.97)
        for reason in ("late", "bus_full", "device"):
            dropped.labels(s, reason).inc(i + 3)
        for k in range(200):
            lat.labels(s).observe(0.0004 * (1 + k % 37))
    for name, doc in (("edgeroom_bus_items", "Items written to the ring."),
                      ("edgeroom_bus_overwritten", "Items overwritten before every reader saw them."),
                      ("edgeroom_capture_bytes", "Bytes put on the bus."),
                      ("edgeroom_capture_errors", "Capture errors."),
                      ("edgeroom_capture_restarts", "Device reopen attempts.")):
        c = Counter(name, doc, ["stream"], registry=r)
        for s in streams:
            c.labels(s).inc(1000)
    for name, doc in (("edgeroom_bus_readers", "Readers attached to the ring."),
                      ("edgeroom_bus_slots_held", "Ring slots held by readers."),
                      ("edgeroom_capture_width", "Picture width."),
                      ("edgeroom_capture_height", "Picture height."),
                      ("edgeroom_capture_exposure_seconds", "Exposure time."),
                      ("edgeroom_capture_temperature_celsius", "Sensor temperature.")):
        g = Gauge(name, doc, ["stream"], registry=r)
        for s in streams:
            g.labels(s).set(42.0)
    return r


def heartbeat_args(i: int, families: list) -> dict:
    """What Service.heartbeat_body() sends for capture@camNNN."""
    inst = f"cam{i:03d}"
    track = {"id": "video", "kind": "video", "stream": f"{inst}", "format": "rgb24",
             "width": 1280, "height": 720, "fps": 30.0}
    session = {"id": inst, "room": "lobby", "kind": "camera", "tracks": [track]}
    return {"service": f"capture@{inst}", "kind": "capture", "instance": inst, "pid": 400000 + i,
            "started": time.time() - 3600, "state": "ready", "status": "synthetic 1280x720 at 30.0 fps",
            "rate": 29.97, "sessions": [session], "streams": [inst], "metrics": families}


# --------------------------------------------------------------------------------------
# Child processes: raw ZeroMQ server, HTTP server, event publisher


def router_server(endpoint: str, mode: str, ready) -> None:
    """ROUTER, no parsing: 'echo' sends the frames back, 'ack' replaces the body by a fixed reply,
    'loop' echoes from the service loop the hub runs on."""
    _child_init()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(endpoint)
    ready.set()
    ack = protocol.encode_reply("capture@cam000-1", {"service": "capture@cam000", "state": "ready"})
    if mode == "loop":  # the hub's structure without its work: services.runtime.loop.Loop, NOBLOCK until Again
        from services.runtime.loop import Loop

        loop = Loop()

        def on_readable() -> None:
            for _ in range(100):
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    return
                sock.send_multipart(frames, flags=zmq.NOBLOCK)

        loop.add_reader(sock, on_readable)
        loop.every(0.25, lambda: None)
        loop.run()
    while True:
        frames = sock.recv_multipart()
        if mode == "ack":
            frames[-1] = ack
        sock.send_multipart(frames)


def http_server(conn) -> None:
    _child_init()
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # headers and body are two writes: without it, 40 ms delayed ACKs

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path == "/ping":
                result = {"pong": True, "pid": os.getpid(), "version": 1, "box": "edgeroom"}
            elif self.path == "/heartbeat":
                result = {"service": req.get("service"), "state": req.get("state")}
            else:
                self.send_error(404)
                return
            body = json.dumps({"ok": True, "result": result}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    conn.send(srv.server_address[1])
    srv.serve_forever()


def event_publisher(endpoint: str, bind: bool, seconds: float, go, done, conn) -> None:
    _child_init()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.sndhwm = 1000  # as HubLink's
    if bind:
        pub.bind(endpoint)
    else:
        pub.connect(endpoint)

    def ev(topic: str, seq: int, data: dict) -> list[bytes]:
        return protocol.encode_event(protocol.Event(topic, data, "bench@pub", seq, time.time(),
                                                    time.clock_gettime_ns(time.CLOCK_MONOTONIC)))

    frames = [ev("bench.ev", seq, EV_DATA) for seq in range(1, 1025)]
    warm, end = ev("bench.warm", 0, {}), ev("bench.end", 0, {})
    warm_sent = 0
    while not go.is_set():
        pub.send_multipart(warm, flags=zmq.NOBLOCK)
        warm_sent += 1
        go.wait(0.005)
    sent, t0 = 0, time.monotonic()
    t_end = t0 + seconds
    send = pub.send_multipart
    while True:
        for _ in range(256):
            send(frames[sent & 1023], flags=zmq.NOBLOCK)  # a PUB drops at its HWM, never raises
            sent += 1
        if time.monotonic() >= t_end:
            break
    elapsed = time.monotonic() - t0
    end_sent = 0
    while not done.is_set():
        pub.send_multipart(end, flags=zmq.NOBLOCK)
        end_sent += 1
        done.wait(0.005)
    conn.send({"sent": sent, "send_s": elapsed, "warm_sent": warm_sent, "end_sent": end_sent})
    pub.close()
    ctx.term()


# --------------------------------------------------------------------------------------
# The hub


class Hub:
    def __init__(self, tmp: Path, children: Children) -> None:
        self.rundir = tmp / "run"
        self.config = tmp / "edgeroom.toml"
        self.log_path = tmp / "hub.log"
        self.config.write_text(f'[box]\nruntime_dir = "{self.rundir}"\n[bus]\nprefix = "ctlbench{os.getpid()}"\n'
                               f'[hub]\nmetrics_listen = "127.0.0.1:0"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
        env["EDGEROOM_CONFIG"] = str(self.config)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "service", "hub"], cwd=_ROOT,
                                         stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        children.hub = self.proc
        self.control = f"ipc://{self.rundir}/control.sock"
        self.events = f"ipc://{self.rundir}/events.sock"
        self.events_in = f"ipc://{self.rundir}/events-in.sock"
        self.client = Client(self.control, timeout=5.0)
        deadline = time.monotonic() + HUB_READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the hub exited with {self.proc.returncode}:\n{self.log()[-2000:]}")
            try:
                if Path(self.control[6:]).exists() and self.client.call("ping", timeout=0.5):
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the hub did not answer within {HUB_READY_TIMEOUT:g} s:\n"
                                       f"{self.log()[-2000:]}") from None
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def counters(self) -> dict | None:
        """The hub's own counters (its snapshot is refreshed every 0.25 s); None if it does not answer."""
        time.sleep(0.3)
        try:
            return self.client.call("metrics", timeout=30.0)["services"].get("hub", {})
        except Exception as e:
            log(f"   (the hub's counters: {e})")
            return None

    def states(self, prefix: str) -> dict:
        """How many services whose id starts with `prefix` are in each state."""
        out: dict = {}
        for row in self.client.call("status", timeout=30.0)["services"]:
            if row["service"].startswith(prefix):
                out[row["state"]] = out.get(row["state"], 0) + 1
        return out

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------------------
# 1. Round trips


def rt_zmq_raw(endpoint: str, body: bytes, n: int, server_pid: int) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = RECV_TIMEOUT_MS
    sock.connect(endpoint)
    try:
        for _ in range(max(50, n // 10)):
            sock.send_multipart([b"", body])
            sock.recv_multipart()
        lat = []
        clock = time.perf_counter_ns
        with Meter(server_pid) as m:
            for _ in range(n):
                a = clock()
                sock.send_multipart([b"", body])
                frames = sock.recv_multipart()
                lat.append(clock() - a)
        if frames[-1] != body:
            raise RuntimeError("the echo server answered something else")
        return latency_stats(lat, m.elapsed, m.server_cpu, m.client_cpu)
    finally:
        sock.close()


def rt_edgeroom(hub: Hub, n: int) -> dict:
    client = Client(hub.control, timeout=5.0)
    try:
        for _ in range(max(50, n // 10)):
            client.call("ping")
        lat = []
        clock = time.perf_counter_ns
        with Meter(hub.pid) as m:
            for _ in range(n):
                a = clock()
                result = client.call("ping")
                lat.append(clock() - a)
        if not result.get("pong"):
            raise RuntimeError(f"unexpected ping result {result!r}")
        return latency_stats(lat, m.elapsed, m.server_cpu, m.client_cpu)
    finally:
        client.close()


def rt_http(port: int, n: int, server_pid: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=RECV_TIMEOUT_MS / 1000)
    headers = {"Content-Type": "application/json"}

    def ping() -> dict:
        conn.request("POST", "/ping", json.dumps({"cmd": "ping", "args": {}}).encode(), headers)
        resp = conn.getresponse()
        out = json.loads(resp.read())
        if resp.status != 200 or not out["result"]["pong"]:
            raise RuntimeError(f"HTTP ping answered {resp.status}: {out!r}")
        return out

    try:
        for _ in range(max(50, n // 10)):
            ping()
        lat = []
        clock = time.perf_counter_ns
        with Meter(server_pid) as m:
            for _ in range(n):
                a = clock()
                ping()
                lat.append(clock() - a)
        return latency_stats(lat, m.elapsed, m.server_cpu, m.client_cpu)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# 2. Heartbeats


def hb_pipelined(endpoint: str, bodies: list[bytes], n: int, window: int, server_pid: int) -> dict:
    """Keep `window` requests in flight on one DEALER; count ok replies."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = RECV_TIMEOUT_MS
    sock.connect(endpoint)
    k = len(bodies)
    try:
        # register every service (first heartbeats create records and sessions, save state)
        t_reg = time.perf_counter()
        for body in bodies:
            sock.send_multipart([b"", body])
            reply = sock.recv_multipart()[-1]
            if b'"ok":true' not in reply:
                raise RuntimeError(f"heartbeat refused: {reply[:300]!r}")
        t_reg = time.perf_counter() - t_reg
        sent = got = errors = 0
        first_error = None
        send, recv = sock.send_multipart, sock.recv_multipart
        with Meter(server_pid) as m:
            while got < n:
                while sent - got < window and sent < n:
                    send([b"", bodies[sent % k]])
                    sent += 1
                reply = recv()[-1]
                got += 1
                if b'"ok":true' not in reply:
                    errors += 1
                    first_error = first_error or reply[:300]
        out = {"hb_n": n, "hb_per_s": round(n / m.elapsed, 1), "hb_server_cpu_us": round(m.server_cpu / n * 1e6, 1),
               "hb_client_cpu_us": round(m.client_cpu / n * 1e6, 1), "hb_errors": errors,
               "hb_mode": f"pipelined, window {window}", "hb_register_s": round(t_reg, 3)}
        if first_error:
            out["hb_first_error"] = first_error.decode(errors="replace")
        return out
    except zmq.Again:
        raise RuntimeError(f"no reply within {RECV_TIMEOUT_MS} ms (replies lost?)") from None
    finally:
        sock.close()


def hb_http(port: int, bodies: list[bytes], n: int, server_pid: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=RECV_TIMEOUT_MS / 1000)
    headers = {"Content-Type": "application/json"}
    k = len(bodies)
    errors = 0
    try:
        for body in bodies:
            conn.request("POST", "/heartbeat", body, headers)
            conn.getresponse().read()
        with Meter(server_pid) as m:
            for i in range(n):
                conn.request("POST", "/heartbeat", bodies[i % k], headers)
                resp = conn.getresponse()
                out = json.loads(resp.read())
                if resp.status != 200 or not out.get("ok"):
                    errors += 1
        return {"hb_n": n, "hb_per_s": round(n / m.elapsed, 1), "hb_server_cpu_us": round(m.server_cpu / n * 1e6, 1),
                "hb_client_cpu_us": round(m.client_cpu / n * 1e6, 1), "hb_errors": errors,
                "hb_mode": "sequential (HTTP/1.1 keep-alive)"}
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# 3. Events


def count_events(sock: zmq.Socket, pub_proc, go, done, conn, seconds: float) -> dict:
    """Receive on `sock` (subscribed to everything) until bench.end; count bench.ev frames."""
    sock.rcvtimeo = 200
    deadline = time.monotonic() + 15.0
    while True:  # the publisher sends bench.warm until we see one
        try:
            if sock.recv_multipart()[0] == WARM_TOPIC:
                break
        except zmq.Again:
            pass
        if not pub_proc.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("no warm-up event arrived from the publisher")
    go.set()
    received = other = 0
    first = last = 0.0
    clock = time.monotonic
    deadline = clock() + seconds + 30.0
    recv = sock.recv_multipart
    while True:
        try:
            topic = recv()[0]
        except zmq.Again:
            if not pub_proc.is_alive() or clock() > deadline:
                raise RuntimeError("the event stream stopped before bench.end") from None
            continue
        if topic == EV_TOPIC:
            last = clock()
            if not received:
                first = last
            received += 1
        elif topic == END_TOPIC:
            break
        else:
            other += 1
    done.set()
    if not conn.poll(10):
        raise RuntimeError("the publisher did not report")
    stats = conn.recv()
    sent = stats["sent"]
    span = last - first
    return {"ev_sent": sent, "ev_received": received,
            "ev_dropped_pct": round(100.0 * (sent - received) / sent, 1) if sent else None,
            "ev_per_s": round(received / span, 1) if span > 0 else None,
            "ev_offered_per_s": round(sent / stats["send_s"], 1), "ev_span_s": round(span, 3),
            "ev_other": other, "ev_warm_end_sent": stats["warm_sent"] + stats["end_sent"]}


def run_events(children: Children, endpoint_pub: str, bind: bool, sock: zmq.Socket, seconds: float) -> dict:
    go, done = children.ctx.Event(), children.ctx.Event()
    parent_end, child_end = children.ctx.Pipe(duplex=False)
    p = children.start(event_publisher, endpoint_pub, bind, seconds, go, done, child_end, name="ev-publisher")
    try:
        return count_events(sock, p, go, done, parent_end, seconds)
    finally:
        done.set()
        p.join(5)
        children.stop(p)


# --------------------------------------------------------------------------------------
# Where the hub's time goes: its Python work per request, in this process, no sockets


def _per_call_us(fn, n: int) -> float:
    """CPU µs per call of this thread (not wall time: ZeroMQ's I/O thread and other processes
    share the 2 cores, and waiting for a core is not the work's cost)."""
    for _ in range(min(200, n)):
        fn()
    t0 = time.thread_time()
    for _ in range(n):
        fn()
    return round((time.thread_time() - t0) / n * 1e6, 2)


def breakdown(ping_body: bytes, hb_bodies: list[bytes], quick: bool, tmp: Path) -> dict:
    """CPU µs per call of the hub's Python work, in this process, on a real Hub object.

    The Hub is set up here for real (its sockets bound under tmp/inproc, metrics off), so the
    handlers run with whatever attributes the hub has today. `_handle` is the hub's whole
    request path after the receive: envelope, parse, command table, command, encode, reply
    send; its replies go to a DEALER of ours (connected with a known routing id) and are
    drained outside the timed batches. What it does not include: the poll loop and the recv.
    """
    from services.hub import commands
    from services.hub.service import Hub as RealHub
    from services.runtime import config as configuration

    n = 2000 if quick else 10000
    out: dict = {}
    ev = protocol.encode_event(protocol.Event("bench.ev", EV_DATA, "bench@pub", 1, time.time(), 1))
    out["ev_parse_event_us"] = _per_call_us(lambda: protocol.parse_event(ev, 262144), n)
    out["ping_parse_request_us"] = _per_call_us(lambda: protocol.parse_request(ping_body, 262144), n)
    hb = hb_bodies[0]
    out["hb_json_loads_us"] = _per_call_us(lambda: json.loads(hb), n // 4)
    out["hb_parse_request_us"] = _per_call_us(lambda: protocol.parse_request(hb, 262144), n // 4)

    rundir = tmp / "inproc"
    cfg = configuration.loads(f'[box]\nruntime_dir = "{rundir}"\n[bus]\nprefix = "ctlbenchip{os.getpid()}"\n'
                              f'[hub]\nmetrics_listen = ""\n', env={})
    quiet = logging.getLogger("edgeroom")
    level, quiet.level = quiet.level, logging.CRITICAL
    hub = RealHub(cfg)
    hub.setup()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        dealer.linger = 0
        dealer.routing_id = b"bench-inproc"
        router = getattr(hub, "routers", [None])[0]
        dealer.connect(router.last_endpoint.decode())
        dealer.send_multipart([b"", ping_body])  # the ROUTER learns our routing id
        if not router.poll(2000):
            raise RuntimeError("the in-process hub's ROUTER got nothing")
        router.recv_multipart()

        def drain() -> None:
            while dealer.poll(0):
                dealer.recv_multipart()

        def handle_us(frames_list: list, total: int) -> float:
            k, done, spent = len(frames_list), 0, 0.0
            while done < total:
                batch = min(100, total - done)  # replies wait in our DEALER: stay under its HWM
                t0 = time.thread_time()
                for i in range(done, done + batch):
                    hub._handle(router, frames_list[i % k])
                spent += time.thread_time() - t0
                done += batch
                drain()
            return round(spent / total * 1e6, 2)

        env = [b"bench-inproc", b""]
        handle_us([env + [ping_body]], 200)
        out["ping_handle_us"] = handle_us([env + [ping_body]], n)
        hb_frames = [env + [b] for b in hb_bodies]
        handle_us(hb_frames, len(hb_frames))  # register every service (session started, state saved)
        out["hb_handle_us"] = handle_us(hb_frames, n // 4)
        hb_args = json.loads(hb)["args"]
        ctx = commands.Ctx(router, env[:1], "x")
        out["hb_command_us"] = _per_call_us(lambda: commands.TABLE["service.heartbeat"](hub, hb_args, ctx), n // 4)
        out["hb_book_update_us"] = _per_call_us(lambda: hub.book.update(hb_args["service"], hb_args["pid"],
                                                                        hb_args["sessions"]), n // 4)
        out["hb_rooms_us"] = _per_call_us(hub.book.rooms, n // 4)
        out["hb_store_snapshot_us"] = _per_call_us(lambda: hub.store_snapshot(hb_args["service"], hb_args["metrics"]),
                                                   n // 4)
        out["hb_book_save_ms"] = round(_per_call_us(hub.book.save, 20) / 1e3, 2)
        out["hb_services_registered"] = len(hb_frames)
    finally:
        dealer.close(linger=0)
        hub.teardown()
        hub.loop.close()
        quiet.level = level
    return out


# --------------------------------------------------------------------------------------
# The run


def run(args) -> tuple[dict, list[str], dict]:
    plan = QUICK if args.quick else FULL
    rows: dict[str, dict] = {p: {"path": p} for p in PATHS}
    notes: list[str] = []
    extra: dict = {}
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="erb", dir="/tmp"))  # short: ipc paths are limited to 107 bytes
    hub = None
    zsocks: list = []

    def attempt(path: str, what: str, fn, into: dict | None = None) -> dict | None:
        """Run one measurement; its figures go to rows[path] (or `into`); a failure is recorded."""
        t = time.monotonic()
        try:
            res = fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            rows[path].setdefault("failures", []).append(f"{what}: {e}")
            notes.append(f"{path} {what}: FAILED: {e}")
            log(f"   {path:8s} {what:12s} FAILED: {e}\n{traceback.format_exc()}")
            return None
        (rows[path] if into is None else into).update(res)
        log(f"   {path:8s} {what:12s} " + "  ".join(f"{k}={v}" for k, v in res.items())
            + f"  ({time.monotonic() - t:.1f} s)")
        return res

    def start_router(mode: str):
        ready = children.ctx.Event()
        ep = f"ipc://{tmp}/{mode}.sock"
        proc = children.start(router_server, ep, mode, ready, name=f"router-{mode}")
        if not ready.wait(10):
            raise RuntimeError(f"the {mode} server did not start")
        return ep, proc

    try:
        # bodies, made before any fork
        ping_body = protocol.encode_request("bench-1", "ping")
        families = snapshot(service_registry())
        hb_args = [heartbeat_args(i, families) for i in range(max(args.services))]
        hb_bodies_all = [protocol.encode_request(f"capture@cam{i:03d}-1", "service.heartbeat", a)
                         for i, a in enumerate(hb_args)]
        hb_json_all = [protocol.json_bytes(a) for a in hb_args]
        body_bytes = len(hb_bodies_all[0])
        for r in rows.values():
            r["hb_body_bytes"] = body_bytes
        rows["naive"]["hb_body_bytes"] = len(hb_json_all[0])
        n_fam = len(families)
        n_samples = sum(len(f["samples"]) for f in families)
        notes.append(f"heartbeat body: {body_bytes:,} bytes of JSON ({n_fam} metric families, "
                     f"{n_samples} samples, 1 session with 1 track); the naive row sends the same JSON "
                     f"without the envelope ({len(hb_json_all[0]):,} bytes)")

        log("-- starting the hub")
        hub = Hub(tmp, children)
        log(f"   hub pid {hub.pid}, control {hub.control}")

        # 1. round trips ------------------------------------------------------------------
        log(f"-- round trips ({plan.rt_n} sequential requests each)")
        ep, proc = start_router("echo")
        attempt("limit", "round trip", lambda: rt_zmq_raw(ep, ping_body, plan.rt_n, proc.pid))
        children.stop(proc)
        ep, proc = start_router("loop")
        extra["loop_echo"] = {}
        attempt("limit", "rt loop-echo", lambda: rt_zmq_raw(ep, ping_body, plan.rt_n, proc.pid),
                into=extra["loop_echo"])
        children.stop(proc)
        attempt("edgeroom", "round trip", lambda: rt_edgeroom(hub, plan.rt_n))
        parent_end, child_end = children.ctx.Pipe(duplex=False)
        httpd = children.start(http_server, child_end, name="httpd")
        if not parent_end.poll(10):
            raise RuntimeError("the HTTP server did not start")
        port = parent_end.recv()
        attempt("naive", "round trip", lambda: rt_http(port, plan.rt_n, httpd.pid))

        # 2. events ------------------------------------------------------------------------
        log(f"-- events ({plan.ev_s:g} s of publishing each)")
        pubsub_ep = f"ipc://{tmp}/pubsub.sock"
        sub = zmq.Context.instance().socket(zmq.SUB)
        zsocks.append(sub)
        sub.linger = 0
        sub.subscribe(b"")
        sub.connect(pubsub_ep)
        attempt("limit", "events", lambda: run_events(children, pubsub_ep, True, sub, plan.ev_s))
        sub.close()

        def hub_events() -> dict:
            before = hub.counters() or {}
            with Subscriber(hub.events, ["*"]) as s:
                s.wait_ready(hub.client)
                cpu0 = proc_cpu_s(hub.pid)
                res = run_events(children, hub.events_in, False, s.sock, plan.ev_s)
                cpu = proc_cpu_s(hub.pid) - cpu0
            after = hub.counters() or {}
            res["ev_hub_fanned_out"] = int(after.get("edgeroom_events_published", 0)
                                           - before.get("edgeroom_events_published", 0))
            res["ev_hub_rejected"] = int(after.get("edgeroom_events_rejected", 0)
                                         - before.get("edgeroom_events_rejected", 0))
            if res["ev_hub_fanned_out"]:
                res["ev_hub_cpu_us"] = round(cpu / res["ev_hub_fanned_out"] * 1e6, 1)
            return res

        attempt("edgeroom", "events", hub_events)

        # 3. heartbeats ----------------------------------------------------------------------
        s_main = args.services[-1]
        log(f"-- heartbeats ({plan.hb_n} each; the table's row with {s_main} service id(s))")
        ep, proc = start_router("ack")
        attempt("limit", "heartbeat", lambda: hb_pipelined(ep, hb_bodies_all[:s_main], plan.hb_n,
                                                            args.window, proc.pid))
        children.stop(proc)
        extra["heartbeat_scaling"] = []
        for s_count in args.services:
            before = hub.counters()
            res = attempt("edgeroom", f"hb x{s_count}",
                          lambda s_count=s_count: {**hb_pipelined(hub.control, hb_bodies_all[:s_count], plan.hb_n,
                                                                  args.window, hub.pid), "hb_services": s_count},
                          into=rows["edgeroom"] if s_count == s_main else {})
            after = hub.counters()
            if before is None or after is None:
                notes.append(f"edgeroom heartbeats x{s_count}: the hub did not answer `metrics` within 30 s")
            else:
                for key in ("edgeroom_control_replies_lost", "edgeroom_control_rejected"):
                    d = int(after.get(key, 0) - before.get(key, 0))
                    if d:
                        notes.append(f"edgeroom heartbeats x{s_count}: hub counter {key} went up by {d}")
            try:
                states = hub.states("capture@cam")
                if res:
                    res["hb_states_after"] = states
                if set(states) - {"ready"}:
                    notes.append(f"edgeroom heartbeats x{s_count}: after the run the hub has the bench services "
                                 f"in states {states}: it fell behind (each service's heartbeats came less often "
                                 f"than the hub's degraded/stale limits), and every state flip is more work")
                for i in range(s_count):  # say goodbye, so the hub does not turn them stale later
                    hub.client.call("service.bye", {"service": f"capture@cam{i:03d}", "pid": 400000 + i},
                                    timeout=30.0)
            except Exception as e:
                notes.append(f"edgeroom heartbeats x{s_count}: status/bye afterwards failed: {e}")
            if res:
                extra["heartbeat_scaling"].append({k: res.get(k) for k in (
                    "hb_services", "hb_per_s", "hb_server_cpu_us", "hb_register_s", "hb_states_after")})
        attempt("naive", "heartbeat", lambda: hb_http(port, hb_json_all[:s_main], max(500, plan.hb_n // 4),
                                                      httpd.pid))
        children.stop(httpd)

        # where the hub's time goes -------------------------------------------------------------
        log("-- the hub's Python work per request, in-process")
        try:
            extra["breakdown_us"] = breakdown(ping_body, hb_bodies_all[:s_main], args.quick, tmp)
            log("   " + "  ".join(f"{k}={v}" for k, v in extra["breakdown_us"].items()))
        except Exception as e:
            notes.append(f"in-process breakdown FAILED: {e}")
            log(traceback.format_exc())
        if hub.proc.poll() is not None:
            notes.append(f"the hub exited with {hub.proc.returncode} during the run")
        for line in hub.log().splitlines():
            if " warning " in line or " error " in line or "Traceback" in line:
                notes.append(f"hub log: {line.strip()[:200]}")
    finally:
        # a second Ctrl-C (or SIGTERM) must not cut the cleanup short: hold them until it is done
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for s in zsocks:
                s.close(linger=0)
            if hub is not None:
                hub.close()
            children.close()
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return rows, notes, extra


# --------------------------------------------------------------------------------------
# Report


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


COLUMNS = (("rt p50 µs", "rt_p50_us"), ("rt p99 µs", "rt_p99_us"), ("req/s", "rt_per_s"),
           ("srv CPU µs/req", "rt_server_cpu_us"), ("heartbeats/s", "hb_per_s"),
           ("srv CPU µs/hb", "hb_server_cpu_us"), ("services @ 1 Hz, 1 core", "hb_services_1hz"),
           ("hb body B", "hb_body_bytes"), ("events sent", "ev_sent"), ("events recv", "ev_received"),
           ("events/s", "ev_per_s"), ("dropped %", "ev_dropped_pct"))


def table(rows: dict) -> str:
    head = ["path"] + [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for p in PATHS:
        r = rows[p]
        cells = [p + (" (FAILED part)" if r.get("failures") else "")]
        for _, key in COLUMNS:
            v = r.get(key)
            cells.append(_fmt(v, 0) if key in ("rt_per_s", "hb_per_s", "ev_per_s") and v is not None else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading(rows: dict, extra: dict) -> list[str]:
    out = []
    lim, er, nv = rows["limit"], rows["edgeroom"], rows["naive"]
    le = extra.get("loop_echo") or {}
    b = extra.get("breakdown_us") or {}

    def ratio(a, b):
        return f"{a / b:.1f}x" if a and b else "?"

    if er.get("rt_p50_us") and lim.get("rt_p50_us"):
        out.append(f"round trip p50: edgeroom {er['rt_p50_us']} µs = {ratio(er['rt_p50_us'], lim['rt_p50_us'])} "
                   f"the raw ZeroMQ round trip ({lim['rt_p50_us']} µs)"
                   + (f"; HTTP {nv['rt_p50_us']} µs = {ratio(nv['rt_p50_us'], er['rt_p50_us'])} edgeroom's"
                      if nv.get("rt_p50_us") else ""))
    if er.get("rt_server_cpu_us") and lim.get("rt_server_cpu_us"):
        line = (f"CPU per ping: hub {er['rt_server_cpu_us']} µs, client {er.get('rt_client_cpu_us')} µs; "
                f"raw ROUTER echo {lim['rt_server_cpu_us']} µs (its DEALER client {lim.get('rt_client_cpu_us')} µs)")
        if le.get("rt_server_cpu_us"):
            line += (f"; the same echo run from the hub's Loop (zmq.Poller, NOBLOCK recv until Again) "
                     f"{le['rt_server_cpu_us']} µs, p50 {le.get('rt_p50_us')} µs")
        if b.get("ping_handle_us"):
            line += (f"; Hub._handle on a ping, in-process (envelope, parse_request {b['ping_parse_request_us']} µs, "
                     f"command, counter, encode_reply, the reply's send; no poll, no recv) {b['ping_handle_us']} µs")
        out.append(line)
    if b and er.get("hb_server_cpu_us"):
        hb = er["hb_server_cpu_us"]
        out.append(f"heartbeat: {hb} µs of hub CPU each with {er.get('hb_services')} services registered; "
                   f"in-process Hub._handle takes {b['hb_handle_us']} µs (the rest, ~{hb - b['hb_handle_us']:.0f} "
                   f"µs, is the recv, the loop and ZeroMQ's I/O thread): parse_request "
                   f"{b['hb_parse_request_us']} µs (json.loads alone {b['hb_json_loads_us']} µs) and the "
                   f"service.heartbeat command {b['hb_command_us']} µs, of which Hub.store_snapshot "
                   f"{b['hb_store_snapshot_us']} µs (checks and keeps the metrics snapshot) and "
                   f"SessionBook.update {b['hb_book_update_us']} µs (O(sessions)); session changes save the whole "
                   f"book once per hub tick: {b['hb_book_save_ms']} ms with {b['hb_services_registered']} "
                   f"sessions (SessionBook.rooms(), for `rooms`, costs {b['hb_rooms_us']} µs)")
    for s in extra.get("heartbeat_scaling", []):
        out.append(f"heartbeats with {s['hb_services']} distinct service(s) registered: {s['hb_per_s']:,.0f}/s, "
                   f"{s['hb_server_cpu_us']} µs hub CPU each, so {s['hb_services']} service(s) at 1 Hz cost "
                   f"{s['hb_services'] * s['hb_server_cpu_us'] / 1e4:.2f} % of a core (registering them one by one "
                   f"took {s['hb_register_s']} s; states after: {s.get('hb_states_after')})")
    if er.get("hb_services_1hz"):
        out.append(f"services @ 1 Hz for edgeroom: {er['hb_services_1hz']:,} ({er.get('hb_services_1hz_basis')})")
    if er.get("ev_per_s") and lim.get("ev_per_s"):
        out.append(f"events: edgeroom delivers {er['ev_per_s']:,.0f}/s, "
                   f"{100 * er['ev_per_s'] / lim['ev_per_s']:.0f} % of the raw PUB->SUB {lim['ev_per_s']:,.0f}/s"
                   f"; the hub spends {er.get('ev_hub_cpu_us', '?')} µs of CPU per event"
                   + (f" (a ceiling of ~{1e6 / er['ev_hub_cpu_us']:,.0f}/s on a core of its own), of which "
                      f"protocol.parse_event is {b.get('ev_parse_event_us', '?')} µs, the rest XSUB recv, XPUB send "
                      f"and the loop" if er.get("ev_hub_cpu_us") else ""))
    if er.get("ev_hub_fanned_out") is not None and er.get("ev_sent"):
        fan = er["ev_hub_fanned_out"]
        out.append(f"events through the hub: {er['ev_sent']:,} sent, {fan:,} fanned out by the hub (all topics, "
                   f"warm-up/end frames included), {er['ev_received']:,} bench events received: "
                   f"~{er['ev_sent'] - fan:,} dropped before the hub took them (the publisher's PUB and the "
                   f"hub's XSUB queues), ~{max(0, fan - er['ev_received']):,} between the hub's XPUB and the "
                   f"subscriber; malformed: {er.get('ev_hub_rejected')}")
    return out


def code_version() -> str:
    """The commit and whether services/ differs from it (read-only git; no index refresh)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--", "services"],
                               cwd=_ROOT, capture_output=True, text=True, timeout=5).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or '?'}" + (f" + uncommitted changes in {len(dirty)} file(s) under services/" if dirty else "")


def report(rows: dict, notes: list[str], extra: dict, plan_name: str, elapsed: float, load: tuple) -> str:
    parts = [f"## control-plane benchmark ({plan_name}, {elapsed:.0f} s, code {code_version()}, "
             f"{os.cpu_count()} CPUs, "
             f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start, "
             f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()})",
             "", table(rows), "", "## reading", ""]
    parts += [f"- {line}" for line in reading(rows, extra)]
    parts += ["", "## notes", ""]
    parts += [
        "- rt: sequential request/reply; limit = DEALER -> ROUTER echo in another process over ipc://, no parsing; "
        "edgeroom = Client.call('ping') against a real hub process; naive = POST /ping to ThreadingHTTPServer "
        "(keep-alive, TCP_NODELAY) with http.client.",
        "- srv CPU: the server process's CPU time over the loop / requests, all its threads (ZeroMQ's I/O thread "
        "included), from /proc/PID/task/*/schedstat; the client's own CPU per request is in the JSON.",
        "- heartbeats: limit and edgeroom pipelined on one DEALER (window in the JSON), limit answering a fixed "
        "reply without parsing; naive sequential (http.client does not pipeline). services @ 1 Hz, 1 core: how many "
        "services heartbeating once a second one core of the server absorbs, from its CPU per heartbeat (the hub's "
        "grows with the services it knows: see the reading).",
        "- events: publisher child blasts pre-encoded frames for a fixed time; PUB/XSUB/XPUB drop at their "
        "high-water marks by design; events/s = received / (last - first arrival). naive: HTTP has no fan-out.",
        f"- {os.cpu_count()} CPUs shared by the client, the server and (events) the publisher: on a small "
        "machine the client's own Python competes with the server, so the rates are end-to-end, not the "
        "server's alone (its CPU per request is).",
    ]
    parts += [f"- {n}" for n in notes]
    return "\n".join(parts)


def services_at_1hz(rows: dict, extra: dict) -> None:
    """How many services heartbeating at 1 Hz one core of the server absorbs: S with S * c(S) = 1 s.

    c(S), the server's CPU per heartbeat, is constant for the limit and the naive server (they
    keep no state); for the hub it grows with the services registered, so c(S) = a + k*S is
    fitted to the heartbeat runs at different service counts (--services) when there are two.
    """
    for p in ("limit", "naive"):
        c = rows[p].get("hb_server_cpu_us")
        if c:
            rows[p]["hb_services_1hz"] = int(1e6 / c)
            rows[p]["hb_services_1hz_basis"] = "1e6 / CPU µs per heartbeat"
    pts = [(s["hb_services"], s["hb_server_cpu_us"]) for s in extra.get("heartbeat_scaling", [])
           if s.get("hb_server_cpu_us")]
    er = rows["edgeroom"]
    if len({x for x, _ in pts}) >= 2:
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        k = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        a = my - k * mx
        if k > 0:
            er["hb_services_1hz"] = int((-a + (a * a + 4 * k * 1e6) ** 0.5) / (2 * k))
            er["hb_services_1hz_basis"] = (f"S * c(S) = 1 core, with c(S) = {a:.1f} + {k:.3f} * S µs fitted to the "
                                           f"runs at {', '.join(str(x) for x, _ in pts)} services; steady state "
                                           f"only: registering, ending or staling sessions costs more")
            return
    if er.get("hb_server_cpu_us"):
        er["hb_services_1hz"] = int(1e6 / er["hb_server_cpu_us"])
        er["hb_services_1hz_basis"] = f"1e6 / CPU µs per heartbeat at {er.get('hb_services')} services"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short phases (ends within ~40 s)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    ap.add_argument("--services", default="1,200",
                    help="comma-separated counts of distinct service ids for the heartbeat phase; the last "
                         "one is the table's (default 1,200; up to 999, but past a few hundred the hub "
                         "takes minutes: see the notes it prints)")
    ap.add_argument("--window", type=int, default=64, help="heartbeats in flight (default 64, max 500)")
    args = ap.parse_args(argv)
    try:
        args.services = [int(x) for x in args.services.split(",") if x.strip()]
        if not args.services or min(args.services) < 1 or max(args.services) > 999:
            raise ValueError
    except ValueError:
        ap.error("--services: comma-separated integers 1..999")
    if not 1 <= args.window <= 500:
        ap.error("--window: 1..500")

    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    load = os.getloadavg()
    try:
        rows, notes, extra = run(args)
    except KeyboardInterrupt:
        log("interrupted: every child stopped, temp dir removed")
        return 130
    services_at_1hz(rows, extra)
    code = code_version()
    for r in rows.values():
        r["code"] = code
        r["cpus"] = os.cpu_count()
        r["loadavg_start"] = [round(x, 2) for x in load]
    notes.append(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    name = "quick" if args.quick else "full"
    text = report(rows, notes, extra, name, time.monotonic() - t0, load)
    print(text, flush=True)
    if args.json:
        out = [rows[p] for p in PATHS]
        keys = sorted({k for r in out for k in r} - {"path"})
        out = [{"path": r["path"], **{k: r.get(k) for k in keys}} for r in out]  # null where not measured
        out[0] = {**out[0], "rt_loop_echo": extra.get("loop_echo")}
        out[1] = {**out[1], "heartbeat_scaling": extra.get("heartbeat_scaling"),
                  "breakdown_us": extra.get("breakdown_us")}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failures") for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
