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

Resume state. After every fragment the writer adds, in the same `writev`, a `free` box
(`STATE_TAG` + JSON: players skip it) saying what the file holds up to there: per track
the last sample's timestamps, the caller's token for it (a bus item's generation and
sequence), the file's timestamp offset, and the caller's own part (`state=`). A box that
reached the disk whole was written after its fragment, so the last whole state box of a
file describes exactly what the file holds (`repair` cuts a file back to it; `read_state`
reads it). A writer made with `resume=` (that state) appends to the file: the new
muxer's header (`ftyp`, `moov`) and index (`mfra`) are left out, and in each fragment
the sequence number (`mfhd`) and every track's decode time (`tfdt`: its first sample's
time plus the file's offset) are set to continue the file's (a muxer starts both afresh,
and places a track that starts later than another by its own rules). An audio track starts its encoder
`AUDIO_PREROLL` frames before the file's end, on the file's frame grid, and drops what
it encodes before the end: the caller feeds from `Track.next_input` (the bus history
has those samples), and the first packet kept overlaps the file's last as if one encoder
had made both (the decoded splice differs from an unbroken encode by about what two
encodes of the same sound differ by anyway; with no pre-roll a fresh encoder's first
frame clicks).

Remux (`add_video_copy` + `write_packet`) never decodes or encodes: the Annex B access
units go to the muxer as they are (it rewrites start codes as length prefixes, the NAL
units are the same bytes) through a codec-less stream (PyAV's `add_mux_stream`).
Encoding (`add_video_encode` + `write_picture`, `add_audio` + `write_audio`) runs a
PyAV encoder per track; which encoder to use is services/recorder/encoder.py's job.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np

__all__ = ["DiskFull", "Mp4Error", "Mp4Writer", "Track", "repair", "read_state", "has_fragments", "boot_id",
           "state_extent", "MOVFLAGS", "STATE_TAG", "AUDIO_PREROLL"]

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
STATE_TAG = b"edgeroom-resume\n"   # a top-level `free` box that begins with this holds the resume state
_BOX = struct.Struct(">I4s")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_boot_id = ""


def boot_id() -> str:
    """This boot's id: capture times (CLOCK_MONOTONIC) of another boot mean nothing here."""
    global _boot_id
    if not _boot_id:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _boot_id = f.read().strip()
        except OSError:
            _boot_id = "unknown"
    return _boot_id


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_AUDIO_GAP_MAX_S = 10.0     # a jump forward in audio pts longer than this starts over instead of writing silence
AUDIO_PREROLL = 2           # encoder frames an appending writer encodes again before the file's end


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
                 "frames", "adjusted", "resampler", "next_sample", "next_input", "extradata", "fmt",
                 "pending", "tokens", "saved", "offset", "drop_before")

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
        # resume bookkeeping: what was muxed and not yet in a fragment on disk, in mux order
        # (token, pts, dts, end); the caller's tokens of pictures in the encoder, by pts; what the
        # file holds of this track (the state's entry); file time - our time (tfdt - dts); audio
        # packets before this (our time) are not written
        self.pending: deque[tuple] = deque()
        self.tokens: dict[int, Any] = {}
        self.saved: dict = {"tok": None, "pts": None, "dts": None, "end": None, "off": None, "first": None,
                            "delta": 0, "frames": 0}
        self.offset: int | None = None
        self.drop_before: int | None = None

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
    (for a flush-latency metric). `state()`, when given, is the caller's part of the resume
    state written after each fragment (JSON-able). `resume`, the state `read_state` found
    in a repaired file, makes the writer append to that file: add the same tracks in the
    same order, then write on from where the state says the file ends."""

    def __init__(self, path: str | os.PathLike, *, fragment_seconds: float = 1.0, fsync: bool = True,
                 on_flush: Callable[[float, int], None] | None = None, state: Callable[[], Any] | None = None,
                 resume: dict | None = None) -> None:
        if not 0 < fragment_seconds <= 60:
            raise ValueError(f"fragment_seconds must be in (0, 60], got {fragment_seconds!r}")
        self._path = os.fspath(path)
        self.fragment_seconds, self.fsync, self.on_flush = fragment_seconds, fsync, on_flush
        self._state = state
        self._resume = resume
        self._seq = int(resume["frag"]) if resume else 0  # fragments in the file (mfhd of the last one)
        if resume is not None:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        else:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._sink = _Collector()
        frag_us = str(int(fragment_seconds * 1_000_000))
        self._container = av.open(self._sink, "w", format="mp4", options={
            "movflags": MOVFLAGS, "frag_duration": frag_us,
            # a track that falls silent must not hold the others in the interleaver for 10 s (FFmpeg's default)
            "max_interleave_delta": frag_us,
            # appending: our timestamps as they are. Shifting the file to start at 0 without edit
            # lists, FFmpeg gives a track that starts after another (video back after a hole,
            # audio from its pre-roll) a first sample as long as the difference, and the samples
            # after it in that fragment play that much late (tfdt is set for each fragment anyway)
            **({"avoid_negative_ts": "make_non_negative"} if resume is not None else {})})
        self.tracks: list[Track] = []
        self._bytes = os.fstat(self._fd).st_size if resume is not None else 0
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
        return self._added(track)

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
        return self._added(track)

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
        return self._added(track)

    def _added(self, track: Track) -> Track:
        """A new track; when appending, it takes up where the file's track of that place ends."""
        if self._resume is not None:
            saved = self._resume["tracks"]
            if len(self.tracks) >= len(saved):
                raise Mp4Error(f"{self._path}: the file has {len(saved)} track(s), a resumed writer cannot add "
                               "another", "resume", self._path)
            s = dict(saved[len(self.tracks)])
            track.saved = s
            track.offset = s["off"]
            track.first_pts, track.last_pts, track.last_dts = s["first"], s["pts"], s["dts"]
            track.last_delta, track.frames = int(s["delta"] or 0), int(s["frames"] or 0)
            if track.kind == "audio" and s["end"] is not None:
                # the encoder's frames on the file's grid, from AUDIO_PREROLL frames before its end:
                # their packets (and the priming) are dropped, the first kept one overlaps the
                # file's last as if one encoder had made both (measured: one frame is not enough)
                frame = track.stream.codec_context.frame_size or 1024
                track.drop_before = s["end"]
                track.next_sample = track.next_input = s["end"] - AUDIO_PREROLL * frame
        self.tracks.append(track)
        return track

    @property
    def resumed(self) -> bool:
        """Whether this writer appends to a file another writer began."""
        return self._resume is not None

    # ------------------------------------------------------------ writing
    def write_packet(self, track: Track, data: bytes | memoryview | np.ndarray | av.Packet, pts: int,
                     dts: int | None = None, keyframe: bool = False, check: Callable[[], bool] | None = None,
                     token: Any = None) -> bool:
        """One encoded access unit (Annex B for H.264/H.265; an av.Packet is taken as it is, no
        copy), timestamps in the track's time base.

        `check`, when given, is called after the data was copied into the packet (a framebus
        item's `valid`): False means the source was overwritten meanwhile, and nothing is
        written (returns False). `token` (JSON-able) names the item in the resume state once
        its fragment is on disk."""
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
        self._mux([packet], track, token)
        return True

    def write_picture(self, track: Track, picture: np.ndarray | tuple[np.ndarray, ...] | av.VideoFrame, fmt: str,
                      pts: int, check: Callable[[], bool] | None = None, token: Any = None) -> bool:
        """One picture (an ndarray, a tuple of planes such as framebus `item.planes()`, or a
        decoded av.VideoFrame), encoded. `check` and `token` as in write_packet (called after
        the copy)."""
        self._check()
        frame = picture if isinstance(picture, av.VideoFrame) else _frame_from(picture, fmt)
        if check is not None and not check():
            return False
        cc = track.stream.codec_context
        if frame.format.name != cc.pix_fmt or frame.width != cc.width or frame.height != cc.height:
            frame = frame.reformat(cc.width, cc.height, cc.pix_fmt)
        frame.pts, _ = track.stamp(pts, None)
        frame.time_base = track.time_base
        if token is not None:
            track.tokens[frame.pts] = token  # its packet may come out of the encoder later
        self._mux(track.stream.encode(frame), track)
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
            track.next_sample = track.next_input = pts
            if track.first_pts is None:
                track.first_pts = pts
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
        if track.drop_before is not None:  # an appending writer: what the file already holds (and the priming)
            packets = [p for p in packets if p.pts is not None and p.pts >= track.drop_before]
        for p in packets:
            track.frames += 1
            if p.pts is not None:
                track.last_pts = max(p.pts, track.last_pts or p.pts)
                track.last_delta = p.duration or track.last_delta
        self._mux(packets, track)

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise Mp4Error(f"{self._path} is closed", "closed")

    def _mux(self, packets, track: Track, token: Any = None) -> None:
        try:
            for p in packets:
                if p.dts is not None:  # (a flushing encoder's empty packet has none: not a sample)
                    end = p.pts + (p.duration or 0) if track.kind == "audio" else None
                    tok = token if token is not None else track.tokens.pop(p.pts, None) if track.tokens else None
                    track.pending.append((tok, p.pts, p.dts, end))
                self._container.mux_one(p)
        except av.FFmpegError as exc:
            self._sink.chunks.clear()
            self._broken = Mp4Error(f"{self._path}: the muxer refused a packet: {exc}", "mux", self._path)
            raise self._broken from exc
        self._commit()

    def _commit(self) -> None:
        """Put what FFmpeg wrote during the last call on disk: one writev, then fsync. Each
        fragment is followed by its resume state, in the same writev."""
        chunks = self._sink.chunks
        if not chunks:
            return
        t0 = time.perf_counter()
        parts = self._frame(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        chunks.clear()
        total = sum(len(c) for c in parts)
        try:
            done = os.writev(self._fd, parts)
            if done < total:  # a short write: the rest, from where it stopped
                rest = b"".join(parts)[done:]
                while rest:
                    n = os.write(self._fd, rest)
                    rest = rest[n:]
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc)
        self._bytes += total
        self.fragments += 1
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - t0, total)

    # ------------------------------------------------------------ resume state
    def _frame(self, data: bytes) -> list:
        """The top-level boxes FFmpeg wrote, a state box after each fragment (and after the
        header); an appending writer leaves the header and the index out and patches each
        fragment to continue the file."""
        view = memoryview(data)
        parts: list = []
        pos, n = 0, len(data)
        appending = self._resume is not None
        while pos + 8 <= n:
            size, kind = _BOX.unpack_from(data, pos)
            if size == 1:
                size = _U64.unpack_from(data, pos + 8)[0]
            elif size == 0:
                size = n - pos
            end = min(n, pos + size)
            if kind in (b"ftyp", b"moov", b"mfra") and appending:
                pass
            elif kind == b"moof":
                parts.append(self._moof(data, pos, end))
            else:
                parts.append(view[pos:end])
                if kind == b"mdat" or kind == b"moov":
                    parts.append(self.state_box())
            pos = end
        if pos < n:
            parts.append(view[pos:])
        return parts

    def _moof(self, data: bytes, start: int, end: int):
        """Read a fragment's tracks and sample counts (and, appending, patch its sequence number
        and decode times); what its samples were moves from `pending` to `saved`."""
        box = bytearray(data[start:end]) if self._resume is not None else None
        self._seq += 1
        for kind, pos, stop in _children(data, start + 8, end):
            if kind == b"mfhd" and box is not None:
                _U32.pack_into(box, pos + 12 - start, self._seq)
            elif kind == b"traf":
                track, tfdt_at, tfdt_v1, count = None, -1, True, 0
                for k2, p2, _e2 in _children(data, pos + 8, stop):
                    if k2 == b"tfhd":
                        tid = _U32.unpack_from(data, p2 + 12)[0]
                        track = self.tracks[tid - 1] if 0 < tid <= len(self.tracks) else None
                    elif k2 == b"tfdt":
                        tfdt_at, tfdt_v1 = p2 + 12, data[p2 + 8] == 1
                    elif k2 == b"trun":
                        count += _U32.unpack_from(data, p2 + 12)[0]
                if track is None or not count:
                    continue
                tfdt = (_U64 if tfdt_v1 else _U32).unpack_from(data, tfdt_at)[0] if tfdt_at >= 0 else None
                self._fragment(track, tfdt, count, box, tfdt_at - start, tfdt_v1)
        return box if box is not None else memoryview(data)[start:end]

    def _fragment(self, track: Track, tfdt: int | None, count: int, box, at: int, v1: bool) -> None:
        pending = track.pending
        if not pending:
            return
        first_dts = pending[0][2]
        if tfdt is not None:
            if box is not None and track.offset is not None:
                # appending: the fragment starts where its first sample's time puts it on the file's
                # timeline (the muxer's own count starts at 0, and its first fragment of a track that
                # starts later than another's is not placed by our times)
                tfdt = first_dts + track.offset
                if not v1 and not 0 <= tfdt < 1 << 32:
                    raise Mp4Error(f"{self._path}: a 32-bit tfdt cannot hold {tfdt}", "resume", self._path)
                (_U64 if v1 else _U32).pack_into(box, at, tfdt)
            else:
                track.offset = tfdt - first_dts
        last = None
        for _ in range(min(count, len(pending))):
            last = pending.popleft()
        s = track.saved
        s["tok"], s["pts"], s["dts"], s["end"] = last
        s["off"], s["first"], s["delta"] = track.offset, track.first_pts, track.last_delta
        s["frames"] = int(s["frames"] or 0) + count
        s["kind"], s["tb"] = track.kind, [track.time_base.numerator, track.time_base.denominator]

    def state_box(self) -> bytes:
        """The resume state now: what the fragments on disk hold, and the caller's part."""
        doc = {"v": 1, "boot": boot_id(), "frag": self._seq, "tracks": [t.saved for t in self.tracks],
               "owner": self._state() if self._state is not None else None}
        payload = STATE_TAG + json.dumps(doc, separators=(",", ":")).encode()
        return _BOX.pack(8 + len(payload), b"free") + payload

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
                            self._mux(t.stream.encode(None), t)
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


