"""aiortc as the box's WebRTC peer in tests: a WHEP viewer and a WHIP publisher, over real HTTP and real ICE on
127.0.0.1 (aioice offers no loopback candidate by default: `loopback_ice()` makes this process offer 127.0.0.1,
as [webrtc] ice_addresses = "127.0.0.1" does for the box)."""
from __future__ import annotations

import asyncio
import fractions
import time
from dataclasses import dataclass, field

import aiohttp
import aioice.ice
import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack


def loopback_ice() -> None:
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []


class ColourTrack(VideoStreamTrack):
    """A picture of one colour (RGB) at 30 frames/s, its frame number in the top-left block's luma."""

    def __init__(self, rgb: tuple[int, int, int], width: int = 320, height: int = 240) -> None:
        super().__init__()
        self.picture = np.zeros((height, width, 3), np.uint8)
        self.picture[:] = rgb

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.picture, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


class ToneTrack(AudioStreamTrack):
    """A sine tone, 48 kHz mono, 20 ms frames."""

    def __init__(self, hz: float, gain: float = 1.0) -> None:
        super().__init__()
        self.hz, self.n = hz, 0
        self.gain = gain        # 0 is silence; changed while it plays (a participant who stops talking)

    async def recv(self) -> av.AudioFrame:
        if getattr(self, "_start", None) is None:
            self._start = time.time()
        samples = 960
        wait = self._start + (self.n + samples) / 48000 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (np.arange(samples) + self.n) / 48000
        pcm = (np.sin(2 * np.pi * self.hz * t) * 8000 * self.gain).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self.n, fractions.Fraction(1, 48000)
        self.n += samples
        return frame


async def gathered(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription.sdp


@dataclass
class Peer:
    pc: RTCPeerConnection
    location: str = ""
    answer: str = ""
    frames: list = field(default_factory=list)       # decoded video frames (rgb ndarrays), newest last
    more: list = field(default_factory=list)         # the further video tracks' frames (extra_video): a list each
    audio: list = field(default_factory=list)        # decoded audio (mono int16 ndarrays)
    tasks: list = field(default_factory=list)


def prefer(transceiver, codec: str) -> None:
    caps = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in caps if c.mimeType.lower() in (f"video/{codec}", "video/rtx")])


async def _collect(track: MediaStreamTrack, peer: Peer, keep: int, frames: list | None = None) -> None:
    frames = peer.frames if frames is None else frames
    while True:
        try:
            frame = await track.recv()
        except Exception:
            return
        if track.kind == "video":
            frames.append(frame.to_ndarray(format="rgb24"))
            del frames[:-keep]
        else:
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
            peer.audio.append((frame.sample_rate, pcm.copy()))
            del peer.audio[:-200]


@dataclass
class Answer:
    status_code: int
    text: str
    headers: dict


async def request(method: str, url: str, body: str = "", token: str | None = None,
                  content_type: str = "application/sdp") -> Answer:
    headers = {"Content-Type": content_type} if body else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.request(method, url, data=body.encode() if body else None, headers=headers) as r:
            return Answer(r.status, await r.text(), dict(r.headers))


async def post_offer(url: str, sdp: str, token: str | None) -> Answer:
    return await request("POST", url, sdp, token)


async def connect(base: str, path: str, token: str | None, *, send: tuple[MediaStreamTrack, ...] = (),
                  receive: bool = True, codec: str | None = None, keep: int = 30, extra_video: int = 0) -> Peer:
    """Offer to `base + path` (recvonly when nothing is sent, sendrecv when both); the Peer once answered.
    `extra_video`: that many more video m-lines to receive on (their frames in `peer.more`, in m-line order)."""
    pc = RTCPeerConnection()
    peer = Peer(pc)
    video = next((t for t in send if t.kind == "video"), None)
    audio = next((t for t in send if t.kind == "audio"), None)
    for kind, track in (("video", video), ("audio", audio)):
        direction = "sendrecv" if track and receive else "sendonly" if track else "recvonly"
        tr = pc.addTransceiver(track or kind, direction=direction)
        if kind == "video" and codec:
            prefer(tr, codec)
    extra = [pc.addTransceiver("video", direction="recvonly") for _ in range(extra_video)]
    for tr in extra:
        if codec:
            prefer(tr, codec)
        peer.more.append([])

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        slot = next((i for i, tr in enumerate(extra) if tr.receiver.track is track), None)
        peer.tasks.append(asyncio.ensure_future(_collect(track, peer, keep, None if slot is None else peer.more[slot])))

    r = await post_offer(base + path, await gathered(pc), token)
    if r.status_code != 201:
        await pc.close()
        raise AssertionError(f"{path}: {r.status_code} {r.text}")
    peer.location, peer.answer = r.headers["Location"], r.text
    await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
    return peer


async def close(peer: Peer) -> None:
    for t in peer.tasks:
        t.cancel()
    await peer.pc.close()
