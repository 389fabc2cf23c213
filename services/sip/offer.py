"""SDP offer/answer for SIP calls (RFC 3264): what the box answers to an INVITE's offer, what it offers when it
dials, and what a peer's answer to that offer means.

A SIP offer is an RTP description (services/rtp/sdp.py reads each m= line's codecs, address and direction) with
rules of its own: the answer has one m= line per offered one, in the same order, with the same media and proto;
a refused m= line is answered with port 0. So the offer is first cut into its m= sections here: a section the
box may take (audio or video with numeric payload types) goes through `sdp.parse`; any other (an
`m=application ... UDP/BFCP *`, a kind the box does not speak) is kept only to be refused. `sdp.parse` also
drops a session-level a=sendonly; it is applied here, and `c=IN IP4 0.0.0.0` (RFC 2543 hold) too.

Choices (RoomKit's defects 1-3, see shared/design/CALLS.md): video takes H.264 packetization-mode 1 wherever it
stands in the offer (baresip offers mode 0 first), else mode 0 (kept: the box sends single NAL units), else VP8;
audio takes the offer's first of Opus, PCMU, PCMA (static 0 and 8 need no rtpmap), plus a telephone-event. The
answer keeps the offer's payload types, writes only the fmtp the box asserts (never the peer's
sprop-parameter-sets) and the a=rtcp-fb both sides speak. The negotiated results are `Negotiated`s: the codec
the box sends and expects, the peer's m= line (where to send, its own fmtp), the box's direction, the hold state.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from services.rtp import sdp
from services.rtp.sdp import REVERSED, Codec, Media, SdpError

__all__ = ["Answer", "Negotiated", "accept", "answer", "changes", "offer"]

KINDS = ("audio", "video")
PROTOS = ("RTP/AVP", "RTP/AVPF")              # no SRTP, no DTLS: the RTP engine speaks plain RTP
AUDIO = ("opus", "pcmu", "pcma")
SPEAKS = {"audio": "Opus, PCMU, PCMA", "video": "H.264 mode 0 or 1, VP8"}
PROFILE = "42e01f"                             # constrained baseline 3.1: the profile-level-id when none offered
OPUS_FMTP = {"useinbandfec": "1"}
DTMF_EVENTS = "0-16"                           # the digits, *, #, A-D and flash (RFC 4733)
HOLD_HOST = "0.0.0.0"                          # RFC 2543 hold: "send me nothing"


@dataclass(frozen=True)
class Negotiated:
    """One media of a call, as offer and answer settled it."""
    kind: str                   # audio | video
    codec: Codec                # what the box sends and expects: the offer's pt, the box's fmtp and feedback
    dtmf: Codec | None          # telephone-event (audio only)
    peer: Media                 # the peer's m= line: host, port, rtcp port, its direction, its codecs
    direction: str              # the box's side
    on_hold: bool               # the peer sends nothing to the box, or wants nothing (sendonly, inactive, 0.0.0.0)

    @property
    def offered(self) -> Codec | None:
        """The peer's own description of the codec (its fmtp: sprop-parameter-sets for the depacketizer)."""
        return self.peer.codec(self.codec.pt)

    @property
    def sends(self) -> bool:
        """The box sends this media."""
        return self.direction in ("sendrecv", "sendonly")

    @property
    def receives(self) -> bool:
        return self.direction in ("sendrecv", "recvonly")


@dataclass(frozen=True)
class Answer:
    """The outcome of an offer/answer: the answer's text (the box's, or the peer's for `accept`) and each media."""
    sdp: str
    audio: Negotiated | None
    video: Negotiated | None
    notes: tuple[str, ...] = ()

    @property
    def audio_only(self) -> bool:
        return self.audio is not None and self.video is None


@dataclass(frozen=True)
class _Section:
    """One m= line as written: enough to refuse it, and its Media when the box may take it."""
    kind: str
    port: int
    proto: str
    fmts: tuple[str, ...]
    names: Mapping[str, str]    # pt -> the rtpmap's encoding name as written (H263, MP4V-ES)
    media: Media | None         # None: not audio/video over numeric payload types


