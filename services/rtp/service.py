"""The RTP endpoint: `rtp@NAME`, one call with a peer described by SDP, its media in and out of the bus.

`edgeroom service rtp NAME` reads [rtp.NAME]: the peer's SDP says what it sends and where
it receives (services/rtp/sdp.py). For each m= line whose codec the box speaks, the
service binds a pair of UDP sockets (RTP, and RTCP on the next port; `video_port` /
`audio_port`, 0 picks a free pair) and, on the asyncio loop (each socket drained per wake-up):

* receives what the peer sends (services/rtp/inbound.py): checked, reordered in the
  jitter buffer, depacketized onto the bus as NAME (access units; decode@NAME makes
  pictures of them) and NAME-audio (s16 PCM);
* sends `send_video` / `send_audio` off the bus (services/rtp/outbound.py), paced, kept
  for NACK;
* speaks RTCP (services/rtp/rtcp.py): a report each second per media (SR when it sends,
  RR otherwise), NACK for gaps, PLI then FIR when a keyframe of NAME is wanted (its
  `stream.keyframe` offer, through KeyframeRequests: decode asks after a loss), and a
  peer's PLI or FIR asks the producer of the stream it is sent for a keyframe.

Only the negotiated peer's address is listened to (`latch = true`: the first address
that sends, for a peer behind NAT, which is then where media goes); every other datagram
is dropped and counted (`edgeroom_rtp_dropped_packets_total{reason="wrong_source"}`), like
every bad packet: the call goes on, the service never dies of its input.

The call is one session (id NAME, kind "call", the configured room) whose tracks are the
inbound media while they flow and the outbound ones while they are sent. `session.sdp`
answers `edgeroom ctl sdp NAME`: the box's SDP (what a sender points at), or with
for=receiver the SDP of what the box sends (what ffmpeg -i or GStreamer reads).
"""
from __future__ import annotations

import gc
import socket
from pathlib import Path
from typing import Any

from services.calls.book import RouteBook
from services.control.protocol import ProtocolError
from services.rtp import sdp
from services.rtp.call import Plan, RtpCall, RtpMetrics
from services.rtp.spec import RtpConfig
from services.runtime.keyframes import KeyframeRequests, cannot
from services.runtime.rate import RateMeter
from services.runtime.service import AsyncService

__all__ = ["Rtp", "local_host", "resolve"]

REPORT_INTERVAL = 1.0      # seconds between RTCP reports (a LAN call: quick A/V sync, little traffic)


def resolve(host: str) -> str:
    if not host:
        return ""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
    except OSError as exc:
        raise OSError(f"cannot resolve the peer's address {host!r}: {exc}") from None


def local_host(bound: str, peer: str) -> str:
    """The address a peer reaches the box's sockets at (bound to `bound`): the route's source address to it."""
    if bound not in ("0.0.0.0", ""):
        return bound
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((peer or "192.0.2.1", 9))    # no packet is sent: it picks the route's address
        return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


