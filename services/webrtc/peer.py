"""aiortc, fitted to the bus: encoded media in and out without decoding, and ICE on chosen addresses.

aiortc does ICE, DTLS, SRTP, RTCP (NACK, PLI, REMB, reports), jitter buffering and RTP
packetisation; what it does not do is let encoded media through. Three small fittings:

* **Out, as the bytes are** (`BusVideoTrack`): a track whose `recv()` returns `av.Packet`s.
  aiortc's sender packetises a packet as it is (`H264Encoder.pack`, `Vp8Encoder.pack`)
  instead of encoding a picture: the access units of the bus go to the viewer as their
  producer made them, with SPS/PPS put before every IDR that lacks them. A viewer's PLI or
  FIR reaches the producer of the stream (`on_keyframe_request`), not aiortc's encoder
  flag, which means nothing for packets.
* **In, as the bytes are** (`tap_video`): aiortc's receiver reassembles access units in its
  jitter buffer and hands them to a decoder thread through a queue. The tap takes that
  queue's place: every access unit goes to the bus as it came (H.264 Annex B, VP8), and
  the decoder thread idles. Nothing is decoded unless a stage of the box wants pictures
  (decode@NAME). aiortc still sends NACK and PLI on loss, and the box's own keyframe
  requests go out as PLI (`send_pli`).
* **Host candidates** (`limit_host_addresses`): aioice offers every interface but loopback;
  `ice_addresses` of [webrtc] names the ones to offer (127.0.0.1 for a browser on the box).

A viewer's queue is bounded in time (`max_wait_ns`): when the oldest access unit waiting
is older than that, the queue is emptied and the track waits for the next keyframe (which
it asks for): the viewer skips ahead instead of falling behind. RoomKit queues 100 frames
(3.3 s at 30 frames/s) and never catches up.
"""
from __future__ import annotations

import asyncio
import collections
import fractions
import time
from collections.abc import Callable
from typing import Any

import aioice.ice
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCRtpCodecParameters
from aiortc.codecs import CODECS
from aiortc.mediastreams import MediaStreamError

__all__ = ["BusAudioTrack", "BusVideoTrack", "add_h264_profiles", "h264_keyframe", "h264_profile",
           "limit_host_addresses", "send_pli", "tap_video", "vp8_keyframe"]

VIDEO_CLOCK = 90000
_NS = fractions.Fraction(1, VIDEO_CLOCK)
SPS, PPS, IDR = 7, 8, 5

_original_host_addresses = aioice.ice.get_host_addresses


def limit_host_addresses(addresses: list[str]) -> None:
    """Offer only `addresses` as host candidates ([] restores aioice's choice: every interface but loopback)."""
    if not addresses:
        aioice.ice.get_host_addresses = _original_host_addresses
        return
    wanted = list(addresses)

    def chosen(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in wanted if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = chosen


def add_h264_profiles() -> None:
    """Let aiortc accept H.264 Main and High besides (constrained) Baseline, so that a camera's High profile
    stream can pass through to a browser that offers High. Idempotent."""
    video = CODECS["video"]
    have = {c.parameters.get("profile-level-id") for c in video if c.mimeType == "video/H264"}
    pt = max(c.payloadType for c in video) + 1
    for plid in ("4d001f", "640c1f", "64001f"):
        if plid in have:
            continue
        video.append(RTCRtpCodecParameters(mimeType="video/H264", clockRate=VIDEO_CLOCK, payloadType=pt,
                                           parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1",
                                                       "profile-level-id": plid}))
        video.append(RTCRtpCodecParameters(mimeType="video/rtx", clockRate=VIDEO_CLOCK, payloadType=pt + 1,
                                           parameters={"apt": pt}))
        pt += 2


# ------------------------------------------------------------------ bitstream facts
def _nal_types(au: bytes, limit: int = 8) -> list[int]:
    """The types of the first NAL units of an Annex B access unit (a few finds, no loop over bytes)."""
    types = []
    i = au.find(b"\x00\x00\x01")
    while i != -1 and len(types) < limit and i + 3 < len(au):
        types.append(au[i + 3] & 0x1F)
        i = au.find(b"\x00\x00\x01", i + 3)
    return types