def _children(data: bytes, pos: int, end: int):
    """(kind, start, end) of the boxes in data[pos:end]."""
    while pos + 8 <= end:
        size, kind = _BOX.unpack_from(data, pos)
        if size == 1:
            size = _U64.unpack_from(data, pos + 8)[0]
        elif size == 0:
            size = end - pos
        if size < 8:
            return
        yield kind, pos, min(end, pos + size)
        pos += size


def _scan(f, size: int) -> tuple[int, int, int, int]:
    """Walk the top-level boxes of a file: (end of the last whole box, and after a `moof` only
    when its `mdat` is whole too; end of the last whole state box, and where it begins; 0 when
    the header (`ftyp` + `moov`) is not whole)."""
    good = pos = 0
    state_end = state_at = 0
    moov = moof_open = False
    while pos + 8 <= size:
        f.seek(pos)
        head = f.read(16 + len(STATE_TAG))
        n, kind = int.from_bytes(head[:4], "big"), head[4:8]
        if n == 1 and len(head) >= 16:
            n = int.from_bytes(head[8:16], "big")
        elif n == 0:
            n = size - pos
        if n < 8 or pos + n > size:
            break
        if kind == b"free" and head[8:8 + len(STATE_TAG)] == STATE_TAG and moov:
            state_at, state_end = pos, pos + n
        pos += n
        moov = moov or kind == b"moov"
        if kind == b"moof":
            moof_open = True
        else:
            moof_open = False if kind == b"mdat" else moof_open
            if not moof_open:
                good = pos
    if not moov:
        return 0, 0, 0, 0
    return good, state_end, state_at, pos