class Rtp(AsyncService):
    kind = "rtp"

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        table = getattr(self.config, "rtp", {})
        if self.instance not in table:
            raise ValueError(f"no [rtp.{self.instance}] in the config (calls: {', '.join(table) or 'none'})")
        self.cfg: RtpConfig = table[self.instance]
        self.stream = self.instance
        self.peer_sdp = sdp.parse(self._sdp_text())
        self.peer_host = resolve(self.cfg.peer) if self.cfg.peer else resolve(self.peer_sdp.host or "")
        self.meter = RateMeter()
        self.keyframes = KeyframeRequests(self.registry, self.loop, lambda stream: self.call.make_keyframe())
        self.routes = RouteBook(self)
        self.call = RtpCall(self, self.instance, self.cfg, RtpMetrics(self.registry), self.routes, self.cfg.route(),
                            keyframes=self.keyframes)
        self.own(self.call, lambda call: call.close(), "the call's media")
        plans = self._plans()
        if not plans:
            raise ValueError(f"[rtp.{self.instance}]: the SDP has no media the box speaks "
                             f"({'; '.join(self.call.notes)})")
        self.call.open(plans)
        self.offer_keyframes(self._keyframe_request)
        self.offer("session.sdp", self._sdp_answer, "the SDP of a call: the box's (for=sender, what a peer sends "
                   "to) or what it sends (for=receiver, what ffmpeg -i or GStreamer reads) (args: session, for)",
                   args={"session": str, "for": str}, required=("session",))
        self.loop.every(REPORT_INTERVAL, self._tick)
        self.log.info("call %s: %s", self.instance, "; ".join(self.call.describe_media()))

    def _plans(self) -> list[Plan]:
        """Per m= line of the peer's SDP, the first codec the box speaks; the media the peer sends, and the one it
        receives when its SDP gives a port and a direction that lets it."""
        plans = []
        route = self.cfg.route()
        for kind in ("video", "audio"):
            peer = self.peer_sdp.of(kind)
            if peer is None:
                continue
            codec = sdp.negotiate(peer)
            if codec is None:
                offered = ", ".join(f"{c.name}/{c.pt}" + (f" mode {c.mode}" if c.name == "h264" else "")
                                    for c in peer.codecs) or "none"
                self.call.notes.append(f"{kind}: no codec the box speaks (offered: {offered})")
                self.log.warning("the peer's %s: no codec the box speaks (offered: %s); this media is left out",
                                 kind, offered)
                continue
            sends = peer.direction in ("sendrecv", "recvonly") and bool(peer.port) and bool(self.peer_host)
            if not sends and route.of(kind):
                self.call.notes.append(f"{kind}: the peer receives none ({peer.direction}, port {peer.port})")
            port = self.cfg.video_port if kind == "video" else self.cfg.audio_port
            plans.append(Plan(kind, codec, peer, self.peer_host, sends, peer.direction in ("sendrecv", "sendonly"),
                              port))
        return plans

    def _sdp_text(self) -> str:
        text = self.cfg.sdp
        if not text:
            raise ValueError(f"[rtp.{self.instance}] sdp is empty: it names the peer's SDP (a file, or inline)")
        if text.lstrip().startswith("v="):
            return text
        try:
            return Path(text).read_text()
        except OSError as exc:
            raise OSError(f"[rtp.{self.instance}] sdp: cannot read {text}: {exc.strerror}") from None

    async def started(self) -> None:
        self.call.start()
        # the ~50k objects of setup (aiortc, PyAV, the metrics) live as long as the call: out of the collector's
        # reach, a full collection during the call scans what the call made since (well under 1 ms), not them too
        # (28-40 ms on the build machine: the media stood still that long)
        gc.collect()
        gc.freeze()

    def apply(self, new: Any, changes: list[Any]) -> list[str]:
        """A reload: the routes apply (services/calls/); every other key of the call needs a restart."""
        entry = getattr(new, "rtp", {}).get(self.instance)
        if entry is not None:
            self.routes.configure(self.instance, entry.route())
        return [c.key for c in changes if not c.live]

    # ------------------------------------------------------------ keyframes of NAME (from the peer)
    def _keyframe_request(self, stream: str, reason: str) -> dict[str, Any]:
        if stream != self.stream:
            raise ProtocolError("not_found", f"{self.id} produces {self.stream}, not {stream!r}")
        why = self.call.can_make_keyframe()
        if why is not None:
            return cannot(why)
        return self.keyframes.request(stream, reason)

    # ------------------------------------------------------------ once a second
    def _tick(self) -> None:
        self.meter.update(self.call.sink.frames)
        self.call.tick()

    # ------------------------------------------------------------ SDP
    def box_sdp(self) -> str:
        """The box's side: its address and ports, the codecs it settled on, the direction it sees."""
        media = []
        for m in self.call.media.values():
            sends, receives = m.outbound is not None, m.inbound is not None
            direction = {(True, True): "sendrecv", (True, False): "sendonly", (False, True): "recvonly"}.get(
                (sends, receives), "inactive")
            media.append((sdp.Media(m.kind, m.port, "", m.rtcp_port, (m.codec,), direction,
                                    m.plan.peer.bandwidth_kbps), m.codec))
        return sdp.write(f"edgeroom {self.id}", local_host(self.cfg.local_address, self.peer_host), media,
                         session_id=int(self.started_at))

    def receiver_sdp(self) -> str:
        """What the box sends, addressed to the peer: what a receive-only peer (ffmpeg -i, GStreamer) reads."""
        media = []
        for m in self.call.media.values():
            if m.outbound is None or m.rtp_to is None:
                continue
            rtcp_port = m.rtcp_to[1] if m.rtcp_to else m.rtp_to[1] + 1
            media.append((sdp.Media(m.kind, m.rtp_to[1], "", rtcp_port, (m.codec,), "recvonly"), m.codec))
        if not media:
            raise ProtocolError("not_found", f"{self.id} sends nothing to its peer (send_video / send_audio, and "
                                             "the SDP's direction)")
        first = self.call.media[next(iter(self.call.media))].rtp_to
        return sdp.write(f"edgeroom {self.id}", first[0] if first else self.peer_host, media,
                         session_id=int(self.started_at))

    def _sdp_answer(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["session"] != self.instance:
            raise ProtocolError("not_found", f"{self.id} has the session {self.instance!r}, not {args['session']!r}")
        side = args.get("for", "sender")
        if side not in ("sender", "receiver"):
            raise ProtocolError("bad_args", f"for must be sender or receiver, got {side!r}")
        text = self.box_sdp() if side == "sender" else self.receiver_sdp()
        return {"session": self.instance, "for": side, "sdp": text,
                "ports": {k: {"rtp": m.port, "rtcp": m.rtcp_port} for k, m in self.call.media.items()}}

    # ------------------------------------------------------------ what the hub sees
    def describe(self) -> dict[str, Any]:
        status = self.call.summary() + "; " + "; ".join(self.call.describe_media())
        return {"status": status[:200], "rate": round(self.meter.rate, 2), "streams": self.call.sink.streams(),
                "sessions": [{"id": self.instance, "room": self.cfg.room, "kind": "call",
                              "tracks": self.call.tracks(),
                              **({"accepts": self.call.reader.accepts()} if self.call.reader is not None else {})}]}
