"""Encoded video -> decoded pictures, with a keyframe gate, NAL-by-NAL input and one-copy output.

    dec = Decoder("h264", hw="auto", threads=4)       # .backend: "h264" or "h264_cuvid"
    for out in dec.decode(access_unit, pts=pts, meta=capture_ns):
        publish_frame(producer, out.frame, "yuv420p", pts=out.pts, capture_ns=out.meta)

Input, H.264/H.265 (Annex B, or length-prefixed when the extradata is avcC/hvcC):
  * whole access units, one per call (what a demuxer or the capture service delivers);
  * one NAL unit per call (what RTP depayloading delivers), with or without a start code.
    SPS/PPS/SEI/AUD arriving alone are held and prepended to the picture they precede,
    never handed to the codec on their own, so they never reset or flush it. Access-unit
    boundaries are found from NAL headers only (H.264 7.4.1.2.3, H.265 7.4.2.4.4): a new
    AU starts with an AUD, a parameter set / SEI / prefix NAL after a VCL NAL, or a VCL
    NAL whose first_mb_in_slice (H.264) is 0 / first_slice_segment_in_pic_flag (H.265) is
    1. In that mode an AU is handed on when the next one begins, or at once when the
    caller passes end_of_au=True (the RTP marker bit), or on flush().
  framing="auto" (default) treats every call holding a picture as a whole AU until the
  input shows it is NAL-by-NAL (a lone parameter set / SEI / AUD, or a call that starts
  with a non-first slice), then switches for good (logged). framing="au" / "nal" force one.
  Start codes are found with bytes.find (C speed); of each NAL only the header bytes
  are read, never the payload.

VP8/VP9/AV1: one frame (VP9: superframe; AV1: temporal unit) per call.

Keyframe gate: at start, after a reopen, and after any decode error or corrupt picture,
nothing is output until a keyframe (H.264 IDR or recovery-point SEI, H.265 IRAP, VP8/VP9
key frame; AV1: the decoder's key_frame flag, or keyframe=True from the caller) has been
decoded. Pictures before it are not even sent to the codec when the AU is known not to be
a keyframe; either way they are counted in dropped["waiting_keyframe"]. Errors are
counted (errors, dropped["corrupt"]) and never raise out of decode(). Every AU carries a
serial through FFmpeg (the packet's opaque), so with frame threading pictures decoded
before an error are still output, and those after it are not: no concealed ("grey
smear") picture is ever returned.

Output: copy_into() copies a decoded picture from FFmpeg's own buffers into destination
views (a framebus Loan's planes) with one copy per plane and no intermediate ndarray;
yuv420p (also from yuvj420p), nv12 and gray from either are copied directly. Any other
pairing goes through frame.reformat(), which costs a full conversion pass first.
"""
from __future__ import annotations

import collections
import functools
import logging
import time
from fractions import Fraction
from typing import Any, NamedTuple

import av
import numpy as np

__all__ = ["Decoded", "Decoder", "DecoderUnavailable", "copy_into", "probe_hw", "publish_frame"]

log = logging.getLogger("edgeroom.decode")

CODECS = ("h264", "h265", "vp8", "vp9", "av1")
_ALIASES = {"avc": "h264", "hevc": "h265"}
# Software decoders in order of preference (FFmpeg's native av1 decoder is hwaccel-only).
_SOFTWARE = {
    "h264": ("h264",),
    "h265": ("hevc",),
    "vp8": ("vp8", "libvpx"),
    "vp9": ("vp9", "libvpx-vp9"),
    "av1": ("libdav1d", "libaom-av1", "av1"),
}
# Hardware decoders tried by probe_hw: NVDEC through cuvid, and Jetson's V4L2 decoders.
_HARDWARE = {
    "h264": ("h264_cuvid", "h264_nvv4l2dec"),
    "h265": ("hevc_cuvid", "hevc_nvv4l2dec"),
    "vp8": ("vp8_cuvid", "vp8_nvv4l2dec"),
    "vp9": ("vp9_cuvid", "vp9_nvv4l2dec"),
    "av1": ("av1_cuvid", "av1_nvv4l2dec"),
}
_SAMPLE_ENCODERS = {"h264": "libx264", "h265": "libx265", "vp8": "libvpx", "vp9": "libvpx-vp9", "av1": "libsvtav1"}

