"""One outbound media of a call: a stream on the bus -> RTP packets to the peer, paced, kept for NACK.

Video: each access unit of the stream (read with a framebus Consumer) is checked against
the codec the SDP settled on (another codec is dropped and counted: `codec`), held back
until the first keyframe (a peer cannot decode what comes before it: `waiting_keyframe`),
cut into payloads by the codec's packetizer (services/rtp/h264.py, vp8.py; in H.264 mode
0 a NAL unit larger than a packet refuses the whole unit: `nal_too_large`), and each
payload becomes an RTP packet (aiortc's RtpPacket): the unit's last one has the marker.
The RTP timestamp is the unit's capture_ns on the media clock, so the sender report's
mapping (RTP time <-> wall clock at this instant) holds for every packet and the peer can
line audio and video up.

Audio: s16 chunks of the stream are encoded (services/rtp/audio.py) into 20 ms payloads,
one per packet; their RTP time follows the samples, starting from the first chunk's
capture_ns.

Pacing: packets leave through a token bucket at `pacing_bps` with a burst of a few
packets, so a keyframe of 30 packets goes out over a few milliseconds instead of in one
burst that a switch or the peer's socket buffer may drop. Every packet sent is kept (the
last `history` of them) to answer the peer's NACK with the same packet.
"""
from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from aiortc.rtp import RtpPacket

from services.rtp.audio import AudioEncoder
from services.rtp.h264 import H264Packetizer, TooLarge
from services.rtp.sdp import Codec
from services.rtp.vp8 import Vp8Packetizer

__all__ = ["Outbound", "Pacer"]

BURST_PACKETS = 4
TICK = 0.001           # the loop's timer granularity: asyncio's epoll waits whole milliseconds
HEADER = 12


def _annexb(extradata: bytes) -> bytes:
    """Parameter sets as Annex B, from Annex B or an avcC record."""
    if len(extradata) < 7 or extradata[0] != 1:
        return extradata
    out, p = [], 5
    for mask in (0x1F, 0xFF):                 # SPS count (5 bits), then PPS count: a few entries
        count = extradata[p] & mask
        p += 1
        for _ in range(count):
            size = int.from_bytes(extradata[p:p + 2], "big")
            out.append(b"\x00\x00\x00\x01" + extradata[p + 2:p + 2 + size])
            p += 2 + size
    return b"".join(out)


class Pacer:
    """Sends datagrams no faster than `rate_bps` (a bucket of BURST_PACKETS packets)."""

    def __init__(self, rate_bps: int, mtu: int, send: Callable[[bytes], None],
                 call_later: Callable[[float, Callable[[], None]], Any]) -> None:
        self.rate = rate_bps / 8                   # bytes per second
        self.burst = BURST_PACKETS * mtu
        self.tokens = float(self.burst)
        self.at = time.monotonic()
        self.queue: collections.deque[bytes] = collections.deque()
        self.send, self.call_later = send, call_later
        self._waiting = False
        self.sent_at: list[float] = []             # for tests: when each packet left (bounded)

    def put(self, packets: list[bytes]) -> None:
        self.queue.extend(packets)
        if not self._waiting:                      # nothing was waiting: the bucket filled while idle
            self._drain(idle=True)

    def _drain(self, idle: bool = False) -> None:
        self._waiting = False
        now = time.monotonic()
        self.tokens += (now - self.at) * self.rate
        if idle:
            # credit saved while nothing waited is one burst at most; while packets wait it is all theirs (a
            # timer that woke late does not slow the rate: capped there, the rate could not pass a burst a tick)
            self.tokens = min(self.burst, self.tokens)
        self.at = now
        # a wait shorter than the loop's tick lasts a whole tick (a 20 Mbit/s packet is due every 0.48 ms): what the
        # rate allows within one tick goes now, so a unit is not held a tick for a fraction of a packet's time
        ahead = self.rate * TICK
        while self.queue and self.tokens + ahead >= len(self.queue[0]):
            data = self.queue.popleft()
            self.tokens -= len(data)
            self.send(data)
        if self.queue:
            self._waiting = True
            self.call_later((len(self.queue[0]) - self.tokens - ahead) / self.rate, self._drain)