def h264_keyframe(au: bytes) -> bool:
    return IDR in _nal_types(au)


def vp8_keyframe(frame: bytes) -> bool:
    return bool(frame) and not frame[0] & 1


def h264_profile(extradata: bytes | None) -> str | None:
    """The profile-level-id (6 hex digits) of the first SPS in Annex B data: profile_idc, constraint flags,
    level_idc; None without one."""
    if not extradata:
        return None
    i = extradata.find(b"\x00\x00\x01")
    while i != -1:
        if i + 6 < len(extradata) and extradata[i + 3] & 0x1F == SPS:
            return extradata[i + 4:i + 7].hex()
        i = extradata.find(b"\x00\x00\x01", i + 3)
    return None


def _profile_idc(plid: str) -> int:
    return int(plid[:2], 16)


def profile_fits(source: str | None, negotiated: str | None) -> bool:
    """Does a viewer that agreed on `negotiated` decode what a source with `source` sends? Baseline-family
    streams (66) fit any agreement; Main (77) fits Main and High; High (100) only High. Unknown: it fits
    (the stream's own profile is learned from its first SPS)."""
    if source is None or negotiated is None:
        return True
    s, n = _profile_idc(source), _profile_idc(negotiated)
    rank = {66: 0, 77: 1, 88: 1, 100: 2}
    return rank.get(s, 3) <= rank.get(n, 0)


