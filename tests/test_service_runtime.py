"""The service runtime as systemd sees it: sd_notify datagrams on a real socket, a stuck loop
that stops pinging, SIGTERM within the bound, a bad config's exit status."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.appliance import metric_value, wait_for

HERE = Path(__file__).parent


def notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    return sock


def datagrams(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    out = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            break
    return out


@pytest.mark.parametrize("flavour", ["plain", "asyncio"])
def test_watchdog_pings_come_from_the_main_loop_and_stop_while_it_is_stuck(box, flavour):
    """The same for a service on asyncio (AsyncService): a coroutine that blocks stops the pings."""
    b = box()
    sock = notify_socket(b.dir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(b.dir / "notify.sock"), "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen([sys.executable, str(HERE / "stuckservice.py"), str(b.config), "1.0", "1.5", flavour],
                            env=env, stdout=subprocess.DEVNULL)
    try:
        ready_at = None
        while ready_at is None:
            msg = sock.recv(4096).decode()
            if "READY=1" in msg:
                ready_at = time.monotonic()
                assert f"MAINPID={proc.pid}" in msg
        got = datagrams(sock, ready_at + 3.5)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(timeout=5) == 0
        stop_took = time.monotonic() - t0
        tail = datagrams(sock, time.monotonic() + 0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    pings = [t for t, m in got if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 8, got
    assert max(gaps) >= 1.4, f"pings went on while the loop was stuck: gaps {gaps}"
    assert sorted(gaps)[len(gaps) // 2] < 0.2, f"pings must come every ~0.1 s (half of WATCHDOG_USEC): {gaps}"
    assert stop_took < 2
    assert any(m.startswith("STOPPING=1") for _, m in tail + got)


def test_bad_config_exits_78_and_names_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[hub]\nheartbeat_intervall = 1\n")
    out = subprocess.run([sys.executable, "-m", "services.cli", "service", "hub", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 78
    assert "hub.heartbeat_intervall: unknown key" in out.stderr
    check = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(cfg)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 2 and "hub.heartbeat_intervall: unknown key" in check.stderr
    ok = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(HERE.parent / "config" /
                         "edgeroom.toml")], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "runs hub, capture@synthetic" in ok.stdout


CRASH_AFTER_STOPPING = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for msg in (b"READY=1", b"STOPPING=1"):
    s.sendto(msg, os.environ["NOTIFY_SOCKET"])
sys.exit(int(sys.argv[1]))
"""


def _settings(**over):
    from types import SimpleNamespace
    base = dict(restart="on-failure", restart_sec=0.05, restart_max_sec=1.0, healthy_sec=2.0, start_limit_burst=3,
                start_limit_interval=30.0, start_timeout=5.0, stop_timeout=1.0, watchdog_sec=0.0, nice=0)
    return SimpleNamespace(**{**base, **over})


