"""One line per event on stdout, readable under journald and in a terminal.

Under journald ($JOURNAL_STREAM set) each line starts with a syslog priority `<N>`, which
journald turns into the entry's priority (so `journalctl -p warning` works) and strips;
the timestamp is journald's. In a terminal the line carries its own time. `log.format =
"json"` prints one JSON object per line instead, for log shippers.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

__all__ = ["setup", "Throttled"]

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _LineFormatter(logging.Formatter):
    def __init__(self, service: str, fmt: str, journald: bool) -> None:
        super().__init__()
        self.service, self.fmt, self.journald = service, fmt, journald

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        msg = msg.replace("\n", " | ")
        if self.fmt == "json":
            return json.dumps({"time": round(record.created, 3), "level": record.levelname.lower(),
                               "service": self.service, "logger": record.name, "msg": msg})
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.levelname.lower()}: {msg}"
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        return f"{stamp} {record.levelname.lower():7} {self.service}: {msg}"


def setup(service: str, level: str = "info", fmt: str = "text") -> None:
    """(Re)configure the root logger; called at start and on every reload."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LineFormatter(service, fmt, bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class Throttled:
    """Log a recurring problem at most once per `every` seconds, with how many happened since."""

    def __init__(self, logger: logging.Logger, every: float = 1.0) -> None:
        self.logger, self.every = logger, every
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        self.log(logging.WARNING, key, message)

    def info(self, key: str, message: str) -> None:
        self.log(logging.INFO, key, message)

    def log(self, level: int, key: str, message: str) -> None:
        now = time.monotonic()
        self._count[key] = self._count.get(key, 0) + 1
        if now - self._last.get(key, -1e9) >= self.every:
            n = self._count.pop(key)
            self._last[key] = now
            self.logger.log(level, "%s%s", message, f" ({n} since last report)" if n > 1 else "")
