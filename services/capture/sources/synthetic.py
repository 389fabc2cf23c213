"""The synthetic source: a moving test pattern with a frame counter, raw or H.264, and a test tone.

No hardware, no network: the embedded default. Each frame is drawn straight into its
destination (a loaned bus slot for raw, the encoder's input frame for H.264) from a
background built once, plus a moving bar and the frame number as 32 black/white blocks
(readable back with `frame_number`, from RGB or from a decoded luma plane, which tests
use to prove frames arrive in order and intact).

Once a second, at the exact instant the capture clock passes a whole second since the
start, the picture is white for one frame and the audio (when `audio = true`) starts a
100 ms 1 kHz beep: a source whose flash and beep line up by construction, for measuring
A/V sync downstream. Audio is s16 mono at 48 kHz in 20 ms chunks, stamped on the same
capture clock as the video.

Frames are paced against CLOCK_MONOTONIC on the reader thread; a frame whose time has
passed by more than one period is not drawn late but counted as dropped ("late").
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from services.capture.sink import Sink
from services.capture.sources.base import Emit, EncodedSourceConfig, SourceError, source_kind
from services.runtime.schema import RESTART, setting

__all__ = ["H264Encoder", "Pattern", "SyntheticConfig", "SyntheticSource", "frame_number"]

NS = 1_000_000_000
NS_BASE = Fraction(1, NS)
AUDIO_RATE = 48000
AUDIO_CHUNK = 960          # 20 ms
BEEP_SAMPLES = AUDIO_RATE // 10
TONE_HZ = 1000


@dataclass(frozen=True)
class SyntheticConfig(EncodedSourceConfig):
    kind: str = setting("synthetic", "synthetic: a test pattern (or a photograph) with a frame counter.", RESTART)
    width: int = setting(1280, "Picture width in pixels (even).", RESTART, min=16, max=7680, even=True)
    height: int = setting(720, "Picture height in pixels (even).", RESTART, min=16, max=4320, even=True)
    fps: float = setting(30.0, "Frames per second drawn.", RESTART, min=0.1, max=240)
    encode: str = setting("h264", "h264 (encoded in-process; decode makes NAME-raw) or raw pictures.", RESTART,
                          choices=("h264", "raw"))
    bitrate: int = setting(0, "h264: target bit rate in kbit/s; 0 is constant quality.", RESTART, min=0, max=200000)
    gop: float = setting(2.0, "h264: seconds between keyframes.", RESTART, min=0.04, max=60)
    audio: bool = setting(False, "Publish a 1 kHz beep each second on NAME-audio (s16 PCM), in step with a "
                          "white flash.", RESTART)
    image: str = setting("", "A picture file (JPEG, PNG) drawn as the scene instead of the gradient, so a "
                         "detector has something to find; '' is the gradient.", RESTART)

    def encoded(self) -> bool:
        return self.encode == "h264"

    def has_audio(self) -> bool:
        return self.audio

    def makes_keyframes(self) -> bool:
        return self.encode == "h264"  # its own encoder forces an IDR

    def target(self) -> str:
        return f"{self.width}x{self.height} {self.encode}"

    def frame_interval(self) -> float:
        return 1.0 / self.fps


def load_scene(path: str, width: int, height: int) -> np.ndarray:
    """A picture file scaled (and centre-cropped) to fill width x height, as RGB."""
    import cv2
    picture = cv2.imread(path, cv2.IMREAD_COLOR)
    if picture is None:
        raise SourceError("open", f"synthetic image {path!r}: not a picture OpenCV can read (missing, or not "
                                  f"JPEG/PNG/BMP)")
    h, w = picture.shape[:2]
    scale = max(width / w, height / h)
    sw, sh = max(width, round(w * scale)), max(height, round(h * scale))
    scaled = cv2.resize(picture, (sw, sh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    x0, y0 = (sw - width) // 2, (sh - height) // 2
    return cv2.cvtColor(scaled[y0:y0 + height, x0:x0 + width], cv2.COLOR_BGR2RGB)


class Pattern:
    def __init__(self, width: int, height: int, image: str = "") -> None:
        self.width, self.height = width, height
        if image:  # a scene from a photograph: what a detector has something to find in
            self.background = load_scene(image, width, height)
        else:
            y, x = np.mgrid[0:height, 0:width]
            self.background = np.empty((height, width, 3), np.uint8)
            self.background[..., 0] = (x * 255 // max(1, width - 1)).astype(np.uint8)
            self.background[..., 1] = (y * 255 // max(1, height - 1)).astype(np.uint8)
            self.background[..., 2] = 96
        # the same picture as BT.601 limited-range planes, for the encoder
        r, g, b = (self.background[..., i].astype(np.float32) for i in range(3))
        self.luma = np.clip(16 + 0.257 * r + 0.504 * g + 0.098 * b, 0, 255).astype(np.uint8)
        cr, cb = r[::2, ::2], b[::2, ::2]
        cg = g[::2, ::2]
        self.cb = np.clip(128 - 0.148 * cr - 0.291 * cg + 0.439 * cb, 0, 255).astype(np.uint8)
        self.cr = np.clip(128 + 0.439 * cr - 0.368 * cg - 0.071 * cb, 0, 255).astype(np.uint8)
        self.block = max(1, min(16, width // 32))

    def _marks(self, frame: np.ndarray, n: int, white: int) -> None:
        bar = (n * 8) % self.width
        frame[:, bar: bar + 16] = white
        bits = np.unpackbits(np.array([n & 0xFFFFFFFF], ">u4").view(np.uint8))
        b = self.block
        row = np.repeat(bits * white, b)
        frame[:b, : 32 * b] = row[None, :, None] if frame.ndim == 3 else row[None, :]

    def draw(self, frame: np.ndarray, n: int, flash: bool = False) -> None:
        """An (h, w, 3) RGB picture."""
        if flash:
            frame.fill(255)
        else:
            np.copyto(frame, self.background)
        self._marks(frame, n, 255)

    def draw_yuv(self, y: np.ndarray, u: np.ndarray, v: np.ndarray, n: int, flash: bool = False) -> None:
        """Planes of a yuv420p picture (row pitches may exceed the width)."""
        w, h = self.width, self.height
        if flash:
            y[:h, :w] = 235
            u[: h // 2, : w // 2] = 128
            v[: h // 2, : w // 2] = 128
        else:
            np.copyto(y[:h, :w], self.luma)
            np.copyto(u[: h // 2, : w // 2], self.cb)
            np.copyto(v[: h // 2, : w // 2], self.cr)
        # the number's blocks: 0 and 235 in luma, far from 127 whatever the encoder's loss
        self._marks(y[:h, :w], n, 235)


def frame_number(frame: np.ndarray) -> int:
    """The number drawn into a picture: RGB (h, w, 3), or a luma / gray plane (h, w)."""
    b = max(1, min(16, frame.shape[1] // 32))
    samples = frame[b // 2, b // 2: 32 * b: b]
    bits = (samples[:, 0] if frame.ndim == 3 else samples) > 127
    return int(np.packbits(bits).view(">u4")[0])


class H264Encoder:
    """libx264 in this process: zerolatency (no B-frames, no lookahead: a frame in, its AU out),
    SPS/PPS repeated before every keyframe so a consumer can start at any keyframe."""

    def __init__(self, width: int, height: int, fps: float, gop: float, bitrate_kbps: int) -> None:
        import av
        self.ctx = av.CodecContext.create("libx264", "w")
        self.ctx.width, self.ctx.height, self.ctx.pix_fmt = width, height, "yuv420p"
        rate = Fraction(fps).limit_denominator(1001)
        self.ctx.framerate = rate
        self.ctx.time_base = 1 / rate
        self.ctx.gop_size = max(1, round(gop * fps))
        # forced-idr: a picture asked to be a keyframe (a keyframe request) is an IDR, not a plain I
        opts = {"preset": "veryfast", "tune": "zerolatency",
                "x264-params": "repeat-headers=1:scenecut=0:forced-idr=1"}
        if bitrate_kbps:
            self.ctx.bit_rate = bitrate_kbps * 1000
        else:
            opts["crf"] = "23"
        self.ctx.options = opts
        self.ctx.open()
        self.frame_type = av.VideoFrame
        self.intra = av.video.frame.PictureType.I
        self.width, self.height = width, height

    def frame(self):
        """A new input picture (FFmpeg's pool) and numpy views of its three planes."""
        f = self.frame_type(self.width, self.height, "yuv420p")
        planes = []
        for p in f.planes:
            planes.append(np.frombuffer(p, np.uint8).reshape(-1, p.line_size))
        return f, planes

    def encode(self, frame, n: int, keyframe: bool = False) -> list:
        frame.pts = n
        if keyframe:
            frame.pict_type = self.intra
        return self.ctx.encode(frame)


@source_kind(SyntheticConfig, "a moving test pattern with a frame counter, raw or H.264, and a test tone")
class SyntheticSource:
    def __init__(self, cfg: SyntheticConfig) -> None:
        if cfg.encode == "h264":
            import av  # noqa: F401  (at setup, not on the reader thread: a missing extra is a clear exit 78)
        self.cfg = cfg
        self.pattern: Pattern | None = None  # built on the reader thread: a bad image is a source error
        self._want_keyframe = False          # set by force_keyframe (any thread), taken by the next frame
        self.encoder: H264Encoder | None = None
        self.late = 0
        # one second of the audio, built once: 50 chunks of 20 ms, the first five beeping
        idx = np.arange(AUDIO_RATE)
        tone = np.sin(2 * np.pi * TONE_HZ * idx / AUDIO_RATE) * 16000 * (idx < BEEP_SAMPLES)
        self.tone = tone.astype(np.int16).reshape(-1, 1)

    def run(self, sink: Sink, stop: threading.Event, emit: Emit) -> bool:
        cfg = self.cfg
        if self.pattern is None:
            self.pattern = Pattern(cfg.width, cfg.height, cfg.image)
        if cfg.encode == "h264":
            self.encoder = H264Encoder(cfg.width, cfg.height, cfg.fps, cfg.gop, cfg.bitrate)
        period = NS / cfg.fps
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        n = 0
        samples = 0
        while not stop.is_set():
            due = t0 + round(n * period)
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if now < due:
                stop.wait((due - now) / NS)
                continue
            if now - due > period:  # held up: skip to the present, count what was skipped
                skipped = int((now - due) // period)
                sink.m.dropped.labels("late").inc(skipped)
                self.late += skipped
                n += skipped
                continue
            # a white frame at each whole second of the capture clock: the first frame at or after it
            flash = n == 0 or math.floor(n * period / NS) != math.floor((n - 1) * period / NS)
            self._frame(sink, n, due, flash)
            if cfg.audio:
                samples = self._audio(sink, t0, samples, due + round(period))
            n += 1
        return False

    def force_keyframe(self) -> str | None:
        if self.cfg.encode != "h264":
            return None
        self._want_keyframe = True  # one attribute write: the reader thread takes it with its next frame
        return "idr"

    def describe(self) -> str:
        cfg = self.cfg
        return f"{cfg.width}x{cfg.height} test pattern" + (" with a 1 kHz beep" if cfg.audio else "")

    def _frame(self, sink: Sink, n: int, capture_ns: int, flash: bool) -> None:
        pts = capture_ns  # the capture clock in ns: a synthetic source has no other clock
        if self.encoder is None:
            loan = sink.loan_picture(self.cfg.width, self.cfg.height, "rgb24")
            self.pattern.draw(loan.array, n, flash)
            sink.send_picture(loan, pts=pts, time_base=NS_BASE, capture_ns=capture_ns)
            return
        frame, (y, u, v) = self.encoder.frame()
        self.pattern.draw_yuv(y, u, v, n, flash)
        forced, self._want_keyframe = self._want_keyframe, False
        for packet in self.encoder.encode(frame, n, forced):
            sink.encoded(packet, "h264", keyframe=packet.is_keyframe, pts=pts, time_base=NS_BASE,
                         capture_ns=capture_ns, width=self.cfg.width, height=self.cfg.height)

    def _audio(self, sink: Sink, t0: int, samples: int, until_ns: int) -> int:
        """Publish 20 ms chunks until the audio clock reaches `until_ns`; the next sample index."""
        while t0 + samples * NS // AUDIO_RATE < until_ns:
            at = samples % AUDIO_RATE
            sink.audio(self.tone[at: at + AUDIO_CHUNK], AUDIO_RATE, pts=samples,
                       capture_ns=t0 + samples * NS // AUDIO_RATE)
            samples += AUDIO_CHUNK
        return samples
