"""Which encoder turns raw pictures into H.264 (or VP8): a real probe encode decides, never a codec list.

Used by the recorder (H.264 for raw streams and rooms) and by encode@NAME (H.264 or VP8 for
calls): `choose(configured, width, height, codec=...)`.

FFmpeg builds list `h264_nvenc` (and `h264_v4l2m2m`) on boxes without the hardware: the
codec is compiled in, the first encode fails ("No NVENC capable devices found", no
/dev/video* M2M device). A recorder that trusts the list starts, then loses every
picture. So `auto` tries each hardware encoder in order with a probe: open it at the
recording's size and pixel format, encode a few pictures, flush, and require packets
back. The first that works wins; if none does, libx264 (software, always there).

A named encoder (`encoder = "h264_nvenc"`) is probed the same way; when it fails, the
recorder falls back to `auto` and says why (`Choice.note`), in the log, in `describe()`
and in the `edgeroom_recorder_encoder{name,hardware}` gauge, rather than not recording.

Probe results are cached per process and (name, width, height, pix_fmt): a probe costs
tens of milliseconds in software, up to ~0.5 s for a first CUDA context.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

__all__ = ["HARDWARE", "HARDWARE_FOR", "SOFTWARE", "SOFTWARE_FOR", "Choice", "choose", "codec_of", "encoder_options",
           "probe"]

log = logging.getLogger("edgeroom.recorder")

HARDWARE = ("h264_nvenc", "h264_nvmpi", "h264_v4l2m2m")   # NVIDIA dGPU, Jetson (jetson-ffmpeg), V4L2 M2M
SOFTWARE = "libx264"
# per codec: the hardware encoders `auto` tries in order, and the software one it falls back to
HARDWARE_FOR = {"h264": HARDWARE, "vp8": ("vp8_v4l2m2m",)}
SOFTWARE_FOR = {"h264": SOFTWARE, "vp8": "libvpx"}
PROBE_FRAMES = 3
_cache: dict[tuple[str, int, int, str], str | None] = {}


@dataclass(frozen=True)
class Choice:
    """The encoder a recording uses: `name`, `hardware`, and `note` saying why when it is not
    the one configured ('' when it is)."""
    name: str
    hardware: bool
    note: str = ""


def probe(name: str, width: int = 320, height: int = 240, pix_fmt: str = "yuv420p") -> str | None:
    """None when `name` really encodes here, else why not (one line)."""
    key = (name, width, height, pix_fmt)
    if key not in _cache:
        _cache[key] = _probe(name, width, height, pix_fmt)
    return _cache[key]


def _probe(name: str, width: int, height: int, pix_fmt: str) -> str | None:
    try:
        codec = av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - FFmpeg says it in many ways
        return f"{name} is not in this FFmpeg build"
    try:
        cc = av.CodecContext.create(codec)
        cc.width, cc.height, cc.time_base, cc.framerate = width, height, Fraction(1, 30), Fraction(30)
        formats = [f.name for f in (codec.video_formats or ())]
        cc.pix_fmt = pix_fmt if not formats or pix_fmt in formats else formats[0]
        cc.options = encoder_options(name)
        cc.open()
        got = 0
        for i in range(PROBE_FRAMES):
            frame = av.VideoFrame(width, height, "yuv420p")
            for p in frame.planes:
                np.frombuffer(p, np.uint8)[:] = 128
            frame = frame.reformat(format=cc.pix_fmt) if cc.pix_fmt != "yuv420p" else frame
            frame.pts = i
            got += len(cc.encode(frame))
        got += len(cc.encode(None))
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
        return f"{name} failed its probe encode: {exc}"
    if got == 0:
        return f"{name} produced no packets in its probe encode"
    return None


def encoder_options(name: str, *, crf: int = 23, preset: str = "veryfast", bitrate_kbps: int = 0) -> dict[str, str]:
    """Codec options for a recording: no B-frames (no reordering: every fragment ends where its
    last picture was shown), quality from crf unless a bit rate is set."""
    if name == SOFTWARE:
        opts = {"preset": preset, "bframes": "0"}
        if not bitrate_kbps:
            opts["crf"] = str(crf)
        return opts
    if name.endswith("_nvenc"):
        opts = {"preset": "p4", "bf": "0", "zerolatency": "1"}
        if not bitrate_kbps:
            opts.update(rc="vbr", cq=str(crf))
        return opts
    return {}


def _hardware(name: str) -> bool:
    """Whether an encoder runs on a hardware engine: everything but FFmpeg's software libraries."""
    return name not in SOFTWARE_FOR.values() and not name.startswith("lib")


def codec_of(name: str) -> str | None:
    """The codec an FFmpeg encoder makes ("h264_nvenc" -> "h264"), or None if this FFmpeg lacks it."""
    try:
        return str(av.codec.Codec(name, "w").canonical_name)
    except Exception:  # noqa: BLE001 - FFmpeg says it in many ways
        return None


def choose(configured: str, width: int, height: int, pix_fmt: str = "yuv420p", codec: str = "h264") -> Choice:
    """The encoder of `codec` to use for `configured` ("auto", "off" for software, or an encoder name)
    at this size."""
    software = SOFTWARE_FOR[codec]
    if configured == "off":
        return Choice(software, False, "")
    note = ""
    if configured != "auto":
        made = codec_of(configured)
        why = probe(configured, width, height, pix_fmt) if made in (codec, None) else \
            f"{configured} makes {made}, not {codec}"
        if why is None:
            return Choice(configured, _hardware(configured))
        note = f"{why}; fell back to auto"
        log.warning("encoder %s unusable (%s): choosing automatically", configured, why)
    tried = []
    for name in HARDWARE_FOR[codec]:
        why = probe(name, width, height, pix_fmt)
        if why is None:
            return Choice(name, True, note)
        tried.append(why)
    if not note:
        note = "no hardware encoder works here (" + "; ".join(tried) + ")"
    return Choice(software, False, note)
