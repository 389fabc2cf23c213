"""Names of the shared-memory objects of the bus, all under one appliance prefix.

    /dev/shm/{prefix}.{stream}                 the ring (header, tables, slots)
    /dev/shm/{prefix}.{stream}.{pid}-{n}.wake  a FIFO that wakes one waiter (consumer or producer)
    /dev/shm/{prefix}.{stream}.{pid}.tmp       a ring being built, before it is published

Prefix and stream names allow letters, digits, '_' and '-' only, so the '.' separators are
unambiguous and a listing by prefix never matches another appliance's objects.
"""
from __future__ import annotations

import os
import re

__all__ = [
    "DEFAULT_PREFIX",
    "SHM_DIR",
    "check_name",
    "default_prefix",
    "ring_path",
    "tmp_path",
    "wake_glob",
    "wake_path",
]

SHM_DIR = "/dev/shm"  # where shm_open(3) keeps POSIX shared-memory objects on Linux
DEFAULT_PREFIX = "edgeroom"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(what: str, name: str) -> str:
    """Return `name` if it is a valid prefix or stream name, else raise ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"bad {what} name {name!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_prefix() -> str:
    """The appliance prefix: $EDGEROOM_BUS_PREFIX, else 'edgeroom'."""
    return check_name("prefix", os.environ.get("EDGEROOM_BUS_PREFIX", DEFAULT_PREFIX))


def ring_path(prefix: str, stream: str) -> str:
    return f"{SHM_DIR}/{prefix}.{stream}"


def tmp_path(prefix: str, stream: str, pid: int) -> str:
    return f"{SHM_DIR}/{prefix}.{stream}.{pid}.tmp"


def wake_path(prefix: str, stream: str, pid: int, serial: int) -> str:
    return f"{SHM_DIR}/{prefix}.{stream}.{pid}-{serial}.wake"


def wake_glob(prefix: str, stream: str) -> str:
    return f"{SHM_DIR}/{prefix}.{stream}.*.wake"