_SC = b"\x00\x00\x00\x01"
_SC3 = b"\x00\x00\x01"

# H.264 NAL unit types
_H264_VCL = frozenset((1, 2, 3, 4, 5))
_H264_AU_START = frozenset((6, 7, 8, 9, 14, 15, 16, 17, 18))  # start a new AU after a VCL NAL
_H264_PARAMS = frozenset((7, 8))
_H264_LONE = frozenset((6, 7, 8, 9))  # alone in a call: the input is NAL-by-NAL
# H.265 NAL unit types
_H265_AU_START = frozenset((32, 33, 34, 35, 39, 41, 42, 43, 44, 48, 49, 50, 51, 52, 53, 54, 55))
_H265_PARAMS = frozenset((32, 33, 34))
_H265_LONE = frozenset((32, 33, 34, 35, 39))


class DecoderUnavailable(RuntimeError):
    """The decoder asked for by name cannot be opened on this machine."""


class Decoded(NamedTuple):
    """One output picture: the FFmpeg frame, its pts (from the AU's), the caller's meta."""

    frame: av.VideoFrame
    pts: int | None
    meta: Any


def canonical_codec(codec: str) -> str:
    c = _ALIASES.get(codec.lower(), codec.lower())
    if c not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    return c


# ---------------------------------------------------------------- bitstream helpers
def nal_spans(buf: bytes) -> list[tuple[int, int]]:
    """(start, end) of each NAL unit in an Annex B buffer, start codes excluded.

    A buffer without any start code is one NAL unit (RTP style). Only start codes are
    searched for (bytes.find); trailing zero bytes before the next start code belong to it.
    """
    i = buf.find(_SC3)
    if i < 0:
        return [(0, len(buf))] if buf else []
    spans = []
    lead = buf[:i].rstrip(b"\x00")
    if lead:  # a NAL before the first start code
        spans.append((0, len(lead)))
    n = len(buf)
    while i >= 0:
        start = i + 3
        j = buf.find(_SC3, start)
        end = n if j < 0 else j
        while end > start and buf[end - 1] == 0:  # only the few zero bytes of a 4-byte start code
            end -= 1
        if end > start:
            spans.append((start, end))
        i = j
    return spans


def length_spans(buf: bytes, size: int) -> list[tuple[int, int]] | None:
    """(start, end) of each NAL unit in a length-prefixed (avcC/hvcC style) buffer, or None."""
    spans, p, n = [], 0, len(buf)
    while p < n:
        if p + size > n:
            return None
        length = int.from_bytes(buf[p : p + size], "big")
        start, p = p + size, p + size + length
        if length == 0 or p > n:
            return None
        spans.append((start, p))
    return spans


def _param_arrays_to_annexb(codec: str, data: bytes) -> tuple[bytes, int]:
    """avcC / hvcC extradata -> (Annex B parameter sets, NAL length size); else (data, 0)."""
    if len(data) < 7 or data[0] != 1 or data[:3] == _SC3:
        return data, 0
    nals = []
    try:
        if codec == "h264":
            size = (data[4] & 3) + 1
            p = 5
            for mask in (0x1F, 0xFF):  # SPS count (5 bits), then PPS count
                count = data[p] & mask
                p += 1
                for _ in range(count):
                    length = int.from_bytes(data[p : p + 2], "big")
                    nals.append(data[p + 2 : p + 2 + length])
                    p += 2 + length
        elif codec == "h265" and len(data) >= 23:
            size = (data[21] & 3) + 1
            arrays, p = data[22], 23
            for _ in range(arrays):
                count = int.from_bytes(data[p + 1 : p + 3], "big")
                p += 3
                for _ in range(count):
                    length = int.from_bytes(data[p : p + 2], "big")
                    nals.append(data[p + 2 : p + 2 + length])
                    p += 2 + length
        else:
            return data, 0
    except IndexError:
        return data, 0
    if not all(nals):
        return data, 0
    return _SC + _SC.join(nals), size


def _vp8_key(b: bytes) -> bool:
    return bool(b) and not b[0] & 1


