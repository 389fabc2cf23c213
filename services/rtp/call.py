"""One call's media, for any signalling: sockets, packets in and out, RTCP, its routes.

`RtpCall` is the engine of a call that the service hosting it gives a plan: per media the
codec agreed, the peer's m= line and address, which way media flows, the local port and
the SSRC. `rtp@NAME` hosts one (its plan read from a static SDP); `sip` hosts one per SIP
call (its plan from the offer/answer), and changes the plan when a re-INVITE does (hold,
video added or dropped) without touching the media that stayed. What the peer sends goes
on the bus as the call's stream (access units) and STREAM-audio (s16); what it sends are
the session's routes (services/calls/), read by one RouteReader.

The metrics of every call of a process are one `RtpMetrics` (labelled by call): a process
with several calls registers them once.

Everything runs on the hosting service's loop: datagrams are drained per wake-up (at most
READ_BATCH), bus items handed to the outbound media in bounded batches, one report per media
each second from `tick()`. A datagram that trips a defect costs that datagram (counted,
logged once a second), never the call.
"""
from __future__ import annotations

import errno
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.capture.sink import Sink, SinkMetrics
from services.rtp import rtcp, sdp
from services.runtime.streams import audio_stream

if TYPE_CHECKING:
    from services.calls.config import Route
    from services.runtime.service import AsyncService

__all__ = ["Plan", "RtpCall", "RtpMetrics", "bind_pair"]

FIR_AFTER = 1.2            # a keyframe request still pending this long after a PLI also sends FIR
MIN_MAX_PACKET = 1500      # the largest datagram accepted is max(mtu, this)
BATCH = 32                 # bus items read per wake-up at most
READ_BATCH = 64            # datagrams read from a socket per wake-up at most (then the loop's other work runs)


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Settings(Protocol):
    """The keys of a call's media (RtpConfig has them; the SIP config too), read only."""
    @property
    def local_address(self) -> str: ...
    @property
    def latch(self) -> bool: ...
    @property
    def jitter_ms(self) -> int: ...
    @property
    def mtu(self) -> int: ...
    @property
    def pacing_kbps(self) -> int: ...
    @property
    def max_kbps(self) -> int: ...
    @property
    def nack_buffer(self) -> int: ...


@dataclass(frozen=True)
class Identity:
    """What the peer knows the box's media by, kept across a restart: SSRC, next sequence number, RTP time base."""
    ssrc: int
    seq: int
    ts_base: int

    @staticmethod
    def new() -> Identity:
        return Identity(random.getrandbits(32), random.getrandbits(16), random.getrandbits(32))


@dataclass(frozen=True)
class Plan:
    """One media of a call as agreed with the peer."""
    kind: str                             # video | audio
    codec: sdp.Codec                      # what both sides send, in the agreed payload type
    peer: sdp.Media                       # the peer's m= line (its port, RTCP port, direction)
    peer_host: str                        # where the peer receives ('' unknown)
    sends: bool                           # the box sends this media
    receives: bool                        # the box takes what the peer sends of it
    port: int = 0                         # local RTP port (RTCP on the next); 0 picks a free pair
    identity: Identity | None = None      # the box's SSRC and sequence (None: new ones)
    dtmf_pt: int = -1                     # telephone-event payload type on this media (-1: none)

    def same_media(self, other: Plan) -> bool:
        """The same codec on the same port: changes of direction or peer address apply in place."""
        return (self.kind, self.codec, self.port) == (other.kind, other.codec, other.port)


@dataclass
class _Media:
    plan: Plan
    rtp_sock: socket.socket
    rtcp_sock: socket.socket
    rtp_to: tuple[str, int] | None        # where media goes (None: the peer receives none)
    rtcp_to: tuple[str, int] | None
    identity: Identity
    inbound: Any = None
    outbound: Any = None
    readers: list[int] = field(default_factory=list)    # the fds the loop reads (empty until started, after stop)
    rtp_from: tuple[str, int] | None = None    # latched source addresses
    rtcp_from: tuple[str, int] | None = None
    drop: Any = None                      # the media's drop counter: drop(reason, n=1)
    packets_in: Any = None                # its counters with the call and media labels bound (not looked up per packet)
    packets_out: Any = None
    socket_errors: Any = None
    expiry_at: int = 0                    # when the jitter buffer's timer is set for (ns), 0 when none
    pli_at: float = 0.0
    fir_seq: int = 0
    keyframe_seen_at: float = 0.0

    @property
    def kind(self) -> str:
        return self.plan.kind

    @property
    def codec(self) -> sdp.Codec:
        return self.plan.codec

    @property
    def port(self) -> int:
        return int(self.rtp_sock.getsockname()[1])

    @property
    def rtcp_port(self) -> int:
        return int(self.rtcp_sock.getsockname()[1])

    @property
    def ssrc(self) -> int:
        return self.outbound.ssrc if self.outbound is not None else self.identity.ssrc

    def current_identity(self) -> Identity:
        out = self.outbound
        return Identity(out.ssrc, out.seq, out.ts_base) if out is not None else self.identity


