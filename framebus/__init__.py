"""framebus: zero-copy shared-memory frame rings between processes.

One producer per stream writes items (raw pictures, encoded access units, PCM audio)
into a ring of fixed-size slots in POSIX shared memory; any number of consumers in other
processes read them as numpy views without copying. See docs/framebus.md.
"""
import logging

from framebus.atomics import NATIVE
from framebus.consumer import Consumer
from framebus.errors import (
    BusError,
    BusFull,
    LayoutMismatch,
    NotAStream,
    PayloadTooLarge,
    StreamBusy,
    StreamNotFound,
)
from framebus.formats import CODECS, FLAG_CORRUPT, FLAG_DISCONTINUITY, FLAG_KEYFRAME, PIXEL_FORMATS
from framebus.item import Item, Overwritten
from framebus.producer import Loan, Producer
from framebus.registry import StreamInfo, gc, list_streams

__all__ = [
    "CODECS",
    "FLAG_CORRUPT",
    "FLAG_DISCONTINUITY",
    "FLAG_KEYFRAME",
    "NATIVE",
    "PIXEL_FORMATS",
    "BusError",
    "BusFull",
    "Consumer",
    "Item",
    "LayoutMismatch",
    "Loan",
    "NotAStream",
    "Overwritten",
    "PayloadTooLarge",
    "Producer",
    "StreamBusy",
    "StreamInfo",
    "StreamNotFound",
    "gc",
    "list_streams",
]

logging.getLogger("framebus").addHandler(logging.NullHandler())
