"""The RTP endpoint's entry in the catalog, and its part of the config: [rtp.NAME], one table per call.

Each [rtp.NAME] entry runs one process, `rtp@NAME` (unit edgeroom-rtp@NAME): one call
session with a peer described by SDP. What arrives goes on the bus as NAME (video access
units; decode@NAME runs for it unless `decode = false`) and NAME-audio (s16 PCM); what it
sends are its routes (`send_video`, `send_audio`, or `edgeroom ctl route`: services/calls/),
read off the bus. The default box runs none.
docs/rtp.md has the details.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.calls.config import RouteKeys, route_problem
from services.capture.sources.base import RAW_FORMATS, ROOM_PATTERN
from services.catalog import ServiceSpec, register
from services.decode.spec import add_input_table
from services.runtime import streams
from services.runtime.schema import RESTART, SCHEMA, Problem, Table, setting

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"


def _check_sdp(text: str) -> None:
    if text.lstrip().startswith("v=") or not text:
        from services.rtp.sdp import parse  # light: text only
        if text:
            parse(text)


@dataclass(frozen=True)
class RtpConfig(RouteKeys):
    """send_video and send_audio (the call's routes, services/calls/config.py) come first, then the call's own."""

    room: str = setting("default", "The room the call's session joins.", RESTART, pattern=ROOM_PATTERN)
    sdp: str = setting("", "The peer's SDP: what it sends (codecs, payload types, packetization-mode) and where "
                       "it receives (c= and m= ports); a file path, or the SDP itself inline (text starting with "
                       "v=0).", RESTART, check=_check_sdp)
    local_address: str = setting("127.0.0.1", "The address the call's sockets bind to (0.0.0.0 for every "
                                 "interface).", RESTART)
    video_port: int = setting(0, "Local RTP port of the video (RTCP on the next one); 0 picks a free pair.",
                              RESTART, min=0, max=65534)
    audio_port: int = setting(0, "Local RTP port of the audio (RTCP on the next one); 0 picks a free pair.",
                              RESTART, min=0, max=65534)
    peer: str = setting("", "The peer's host; '' takes the SDP's c= address.", RESTART)
    latch: bool = setting(False, "Accept RTP and RTCP from the first address that sends (a peer behind NAT) and "
                          "send there, instead of only from the negotiated peer's address.", RESTART)
    jitter_ms: int = setting(50, "Longest time a packet waits in the jitter buffer for a missing one before it is "
                             "given up as lost, in milliseconds.", RESTART, min=0, max=2000)
    mtu: int = setting(1200, "Largest RTP packet sent, in bytes (header included).", RESTART, min=200, max=9000)
    pacing_kbps: int = setting(20000, "Rate packets of one access unit are sent at, so a keyframe does not leave "
                               "in one burst, in kbit/s.", RESTART, min=100, max=1000000)
    max_kbps: int = setting(0, "Inbound rate a media may reach before packets are dropped, in kbit/s; 0 takes "
                            "4x the SDP's b=AS (none when it has none).", RESTART, min=0, max=1000000)
    nack_buffer: int = setting(512, "Packets kept per media to answer a peer's NACK.", RESTART, min=0, max=8192)
    decode: bool = setting(True, "Run decode@NAME, which publishes the pictures on NAME-raw.", RESTART)
    pixel_format: str = setting("yuv420p", "decode: the picture format on NAME-raw.", RESTART, choices=RAW_FORMATS)
    hw_decode: str = setting("auto", "decode: auto (hardware when a probe decode succeeds), off, or a decoder "
                             "name like h264_cuvid.", RESTART, pattern=r"^[a-z0-9_]{2,32}$")
    decode_threads: int = setting(1, "decode: frame threads; 1 adds no latency.", RESTART, min=0, max=64)

    kind = "rtp"   # what decode@NAME and `ctl sessions` call it (not a key)

    def encoded(self) -> bool:
        return True

    def wants_decode(self) -> bool:
        return self.decode

    def target(self) -> str:
        return f"rtp {self.peer or 'peer'} ({self.local_address})"

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        problem = route_problem(self)
        if problem is not None:
            return problem
        if self.video_port and self.video_port == self.audio_port:
            return "audio_port", f"must differ from {key('video_port')}", ("video_port",)
        if self.video_port and self.audio_port and abs(self.video_port - self.audio_port) < 2:
            return "audio_port", f"must not be {key('video_port')} +- 1 (RTCP takes the port after RTP)", \
                ("video_port",)
        return None


def _instances(config: Any, with_overlay: bool) -> list[str]:
    return list(config.rtp)


register(ServiceSpec(
    "rtp", "services.rtp.service:Rtp", "one RTP call with a peer described by SDP: its media in and out of the bus",
    order=1, instances=_instances, network="any", nice=-5, cpu_weight=200, docs="rtp.md"))

SCHEMA.add(Table("rtp", RtpConfig, "RTP calls by name: each is one session with a peer described by SDP.",
                 names=NAME_PATTERN, name_rule=streams.name_rule, owner="rtp"))

add_input_table("rtp")  # decode@NAME decodes an RTP call's inbound video
