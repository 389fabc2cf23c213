"""Crash-safe WAV: one audio stream's s16 PCM, as it came from the ring, in a plain RIFF file.

Why WAV for an audio target (`NAME-audio`, a voice session's audio): the samples are
kept exactly (what a transcriber or an evidence archive wants), the offset of a sample
from the file's start *is* its time (rate known: no timestamps to get wrong), and the
format is simple enough to make crash-safe by hand, without FFmpeg.

Layout: the canonical 44-byte header (`RIFF` size `WAVE`, `fmt ` PCM s16, `data` size),
the samples, interleaved, then one chunk of our own after them (`edgr`, STATE_CHUNK
bytes: RIFF readers skip a chunk they do not know, and one after `data` is never in
their way) holding the **resume state**, as the MP4 writer's `free` boxes do
(services/recorder/mp4.py): how many samples the file holds, the caller's token for the
last chunk among them (a bus item's generation, sequence and capture time), and the
caller's own part (`state=`). How it reaches the disk: `write()` only queues the chunks
(numpy arrays, no copy, no per-sample Python); every `fragment_seconds` of audio they go
to the file with one `pwritev`, followed in the same call by the new state chunk (it
overwrites the old one, which stood where the new samples begin), then the two size
fields in the header are rewritten (`pwrite`) to cover them, and the file is `fsync`ed.
So:

* a state chunk that reached the disk whole, at the file's end, was written after its
  samples: it says exactly what the file holds, wherever a SIGKILL ended the file (even
  between the pwritev and the header's update);
* a power cut can tear the last flush. `repair()` (at the recorder's start, on every
  `.wav.partial`) sets the header's sizes from a whole state chunk at the end, else cuts
  the file back to what its header says (the last flush whose header update reached the
  disk; its state is gone: a later run cannot resume after it), or, when the header is
  ahead of the samples, to the last whole sample frame;
* ENOSPC/EDQUOT: the file is cut back to what the header says (the last flush), its
  state written again, and `DiskFull` is raised, as the MP4 writer does.

A writer made with `resume=` (the state `read_state` found in a repaired file) appends to
that file: its next flush begins where the state chunk stands.

The timeline: `write(pcm, pos)` puts the chunk at sample `pos` from the file's start; a
hole before it is filled with silence (zeros), a head that overlaps what was written is
dropped. services/recorder/stream.py places chunks by capture time with room_audio's
AudioPlacer (jitter ignored, drift followed), so sample offset -> capture time holds
within a few ms however long the file.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from services.recorder.mp4 import STATE_TAG, DiskFull, Mp4Error, boot_id

__all__ = ["HEADER_BYTES", "STATE_CHUNK", "WavWriter", "header", "read_state", "repair"]

HEADER_BYTES = 44
STATE_ID = b"edgr"                    # the resume state's chunk, after the samples
STATE_CHUNK = 1024                    # its size, header included: fixed, so it is found at the file's end
MAX_DATA = 0xFFFFFFFF - HEADER_BYTES - STATE_CHUNK  # RIFF sizes are 32-bit: at most ~4 GiB of samples
MAX_CHUNKS = 512                      # queued chunks flushed at once whatever their length (one writev: IOV_MAX 1024)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_ZEROS = np.zeros(1 << 16, np.int16)    # silence for holes, shared (written by reference, never modified)


def header(rate: int, channels: int, data_bytes: int, tail: int = STATE_CHUNK) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV holding `data_bytes` of samples and `tail`
    bytes of chunks after them (the state chunk)."""
    align = 2 * channels
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes + tail, b"WAVE", b"fmt ", 16, 1, channels,
                       rate, rate * align, align, 16, b"data", data_bytes)


def state_chunk(doc: dict) -> bytes:
    """The `edgr` chunk holding `doc` (STATE_CHUNK bytes, JSON padded with spaces); a doc too
    long for it (a very long target name) keeps its position and loses its owner part."""
    room = STATE_CHUNK - 8 - len(STATE_TAG)
    text = json.dumps(doc, separators=(",", ":")).encode()
    if len(text) > room:
        text = json.dumps({**doc, "owner": None}, separators=(",", ":")).encode()[:room]
    return STATE_ID + struct.pack("<I", STATE_CHUNK - 8) + STATE_TAG + text.ljust(room)


