"""SDP for a plain RTP call: the peer's description read, the box's written (RFC 4566, 3264, 3605, 4585).

The peer's SDP says what it sends (each m= line's payload types, in preference order, with
their rtpmap, fmtp and rtcp-fb), where it receives (c= and the m= port; RTCP on the next
port, or a=rtcp) and which way media flows (a=sendrecv, sendonly, recvonly, inactive: the
peer's view). `negotiate()` picks, per m= line, the first codec the box speaks: H.264 in
the packetization-mode its fmtp says (0 when it says none, as RFC 6184 has it; mode 2 is
not spoken), VP8, Opus, PCMU, PCMA. The box sends and expects that payload type.

`write()` makes the box's own description: its address and ports, the chosen codecs, the
feedback it understands (nack, nack pli, ccm fir), and the direction seen from the box.
The same function writes the SDP a receive-only peer (ffmpeg -i, GStreamer) reads to take
what the box sends: the peer's address and ports, the box's codecs.

Written by hand rather than with aiortc.sdp: that parser drops a static payload type that
has no rtpmap line (PCMU 0 and PCMA 8 as ffmpeg writes them), keeps the space after each
';' of an fmtp in the key (ffmpeg writes "packetization-mode=1; sprop-parameter-sets=..."),
and loses b=AS. Text in, text out; nothing here is on the media path.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

__all__ = ["Codec", "Description", "Media", "SdpError", "negotiate", "parse", "write"]

# payload types with a meaning of their own (RFC 3551), used when no rtpmap names them
STATIC = {0: ("pcmu", 8000, 1), 8: ("pcma", 8000, 1)}
SPOKEN = {"video": ("h264", "vp8"), "audio": ("opus", "pcmu", "pcma")}
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
REVERSED = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
FEEDBACK = ("nack", "nack pli", "ccm fir")   # what the box sends and answers


class SdpError(ValueError):
    pass


@dataclass(frozen=True)
class Codec:
    pt: int
    name: str                 # lower case: h264, vp8, opus, pcmu, pcma, ...
    clock: int
    channels: int = 1
    fmtp: dict[str, str] = field(default_factory=dict)
    feedback: tuple[str, ...] = ()

    @property
    def mode(self) -> int:
        """H.264 packetization-mode (RFC 6184: 0 when the fmtp does not say)."""
        try:
            return int(self.fmtp.get("packetization-mode", "0"))
        except ValueError:
            raise SdpError(f"payload type {self.pt}: packetization-mode must be a number, got "
                           f"{self.fmtp['packetization-mode']!r}") from None

    def parameter_sets(self) -> list[bytes]:
        """H.264 sprop-parameter-sets: the SPS and PPS NAL units the peer announced (no start codes)."""
        text = self.fmtp.get("sprop-parameter-sets", "")
        try:
            return [base64.b64decode(part) for part in text.split(",") if part]
        except ValueError:
            raise SdpError(f"payload type {self.pt}: sprop-parameter-sets is not base64: {text!r}") from None

    def rtpmap(self) -> str:
        name = {"h264": "H264", "vp8": "VP8", "pcmu": "PCMU", "pcma": "PCMA"}.get(self.name, self.name)
        return f"{name}/{self.clock}" + (f"/{self.channels}" if self.channels > 1 else "")


@dataclass(frozen=True)
class Media:
    kind: str                 # video | audio
    port: int
    host: str
    rtcp_port: int
    codecs: tuple[Codec, ...]
    direction: str = "sendrecv"   # the describing side's view
    bandwidth_kbps: int = 0       # b=AS, 0 when absent

    def codec(self, pt: int) -> Codec | None:
        return next((c for c in self.codecs if c.pt == pt), None)


@dataclass(frozen=True)
class Description:
    host: str
    media: tuple[Media, ...]

    def of(self, kind: str) -> Media | None:
        """The first m= line of `kind` (port 0: the describing side receives none of it, it may still send)."""
        return next((m for m in self.media if m.kind == kind), None)


def _fmtp(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        key, eq, value = part.strip().partition("=")
        if key:
            out[key.strip().lower()] = value.strip() if eq else ""
    return out


def parse(text: str) -> Description:
    """The description in `text`; SdpError naming the line that is wrong."""
    session_host = ""
    raw: list[dict] = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"SDP line {number}: expected 'x=...', got {line[:40]!r}")
        kind, value = line[0], line[2:]
        try:
            if kind == "m":
                parts = value.split()
                if len(parts) < 4:
                    raise SdpError("an m= line is 'media port proto fmt...'")
                port = int(parts[1].split("/")[0])
                if not 0 <= port <= 65535:
                    raise SdpError(f"port {port} is out of range")
                raw.append({"kind": parts[0], "port": port, "proto": parts[2], "fmt": [int(p) for p in parts[3:]],
                            "host": "", "rtcp": 0, "rtpmap": {}, "fmtp": {}, "fb": {}, "dir": None, "as": 0})
            elif kind == "c":
                parts = value.split()
                if len(parts) < 3 or parts[0] != "IN":
                    raise SdpError("a c= line is 'IN IP4 address'")
                host = parts[2].split("/")[0]
                if raw:
                    raw[-1]["host"] = host
                else:
                    session_host = host
            elif kind == "b" and raw and value.upper().startswith("AS:"):
                raw[-1]["as"] = int(value[3:])
            elif kind == "a" and raw:
                _attribute(raw[-1], value)
            elif kind == "a" and value in DIRECTIONS:
                for m in raw:
                    m["dir"] = m["dir"] or value
        except SdpError as exc:
            raise SdpError(f"SDP line {number}: {exc}") from None
        except (ValueError, IndexError):
            raise SdpError(f"SDP line {number}: cannot read {line[:60]!r}") from None
    if not raw:
        raise SdpError("the SDP has no m= line")
    media = []
    for m in raw:
        codecs = []
        for pt in m["fmt"]:
            if pt in m["rtpmap"]:
                name, clock, channels = m["rtpmap"][pt]
            elif pt in STATIC:
                name, clock, channels = STATIC[pt]
            else:
                continue  # a dynamic payload type without rtpmap: nothing to go by
            codecs.append(Codec(pt, name, clock, channels, m["fmtp"].get(pt, {}), tuple(m["fb"].get(pt, ()))
                                + tuple(m["fb"].get("*", ()))))
        host = m["host"] or session_host
        if m["port"] and not host:
            raise SdpError(f"the {m['kind']} m= line has no c= address (neither its own nor the session's)")
        media.append(Media(m["kind"], m["port"], host, m["rtcp"] or (m["port"] + 1 if m["port"] else 0),
                           tuple(codecs), m["dir"] or "sendrecv", m["as"]))
    return Description(session_host, tuple(media))


def _attribute(m: dict, value: str) -> None:
    name, _, rest = value.partition(":")
    if name == "rtpmap":
        pt, _, enc = rest.partition(" ")
        parts = enc.strip().split("/")
        m["rtpmap"][int(pt)] = (parts[0].lower(), int(parts[1]), int(parts[2]) if len(parts) > 2 else 1)
    elif name == "fmtp":
        pt, _, params = rest.partition(" ")
        m["fmtp"][int(pt)] = _fmtp(params)
    elif name == "rtcp-fb":
        pt, _, what = rest.partition(" ")
        m["fb"].setdefault(pt.strip() if pt.strip() == "*" else int(pt), []).append(" ".join(what.split()))
    elif name == "rtcp":
        m["rtcp"] = int(rest.split()[0])
    elif value in DIRECTIONS:
        m["dir"] = value


def negotiate(media: Media) -> Codec | None:
    """The first codec of `media` the box speaks (its order is the peer's preference)."""
    for codec in media.codecs:
        if codec.name not in SPOKEN.get(media.kind, ()):
            continue
        if codec.name == "h264" and codec.mode not in (0, 1):
            continue
        return codec
    return None


def write(name: str, host: str, media: list[tuple[Media, Codec]], *, session_id: int = 0) -> str:
    """An SDP of `media` (each with the codec it carries) at `host`; the Media's port, rtcp port and direction
    are written as they are."""
    lines = ["v=0", f"o=edgeroom {session_id} 1 IN IP4 {host}", f"s={name}", f"c=IN IP4 {host}", "t=0 0"]
    for m, codec in media:
        lines.append(f"m={m.kind} {m.port} RTP/AVP {codec.pt}")
        if m.bandwidth_kbps:
            lines.append(f"b=AS:{m.bandwidth_kbps}")
        lines.append(f"a=rtpmap:{codec.pt} {codec.rtpmap()}")
        if codec.fmtp:
            lines.append(f"a=fmtp:{codec.pt} " + ";".join(f"{k}={v}" if v else k for k, v in codec.fmtp.items()))
        if m.kind == "video":
            lines += [f"a=rtcp-fb:{codec.pt} {fb}" for fb in FEEDBACK]
        if m.rtcp_port and m.rtcp_port != m.port + 1:
            lines.append(f"a=rtcp:{m.rtcp_port}")
        lines.append(f"a={m.direction}")
    return "\r\n".join(lines) + "\r\n"
