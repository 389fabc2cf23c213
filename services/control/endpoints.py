"""Where the hub listens: IPC sockets in the runtime directory, optional CURVE-secured TCP.

The runtime directory holds the IPC sockets (mode 0660 in a 0750 directory: the service
group and nobody else) and the hub's state file. It is, in order: `box.runtime_dir` from
the config, `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`), `$XDG_RUNTIME_DIR/edgeroom`,
and `/tmp/edgeroom-UID`.
"""
from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = ["Endpoints", "runtime_dir", "endpoints_for", "prepare_runtime_dir", "secure_socket_file",
           "CONTROL_SOCK", "EVENTS_IN_SOCK", "EVENTS_SOCK", "hold_lock"]

CONTROL_SOCK = "control.sock"
EVENTS_IN_SOCK = "events-in.sock"
EVENTS_SOCK = "events.sock"
_MAX_SUN_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


@dataclass(frozen=True)
class Endpoints:
    control: str      # ROUTER: requests and replies, heartbeats, hook calls
    events_in: str    # XSUB: services' PUB sockets connect here
    events: str       # XPUB: subscribers connect here
    tcp_control: str = ""
    tcp_events: str = ""


def runtime_dir(configured: str = "", env: Mapping[str, str] | None = None) -> Path:
    if env is None:
        env = os.environ
    if configured:
        return Path(configured)
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "edgeroom"
    return Path(f"/tmp/edgeroom-{os.getuid()}")


def _ipc(path: Path) -> str:
    if len(str(path)) > _MAX_SUN_PATH:
        raise ValueError(f"IPC socket path {path} is {len(str(path))} bytes, over the {_MAX_SUN_PATH}-byte "
                         "limit of a Unix socket: set box.runtime_dir to a shorter directory")
    return f"ipc://{path}"


def endpoints_for(rundir: Path, tcp_control: str = "", tcp_events: str = "") -> Endpoints:
    return Endpoints(_ipc(rundir / CONTROL_SOCK), _ipc(rundir / EVENTS_IN_SOCK), _ipc(rundir / EVENTS_SOCK),
                     f"tcp://{tcp_control}" if tcp_control else "", f"tcp://{tcp_events}" if tcp_events else "")


def prepare_runtime_dir(path: Path) -> Path:
    """Create the directory 0750 if missing; refuse one that anybody may write to."""
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_mode & stat.S_IWOTH:
        raise PermissionError(f"runtime directory {path} is world-writable: make it 0750 (group = the edgeroom group)")
    if st.st_uid != os.getuid() and os.getuid() != 0 and not st.st_mode & stat.S_IWGRP:
        raise PermissionError(f"runtime directory {path} is not writable by this user")
    return path


def secure_socket_file(endpoint: str) -> None:
    """After bind: only owner and group may connect to an IPC socket."""
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], 0o660)


def hold_lock(rundir: Path, name: str) -> TextIO:
    """An exclusive lock on RUNDIR/NAME.lock for the life of the process (one hub, one `run`
    per runtime directory). Raises RuntimeError naming the holder's pid if it is taken."""
    f = open(rundir / f"{name}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise RuntimeError(f"another {name} (pid {holder}) is running with runtime directory {rundir}; "
                           f"stop it first, or give this one its own box.runtime_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
