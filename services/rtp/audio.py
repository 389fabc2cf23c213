"""Audio of a call: PCMU, PCMA and Opus payloads to and from s16 PCM, with PyAV (FFmpeg's codecs, libopus).

In, one RTP payload is one encoded frame: `AudioDecoder.decode(payload)` gives (samples,
channels) int16 at the codec's rate, what the bus's NAME-audio carries. Out,
`AudioEncoder.encode(pcm, rate)` takes s16 chunks of any rate and channel count (what a
bus audio stream carries), resamples them to the codec's (8 kHz mono for G.711, 48 kHz
for Opus), cuts 20 ms frames and returns their payloads with their sample counts; what
is left over waits for the next chunk.
"""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from services.rtp.sdp import Codec

__all__ = ["AudioDecoder", "AudioEncoder", "FRAME_MS"]

FRAME_MS = 20
_FFMPEG = {"pcmu": "pcm_mulaw", "pcma": "pcm_alaw", "opus": "libopus"}


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


class AudioDecoder:
    def __init__(self, codec: Codec) -> None:
        self.rate = codec.clock
        self.channels = 2 if codec.name == "opus" and codec.channels >= 2 else 1
        self.ctx = av.CodecContext.create(_FFMPEG[codec.name], "r")
        self.ctx.sample_rate = self.rate
        self.ctx.layout = _layout(self.channels)

    def decode(self, payload: bytes) -> list[np.ndarray]:
        """(samples, channels) int16 arrays of one payload; ValueError when FFmpeg refuses it."""
        try:
            frames = self.ctx.decode(av.Packet(payload))
        except av.FFmpegError as exc:
            raise ValueError(str(exc)) from None
        out = []
        for frame in frames:
            pcm = frame.to_ndarray()                    # s16: (1, samples*channels); s16p: (channels, samples)
            if frame.format.is_planar:
                pcm = pcm.T
            out.append(np.ascontiguousarray(pcm.reshape(frame.samples, -1), dtype=np.int16))
        return out


class AudioEncoder:
    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.rate = codec.clock
        self.channels = 2 if codec.name == "opus" and codec.channels >= 2 else 1
        self.frame = self.rate * FRAME_MS // 1000
        self.ctx = av.CodecContext.create(_FFMPEG[codec.name], "w")
        self.ctx.sample_rate = self.rate
        self.ctx.layout = _layout(self.channels)
        self.ctx.format = "s16"
        self.ctx.time_base = Fraction(1, self.rate)
        if codec.name == "opus":
            self.ctx.options = {"application": "voip", "frame_duration": str(FRAME_MS)}
        self.ctx.open()
        self.fifo = av.AudioFifo()
        self._resampler: av.AudioResampler | None = None
        self._from: tuple[int, int] = (0, 0)
        self._pts = 0

    def encode(self, pcm: np.ndarray, rate: int) -> list[tuple[bytes, int]]:
        """Payloads (each with its samples at the codec's rate) of what is complete after this chunk."""
        channels = pcm.shape[1] if pcm.ndim == 2 else 1
        if self._resampler is None or self._from != (rate, channels):
            self._resampler = av.AudioResampler(format="s16", layout=_layout(self.channels), rate=self.rate)
            self._from = (rate, channels)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16",
                                           layout=_layout(channels))
        frame.sample_rate = rate
        for out in self._resampler.resample(frame):
            out.pts = None
            self.fifo.write(out)
        payloads = []
        while self.fifo.samples >= self.frame:
            chunk = self.fifo.read(self.frame)
            chunk.pts, self._pts = self._pts, self._pts + self.frame
            for packet in self.ctx.encode(chunk):
                payloads.append((bytes(packet), self.frame))
        return payloads
