"""Is a process alive, and is it still the process we think it is (pid reuse)?

A process on the bus is named by its pid and its start time, and every side must read the
start time the same way, the owner for itself as much as any observer. So it is read from
/proc/PID/task/PID/stat (the stat of the thread-group leader, whose start time is the
process's), never from /proc/self/stat or /proc/PID/stat: qemu's user-mode emulation (an
arm64 box or CI job on an x86_64 host) fabricates those two when a process reads its own,
with a start time taken from its own clock, so the owner would write one value and every
other process would read another, and a live producer or consumer would look dead. The
task path is the kernel's answer for everyone, emulated or not.
"""
from __future__ import annotations

__all__ = ["is_alive", "start_ticks"]


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of its stat).

    Together with the pid it names one process for the life of the machine.
    None if the process does not exist (or is a zombie: it will never write again).
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and ')', so split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] == b"Z":  # a zombie: it will never write again
        return None
    return int(fields[19])


def is_alive(pid: int, ticks: int) -> bool:
    """True if `pid` runs and started at `ticks` (so it is not a reused pid).

    No shortcut for our own pid: an entry that names it may be a dead predecessor's that
    had the same pid (pid namespaces hand out the same small pids on every start).
    """
    if pid <= 0:
        return False
    return start_ticks(pid) == ticks
