"""Unit tests of the service runtime's parts: sd_notify, scrubbing, logs, the loop and metrics."""
from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from types import SimpleNamespace

import prometheus_client
import pytest
from prometheus_client import Counter, Gauge, Histogram

from services.runtime import logs
from services.runtime.loop import Loop
from services.runtime.metrics import BoxCollector, new_registry, snapshot
from services.runtime.notify import Notifier
from services.runtime.scrub import StderrTail, scrub

# --- Notifier --------------------------------------------------------------------------------


@pytest.fixture
def receiver():
    """A bound AF_UNIX datagram socket, as systemd's notify socket: (socket, path)."""
    tmp = tempfile.mkdtemp(prefix="ern", dir="/tmp")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)
    yield sock, path
    sock.close()
    shutil.rmtree(tmp, ignore_errors=True)


def fields(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def nothing_waiting(sock: socket.socket) -> bool:
    """True if no datagram is queued (a datagram sent on AF_UNIX is queued before sendto returns)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def test_ready_with_mainpid_and_status(receiver):
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        n.ready("listening")
        assert fields(sock) == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=listening"]
        n.ready()
        assert fields(sock) == ["READY=1", f"MAINPID={os.getpid()}"]
        n.status("3 streams")
        assert fields(sock) == ["STATUS=3 streams"]
        n.stopping("bye")
        assert fields(sock) == ["STOPPING=1", "STATUS=bye"]
        n.stopping()
        assert fields(sock) == ["STOPPING=1"]
        n.reloading()
        got = fields(sock)
        assert got[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=\d+", got[1])
        assert n.failures == 0
    finally:
        n.close()


def test_watchdog_interval_and_ping_only_when_due(receiver):
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    try:
        assert n.interval == 1.5
        assert n.watchdog_due(100.0)
        n.ping(100.0)
        assert fields(sock) == ["WATCHDOG=1"]
        assert not n.watchdog_due(101.4)
        n.ping(101.4)
        assert nothing_waiting(sock)
        n.ping(101.5)
        assert fields(sock) == ["WATCHDOG=1"]
        n.ping(101.6)
        assert nothing_waiting(sock)
    finally:
        n.close()


def test_watchdog_without_pid_applies_to_us():
    assert Notifier({"WATCHDOG_USEC": "1000000"}).interval == 0.5


@pytest.mark.parametrize("env", [
    {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)},
    {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"},
    {"WATCHDOG_USEC": ""},
    {"WATCHDOG_USEC": "-5"},
    {"WATCHDOG_USEC": "abc"},
    {"WATCHDOG_USEC": "0"},
    {},
])
def test_watchdog_disabled(receiver, env):
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path, **env})
    try:
        assert n.interval == 0.0
        assert not n.watchdog_due(1e9)
        n.ping(1e9)
        assert nothing_waiting(sock)
    finally:
        n.close()


def test_no_notify_socket_is_a_no_op():
    n = Notifier({})
    assert n.sock is None
    assert n.send("READY=1") is False
    n.ready("x")
    n.status("x")
    n.stopping()
    n.reloading()
    n.ping(0.0)
    assert n.failures == 0
    n.close()


def test_environment_is_the_default(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier()
    assert n.sock is None and n.interval == 0.0


def test_abstract_socket():
    name = f"edgeroom-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.address == "\0" + name
        assert n.send("READY=1", "STATUS=abstract") is True
        assert fields(sock) == ["READY=1", "STATUS=abstract"]
    finally:
        n.close()
        sock.close()


def test_vanished_receiver_counts_failures(receiver):
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        assert n.send("STATUS=up") is True
        assert fields(sock) == ["STATUS=up"]
        sock.close()
        assert n.send("STATUS=gone") is False       # socket file there, nobody bound: refused
        assert n.failures == 1
        os.unlink(path)
        n.ready("still here")                       # no socket file at all: does not raise
        n.stopping()
        assert n.failures == 3
    finally:
        n.close()


# --- scrub -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Opening rtsp://admin:hunter2@10.0.0.5:554/stream1 failed",
     "Opening rtsp://admin:***@10.0.0.5:554/stream1 failed"),
    ("http://u:p@h/ and https://user:pa:ss@host/x", "http://u:***@h/ and https://user:***@host/x"),
    ("db password=hunter2 user=bob", "db password=*** user=bob"),
    ("Password = hunter2", "Password = ***"),
    ("token: abc123def", "token: ***"),
    ("TOKEN=xyz&next=1", "TOKEN=***&next=1"),
    ("api_key=AKIA123 region=eu", "api_key=*** region=eu"),
    ("apikey:zzz api-key=yyy", "apikey:*** api-key=***"),
    ('{"password": "hunter2", "user": "bob"}', '{"password": "***", "user": "bob"}'),
    ("secret=s3cr3t;", "secret=***;"),
    ("Authorization: Bearer eyJhbGciOi.abc.def", "Authorization: Bearer ***"),
    ("authorization=Basic dXNlcjpwYXNz", "authorization=Basic ***"),
    ("using key sk-abcdefgh12345678XYZ now", "using key sk-abcdefgh*** now"),
    ("key=AIzaSyA1234567890abcdefghijklmnopqrstu end", "key=AIzaSyA1*** end"),
])
def test_scrub_secrets(text, expected):
    assert scrub(text) == expected


@pytest.mark.parametrize("text", [
    "frame=  100 fps= 25 q=28.0 size=    512kB time=00:00:04.00 bitrate=1048.6kbits/s",
    "rtsp://10.0.0.5:554/stream1 opened",
    "http://example.com/a@b",
    "user bob logged in; passwords rotate weekly",
    "sk-short and AIzaShort",
    "",
])
def test_scrub_leaves_clean_text_alone(text):
    assert scrub(text) == text


@pytest.mark.parametrize("text, secret", [
    ("GET https://api.example.com/v1?access_token=abc123 200", "abc123"),
    ("env DB_PASSWORD=hunter2", "hunter2"),
    ("password='hunter2'", "hunter2"),
])
def test_scrub_catches_suffixed_names_and_quoted_values(text, secret):
    assert secret not in scrub(text)


def test_stderr_tail_bounded_and_dropped():
    tail = StderrTail(max_lines=3, max_line=100)
    assert tail.feed("l1\nl2\n") == ["l1", "l2"]
    assert tail.dropped == 0
    assert tail.feed("l3\nl4\nl5\n") == ["l3", "l4", "l5"]
    assert list(tail.lines) == ["l3", "l4", "l5"]
    assert tail.dropped == 2
    assert tail.text() == "l3\nl4\nl5"


def test_stderr_tail_cuts_long_lines():
    tail = StderrTail(max_lines=10, max_line=5)
    assert tail.feed("abcdefghij\nxy\n") == ["abcde", "xy"]


def test_stderr_tail_joins_partial_lines():
    tail = StderrTail(max_lines=10, max_line=100)
    assert tail.feed("hel") == []
    assert tail.feed("lo wor") == []
    assert tail.feed("ld\nnext") == ["hello world"]
    assert tail.feed("\n") == ["next"]
    assert tail.feed("a\r\n\n") == ["a\r", ""]
    assert list(tail.lines) == ["hello world", "next", "a\r", ""]


def test_stderr_tail_flushes_an_overlong_partial():
    tail = StderrTail(max_lines=10, max_line=4)
    assert tail.feed("abcdefg") == []          # held: a newline may still come
    assert tail.feed("\n") == ["abcd"]
    assert tail.feed("x" * 17) == ["xxxx"]     # over 4 x max_line with no newline: flushed, cut
    assert tail.feed("yyy\nz\n") == ["z"]      # the rest of that line is dropped, not a new line


def test_stderr_tail_scrubs_including_across_feeds():
    tail = StderrTail()
    assert tail.feed("[rtsp] open rtsp://admin:hun") == []
    assert tail.feed("ter2@cam/1 failed\n") == ["[rtsp] open rtsp://admin:***@cam/1 failed"]
    assert "hunter2" not in tail.text()


def test_stderr_tail_scrubs_before_cutting():
    line = "error opening rtsp://admin:hunter2@camera.local/stream"
    tail = StderrTail(max_line=line.index("@"))
    out = tail.feed(line + "\n")
    assert "hunter2" not in out[0]


# --- logs ------------------------------------------------------------------------------------

@pytest.fixture
def root_logging(monkeypatch):
    """Restore the root logger's handlers and level after logs.setup() replaced them."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def out_lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_text_format(root_logging, capsys):
    logs.setup("capture@cam1", "info")
    logging.getLogger("edgeroom.x").info("hello %s", "there")
    logging.getLogger("edgeroom.x").debug("hidden")
    logging.getLogger("edgeroom.x").warning("careful")
    lines = out_lines(capsys)
    assert len(lines) == 2
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} info    capture@cam1: hello there", lines[0]), lines[0]
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} warning capture@cam1: careful", lines[1]), lines[1]
    assert len(root_logging.handlers) == 1


