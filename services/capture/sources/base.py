"""What every capture source is: its config, its registration, and a blocking `run`.

A source kind is one module of this package. It declares, beside its code:

* its config class: a frozen dataclass subclassing `SourceConfig`, with the keys of a
  [sources.NAME] table of that kind (made with `setting()`; errors name the dotted key),
  and the answers the box needs about it (`encoded()`, `target()`, `stop_bound()`, ...);
* its implementation, registered with `@source_kind(ConfigClass)`:

      class Source(Protocol):
          def run(self, sink: Sink, stop: threading.Event, emit: Emit) -> bool: ...
          def describe(self) -> str: ...      # what it reads now, for the status line
          def force_keyframe(self) -> str | None: ...   # "idr" if it can make one now, else None

`run` opens the source, puts its items into the sink until `stop` is set or the input
ends, and closes what it opened. It returns True when the input ended and should not be
reopened (a file played to its end without loop), False when stopped. A failure raises
`SourceError` with a short `reason` (the metric label: connect, timeout, read, not_found,
corrupt, device, display, unsupported, http) and a message that names the cause; the
service counts it, shows it in `edgeroom ctl status` and opens the source again after a
backoff. `emit(topic, data)` publishes an event through the hub from any thread.

A kind's module imports only light modules at the top (PyAV, OpenCV and mss where they
are used), so the config of every kind loads on a box without the media extra.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from services.runtime.schema import RESTART, Problem, setting

if TYPE_CHECKING:
    from services.capture.sink import Sink

__all__ = ["KINDS", "Emit", "Source", "SourceConfig", "SourceError", "SourceKind", "EncodedSourceConfig", "source_kind"]

Emit = Callable[[str, dict], None]
ROOM_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
RAW_FORMATS = ("yuv420p", "nv12", "gray", "rgb24", "bgr24")


class SourceError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Source(Protocol):
    def run(self, sink: Sink, stop: threading.Event, emit: Emit) -> bool: ...

    def describe(self) -> str:
        """What it is reading now, for the status line ("h264 1280x720 from rtsp://cam/1"); '' when closed."""
        ...

    def force_keyframe(self) -> str | None:
        """Make its next access unit a keyframe (called from any thread): how ("idr"), or None when it
        cannot (it passes on the keyframes it gets, or sends raw pictures)."""
        ...


@dataclass(frozen=True)
class SourceConfig:
    """The keys every source has; a kind's class adds its own (and sets `kind`'s default to its name)."""

    kind: str = setting("synthetic", "What the source captures (its kind).", RESTART)
    room: str = setting("default", "The room the source's session joins.", RESTART, pattern=ROOM_PATTERN)
    reconnect_min: float = setting(0.5, "First delay before reopening a failed source; doubles up to "
                                   "reconnect_max.", RESTART, min=0.05, max=600)
    reconnect_max: float = setting(30.0, "Longest delay between reopen attempts; >= reconnect_min.", RESTART,
                                   min=0.05, max=3600)

    # what the box shows and asks about a source of this kind
    session_kind: ClassVar[str] = "camera"   # the session's kind in `ctl sessions`: camera, file, screen

    def encoded(self) -> bool:
        """Does this source put encoded access units on its stream (so decode@NAME has work)?"""
        return False

    def wants_decode(self) -> bool:
        """Does decode@NAME run for this source?"""
        return False

    def has_audio(self) -> bool:
        """Does the source publish NAME-audio?"""
        return False

    def makes_keyframes(self) -> bool:
        """Can it make a keyframe on request (its Source's force_keyframe)? An encoder in the source can; a
        file or a camera passes on the keyframes it gets."""
        return False

    def target(self) -> str:
        """What it captures, for `ctl source list` (no secrets)."""
        raise NotImplementedError

    def shown(self) -> dict[str, Any]:
        """Its keys as `source.add` answers them (no secrets)."""
        from dataclasses import asdict
        return asdict(self)

    def stop_bound(self) -> float:
        """Seconds its reader thread may take to stop (a blocked read or open ends within this)."""
        return 2.0

    def frame_interval(self) -> float:
        """Seconds between two pictures when the rate is known, else 0."""
        return 0.0

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        if self.reconnect_max < self.reconnect_min:
            return "reconnect_max", f"must be >= {key('reconnect_min')} ({self.reconnect_min})", ("reconnect_min",)
        return None


@dataclass(frozen=True)
class EncodedSourceConfig(SourceConfig):
    """A kind that puts encoded access units on NAME: decode@NAME turns them into pictures on NAME-raw."""

    decode: bool = setting(True, "Run decode@NAME, which publishes the pictures on NAME-raw.", RESTART)
    pixel_format: str = setting("yuv420p", "decode: the picture format on NAME-raw.", RESTART, choices=RAW_FORMATS)
    hw_decode: str = setting("auto", "decode: auto (hardware when a probe decode succeeds), off, or a decoder "
                             "name like h264_cuvid.", RESTART, pattern=r"^[a-z0-9_]{2,32}$")
    decode_threads: int = setting(1, "decode: frame threads; 1 adds no latency, N decodes up to N pictures at "
                                  "once and holds N-1 back; 0 lets FFmpeg pick (one per core, plus one).", RESTART,
                                  min=0, max=64)
    history_seconds: float = setting(10.0, "Seconds of encoded video and audio the bus rings keep, whoever reads: "
                                     "what a recorder restart or a reader that falls behind can catch up on.",
                                     RESTART, min=2, max=60)

    def encoded(self) -> bool:
        return True

    def wants_decode(self) -> bool:
        return self.encoded() and self.decode


@dataclass(frozen=True)
class SourceKind:
    name: str
    config: type[SourceConfig]
    factory: Callable[[Any], Source]
    summary: str


KINDS: dict[str, SourceKind] = {}


def source_kind(config: type[SourceConfig], summary: str) -> Callable[[type], type]:
    """Register the decorated class as the implementation of `config`'s kind."""
    name = config.__dataclass_fields__["kind"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config.__name__}.kind needs its kind's name as default")

    def register(cls: type) -> type:
        if name in KINDS and KINDS[name].factory is not cls:
            raise ValueError(f"source kind {name!r} is registered twice")
        KINDS[name] = SourceKind(name, config, cls, summary)
        return cls
    return register
