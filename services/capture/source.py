"""What every capture source is: a blocking `run` on the capture service's reader thread.

    class Source(Protocol):
        def run(self, sink: Sink, stop: threading.Event, emit: Emit) -> bool: ...

`run` opens the source, puts its items into the sink until `stop` is set or the input
ends, and closes what it opened. It returns True when the input ended and should not be
reopened (a file played to its end without loop), False when stopped. A failure raises
`SourceError` with a short `reason` (the metric label: connect, timeout, read, not_found,
corrupt, device, display, unsupported) and a message that names the cause; the service
counts it, shows it in `edgeroom ctl status` and opens the source again after a backoff.
`emit(topic, data)` publishes an event through the hub from any thread.

`open_source(name, config)` builds the source a SourceConfig describes.
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol

from services.capture.sink import Sink
from services.runtime.config import SourceConfig

__all__ = ["Emit", "Source", "SourceError", "open_source"]

Emit = Callable[[str, dict], None]


class SourceError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Source(Protocol):
    def run(self, sink: Sink, stop: threading.Event, emit: Emit) -> bool: ...


def open_source(name: str, cfg: SourceConfig) -> Source:
    if cfg.kind == "synthetic":
        from services.capture.synthetic import SyntheticSource
        return SyntheticSource(cfg)
    if cfg.kind in ("file", "url"):
        from services.capture.media import MediaSource
        return MediaSource(cfg)
    if cfg.kind == "webcam":
        from services.capture.webcam import WebcamSource
        return WebcamSource(cfg)
    if cfg.kind == "screen":
        from services.capture.screen import ScreenCapture
        return ScreenCapture(cfg)
    raise ValueError(f"source {name!r}: unknown kind {cfg.kind!r}")