# --- reading ------------------------------------------------------------------------------------------------
def _sections(text: str) -> list[_Section]:
    """The m= sections of `text` in order; SdpError (from sdp.parse, naming the line) for garbage."""
    lines = text.replace("\r\n", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("m=")]
    if not starts:
        sdp.parse(text)                       # raises: "the SDP has no m= line", or the line that is wrong
        raise SdpError("the SDP has no m= line")
    session_dir = _direction(lines[:starts[0]])
    heads: list[tuple[_Section, str | None]] = []            # each section, and its direction when it is RTP
    kept = list(lines)
    for start, end in zip(starts, [*starts[1:], len(lines)]):
        parts = lines[start].strip()[2:].split()
        if len(parts) < 4:
            raise SdpError(f"SDP line {start + 1}: an m= line is 'media port proto fmt...'")
        try:
            port = int(parts[1].split("/")[0])
        except ValueError:
            raise SdpError(f"SDP line {start + 1}: cannot read {lines[start].strip()[:60]!r}") from None
        rtp = parts[0] in KINDS and all(p.isdigit() for p in parts[3:])
        if not rtp:
            kept[start:end] = [""] * (end - start)           # blanked: line numbers of the rest stay right
        names = {m.group(1): m.group(2) for line in lines[start:end]
                 if (m := re.match(r"\s*a=rtpmap:(\d+)\s+([^/\s]+)", line))}
        direction = _direction(lines[start + 1:end]) or session_dir or "sendrecv"
        heads.append((_Section(parts[0], port, parts[2], tuple(parts[3:]), names, None), direction if rtp else None))
    parsed = iter(sdp.parse("\n".join(kept)).media if any(d for _, d in heads) else ())
    return [replace(section, media=replace(next(parsed), direction=d)) if d else section for section, d in heads]


def _direction(lines: list[str]) -> str | None:
    found = [line.strip()[2:] for line in lines if line.strip()[2:] in sdp.DIRECTIONS and line.strip()[:2] == "a="]
    return found[-1] if found else None


def _label(section: _Section, codec: Codec) -> str:
    name = section.names.get(str(codec.pt)) or codec.rtpmap().split("/")[0]
    extra = f" mode {_mode(codec)}" if codec.name == "h264" and _mode(codec) not in (0, 1) else ""
    return f"{name}/{codec.pt}{extra}"


def _offered(section: _Section) -> str:
    """The section's formats as a person reads them: 'H263/34, MP4V-ES/96'."""
    media = section.media
    labels = []
    for fmt in section.fmts:
        codec = media.codec(int(fmt)) if media else None
        labels.append(_label(section, codec) if codec else f"{fmt} (no rtpmap)")
    return ", ".join(labels)


def _mode(codec: Codec) -> int | None:
    try:
        return codec.mode
    except SdpError:
        return None


# --- choosing -----------------------------------------------------------------------------------------------
def _rank(codec: Codec, kind: str) -> int | None:
    """Lower is better; None: not spoken."""
    if kind == "video":
        mode = _mode(codec) if codec.name == "h264" else None
        return 0 if mode == 1 else 1 if mode == 0 else 2 if codec.name == "vp8" else None
    return 0 if codec.name in AUDIO else None


def _choose(media: Media) -> Codec | None:
    ranked = [(rank, i, c) for i, c in enumerate(media.codecs) if (rank := _rank(c, media.kind)) is not None]
    if media.kind == "audio":
        ranked = [r for r in ranked if r[2].name != "opus" or r[2].clock == 48000]
    return min(ranked, key=lambda r: r[:2])[2] if ranked else None


def _dtmf(media: Media, clock: int) -> Codec | None:
    events = [c for c in media.codecs if c.name == "telephone-event"]
    return next((c for c in events if c.clock == clock), events[0] if events else None)


