"""Crash-safe fragmented MP4: one writer per file, remuxed or encoded tracks.

Why fragmented MP4: a classic MP4 keeps its index (`moov`) until the very end, so a
recorder killed mid-file leaves bytes no player opens. Here the header (`ftyp` +
an empty `moov`) is written first and the media follows in self-contained fragments
(`moof` + `mdat`), each cut at most `fragment_seconds` after it began (and at every
keyframe). Whatever fragments reached the disk play, whatever happens afterwards.

How a fragment reaches the disk. FFmpeg's mov muxer writes through a write-only Python
file object (no `seek`: the muxer never goes back); that object only *collects* the
chunks FFmpeg hands over during one call. After the call the writer puts them on disk
with one `writev` and an `fsync` (when `fsync=True`). The mov muxer emits bytes only
when it completes a fragment (its flush points), so one call = whole fragments:

* SIGKILL of the process cannot leave half a fragment (a regular-file `writev` is not
  interrupted by a signal), so the file always ends at a fragment boundary;
* a power cut loses at most the fragment being written (fsync at each boundary); the
  recorder repairs such a file at start (`repair()`: cut at the last whole box);
* ENOSPC is seen by *our* code, not inside FFmpeg's callback: the file is truncated back
  to the last whole fragment (it stays playable) and `DiskFull` (reason "disk_full") is
  raised. The writer is then unusable; the caller starts a new file when space returns.

What is lost on a crash: the fragment in memory, i.e. less than `fragment_seconds` of
media plus one frame (FFmpeg cuts when the first packet past the limit arrives).

Timestamps are the caller's (in the track's time base; the recorder derives them from
capture_ns, so variable frame rate survives). The writer makes them strictly increasing
(a repeated or backwards dts is moved one tick past the last and counted in `adjusted`;
a pts is moved only where it would fall before its dts), because the mov muxer refuses
non-monotonic dts.

Remux (`add_video_copy` + `write_packet`) never decodes or encodes: the Annex B access
units go to the muxer as they are (it rewrites start codes as length prefixes, the NAL
units are the same bytes) through a codec-less stream (PyAV's `add_mux_stream`).
Encoding (`add_video_encode` + `write_picture`, `add_audio` + `write_audio`) runs a
PyAV encoder per track; which encoder to use is services/recorder/encoder.py's job.
"""
from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np

__all__ = ["DiskFull", "Mp4Error", "Mp4Writer", "Track", "repair", "MOVFLAGS"]

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_AUDIO_GAP_MAX_S = 10.0     # a jump forward in audio pts longer than this starts over instead of writing silence


class Mp4Error(Exception):
    """A recording problem; `reason` is a short word for metrics and events, `path` the file."""

    def __init__(self, message: str, reason: str = "write", path: str = "") -> None:
        super().__init__(message)
        self.reason, self.path = reason, path


class DiskFull(Mp4Error):
    """The filesystem is full (ENOSPC/EDQUOT); the file was cut back to its last whole fragment."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message, "disk_full", path)


class _Collector:
    """The write-only file object FFmpeg writes into: chunks are kept until the writer commits them."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(data)
        return len(data)

    def writable(self) -> bool:
        return True


class Track:
    """One track of the file: its PyAV stream, time base and timestamp bookkeeping."""

    __slots__ = ("stream", "kind", "time_base", "encoder", "first_pts", "last_pts", "last_dts", "last_delta",
                 "frames", "adjusted", "resampler", "next_sample", "next_input", "extradata", "fmt")

    def __init__(self, stream, kind: str, time_base: Fraction, encoder: str | None = None) -> None:
        self.stream, self.kind, self.time_base, self.encoder = stream, kind, time_base, encoder
        self.first_pts: int | None = None
        self.last_pts: int | None = None
        self.last_dts: int | None = None
        self.last_delta = 0
        self.frames = 0
        self.adjusted = 0
        self.resampler = None
        self.next_sample: int | None = None   # pts of the next encoded frame (whole encoder frames)
        self.next_input: int | None = None    # where the next input sample goes (what callers place by)
        self.extradata: bytes | None = None
        self.fmt: str | None = None

    def stamp(self, pts: int, dts: int | None) -> tuple[int, int]:
        """Strictly increasing dts (and pts >= dts); returns the (pts, dts) to write."""
        pts = int(pts)
        dts = pts if dts is None else int(dts)
        if self.last_dts is not None and dts <= self.last_dts:
            dts = self.last_dts + 1  # pts stays (a reordered picture's pts is the source's), unless now before dts
            self.adjusted += 1
        if pts < dts:
            pts = dts
        if self.last_pts is not None:
            self.last_delta = max(0, pts - self.last_pts) or self.last_delta
        if self.first_pts is None:
            self.first_pts = pts
        self.last_pts = pts if self.last_pts is None else max(pts, self.last_pts)
        self.last_dts = dts
        self.frames += 1
        return pts, dts

    def seconds(self) -> float:
        if self.first_pts is None or self.last_pts is None:
            return 0.0
        return float((self.last_pts - self.first_pts + self.last_delta) * self.time_base)