class Outbound:
    def __init__(self, kind: str, stream: str, codec: Codec, *, mtu: int, history: int, pacer: Pacer,
                 drop: Callable[[str], None], log: Any) -> None:
        self.kind, self.stream, self.codec, self.log = kind, stream, codec, log
        self.pacer, self.drop = pacer, drop
        self.ssrc = random.getrandbits(32)
        self.seq = random.getrandbits(16)
        self.ts_base = random.getrandbits(32)
        self.packets = self.octets = 0
        self.units = 0
        self.keyframes = 0
        self.last_ts: int | None = None
        self.waiting_keyframe = kind == "video"
        self.history: dict[int, bytes] = {}
        self._order: collections.deque[int] = collections.deque()
        self._history = history
        max_payload = mtu - HEADER
        self.packetizer: H264Packetizer | Vp8Packetizer | None = None
        self.encoder: AudioEncoder | None = None
        self._audio_ts: int | None = None
        self._audio_ns = 0
        if codec.name == "h264":
            self.packetizer = H264Packetizer(codec.mode, max_payload)
        elif codec.name == "vp8":
            self.packetizer = Vp8Packetizer(max_payload, random.getrandbits(15))
        else:
            self.encoder = AudioEncoder(codec)

    def rtp_time(self, mono_ns: int) -> int:
        """The media clock at a CLOCK_MONOTONIC instant (what the sender report says is now)."""
        return (self.ts_base + (mono_ns * self.codec.clock + 500_000_000) // 1_000_000_000) & 0xFFFFFFFF

    # ------------------------------------------------------------ video
    def new_stream(self) -> None:
        """The route switched to another stream (on its keyframe): its parameter sets are its own."""
        if isinstance(self.packetizer, H264Packetizer):
            self.packetizer.sps = self.packetizer.pps = None

    def access_unit(self, data: bytes, codec: str, keyframe: bool, capture_ns: int,
                    extradata: bytes | None = None) -> bool:
        """One access unit of the stream; False when it was not sent (counted)."""
        if codec != self.codec.name:
            self.drop("codec")
            return False
        if self.waiting_keyframe and not keyframe:
            self.drop("waiting_keyframe")
            return False
        assert self.packetizer is not None
        if isinstance(self.packetizer, H264Packetizer) and extradata and self.packetizer.sps is None:
            self.packetizer.parameter_sets(_annexb(extradata))
        try:
            payloads = self.packetizer.packetize(data)
        except TooLarge:
            self.drop("nal_too_large")
            return False
        if not payloads:
            return False
        self.waiting_keyframe = False
        self._send(payloads, self.rtp_time(capture_ns))
        self.units += 1
        self.keyframes += keyframe
        return True

    def _send(self, payloads: list[bytes], ts: int, last_marker: bool = True) -> None:
        packets = []
        last = len(payloads) - 1
        for i, payload in enumerate(payloads):
            packet = RtpPacket(payload_type=self.codec.pt, marker=int(last_marker and i == last),
                               sequence_number=self.seq, timestamp=ts, ssrc=self.ssrc, payload=payload)
            data = packet.serialize()
            self._keep(self.seq, data)
            self.seq = (self.seq + 1) & 0xFFFF
            self.packets += 1
            self.octets += len(payload)
            packets.append(data)
        self.last_ts = ts
        self.pacer.put(packets)

    def _keep(self, seq: int, data: bytes) -> None:
        if not self._history:
            return
        self.history[seq] = data
        self._order.append(seq)
        if len(self._order) > self._history:
            self.history.pop(self._order.popleft(), None)

    def resend(self, seqs: list[int]) -> int:
        """A NACK: the packets still kept are sent again; how many."""
        found = [self.history[s] for s in seqs if s in self.history]
        if found:
            self.pacer.put(found)
        return len(found)

    # ------------------------------------------------------------ audio
    def audio(self, pcm: np.ndarray, rate: int, capture_ns: int) -> None:
        assert self.encoder is not None
        if self._audio_ts is None:
            self._audio_ts = self.rtp_time(capture_ns)
        for payload, samples in self.encoder.encode(pcm, rate):
            self._send([payload], self._audio_ts, last_marker=False)
            self._audio_ts = (self._audio_ts + samples) & 0xFFFFFFFF
            self.units += 1

    # ------------------------------------------------------------ what the SR says
    def sender_info(self) -> tuple[int, int, int] | None:
        """(RTP time now, packets, octets) for a sender report, once something was sent."""
        if not self.packets:
            return None
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        return self.rtp_time(now), self.packets, self.octets
