"""What each participant of a bridged room is sent: a pure function of the room, so it is tested alone.

    members = [Member("a", video="a", codec="h264", audio="a-audio", accepts=("h264",)), ...]
    routes = plan(members, policy="speaker", speaker="b", previous="a", pinned="", names=Names())
    routes["a"].video, routes["a"].path, routes["a"].audio      # "b", "pass-through", "b-audio"

The rules (docs/bridge.md):
* A member is a session of the room with media in (a camera, a publisher, a call) or with
  send tracks (`accepts`: a call, which can be sent something). Only the first
  `max_participants` by join time are bridged; the rest are refused.
* Two members: each gets the other's video and audio.
* More: the audio is the member's mix-minus (everyone else, mixed by the bridge); the
  video is one other member's, by policy: the active speaker (the previous speaker for the
  speaker itself), the pinned session, or a grid of everyone else. Never two sources on
  one track; never a member's own video or audio back to it.
* The codec: the source's bytes when the target takes its codec (pass-through); else the
  bridge's transcode of it into a codec the target takes; a source whose codec is not known
  yet is waited for.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from framebus.formats import PIXEL_FORMATS

__all__ = ["Member", "Names", "Route", "TRANSCODABLE", "plan"]

TRANSCODABLE = ("h264", "vp8")       # what the bridge can encode


@dataclass(frozen=True)
class Member:
    id: str
    video: str = ""                  # its video on the bus ('' none)
    codec: str = ""                  # that video's codec ('' not known yet)
    audio: str = ""                  # its audio on the bus ('' none)
    accepts: tuple[str, ...] | None = None   # video codecs its send track takes; () any; None: it takes nothing
    joined: float = 0.0              # when it started (the session's `since`)
    video_tracks: int = 1            # video tracks it takes (a WebRTC room call that offered more: slots 2, 3, ...)
    takes_raw: bool = False          # its send track takes raw pictures too (a WebSocket client)

    @property
    def target(self) -> bool:
        return self.accepts is not None

    @property
    def raw(self) -> bool:
        """Its video is raw pictures (an avatar, a raw camera): a codec is made for a target that takes none."""
        return self.codec in PIXEL_FORMATS


@dataclass(frozen=True)
class Names:
    """The streams the bridge makes, by name."""
    transcode: Callable[[str, str], str] = lambda stream, codec: f"{stream}-to-{codec}"
    mix: Callable[[str], str] = lambda target: f"mix-{target}"          # a Sink name: the stream is mix-X-audio
    grid: Callable[[str], str] = lambda target: f"grid-{target}"


@dataclass(frozen=True)
class Route:
    target: str
    source: str = ""                 # whose video it gets ('' none)
    video: str = ""                  # the stream routed as video
    path: str = "none"               # pass-through | transcode | grid | waiting | none
    codec: str = ""                  # the codec sent
    audio: str = ""                  # the stream routed as audio
    heard: tuple[str, ...] = ()      # whose audio that is
    note: str = ""
    transcode: tuple[str, str] | None = None     # (source stream, codec) when the bridge transcodes
    grid: tuple[str, ...] = field(default=())    # the members a grid shows
    slot: int = 1                                # the target's video track it is (1: its own route)
    slots: tuple[Route, ...] = ()                # its further video tracks, one other member each


def bridged(members: list[Member], max_participants: int) -> tuple[list[Member], list[Member]]:
    """(bridged, refused): the first `max_participants` by join time (then id), the rest."""
    ordered = sorted(members, key=lambda m: (m.joined, m.id))
    return ordered[:max_participants], ordered[max_participants:]


def _codec_for(target: Member, source: Member) -> tuple[str, str, str]:
    """(path, codec, note) of sending `source`'s video to `target`."""
    assert target.accepts is not None
    if not source.codec:
        return "waiting", "", f"waiting for {source.id}'s video codec (its first access unit)"
    if source.raw and not target.takes_raw:
        codec = next((c for c in (target.accepts or TRANSCODABLE) if c in TRANSCODABLE), "")
        if codec:
            return "transcode", codec, f"{source.id} sends raw pictures ({source.codec}), {target.id} takes " \
                                       f"{', '.join(target.accepts) or 'encoded video'}"
        return "none", "", f"{target.id} takes {', '.join(target.accepts)}: nothing the bridge can make"
    if not target.accepts or source.codec in target.accepts or (source.raw and target.takes_raw):
        return "pass-through", source.codec, ""
    for codec in target.accepts:
        if codec in TRANSCODABLE:
            return "transcode", codec, f"{source.id} sends {source.codec}, {target.id} takes " \
                                       f"{', '.join(target.accepts)}"
    return "none", "", (f"{target.id} takes {', '.join(target.accepts)}: nothing the bridge can make from "
                        f"{source.id}'s {source.codec}")


def _video_route(target: Member, source: Member, names: Names) -> dict:
    path, codec, note = _codec_for(target, source)
    if path == "pass-through":
        return {"source": source.id, "video": source.video, "path": path, "codec": codec}
    if path == "transcode":
        return {"source": source.id, "video": names.transcode(source.video, codec), "path": path, "codec": codec,
                "note": note, "transcode": (source.video, codec)}
    return {"source": source.id, "path": path, "note": note}


def _shown(others: list[Member], policy: str, speaker: str, previous: str, pinned: str) -> Member | None:
    """Whose video a target gets (one of `others`: the members with video but the target)."""
    if not others:
        return None
    by_id = {m.id: m for m in others}
    order = []
    if policy == "pin" and pinned:
        order.append(pinned)
    order += [speaker, previous]
    for sid in order:
        if sid and sid in by_id:
            return by_id[sid]
    return others[0]                 # nobody has spoken yet: the first to join


def plan(members: list[Member], *, policy: str = "speaker", speaker: str = "", previous: str = "", pinned: str = "",
         names: Names = Names()) -> dict[str, Route]:
    """The route of each target among `members` (already the bridged ones)."""
    out: dict[str, Route] = {}
    for target in (m for m in members if m.target):
        others = [m for m in members if m.id != target.id]
        with_video = [m for m in others if m.video]
        if len(members) <= 2:
            audio = others[0].audio if others else ""
            heard = (others[0].id,) if others and others[0].audio else ()
        else:
            audio = names.mix(target.id) + "-audio"
            heard = tuple(m.id for m in others if m.audio)
        video: dict = {}
        if policy == "grid" and len(members) > 2 and with_video:
            codec = next((c for c in (target.accepts or TRANSCODABLE) if c in TRANSCODABLE), "")
            if codec:
                video = {"video": names.grid(target.id), "path": "grid", "codec": codec,
                         "grid": tuple(m.id for m in with_video)}
            else:
                video = {"path": "none", "note": f"{target.id} takes no codec a grid is made in"}
        else:
            source = _shown(with_video, policy, speaker, previous, pinned)
            if source is not None:
                video = _video_route(target, source, names)
        slots: list[Route] = []
        if target.video_tracks > 1 and len(members) > 2 and policy != "grid":
            # a target that takes several video tracks gets every other member on its own: the one policy shows
            # first (slot 1, switched as the speaker changes), the rest in join order on slots 2, 3, ...
            rest = [m for m in with_video if m.id != video.get("source")]
            for n, source in enumerate(rest[:target.video_tracks - 1], start=2):
                slots.append(Route(target.id, slot=n, **_video_route(target, source, names)))
        out[target.id] = Route(target.id, audio=audio, heard=heard if audio else (), slots=tuple(slots), **video)
    return out