class Mp4Writer:
    """A fragmented MP4 file being written. Not thread-safe: one owner calls it.

    `on_flush(seconds, nbytes)`, when given, is called after each fragment reached the disk
    (for a flush-latency metric)."""

    def __init__(self, path: str | os.PathLike, *, fragment_seconds: float = 1.0, fsync: bool = True,
                 on_flush: Callable[[float, int], None] | None = None) -> None:
        if not 0 < fragment_seconds <= 60:
            raise ValueError(f"fragment_seconds must be in (0, 60], got {fragment_seconds!r}")
        self._path = os.fspath(path)
        self.fragment_seconds, self.fsync, self.on_flush = fragment_seconds, fsync, on_flush
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._sink = _Collector()
        frag_us = str(int(fragment_seconds * 1_000_000))
        self._container = av.open(self._sink, "w", format="mp4", options={
            "movflags": MOVFLAGS, "frag_duration": frag_us,
            # a track that falls silent must not hold the others in the interleaver for 10 s (FFmpeg's default)
            "max_interleave_delta": frag_us})
        self.tracks: list[Track] = []
        self._bytes = 0
        self.fragments = 0
        self._broken: Mp4Error | None = None
        self._closed = False

    # ------------------------------------------------------------ properties
    @property
    def path(self) -> str:
        return self._path

    @property
    def bytes_written(self) -> int:
        """Bytes on disk (whole fragments only)."""
        return self._bytes

    @property
    def frames(self) -> int:
        """Video frames written (audio packets if the file has no video)."""
        video = [t for t in self.tracks if t.kind == "video"]
        return sum(t.frames for t in (video or self.tracks))

    @property
    def duration(self) -> float:
        """Seconds of media written so far (the longest track)."""
        return max((t.seconds() for t in self.tracks), default=0.0)

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------ tracks
    def add_video_copy(self, codec: str = "h264", width: int = 0, height: int = 0, extradata: bytes | None = None,
                       time_base: Fraction = Fraction(1, 90000)) -> Track:
        """A video track whose packets are already encoded (remux: no codec context at all)."""
        stream = self._container.add_mux_stream(codec, width=width, height=height)
        stream.time_base = time_base
        track = Track(stream, "video", time_base)
        track.extradata = bytes(extradata) if extradata else None
        self.tracks.append(track)
        return track

    def add_video_encode(self, encoder_name: str, width: int, height: int, pix_fmt: str = "yuv420p",
                         time_base: Fraction = Fraction(1, 90000), options: dict[str, str] | None = None,
                         *, bit_rate: int = 0, gop: int = 0) -> Track:
        """A video track encoded here from pictures (`write_picture`)."""
        stream = self._container.add_stream(encoder_name)
        cc = stream.codec_context
        cc.width, cc.height, cc.pix_fmt, cc.time_base = width, height, pix_fmt, time_base
        if bit_rate:
            cc.bit_rate = bit_rate
        if gop:
            cc.gop_size = gop
        cc.options = dict(options or {})
        stream.time_base = time_base
        track = Track(stream, "video", time_base, encoder_name)
        track.fmt = pix_fmt
        self.tracks.append(track)
        return track

    def add_audio(self, sample_rate: int, channels: int, codec: str = "aac", *, bit_rate: int = 0) -> Track:
        """An audio track encoded here from s16 PCM (`write_audio`); pts count samples."""
        layout = "mono" if channels == 1 else "stereo" if channels == 2 else f"{channels}c"
        stream = self._container.add_stream(codec, rate=sample_rate, layout=layout)
        if bit_rate:
            stream.codec_context.bit_rate = bit_rate
        tb = Fraction(1, sample_rate)
        stream.time_base = tb
        track = Track(stream, "audio", tb, codec)
        cc = stream.codec_context
        fmt = cc.format.name if cc.format is not None else "fltp"
        track.resampler = av.AudioResampler(format=fmt, layout=layout, rate=sample_rate,
                                            frame_size=cc.frame_size or 1024)
        self.tracks.append(track)
        return track

    # ------------------------------------------------------------ writing
    def write_packet(self, track: Track, data: bytes | memoryview | np.ndarray | av.Packet, pts: int,
                     dts: int | None = None, keyframe: bool = False, check: Callable[[], bool] | None = None) -> bool:
        """One encoded access unit (Annex B for H.264/H.265; an av.Packet is taken as it is, no
        copy), timestamps in the track's time base.

        `check`, when given, is called after the data was copied into the packet (a framebus
        item's `valid`): False means the source was overwritten meanwhile, and nothing is
        written (returns False)."""
        self._check()
        if track.frames == 0 and track.extradata and keyframe and not _has_parameter_sets(data):
            data = track.extradata + bytes(data)  # the muxer takes its avcC from the first packet
        packet = data if isinstance(data, av.Packet) else av.Packet(data)
        if check is not None and not check():
            return False
        packet.pts, packet.dts = track.stamp(pts, dts)
        packet.time_base = track.time_base
        packet.stream = track.stream
        packet.is_keyframe = bool(keyframe)
        self._mux([packet])
        return True

    def write_picture(self, track: Track, picture: np.ndarray | tuple[np.ndarray, ...] | av.VideoFrame, fmt: str,
                      pts: int, check: Callable[[], bool] | None = None) -> bool:
        """One picture (an ndarray, a tuple of planes such as framebus `item.planes()`, or a
        decoded av.VideoFrame), encoded. `check` as in write_packet (called after the copy)."""
        self._check()
        frame = picture if isinstance(picture, av.VideoFrame) else _frame_from(picture, fmt)
        if check is not None and not check():
            return False
        cc = track.stream.codec_context
        if frame.format.name != cc.pix_fmt or frame.width != cc.width or frame.height != cc.height:
            frame = frame.reformat(cc.width, cc.height, cc.pix_fmt)
        frame.pts, _ = track.stamp(pts, None)
        frame.time_base = track.time_base
        self._mux(track.stream.encode(frame))
        return True

    def write_audio(self, track: Track, pcm: np.ndarray, pts: int) -> None:
        """s16 samples, shape (samples, channels) or (samples,); `pts` counts samples. A gap before
        `pts` is filled with silence (up to 10 s; a longer one makes the track's time jump),
        samples before the end of what was written are dropped, so the track's timeline is exact."""
        self._check()
        pcm = np.asarray(pcm, dtype=np.int16)
        if pcm.ndim == 1:
            pcm = pcm.reshape(-1, 1)
        channels = track.stream.codec_context.channels
        if pcm.shape[1] != channels:
            raise Mp4Error(f"audio has {pcm.shape[1]} channel(s), the track {channels}", "bad_input")
        pts = int(pts)
        if track.next_input is None:
            track.next_sample = track.next_input = track.first_pts = pts
        # Place by what was given, not by what the encoder has put out: its frames are whole
        # (1024 samples for AAC) and lag the input by what waits in the resampler.
        gap = pts - track.next_input
        rate = track.stream.codec_context.sample_rate
        if gap < 0:  # overlaps what was written: keep only the new part
            pcm = pcm[-gap:]
            if not len(pcm):
                return
        elif gap > _AUDIO_GAP_MAX_S * rate:  # a long pause: the track's time jumps instead of minutes of silence
            track.next_sample += gap
            track.next_input = pts
            track.adjusted += 1
        elif gap > 0:
            self._encode_audio(track, np.zeros((gap, channels), np.int16))
        self._encode_audio(track, pcm)

    def _encode_audio(self, track: Track, pcm: np.ndarray) -> None:
        layout = track.stream.codec_context.layout.name
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = track.stream.codec_context.sample_rate
        frame.pts = None
        track.next_input += len(pcm)
        packets = []
        for out in track.resampler.resample(frame):
            out.pts = track.next_sample
            out.time_base = track.time_base
            track.next_sample += out.samples
            packets.extend(track.stream.encode(out))
        self._mux_audio(track, packets)

    def _mux_audio(self, track: Track, packets: list) -> None:
        for p in packets:
            track.frames += 1
            if p.pts is not None:
                track.last_pts = max(p.pts, track.last_pts or p.pts)
                track.last_delta = p.duration or track.last_delta
        self._mux(packets)

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise Mp4Error(f"{self._path} is closed", "closed")

    def _mux(self, packets) -> None:
        try:
            for p in packets:
                self._container.mux_one(p)
        except av.FFmpegError as exc:
            self._sink.chunks.clear()
            self._broken = Mp4Error(f"{self._path}: the muxer refused a packet: {exc}", "mux", self._path)
            raise self._broken from exc
        self._commit()

    def _commit(self) -> None:
        """Put what FFmpeg wrote during the last call on disk: one writev, then fsync."""
        chunks = self._sink.chunks
        if not chunks:
            return
        t0 = time.perf_counter()
        total = sum(len(c) for c in chunks)
        try:
            done = os.writev(self._fd, chunks)
            if done < total:  # a short write: the rest, from where it stopped
                rest = b"".join(chunks)[done:]
                while rest:
                    n = os.write(self._fd, rest)
                    rest = rest[n:]
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            chunks.clear()
            self._fail(exc)
        chunks.clear()
        self._bytes += total
        self.fragments += 1
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - t0, total)

    def _fail(self, exc: OSError) -> None:
        try:  # back to the last whole fragment, so the file stays playable (and the space comes back)
            os.ftruncate(self._fd, self._bytes)
            os.lseek(self._fd, self._bytes, os.SEEK_SET)
        except OSError:
            pass
        if exc.errno in _DISK_FULL:
            self._broken = DiskFull(f"{self._path}: disk full ({os.strerror(exc.errno)}); the file ends at its "
                                    f"last whole fragment ({self._bytes} bytes)", self._path)
        else:
            self._broken = Mp4Error(f"{self._path}: write failed: {exc}", "io", self._path)
        raise self._broken from exc

    # ------------------------------------------------------------ the end
    def close(self) -> None:
        """Flush the encoders and the last fragment, fsync and close. After a DiskFull or write
        error, only closes the file (it ends at its last whole fragment)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._broken is None:
                for t in self.tracks:
                    if t.encoder is not None and t.stream.codec_context.is_open:
                        if t.kind == "audio":
                            self._mux_audio(t, list(t.stream.encode(None)))
                        else:
                            self._mux(t.stream.encode(None))
                self._container.close()
                self._commit()
        finally:
            if self._broken is not None:
                try:
                    self._container.close()
                except Exception:  # noqa: BLE001 - the file is already cut at its last whole fragment
                    pass
                self._sink.chunks.clear()
            os.close(self._fd)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------ helpers
def _has_parameter_sets(data) -> bool:
    """Does an H.264 Annex B access unit carry an SPS (looks at the first NAL headers only)?"""
    head = bytes(memoryview(data)[:256])
    i = head.find(b"\x00\x00\x01")
    while i != -1 and i + 3 < len(head):
        if head[i + 3] & 0x1F == 7:
            return True
        i = head.find(b"\x00\x00\x01", i + 3)
    return False


_PLANAR = {"yuv420p": 3, "nv12": 2}


def _frame_from(picture, fmt: str) -> av.VideoFrame:
    """A VideoFrame holding the picture: one vectorised copy per plane into FFmpeg's buffer."""
    if isinstance(picture, np.ndarray) and fmt not in _PLANAR:
        return av.VideoFrame.from_ndarray(picture, format=fmt)
    planes = picture if isinstance(picture, (tuple, list)) else _split(picture, fmt)
    h, w = planes[0].shape[:2]
    frame = av.VideoFrame(w, h, fmt)
    for src, dst in zip(planes, frame.planes):
        rows, width = src.shape[0], src.shape[1] * (src.shape[2] if src.ndim == 3 else 1)
        view = np.frombuffer(dst, np.uint8).reshape(-1, dst.line_size)
        view[:rows, :width] = src.reshape(rows, width)
    return frame