def repair(path: str | os.PathLike) -> int:
    """Cut a file left by a crash after what it surely holds, reading box headers only. A file
    with resume state boxes ends at its last whole one (written after its fragment, in the
    same writev: whole, it vouches for everything before it); an older file after its last
    whole top-level box, and after a `moof` only when its `mdat` is whole too. Returns the
    size kept: 0 when not even the header (`ftyp` + `moov`) is whole."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        good, state_end, _, _ = _scan(f, size)
        if state_end:
            good = state_end
        if good != size:
            f.truncate(good)
    return good


def state_extent(doc: dict | None) -> tuple[float, int]:
    """(seconds of media, frames) a file holds by its resume state: its longest track, and its
    video frames (audio packets if it has no video), as Mp4Writer.duration and .frames count."""
    seconds, video, other = 0.0, 0, 0
    for t in (doc or {}).get("tracks") or []:
        try:
            if t.get("first") is not None and t.get("pts") is not None and t.get("tb"):
                span = int(t["pts"]) - int(t["first"]) + int(t.get("delta") or 0)
                seconds = max(seconds, span * int(t["tb"][0]) / int(t["tb"][1]))
            if t.get("kind") == "video":
                video += int(t.get("frames") or 0)
            else:
                other += int(t.get("frames") or 0)
        except (TypeError, ValueError, IndexError):
            continue
    return round(seconds, 3), video or other


def has_fragments(path: str | os.PathLike) -> bool:
    """Whether the file holds any fragment (media), not only its header."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            good, _, _, _ = _scan(f, size)
            f.seek(0)
            pos = 0
            while pos + 8 <= good:
                f.seek(pos)
                head = f.read(16)
                n, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if n == 1:
                    n = int.from_bytes(head[8:16], "big")
                if kind == b"moof":
                    return True
                if n < 8:
                    return False
                pos += n
    except OSError:
        return False
    return False


def read_state(path: str | os.PathLike) -> dict | None:
    """The resume state of a (repaired, or finished) file: its last whole state box, or None."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _, state_end, state_at, _ = _scan(f, size)
            if not state_end:
                return None
            f.seek(state_at + 8 + len(STATE_TAG))
            doc = json.loads(f.read(state_end - state_at - 8 - len(STATE_TAG)))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("v") == 1 else None