def _drive(child, until, timeout=10.0):
    """Run a Child's supervision steps the way the supervisor's loop does, until `until(child)`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(child):
        now = time.monotonic()
        child.read_notify(now)
        if not child.reap(now, shutting_down=False):
            child.check(now)
        if child.state in ("inactive", "waiting") and now >= child.next_start and child.state != "failed":
            if child.state == "waiting":
                child.start(now)
        time.sleep(0.01)
    return child


def _crasher(tmp_path, status: int, **settings):
    from services.supervisor.child import Child

    class Crasher(Child):
        def command(self):
            return [sys.executable, "-c", CRASH_AFTER_STOPPING, str(status)]

    return Crasher("capture", "x", _settings(**settings), tmp_path, dict(os.environ))


def test_a_crash_is_a_failure_even_after_stopping_and_the_start_limit_ends_it(tmp_path):
    child = _crasher(tmp_path, 1)
    child.start(time.monotonic())
    _drive(child, lambda c: c.state == "failed")
    assert child.state == "failed"
    assert child.restarts == 2 and len(child.starts) == 3  # three starts allowed, then given up
    assert child.failures_in_row == 3
    child.close()


def test_exit_78_bad_config_is_not_restarted(tmp_path):
    child = _crasher(tmp_path, 78)
    child.start(time.monotonic())
    _drive(child, lambda c: c.popen is None and c.state != "starting")
    assert child.state == "failed" and child.restarts == 0
    child.close()


def test_a_clean_exit_is_not_restarted_under_on_failure_but_is_under_always(tmp_path):
    clean = _crasher(tmp_path, 0)
    clean.start(time.monotonic())
    _drive(clean, lambda c: c.popen is None and c.state != "starting")
    assert clean.state == "inactive" and clean.restarts == 0
    clean.close()
    again = _crasher(tmp_path, 0, restart="always")
    again.start(time.monotonic())
    _drive(again, lambda c: c.restarts >= 1)
    assert again.restarts >= 1 and again.failures_in_row == 0  # no backoff growth for clean exits
    if again.popen is not None:
        again.popen.wait()
    again.close()


def test_a_childs_stderr_is_kept_bounded_and_scrubbed(tmp_path, capfd):
    from services.supervisor.child import Child

    class Leaky(Child):
        def command(self):
            return [sys.executable, "-c", "import sys\nfor i in range(300): print(f'line {i}', file=sys.stderr)\n"
                    "print('open rtsp://admin:hunter2@cam.local/1 failed; api_key=sk-abcdefghijklmnop', "
                    "file=sys.stderr)\nsys.exit(3)"]

    child = Leaky("capture", "leaky", _settings(restart="no"), tmp_path, dict(os.environ))
    child.start(time.monotonic())
    _drive(child, lambda c: c.popen is None and c.state != "starting")
    err = capfd.readouterr().err
    assert "hunter2" not in err and "abcdefghijklmnop" not in err and "hunter2" not in child.tail.text()
    assert "capture@leaky stderr: open rtsp://admin:***@cam.local/1 failed" in err
    assert len(child.tail.lines) == 200 and child.tail.dropped == 101  # 301 lines, the last 200 kept
    assert child.tail.lines[-1].startswith("open rtsp://admin:***@")
    child.close()


def test_a_service_on_asyncio_heartbeats_answers_from_coroutines_reloads_and_stops(box):
    """AsyncService keeps the base's semantics: ready, heartbeats the hub (its status shows), a
    command answered by a coroutine while its own task keeps running, SIGHUP reloads, SIGTERM stops
    cleanly with exit 0."""
    b = box()
    b.spawn("service", "hub")
    b.wait_ready()
    proc = subprocess.Popen([sys.executable, str(HERE / "asyncservice.py"), str(b.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        row = wait_for(lambda: next((s for s in b.call("status")["services"] if s["service"] == "probe"
                                     and "ticks" in s["status"]), None), 10, "the asyncio service's heartbeat")
        assert row["state"] == "ready" and row["pid"] == proc.pid
        t0 = time.monotonic()
        answer = b.call("probe.sleep", {"delay": 0.3})
        assert answer["slept"] == 0.3 and 0.25 < time.monotonic() - t0 < 2.0
        before = answer["ticks"]
        assert b.call("probe.sleep", {"delay": 0.2})["ticks"] > before  # its task runs on
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        out = proc.stdout.read()
        assert "reloaded" in out and "stopped in" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_failing_task_of_an_asyncio_service_ends_it_as_crashed(box):
    """An exception in a task stops the loop and the service exits 1 with the traceback, as an exception
    escaping the plain loop does (asyncio alone would log it and carry on)."""
    b = box()
    out = subprocess.run([sys.executable, str(HERE / "asyncservice.py"), str(b.config), "fail"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "probe: crashed" in out.stdout and "ZeroDivisionError" in out.stdout and "a bug in a task" in out.stdout
# --- backoff: reset by a healthy run, kept for a crash loop ----------------------------------------
def _service_child(tmp_path, script: str, *args: str, **settings):
    """A Child running a real service (tests/SCRIPT CONFIG ARGS...), supervised with these settings."""
    from services.supervisor.child import Child

    config = tmp_path / "service.toml"
    config.write_text(f'[box]\nruntime_dir = "{tmp_path}/run"\n[bus]\nprefix = "t{os.getpid()}bk"\n')

    class Real(Child):
        def command(self):
            return [sys.executable, str(HERE / script), str(config), *args]

    return Real("capture", "x", _settings(**settings), tmp_path, dict(os.environ))


def _supervise(child, until, timeout: float, exits: list, on_turn=None):
    """The supervisor's steps for one child, until `until(child)`; each exit appends (how long
    that run had been ready, None if never; the restart delay chosen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(child):
        now = time.monotonic()
        child.read_notify(now)
        ready_at = child.ready_at
        if child.reap(now, shutting_down=False):
            ready = child.ready_until - ready_at if ready_at else None
            exits.append((ready, child.next_start - now))
        else:
            child.check(now)
        if child.state == "waiting" and now >= child.next_start:
            child.start(now)
        if on_turn is not None:
            on_turn(child, now)
        time.sleep(0.01)
    assert until(child), f"timed out; exits so far {exits}, state {child.state}, stderr:\n{child.tail.text()}"


