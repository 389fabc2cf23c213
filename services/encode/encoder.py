"""The encoder of encode@NAME: PyAV over libx264, libvpx, NVENC or a V4L2 M2M / Jetson engine, set up for calls.

    enc = Encoder(choice.name, "h264", 1280, 720, "yuv420p", kbps=2000, fps=30.0, gop=2.0)
    for packet in enc.encode(frame.av, pts_90k, keyframe=True):   # an IDR now
        ...                                                         # Annex B, SPS/PPS first

Which encoder runs is chosen by services/recorder/encoder.py's `choose()` (a real probe
encode, never a codec list); this module opens it with the options a call needs:

* H.264: constrained baseline (no B-frames, no CABAC: what every browser and SIP phone
  decodes), zero latency (no lookahead, no frame threads: a picture in, its access unit
  out of the same encode() call), Annex B with SPS/PPS in front of every IDR
  (`repeat-headers` for x264; for an engine that does not repeat them, `ParameterSets`
  puts the last ones seen in front of an IDR that lacks them), `forced-idr` so a picture
  asked to be a keyframe is an IDR, no scene-cut keyframes (keyframes come when asked, or
  every gop seconds).
* VP8: libvpx in realtime mode (no lag, no alt-ref frames), constant bit rate.
* Threads (software): 1 by default, the least CPU per stream. Measured on the 2-core build
  machine, 720p30, CPU per second of video: libx264 239 ms with 1 thread, 270 with 2; libvpx
  170 ms with 1, 787 with 2 (its threads spin while they wait for each other). x264's
  zerolatency threads work by slices, so more threads add no latency.
* Bit rate: `kbps` with a VBV of one second (maxrate = bufsize = kbps): the peak a
  call's link sees is bounded.
* Keyframes: periodic ones are forced by the service every `gop` seconds of capture time
  (the input's pace may not be the nominal fps), so software encoders get an unbounded
  GOP of their own; a hardware engine also gets gop x fps as its own interval, in case it
  ignores a forced keyframe.

Time base 1/90000 (RTP's video clock); pts are the capture times, so the rate control sees
the real pace of the input.
"""
from __future__ import annotations

from fractions import Fraction

import av

from services.decode.decoder import nal_spans

__all__ = ["TIME_BASE", "Encoder", "ParameterSets", "call_options"]

TIME_BASE = Fraction(1, 90000)
KEYINT_UNBOUNDED = 1 << 30     # x264's "infinite"; libvpx takes it as a distance
SOFTWARE = ("libx264", "libvpx")
_HEAD = 4096                   # SPS, PPS and SEI lie in the first bytes of an IDR access unit


def call_options(name: str, kbps: int, slice_bytes: int = 0) -> dict[str, str]:
    """AVOptions of the encoder `name` for a call (generic ones included: maxrate, bufsize); `slice_bytes`: the
    largest slice (x264), for a peer that takes single NAL units only (H.264 packetization-mode 0)."""
    vbv = {"maxrate": f"{kbps}k", "bufsize": f"{kbps}k"}
    if name == "libx264":
        sliced = f":slice-max-size={slice_bytes}" if slice_bytes else ""
        return {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline", "forced-idr": "1",
                "x264-params": f"repeat-headers=1:scenecut=0{sliced}", **vbv}
    if name == "libvpx":
        return {"deadline": "realtime", "cpu-used": "16", "lag-in-frames": "0", "auto-alt-ref": "0",
                "minrate": f"{kbps}k", **vbv}
    if name.endswith("_nvenc"):
        return {"preset": "p2", "tune": "ull", "zerolatency": "1", "delay": "0", "profile": "baseline", "bf": "0",
                "forced-idr": "1", "rc": "cbr", **vbv}
    if name.endswith("_nvmpi"):
        return {"profile": "baseline", **vbv}
    return dict(vbv)  # V4L2 M2M: bit rate and GOP from the context


class ParameterSets:
    """SPS/PPS in front of every H.264 IDR: checks an IDR's first bytes (never its payload), keeps the
    last parameter sets seen, and puts them in front of an IDR that came without."""

    def __init__(self) -> None:
        self.annexb: bytes = b""   # the last SPS + PPS, with start codes
        self.added = 0             # IDRs that needed them

    def check(self, packet: av.Packet) -> bytes | None:
        """None when the IDR access unit `packet` has SPS and PPS in front (it is kept as it is);
        else the access unit with the last ones seen in front (or None when none were ever seen)."""
        view = memoryview(packet).cast("B")
        head = bytes(view[:_HEAD])
        sets: list[bytes] = []
        for start, end in nal_spans(head):
            kind = head[start] & 0x1F
            if kind in (7, 8):
                sets.append(head[start:end])
            elif 1 <= kind <= 5:
                break
        if {s[0] & 0x1F for s in sets} >= {7, 8}:
            found = b"".join(b"\x00\x00\x00\x01" + s for s in sets)
            if found != self.annexb:
                self.annexb = found
            return None
        if not self.annexb:
            return None
        self.added += 1
        return self.annexb + bytes(view)


class Encoder:
    """One open encoder. `encode(frame, pts, keyframe)` returns the packets ready (with the zero-latency
    settings, the picture's own access unit)."""

    def __init__(self, name: str, codec: str, width: int, height: int, pix_fmt: str, *, kbps: int, fps: float,
                 gop: float, hardware: bool, threads: int = 1, slice_bytes: int = 0) -> None:
        self.name, self.codec, self.hardware = name, codec, hardware
        self.width, self.height, self.pix_fmt = width, height, pix_fmt
        ctx = av.CodecContext.create(name, "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, pix_fmt
        ctx.time_base = TIME_BASE
        ctx.framerate = Fraction(fps).limit_denominator(1001)
        ctx.bit_rate = kbps * 1000
        ctx.gop_size = KEYINT_UNBOUNDED if name in SOFTWARE else max(1, round(gop * fps))
        if name in SOFTWARE:  # x264 zerolatency threads by slices (no added latency), libvpx by partitions
            ctx.thread_count = threads
        ctx.options = call_options(name, kbps, slice_bytes)
        ctx.open()
        self.ctx = ctx
        self._intra = av.video.frame.PictureType.I
        self._auto = av.video.frame.PictureType.NONE

    def encode(self, frame: av.VideoFrame, pts: int, keyframe: bool = False) -> list[av.Packet]:
        frame.pts = pts
        frame.pict_type = self._intra if keyframe else self._auto  # pool frames are reused: always set
        return self.ctx.encode(frame)

    def flush(self) -> list[av.Packet]:
        """What the encoder still holds (nothing with the zero-latency settings); it is done after this."""
        try:
            return self.ctx.encode(None)
        except av.error.EOFError:
            return []

    def close(self) -> None:
        self.ctx = None  # type: ignore[assignment]  # PyAV frees the context with its last reference