def test_setup_twice_replaces_the_handler(root_logging, capsys):
    logs.setup("a")
    logs.setup("b", "debug")
    logging.getLogger("t").debug("once")
    lines = out_lines(capsys)
    assert len(lines) == 1 and lines[0].endswith("debug   b: once")
    assert root_logging.level == logging.DEBUG


def test_journald_priorities(root_logging, capsys, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    logs.setup("hub", "debug")
    log = logging.getLogger("edgeroom.hub")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert out_lines(capsys) == ["<7>debug: d", "<6>info: i", "<4>warning: w", "<3>error: e", "<2>critical: c"]


def test_json_format(root_logging, capsys):
    logs.setup("vision", "info", fmt="json")
    before = time.time()
    logging.getLogger("edgeroom.vision").error("boom\nsecond line")
    lines = out_lines(capsys)
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert set(obj) == {"time", "level", "service", "logger", "msg"}
    assert (obj["level"], obj["service"], obj["logger"], obj["msg"]) == (
        "error", "vision", "edgeroom.vision", "boom | second line")
    assert before - 1 <= obj["time"] <= time.time() + 1


def test_multi_line_message_and_exception_become_one_line(root_logging, capsys):
    logs.setup("hub")
    log = logging.getLogger("edgeroom.hub")
    log.info("first\nsecond\nthird")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        log.exception("failed\nbadly")
    lines = out_lines(capsys)
    assert len(lines) == 2
    assert lines[0].endswith("hub: first | second | third")
    assert "hub: failed | badly | Traceback (most recent call last): | " in lines[1]
    assert lines[1].endswith("RuntimeError: kaput")


def test_setup_binds_stdout_at_call_time(root_logging, monkeypatch):
    import io

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    logs.setup("svc")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    logging.getLogger("t").info("to the first stream")
    assert buf.getvalue().endswith("svc: to the first stream\n")


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def throttled_logger():
    log = logging.getLogger(f"edgeroom.test.throttled.{uuid.uuid4().hex}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    handler = ListHandler()
    log.addHandler(handler)
    yield log, handler
    log.removeHandler(handler)


def test_throttled_once_per_interval_with_count(throttled_logger, monkeypatch):
    log, handler = throttled_logger
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(logs, "time", SimpleNamespace(monotonic=lambda: clock.now, strftime=time.strftime,
                                                      localtime=time.localtime))
    t = logs.Throttled(log, every=5.0)
    t.warning("drop", "frame dropped")                # first one: reported at once
    for dt in (0.1, 1.0, 4.9):
        clock.now = 1000.0 + dt
        t.warning("drop", "frame dropped")            # within the interval: counted only
    t.warning("other", "queue full")                  # keys are throttled separately
    assert handler.messages == ["frame dropped", "queue full"]
    clock.now = 1005.0
    t.warning("drop", "frame dropped")
    assert handler.messages[-1] == "frame dropped (4 since last report)"
    clock.now = 1010.0
    t.warning("drop", "frame dropped")
    assert handler.messages[-1] == "frame dropped"    # just this one since the last report
    assert len(handler.messages) == 4


# --- Loop ------------------------------------------------------------------------------------

@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


def test_call_later_runs_in_time_order(loop):
    order = []
    loop.call_later(0.03, lambda: order.append("c"))
    loop.call_later(0.01, lambda: order.append("a"))
    loop.call_later(0.02, lambda: order.append("b"))
    loop.call_later(0.0, lambda: order.append("now"))
    loop.call_later(0.04, loop.stop)
    start = time.monotonic()
    loop.run()
    assert order == ["now", "a", "b", "c"]
    assert 0.04 <= time.monotonic() - start < 2.0


def test_call_at_same_time_keeps_insertion_order(loop):
    order = []
    when = time.monotonic() - 1.0
    for i in range(5):
        loop.call_at(when, lambda i=i: order.append(i))
    loop.call_at(when - 1.0, lambda: order.append("earliest"))
    loop.run_once(cap=0.0)
    assert order == ["earliest", 0, 1, 2, 3, 4]
    assert loop.timers == []


def test_every_repeats(loop):
    ticks = []

    def tick():
        ticks.append(time.monotonic())
        if len(ticks) == 3:
            loop.stop()

    loop.every(0.01, tick)
    loop.run()
    assert len(ticks) == 3
    assert all(b - a >= 0.009 for a, b in zip(ticks, ticks[1:]))
    assert len(loop.timers) == 1  # the next tick is already scheduled


def test_turn_hooks_run_every_turn(loop):
    seen = []
    loop.turn_hooks.append(seen.append)
    loop.run_once(cap=0.0)
    loop.run_once(cap=0.0)
    assert len(seen) == 2 and seen[0] <= seen[1]


def test_reader_on_a_socketpair(loop):
    a, b = socket.socketpair()
    got = []
    try:
        loop.add_reader(a.fileno(), lambda: got.append(a.recv(100)))
        loop.run_once(cap=0.0)
        assert got == []
        b.send(b"ping")
        loop.run_once(cap=5.0)   # returns as soon as the fd is readable
        assert got == [b"ping"]
        loop.remove_reader(a.fileno())
        loop.remove_reader(a.fileno())  # twice is harmless
        b.send(b"again")
        loop.run_once(cap=0.0)
        assert got == [b"ping"]
    finally:
        a.close()
        b.close()


def test_signal_through_the_loop():
    loop = Loop()
    got = []
    try:
        loop.on_signal(signal.SIGUSR1, got.append)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5.0
        while not got and time.monotonic() < deadline:
            loop.run_once(cap=5.0)  # wakes on the signal's byte on the wakeup fd
        assert got == [signal.SIGUSR1]
    finally:
        loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.set_wakeup_fd(-1) == -1  # close() released the wakeup fd


# --- metrics ---------------------------------------------------------------------------------

def service_registry(frames: float, fps: float, latency: float):
    reg = new_registry()
    Counter("edgeroom_frames", "Frames seen.", registry=reg).inc(frames)
    Gauge("edgeroom_fps", "Frames per second.", ["stream"], registry=reg).labels(stream="cam1").set(fps)
    Histogram("edgeroom_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=reg).observe(latency)
    return reg


def test_snapshot_families():
    snap = snapshot(service_registry(3, 25.0, 0.5))
    json.dumps(snap)  # JSON-able as the heartbeat carries it
    by_name = {f["name"]: f for f in snap}
    assert set(by_name) == {"edgeroom_frames", "edgeroom_fps", "edgeroom_latency_seconds"}
    assert by_name["edgeroom_frames"] == {"name": "edgeroom_frames", "type": "counter", "help": "Frames seen.",
                                          "samples": [["edgeroom_frames_total", {}, 3.0]]}
    assert by_name["edgeroom_fps"]["type"] == "gauge"
    assert by_name["edgeroom_fps"]["samples"] == [["edgeroom_fps", {"stream": "cam1"}, 25.0]]
    hist = by_name["edgeroom_latency_seconds"]
    assert hist["type"] == "histogram"
    assert hist["samples"] == [
        ["edgeroom_latency_seconds_bucket", {"le": "0.1"}, 0.0],
        ["edgeroom_latency_seconds_bucket", {"le": "1.0"}, 1.0],
        ["edgeroom_latency_seconds_bucket", {"le": "+Inf"}, 1.0],
        ["edgeroom_latency_seconds_count", {}, 1.0],
        ["edgeroom_latency_seconds_sum", {}, 0.5],
    ]


def test_snapshot_drops_non_finite_values():
    reg = new_registry()
    Gauge("edgeroom_g", "G.", registry=reg).set(float("nan"))
    Gauge("edgeroom_h", "H.", registry=reg).set(float("inf"))
    assert [f["samples"] for f in snapshot(reg)] == [[], []]


def scrape(collector: BoxCollector) -> str:
    reg = prometheus_client.CollectorRegistry()
    reg.register(collector)
    return prometheus_client.generate_latest(reg).decode()


def test_box_collector_merges_services():
    box = BoxCollector()
    box.snapshots = {"capture@cam1": snapshot(service_registry(3, 25.0, 0.5)),
                     "vision": snapshot(service_registry(7, 12.5, 2.0))}
    text = scrape(box)
    for family, typ in (("edgeroom_frames_total", "counter"), ("edgeroom_fps", "gauge"),
                        ("edgeroom_latency_seconds", "histogram")):
        assert text.count(f"# HELP {family} ") == 1, text
        assert text.count(f"# TYPE {family} {typ}\n") == 1, text
    assert 'edgeroom_frames_total{service="capture@cam1"} 3.0' in text
    assert 'edgeroom_frames_total{service="vision"} 7.0' in text
    assert 'edgeroom_fps{service="capture@cam1",stream="cam1"} 25.0' in text
    assert 'edgeroom_fps{service="vision",stream="cam1"} 12.5' in text
    assert 'edgeroom_latency_seconds_bucket{le="+Inf",service="vision"} 1.0' in text
    assert 'edgeroom_latency_seconds_sum{service="capture@cam1"} 0.5' in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(samples) == 2 * (1 + 1 + 5)
    assert all('service="' in line for line in samples)


def fam(name="edgeroom_x", typ="gauge", samples=None, help="X."):
    return {"name": name, "type": typ, "help": help, "samples": samples if samples is not None else [[name, {}, 1]]}


def collected(box: BoxCollector) -> dict:
    return {m.name: m for m in box.collect()}


def test_box_collector_skips_foreign_and_malformed_families():
    box = BoxCollector()
    box.snapshots = {"a": [fam("python_gc_objects"), fam("process_cpu"), fam("edgeroom_ok"),
                           fam("edgeroom_badtype", typ="weird"), {"name": "edgeroom_nosamples", "type": "gauge"},
                           fam("edgeroom_samples_not_list", samples={}), "not a dict", None, {"name": 5}]}
    assert list(collected(box)) == ["edgeroom_ok"]
    text = scrape(box)
    assert "python_gc_objects" not in text and "process_cpu" not in text
    assert 'edgeroom_ok{service="a"} 1.0' in text


def test_box_collector_skips_invalid_samples():
    box = BoxCollector()
    box.snapshots = {"a": [fam("edgeroom_x", samples=[
        ["edgeroom_x", {"bad-name": "v"}, 1],
        ["edgeroom_x", {"1abc": "v"}, 1],
        ["edgeroom_x", {"k": 1}, 1],
        ["edgeroom_x", {"k": None}, 1],
        ["edgeroom_x", {}, True],
        ["edgeroom_x", {}, "1"],
        ["edgeroom_x", {}, None],
        ["edgeroom_x", {"k": "v"}],
        ["bad name", {}, 1],
        [5, {}, 1],
        ["edgeroom_x", ["k"], 1],
        "edgeroom_x 1",
        ["edgeroom_x", {"k": "good"}, 2],
        ["edgeroom_x", {}, 3.5],
    ])]}
    m = collected(box)["edgeroom_x"]
    assert [(s.name, s.labels, s.value) for s in m.samples] == [
        ("edgeroom_x", {"service": "a", "k": "good"}, 2),
        ("edgeroom_x", {"service": "a"}, 3.5),
    ]
    scrape(box)  # renders


def test_box_collector_type_conflict_keeps_the_first():
    box = BoxCollector()
    box.snapshots = {"b": [fam("edgeroom_x", typ="gauge", samples=[["edgeroom_x", {}, 2]])],
                     "a": [fam("edgeroom_x", typ="counter", samples=[["edgeroom_x_total", {}, 1]])]}
    m = collected(box)["edgeroom_x"]
    assert m.type == "counter"  # services are merged in sorted order: "a" first
    assert [(s.name, s.labels["service"]) for s in m.samples] == [("edgeroom_x_total", "a")]
    text = scrape(box)
    assert "# TYPE edgeroom_x_total counter" in text and "gauge" not in text
    assert 'service="b"' not in text


def test_box_collector_inner_service_label_wins():
    box = BoxCollector()
    box.snapshots = {"hub": [fam("edgeroom_service_up", samples=[
        ["edgeroom_service_up", {"service": "capture@cam1"}, 1],
        ["edgeroom_service_up", {}, 1],
    ])]}
    m = collected(box)["edgeroom_service_up"]
    assert [s.labels for s in m.samples] == [{"service": "capture@cam1"}, {"service": "hub"}]
    text = scrape(box)
    assert 'edgeroom_service_up{service="capture@cam1"} 1.0' in text
    assert 'edgeroom_service_up{service="hub"} 1.0' in text


def test_box_collector_empty_and_missing_help():
    box = BoxCollector()
    assert list(box.collect()) == []
    family = fam("edgeroom_h")
    del family["help"]
    box.snapshots = {"a": [family]}
    assert collected(box)["edgeroom_h"].documentation == ""
    assert "# HELP edgeroom_h \n" in scrape(box)


def test_an_async_loop_closed_right_after_a_task_finished_closes_cleanly():
    """A task done but still in the loop's set (its done-callback not yet run) once made close() hand asyncio.wait
    an empty set, and the service exit with status 1 ("Set of Tasks/Futures is empty")."""

    from services.runtime.aioloop import AsyncLoop
    loop = AsyncLoop()

    async def quick() -> None:
        return None

    task = loop.spawn(quick())
    loop.aio.call_soon(loop.aio.stop)                    # the loop stops in the turn the task finishes in:
    loop.aio.run_forever()                               # its done-callback is left for the next turn
    assert task.done() and loop._tasks
    loop.close()                                         # raised ValueError before the fix
    assert loop.aio.is_closed()