def _box_codec(codec: Codec) -> Codec:
    """What the box asserts about `codec`: its own fmtp, the feedback both speak."""
    feedback = tuple(fb for fb in sdp.FEEDBACK if fb in codec.feedback)
    if codec.name == "h264":
        fmtp = {"profile-level-id": codec.fmtp.get("profile-level-id", PROFILE), "level-asymmetry-allowed": "1",
                "packetization-mode": str(codec.mode)}
    elif codec.name == "opus":
        fmtp = dict(OPUS_FMTP)
    else:
        fmtp = {}
    return Codec(codec.pt, codec.name, codec.clock, codec.channels, fmtp, feedback if codec.name in ("h264", "vp8")
                 else ())


def _negotiated(kind: str, codec: Codec, dtmf: Codec | None, peer: Media) -> Negotiated:
    held = peer.host == HOLD_HOST
    seen = peer.direction
    if held:                                  # 0.0.0.0: the peer receives nothing, whatever its a= says
        seen = {"sendrecv": "sendonly", "recvonly": "inactive"}.get(seen, seen)
    return Negotiated(kind, codec, dtmf, peer, REVERSED[seen], held or seen in ("sendonly", "inactive"))


# --- writing ------------------------------------------------------------------------------------------------
def _session(host: str, session_id: int, version: int) -> list[str]:
    family = "IP6" if ":" in host else "IP4"
    return ["v=0", f"o=edgeroom {session_id} {version} IN {family} {host}", "s=edgeroom",
            f"c=IN {family} {host}", "t=0 0"]


def _fmtp(codec: Codec) -> list[str]:
    if not codec.fmtp:
        return []
    return [f"a=fmtp:{codec.pt} " + ";".join(f"{k}={v}" if v else k for k, v in codec.fmtp.items())]


def _media_lines(kind: str, port: int, rtcp_port: int, proto: str, codecs: list[Codec], direction: str) -> list[str]:
    lines = [f"m={kind} {port} {proto} " + " ".join(str(c.pt) for c in codecs)]
    for codec in codecs:
        lines.append(f"a=rtpmap:{codec.pt} {codec.rtpmap()}")
        lines += _fmtp(codec)
        lines += [f"a=rtcp-fb:{codec.pt} {fb}" for fb in codec.feedback]
    if rtcp_port and rtcp_port != port + 1:
        lines.append(f"a=rtcp:{rtcp_port}")
    lines.append(f"a={direction}")
    return lines


def _text(lines: list[str]) -> str:
    return "\r\n".join(lines) + "\r\n"


# --- the box answers ----------------------------------------------------------------------------------------
def answer(offer_text: str, *, host: str, ports: Mapping[str, int], video: bool = True, session_id: int,
           version: int = 1, rtcp_ports: Mapping[str, int] | None = None) -> Answer:
    """The box's answer to `offer_text` (an INVITE's or re-INVITE's): every m= line answered in order, refused
    ones with port 0. `ports`/`rtcp_ports`: the box's RTP (RTCP) port per kind it may take ("audio", "video"
    unless `video` is False), the same across re-INVITEs (RTCP on port+1 when not given); `version` goes up
    with each new answer of the session. SdpError when the box can take neither audio nor video (the caller
    answers 488), or for garbage."""
    sections = _sections(offer_text)
    lines = _session(host, session_id, version)
    taken: dict[str, Negotiated] = {}
    notes: list[str] = []
    for section in sections:
        result = _answer_one(section, taken, video, notes)
        if result is None:
            lines.append(f"m={section.kind} 0 {section.proto} {section.fmts[0]}")
            continue
        kind = section.kind
        taken[kind] = result
        port = ports[kind]
        rtcp = (rtcp_ports or {}).get(kind, port + 1)
        codecs = [result.codec, *([result.dtmf] if result.dtmf else [])]
        lines += _media_lines(kind, port, rtcp, section.proto, codecs, result.direction)
    if not taken:
        offered = "; ".join(f"{s.kind} {s.proto} ({_offered(s)}){' port 0' if not s.port else ''}"
                            for s in sections)
        raise SdpError(f"nothing in the offer can be taken: it offers {offered}; the box speaks audio "
                       f"({SPEAKS['audio']}) and video ({SPEAKS['video']}) over RTP/AVP")
    if "audio" in taken and "video" not in taken and not any("audio only" in n for n in notes):
        notes.insert(0, "audio only: the offer has no video")
    for n in taken.values():
        if n.on_hold:
            notes.append(f"{n.kind} on hold: the offer says {n.peer.direction}"
                         + (f" at {HOLD_HOST}" if n.peer.host == HOLD_HOST else ""))
    return Answer(_text(lines), taken.get("audio"), taken.get("video"), tuple(notes))


