"""The SIP service's entry in the catalog, and its part of the config: [sip].

`edgeroom service sip` (unit edgeroom-sip) answers and places SIP calls: each call is a
session of a room, its media through the RTP engine (services/rtp/call.py), its dialog kept
in the state directory so a restarted service takes its calls back. Off by default
(`[sip] enabled = true` runs it). docs/sip.md has the details.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.calls.config import RouteKeys, route_problem
from services.capture.sources.base import ROOM_PATTERN
from services.catalog import ServiceSpec, register
from services.runtime.schema import LIVE, RESTART, SCHEMA, Problem, Section, parse_list, setting

__all__ = ["SipConfig", "parse_rooms", "parse_users"]


def parse_users(text: str) -> dict[str, str]:
    """'alice:secret, bob:pw' -> {'alice': 'secret', 'bob': 'pw'}; ValueError naming a bad entry."""
    users = {}
    for entry in parse_list(text):
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"a user is 'NAME:PASSWORD', got {entry.split(':')[0]!r}...")
        users[user.strip()] = password
    return users


def parse_rooms(text: str) -> dict[str, str]:
    """'alice=lobby, door=porch' -> the room of each called user."""
    rooms = {}
    for entry in parse_list(text):
        user, sep, room = entry.partition("=")
        if not sep or not user.strip() or not room.strip():
            raise ValueError(f"a room entry is 'USER=ROOM', got {entry!r}")
        rooms[user.strip()] = room.strip()
    return rooms


def _check_users(text: str) -> None:
    parse_users(text)


def _check_rooms(text: str) -> None:
    parse_rooms(text)


def _check_allow(text: str) -> None:
    for entry in parse_list(text):
        ipaddress.ip_network(entry, strict=False)


def _check_algorithms(text: str) -> None:
    given = parse_list(text)
    wrong = [a for a in given if a not in ("SHA-256", "MD5")]
    if wrong or not given:
        raise ValueError(f"digest algorithms are SHA-256 and/or MD5, got {text!r}")


def _check_transports(text: str) -> None:
    given = parse_list(text)
    wrong = [t for t in given if t not in ("udp", "tcp")]
    if wrong or not given:
        raise ValueError(f"transports are udp and/or tcp, got {text!r}")


@dataclass(frozen=True)
class SipConfig(RouteKeys):
    """send_video and send_audio: what each call sends unless `ctl route` says otherwise."""

    enabled: bool = setting(False, "Run the SIP service (edgeroom-sip).", RESTART)
    address: str = setting("127.0.0.1", "The address SIP listens on (UDP and TCP); 0.0.0.0 for every interface.",
                           RESTART)
    port: int = setting(5060, "The SIP port (UDP and TCP); 0 picks a free one (shown in the status).", RESTART,
                        min=0, max=65535)
    transports: str = setting("udp, tcp", "Transports SIP listens on: udp, tcp or both.", RESTART,
                              check=_check_transports)
    domain: str = setting("edgeroom", "The digest realm, and the host of the box's own SIP addresses.", RESTART,
                          pattern=r"^[A-Za-z0-9.-]{1,64}$")
    auth: str = setting("digest", "How an INVITE is let in: digest (a user of `users` or `users_file`, SHA-256 or "
                        "MD5), or allow (a peer address in `allow`, no password: for a trusted network only).",
                        RESTART, choices=("digest", "allow"))
    digest_algorithms: str = setting("SHA-256, MD5", "The digest algorithms a 401 offers, most preferred first "
                                     "(RFC 8760). A UA built on libre (baresip 1.0) answers only the first and "
                                     "knows only MD5: put MD5 first for such phones.", RESTART,
                                     check=_check_algorithms)
    users: str = setting("", "Users callers authenticate as: 'NAME:PASSWORD, ...'.", RESTART, check=_check_users)
    users_file: str = setting("", "A file of 'NAME:PASSWORD' lines (# comments), read at start, added to `users`.",
                              RESTART)
    allow: str = setting("", "Peer addresses or networks let in without a password when auth = allow: "
                         "'10.0.0.0/24, 192.0.2.7'.", RESTART, check=_check_allow)
    room: str = setting("default", "The room a call joins when `rooms` names none for the called user.", LIVE,
                        pattern=ROOM_PATTERN)
    rooms: str = setting("", "The room of each called user: 'lobby=lobby, door=porch' (sip:door@box joins porch).",
                         LIVE, check=_check_rooms)
    video: bool = setting(True, "Offer and accept video; false makes every call audio only.", LIVE)
    answer_after_ms: int = setting(0, "Ring this long (180 Ringing) before answering an INVITE.", LIVE,
                                   min=0, max=60000)
    max_calls: int = setting(16, "Calls at once; an INVITE past it is answered 486 Busy Here.", LIVE, min=1,
                             max=1000)
    dial_user: str = setting("", "The user the box answers a 401/407 with when it dials (its own credentials at "
                             "the peer).", LIVE)
    dial_password: str = setting("", "The password of dial_user.", LIVE)
    registrar: str = setting("", "A registrar to REGISTER with ('host:port'; '' registers nowhere).", RESTART)
    register_expires: int = setting(600, "Seconds a registration asks for; refreshed before it runs out.", RESTART,
                                    min=60, max=86400)
    local_address: str = setting("127.0.0.1", "The address the calls' RTP sockets bind to (0.0.0.0 for every "
                                 "interface).", RESTART)
    latch: bool = setting(False, "Take RTP from the first address that sends (a peer behind NAT) instead of the "
                          "address in its SDP.", RESTART)
    jitter_ms: int = setting(50, "Longest wait for a missing packet in the jitter buffer, in milliseconds.",
                             RESTART, min=0, max=2000)
    mtu: int = setting(1200, "Largest RTP packet sent, in bytes.", RESTART, min=200, max=9000)
    pacing_kbps: int = setting(20000, "Rate the packets of one access unit leave at, in kbit/s.", RESTART,
                               min=100, max=1000000)
    max_kbps: int = setting(0, "Inbound rate a media may reach before packets are dropped (kbit/s; 0: 4x b=AS).",
                            RESTART, min=0, max=1000000)
    nack_buffer: int = setting(512, "Packets kept per media to answer NACK.", RESTART, min=0, max=8192)
    media_timeout: float = setting(30.0, "Seconds without RTP from the peer (not on hold) before the box hangs "
                                   "up; 0 never.", LIVE, min=0, max=3600)
    rate: float = setting(30.0, "SIP messages a second accepted from one address (a burst of twice that); "
                          "more are dropped and counted.", LIVE, min=1, max=10000)
    invite_rate: float = setting(2.0, "New INVITEs a second accepted from one address (a burst of 5x that).",
                                 LIVE, min=0.1, max=1000)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        problem = route_problem(self)
        if problem is not None:
            return problem
        if self.enabled and self.auth == "digest" and not self.users and not self.users_file:
            return "users", "digest auth needs at least one user (or users_file); auth = allow lets in `allow`", \
                ("auth", "users_file")
        if self.enabled and self.auth == "allow" and not self.allow:
            return "allow", "auth = allow needs the peer addresses it lets in", ("auth",)
        if bool(self.dial_user) != bool(self.dial_password):
            return "dial_password", f"is given with {key('dial_user')}, both or neither", ("dial_user",)
        return None


def _wanted(config: Any) -> bool:
    return bool(config.sip.enabled)


register(ServiceSpec(
    "sip", "services.sip.service:Sip", "SIP calls in and out, each a session of a room with its media on the bus",
    order=1, network="any", nice=-5, cpu_weight=200, commands=("call",), wanted=_wanted, docs="sip.md"))

SCHEMA.add(Section("sip", SipConfig, "The SIP service: calls in and out (off unless enabled).", owner="sip"))
