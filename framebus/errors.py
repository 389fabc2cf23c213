"""The framebus exception types: one base, one subclass per way an operation fails.

Every message names the stream and the cause in a full sentence, so a log line is enough
to act on.
"""
from __future__ import annotations

__all__ = [
    "BusError",
    "BusFull",
    "LayoutMismatch",
    "NotAStream",
    "PayloadTooLarge",
    "StreamBusy",
    "StreamNotFound",
]


class BusError(Exception):
    """Base of every framebus error."""


class StreamNotFound(BusError):
    """No segment exists under the name asked for."""


class StreamBusy(BusError):
    """Another live producer already owns the stream."""


class NotAStream(BusError):
    """The segment exists but is not a framebus ring (bad magic, truncated)."""


class LayoutMismatch(BusError):
    """The segment was written by another layout version, or cannot hold what is asked."""


class PayloadTooLarge(BusError):
    """An item does not fit in the stream's slots."""


class BusFull(BusError):
    """The shared-memory file system has no room for the ring."""
