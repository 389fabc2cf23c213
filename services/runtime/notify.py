"""The sd_notify protocol: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 over $NOTIFY_SOCKET.

The same datagrams go to systemd in production and to `edgeroom run` in development.
Without $NOTIFY_SOCKET every call is a no-op, so a service runs the same by hand.
The watchdog is pinged from the service's main loop only (see Service._turn): a loop that
is stuck stops pinging, which is the point of the watchdog.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        if env is None:
            env = os.environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if path else None
        if self.sock is not None:
            self.sock.setblocking(False)
        self.interval = self._watchdog_interval(env)
        self._next_ping = 0.0
        self.failures = 0

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float:
        """Half of $WATCHDOG_USEC, as systemd recommends; 0 when no watchdog is asked for."""
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or (pid and pid != str(os.getpid())):
            return 0.0
        return int(usec) / 2e6

    def send(self, *fields: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:
            self.failures += 1  # the supervisor went away: keep running, it is not our job to die
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "") -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog_due(self, now: float) -> bool:
        return self.interval > 0 and now >= self._next_ping

    def ping(self, now: float) -> None:
        """WATCHDOG=1 if one is due; call from the main loop on every turn."""
        if self.watchdog_due(now):
            self.send("WATCHDOG=1")
            self._next_ping = now + self.interval

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
