"""A SIP dialog (RFC 3261 12): what both ends of a call agreed on, enough to send the next request in it.

Call-ID, the two tags, the CSeq each side is at, the remote target (the peer's Contact),
the route set (its Record-Route), the URIs of both ends, and the transport and address the
peer is reached at. `request()` builds the next in-dialog request (BYE, re-INVITE, OPTIONS,
ACK). `to_dict()`/`from_dict()` keep it in the state directory, with the call's media plan,
so a restarted SIP service takes the call back where it was (services/sip/calls.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from services.rtp import sdp
from services.rtp.call import Identity, Plan
from services.sip.message import Message, new_branch, parse_name_addr, parse_uri, request

__all__ = ["Dialog", "plan_from_dict", "plan_to_dict"]


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str                  # our side's name-addr (From of our requests), without tag
    remote_uri: str                 # theirs (To of our requests), without tag
    remote_target: str              # the peer's Contact URI: where in-dialog requests go
    local_seq: int
    remote_seq: int
    route_set: list[str] = field(default_factory=list)
    transport: str = "udp"
    peer: tuple[str, int] = ("", 0)  # the address requests go to (the route's first hop, else the target)

    def request(self, method: str, *, via: tuple[str, int, str], contact: str, body: bytes = b"",
                content_type: str | None = None, cseq: int | None = None, branch: str | None = None) -> Message:
        """The next request of the dialog (CSeq advanced, except for ACK and CANCEL, which reuse `cseq`)."""
        if cseq is None:
            self.local_seq += 1
            cseq = self.local_seq
        host, port, transport = via
        headers = [("Route", r) for r in self.route_set]
        return request(method, self.remote_target, call_id=self.call_id,
                       from_=f"{self.local_uri};tag={self.local_tag}", to=f"{self.remote_uri};tag={self.remote_tag}",
                       cseq=cseq, via=f"SIP/2.0/{transport.upper()} {host}:{port};branch={branch or new_branch()}"
                       ";rport", contact=contact, headers=headers, body=body, content_type=content_type)

    @staticmethod
    def where(target: str, route_set: list[str], fallback: tuple[str, int]) -> tuple[str, int]:
        """The first hop of an in-dialog request: the first route's URI, else the remote target."""
        uri = parse_uri(parse_name_addr(route_set[0]).uri) if route_set else parse_uri(target)
        return (uri.host, uri.port or 5060) if uri.host else fallback

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["peer"] = list(self.peer)
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Dialog:
        d = dict(d)
        d["peer"] = tuple(d["peer"])
        return Dialog(**d)


def _codec_to_dict(c: sdp.Codec) -> dict[str, Any]:
    return {"pt": c.pt, "name": c.name, "clock": c.clock, "channels": c.channels, "fmtp": dict(c.fmtp),
            "feedback": list(c.feedback)}


def _codec_from_dict(d: dict[str, Any]) -> sdp.Codec:
    return sdp.Codec(d["pt"], d["name"], d["clock"], d["channels"], dict(d["fmtp"]), tuple(d["feedback"]))


def plan_to_dict(p: Plan, identity: Identity | None, port: int) -> dict[str, Any]:
    peer = p.peer
    return {"kind": p.kind, "codec": _codec_to_dict(p.codec), "peer_host": p.peer_host, "sends": p.sends,
            "receives": p.receives, "port": port, "dtmf_pt": p.dtmf_pt,
            "peer": {"port": peer.port, "host": peer.host, "rtcp_port": peer.rtcp_port, "direction": peer.direction,
                     "bandwidth_kbps": peer.bandwidth_kbps, "codecs": [_codec_to_dict(c) for c in peer.codecs]},
            "identity": asdict(identity) if identity is not None else None}


def plan_from_dict(d: dict[str, Any]) -> Plan:
    pd = d["peer"]
    peer = sdp.Media(d["kind"], pd["port"], pd["host"], pd["rtcp_port"],
                     tuple(_codec_from_dict(c) for c in pd["codecs"]), pd["direction"], pd["bandwidth_kbps"])
    identity = Identity(**d["identity"]) if d.get("identity") else None
    return Plan(d["kind"], _codec_from_dict(d["codec"]), peer, d["peer_host"], d["sends"], d["receives"], d["port"],
                identity, d["dtmf_pt"])
