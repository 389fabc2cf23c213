"""One peer connection of the WebRTC service: a WHIP publisher, a WHEP viewer, or a room call.

| kind      | what the peer sends               | what the peer gets                       | a session of a room |
|-----------|-----------------------------------|------------------------------------------|---------------------|
| publisher | NAME, NAME-audio on the bus       | nothing                                  | yes (NAME)          |
| viewer    | nothing                           | a stream of the bus and its audio        | no (listed apart)   |
| call      | NAME, NAME-audio on the bus       | the session's routes (config, ctl route, the bridge) | yes (NAME) |

Inbound video goes to the bus as the browser encoded it (services/webrtc/peer.py, `tap_video`);
inbound audio is decoded by aiortc (Opus) and put on the bus as s16 PCM, as every audio
stream of the box is. Outbound video is read off the bus by the session's RouteReader
(services/calls/route.py: keyframe gate, switch on a keyframe) and handed to aiortc as
packets, never decoded; outbound audio is PCM that aiortc encodes.

Keyframes both ways: a viewer's PLI/FIR asks the producer of what it is sent (through the
route); a keyframe the bus wants of NAME (decode after a loss, a route switching to NAME) is
a PLI to the publisher; aiortc also sends PLI and NACK itself on loss. On join the route asks
the producer for a keyframe and asks again, at most once a second, until it comes.
"""
from __future__ import annotations

import asyncio
import fractions
import functools
import secrets
import time
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from services.calls.book import MAX_SLOTS
from services.calls.config import Route
from services.capture.sink import Sink
from services.webrtc.peer import (
    BusAudioTrack,
    BusVideoTrack,
    h264_keyframe,
    now_ns,
    send_pli,
    tap_video,
    vp8_keyframe,
)

__all__ = ["PeerSession"]

_VIDEO_TB = fractions.Fraction(1, 90000)


