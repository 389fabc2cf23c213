"""What a WHEP viewer gets: the stream as it is when the viewer takes its codec and profile, else an
encoder's output made from the same pictures, else a refusal that says what to configure.

The offer is read before any peer connection exists (aiortc refuses a media whose codecs
it cannot agree on, and the codec preferences must be set before the offer is applied):

    choice = choose(offer_sdp, stream, prefix, encoders)   # Choice(stream, codec, profile, transcoded)
    transceiver.setCodecPreferences(preferences(choice))   # only what fits the stream's bytes

Pass-through needs the viewer to take the codec (H.264 or VP8) and, for H.264, a profile at
least the stream's (services/webrtc/peer.py, `profile_fits`). When it does not, the
viewer is served an `[encoders.NAME]` whose `input` is the stream's pictures (`STREAM-raw`
from decode@STREAM, or STREAM itself when it is raw) and whose codec the viewer takes:
one encode for every such viewer, never one per viewer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiortc import RTCRtpCodecCapability, RTCRtpSender
from aiortc.sdp import SessionDescription

import framebus
from services.runtime.streams import RAW
from services.webrtc.peer import h264_profile, profile_fits

__all__ = ["Choice", "NoCodec", "choose", "offered", "preferences", "stream_facts"]


class NoCodec(Exception):
    """The viewer takes nothing the stream (or an encoder of its pictures) sends: the message says what to do."""


@dataclass(frozen=True)
class Choice:
    stream: str          # what the viewer's video route reads
    codec: str           # h264 | vp8
    profile: str | None  # the stream's H.264 profile-level-id, when known
    transcoded: bool     # an encoder's output, not the stream itself


@dataclass(frozen=True)
class Offered:
    codec: str
    profile: str | None


def offered(offer_sdp: str) -> dict[str, list[Offered]]:
    """Per media kind, the codecs an offer lists (H.264 with its profile-level-id); ValueError if it does not
    parse as SDP."""
    try:
        desc = SessionDescription.parse(offer_sdp)
    except Exception as exc:   # aiortc's parser raises whatever it meets (ValueError, IndexError, KeyError)
        raise ValueError(f"the offer is not SDP aiortc can read: {exc.__class__.__name__}: {exc}") from None
    kinds: dict[str, list[Offered]] = {}
    for media in desc.media:
        for c in media.rtp.codecs:
            name = c.mimeType.split("/")[-1].lower()
            plid = c.parameters.get("profile-level-id") if name == "h264" else None
            kinds.setdefault(media.kind, []).append(Offered(name, str(plid).lower() if plid else None))
    return kinds


def stream_facts(prefix: str, stream: str) -> tuple[str, str, str | None] | None:
    """(kind, codec or pixel format, H.264 profile) of a live stream, None when it has no live producer."""
    try:
        consumer = framebus.Consumer.attach(stream, prefix=prefix, start="oldest")
    except framebus.BusError:
        return None
    try:
        extra = consumer.extradata()
        item = consumer.latest()
        if item is None:
            if extra is not None:
                return "encoded", extra[0], h264_profile(extra[1]) if extra[0] == "h264" else None
            return None
        if item.kind == "encoded":
            codec = item.codec or "?"
            profile = None
            if codec == "h264":
                profile = h264_profile(extra[1] if extra else None) or h264_profile(bytes(item.copy()[:256]))
            return "encoded", codec, profile
        return item.kind, item.format or "?", None
    finally:
        consumer.close()


def _takes(offer: list[Offered], codec: str, profile: str | None) -> bool:
    if codec == "vp8":
        return any(o.codec == "vp8" for o in offer)
    if codec == "h264":
        return any(o.codec == "h264" and profile_fits(profile, o.profile or "42e01f") for o in offer)
    return False


def choose(offer: dict[str, list[Offered]], stream: str, prefix: str, encoders: dict[str, Any]) -> Choice:
    """The stream a viewer of `stream` is sent; NoCodec when there is none it takes."""
    video = offer.get("video", [])
    if not video:
        raise NoCodec("the offer has no video")
    facts = stream_facts(prefix, stream)
    if facts is None:
        raise LookupError(stream)
    kind, codec, profile = facts
    if kind == "encoded" and _takes(video, codec, profile):
        return Choice(stream, codec, profile, False)
    pictures = stream if kind == "video" else stream + RAW
    for name, enc in sorted(encoders.items()):
        if getattr(enc, "input", None) != pictures:
            continue
        out = stream_facts(prefix, name)
        out_codec = out[1] if out else getattr(enc, "codec", "")
        out_profile = out[2] if out else "42e01f"
        if _takes(video, out_codec, out_profile):
            return Choice(name, out_codec, out_profile, True)
    takes = ", ".join(sorted({o.codec + (f" {o.profile}" if o.profile else "") for o in video}))
    what = f"{codec}" + (f" profile {profile}" if profile else "") if kind == "encoded" else f"raw {codec} pictures"
    raise NoCodec(f"stream {stream!r} carries {what}, and the viewer takes {takes}: add an encoder of its pictures "
                  f"in a codec the viewer takes ([encoders.{stream}-vp8] input = \"{pictures}\", codec = \"vp8\")")


def preferences(choice: Choice) -> list[RTCRtpCodecCapability]:
    """The video codec capabilities the answer may use: the chosen codec, H.264 only in the profiles that fit."""
    caps = RTCRtpSender.getCapabilities("video").codecs
    keep = []
    for cap in caps:
        name = cap.mimeType.split("/")[-1].lower()
        if name == choice.codec and (name != "h264" or profile_fits(
                choice.profile, str(cap.parameters.get("profile-level-id", "42e01f")))):
            keep.append(cap)
    # narrowest first: a baseline stream goes out as (constrained) baseline when the viewer offers it
    keep.sort(key=lambda c: str(c.parameters.get("profile-level-id", "")))
    rtx = [c for c in caps if c.mimeType.lower() == "video/rtx"]
    return keep + rtx