# ------------------------------------------------------------------ out: bus -> viewer
class BusVideoTrack(MediaStreamTrack):
    """Access units of the bus as av.Packets for aiortc's sender (never decoded)."""

    kind = "video"

    def __init__(self, *, max_wait_ns: int, ask_keyframe: Callable[[str], None],
                 dropped: Callable[[str, int], None]) -> None:
        super().__init__()
        self.max_wait_ns = max_wait_ns
        self.ask_keyframe = ask_keyframe
        self.dropped = dropped
        self._queue: collections.deque[tuple[bytes, bool, int]] = collections.deque()
        self._ready = asyncio.Event()
        self._gate = True            # closed until a keyframe
        self._t0: int | None = None
        self._last_pts = -1
        self.extradata: bytes | None = None
        self.sent = self.keyframes = 0

    def push(self, data: bytes, keyframe: bool, capture_ns: int) -> None:
        """One access unit from the route (on the loop)."""
        if self.readyState != "live":
            return
        if self._queue and capture_ns - self._queue[0][2] > self.max_wait_ns:
            self.dropped("late", len(self._queue))
            self._queue.clear()
            self._gate = True
            self.ask_keyframe("the viewer fell behind")
        if self._gate and not keyframe:
            self.dropped("gated", 1)
            return
        self._gate = False
        self._queue.append((data, keyframe, capture_ns))
        self._ready.set()

    async def recv(self) -> av.Packet:
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        data, keyframe, capture_ns = self._queue.popleft()
        if keyframe and self.extradata and SPS not in _nal_types(data, 3):
            data = self.extradata + data      # every IDR with its parameter sets (a browser joins on any IDR)
        packet = av.Packet(data)
        if self._t0 is None:
            self._t0 = capture_ns
        pts = (capture_ns - self._t0) * VIDEO_CLOCK // 1_000_000_000
        if pts <= self._last_pts:             # a route switch may step back: RTP time never does
            pts = self._last_pts + 1
        self._last_pts = pts
        packet.pts, packet.time_base = pts, _NS
        self.sent += 1
        self.keyframes += keyframe
        return packet

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class BusAudioTrack(MediaStreamTrack):
    """s16 PCM chunks of the bus as av.AudioFrames (aiortc encodes Opus, PCMU or PCMA), always 48 kHz stereo in
    whole 20 ms frames (whatever the chunks' length: a 40 ms chunk is two frames, each its own RTP timestamp):
    aiortc's encoder keeps one resampler for the track's life, which refuses a frame of another rate or layout, so
    a route that switches from a stereo stream to a mono one (the bridge's mix) or to a phone's 8 kHz would end
    the track's audio. 48 kHz stereo chunks (aiortc's own decode) go through as they are, mono ones are
    doubled, other rates resampled."""

    kind = "audio"
    RATE = 48000
    FRAME = 960                 # samples of one 20 ms frame: one Opus packet, one RTP timestamp

    def __init__(self, *, max_chunks: int = 25, dropped: Callable[[str, int], None]) -> None:
        super().__init__()
        self.max_chunks = max_chunks
        self.dropped = dropped
        self._queue: collections.deque[tuple[bytes, int, int]] = collections.deque()
        self._ready = asyncio.Event()
        self._pts = 0
        self._resampler: Any = None
        self._resampling: tuple[int, int] | None = None
        self._out: collections.deque[av.AudioFrame] = collections.deque()
        self._carry = np.zeros(0, np.int16)        # interleaved stereo short of a whole frame

    def push(self, data: bytes, rate: int, channels: int) -> None:
        if self.readyState != "live":
            return
        if len(self._queue) >= self.max_chunks:
            self.dropped("late", len(self._queue))
            self._queue.clear()
        self._queue.append((data, rate, channels))
        self._ready.set()

    async def recv(self) -> av.AudioFrame:
        while not self._out:
            while not self._queue:
                if self.readyState != "live":
                    raise MediaStreamError
                self._ready.clear()
                await self._ready.wait()
            self._convert(*self._queue.popleft())
        frame = self._out.popleft()
        frame.pts, frame.time_base = self._pts, fractions.Fraction(1, self.RATE)
        self._pts += frame.samples
        return frame

    def _convert(self, data: bytes, rate: int, channels: int) -> None:
        pcm = np.frombuffer(data, dtype=np.int16)
        if rate == self.RATE and channels in (1, 2):
            stereo = pcm if channels == 2 else np.repeat(pcm, 2)
        else:
            if self._resampling != (rate, channels):
                self._resampler = av.AudioResampler(format="s16", layout="stereo", rate=self.RATE)
                self._resampling = (rate, channels)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16",
                                               layout="stereo" if channels == 2 else "mono")
            frame.sample_rate = rate
            parts = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
            stereo = np.concatenate(parts) if parts else pcm[:0]
        self._frames(stereo)

    def _frames(self, stereo: np.ndarray) -> None:
        """Whole 20 ms frames out of interleaved stereo: aiortc sends what one recv() returns as one RTP
        timestamp, so a 40 ms chunk handed as one frame went out as two Opus packets with the same timestamp,
        and a receiver kept only the first (half the audio lost)."""
        data = np.concatenate((self._carry, stereo)) if len(self._carry) else stereo
        step = self.FRAME * 2
        whole = len(data) - len(data) % step
        for i in range(0, whole, step):
            frame = av.AudioFrame.from_ndarray(data[i:i + step].reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate = self.RATE
            self._out.append(frame)
        self._carry = data[whole:].copy()

    def stop(self) -> None:
        super().stop()
        self._ready.set()


# ------------------------------------------------------------------ in: publisher -> bus
class _Tap:
    """Stands in for aiortc's decoder queue: access units go to `on_unit`, only the end marker to the thread."""

    def __init__(self, on_unit: Callable[[str, bytes, int], None]) -> None:
        import queue
        self.on_unit = on_unit
        self._thread_queue: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        if item is None:
            self._thread_queue.put(None)     # stop: the decoder thread ends, and with it the track
            return
        codec, frame = item
        self.on_unit(codec.name.lower(), frame.data, frame.timestamp)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._thread_queue.get(*args, **kwargs)


def tap_video(receiver: Any, on_unit: Callable[[str, bytes, int], None]) -> None:
    """Take `receiver`'s access units (codec, Annex B / VP8 bytes, RTP timestamp) before its decoder does.
    Call before the connection starts (right after setRemoteDescription)."""
    receiver._RTCRtpReceiver__decoder_queue = _Tap(on_unit)


async def send_pli(receiver: Any) -> bool:
    """A PLI to whoever sends to `receiver` (its newest SSRC); False before anything came."""
    sources = receiver.getSynchronizationSources()
    if not sources:
        return False
    newest = max(sources, key=lambda s: s.timestamp)
    await receiver._send_rtcp_pli(newest.source)
    return True


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