def _answer_one(section: _Section, taken: Mapping[str, Negotiated], video: bool,
                notes: list[str]) -> Negotiated | None:
    """The negotiated media for `section`, or None (a note says why when it matters)."""
    kind = section.kind
    fallback = "audio only: " if kind == "video" else ""
    if kind not in KINDS or section.media is None:
        notes.append(f"the offer's {kind} m= line ({section.proto}) is refused: the box speaks audio and video "
                     "over RTP/AVP")
        return None
    if kind in taken:
        notes.append(f"the offer's second {kind} m= line (port {section.port}) is refused: the box takes one")
        return None
    if not section.port:
        notes.append(f"{fallback}the offer's {kind} m= line has port 0")
        return None
    if section.proto not in PROTOS:
        notes.append(f"{fallback}the offer's {kind} m= line is {section.proto}: the box speaks RTP/AVP and "
                     "RTP/AVPF, no SRTP")
        return None
    if kind == "video" and not video:
        notes.append("audio only: the call was set up with video off")
        return None
    media = section.media
    codec = _choose(media)
    if codec is None:
        notes.append(f"{fallback or 'video only: '}the offer's {kind} codecs ({_offered(section)}) include none "
                     f"the box speaks ({SPEAKS[kind]})")
        return None
    dtmf = _dtmf(media, codec.clock) if kind == "audio" else None
    return _negotiated(kind, _box_codec(codec), dtmf, media)


# --- the box offers -----------------------------------------------------------------------------------------
def _box_offer(video: bool) -> dict[str, list[Codec]]:
    h264 = {"profile-level-id": PROFILE, "level-asymmetry-allowed": "1"}
    fb = sdp.FEEDBACK
    media = {"audio": [Codec(111, "opus", 48000, 2, dict(OPUS_FMTP)), Codec(0, "pcmu", 8000), Codec(8, "pcma", 8000),
                       Codec(110, "telephone-event", 48000, fmtp={DTMF_EVENTS: ""}),
                       Codec(101, "telephone-event", 8000, fmtp={DTMF_EVENTS: ""})]}
    if video:
        media["video"] = [Codec(96, "h264", 90000, fmtp={**h264, "packetization-mode": "1"}, feedback=fb),
                          Codec(97, "h264", 90000, fmtp={**h264, "packetization-mode": "0"}, feedback=fb),
                          Codec(98, "vp8", 90000, feedback=fb)]
    return media


def offer(*, host: str, ports: Mapping[str, int], video: bool = True, session_id: int, version: int = 1,
          rtcp_ports: Mapping[str, int] | None = None) -> str:
    """The box's offer when it dials: audio Opus 111, PCMU 0, PCMA 8 and telephone-event at 48 kHz (110, for
    Opus, RFC 4733 wants the audio's clock) and 8 kHz (101); video (unless `video` is False) H.264 mode 1 (96),
    mode 0 (97), VP8 (98), each with nack, nack pli and ccm fir; sendrecv."""
    lines = _session(host, session_id, version)
    for kind, codecs in _box_offer(video).items():
        port = ports[kind]
        lines += _media_lines(kind, port, (rtcp_ports or {}).get(kind, port + 1), "RTP/AVP", codecs, "sendrecv")
    return _text(lines)