def test_a_ready_service_killed_again_and_again_restarts_after_restart_sec_each_time(tmp_path):
    """Killed once it has been ready for healthy_sec, five times: each restart waits restart_sec, and
    the start limit (3 starts) never stops it: the healthy runs are no crash loop."""
    child = _service_child(tmp_path, "stuckservice.py", "3600", "0", restart_sec=0.1, restart_max_sec=5.0,
                           healthy_sec=0.5, start_limit_burst=3, start_limit_interval=600.0, start_timeout=15.0)
    exits: list = []
    kills = []

    def kill_when_healthy(c, now):
        if c.state == "ready" and now - c.ready_at > 0.7 and len(kills) < 5 and c.pid not in kills:
            kills.append(c.pid)
            os.kill(c.pid, signal.SIGKILL)

    child.start(time.monotonic())
    try:
        _supervise(child, lambda c: len(exits) == 5 and c.state == "ready", 90, exits, kill_when_healthy)
    finally:
        if child.popen is not None:
            child.popen.kill()
            child.popen.wait()
        child.close()
    assert [delay for _, delay in exits] == [pytest.approx(0.1)] * 5, exits
    assert all(ready >= 0.7 for ready, _ in exits), exits
    assert child.restarts == 5 and child.failures_in_row == 1 and len(child.starts) == 1


@pytest.mark.parametrize("after", ["-1", "0.2"], ids=["dies-before-ready", "dies-0.2s-after-ready"])
def test_a_service_that_dies_young_keeps_doubling_and_fails_after_the_burst(tmp_path, after):
    """Never ready, or ready and dead before healthy_sec (1 s): a crash loop. The delay doubles
    (0.1, 0.2, 0.4 s) and the fifth start is refused: start_limit_burst = 4."""
    child = _service_child(tmp_path, "crashservice.py", after, restart_sec=0.1, restart_max_sec=5.0, healthy_sec=1.0,
                           start_limit_burst=4, start_limit_interval=600.0, start_timeout=15.0)
    exits: list = []
    child.start(time.monotonic())
    try:
        _supervise(child, lambda c: c.state == "failed", 90, exits)
    finally:
        child.close()
    assert [delay for _, delay in exits[:3]] == [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.4)], exits
    assert len(exits) == 4 and child.restarts == 3 and len(child.starts) == 4
    readiness = [ready for ready, _ in exits]
    if after == "-1":
        assert readiness == [None] * 4
    else:
        assert all(r is not None and r < 1.0 for r in readiness), readiness


def test_a_watchdog_kill_ends_the_healthy_time_at_the_last_ping(tmp_path):
    """Ready, then stuck 0.1 s later: the watchdog (0.5 s) kills it after healthy_sec (0.4 s) has
    passed since READY, but its last ping came before: not healthy, the delay doubles."""
    child = _service_child(tmp_path, "stuckservice.py", "0.1", "30", restart_sec=0.1, restart_max_sec=5.0,
                           healthy_sec=0.4, watchdog_sec=0.5, start_limit_burst=3, start_limit_interval=600.0,
                           start_timeout=15.0, stop_timeout=0.5)
    exits: list = []
    child.start(time.monotonic())
    try:
        _supervise(child, lambda c: c.state == "failed", 90, exits)
    finally:
        child.close()
    assert child.watchdog_kills == 3
    assert [delay for _, delay in exits] == [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.4)], exits
    assert all(ready < 0.4 for ready, _ in exits), exits


def test_a_heartbeat_over_the_message_limit_leaves_out_its_largest_metrics_and_the_service_stays_live(box):
    """A service whose metrics outgrow [control] max_message_bytes (a SIP service with many calls) still
    heartbeats: the samples of its largest families are left out, counted and named in a warning; the hub keeps
    it ready and its sessions on (a heartbeat refused whole would make it stale and end them)."""
    b = box("[control]\nmax_message_bytes = 9000\n")
    b.run()
    b.wait_ready("capture@cam")
    time.sleep(3 * 0.2 + 2.0)                       # heartbeats at 0.2 s; stale after 1.5 s without one accepted
    row = next(s for s in b.call("status")["services"] if s["service"] == "capture@cam")
    assert row["state"] == "ready", row
    assert any(s["session"] == "cam" for s in b.call("sessions"))
    trimmed = metric_value(b.scrape(), "edgeroom_service_heartbeats_trimmed_total", service="capture@cam")
    assert trimmed and trimmed >= 3, trimmed
    assert "capture@cam: the heartbeat is over [control] max_message_bytes (9000): the metrics " in b.log()
    page = b.scrape()
    assert metric_value(page, "edgeroom_capture_to_bus_seconds_count", service="capture@cam") is None  # left out
    assert metric_value(page, "edgeroom_service_cpu_seconds_total", service="capture@cam") > 0          # kept
