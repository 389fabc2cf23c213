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
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.calls.book import RouteBook
from services.capture.sink import Sink, SinkMetrics
from services.control.protocol import ProtocolError
from services.rtp import rtcp, sdp
from services.rtp.spec import RtpConfig
from services.runtime.keyframes import KeyframeRequests, cannot
from services.runtime.rate import RateMeter
from services.runtime.service import AsyncService
from services.runtime.streams import audio_stream

__all__ = ["Rtp"]

REPORT_INTERVAL = 1.0      # seconds between RTCP reports (a LAN call: quick A/V sync, little traffic)
FIR_AFTER = 1.2            # a keyframe request still pending this long after a PLI also sends FIR
MIN_MAX_PACKET = 1500      # the largest datagram accepted is max(mtu, this)
BATCH = 32                 # bus items read per wake-up at most
READ_BATCH = 64            # datagrams read from a socket per wake-up at most (then the loop's other work runs)


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class _Media:
    kind: str
    peer: sdp.Media                       # the peer's m= line
    codec: sdp.Codec
    rtp_sock: socket.socket
    rtcp_sock: socket.socket
    rtp_to: tuple[str, int] | None        # where media goes (None: the peer receives none)
    rtcp_to: tuple[str, int] | None
    receives: bool                        # the peer sends this media
    inbound: Any = None
    outbound: Any = None
    readers: list[int] = field(default_factory=list)    # the fds the loop reads (empty until started, after stop)
    rtp_from: tuple[str, int] | None = None    # latched source addresses
    rtcp_from: tuple[str, int] | None = None
    report_ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    drop: Any = None                      # the media's drop counter: drop(reason, n=1)
    packets_in: Any = None                # its counters with the call and media labels bound (not looked up per packet)
    packets_out: Any = None
    socket_errors: Any = None
    expiry_at: int = 0                    # when the jitter buffer's timer is set for (ns), 0 when none
    pli_at: float = 0.0
    fir_seq: int = 0
    keyframe_seen_at: float = 0.0

    @property
    def port(self) -> int:
        return int(self.rtp_sock.getsockname()[1])

    @property
    def rtcp_port(self) -> int:
        return int(self.rtcp_sock.getsockname()[1])

    @property
    def ssrc(self) -> int:
        return self.outbound.ssrc if self.outbound is not None else self.report_ssrc


def _bind_pair(address: str, port: int) -> tuple[socket.socket, socket.socket]:
    """RTP and RTCP sockets on `port` and `port + 1`; port 0: a free pair the kernel offers."""
    for _ in range(50 if port == 0 else 1):
        rtp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtcp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rtp_sock.bind((address, port))
            rtcp_sock.bind((address, rtp_sock.getsockname()[1] + 1))
        except OSError as exc:
            rtp_sock.close()
            rtcp_sock.close()
            if port:
                raise OSError(f"cannot bind {address}:{port} and {port + 1} for RTP and RTCP: {exc}") from None
            continue
        for s in (rtp_sock, rtcp_sock):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return rtp_sock, rtcp_sock
    raise OSError(f"no free pair of UDP ports on {address} for RTP and RTCP")


def _resolve(host: str) -> str:
    if not host:
        return ""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
    except OSError as exc:
        raise OSError(f"cannot resolve the peer's address {host!r}: {exc}") from None


