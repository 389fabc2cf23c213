"""The WebRTC service's entry in the catalog, and its part of the config: [webrtc].

`edgeroom service webrtc` (unit edgeroom-webrtc) is the box's HTTP face for browsers and
WebRTC tools: WHIP ingest, WHEP playback, room calls, WebSocket video in RoomKit's format
and the web page. Off by default (`[webrtc] enabled = true` runs it). docs/webrtc.md has
the details.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.calls.config import RouteKeys, route_problem
from services.capture.sources.base import ROOM_PATTERN
from services.catalog import ServiceSpec, register
from services.control.tokens import parse_tokens
from services.runtime.schema import LIVE, RESTART, SCHEMA, Problem, Section, parse_list, setting

__all__ = ["ENDPOINTS", "WebrtcConfig"]

# what `open` may name: the endpoints that take no token when listed there
ENDPOINTS = ("api", "events", "whip", "whep", "rooms", "ws")


def _check_tokens(text: str) -> None:
    parse_tokens(text)


def _check_open(text: str) -> None:
    wrong = [e for e in parse_list(text) if e not in ENDPOINTS]
    if wrong:
        raise ValueError(f"unknown endpoint(s) {', '.join(wrong)} (known: {', '.join(ENDPOINTS)})")


def _check_addresses(text: str) -> None:
    for entry in parse_list(text):
        ipaddress.ip_address(entry)


@dataclass(frozen=True)
class WebrtcConfig(RouteKeys):
    """send_video and send_audio: what a room call receives unless `ctl route` (or the bridge) says otherwise."""

    enabled: bool = setting(False, "Run the WebRTC service (edgeroom-webrtc): WHIP, WHEP, room calls, WebSocket "
                            "video and the web page.", RESTART)
    address: str = setting("0.0.0.0", "The address HTTP listens on; 127.0.0.1 keeps it to this machine.", RESTART)
    port: int = setting(8889, "The HTTP(S) port; 0 picks a free one (shown in the status).", RESTART, min=0,
                        max=65535)
    tls_cert: str = setting("", "A PEM certificate (chain) for HTTPS; browsers open cameras only on https:// or "
                            "localhost. '' serves plain HTTP.", RESTART)
    tls_key: str = setting("", "The PEM private key of tls_cert.", RESTART)
    tokens: str = setting("", "Bearer tokens let in: 'NAME:TOKEN, ...' (16 characters or more each); "
                          "`edgeroom keys token add NAME` keeps more in the state directory.", RESTART,
                          check=_check_tokens)
    open: str = setting("", "Endpoints that take no token: any of api, events, whip, whep, rooms, ws. "
                        "Everything else answers 401 without a valid token.", RESTART, check=_check_open)
    cors_origins: str = setting("*", "Origins allowed to call WHIP/WHEP/rooms from another page "
                                "(Access-Control-Allow-Origin); '' allows none.", RESTART)
    room: str = setting("default", "The room a WHIP publisher joins unless its URL says ?room=.", LIVE,
                        pattern=ROOM_PATTERN)
    ice_addresses: str = setting("", "The local addresses ICE offers as host candidates ('' every interface but "
                                 "loopback; '127.0.0.1' for a browser on this machine).", RESTART,
                                 check=_check_addresses)
    max_sessions: int = setting(64, "Peer connections at once (publishers, viewers, room calls); more get 503.",
                                LIVE, min=1, max=10000)
    max_viewers: int = setting(32, "WHEP viewers of one stream at once; more get 503.", LIVE, min=1, max=10000)
    connect_timeout: float = setting(15.0, "Seconds a peer has to complete ICE and DTLS after its offer is "
                                     "answered; then it is closed.", LIVE, min=1, max=600)
    disconnected_timeout: float = setting(10.0, "Seconds a connection may stay disconnected before it is "
                                          "closed.", LIVE, min=1, max=600)
    viewer_queue_ms: int = setting(200, "Longest a viewer's video may wait to be sent; past it deltas are dropped "
                                   "until a keyframe (latency never grows).", LIVE, min=20, max=5000)
    max_offer_bytes: int = setting(65536, "Largest SDP offer or trickle body accepted.", RESTART, min=1024,
                                   max=1048576)
    ws_max_message_bytes: int = setting(4 * 1024 * 1024, "Largest WebSocket video message; a larger one closes "
                                        "that socket (1009).", RESTART, min=1024, max=64 * 1024 * 1024)
    ws_max_messages_per_s: float = setting(120.0, "WebSocket messages a second a client may send (a burst of "
                                           "twice that).", LIVE, min=1, max=100000)
    ws_max_kbps: int = setting(100000, "WebSocket kbit/s a client may send.", LIVE, min=64, max=10000000)
    idle_timeout: float = setting(60.0, "Seconds a WebSocket may send nothing before it is closed.", LIVE, min=1,
                                  max=86400)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        problem = route_problem(self)
        if problem is not None:
            return problem
        if bool(self.tls_cert) != bool(self.tls_key):
            return "tls_key", f"is given with {key('tls_cert')}, both or neither", ("tls_cert",)
        return None


def _wanted(config: Any) -> bool:
    return bool(config.webrtc.enabled)


register(ServiceSpec(
    "webrtc", "services.webrtc.service:Webrtc", "WHIP, WHEP, room calls, WebSocket video and the web page over HTTP",
    order=1, network="any", nice=-5, cpu_weight=200, commands=(), wanted=_wanted, docs="webrtc.md"))

SCHEMA.add(Section("webrtc", WebrtcConfig, "The WebRTC service: WHIP, WHEP, room calls, WebSocket video and the "
                   "web page (off unless enabled).", owner="webrtc"))
