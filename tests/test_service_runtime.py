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


def test_watchdog_pings_come_from_the_main_loop_and_stop_while_it_is_stuck(box):
    b = box()
    sock = notify_socket(b.dir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(b.dir / "notify.sock"), "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen([sys.executable, str(HERE / "stuckservice.py"), str(b.config), "1.0", "1.5"],
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