class Rtp(AsyncService):
    kind = "rtp"

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        from services.rtp.inbound import Inbound  # aiortc and PyAV: the extras this service needs
        from services.rtp.outbound import Outbound, Pacer

        table = getattr(self.config, "rtp", {})
        if self.instance not in table:
            raise ValueError(f"no [rtp.{self.instance}] in the config (calls: {', '.join(table) or 'none'})")
        self.cfg: RtpConfig = table[self.instance]
        self.stream = self.instance
        self.prefix = self.config.bus.prefix
        self.peer_sdp = sdp.parse(self._sdp_text())
        self.peer_host = _resolve(self.cfg.peer) if self.cfg.peer else _resolve(self.peer_sdp.host or "")
        self.cname = f"edgeroom-{self.instance}@{socket.gethostname()}"
        self._metrics()
        self.sink = self.own(Sink(self.stream, self.prefix, self.sink_metrics))
        self.clocks = rtcp.Clocks()
        self.keyframes = KeyframeRequests(self.registry, self.loop, self._make_keyframe)
        self.media: dict[str, _Media] = {}
        self.meter = RateMeter()
        self.notes: list[str] = []
        self._defect_at = 0.0
        self.max_packet = max_packet = max(self.cfg.mtu, MIN_MAX_PACKET)
        for kind in ("video", "audio"):
            peer = self.peer_sdp.of(kind)
            if peer is None:
                continue
            codec = sdp.negotiate(peer)
            if codec is None:
                offered = ", ".join(f"{c.name}/{c.pt}" + (f" mode {c.mode}" if c.name == "h264" else "")
                                    for c in peer.codecs) or "none"
                self.notes.append(f"{kind}: no codec the box speaks (offered: {offered})")
                self.log.warning("the peer's %s: no codec the box speaks (offered: %s); this media is left out",
                                 kind, offered)
                continue
            port = self.cfg.video_port if kind == "video" else self.cfg.audio_port
            rtp_sock, rtcp_sock = self.own(_bind_pair(self.cfg.local_address, port), self._close_pair,
                                           f"{kind} sockets")
            host = self.peer_host
            sends = peer.direction in ("sendrecv", "recvonly") and bool(peer.port) and bool(host)
            m = _Media(kind, peer, codec, rtp_sock, rtcp_sock,
                       (host, peer.port) if sends else None, (host, peer.rtcp_port) if sends else None,
                       peer.direction in ("sendrecv", "sendonly"))
            self.media[kind] = m
            m.drop = self._dropper(kind)
            m.packets_in = self.m_packets_in.labels(self.instance, kind)
            m.packets_out = self.m_packets_out.labels(self.instance, kind)
            m.socket_errors = self.m_socket_errors.labels(self.instance, kind)
            if m.receives:
                m.inbound = Inbound(kind, self.stream if kind == "video" else audio_stream(self.stream), codec,
                                    self.sink, self.clocks, jitter_ms=self.cfg.jitter_ms, max_packet=max_packet,
                                    max_bps=self._max_bps(peer), drop=m.drop,
                                    drop_unit=lambda why, k=kind: self.m_units_dropped.labels(self.instance, k,
                                                                                         why).inc(),
                                    want_keyframe=lambda why: self.keyframes.request(self.stream, why),
                                    keyframe_sent=self._keyframe_on_bus,
                                    lost=lambda n, k=kind: self.m_lost.labels(self.instance, k).inc(n),
                                    missing=lambda ssrc, seqs, m=m: self._nack(m, ssrc, seqs),
                                    unit=self.m_units.labels(self.instance, kind).inc, log=self.log)
                if kind == "video":
                    self.sink.open_encoded(codec.name, 0, 0)   # readers (decode) attach before the first unit
            if m.rtp_to is not None:       # the peer receives this media: what its route hands out goes there
                pacer = Pacer(self.cfg.pacing_kbps * 1000, self.cfg.mtu, lambda data, m=m: self._send_rtp(m, data),
                              self.loop.aio.call_later)
                m.outbound = Outbound(kind, self.instance, codec, mtu=self.cfg.mtu, history=self.cfg.nack_buffer,
                                      pacer=pacer, drop=lambda why, k=kind: self._unsent(k, why), log=self.log)
            elif self.cfg.route().of(kind):
                self.notes.append(f"{kind}: the peer receives none ({peer.direction}, port {peer.port})")
        if not self.media:
            raise ValueError(f"[rtp.{self.instance}]: the SDP has no media the box speaks ({'; '.join(self.notes)})")
        # what the call sends: its routes (config, or `ctl route`), switched on a keyframe (services/calls/)
        video = self.media.get("video")
        self.routes = RouteBook(self, video_codecs=(video.codec.name,) if video is not None else ("none",))
        self.reader = self.own(self.routes.reader(self.instance, self.cfg.route()))
        self.loop.add_reader(self.reader.fileno(), self._send)
        self.on_stop(lambda: self.loop.remove_reader(self.reader.fileno()))
        self._again = False
        self.offer_keyframes(self._keyframe_request)
        self.offer("session.sdp", self._sdp_answer, "the SDP of a call: the box's (for=sender, what a peer sends "
                   "to) or what it sends (for=receiver, what ffmpeg -i or GStreamer reads) (args: session, for)",
                   args={"session": str, "for": str}, required=("session",))
        self.loop.every(REPORT_INTERVAL, self._tick)
        self.log.info("call %s: %s", self.instance, "; ".join(self._describe_media()))

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

    def _max_bps(self, peer: sdp.Media) -> int:
        if self.cfg.max_kbps:
            return self.cfg.max_kbps * 1000
        return 4 * peer.bandwidth_kbps * 1000 if peer.bandwidth_kbps else 0

    @staticmethod
    def _close_pair(pair: tuple[socket.socket, socket.socket]) -> None:
        for s in pair:
            s.close()

    async def started(self) -> None:
        for m in self.media.values():
            for sock, handler in ((m.rtp_sock, self._rtp_in), (m.rtcp_sock, self._rtcp_in)):
                self.loop.aio.add_reader(sock.fileno(), self._read, m, sock, handler)
                m.readers.append(sock.fileno())
        self.on_stop(self._stop_reading)
        # the ~50k objects of setup (aiortc, PyAV, the metrics) live as long as the call: out of the collector's
        # reach, a full collection during the call scans what the call made since (well under 1 ms), not them too
        # (28-40 ms on the build machine: the media stood still that long)
        gc.collect()
        gc.freeze()

    def _stop_reading(self) -> None:
        for m in self.media.values():
            if m.inbound is not None:
                m.inbound.close()
            for fd in m.readers:
                self.loop.aio.remove_reader(fd)
            m.readers.clear()

    def _read(self, m: _Media, sock: socket.socket, handler: Any) -> None:
        """A socket is readable: the datagrams waiting, up to READ_BATCH, in one wake-up (an access unit's
        packets come in a burst; asyncio's datagram transport took one per pass of the loop, 4x the CPU)."""
        size = self.max_packet + 1        # a larger datagram is cut to this, and dropped as oversized
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:        # an error the kernel queued on the socket
                self._socket_error(m, f"reading: {exc.strerror or exc}")
                return
            self._guarded(handler, m, data, addr)

    def _sendto(self, m: _Media, sock: socket.socket, data: bytes, to: tuple[str, int]) -> bool:
        try:
            sock.sendto(data, to)
        except OSError as exc:            # the send buffer full, no route, not allowed: the datagram is lost
            self._socket_error(m, f"sending to {to[0]}:{to[1]}: {exc.strerror or exc}")
            return False
        return True

    def _socket_error(self, m: _Media, what: str) -> None:
        m.socket_errors.inc()
        self.throttled.warning(f"socket-{m.kind}", f"{self.instance}: {m.kind} socket error {what}")

    # ------------------------------------------------------------ metrics
    def _metrics(self) -> None:
        r, s = self.registry, self.instance
        self.m_dropped = Counter("edgeroom_rtp_dropped_packets", "Inbound RTP and RTCP packets dropped, by media and "
                                 "reason.", ["call", "media", "reason"], registry=r)
        self.m_units_dropped = Counter("edgeroom_rtp_dropped_units", "Inbound access units dropped because packets of "
                                       "them were lost or bad, by reason.", ["call", "media", "reason"],
                                       registry=r)
        self.m_lost = Counter("edgeroom_rtp_lost_packets", "Inbound packets that never came (given up by the jitter "
                              "buffer).", ["call", "media"], registry=r)
        self.m_packets_in = Counter("edgeroom_rtp_packets_in", "Inbound RTP packets accepted.", ["call", "media"],
                                    registry=r)
        self.m_packets_out = Counter("edgeroom_rtp_packets_out", "RTP packets sent (retransmissions included).",
                                     ["call", "media"], registry=r)
        self.m_out_dropped = Counter("edgeroom_rtp_unsent_units", "Outbound access units or chunks not sent, by reason "
                                     "(codec, waiting_keyframe, nal_too_large, not_encoded, torn).",
                                     ["call", "media", "reason"], registry=r)
        self.m_feedback_in = Counter("edgeroom_rtp_feedback_received", "RTCP feedback from the peer (pli, fir, nack, "
                                     "sr, rr, bye).", ["call", "media", "type"], registry=r)
        self.m_feedback_out = Counter("edgeroom_rtp_feedback_sent", "RTCP sent to the peer (pli, fir, nack, report).",
                                      ["call", "media", "type"], registry=r)
        self.m_retransmitted = Counter("edgeroom_rtp_retransmitted_packets", "Packets sent again for a NACK.",
                                       ["call", "media"], registry=r)
        self.m_socket_errors = Counter("edgeroom_rtp_socket_errors", "Errors the sockets reported: a send the kernel "
                                       "refused (buffer full, network unreachable), an error queued on the socket.",
                                       ["call", "media"], registry=r)
        self.m_jitter = Gauge("edgeroom_rtp_jitter_seconds", "Interarrival jitter of the inbound media (RFC 3550).",
                              ["call", "media"], registry=r)
        self.m_units = Counter("edgeroom_rtp_units", "Access units (video) or chunks (audio) put on the bus.",
                               ["call", "media"], registry=r)
        frames = Counter("edgeroom_rtp_frames", "Video access units put on the bus.", ["call"], registry=r)
        nbytes = Counter("edgeroom_rtp_bytes", "Bytes of video access units put on the bus.", ["call"], registry=r)
        keyframes = Counter("edgeroom_rtp_keyframes", "Keyframes put on the bus.", ["call"], registry=r)
        latency = Histogram("edgeroom_rtp_to_bus_seconds", "From an access unit's capture time to the bus.",
                            ["call"], registry=r, buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5))
        audio = Counter("edgeroom_rtp_audio_chunks", "Audio chunks put on the bus.", ["call"], registry=r)
        rebases = Counter("edgeroom_rtp_timestamp_rebases", "Times the peer's RTP clock jumped (a new sender) and the "
                          "timestamps were rebased.", ["call"], registry=r)
        self.sink_metrics = SinkMetrics(frames.labels(s), nbytes.labels(s), keyframes.labels(s), latency.labels(s),
                                        _Bound(self.m_units_dropped, s, "video"), audio.labels(s), rebases.labels(s))

    _UNSENT_WHY = {"codec": "the stream's codec is not the one the SDP settled on",
                   "nal_too_large": "a NAL unit is larger than a packet and packetization-mode 0 cannot fragment it "
                                    "(the peer needs an encoder that cuts slices to the MTU)",
                   "not_encoded": "the stream carries pictures, not access units (send an encoder's output)",
                   "not_audio": "the stream is not s16 audio", "torn": "overwritten while it was read"}

    def _unsent(self, kind: str, why: str) -> None:
        self.m_out_dropped.labels(self.instance, kind, why).inc()
        if why in self._UNSENT_WHY:
            self.throttled.warning(f"unsent-{kind}-{why}", f"{self.instance}: {kind} not sent: {self._UNSENT_WHY[why]}")

    def _dropper(self, kind: str) -> Any:
        children: dict[str, Any] = {}

        def drop(reason: str, n: int = 1) -> None:
            child = children.get(reason)
            if child is None:
                child = children[reason] = self.m_dropped.labels(self.instance, kind, reason)
            child.inc(n)
            if reason not in ("late", "duplicate"):
                self.throttled.warning(f"drop-{kind}-{reason}", f"{self.instance}: {kind} packet(s) dropped: {reason}")
        return drop

    # ------------------------------------------------------------ datagrams in
    def _source_ok(self, m: _Media, addr: tuple[str, int], rtcp_side: bool) -> bool:
        """Is `addr` the peer? Latching takes the first address that sends (then only it)."""
        if self.cfg.latch:
            latched = m.rtcp_from if rtcp_side else m.rtp_from
            if latched is None:
                if rtcp_side:
                    m.rtcp_from = addr
                    if m.rtcp_to is not None or m.outbound is not None:
                        m.rtcp_to = addr
                else:
                    m.rtp_from = addr
                    if m.outbound is not None or m.rtp_to is not None:
                        m.rtp_to = addr
                self.log.info("%s: latched %s %s to %s:%d", self.instance, m.kind, "RTCP" if rtcp_side else "RTP",
                              *addr)
                return True
            return addr == latched
        return addr[0] == self.peer_host

    def _guarded(self, handler: Any, m: _Media, data: bytes, addr: tuple[str, int]) -> None:
        """A datagram's handling: a defect it trips costs that datagram (counted, logged), never the call."""
        try:
            handler(m, data, addr)
        except Exception as exc:
            self.m_dropped.labels(self.instance, m.kind, "internal").inc()
            if time.monotonic() - self._defect_at >= 1.0:      # the traceback, once a second at most
                self._defect_at = time.monotonic()
                self.log.error("%s: a %s datagram from %s:%d tripped a defect: %s", self.instance, m.kind, *addr,
                               exc, exc_info=True)

    def _rtp_in(self, m: _Media, data: bytes, addr: tuple[str, int]) -> None:
        drop = m.drop
        if not self._source_ok(m, addr, False):
            drop("wrong_source")
            return
        if m.inbound is None:
            drop("not_negotiated")     # the SDP says the peer does not send this media
            return
        before = m.inbound.packets
        m.inbound.datagram(data, _now_ns())
        if m.inbound.packets != before:
            m.packets_in.inc()
        self._schedule_expiry(m)

    def _schedule_expiry(self, m: _Media) -> None:
        """One timer per media for the jitter buffer's next deadline (not one per packet held)."""
        deadline = m.inbound.deadline()
        if deadline is None or (m.expiry_at and m.expiry_at <= deadline):
            return
        m.expiry_at = deadline
        self.loop.aio.call_later(max(0.0, (deadline - _now_ns()) / 1e9) + 0.001, lambda: self._expire(m))

    def _expire(self, m: _Media) -> None:
        m.expiry_at = 0
        self._guarded(lambda m, data, addr: m.inbound.expire(_now_ns()), m, b"", ("timer", 0))
        self._schedule_expiry(m)

    def _rtcp_in(self, m: _Media, data: bytes, addr: tuple[str, int]) -> None:
        drop = m.drop
        if not self._source_ok(m, addr, True):
            drop("wrong_source")
            return
        try:
            packets = rtcp.parse(data)
        except ValueError:
            drop("bad_rtcp")
            return
        for p in packets:
            self._feedback(m, p)

    def _feedback(self, m: _Media, p: Any) -> None:
        from aiortc.rtp import RtcpByePacket, RtcpPsfbPacket, RtcpRrPacket, RtcpRtpfbPacket, RtcpSrPacket

        count = self.m_feedback_in.labels
        if isinstance(p, RtcpSrPacket):
            count(self.instance, m.kind, "sr").inc()
            if m.inbound is not None and p.ssrc == m.inbound.ssrc:
                m.inbound.sender_report(p.sender_info.ntp_timestamp, p.sender_info.rtp_timestamp)
        elif isinstance(p, RtcpRrPacket):
            count(self.instance, m.kind, "rr").inc()
        elif isinstance(p, RtcpByePacket):
            count(self.instance, m.kind, "bye").inc()
            if m.inbound is not None and m.inbound.ssrc in p.sources:
                m.inbound.bye = True
        elif isinstance(p, RtcpPsfbPacket) and p.fmt in (1, 4):
            what = "pli" if p.fmt == 1 else "fir"
            count(self.instance, m.kind, what).inc()
            if m.outbound is not None and m.kind == "video":
                if what == "pli" and p.media_ssrc not in (m.outbound.ssrc, 0):
                    return
                if what == "fir" and m.outbound.ssrc not in rtcp.fir_targets(p):
                    return
                # straight to the producer of what is sent now: its KeyframeRequests throttles (0.5 s); the
                # reader's own asks (for its gate) are held to one a second, too slow for a peer that lost a picture
                sending = self.reader.status()["video"]["sending"]
                if sending:
                    self.request_keyframe(sending, f"{what} from the peer of {self.id}")
        elif isinstance(p, RtcpRtpfbPacket) and p.fmt == 1:
            count(self.instance, m.kind, "nack").inc()
            if m.outbound is not None and p.media_ssrc == m.outbound.ssrc:
                sent = m.outbound.resend([s & 0xFFFF for s in p.lost])
                self.m_retransmitted.labels(self.instance, m.kind).inc(sent)

    # ------------------------------------------------------------ sending
    def _send_rtp(self, m: _Media, data: bytes) -> None:
        if m.rtp_to is None or not m.readers:
            return
        if self._sendto(m, m.rtp_sock, data, m.rtp_to):
            m.packets_out.inc()

    def _send_rtcp(self, m: _Media, data: bytes, what: str) -> bool:
        to = m.rtcp_to or ((self.peer_host, m.peer.rtcp_port) if self.peer_host and m.peer.rtcp_port else None)
        if self.cfg.latch and m.rtcp_from is not None:
            to = m.rtcp_from
        if to is None or not m.readers:
            return False
        if not self._sendto(m, m.rtcp_sock, data, to):
            return False
        self.m_feedback_out.labels(self.instance, m.kind, what).inc()
        return True

    def _nack(self, m: _Media, ssrc: int, seqs: list[int]) -> None:
        if any(fb.startswith("nack") for fb in m.codec.feedback) and len(seqs) <= 64:
            self._send_rtcp(m, rtcp.nack(m.ssrc, ssrc, seqs), "nack")

    def _send(self) -> None:
        """The route reader has news: hand a bounded batch to the outbound media, then come back."""
        self._again = False
        for _ in range(BATCH):
            item = self.reader.poll()
            if item is None:
                return
            m = self.media.get(item.track)
            out = m.outbound if m is not None else None
            if out is None:
                self._unsent(item.track, "not_negotiated")
                continue
            if item.track == "video":
                if item.switched:
                    out.new_stream()
                extra = self.reader.extradata()
                out.access_unit(item.data, item.codec, item.keyframe, item.capture_ns,
                                extra[1] if extra is not None else None)
            else:
                pcm = np.frombuffer(item.data, np.int16).reshape(item.samples, item.channels)
                out.audio(pcm, item.rate, item.capture_ns)
        self._again = True                                   # more may wait, its wake-up already drained
        self.loop.call_later(0, self._continue)

    def _continue(self) -> None:
        if self._again:
            self._send()

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
        m = self.media.get("video")
        if m is None or m.inbound is None:
            return cannot(f"{self.id} receives no video from its peer")
        return self.keyframes.request(stream, reason)

    def _make_keyframe(self, stream: str) -> str:
        """PLI to the peer; FIR too when a PLI did not bring one (peers that ignore PLI)."""
        m = self.media.get("video")
        if m is None or m.inbound is None or m.inbound.ssrc is None:
            return "none (nothing received yet)"
        now = time.monotonic()
        how = "pli"
        self._send_rtcp(m, rtcp.pli(m.ssrc, m.inbound.ssrc), "pli")
        if m.pli_at and m.keyframe_seen_at < m.pli_at and now - m.pli_at >= FIR_AFTER - 0.3:
            m.fir_seq += 1
            self._send_rtcp(m, rtcp.fir(m.ssrc, m.inbound.ssrc, m.fir_seq), "fir")
            how = "pli+fir"
        m.pli_at = now
        return how

    def _keyframe_on_bus(self) -> None:
        m = self.media.get("video")
        if m is not None:
            m.keyframe_seen_at = time.monotonic()
        self.keyframes.keyframe(self.stream)

    # ------------------------------------------------------------ once a second
    def _tick(self) -> None:
        self.meter.update(self.sink.frames)
        self.sink.heartbeat()
        for m in self.media.values():
            if m.inbound is not None:
                if m.inbound.ssrc is not None:
                    self.m_jitter.labels(self.instance, m.kind).set(m.inbound.stats.jitter / m.codec.clock)
            sent = m.outbound.sender_info() if m.outbound is not None else None
            received = m.inbound.received() if m.inbound is not None else None
            if sent is not None or received is not None:
                self._send_rtcp(m, rtcp.report(m.ssrc, self.cname, sent=sent, received=received), "report")

    # ------------------------------------------------------------ SDP
    def _local_host(self) -> str:
        if self.cfg.local_address not in ("0.0.0.0", ""):
            return self.cfg.local_address
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((self.peer_host or "192.0.2.1", 9))    # no packet is sent: it picks the route's address
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
        finally:
            probe.close()

    def box_sdp(self) -> str:
        """The box's side: its address and ports, the codecs it settled on, the direction it sees."""
        media = []
        for m in self.media.values():
            sends, receives = m.outbound is not None, m.inbound is not None
            direction = {(True, True): "sendrecv", (True, False): "sendonly", (False, True): "recvonly"}.get(
                (sends, receives), "inactive")
            media.append((sdp.Media(m.kind, m.port, "", m.rtcp_port, (m.codec,), direction,
                                    m.peer.bandwidth_kbps), m.codec))
        return sdp.write(f"edgeroom {self.id}", self._local_host(), media, session_id=int(self.started_at))

    def receiver_sdp(self) -> str:
        """What the box sends, addressed to the peer: what a receive-only peer (ffmpeg -i, GStreamer) reads."""
        media = []
        for m in self.media.values():
            if m.outbound is None or m.rtp_to is None:
                continue
            rtcp_port = m.rtcp_to[1] if m.rtcp_to else m.rtp_to[1] + 1
            media.append((sdp.Media(m.kind, m.rtp_to[1], "", rtcp_port, (m.codec,), "recvonly"), m.codec))
        if not media:
            raise ProtocolError("not_found", f"{self.id} sends nothing to its peer (send_video / send_audio, and "
                                             "the SDP's direction)")
        host = self.media[next(iter(self.media))].rtp_to
        return sdp.write(f"edgeroom {self.id}", host[0] if host else self.peer_host, media,
                         session_id=int(self.started_at))

    def _sdp_answer(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["session"] != self.instance:
            raise ProtocolError("not_found", f"{self.id} has the session {self.instance!r}, not {args['session']!r}")
        side = args.get("for", "sender")
        if side not in ("sender", "receiver"):
            raise ProtocolError("bad_args", f"for must be sender or receiver, got {side!r}")
        text = self.box_sdp() if side == "sender" else self.receiver_sdp()
        return {"session": self.instance, "for": side, "sdp": text,
                "ports": {k: {"rtp": m.port, "rtcp": m.rtcp_port} for k, m in self.media.items()}}

    # ------------------------------------------------------------ what the hub sees
    def _describe_media(self) -> list[str]:
        out = []
        for k, m in self.media.items():
            mode = f" mode {m.codec.mode}" if m.codec.name == "h264" else ""
            where = f"{self.cfg.local_address}:{m.port}"
            parts = [f"{k} {m.codec.name}/{m.codec.pt}{mode} on {where}"]
            if m.inbound is not None:
                parts.append(f"in -> {m.inbound.stream}")
            if m.outbound is not None and m.rtp_to is not None:
                parts.append(f"out -> {m.rtp_to[0]}:{m.rtp_to[1]}")
            out.append(" ".join(parts))
        return out + self.notes

    def _tracks(self) -> list[dict[str, Any]]:
        tracks = []
        for k, m in self.media.items():
            if m.inbound is not None and m.inbound.flowing():
                track = {"id": k, "kind": k, "stream": m.inbound.stream, "direction": "recv",
                         "format": m.codec.name if k == "video" else "s16"}
                if k == "audio" and m.inbound.decoder is not None:
                    track["rate"] = m.inbound.decoder.rate
                tracks.append(track)
        return tracks + self.reader.tracks()

    def describe(self) -> dict[str, Any]:
        flowing = [k for k, m in self.media.items() if m.inbound is not None and m.inbound.flowing()]
        sending = [k for k, m in self.media.items() if m.outbound is not None and m.outbound.units]
        status = "; ".join(self._describe_media())
        status = (f"in: {', '.join(flowing) or 'nothing yet'}, out: {', '.join(sending) or 'nothing'} "
                  f"({self.reader.summary()}); " + status)
        return {"status": status[:200], "rate": round(self.meter.rate, 2), "streams": self.sink.streams(),
                "sessions": [{"id": self.instance, "room": self.cfg.room, "kind": "call", "tracks": self._tracks()}]}


class _Bound:
    """`dropped.labels(reason)` with the call and media labels already applied (the sink's drops)."""

    def __init__(self, counter: Counter, call: str, media: str) -> None:
        self.counter, self.call, self.media = counter, call, media

    def labels(self, reason: str) -> Any:
        return self.counter.labels(self.call, self.media, reason)


