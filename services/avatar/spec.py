"""The avatar service's entry in the catalog and its parts of the config: [avatar] and [avatars.NAME].

`edgeroom service avatar` (unit edgeroom-avatar) runs every avatar of the box: a talking face
driven by an audio stream of the bus (or by voice pushed with `avatar.say`), put on the bus as
a session of a room, so the bridge sends it to the room's callers (docs/avatar.md). It runs
when `[avatar] enabled = true` or when the config has an [avatars.NAME] table;
`edgeroom ctl avatar start` adds avatars at run time (kept in the state directory's
avatars.json).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.capture.sources.base import ROOM_PATTERN
from services.catalog import ServiceSpec, register
from services.runtime import streams
from services.runtime.schema import LIVE, RESTART, SCHEMA, Problem, Section, Table, setting

__all__ = ["AvatarEntry", "AvatarSection", "NAME_PATTERN", "parse_size"]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
SIZE = re.compile(r"^(\d{2,4})x(\d{2,4})$")


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' -> (512, 512); ValueError saying what a size is."""
    m = SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size WIDTHxHEIGHT (like 512x512)")
    w, h = int(m.group(1)), int(m.group(2))
    if w % 2 or h % 2 or not (64 <= w <= 1920 and 64 <= h <= 1920):
        raise ValueError(f"{text}: width and height must be even, 64 to 1920")
    return w, h


def _check_provider(name: str) -> None:
    from services.avatar.providers import names  # light: the modules import their clients when they start
    if name not in names():
        raise ValueError(f"unknown avatar provider {name!r}: expected one of {', '.join(names())}")


def _check_stream(name: str) -> None:
    if name and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$", name):
        raise ValueError(f"{name!r} is not a stream name of the bus")


@dataclass(frozen=True)
class AvatarSection:
    enabled: bool = setting(False, "Run the avatar service (edgeroom-avatar) even with no [avatars.NAME] table, "
                            "for avatars started with `edgeroom ctl avatar start`.", RESTART)
    max_avatars: int = setting(8, "Avatars the box runs at once; `ctl avatar start` past it is refused.", LIVE,
                               min=1, max=64)
    turn_gap: float = setting(0.3, "Seconds without driving audio that end a turn (the provider is told to flush).",
                              LIVE, min=0.05, max=10.0)
    max_delay: float = setting(0.4, "Seconds the voice waits for its frame before it goes out with the last picture "
                               "held: the most an avatar delays its voice.", LIVE, min=0.05, max=5.0)
    backoff_max: float = setting(30.0, "Longest wait, in seconds, between two tries to start a provider that failed "
                                 "(1 s, doubling).", LIVE, min=1.0, max=3600.0)
    ice_addresses: str = setting("", "The local addresses ICE offers to a WebRTC provider (anam) as host candidates "
                                 "('' every interface but loopback; '127.0.0.1' for a provider on the box).",
                                 RESTART)
    push_limit: float = setting(60.0, "Seconds of pushed voice (avatar.say) an avatar keeps waiting; more is refused.",
                                LIVE, min=1.0, max=600.0)


@dataclass(frozen=True)
class AvatarEntry:
    room: str = setting("default", "The room the avatar is a session of.", RESTART, pattern=ROOM_PATTERN)
    audio: str = setting("", "The audio stream of the bus that drives the face (a call's NAME-audio, a file "
                         "source's, an agent's); '' for voice pushed with avatar.say only.", RESTART,
                         check=_check_stream)
    provider: str = setting("websocket", "Who draws the face: websocket (RoomKit's WebSocket avatar protocol), "
                            "anam (Anam's cloud), musetalk (MuseTalk on a local GPU).", RESTART,
                            check=_check_provider)
    image: str = setting("", "The reference image (JPEG or PNG) the face is made from.", RESTART)
    size: str = setting("512x512", "The picture size put on the bus, WIDTHxHEIGHT.", RESTART,
                        pattern=SIZE.pattern)
    fps: float = setting(25.0, "Frames a second asked of the provider (a WebSocket server may answer another).",
                         RESTART, min=1.0, max=60.0)
    url: str = setting("", "websocket: the server's base URL (http://HOST:PORT); anam: the API's base URL ('' "
                       "is https://api.anam.ai).", RESTART)
    api_key_env: str = setting("ANAM_API_KEY", "anam: the environment variable that holds the API key.", RESTART,
                               pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    avatar_id: str = setting("", "anam: the avatar to show.", RESTART)
    model_dir: str = setting("", "musetalk: a MuseTalk v1.5 checkout with its weights.", RESTART)
    timeout: float = setting(5.0, "Seconds a provider's request or connection may take.", RESTART, min=0.5,
                             max=120.0)
    sample_rate: int = setting(0, "The audio rate sent to the provider; 0 takes its own (websocket 16000, anam "
                               "24000, musetalk 16000).", RESTART, min=0, max=48000)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        if not self.image:
            return "image", "an avatar needs a reference image (a JPEG or PNG file)", ()
        try:
            parse_size(self.size)
        except ValueError as exc:
            return "size", str(exc), ()
        if self.sample_rate and self.sample_rate < 8000:
            return "sample_rate", "must be 0 or at least 8000", ()
        if self.provider == "websocket" and not self.url.startswith(("http://", "https://")):
            return "url", "the websocket provider needs the server's base URL (http://HOST:PORT)", ("provider",)
        return None


def _wanted(config: Any) -> bool:
    return bool(config.avatar.enabled or config.avatars)


register(ServiceSpec(
    "avatar", "services.avatar.service:AvatarService", "talking faces driven by an audio stream, as sessions of rooms",
    order=4, network="any", devices=("gpu",), commands=("avatar",), wanted=_wanted, docs="avatar.md"))

SCHEMA.add(Section("avatar", AvatarSection, "The avatar service (runs when enabled or when an [avatars.NAME] "
                   "table exists).", owner="avatar"),
           Table("avatars", AvatarEntry, "Avatars by name: each is a session of its room with its face on NAME and "
                 "its voice on NAME-audio.", names=NAME_PATTERN, name_rule=streams.name_rule, owner="avatar"))
