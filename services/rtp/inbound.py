"""One inbound media of a call: RTP packets from the peer -> access units or PCM chunks on the bus.

Every datagram goes through the same checks, cheapest first, and one that fails is
dropped with its reason counted (`drop(reason)`), never raised: too short or not RTP
version 2 (`not_rtp`, `truncated`), larger than any packet the call allows
(`oversized`), over the rate the SDP allows (`over_rate`: a token bucket of one
second at `max_bps`), unreadable by aiortc's RtpPacket (`malformed`), a payload type the
SDP did not settle on (`payload_type`), another SSRC than the one being received
(`ssrc`; the new one is taken when the old one has been silent for `SSRC_SILENCE`
seconds or said BYE: a restarted peer), too late or twice (`late`, `duplicate`), then
what the depacketizer refuses (`bad_fua`, `bad_payload`, `packetization_mode`, ...).

What passes goes through the jitter buffer (services/rtp/jitter.py) into the
depacketizer. A loss breaks the access unit it fell in: that unit is dropped
(`edgeroom_rtp_dropped_units_total`), and the next one put on the bus carries
FLAG_CORRUPT, so decode closes its keyframe gate and asks for a keyframe, which reaches
the call (its `stream.keyframe` offer) and goes to the peer as PLI, then FIR; the loss
also asks for one at once (`want_keyframe`), throttled with the decoder's.

Times: pts is the RTP timestamp, extended past its 32-bit wrap and made continuous
across SSRC changes by capture's Timeline (a new sender's clock is a rebase, marked a
discontinuity); capture_ns is the box's clock of the instant the RTP time stands for
(services/rtp/rtcp.py, Clocks: the peer's sender reports line audio and video up).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RtpPacket

from services.capture.sink import Sink
from services.capture.timeline import Timeline
from services.rtp.audio import AudioDecoder
from services.rtp.h264 import Au, H264Depacketizer
from services.rtp.jitter import JitterBuffer
from services.rtp.rtcp import Clocks, MediaClock, Received
from services.rtp.sdp import Codec
from services.rtp.vp8 import Vp8Depacketizer

__all__ = ["Inbound", "SSRC_SILENCE"]

SSRC_SILENCE = 1.0      # seconds a sender must be silent before another SSRC is taken


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Inbound:
    def __init__(self, kind: str, stream: str, codec: Codec, sink: Sink, clocks: Clocks, *, jitter_ms: int,
                 max_packet: int, max_bps: int, drop: Callable[[str, int], None],
                 drop_unit: Callable[[str], None], want_keyframe: Callable[[str], None],
                 keyframe_sent: Callable[[], None], lost: Callable[[int], None],
                 missing: Callable[[int, list[int]], None], unit: Callable[[], None] = lambda: None,
                 log: Any) -> None:
        self.kind, self.stream, self.codec, self.sink = kind, stream, codec, sink
        self.max_packet, self.max_bps = max_packet, max_bps
        self.drop, self.drop_unit, self.want_keyframe = drop, drop_unit, want_keyframe
        self.keyframe_sent, self.on_lost, self.on_missing, self.on_unit, self.log = (keyframe_sent, lost, missing,
                                                                                       unit, log)
        self.jitter: JitterBuffer[RtpPacket] = JitterBuffer(jitter_ms * 1_000_000)
        self.clock = MediaClock(codec.clock, clocks)
        self.time_base = Fraction(1, codec.clock)
        self.timeline = Timeline(self.time_base)
        self.ssrc: int | None = None
        self.last_packet = 0.0            # monotonic s of the last accepted packet
        self.bye = False
        self.stats = StreamStatistics(codec.clock)
        self.lsr, self.lsr_at = 0, 0.0
        self.packets = self.octets = 0
        self.units = self.keyframes = 0
        self._tokens = float(max_bps) / 8
        self._tokens_at = 0
        self._ts_ext: int | None = None   # the last extended RTP timestamp
        self._au_ts: int | None = None
        self._au_arrival = 0
        self._corrupt_next = False
        self._discontinuity = False
        self.depacketizer: H264Depacketizer | Vp8Depacketizer | None = None
        self.decoder: AudioDecoder | None = None
        if codec.name == "h264":
            self.depacketizer = H264Depacketizer(codec.mode, codec.parameter_sets())
            if self.depacketizer.extradata():
                sink.set_extradata(self.depacketizer.extradata(), "h264")
        elif codec.name == "vp8":
            self.depacketizer = Vp8Depacketizer()
        else:
            self.decoder = AudioDecoder(codec)

    # ------------------------------------------------------------ packets
    def datagram(self, data: bytes, now_ns: int) -> None:
        """One datagram from the (checked) peer's RTP address."""
        size = len(data)
        if size < 12:
            self.drop("truncated", 1)
            return
        if data[0] >> 6 != 2:
            self.drop("not_rtp", 1)
            return
        if size > self.max_packet:
            self.drop("oversized", 1)
            return
        if self.max_bps and not self._afford(size, now_ns):
            self.drop("over_rate", 1)
            return
        try:
            packet = RtpPacket.parse(data)
        except ValueError:
            self.drop("malformed", 1)
            return
        if packet.payload_type != self.codec.pt:
            self.drop("payload_type", 1)
            return
        if not self._sender(packet.ssrc):
            self.drop("ssrc", 1)
            return
        self.last_packet = now_ns / 1e9
        self.packets += 1
        self.octets += len(packet.payload)
        self.stats.add(packet)
        refused, out = self.jitter.push(packet.sequence_number, (packet, now_ns), now_ns)
        if refused:
            self.drop(refused, 1)
        if self.jitter.gap:               # found missing now: the peer may still send them again (NACK)
            self.on_missing(packet.ssrc, self.jitter.gap)
        self._out(out)

    def _afford(self, size: int, now_ns: int) -> bool:
        """Token bucket: max_bps with one second of burst."""
        cap = self.max_bps / 8
        self._tokens = min(cap, self._tokens + (now_ns - self._tokens_at) * cap / 1e9)
        self._tokens_at = now_ns
        if self._tokens < size:
            return False
        self._tokens -= size
        return True

    def _sender(self, ssrc: int) -> bool:
        """Is `ssrc` the sender being received (taking it when it is the first, or the last went quiet)?"""
        if ssrc == self.ssrc:
            return True
        quiet = time.monotonic() - self.last_packet > SSRC_SILENCE
        if self.ssrc is not None and not (quiet or self.bye):
            return False
        if self.ssrc is not None:
            self.log.info("%s: the peer's %s now comes from SSRC %08x (was %08x)", self.stream, self.kind, ssrc,
                          self.ssrc)
            self._end_unit()
            self.jitter.reset()
            self.clock.reset()
            self.stats = StreamStatistics(self.codec.clock)
            self._discontinuity = self._corrupt_next = True
            self._ts_ext = None
        self.ssrc, self.bye = ssrc, False
        return True

    def expire(self, now_ns: int) -> None:
        """Timer: give up the gaps that waited long enough."""
        self._out(self.jitter.expire(now_ns))

    def deadline(self) -> int | None:
        return self.jitter.deadline()

    def _out(self, released: list[tuple[int, tuple[RtpPacket, int]]]) -> None:
        for lost, (packet, arrival) in released:
            if lost:
                self._loss(lost)
            if self.decoder is not None:
                self._audio(packet, arrival)
            else:
                self._video(packet, arrival)

    def _loss(self, count: int) -> None:
        self.on_lost(count)
        if self.depacketizer is not None:
            self.depacketizer.lost()
            self._corrupt_next = True
            self.want_keyframe(f"{count} packet(s) lost")

    # ------------------------------------------------------------ video
    def _video(self, packet: RtpPacket, arrival: int) -> None:
        dep = self.depacketizer
        assert dep is not None
        if self._au_ts is not None and packet.timestamp != self._au_ts and dep.started:
            self._end_unit()                      # a new timestamp: the last unit lost its marker
        if not dep.started:
            self._au_ts, self._au_arrival = packet.timestamp, arrival
        refused, au = dep.add(packet.payload, bool(packet.marker))
        if refused:
            self.drop(refused, 1)
        if au is not None:
            self._unit(au, packet.timestamp, arrival)

    def _end_unit(self) -> None:
        dep = self.depacketizer
        if dep is not None and dep.started and self._au_ts is not None:
            au = dep.end()
            if au is not None:
                self._unit(au, self._au_ts, self._au_arrival)

    def _unit(self, au: Au, ts: int, arrival: int) -> None:
        if au.broken:
            self.drop_unit(au.broken)
            self._corrupt_next = True
            self.want_keyframe(f"an access unit was {au.broken}")
            return
        dep = self.depacketizer
        if isinstance(dep, H264Depacketizer) and dep.new_parameters:
            dep.new_parameters = False
            self.sink.set_extradata(dep.extradata(), "h264")
        ext = self._extend(ts)
        capture_ns = self.clock.capture_ns(ext, arrival)
        pts, rebased = self.timeline.map(ext, capture_ns)
        corrupt, self._corrupt_next = self._corrupt_next, False
        disc, self._discontinuity = self._discontinuity or rebased, False
        if not self.keyframes and not au.keyframe and not self.units:
            # a stream that began mid-picture-group (a call taken back after a restart, a sender joined late):
            # nothing on the bus decodes until a keyframe, so ask for one now, not at the peer's next own one
            self.want_keyframe("the stream began without a keyframe")
        if self.sink.encoded(au.data, self.codec.name, keyframe=au.keyframe, pts=pts, time_base=self.time_base,
                             capture_ns=capture_ns, discontinuity=disc, corrupt=corrupt):
            self.units += 1
            self.on_unit()
            if au.keyframe:
                self.keyframes += 1
                self.keyframe_sent()

    def _extend(self, ts: int) -> int:
        """The RTP timestamp past its 32-bit wraps."""
        if self._ts_ext is None:
            self._ts_ext = ts
            return ts
        d = (ts - self._ts_ext) & 0xFFFFFFFF
        if d >= 0x80000000:
            d -= 0x100000000
        self._ts_ext += d
        return self._ts_ext

    # ------------------------------------------------------------ audio
    def _audio(self, packet: RtpPacket, arrival: int) -> None:
        assert self.decoder is not None
        try:
            chunks = self.decoder.decode(packet.payload)
        except ValueError:
            self.drop("bad_payload", 1)
            return
        ext = self._extend(packet.timestamp)
        for pcm in chunks:
            capture_ns = self.clock.capture_ns(ext, arrival)
            pts, _ = self.timeline.map(ext, capture_ns)
            self.sink.audio(pcm, self.decoder.rate, pts=pts, capture_ns=capture_ns)
            self.units += 1
            self.on_unit()
            ext += pcm.shape[0]

    # ------------------------------------------------------------ RTCP
    def sender_report(self, ntp: int, rtp_ts: int) -> None:
        """The peer's SR for this media: its clock mapping, and LSR for our report block."""
        ext = self._extend_peek(rtp_ts)
        self.clock.sender_report(ntp, ext)
        self.lsr, self.lsr_at = (ntp >> 16) & 0xFFFFFFFF, time.monotonic()

    def _extend_peek(self, ts: int) -> int:
        if self._ts_ext is None:
            return ts
        d = (ts - self._ts_ext) & 0xFFFFFFFF
        if d >= 0x80000000:
            d -= 0x100000000
        return self._ts_ext + d

    def received(self) -> Received | None:
        """The report block about this media, once something came."""
        if self.ssrc is None or self.stats.max_seq is None:
            return None
        s = self.stats
        return Received(self.ssrc, s.fraction_lost, s.packets_lost, s.cycles + s.max_seq, s.jitter, self.lsr,
                        self.lsr_at)

    def flowing(self, within: float = 3.0) -> bool:
        return self.units > 0 and time.monotonic() - self.last_packet <= within

    def close(self) -> None:
        self._end_unit()

