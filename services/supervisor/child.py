"""One supervised child process: start, readiness, watchdog, stop, and when to restart.

The same semantics systemd gives a `Type=notify` unit with `WatchdogSec=`, `Restart=`,
`RestartSec=` (doubling up to `restart_max_sec`, like RestartSteps=), `StartLimitBurst=`,
`TimeoutStartSec=` and `TimeoutStopSec=`, and `RestartPreventExitStatus=78` (a bad config
is not fixed by restarting).

Backoff and start limit are crash-loop protection, so both count the runs that die young:
a run that stayed ready for `healthy_sec` (until its last watchdog ping, when the watchdog
killed it) ends the series. Its failure is the first of a new one: the next restart waits
`restart_sec` again, and the start limit counts from that start. A service that dies
before it is ready, or before `healthy_sec`, doubles its delay and meets the start limit.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from services import catalog
from services.runtime.scrub import StderrTail

__all__ = ["Child", "EX_CONFIG"]

log = logging.getLogger("edgeroom.run")
EX_CONFIG = 78
_PR_SET_PDEATHSIG = 1


_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup(parent: int, nice: int) -> None:
    """In the child before exec: SIGTERM when `edgeroom run` dies, so no service outlives it.

    If the parent died between fork and prctl, the signal will never come: exit instead.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass  # raising priority needs privileges `edgeroom run` may not have; systemd units apply it