def _split(picture: np.ndarray, fmt: str) -> tuple[np.ndarray, ...]:
    """A contiguous yuv420p/nv12 picture of shape (h*3/2, w) -> its planes."""
    h = picture.shape[0] * 2 // 3
    y = picture[:h]
    if fmt == "nv12":
        return y, picture[h:]
    rest = picture[h:].reshape(-1)
    q = (h // 2) * (picture.shape[1] // 2)
    return y, rest[:q].reshape(h // 2, -1), rest[q:2 * q].reshape(h // 2, -1)


def repair(path: str | os.PathLike) -> int:
    """Cut a file left by a crash (a power cut can leave half a fragment) after its last whole
    top-level box, and after a `moof` only when its `mdat` is whole too. Reads box headers only.
    Returns the size kept: 0 when not even the header (`ftyp` + `moov`) is whole."""
    size = os.path.getsize(path)
    good = pos = 0
    moov = moof_open = False
    with open(path, "r+b") as f:
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            n, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if n == 1 and len(head) >= 16:
                n = int.from_bytes(head[8:16], "big")
            elif n == 0:
                n = size - pos
            if n < 8 or pos + n > size:
                break
            pos += n
            moov = moov or kind == b"moov"
            if kind == b"moof":
                moof_open = True
            else:
                moof_open = False if kind == b"mdat" else moof_open
                if not moof_open:
                    good = pos
        good = good if moov else 0
        if good != size:
            f.truncate(good)
    return good
