"""A route as config: the keys a transport's table declares, and the `Route` they make.

A transport's config table (say [rtp.NAME]) inherits `RouteKeys`, so every transport names
its routes the same way, with the same rules and help:

    @dataclass(frozen=True)
    class RtpConfig(RouteKeys):
        sdp: str = setting("", "...", RESTART)

        def cross_check(self, key):            # only if it has rules of its own; else RouteKeys'
            return route_problem(self) or ...

    cfg.route()   # Route(video="cam", audio="cam-audio")

The keys apply on reload (the transport's apply() calls RouteBook.configure); a route set
by command (`edgeroom ctl route`) wins over the config's until it is reset.

This module is light (no framebus, no PyAV): spec modules import it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from services.runtime.schema import LIVE, Problem, setting
from services.runtime.streams import AUDIO

__all__ = ["AUDIO_TRACK", "ROUTE_OFFER", "STREAM_OR_NONE", "TRACKS", "VIDEO_TRACK", "Route", "RouteKeys",
           "route_problem"]

ROUTE_OFFER = "session.route"   # what a transport offers; the hub's `route` command forwards to it
VIDEO_TRACK, AUDIO_TRACK = "video", "audio"
TRACKS = (VIDEO_TRACK, AUDIO_TRACK)
STREAM_OR_NONE = r"^([A-Za-z0-9][A-Za-z0-9_-]{0,63})?$"   # a stream name of the bus (framebus's rule), or ""


@dataclass(frozen=True)
class Route:
    """What a session sends: the stream of each track ("" sends nothing on it)."""

    video: str = ""
    audio: str = ""

    def of(self, track: str) -> str:
        return self.video if track == VIDEO_TRACK else self.audio

    def with_(self, **tracks: str) -> Route:
        return replace(self, **tracks)


@dataclass(frozen=True)
class RouteKeys:
    """The route keys of a transport's config table (inherit it)."""

    send_video: str = setting("", "The stream this session sends as video (its video route): an encoded stream "
                              "of the bus, a camera's NAME or an encoder's output; '' sends none. `edgeroom ctl "
                              "route` changes it during a call.", LIVE, pattern=STREAM_OR_NONE)
    send_audio: str = setting("", "The stream this session sends as audio (its audio route): s16 audio of the "
                              "bus, such as NAME-audio; '' sends none.", LIVE, pattern=STREAM_OR_NONE)

    def route(self) -> Route:
        return Route(self.send_video, self.send_audio)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        return route_problem(self)


def route_problem(cfg: RouteKeys) -> Problem | None:
    """The routes' own rule (for a subclass's cross_check): no audio stream as the video route."""
    if cfg.send_video.endswith(AUDIO):
        return ("send_video", f"{cfg.send_video!r} is an audio stream (NAME{AUDIO}): route it with send_audio",
                ("send_audio",))
    return None