class Child:
    def __init__(self, kind: str, instance: str | None, settings, notify_dir: Path, env: dict) -> None:
        self.kind, self.instance, self.settings = kind, instance, settings
        self.id = f"{kind}@{instance}" if instance else kind
        self.env = env
        self.notify_path = notify_dir / f"{self.id}.sock"
        self.notify = self._notify_socket()
        self.popen: subprocess.Popen | None = None
        self.state = "inactive"          # inactive, starting, ready, stopping, waiting, failed
        self.retired = False             # its source was removed: stop it, never restart it
        self.status = ""
        self.tail = StderrTail()
        self.starts: collections.deque[float] = collections.deque()
        self.failures_in_row = 0
        self.restarts = 0           # starts after the first one
        self.started_once = False
        self.watchdog_kills = 0
        self.next_start = 0.0
        self.started_at = self.ready_at = self.last_ping = self.kill_at = 0.0
        self.ready_until = 0.0          # when this run stopped being ready (0 while it is, or never was)
        self.watchdog_sec = settings.watchdog_sec
        self.exit_reason = ""

    def _notify_socket(self) -> socket.socket:
        try:
            self.notify_path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.notify_path))
        sock.setblocking(False)
        return sock

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else 0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "services.cli", "service", self.kind, *([self.instance] if self.instance else [])]

    # --- starting ------------------------------------------------------------------
    def start(self, now: float) -> bool:
        """Start unless the start limit is hit; returns False when the child is given up."""
        window = self.settings.start_limit_interval
        while self.starts and now - self.starts[0] > window:
            self.starts.popleft()
        if len(self.starts) >= self.settings.start_limit_burst:
            self.state = "failed"
            log.error("%s: start limit hit (%d starts in %.0f s); giving up — fix it and restart `edgeroom run`",
                      self.id, len(self.starts), window)
            return False
        self.starts.append(now)
        if self.started_once:
            self.restarts += 1
        self.started_once = True
        env = {**self.env, "NOTIFY_SOCKET": str(self.notify_path)}
        self.watchdog_sec = self.settings.watchdog_sec  # what this process was told; a reload applies at restart
        if self.watchdog_sec > 0:
            env["WATCHDOG_USEC"] = str(int(self.watchdog_sec * 1e6))
        parent, nice = os.getpid(), catalog.nice(catalog.spec(self.kind), self.settings)
        self.popen = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True, preexec_fn=lambda: _child_setup(parent, nice))
        os.set_blocking(self.popen.stderr.fileno(), False)
        self.state, self.started_at, self.kill_at, self.exit_reason = "starting", now, 0.0, ""
        self.ready_at = self.ready_until = 0.0
        log.info("%s: started (pid %d)", self.id, self.popen.pid)
        return True

    # --- what the child tells us -----------------------------------------------------
    def read_notify(self, now: float) -> None:
        while True:
            try:
                data = self.notify.recv(4096).decode(errors="replace")
            except BlockingIOError:
                return
            for line in data.splitlines():
                self._notify_line(line, now)

    def _notify_line(self, line: str, now: float) -> None:
        key, _, value = line.partition("=")
        if key == "READY" and value == "1" and self.state in ("starting", "ready"):
            if self.state == "starting":  # a READY=1 after a reload leaves the run's ready time as it is
                log.info("%s: ready after %.2f s", self.id, now - self.started_at)
                self.ready_at = now
            self.state, self.last_ping = "ready", now
        elif key == "WATCHDOG" and value == "1":
            self.last_ping = now
        elif key == "STATUS":
            self.status = value
        elif key == "STOPPING" and self.state != "stopping":
            self._unready(now)
            self.state = "stopping"
            self.kill_at = now + self.settings.stop_timeout

    def read_stderr(self) -> None:
        if self.popen is None or self.popen.stderr is None:
            return
        try:
            chunk = self.popen.stderr.read()
        except (BlockingIOError, ValueError):
            return
        for line in self.tail.feed((chunk or b"").decode(errors="replace")):
            print(f"{self.id} stderr: {line}", file=sys.stderr, flush=True)

    # --- supervision ------------------------------------------------------------------
    def check(self, now: float) -> None:
        """Start timeout, watchdog and stop timeout."""
        s = self.settings
        if self.state == "starting" and now - self.started_at > s.start_timeout:
            self._kill(now, f"not ready within {s.start_timeout:g} s (start timeout)", signal.SIGTERM)
        elif self.state == "ready" and self.watchdog_sec > 0 and now - self.last_ping > self.watchdog_sec:
            self.watchdog_kills += 1
            self._kill(now, f"no watchdog ping for {now - self.last_ping:.1f} s (watchdog {self.watchdog_sec:g} s)",
                       signal.SIGABRT)
        elif self.kill_at and now >= self.kill_at and self.popen and self.popen.poll() is None:
            log.warning("%s: still running %.1f s after being asked to stop; SIGKILL", self.id, s.stop_timeout)
            self.popen.kill()
            self.kill_at = 0.0

    def _kill(self, now: float, reason: str, sig: int) -> None:
        log.error("%s: %s; sending %s", self.id, reason, signal.Signals(sig).name)
        self._unready(self.last_ping)  # a watchdog kill: the run was healthy until its last ping, not until now
        self.exit_reason = reason
        self.popen.send_signal(sig)
        self.state, self.kill_at = "stopping", now + self.settings.stop_timeout

    def _unready(self, when: float) -> None:
        if self.state == "ready":
            self.ready_until = when

    def healthy(self) -> bool:
        """Whether the run that ended stayed ready for healthy_sec: then it was no crash loop."""
        return self.ready_at > 0 and self.ready_until - self.ready_at >= self.settings.healthy_sec

    def stop(self, now: float) -> None:
        if self.popen is not None and self.popen.poll() is None and self.state != "stopping":
            self._unready(now)
            self.popen.send_signal(signal.SIGTERM)
            self.state, self.kill_at = "stopping", now + self.settings.stop_timeout

    def reap(self, now: float, shutting_down: bool) -> bool:
        """If the child exited: decide what happens next. Returns True when it did exit."""
        if self.popen is None or self.popen.poll() is None:
            return False
        self.read_stderr()
        rc = self.popen.returncode
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"
        # like systemd: a non-zero status, a signal, a kill of ours or an exit before READY=1 is a
        # failure, whatever the service said on its way out (a crashing service still sends STOPPING=1)
        failed = rc != 0 or bool(self.exit_reason) or self.state == "starting"
        self._unready(now)
        self.popen.stderr.close()
        self.popen = None
        if shutting_down:
            self.state = "inactive"
            log.info("%s: stopped (%s)", self.id, how)
            return True
        self._after_exit(now, how, rc, failed)
        return True

    def _after_exit(self, now: float, how: str, rc: int, failed: bool) -> None:
        policy = self.settings.restart
        if rc == EX_CONFIG:
            self.state = "failed"
            log.error("%s: exited with %s (bad config); not restarting. Last stderr:\n%s", self.id, how,
                      self.tail.text())
            return
        if policy == "no" or (policy == "on-failure" and not failed):
            self.state = "inactive"
            log.info("%s: exited (%s); restart=%s, not restarting", self.id, how, policy)
            return
        if self.healthy():  # a run that stayed ready for healthy_sec ends the series of young deaths
            self.failures_in_row = 0
            self.starts.clear()
        self.failures_in_row = self.failures_in_row + 1 if failed else 0
        delay = min(self.settings.restart_max_sec, self.settings.restart_sec * 2 ** max(0, self.failures_in_row - 1))
        self.state, self.next_start = "waiting", now + delay
        young = (f" (failure {self.failures_in_row} in a row, none ready for healthy_sec "
                 f"{self.settings.healthy_sec:g} s)")
        log.warning("%s: exited (%s)%s; restarting in %.2f s%s", self.id, how,
                    f" — {self.exit_reason}" if self.exit_reason else "", delay,
                    young if self.failures_in_row > 1 else "")

    def close(self) -> None:
        self.notify.close()
        try:
            self.notify_path.unlink()
        except FileNotFoundError:
            pass