def bind_pair(address: str, port: int) -> tuple[socket.socket, socket.socket]:
    """RTP and RTCP sockets on `port` and `port + 1`; port 0: a free pair the kernel offers."""
    last: OSError | None = None
    for _ in range(50 if port == 0 else 1):
        rtp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtcp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rtp_sock.bind((address, port))
            rtcp_sock.bind((address, rtp_sock.getsockname()[1] + 1))
        except OSError as exc:
            rtp_sock.close()
            rtcp_sock.close()
            if port or exc.errno == errno.EADDRNOTAVAIL:
                raise OSError(f"cannot bind {address}:{port} and {port + 1} for RTP and RTCP: "
                              f"{exc.strerror or exc}") from None
            last = exc
            continue
        for s in (rtp_sock, rtcp_sock):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return rtp_sock, rtcp_sock
    raise OSError(f"no free pair of UDP ports on {address} for RTP and RTCP ({last.strerror if last else ''})")


class RtpMetrics:
    """The RTP counters of a process, labelled by call and media (one set for all the calls it hosts)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.dropped = Counter("edgeroom_rtp_dropped_packets", "Inbound RTP and RTCP packets dropped, by media and "
                               "reason.", ["call", "media", "reason"], registry=r)
        self.units_dropped = Counter("edgeroom_rtp_dropped_units", "Inbound access units dropped because packets of "
                                     "them were lost or bad, by reason.", ["call", "media", "reason"], registry=r)
        self.lost = Counter("edgeroom_rtp_lost_packets", "Inbound packets that never came (given up by the jitter "
                            "buffer).", ["call", "media"], registry=r)
        self.packets_in = Counter("edgeroom_rtp_packets_in", "Inbound RTP packets accepted.", ["call", "media"],
                                  registry=r)
        self.packets_out = Counter("edgeroom_rtp_packets_out", "RTP packets sent (retransmissions included).",
                                   ["call", "media"], registry=r)
        self.out_dropped = Counter("edgeroom_rtp_unsent_units", "Outbound access units or chunks not sent, by reason "
                                   "(codec, waiting_keyframe, nal_too_large, not_encoded, torn).",
                                   ["call", "media", "reason"], registry=r)
        self.feedback_in = Counter("edgeroom_rtp_feedback_received", "RTCP feedback from the peer (pli, fir, nack, "
                                   "sr, rr, bye).", ["call", "media", "type"], registry=r)
        self.feedback_out = Counter("edgeroom_rtp_feedback_sent", "RTCP sent to the peer (pli, fir, nack, report).",
                                    ["call", "media", "type"], registry=r)
        self.retransmitted = Counter("edgeroom_rtp_retransmitted_packets", "Packets sent again for a NACK.",
                                     ["call", "media"], registry=r)
        self.socket_errors = Counter("edgeroom_rtp_socket_errors", "Errors the sockets reported: a send the kernel "
                                     "refused (buffer full, network unreachable), an error queued on the socket.",
                                     ["call", "media"], registry=r)
        self.jitter = Gauge("edgeroom_rtp_jitter_seconds", "Interarrival jitter of the inbound media (RFC 3550).",
                            ["call", "media"], registry=r)
        self.units = Counter("edgeroom_rtp_units", "Access units (video) or chunks (audio) put on the bus.",
                             ["call", "media"], registry=r)
        self.frames = Counter("edgeroom_rtp_frames", "Video access units put on the bus.", ["call"], registry=r)
        self.bytes = Counter("edgeroom_rtp_bytes", "Bytes of video access units put on the bus.", ["call"], registry=r)
        self.keyframes = Counter("edgeroom_rtp_keyframes", "Keyframes put on the bus.", ["call"], registry=r)
        self.latency = Histogram("edgeroom_rtp_to_bus_seconds", "From an access unit's capture time to the bus.",
                                 ["call"], registry=r, buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5))
        self.audio = Counter("edgeroom_rtp_audio_chunks", "Audio chunks put on the bus.", ["call"], registry=r)
        self.rebases = Counter("edgeroom_rtp_timestamp_rebases", "Times the peer's RTP clock jumped (a new sender) "
                               "and the timestamps were rebased.", ["call"], registry=r)

    def sink(self, call: str) -> SinkMetrics:
        return SinkMetrics(self.frames.labels(call), self.bytes.labels(call), self.keyframes.labels(call),
                           self.latency.labels(call), _Bound(self.units_dropped, call, "video"),
                           self.audio.labels(call), self.rebases.labels(call))

    def forget(self, call: str) -> None:
        """A call that ended: its series leave the scrape (a box with many calls would grow without bound)."""
        for metric in vars(self).values():
            labelled = [k for k in getattr(metric, "_metrics", {}) if k and k[0] == call]
            for key in labelled:
                metric.remove(*key)


class _Bound:
    """`dropped.labels(reason)` with the call and media labels already applied (the sink's drops)."""

    def __init__(self, counter: Counter, call: str, media: str) -> None:
        self.counter, self.call, self.media = counter, call, media

    def labels(self, reason: str) -> Any:
        return self.counter.labels(self.call, self.media, reason)


_UNSENT_WHY = {"codec": "the stream's codec is not the one the SDP settled on",
               "nal_too_large": "a NAL unit is larger than a packet and packetization-mode 0 cannot fragment it "
                                "(the peer needs an encoder that cuts slices to the MTU)",
               "not_encoded": "the stream carries pictures, not access units (send an encoder's output)",
               "not_audio": "the stream is not s16 audio", "torn": "overwritten while it was read"}


class RtpCall:
    """The media of call `name` on `service`'s loop. `open(plans)`, `start()` once the loop runs, `update(plans)`
    on a new agreement, `close()`. `on_dtmf(digit, duration_ms)` gets RFC 4733 events of the audio media."""

    def __init__(self, service: AsyncService, name: str, settings: Settings, metrics: RtpMetrics, routes: Any,
                 route: Route, *, keyframes: Any, on_dtmf: Callable[[str, int], None] | None = None) -> None:
        self.service, self.name, self.cfg, self.m = service, name, settings, metrics
        self.log, self.loop, self.throttled = service.log, service.loop, service.throttled
        self.stream = name
        self.cname = f"edgeroom-{name}@{socket.gethostname()}"
        self.sink = Sink(name, service.config.bus.prefix, metrics.sink(name))
        self.clocks = rtcp.Clocks()
        self.keyframes = keyframes            # KeyframeRequests of the hosting service (one throttle per stream)
        self.on_dtmf = on_dtmf
        self.media: dict[str, _Media] = {}
        self.notes: list[str] = []
        self.max_packet = max(settings.mtu, MIN_MAX_PACKET)
        self.routes = routes
        self.route = route
        self.reader: Any = None
        self.started = False
        self._defect_at = 0.0
        self._again = False
        self._dtmf: Any = None
        self._reserved: dict[int, tuple[socket.socket, socket.socket]] = {}

    def reserve(self, port: int = 0) -> int:
        """Bind a pair of sockets now (an SDP must name the port before the media is agreed); the plan that names
        the port takes them."""
        pair = bind_pair(self.cfg.local_address, port)
        port = int(pair[0].getsockname()[1])
        self._reserved[port] = pair
        return port

    def release_reserved(self) -> None:
        for a, b in self._reserved.values():
            a.close()
            b.close()
        self._reserved.clear()

    # ------------------------------------------------------------ life
    def open(self, plans: list[Plan]) -> None:
        """Bind and build each planned media, then the route reader (codecs: the agreed video codec)."""
        try:
            for plan in plans:
                self._add(plan)
            video = self.media.get("video")
            self.reader = self.routes.reader(self.name, self.route,
                                             video_codecs=(video.codec.name,) if video is not None else ("none",))
        except BaseException:
            self.close()
            raise
        self.loop.add_reader(self.reader.fileno(), self._send)

    def start(self) -> None:
        """Read the sockets (on the asyncio loop, which runs by now)."""
        self.started = True
        for m in self.media.values():
            self._read_sockets(m)

    def close(self, forget: bool = False) -> None:
        self.release_reserved()
        for kind in list(self.media):
            self._remove(kind)
        if self.reader is not None:
            self.loop.remove_reader(self.reader.fileno())
            self.routes.close(self.name, forget=forget)
            self.reader = None
        self.sink.close()
        if forget:
            self.m.forget(self.name)

    def update(self, plans: list[Plan]) -> list[str]:
        """A new agreement (a re-INVITE): media kept where codec and port stay, directions and addresses applied,
        media added or removed. Returns what changed, in words."""
        changed = []
        wanted = {p.kind: p for p in plans}
        for kind in [k for k in self.media if k not in wanted]:
            self._remove(kind)
            changed.append(f"{kind} removed")
        for kind, plan in wanted.items():
            m = self.media.get(kind)
            if m is not None and m.plan.same_media(plan):
                if m.plan != plan:
                    self._redirect(m, plan)
                    changed.append(f"{kind} {plan.peer.direction} from the peer")
                continue
            if m is not None:
                plan = replace(plan, port=m.port, identity=m.current_identity())
                self._remove(kind)
            self._add(plan)
            if self.started:
                self._read_sockets(self.media[kind])
            changed.append(f"{kind} {'changed' if m is not None else 'added'}: {plan.codec.name}/{plan.codec.pt}")
        video = self.media.get("video")
        if self.reader is not None:
            self.reader.video_codecs = (video.codec.name,) if video is not None else ("none",)
        return changed

    def _add(self, plan: Plan) -> None:
        from services.rtp.inbound import Inbound  # aiortc and PyAV: the extras a call needs
        from services.rtp.outbound import Outbound, Pacer

        kind, codec = plan.kind, plan.codec
        reserved = self._reserved.pop(plan.port, None) if plan.port else None
        rtp_sock, rtcp_sock = reserved or bind_pair(self.cfg.local_address, plan.port)
        m = _Media(plan, rtp_sock, rtcp_sock, None, None, plan.identity or Identity.new())
        self.media[kind] = m
        name = self.name
        m.drop = self._dropper(kind)
        m.packets_in = self.m.packets_in.labels(name, kind)
        m.packets_out = self.m.packets_out.labels(name, kind)
        m.socket_errors = self.m.socket_errors.labels(name, kind)
        self._aim(m, plan)
        if plan.receives:
            m.inbound = Inbound(kind, self.stream if kind == "video" else audio_stream(self.stream), codec,
                                self.sink, self.clocks, jitter_ms=self.cfg.jitter_ms, max_packet=self.max_packet,
                                max_bps=self._max_bps(plan.peer), drop=m.drop,
                                drop_unit=lambda why, k=kind: self.m.units_dropped.labels(name, k, why).inc(),
                                want_keyframe=lambda why: self.keyframes.request(self.stream, why),
                                keyframe_sent=self._keyframe_on_bus,
                                lost=lambda n, k=kind: self.m.lost.labels(name, k).inc(n),
                                missing=lambda ssrc, seqs, m=m: self._nack(m, ssrc, seqs),
                                unit=self.m.units.labels(name, kind).inc, log=self.log)
            if kind == "video" and self.sink.video is None:
                self.sink.open_encoded(codec.name, 0, 0)   # readers (decode) attach before the first unit
        if plan.sends:
            pacer = Pacer(self.cfg.pacing_kbps * 1000, self.cfg.mtu, lambda data, m=m: self._send_rtp(m, data),
                          self.loop.aio.call_later)
            m.outbound = Outbound(kind, name, codec, mtu=self.cfg.mtu, history=self.cfg.nack_buffer, pacer=pacer,
                                  drop=lambda why, k=kind: self._unsent(k, why), log=self.log)
            m.outbound.ssrc, m.outbound.seq, m.outbound.ts_base = m.identity.ssrc, m.identity.seq, m.identity.ts_base

    def _aim(self, m: _Media, plan: Plan) -> None:
        host, peer = plan.peer_host, plan.peer
        aimed = plan.sends and bool(peer.port) and bool(host)
        m.rtp_to = (host, peer.port) if aimed else None
        m.rtcp_to = (host, peer.rtcp_port) if aimed else None

    def _redirect(self, m: _Media, plan: Plan) -> None:
        """Same codec and port, another direction or address (hold, resume): sending starts or stops."""
        from services.rtp.outbound import Outbound, Pacer

        m.plan = plan
        self._aim(m, plan)
        if plan.sends and m.outbound is None:
            pacer = Pacer(self.cfg.pacing_kbps * 1000, self.cfg.mtu, lambda data, m=m: self._send_rtp(m, data),
                          self.loop.aio.call_later)
            m.outbound = Outbound(m.kind, self.name, m.codec, mtu=self.cfg.mtu, history=self.cfg.nack_buffer,
                                  pacer=pacer, drop=lambda why, k=m.kind: self._unsent(k, why), log=self.log)
            m.outbound.ssrc, m.outbound.seq, m.outbound.ts_base = m.identity.ssrc, m.identity.seq, m.identity.ts_base
            if m.kind == "video" and self.reader is not None:
                self.reader.request_keyframe("resume")
        elif not plan.sends and m.outbound is not None:
            m.identity = m.current_identity()
            m.outbound = None

    def _remove(self, kind: str) -> None:
        m = self.media.pop(kind)
        for fd in m.readers:
            self.loop.aio.remove_reader(fd)
        m.readers.clear()
        if m.inbound is not None:
            m.inbound.close()
        m.rtp_sock.close()
        m.rtcp_sock.close()

    def _read_sockets(self, m: _Media) -> None:
        for sock, handler in ((m.rtp_sock, self._rtp_in), (m.rtcp_sock, self._rtcp_in)):
            self.loop.aio.add_reader(sock.fileno(), self._read, m, sock, handler)
            m.readers.append(sock.fileno())

    def _max_bps(self, peer: sdp.Media) -> int:
        if self.cfg.max_kbps:
            return self.cfg.max_kbps * 1000
        return 4 * peer.bandwidth_kbps * 1000 if peer.bandwidth_kbps else 0

    # ------------------------------------------------------------ what outlives a restart
    def identities(self) -> dict[str, dict[str, int]]:
        """Per media: local port, SSRC, next sequence number and RTP time base (a restart takes them back)."""
        return {k: {"port": m.port, "ssrc": m.current_identity().ssrc, "seq": m.current_identity().seq,
                    "ts_base": m.current_identity().ts_base} for k, m in self.media.items()}

    # ------------------------------------------------------------ datagrams in
    def _read(self, m: _Media, sock: socket.socket, handler: Any) -> None:
        """A socket is readable: the datagrams waiting, up to READ_BATCH, in one wake-up."""
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

    def _guarded(self, handler: Any, m: _Media, data: bytes, addr: tuple[str, int]) -> None:
        try:
            handler(m, data, addr)
        except Exception as exc:
            self.m.dropped.labels(self.name, m.kind, "internal").inc()
            if time.monotonic() - self._defect_at >= 1.0:      # the traceback, once a second at most
                self._defect_at = time.monotonic()
                self.log.error("%s: a %s datagram from %s:%d tripped a defect: %s", self.name, m.kind, *addr,
                               exc, exc_info=True)

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
                self.log.info("%s: latched %s %s to %s:%d", self.name, m.kind, "RTCP" if rtcp_side else "RTP", *addr)
                return True
            return addr == latched
        return addr[0] == m.plan.peer_host

    def _rtp_in(self, m: _Media, data: bytes, addr: tuple[str, int]) -> None:
        drop = m.drop
        if not self._source_ok(m, addr, False):
            drop("wrong_source")
            return
        if m.plan.dtmf_pt >= 0 and len(data) > 12 and data[1] & 0x7F == m.plan.dtmf_pt:
            self._dtmf_in(m, data)
            return
        if m.inbound is None:
            drop("not_negotiated")     # the agreement says the peer does not send this media
            return
        before = m.inbound.packets
        m.inbound.datagram(data, _now_ns())
        if m.inbound.packets != before:
            m.packets_in.inc()
        self._schedule_expiry(m)

    def _dtmf_in(self, m: _Media, data: bytes) -> None:
        from aiortc.rtp import RtpPacket

        from services.sip.dtmf import DtmfReceiver

        if self._dtmf is None:
            self._dtmf = DtmfReceiver(m.codec.clock)
        try:
            packet = RtpPacket.parse(data)
            digit = self._dtmf.packet(packet.timestamp, packet.payload)
        except ValueError:
            m.drop("bad_dtmf")
            return
        m.packets_in.inc()
        if digit is not None and self.on_dtmf is not None:
            self.on_dtmf(digit, self._dtmf.last.duration_ms if self._dtmf.last is not None else 0)

    def _schedule_expiry(self, m: _Media) -> None:
        """One timer per media for the jitter buffer's next deadline (not one per packet held)."""
        deadline = m.inbound.deadline()
        if deadline is None or (m.expiry_at and m.expiry_at <= deadline):
            return
        m.expiry_at = deadline
        self.loop.aio.call_later(max(0.0, (deadline - _now_ns()) / 1e9) + 0.001, lambda: self._expire(m))

    def _expire(self, m: _Media) -> None:
        m.expiry_at = 0
        if self.media.get(m.kind) is not m:
            return                         # the media was replaced meanwhile
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

        count = self.m.feedback_in.labels
        if isinstance(p, RtcpSrPacket):
            count(self.name, m.kind, "sr").inc()
            if m.inbound is not None and p.ssrc == m.inbound.ssrc:
                m.inbound.sender_report(p.sender_info.ntp_timestamp, p.sender_info.rtp_timestamp)
        elif isinstance(p, RtcpRrPacket):
            count(self.name, m.kind, "rr").inc()
        elif isinstance(p, RtcpByePacket):
            count(self.name, m.kind, "bye").inc()
            if m.inbound is not None and m.inbound.ssrc in p.sources:
                m.inbound.bye = True
        elif isinstance(p, RtcpPsfbPacket) and p.fmt in (1, 4):
            what = "pli" if p.fmt == 1 else "fir"
            count(self.name, m.kind, what).inc()
            if m.outbound is not None and m.kind == "video":
                if what == "pli" and p.media_ssrc not in (m.outbound.ssrc, 0):
                    return
                if what == "fir" and m.outbound.ssrc not in rtcp.fir_targets(p):
                    return
                # straight to the producer of what is sent now: its KeyframeRequests throttles (0.5 s); the
                # reader's own asks (for its gate) are held to one a second, too slow for a peer that lost a picture
                sending = self.reader.status()["video"]["sending"] if self.reader is not None else None
                if sending:
                    self.service.request_keyframe(sending, f"{what} from the peer of {self.name}")
        elif isinstance(p, RtcpRtpfbPacket) and p.fmt == 1:
            count(self.name, m.kind, "nack").inc()
            if m.outbound is not None and p.media_ssrc == m.outbound.ssrc:
                sent = m.outbound.resend([s & 0xFFFF for s in p.lost])
                self.m.retransmitted.labels(self.name, m.kind).inc(sent)

    # ------------------------------------------------------------ sending
    def _sendto(self, m: _Media, sock: socket.socket, data: bytes, to: tuple[str, int]) -> bool:
        try:
            sock.sendto(data, to)
        except OSError as exc:            # the send buffer full, no route, not allowed: the datagram is lost
            self._socket_error(m, f"sending to {to[0]}:{to[1]}: {exc.strerror or exc}")
            return False
        return True

    def _socket_error(self, m: _Media, what: str) -> None:
        m.socket_errors.inc()
        self.throttled.warning(f"socket-{self.name}-{m.kind}", f"{self.name}: {m.kind} socket error {what}")

    def _send_rtp(self, m: _Media, data: bytes) -> None:
        if m.rtp_to is None or not m.readers:
            return
        if self._sendto(m, m.rtp_sock, data, m.rtp_to):
            m.packets_out.inc()

    def _send_rtcp(self, m: _Media, data: bytes, what: str) -> bool:
        peer = m.plan.peer
        to = m.rtcp_to or ((m.plan.peer_host, peer.rtcp_port) if m.plan.peer_host and peer.rtcp_port else None)
        if self.cfg.latch and m.rtcp_from is not None:
            to = m.rtcp_from
        if to is None or not m.readers:
            return False
        if not self._sendto(m, m.rtcp_sock, data, to):
            return False
        self.m.feedback_out.labels(self.name, m.kind, what).inc()
        return True

    def _nack(self, m: _Media, ssrc: int, seqs: list[int]) -> None:
        if any(fb.startswith("nack") for fb in m.codec.feedback) and len(seqs) <= 64:
            self._send_rtcp(m, rtcp.nack(m.ssrc, ssrc, seqs), "nack")

    def _send(self) -> None:
        """The route reader has news: hand a bounded batch to the outbound media, then come back."""
        self._again = False
        if self.reader is None:
            return
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

    def _unsent(self, kind: str, why: str) -> None:
        self.m.out_dropped.labels(self.name, kind, why).inc()
        if why in _UNSENT_WHY:
            self.throttled.warning(f"unsent-{self.name}-{kind}-{why}",
                                   f"{self.name}: {kind} not sent: {_UNSENT_WHY[why]}")

    def _dropper(self, kind: str) -> Callable[..., None]:
        children: dict[str, Any] = {}

        def drop(reason: str, n: int = 1) -> None:
            child = children.get(reason)
            if child is None:
                child = children[reason] = self.m.dropped.labels(self.name, kind, reason)
            child.inc(n)
            if reason not in ("late", "duplicate"):
                self.throttled.warning(f"drop-{self.name}-{kind}-{reason}",
                                       f"{self.name}: {kind} packet(s) dropped: {reason}")
        return drop

    # ------------------------------------------------------------ keyframes of the call's stream (from the peer)
    def can_make_keyframe(self) -> str | None:
        """None when a PLI can go to the peer; else why not."""
        m = self.media.get("video")
        if m is None or m.inbound is None:
            return f"{self.name} receives no video from its peer"
        return None

    def make_keyframe(self) -> str:
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
    def tick(self) -> None:
        self.sink.heartbeat()
        for m in self.media.values():
            if m.inbound is not None and m.inbound.ssrc is not None:
                self.m.jitter.labels(self.name, m.kind).set(m.inbound.stats.jitter / m.codec.clock)
            sent = m.outbound.sender_info() if m.outbound is not None else None
            received = m.inbound.received() if m.inbound is not None else None
            if sent is not None or received is not None:
                self._send_rtcp(m, rtcp.report(m.ssrc, self.cname, sent=sent, received=received), "report")

    def bye(self) -> None:
        """RTCP BYE for every media the box sent on (the call ends)."""
        for m in self.media.values():
            if m.outbound is not None and m.outbound.packets:
                self._send_rtcp(m, rtcp.bye(m.ssrc), "bye")

    # ------------------------------------------------------------ what the hub sees
    def describe_media(self) -> list[str]:
        out = []
        for k, m in self.media.items():
            mode = f" mode {m.codec.mode}" if m.codec.name == "h264" else ""
            parts = [f"{k} {m.codec.name}/{m.codec.pt}{mode} on {self.cfg.local_address}:{m.port}"]
            if m.inbound is not None:
                parts.append(f"in -> {m.inbound.stream}")
            if m.outbound is not None and m.rtp_to is not None:
                parts.append(f"out -> {m.rtp_to[0]}:{m.rtp_to[1]}")
            out.append(" ".join(parts))
        return out + self.notes

    def tracks(self) -> list[dict[str, Any]]:
        tracks = []
        for k, m in self.media.items():
            if m.inbound is not None and m.inbound.flowing():
                track = {"id": k, "kind": k, "stream": m.inbound.stream, "direction": "recv",
                         "format": m.codec.name if k == "video" else "s16"}
                if k == "audio" and m.inbound.decoder is not None:
                    track["rate"] = m.inbound.decoder.rate
                tracks.append(track)
        return tracks + (self.reader.tracks() if self.reader is not None else [])

    def flowing(self) -> list[str]:
        return [k for k, m in self.media.items() if m.inbound is not None and m.inbound.flowing()]

    def sending(self) -> list[str]:
        return [k for k, m in self.media.items() if m.outbound is not None and m.outbound.units]

    def summary(self) -> str:
        return (f"in: {', '.join(self.flowing()) or 'nothing yet'}, out: {', '.join(self.sending()) or 'nothing'} "
                f"({self.reader.summary() if self.reader is not None else 'no routes'})")

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per media: packets each way, loss, jitter (s), bitrate in (bit/s, since the call began)."""
        out: dict[str, dict[str, Any]] = {}
        for k, m in self.media.items():
            s: dict[str, Any] = {"codec": m.codec.name, "pt": m.codec.pt, "port": m.port,
                                 "packets_out": m.outbound.packets if m.outbound is not None else 0}
            if m.codec.name == "h264":
                s["mode"] = m.codec.mode
            if m.inbound is not None:
                st = m.inbound.stats
                s.update(packets_in=m.inbound.packets, octets_in=m.inbound.octets, lost=0, jitter=0.0)
                if m.inbound.packets:        # aiortc's statistics know no loss before the first packet
                    s.update(lost=max(0, st.packets_lost), jitter=round(st.jitter / m.codec.clock, 4))
            out[k] = s
        return out