class WavWriter:
    """A WAV file being written. Not thread-safe: one owner calls it.

    The same outside as Mp4Writer where StreamRecorder looks (path, bytes_written, frames,
    duration, close()); `on_flush(seconds, nbytes)` after each flush reached the disk.
    `state()`, when given, is the caller's part of the resume state written with each
    flush (JSON-able); `resume`, the state `read_state` found in a repaired file, makes the
    writer append to that file."""

    def __init__(self, path: str | os.PathLike, rate: int, channels: int, *, fragment_seconds: float = 0.5,
                 fsync: bool = True, on_flush: Callable[[float, int], None] | None = None,
                 state: Callable[[], Any] | None = None, resume: dict | None = None) -> None:
        if rate <= 0 or channels <= 0:
            raise ValueError(f"a WAV needs a positive rate and channel count, got {rate} Hz x{channels}")
        if not 0 < fragment_seconds <= 60:
            raise ValueError(f"fragment_seconds must be in (0, 60], got {fragment_seconds!r}")
        self._path = os.fspath(path)
        self.rate, self.channels = rate, channels
        self.align = 2 * channels
        self.fsync, self.on_flush = fsync, on_flush
        self.flush_samples = max(1, round(fragment_seconds * rate))
        self._state = state
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._pending_token: Any = None
        self.samples = 0          # placed on the timeline (written or pending)
        self._data = 0            # sample bytes on disk (what the header says)
        self.frames = 0           # chunks written (the recorder's "frames" for audio)
        self.flushes = 0          # flushes in the file
        self.silence = 0          # samples of silence put in holes
        self.dropped = 0          # samples dropped because they overlapped what was written
        self.token: Any = None    # the caller's token of the last chunk on disk
        self._broken: Mp4Error | None = None
        self._closed = False
        self._frames_on_disk = 0
        if resume is not None:
            track = resume["tracks"][0]
            self.samples = int(track["end"])
            self._data = self.samples * self.align
            self.frames = self._frames_on_disk = int(track.get("frames") or 0)
            self.flushes = int(resume.get("frag") or 0)
            self.token = track.get("tok")
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC)
            return
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(self._fd, header(rate, channels, 0, 0), 0)
            if fsync:
                os.fsync(self._fd)
        except OSError as exc:
            os.close(self._fd)
            if exc.errno in _DISK_FULL:
                raise DiskFull(f"{self._path}: disk full ({os.strerror(exc.errno)})", self._path) from exc
            raise Mp4Error(f"{self._path}: write failed: {exc}", "io", self._path) from exc

    @property
    def path(self) -> str:
        return self._path

    @property
    def bytes_written(self) -> int:
        """Bytes on disk, header and state included."""
        return HEADER_BYTES + self._data + (STATE_CHUNK if self.flushes else 0)

    @property
    def duration(self) -> float:
        """Seconds of audio placed so far."""
        return self.samples / self.rate

    @property
    def full(self) -> bool:
        """True when another minute of audio would not fit the 32-bit sizes: start a new file."""
        return (self.samples + 60 * self.rate) * self.align > MAX_DATA

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, pcm: np.ndarray, pos: int, token: Any = None) -> None:
        """s16 samples, shape (samples, channels) or (samples,) for mono, C-contiguous (a private
        copy: it is kept by reference until the flush), at sample `pos` of the file. `token`
        (JSON-able) names the chunk in the resume state once it is on disk."""
        self._check()
        if pcm.dtype != np.int16 or pcm.size % self.channels:
            raise Mp4Error(f"expected s16 samples in {self.channels} channel(s), got {pcm.dtype} {pcm.shape}",
                           "bad_input", self._path)
        n = pcm.size // self.channels
        gap = int(pos) - self.samples
        if gap < 0:                      # overlaps what was written: keep only the new part
            cut = min(-gap, n)
            self.dropped += cut
            pcm, n = pcm.reshape(-1)[cut * self.channels:], n - cut
            if n == 0:
                return
        elif gap > 0:                    # a hole: silence
            self.silence += gap
            self._queue_silence(gap)
        self._pending.append(pcm)
        self._pending_samples += n
        self.samples += n
        self.frames += 1
        if token is not None:
            self._pending_token = token
        if self._pending_samples >= self.flush_samples or len(self._pending) >= MAX_CHUNKS:
            self.flush()

    def _queue_silence(self, samples: int) -> None:
        piece = len(_ZEROS) // self.channels
        while samples:
            k = min(samples, piece)
            self._pending.append(_ZEROS[:k * self.channels])
            self._pending_samples += k
            self.samples += k
            samples -= k
            if len(self._pending) >= MAX_CHUNKS:
                self.flush()

    def flush(self) -> None:
        """Put the queued samples on disk: one pwritev with the new state after them, the
        header's sizes, fsync."""
        self._check()
        if not self._pending:
            return
        chunks, self._pending = self._pending, []
        nbytes = self._pending_samples * self.align
        self._pending_samples = 0
        self._commit(chunks, nbytes)

    def state(self, data: int, token: Any, frames: int, flushes: int) -> dict:
        """The resume state of a file holding `data` sample bytes, the last chunk's `token`."""
        end = data // self.align
        return {"v": 1, "boot": boot_id(), "frag": flushes,
                "tracks": [{"tok": token, "end": end, "kind": "audio", "first": 0, "pts": end, "delta": 0,
                            "frames": frames, "tb": [1, self.rate]}],
                "owner": self._state() if self._state is not None else None}

    def _commit(self, chunks: list, nbytes: int) -> None:
        t0 = time.perf_counter()
        start = HEADER_BYTES + self._data
        data = self._data + nbytes
        token = self._pending_token if self._pending_token is not None else self.token
        chunks.append(state_chunk(self.state(data, token, self.frames, self.flushes + 1)))
        total = nbytes + STATE_CHUNK
        try:
            done = os.pwritev(self._fd, chunks, start)
            if done < total:   # a short write: the rest, from where it stopped
                rest = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)[done:]
                while rest:
                    n = os.pwrite(self._fd, rest, start + done)
                    done += n
                    rest = rest[n:]
            self._sizes(data)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc)
        self._data = data
        self.token, self._pending_token = token, None
        self.flushes += 1
        self._frames_on_disk = self.frames
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - t0, nbytes)

    def _sizes(self, data: int) -> None:
        os.pwrite(self._fd, struct.pack("<I", 36 + data + STATE_CHUNK), 4)
        os.pwrite(self._fd, struct.pack("<I", data), 40)

    def _fail(self, exc: OSError) -> None:
        try:  # back to the last flush: its samples, its state again, the header saying so
            os.ftruncate(self._fd, HEADER_BYTES + self._data)
            if self.flushes:
                os.pwrite(self._fd, state_chunk(self.state(self._data, self.token, self._frames_on_disk,
                                                           self.flushes)), HEADER_BYTES + self._data)
                self._sizes(self._data)
        except OSError:
            pass
        if exc.errno in _DISK_FULL:
            self._broken = DiskFull(f"{self._path}: disk full ({os.strerror(exc.errno)}); the file ends at its "
                                    f"last whole flush ({self.bytes_written} bytes)", self._path)
        else:
            self._broken = Mp4Error(f"{self._path}: write failed: {exc}", "io", self._path)
        raise self._broken from exc

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise Mp4Error(f"{self._path} is closed", "closed")

    def close(self) -> None:
        """Flush what is queued, fsync and close (after a write error: only close)."""
        if self._closed:
            return
        try:
            if self._broken is None:
                if self._pending:
                    self.flush()
                elif self.flushes:  # the caller's part may have changed (a final stop): its last word
                    os.pwrite(self._fd, state_chunk(self.state(self._data, self.token, self.frames, self.flushes)),
                              HEADER_BYTES + self._data)
                    if self.fsync:
                        os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc)
        finally:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _header(f) -> tuple[int, int] | None:
    """(sample frame bytes, the data size the header says) of a WAV this writer makes, or None."""
    f.seek(0)
    head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:4] != b"RIFF" or head[8:16] != b"WAVE" + b"fmt ":
        return None
    fmt_size = struct.unpack_from("<I", head, 16)[0]
    if fmt_size != 16 or head[36:40] != b"data":
        return None  # not a header this writer makes
    align = struct.unpack_from("<H", head, 32)[0]
    if align <= 0:
        return None
    return align, struct.unpack_from("<I", head, 40)[0]