class PeerSession:
    """`host` is the service: it gives the sink, the route reader, the metrics and the loop."""

    def __init__(self, host: Any, kind: str, name: str, room: str, *, route: Route | None = None,
                 video_codec: str | None = None, transcoded: bool = False, token_name: str = "") -> None:
        self.host, self.kind, self.name, self.room = host, kind, name, room
        self.id = secrets.token_hex(8)
        self.route = route
        self.video_codec = video_codec
        self.transcoded = transcoded
        self.token_name = token_name
        self.created = time.monotonic()
        self.connected_at: float | None = None
        self.disconnected_at: float | None = None
        self.pc = RTCPeerConnection()
        self.sink: Sink | None = None
        self.reader: Any = None
        self.video_track: BusVideoTrack | None = None
        self.audio_track: BusAudioTrack | None = None
        self.video_receiver: Any = None
        # a room call's further video tracks (video m-lines its offer receives on beyond the first): per slot
        # (2, 3, ...) the track sent and the reader of its route (the bridge puts one participant on each)
        self.slots: dict[int, tuple[BusVideoTrack, Any]] = {}
        self.slot_codecs: dict[int, str] = {}
        self.inbound: dict[str, dict[str, Any]] = {}     # kind -> {codec, units, keyframes, width...}
        self.ended = ""
        self._tasks: list[asyncio.Task[Any]] = []
        self._pli_at = 0.0
        self.pc.on("connectionstatechange", self._state)

    @property
    def publishes(self) -> bool:
        return self.kind in ("publisher", "call")

    @property
    def receives(self) -> bool:
        return self.kind in ("viewer", "call")

    @property
    def route_session(self) -> str:
        """The id its route is kept under (`ctl route`): the session's name; a viewer's own id."""
        return self.name if self.kind == "call" else f"whep-{self.id}"

    # ------------------------------------------------------------ negotiation
    async def answer(self, offer_sdp: str, prefer: list[Any] | None = None,
                     kinds: tuple[str, ...] = ("video", "audio")) -> str:
        """Apply the peer's offer (whose media are `kinds`) and return the answer (ICE gathered: no trickle needed
        from the box)."""
        h = self.host
        if self.receives:
            self.video_track = BusVideoTrack(max_wait_ns=h.cfg.viewer_queue_ms * 1_000_000,
                                             ask_keyframe=self._ask_route_keyframe, dropped=self._dropped)
            self.audio_track = BusAudioTrack(dropped=self._dropped)
            for kind in kinds:      # made before the offer is applied: the codec preferences must be in place
                t = self.pc.addTransceiver(kind, direction="sendrecv" if self.publishes else "sendonly")
                if kind == "video" and prefer:
                    t.setCodecPreferences(prefer)
        made = list(self.pc.getTransceivers())
        await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        if self.kind == "call":
            self._slots([t for t in self.pc.getTransceivers() if t not in made], made)
        for t in self.pc.getTransceivers():
            if self.receives and t.sender.track is None and t.kind in ("video", "audio"):
                t.sender.replaceTrack(self.video_track if t.kind == "video" else self.audio_track)
            if self.publishes and t.receiver.track is not None:
                if t.kind == "video":
                    self.video_receiver = t.receiver
                    tap_video(t.receiver, self._video_unit)
                else:
                    self._tasks.append(asyncio.ensure_future(self._audio_in(t.receiver.track)))
            if self.receives and t.kind == "video":
                t.sender._send_keyframe = self._viewer_pli    # a viewer's PLI/FIR: the producer's keyframe
        if self.publishes:
            self.sink = h.make_sink(self.name)
        if self.receives:
            self.reader = h.make_reader(self)
            h.loop.add_reader(self.reader.fileno(), self._send)
        for slot, codec in self.slot_codecs.items():
            reader = h.make_slot_reader(self, slot, codec)
            self.slots[slot] = (self.slots[slot][0], reader)
            h.loop.add_reader(reader.fileno(), functools.partial(self._send_slot, slot))
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        if self.publishes:
            self._negotiated_inbound()
        if self.receives:
            self.video_track.extradata = self._extradata()
        return str(self.pc.localDescription.sdp)

    def _negotiated_inbound(self) -> None:
        """The tracks the peer will send, listed from the answer on (not from their first packet: a listing taken
        before the first audio frame arrives still shows the audio)."""
        for t in self.pc.getTransceivers():
            if t.receiver.track is None or not t._codecs or t.kind not in ("video", "audio"):
                continue
            codec = t._codecs[0].mimeType.split("/")[-1].lower()
            if t.kind == "video":
                self.inbound.setdefault("video", {"codec": codec, "units": 0, "keyframes": 0})
            else:
                self.inbound.setdefault("audio", {"codec": codec, "units": 0, "rate": t._codecs[0].clockRate})

    def _slots(self, made: list[Any], ours: list[Any]) -> None:
        """Video m-lines the peer's offer receives on beyond the first (a browser that shows every participant
        on its own track): each is a slot the box sends on, with a route of its own."""
        bundle = {t.receiver.transport for t in ours}
        slot = 2
        for t in made:
            if len(bundle) == 1 and t.receiver.transport not in bundle:
                # aiortc made it on our video transceiver's first transport, which the BUNDLE replaced (and
                # stopped) when the offer's first m-line is not video (a browser's offer puts audio first)
                primary = next(iter(bundle))
                t.receiver.setTransport(primary)
                t.sender.setTransport(primary)
            if t.kind != "video" or t.receiver.track is not None or not t._codecs or slot > MAX_SLOTS:
                continue
            track = BusVideoTrack(max_wait_ns=self.host.cfg.viewer_queue_ms * 1_000_000,
                                  ask_keyframe=functools.partial(self._ask_slot_keyframe, slot), dropped=self._dropped)
            if self.video_codec:    # the call's codec on every track (the offer's first may be another)
                t._codecs.sort(key=lambda c: c.mimeType.lower() != f"video/{self.video_codec}")
            t.direction = "sendonly"
            t.sender.replaceTrack(track)
            t.sender._send_keyframe = functools.partial(self._ask_slot_keyframe, slot, "pli")
            self.slots[slot] = (track, None)
            self.slot_codecs[slot] = t._codecs[0].mimeType.split("/")[-1].lower()
            slot += 1

    def _send_slot(self, slot: int) -> None:
        track, reader = self.slots[slot]
        if reader is None:
            return
        while (m := reader.poll()) is not None:
            if m.track == "video":
                if m.keyframe and m.codec == "h264":
                    extra = reader.extradata()
                    if extra:
                        track.extradata = extra[1]
                track.push(m.data, m.keyframe, m.capture_ns)

    def _ask_slot_keyframe(self, slot: int, reason: str = "pli") -> None:
        reader = self.slots.get(slot, (None, None))[1]
        if reader is not None:
            reader.request_keyframe(reason)

    def accepts(self) -> dict[str, Any]:
        """What its send tracks take (the hub's `accepts`): the route reader's, and how many video tracks."""
        out = self.reader.accepts() if self.reader is not None else {}
        if self.slots:
            out["video_tracks"] = 1 + len(self.slots)
        return out

    async def add_candidates(self, fragment: str) -> int:
        """Trickle ICE (a PATCH body, application/trickle-ice-sdpfrag): the candidates added."""
        from aiortc.sdp import candidate_from_sdp
        added = 0
        mid = None
        for line in fragment.splitlines():
            line = line.strip()
            if line.startswith("a=mid:"):
                mid = line[6:]
            elif line.startswith("a=candidate:"):
                cand = candidate_from_sdp(line[12:])
                cand.sdpMid = mid
                await self.pc.addIceCandidate(cand)
                added += 1
            elif line == "a=end-of-candidates":
                pass
        return added

    def _state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self.connected_at = self.connected_at or time.monotonic()
            self.disconnected_at = None
            if self.reader is not None:
                self.reader.request_keyframe("join")
        elif state == "disconnected":
            self.disconnected_at = time.monotonic()
        elif state in ("failed", "closed") and not self.ended:
            self.host.loop.spawn(self.host.end(self, "ice_failed" if state == "failed" else "closed"))

    # ------------------------------------------------------------ in: peer -> bus
    def _video_unit(self, codec: str, data: bytes, timestamp: int) -> None:
        if self.sink is None or not data:
            return
        key = h264_keyframe(data) if codec == "h264" else vp8_keyframe(data) if codec == "vp8" else False
        info = self.inbound.setdefault("video", {"codec": codec, "units": 0, "keyframes": 0})
        if not info["units"] and not key:
            self.host.request_pli(self, "the stream began without a keyframe")
        info["units"] += 1
        info["keyframes"] += key
        if codec == "h264" and key:
            sps_pps = _parameter_sets(data)
            if sps_pps:
                self.sink.set_extradata(sps_pps, "h264")
        self.sink.encoded(data, codec, keyframe=key, pts=timestamp, time_base=_VIDEO_TB, capture_ns=now_ns())
        self.host.m.units_in.labels("video").inc()

    async def _audio_in(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                if self.sink is None:
                    continue
                pcm = frame.to_ndarray()
                channels = len(frame.layout.channels)
                pcm = np.ascontiguousarray(pcm.reshape(-1, channels))
                info = self.inbound.setdefault("audio", {"codec": "opus", "units": 0})
                info["units"] += 1
                info["rate"] = frame.sample_rate
                self.sink.audio(pcm, frame.sample_rate, pts=int(frame.pts or 0), capture_ns=now_ns())
                self.host.m.units_in.labels("audio").inc()
        except (MediaStreamError, asyncio.CancelledError):
            pass

    def want_keyframe(self, reason: str) -> bool:
        """The bus wants a keyframe of this publisher's video: a PLI (throttled to 4 a second)."""
        if self.video_receiver is None or self.ended:
            return False
        now = time.monotonic()
        if now - self._pli_at < 0.25:
            return True
        self._pli_at = now
        self._tasks.append(asyncio.ensure_future(send_pli(self.video_receiver)))
        self.host.m.feedback.labels("pli_sent").inc()
        return True

    # ------------------------------------------------------------ out: bus -> peer
    def _send(self) -> None:
        reader = self.reader
        if reader is None:
            return
        while (m := reader.poll()) is not None:
            if m.track == "video":
                if self.video_track is not None:
                    if m.keyframe and m.codec == "h264":
                        extra = reader.extradata()
                        if extra:
                            self.video_track.extradata = extra[1]
                    self.video_track.push(m.data, m.keyframe, m.capture_ns)
            elif self.audio_track is not None:
                self.audio_track.push(m.data, m.rate, m.channels)

    def _extradata(self) -> bytes | None:
        extra = self.reader.extradata() if self.reader is not None else None
        return extra[1] if extra and extra[0] == "h264" else None

    def _viewer_pli(self) -> None:
        self.host.m.feedback.labels("pli_received").inc()
        self._ask_route_keyframe("pli")

    def _ask_route_keyframe(self, reason: str) -> None:
        if self.reader is not None:
            self.reader.request_keyframe(reason)

    def _dropped(self, reason: str, n: int) -> None:
        self.host.m.viewer_dropped.labels(reason).inc(n)

    # ------------------------------------------------------------ status, end
    def tracks(self) -> list[dict[str, Any]]:
        out = []
        for kind, info in self.inbound.items():
            stream = self.name if kind == "video" else f"{self.name}-audio"
            track = {"id": kind, "kind": kind, "stream": stream, "format": info["codec"] if kind == "video" else "s16"}
            if kind == "audio":
                track["rate"] = info.get("rate", 48000)
            out.append(track)
        if self.reader is not None and self.kind == "call":
            out += self.reader.tracks()
            for slot, (_track, reader) in sorted(self.slots.items()):
                out += [{**t, "id": f"{t['id']}{slot}", "slot": slot} for t in (reader.tracks() if reader else [])]
        return out

    def describe(self) -> dict[str, Any]:
        sent = self.video_track.sent if self.video_track else 0
        return {"id": self.id, "kind": self.kind, "name": self.name, "room": self.room,
                "state": self.pc.connectionState, "age_s": round(time.monotonic() - self.created, 1),
                "video_codec": self.video_codec or (self.inbound.get("video", {}).get("codec")),
                "path": ("transcode" if self.transcoded else "pass-through") if self.receives else "",
                "route": ({"video": self.reader.route.video, "audio": self.reader.route.audio}
                          if self.reader is not None else None),
                "frames_sent": sent, "units_in": {k: v["units"] for k, v in self.inbound.items()},
                "token": self.token_name}

    async def close(self, why: str) -> None:
        if self.ended:
            return
        self.ended = why
        if self.reader is not None:
            self.host.loop.remove_reader(self.reader.fileno())
        for track, reader in self.slots.values():
            track.stop()
            if reader is not None:
                self.host.loop.remove_reader(reader.fileno())
        for t in self._tasks:
            t.cancel()
        for track in (self.video_track, self.audio_track):
            if track is not None:
                track.stop()
        try:
            await self.pc.close()
        except Exception as exc:   # a half-made connection may fail to close: it is gone either way
            self.host.log.debug("closing %s %s: %s", self.kind, self.name, exc)


def _parameter_sets(au: bytes) -> bytes:
    """The SPS and PPS NAL units at the front of an IDR access unit (Annex B, with start codes)."""
    out = []
    i = au.find(b"\x00\x00\x01")
    while i != -1 and i + 3 < len(au):
        kind = au[i + 3] & 0x1F
        j = au.find(b"\x00\x00\x01", i + 3)
        end = len(au) if j == -1 else (j - 1 if au[j - 1] == 0 else j)
        if kind in (7, 8):
            out.append(b"\x00\x00\x00\x01" + au[i + 3:end])
        elif kind in (1, 5):
            break
        i = j
    return b"".join(out)