# --- the peer answered --------------------------------------------------------------------------------------
def accept(offer_text: str, answer_text: str) -> Answer:
    """What the peer's `answer_text` to the box's `offer_text` settles: per media the codec it chose (the first
    of its payload types that the offer had; the answer's fmtp gives the H.264 mode, the offer's when it has
    none for it), the peer's address, port and direction. Port 0: refused (video refused: an audio call, said in
    the notes). SdpError for an answer that does not match the offer or picks a payload type never offered."""
    ours, theirs = _sections(offer_text), _sections(answer_text)
    if [s.kind for s in theirs] != [s.kind for s in ours]:
        raise SdpError(f"the answer's m= lines ({', '.join(s.kind for s in theirs)}) do not match the offer's "
                       f"({', '.join(s.kind for s in ours)})")
    taken: dict[str, Negotiated] = {}
    notes: list[str] = []
    for mine, section in zip(ours, theirs):
        kind = section.kind
        if mine.media is None or kind in taken or not mine.port:
            continue
        if not section.port or section.media is None:
            notes.append(("audio only: " if kind == "video" else "") + f"the peer refused {kind} (port 0)")
            continue
        taken[kind] = _accepted(mine.media, section, kind)
    if not taken:
        raise SdpError("the answer refuses every m= line of the offer")
    return Answer(answer_text, taken.get("audio"), taken.get("video"), tuple(notes))


def _accepted(mine: Media, section: _Section, kind: str) -> Negotiated:
    media = section.media
    assert media is not None
    for fmt in section.fmts:
        theirs, ours = media.codec(int(fmt)), mine.codec(int(fmt))
        if ours is None:
            raise SdpError(f"the answer's {kind} m= line picks payload type {fmt}"
                           + (f" ({theirs.rtpmap()})" if theirs else "") + ", which the offer did not have "
                           f"(it had {' '.join(str(c.pt) for c in mine.codecs)})")
        if ours.name != "telephone-event":
            break
    else:
        raise SdpError(f"the answer's {kind} m= line has no codec, only {' '.join(section.fmts)}")
    fmtp = dict(ours.fmtp)
    if ours.name == "h264" and theirs is not None and theirs.fmtp:   # no fmtp: the pt stands for the offered format
        fmtp["packetization-mode"] = str(theirs.mode)
    feedback = theirs.feedback if theirs is not None else ()
    chosen = replace(ours, fmtp=fmtp, feedback=tuple(fb for fb in sdp.FEEDBACK if fb in feedback
                                                    and fb in ours.feedback))
    if _rank(chosen, kind) is None:
        raise SdpError(f"the answer's {kind} m= line picks {_label(section, chosen)}, which the box does not speak")
    events = tuple(c for c in media.codecs if c.name == "telephone-event" and mine.codec(c.pt))
    dtmf = _dtmf(replace(media, codecs=events), chosen.clock) if kind == "audio" else None
    return _negotiated(kind, chosen, dtmf, media)


# --- re-INVITEs ---------------------------------------------------------------------------------------------
def changes(old: Answer, new: Answer) -> tuple[str, ...]:
    """What a re-INVITE changed, in words a session acts on: '<kind> added' / 'removed' (a track comes or goes),
    'held' / 'resumed', 'codec changed', 'peer moved' (another address or port)."""
    out = []
    for kind in KINDS:
        a, b = getattr(old, kind), getattr(new, kind)
        if a is None or b is None:
            if a is not b:
                out.append(f"{kind} {'added' if a is None else 'removed'}")
            continue
        if a.on_hold != b.on_hold:
            out.append(f"{kind} {'held' if b.on_hold else 'resumed'}")
        if (a.codec.pt, a.codec.name, _mode(a.codec)) != (b.codec.pt, b.codec.name, _mode(b.codec)):
            out.append(f"{kind} codec changed")
        if (a.peer.host, a.peer.port, a.peer.rtcp_port) != (b.peer.host, b.peer.port, b.peer.rtcp_port) \
                and b.peer.host != HOLD_HOST:
            out.append(f"{kind} peer moved")
    return tuple(out)
