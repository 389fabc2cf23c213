"""RTCP (RFC 3550, 4585, 5104): the reports and feedback a call sends, and what its peer's mean.

Packets are read and written with aiortc's classes (`RtcpPacket.parse`, `RtcpSrPacket`,
`RtcpRrPacket`, `RtcpSdesPacket`, `RtcpPsfbPacket`, `RtcpRtpfbPacket`); this module adds
what aiortc leaves to its own receiver: the compound report of a media (SR when the box
sends on it, else RR, with a report block about what it receives, and an SDES CNAME as
RFC 3550 6.1 asks), FIR with its command sequence number (RFC 5104 4.3.1: aiortc only
carries the FCI bytes), and the clock mapping an SR gives.

`Clocks` turns RTP timestamps of the inbound media into the box's clock (CLOCK_MONOTONIC
ns). Before the peer's first sender report a media's own arrivals set it: the earliest
arrival seen for its RTP time (a minimum, so network jitter does not shake it). Once
sender reports came, every media of the call maps its RTP time to the peer's wall clock
through its latest SR, and one offset (the earliest arrival, over all media) takes that
wall clock to the box's: audio and video sent at the same instant get the same capture
time, which is what the recorder and the bridge line streams up with. The minimum may
creep up by `CREEP` per second so a peer whose clock runs slow is followed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from struct import pack, unpack_from

from aiortc.rtp import (
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpByePacket,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSdesPacket,
    RtcpSenderInfo,
    RtcpSourceInfo,
    RtcpSrPacket,
)

__all__ = ["Clocks", "MediaClock", "bye", "fir", "nack", "ntp_now", "parse", "pli", "report", "wall_of_ntp"]

NTP_EPOCH_OFFSET = 2208988800          # seconds from 1900 to 1970
CREEP = 0.001                          # how fast (s/s) the arrival minimum may rise


def parse(data: bytes) -> list:
    """The packets of a compound RTCP datagram; ValueError when it is not RTCP."""
    if len(data) < 4 or data[0] >> 6 != 2 or not 192 <= data[1] <= 223:
        raise ValueError("not an RTCP packet")
    return RtcpPacket.parse(data)


def ntp_now(wall_ns: int | None = None) -> int:
    """The 64-bit NTP timestamp of now (or of `wall_ns`, Unix ns)."""
    ns = time.time_ns() if wall_ns is None else wall_ns
    seconds, rest = divmod(ns, 1_000_000_000)
    return ((seconds + NTP_EPOCH_OFFSET) << 32) | (rest << 32) // 1_000_000_000


def wall_of_ntp(ntp: int) -> int:
    """Unix ns of a 64-bit NTP timestamp."""
    return ((ntp >> 32) - NTP_EPOCH_OFFSET) * 1_000_000_000 + ((ntp & 0xFFFFFFFF) * 1_000_000_000 >> 32)


@dataclass
class Received:
    """What a report block says about one inbound stream (filled by the inbound media)."""
    ssrc: int
    fraction_lost: int
    packets_lost: int
    highest_sequence: int
    jitter: int
    lsr: int = 0           # middle 32 bits of the last SR's NTP time
    lsr_at: float = 0.0    # when it came (monotonic s)


def report(ssrc: int, cname: str, *, sent: tuple[int, int, int] | None, received: Received | None,
           now: float | None = None) -> bytes:
    """A compound RTCP packet: SR (sent = (rtp timestamp now, packets, octets)) or RR, then SDES CNAME."""
    blocks = []
    if received is not None:
        now = time.monotonic() if now is None else now
        dlsr = int((now - received.lsr_at) * 65536) if received.lsr else 0
        blocks.append(RtcpReceiverInfo(ssrc=received.ssrc, fraction_lost=received.fraction_lost,
                                       packets_lost=received.packets_lost, highest_sequence=received.highest_sequence,
                                       jitter=received.jitter, lsr=received.lsr, dlsr=dlsr))
    if sent is not None:
        rtp_ts, packets, octets = sent
        first: RtcpSrPacket | RtcpRrPacket = RtcpSrPacket(
            ssrc=ssrc, sender_info=RtcpSenderInfo(ntp_timestamp=ntp_now(), rtp_timestamp=rtp_ts & 0xFFFFFFFF,
                                                  packet_count=packets & 0xFFFFFFFF,
                                                  octet_count=octets & 0xFFFFFFFF), reports=blocks)
    else:
        first = RtcpRrPacket(ssrc=ssrc, reports=blocks)
    sdes = RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=ssrc, items=[(1, cname.encode())])])
    return bytes(first) + bytes(sdes)


def pli(ssrc: int, media_ssrc: int) -> bytes:
    return bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=ssrc, media_ssrc=media_ssrc))


def fir(ssrc: int, media_ssrc: int, seq: int) -> bytes:
    """FIR (RFC 5104 4.3.1): the packet's media SSRC is 0, the FCI names the stream and a request number."""
    return bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_FIR, ssrc=ssrc, media_ssrc=0,
                                fci=pack("!LB3x", media_ssrc, seq & 0xFF)))


def fir_targets(packet: RtcpPsfbPacket) -> list[int]:
    """The SSRCs a FIR asks keyframes of."""
    fci = packet.fci
    return [unpack_from("!L", fci, pos)[0] for pos in range(0, len(fci) - 7, 8)]


def nack(ssrc: int, media_ssrc: int, lost: list[int]) -> bytes:
    return bytes(RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=ssrc, media_ssrc=media_ssrc, lost=sorted(lost)))


def bye(ssrc: int) -> bytes:
    """BYE (RFC 3550 6.6): the source leaves (the call ended)."""
    return bytes(RtcpByePacket(sources=[ssrc]))


class MediaClock:
    """One inbound media's RTP clock (extended timestamps) against the sender's wall clock and the box's."""

    def __init__(self, rate: int, clocks: Clocks) -> None:
        self.rate, self.clocks = rate, clocks
        self.sr: tuple[int, int] | None = None      # (sender wall ns, extended RTP timestamp) of the last SR
        self.own_offset: float | None = None        # arrival ns - RTP time ns, its minimum (before any SR)
        self._own_at = 0

    def sender_report(self, ntp: int, rtp_ext: int) -> None:
        self.sr = (wall_of_ntp(ntp), rtp_ext)

    def reset(self) -> None:
        """A new sender (SSRC): its clock is another one."""
        self.sr, self.own_offset = None, None

    def capture_ns(self, rtp_ext: int, arrival_ns: int) -> int:
        """The box's time of the instant `rtp_ext` stands for, seen at `arrival_ns` (monotonic)."""
        if self.sr is not None:
            wall = self.sr[0] + (rtp_ext - self.sr[1]) * 1_000_000_000 // self.rate
            return int(wall + self.clocks.observe(arrival_ns - wall, arrival_ns))
        media = rtp_ext * 1_000_000_000 // self.rate
        sample = arrival_ns - media
        if self.own_offset is None:
            self.own_offset = sample
        else:
            self.own_offset = min(sample, self.own_offset + CREEP * (arrival_ns - self._own_at))
        self._own_at = arrival_ns
        return int(media + self.own_offset)


class Clocks:
    """The offset from the peer's wall clock to the box's monotonic clock, shared by a call's media."""

    def __init__(self) -> None:
        self.offset: float | None = None
        self._at = 0

    def observe(self, sample: float, arrival_ns: int) -> float:
        if self.offset is None:
            self.offset = sample
        else:
            self.offset = min(sample, self.offset + CREEP * (arrival_ns - self._at))
        self._at = arrival_ns
        return self.offset
