"""The bridge service's entry in the catalog, its part of the config ([bridge]) and its hook.

`edgeroom service bridge` (unit edgeroom-bridge) sets the outbound routes of every session
of a bridged room, so that each participant sees and hears the others (docs/bridge.md).
Off by default (`[bridge] enabled = true`); a room is bridged by `rooms` or by
`edgeroom ctl bridge on ROOM`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.capture.sources.base import ROOM_PATTERN
from services.catalog import ServiceSpec, register
from services.runtime.schema import LIVE, RESTART, SCHEMA, Problem, Section, parse_list, setting

__all__ = ["POLICIES", "BridgeConfig"]

POLICIES = ("speaker", "pin", "grid")
_ROOM = re.compile(ROOM_PATTERN)


def _check_rooms(text: str) -> None:
    wrong = [r for r in parse_list(text) if r != "*" and not _ROOM.match(r)]
    if wrong:
        raise ValueError(f"not room names: {', '.join(wrong)} (a room matches {ROOM_PATTERN}; '*' is every room)")


@dataclass(frozen=True)
class BridgeConfig:
    enabled: bool = setting(False, "Run the bridge service (edgeroom-bridge): the sessions of a bridged room see and "
                            "hear each other.", RESTART)
    rooms: str = setting("", "Rooms bridged from the start: 'lobby, porch', or '*' for every room "
                         "(`edgeroom ctl bridge on|off ROOM` changes it at run time).", LIVE, check=_check_rooms)
    policy: str = setting("speaker", "Which video a participant gets when more than two are in a room: speaker "
                          "(the active speaker, from the audio levels), pin (the pinned session: `ctl bridge pin`), "
                          "grid (every other participant composed into one picture).", LIVE, choices=POLICIES)
    max_participants: int = setting(10, "Sessions a bridged room takes; later ones are refused (not bridged, "
                                    "counted, said in `ctl bridge ROOM`).", LIVE, min=2, max=100)
    speaker_hold: float = setting(1.0, "Seconds a new voice must lead before the video switches to it "
                                  "(hysteresis: a cough does not switch).", LIVE, min=0.0, max=30.0)
    speaker_margin_db: float = setting(6.0, "How much louder (dB) than the current speaker a new one must be.", LIVE,
                                       min=0.0, max=40.0)
    speaker_threshold_db: float = setting(-45.0, "Below this level (dBFS) a participant is silent.", LIVE,
                                          min=-90.0, max=0.0)
    hook_recheck: float = setting(10.0, "Seconds after which BEFORE_BRIDGE_VIDEO is asked again about a route; 0 "
                                  "asks only when a route starts or `ctl bridge recheck` says so.", LIVE,
                                  min=0.0, max=86400.0)
    transcode_kbps: int = setting(1000, "Bit rate (kbit/s) of the bridge's transcodes (a target that does not take the "
                                  "source's codec) and grids.", LIVE, min=64, max=50000)
    encoder: str = setting("auto", "The encoder of transcodes and grids: auto (hardware when a probe finds it), "
                           "off (software), or an FFmpeg encoder name.", LIVE)
    grid_size: str = setting("640x360", "The picture size of a grid (policy = grid).", LIVE,
                             pattern=r"^\d{2,4}x\d{2,4}$")
    grid_fps: float = setting(15.0, "Frames a second of a grid.", LIVE, min=1.0, max=60.0)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        w, h = (int(v) for v in self.grid_size.split("x"))
        if w % 2 or h % 2 or w < 64 or h < 64:
            return "grid_size", "must be even and at least 64x64", ()
        return None

    def room_list(self) -> list[str]:
        return parse_list(self.rooms)


def _wanted(config: Any) -> bool:
    return bool(config.bridge.enabled)


register(ServiceSpec(
    "bridge", "services.bridge.service:Bridge", "forwards video and audio between the sessions of a room",
    order=5, network="none", commands=("bridge",), wanted=_wanted, docs="bridge.md"))

SCHEMA.add(Section("bridge", BridgeConfig, "The bridge: the sessions of a bridged room see and hear each other "
                   "(off unless enabled).", owner="bridge"))
# asked per route (source -> target) when it starts, after `hook_recheck` seconds, and on `ctl bridge recheck`
SCHEMA.add_sync_hook("BEFORE_BRIDGE_VIDEO")
