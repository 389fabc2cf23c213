"""Is a process alive, and is it still the process we think it is (pid reuse)?"""
from __future__ import annotations

import os

__all__ = ["is_alive", "start_ticks"]


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat).

    Together with the pid it names one process for the life of the machine.
    None if the process does not exist (or is a zombie that has been reaped).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and ')', so split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] == b"Z":  # a zombie: it will never write again
        return None
    return int(fields[19])


def is_alive(pid: int, ticks: int) -> bool:
    """True if `pid` runs and started at `ticks` (so it is not a reused pid)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    return start_ticks(pid) == ticks