def _tail_state(f, size: int, align: int) -> dict | None:
    """The state chunk at the file's end when it is whole and says what is before it: the
    file holds exactly the samples it counts, and the chunk after them."""
    at = size - STATE_CHUNK
    if at < HEADER_BYTES:
        return None
    f.seek(at)
    chunk = f.read(STATE_CHUNK)
    if len(chunk) != STATE_CHUNK or chunk[:4] != STATE_ID or chunk[8:8 + len(STATE_TAG)] != STATE_TAG:
        return None
    try:
        doc = json.loads(chunk[8 + len(STATE_TAG):])
        end = int(doc["tracks"][0]["end"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if doc.get("v") != 1 or HEADER_BYTES + end * align != at:
        return None
    return doc


def repair(path: str | os.PathLike) -> int:
    """Make a WAV left by a crash whole, reading its header and its last chunk only: a whole
    state chunk at the end vouches for the samples before it (the header's sizes are set to
    them); else the file is cut back to what the header says (the last flush that updated
    it), or, when the header is ahead of the samples, to its last whole sample frame.
    Returns the size kept: 0 when the header is not whole or no sample frame is (nothing
    worth keeping)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        got = _header(f)
        if got is None:
            return 0
        align, said = got
        tail = 0
        if (doc := _tail_state(f, size, align)) is not None:
            data, tail = int(doc["tracks"][0]["end"]) * align, STATE_CHUNK
        elif 0 < said and HEADER_BYTES + said <= size and said % align == 0:
            data = said
        else:
            data = (size - HEADER_BYTES) // align * align
        if data <= 0:
            return 0
        keep = HEADER_BYTES + data + tail
        if keep != size:
            f.truncate(keep)
        if said != data or tail != STATE_CHUNK:
            f.seek(4)
            f.write(struct.pack("<I", 36 + data + tail))
            f.seek(40)
            f.write(struct.pack("<I", data))
        f.flush()
        os.fsync(f.fileno())
    return keep


def read_state(path: str | os.PathLike) -> dict | None:
    """The resume state of a (repaired, or finished) WAV: its state chunk, or None."""
    try:
        with open(path, "rb") as f:
            got = _header(f)
            if got is None:
                return None
            return _tail_state(f, os.fstat(f.fileno()).st_size, got[0])
    except OSError:
        return None