def _vp9_key(b: bytes) -> bool:
    if len(b) < 2:
        return False
    bits = int.from_bytes(b[:2], "big")
    if bits >> 14 != 2:  # frame_marker
        return False
    profile = ((bits >> 13) & 1) | (((bits >> 12) & 1) << 1)
    pos = 11 if profile < 3 else 10  # profile 3 has a reserved zero bit
    if (bits >> pos) & 1:  # show_existing_frame: no new picture
        return False
    return not (bits >> (pos - 1)) & 1  # frame_type 0 = KEY_FRAME


# ---------------------------------------------------------------- hardware probe
@functools.cache
def _sample(codec: str) -> tuple[tuple[bytes, ...], int, int]:
    """A tiny keyframe of `codec`, encoded once per process with PyAV's own encoders."""
    w, h = 128, 96
    enc = av.CodecContext.create(_SAMPLE_ENCODERS[codec], "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
    enc.time_base = Fraction(1, 25)
    enc.framerate = Fraction(25, 1)
    enc.gop_size = 1
    if codec == "h264":
        enc.options = {"preset": "ultrafast", "tune": "zerolatency"}
    elif codec == "h265":
        enc.options = {"preset": "ultrafast", "x265-params": "log-level=error"}
    y, x = np.mgrid[0:h, 0:w]
    img = np.empty((h * 3 // 2, w), np.uint8)
    img[:h] = ((x + y) * 2).astype(np.uint8)
    img[h:] = 128
    frame = av.VideoFrame.from_ndarray(img, format="yuv420p")
    frame.pts = 0
    packets = [bytes(p) for p in enc.encode(frame)] + [bytes(p) for p in enc.encode(None)]
    return tuple(p for p in packets if p), w, h


_probed: dict[str, str | None] = {}


def _try_decoder(name: str, codec: str) -> str | None:
    """None if `name` decodes the sample to a picture of the right size, else why not."""
    try:
        ctx = av.CodecContext.create(name, "r")
        ctx.open()
    except Exception as e:  # no driver, no device, not built in
        return f"cannot open: {e}"
    try:
        packets, w, h = _sample(codec)
    except Exception as e:
        return f"no sample to probe with ({_SAMPLE_ENCODERS[codec]}: {e})"
    try:
        frames = []
        for p in packets:
            frames += ctx.decode(av.Packet(p))
        frames += ctx.decode(None)
    except Exception as e:
        return f"decode failed: {e}"
    if not frames:
        return "opened, but no picture came out"
    if (frames[0].width, frames[0].height) != (w, h):
        return f"picture of {frames[0].width}x{frames[0].height}, expected {w}x{h}"
    return None


def probe_hw(codec: str, *, refresh: bool = False) -> str | None:
    """The first hardware decoder for `codec` that really decodes a picture here, or None.

    Candidates: NVDEC (`*_cuvid`) and Jetson (`*_nvv4l2dec`), where this FFmpeg has them.
    Each is opened and fed a tiny embedded keyframe; the reason for every failure is
    logged. The answer is cached per process (refresh=True probes again).
    """
    codec = canonical_codec(codec)
    if not refresh and codec in _probed:
        return _probed[codec]
    available = av.codecs_available
    found = None
    t0 = time.monotonic()
    for name in _HARDWARE[codec]:
        if name not in available:
            log.debug("hardware decoder %s: not in this FFmpeg build", name)
            continue
        why = _try_decoder(name, codec)
        if why is None:
            found = name
            break
        log.info("hardware decoder %s unusable: %s", name, why)
    log.info("hardware decode probe for %s: %s (%.0f ms)", codec, found or "none, using software",
             (time.monotonic() - t0) * 1e3)
    _probed[codec] = found
    return found


# ---------------------------------------------------------------- the decoder
class Decoder:
    """One stream's decoder. Not thread-safe: one owner calls decode() in order.

    codec: h264, h265, vp8, vp9, av1. hw: "auto" (probe, else software), "off", or a
    decoder name ("h264_cuvid"; DecoderUnavailable if it cannot be opened).
    threads: decoder threads (0: FFmpeg picks one per core); thread_type: "FRAME"
    (throughput, adds threads-1 pictures of latency), "SLICE" or "AUTO".
    framing: "auto", "au" or "nal" (module docstring).

    Counters (plain attributes, for metrics): frames_in (access units), frames_out,
    nals_in (H.264/H.265 NAL units), dropped (reason -> count: "waiting_keyframe",
    "corrupt", "reopen"), errors (decode errors and corrupt pictures), keyframes_in, reopens.
    """

    def __init__(self, codec: str, *, hw: str = "auto", threads: int = 0, thread_type: str = "FRAME",
                 extradata: bytes | None = None, extradata_version: Any = None,
                 framing: str = "auto") -> None:
        self.codec = canonical_codec(codec)
        if framing not in ("auto", "au", "nal"):
            raise ValueError(f"framing must be auto, au or nal, got {framing!r}")
        self.threads = threads
        self.thread_type = thread_type
        self.framing = framing
        self._nal_mode = framing == "nal"
        self._h26x = self.codec in ("h264", "h265")
        self.frames_in = self.frames_out = self.nals_in = self.errors = 0
        self.keyframes_in = self.reopens = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.last_error: str | None = None
        # gate state: AU serials, the serial ranges whose pictures may be output
        self._serial = 0
        self._need_key = True
        self._good: list[list] = []  # [start, end or None]
        self._last_fail = -1
        self._dirty = False  # an error since the codec was last clean: restart it at the next keyframe
        # AU assembly (NAL-by-NAL input)
        self._pend: list[bytes] = []
        self._pend_vcl = self._pend_key = False
        self._pend_pts: int | None = None
        self._pend_meta: Any = None
        # parameter sets seen, re-sent after a reopen if the next keyframe lacks them
        self._params: dict[int, bytes] = {}
        self._need_params = False
        self._length_size = 0
        self._extradata = self._extradata_given = b""
        self._extradata_version: Any = None
        if extradata:
            self._take_extradata(bytes(extradata), extradata_version)
        self.backend = self._choose_backend(hw)
        self.hardware = self.backend not in _SOFTWARE[self.codec]
        self._ctx = self._open(self.backend)

    # ------------------------------------------------------------ backend
    def _choose_backend(self, hw: str) -> str:
        if hw == "off":
            return self._software_name()
        if hw == "auto":
            name = probe_hw(self.codec)
            if name is not None:
                log.info("%s: decoding in hardware with %s", self.codec, name)
                return name
            name = self._software_name()
            log.info("%s: decoding in software with %s", self.codec, name)
            return name
        why = _try_decoder(hw, self.codec) if hw in av.codecs_available else "not in this FFmpeg build"
        if why is not None:
            raise DecoderUnavailable(f"decoder {hw!r} for {self.codec}: {why}")
        return hw

    def _software_name(self) -> str:
        available = av.codecs_available
        for name in _SOFTWARE[self.codec]:
            if name in available:
                return name
        raise DecoderUnavailable(f"no software decoder for {self.codec} in this FFmpeg build")

    def _open(self, name: str):
        ctx = av.CodecContext.create(name, "r")
        if name in _SOFTWARE[self.codec]:
            ctx.thread_type = self.thread_type
            ctx.thread_count = self.threads
        ctx.copy_opaque = True  # each AU's serial and meta ride through to its picture
        if self._extradata:
            ctx.extradata = self._extradata
        ctx.open()
        return ctx

    def _reopen(self) -> list[Decoded]:
        """Drain the old context (its pictures are returned), then open a fresh one."""
        out = self._drain()
        self._ctx = self._open(self.backend)
        self.reopens += 1
        self._close_gate()
        self._need_params = True
        log.info("%s: decoder reopened (extradata version %r)", self.codec, self._extradata_version)
        return out

    # ------------------------------------------------------------ extradata
    @property
    def extradata(self) -> bytes:
        return self._extradata

    @property
    def extradata_version(self) -> Any:
        return self._extradata_version

    def set_extradata(self, data: bytes | None, version: Any = None) -> list[Decoded]:
        """Codec extradata (Annex B parameter sets, avcC, hvcC, ...), e.g. a bus stream's.

        A new version (or, with version=None, different bytes) reopens the decoder: the
        pictures still inside the old one are returned, and the gate waits for a keyframe.
        The same version again is a no-op.
        """
        data = bytes(data or b"")
        if version is None:
            if data == self._extradata_given:  # as given: avcC/hvcC is kept converted to Annex B
                return []
        elif version == self._extradata_version:
            return []
        self._take_extradata(data, version)
        return self._reopen()

    def _take_extradata(self, data: bytes, version: Any) -> None:
        self._extradata_version = version
        self._extradata_given = data
        if self._h26x:
            data, self._length_size = _param_arrays_to_annexb(self.codec, data)
            for s, e in nal_spans(data) if data[:3] == _SC3 or data[:4] == _SC else ():
                self._remember(data[s:e])
        self._extradata = data

    def _nal_type(self, b: bytes, at: int = 0) -> int:
        return (b[at] & 0x1F) if self.codec == "h264" else (b[at] >> 1) & 0x3F

    def _remember(self, nal: bytes) -> None:
        if nal:
            t = self._nal_type(nal)
            if t in (_H264_PARAMS if self.codec == "h264" else _H265_PARAMS):
                self._params[t] = nal

    # ------------------------------------------------------------ input
    def decode(self, data, pts: int | None = None, keyframe: bool | None = None, *,
               end_of_au: bool | None = None, meta: Any = None) -> list[Decoded]:
        """Decode one access unit, or one NAL unit; return the pictures now ready, in order.

        data: bytes-like (bytes, memoryview, a bus item's array). pts: the AU's pts, given
        back on its picture. keyframe: the caller's knowledge (a bus item's flag); None:
        found from the bitstream. end_of_au: NAL-by-NAL input, this NAL ends the AU (the
        RTP marker bit). meta: anything, given back with the AU's picture (capture time).
        Never raises for bad data: errors are counted and the keyframe gate closes.
        """
        if not isinstance(data, bytes):
            data = memoryview(data).cast("B").tobytes()
        if not data:
            return []
        if not self._h26x:
            key = keyframe
            if key is None:
                key = _vp8_key(data) if self.codec == "vp8" else _vp9_key(data) if self.codec == "vp9" else None
            return self._feed(data, pts, key, meta)
        return self._decode_nals(data, pts, keyframe, end_of_au, meta)

    def _decode_nals(self, buf: bytes, pts, keyframe, end_of_au, meta) -> list[Decoded]:
        annexb = buf[:3] == _SC3 or buf[:4] == _SC
        spans = None
        if self._length_size and not annexb:
            spans = length_spans(buf, self._length_size)
        if spans is None:
            spans = nal_spans(buf)
        else:
            annexb = False
        self.nals_in += len(spans)
        h264 = self.codec == "h264"
        vcl_max = 5 if h264 else 31
        # one pass over the NAL headers
        types = [(buf[s] & 0x1F) if h264 else (buf[s] >> 1) & 0x3F for s, _ in spans]
        if not self._nal_mode and self.framing == "auto":
            t0 = types[0] if types else -1
            lone = len(spans) == 1 and t0 in (_H264_LONE if h264 else _H265_LONE)
            split = 0 < t0 <= vcl_max if h264 else 0 <= t0 <= vcl_max
            split = split and not self._first_slice(buf, spans[0])
            if lone or split:
                self._nal_mode = True
                log.info("%s: input is NAL-by-NAL (%s); assembling access units from NAL headers",
                         self.codec, "a lone parameter set/SEI/AUD" if lone else "a call starting mid-picture")
        if not self._nal_mode:
            return self._decode_au(buf, spans, types, annexb, pts, keyframe, meta)
        out: list[Decoded] = []
        starts = _H264_AU_START if h264 else _H265_AU_START
        params = _H264_PARAMS if h264 else _H265_PARAMS
        for (s, e), t in zip(spans, types):
            vcl = (0 < t <= vcl_max) if h264 else t <= vcl_max
            if self._pend_vcl and ((vcl and self._first_slice(buf, (s, e))) or (not vcl and t in starts)):
                out += self._emit_pending()
            nal = buf[s:e]
            if t in params:
                self._params[t] = nal
            self._pend.append(nal)
            if vcl:
                if not self._pend_vcl:
                    self._pend_vcl = True
                    self._pend_pts, self._pend_meta = pts, meta
                if (t == 5) if h264 else (16 <= t <= 23):
                    self._pend_key = True
            elif h264 and t == 6 and e - s > 1 and buf[s + 1] == 6:  # recovery point SEI
                self._pend_key = True
        if keyframe:
            self._pend_key = True
        if end_of_au and self._pend_vcl:
            out += self._emit_pending()
        return out

    def _first_slice(self, buf: bytes, span: tuple[int, int]) -> bool:
        """Is this VCL NAL the first slice of its picture?

        H.264: first_mb_in_slice, the slice header's first ue(v), is 0 exactly when its
        first bit is 1 (ue(v) = 2^lz - 1 + bits, lz leading zeros). H.265:
        first_slice_segment_in_pic_flag, the first bit after the 2-byte header.
        """
        s, e = span
        at = s + (1 if self.codec == "h264" else 2)
        return at < e and bool(buf[at] & 0x80)

    def _decode_au(self, buf, spans, types, annexb, pts, keyframe, meta) -> list[Decoded]:
        h264 = self.codec == "h264"
        vcl_max = 5 if h264 else 31
        has_vcl = key = False
        for (s, e), t in zip(spans, types):
            if (0 < t <= vcl_max) if h264 else t <= vcl_max:
                has_vcl = True
                if (t == 5) if h264 else (16 <= t <= 23):
                    key = True
            elif t in (_H264_PARAMS if h264 else _H265_PARAMS):
                self._params[t] = buf[s:e]
            elif h264 and t == 6 and e - s > 1 and buf[s + 1] == 6:
                key = True
        if not has_vcl:  # parameter sets / SEI alone: keep them for the next picture
            self._pend += [buf[s:e] for s, e in spans]
            return []
        if keyframe is not None:
            key = keyframe
        if self._pend or not annexb:
            au = _SC + _SC.join(self._pend + [buf[s:e] for s, e in spans])
            self._pend.clear()
        else:
            au = buf  # fast path: the caller's AU as it is
        return self._feed(au, pts, key, meta)

    def _emit_pending(self) -> list[Decoded]:
        au = _SC + _SC.join(self._pend)
        key, pts, meta = self._pend_key, self._pend_pts, self._pend_meta
        self._pend = []
        self._pend_vcl = self._pend_key = False
        self._pend_pts = self._pend_meta = None
        return self._feed(au, pts, key, meta)

    def _with_params(self, au: bytes) -> bytes:
        """After a reopen, put the known parameter sets before a keyframe that lacks them."""
        self._need_params = False
        if not self._params:
            return au
        h264 = self.codec == "h264"
        types = {(au[s] & 0x1F) if h264 else (au[s] >> 1) & 0x3F for s, _ in nal_spans(au)}
        if types & (_H264_PARAMS if h264 else _H265_PARAMS):
            return au
        return _SC + _SC.join(self._params[t] for t in sorted(self._params)) + au

    # ------------------------------------------------------------ codec and gate
    def _feed(self, au: bytes, pts, key: bool | None, meta) -> list[Decoded]:
        self.frames_in += 1
        if key:
            self.keyframes_in += 1
        if self._need_key and key is False:
            self.dropped["waiting_keyframe"] += 1
            return []
        out: list[Decoded] = []
        if key and self._dirty:
            out = self._restart_codec()
        serial = self._serial
        self._serial += 1
        if key:
            if self._need_params and self._h26x:
                au = self._with_params(au)
            self._open_gate(serial)
        pkt = av.Packet(au)
        if pts is not None:
            pkt.pts = pts
        pkt.opaque = (serial, meta)
        try:
            frames = self._ctx.decode(pkt)
        except Exception as e:  # bad data: count it, close the gate, never raise
            self._failed(serial, f"{type(e).__name__}: {e}")
            return out
        return out + self._gate(frames)

    def _restart_codec(self) -> list[Decoded]:
        """Before the first keyframe after an error: drain the pictures decoded before it
        (frame threads), then clear the codec's state, which garbage may have left odd
        (a half field pair, a bogus reference list) so that even a real IDR would fail."""
        self._dirty = False
        try:
            out = self._gate(self._ctx.decode(None))
        except Exception:
            out = []
        self._ctx.flush_buffers()
        return out

    def _gate(self, frames) -> list[Decoded]:
        out = []
        for f in frames:
            op = f.opaque
            serial, meta = op if isinstance(op, tuple) and len(op) == 2 else (self._serial - 1, None)
            if f.is_corrupt:
                self._failed(serial, "corrupt picture (decoder concealed errors)")
                continue
            if not self._allowed(serial):
                if f.key_frame and serial > self._last_fail and (not self._good or serial > self._good[-1][0]):
                    self._open_gate(serial)  # a keyframe the bitstream did not announce (AV1)
                else:
                    self.dropped["waiting_keyframe"] += 1
                    continue
            self.frames_out += 1
            out.append(Decoded(f, f.pts, meta))
        return out

    def _allowed(self, serial: int) -> bool:
        for start, end in reversed(self._good):
            if start <= serial and (end is None or serial < end):
                return True
        return False

    def _open_gate(self, serial: int) -> None:
        if self._good and self._good[-1][1] is None:
            self._good[-1][1] = serial
        self._good.append([serial, None])
        del self._good[:-4]
        self._need_key = False

    def _close_gate(self) -> None:
        if self._good and self._good[-1][1] is None:
            self._good[-1][1] = self._serial
        self._need_key = True
        self._last_fail = self._serial - 1

    def _failed(self, serial: int, why: str) -> None:
        """AU `serial` failed: nothing from it or after it until the next keyframe."""
        waiting = not self._allowed(serial)
        for iv in self._good:
            if iv[0] <= serial and (iv[1] is None or serial < iv[1]):
                iv[1] = serial
        self._last_fail = max(self._last_fail, serial)
        if waiting:  # already behind a closed gate: expected, not an error of the stream
            self.dropped["waiting_keyframe"] += 1
            return
        self._dirty = True
        self.errors += 1
        self.dropped["corrupt"] += 1
        self.last_error = why
        if not self._good or serial >= self._good[-1][0]:
            if not self._need_key:
                log.warning("%s: decode error (%s); waiting for the next keyframe", self.codec, why)
            self._need_key = True

    # ------------------------------------------------------------ life cycle
    def _drain(self) -> list[Decoded]:
        out = []
        if self._h26x and self._pend_vcl:
            out += self._emit_pending()
        try:
            out += self._gate(self._ctx.decode(None))
        except Exception as e:
            self._failed(self._serial - 1, f"{type(e).__name__}: {e}")
        return out

    def flush(self) -> list[Decoded]:
        """End of stream (or a pause): hand on the pending AU, return every picture still
        inside the decoder, and make it ready for more input (which must start at a keyframe)."""
        out = self._drain()
        self._ctx.flush_buffers()
        self._close_gate()
        return out

    def reset(self) -> None:
        """Drop everything in flight (a discontinuity); the next output follows a keyframe."""
        self._pend, self._pend_vcl, self._pend_key = [], False, False
        self._ctx.flush_buffers()
        self._close_gate()

    def close(self) -> None:
        """Drain the codec before letting it go: FFmpeg's frame threads with pictures still in
        flight can hang avcodec_free_context."""
        if self._ctx is not None:
            try:
                self._ctx.decode(None)
            except Exception:  # closing: whatever is left is dropped with the context
                pass
        self._ctx = None

    def stats(self) -> dict:
        return {"backend": self.backend, "hardware": self.hardware, "frames_in": self.frames_in,
                "frames_out": self.frames_out, "nals_in": self.nals_in, "errors": self.errors,
                "dropped": dict(self.dropped), "keyframes_in": self.keyframes_in, "reopens": self.reopens,
                "waiting_keyframe": self._need_key, "nal_mode": self._nal_mode}

    def __repr__(self) -> str:
        return f"<Decoder {self.codec} backend={self.backend} in={self.frames_in} out={self.frames_out}>"


# ---------------------------------------------------------------- one-copy output
_LAYOUT_ALIASES = {"yuvj420p": "yuv420p"}  # full-range JPEG yuv: same planes, same bytes


def _src(plane, rows: int, row_bytes: int) -> np.ndarray:
    """A read-only view of an FFmpeg plane, rows x row_bytes, stepping by its line_size."""
    return np.ndarray((rows, row_bytes), np.uint8, buffer=plane, strides=(plane.line_size, 1))


def _check(dst: np.ndarray, shape: tuple, what: str) -> None:
    if dst.shape != shape:
        raise ValueError(f"{what}: destination is {dst.shape}, the picture needs {shape}")


def copy_into(frame: av.VideoFrame, dst, fmt: str | None = None) -> None:
    """Copy a decoded picture into destination views: one copy, from FFmpeg's buffers.

    dst: a framebus Loan (its .planes are used), or plane arrays (Y, U, V) / (Y, UV) /
    (picture,), or one packed array. fmt: the destination format (yuv420p, nv12, gray,
    rgb24, bgr24); default from the planes given (3: yuv420p, 2: nv12, one 2-D: gray).
    yuv420p (and yuvj420p), nv12 and gray from either are copied directly. Any other
    pairing (a decoder's nv12 into a yuv420p slot, anything into rgb24) goes through
    frame.reformat() first: a full conversion pass before the copy.
    """
    planes = getattr(dst, "planes", dst)
    if isinstance(planes, np.ndarray):
        planes = (planes,)
    planes = tuple(planes)
    if fmt is None:
        if len(planes) == 3:
            fmt = "yuv420p"
        elif len(planes) == 2:
            fmt = "nv12"
        elif len(planes) == 1 and planes[0].ndim == 2:
            fmt = "gray"
        else:
            raise ValueError("copy_into: say fmt= for a packed destination (rgb24 or bgr24)")
    w, h = frame.width, frame.height
    cw, ch = (w + 1) // 2, (h + 1) // 2
    src_fmt = frame.format.name
    src_fmt = _LAYOUT_ALIASES.get(src_fmt, src_fmt)
    if fmt == "gray" and src_fmt in ("yuv420p", "nv12", "gray"):
        pass  # the luma plane is the gray picture
    elif src_fmt != fmt:
        frame = frame.reformat(format=fmt)  # a conversion: costs a pass over the picture
    fp = frame.planes
    if fmt == "yuv420p":
        if len(planes) != 3:
            raise ValueError(f"yuv420p needs 3 destination planes, got {len(planes)}")
        _check(planes[0], (h, w), "Y")
        _check(planes[1], (ch, cw), "U")
        _check(planes[2], (ch, cw), "V")
        np.copyto(planes[0], _src(fp[0], h, w))
        np.copyto(planes[1], _src(fp[1], ch, cw))
        np.copyto(planes[2], _src(fp[2], ch, cw))
    elif fmt == "nv12":
        if len(planes) != 2:
            raise ValueError(f"nv12 needs 2 destination planes, got {len(planes)}")
        _check(planes[0], (h, w), "Y")
        _check(planes[1], (ch, cw, 2), "UV")
        np.copyto(planes[0], _src(fp[0], h, w))
        np.copyto(planes[1], _src(fp[1], ch, 2 * cw).reshape(ch, cw, 2))
    elif fmt == "gray":
        _check(planes[0], (h, w), "gray")
        np.copyto(planes[0], _src(fp[0], h, w))
    elif fmt in ("rgb24", "bgr24"):
        _check(planes[0], (h, w, 3), fmt)
        np.copyto(planes[0], _src(fp[0], h, 3 * w).reshape(h, w, 3))
    else:
        raise ValueError(f"copy_into: unsupported destination format {fmt!r}")


def publish_frame(producer, frame: av.VideoFrame, fmt: str = "yuv420p", **send) -> int:
    """Loan a slot of a framebus video Producer, copy_into() it, send it; the item's seq.

    send: Loan.send() keywords (pts=, time_base=, capture_ns=, flags=). Without pts=,
    the frame's pts and time base are used when it has both.
    """
    if "pts" not in send and frame.pts is not None and frame.time_base is not None:
        send["pts"], send["time_base"] = frame.pts, frame.time_base
    loan = producer.loan_picture(frame.width, frame.height, fmt)
    try:
        copy_into(frame, loan, fmt)
    except BaseException:
        loan.abort()
        raise
    return loan.send(**send)
