"""Crash-safe WAV: one audio stream's s16 PCM, as it came from the ring, in a plain RIFF file.

Why WAV for an audio target (`NAME-audio`, a voice session's audio): the samples are
kept exactly (what a transcriber or an evidence archive wants), the offset of a sample
from the file's start *is* its time (rate known: no timestamps to get wrong), and the
format is simple enough to make crash-safe by hand, without FFmpeg.

Layout: the canonical 44-byte header (`RIFF` size `WAVE`, `fmt ` PCM s16, `data` size),
then the samples, interleaved. How it reaches the disk, like the MP4 fragments
(services/recorder/mp4.py): `write()` only queues the chunks (numpy arrays, no copy,
no per-sample Python); every `fragment_seconds` of audio they go to the file with one
`writev`, the two size fields in the header are rewritten (`pwrite`) to cover them, and
the file is `fsync`ed. So:

* SIGKILL leaves a file whose header says exactly what is in it (a regular-file writev
  is not interrupted by a signal) and that plays as it is, but for a kill between the
  writev and the header's update;
* a power cut can leave the header behind the data, or a torn last sample frame.
  `repair()` (at the recorder's start, on every `.wav.partial`) sets the header's RIFF and
  data sizes to the last whole sample frame and cuts what is after it;
* ENOSPC/EDQUOT: the file is cut back to what the header says (the last flush), and
  `DiskFull` is raised, as the MP4 writer does.

The timeline: `write(pcm, pos)` puts the chunk at sample `pos` from the file's start; a
hole before it is filled with silence (zeros), a head that overlaps what was written is
dropped. services/recorder/stream.py places chunks by capture time with room_audio's
AudioPlacer (jitter ignored, drift followed), so sample offset -> capture time holds
within a few ms however long the file.
"""
from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Callable

import numpy as np

from services.recorder.mp4 import DiskFull, Mp4Error

__all__ = ["HEADER_BYTES", "WavWriter", "header", "repair"]

HEADER_BYTES = 44
MAX_DATA = 0xFFFFFFFF - HEADER_BYTES  # RIFF sizes are 32-bit: a WAV holds at most ~4 GiB of samples
MAX_CHUNKS = 512                      # queued chunks flushed at once whatever their length (one writev: IOV_MAX 1024)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_ZEROS = np.zeros(1 << 16, np.int16)    # silence for holes, shared (written by reference, never modified)


def header(rate: int, channels: int, data_bytes: int) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV holding `data_bytes` of samples."""
    align = 2 * channels
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels, rate,
                       rate * align, align, 16, b"data", data_bytes)


class WavWriter:
    """A WAV file being written. Not thread-safe: one owner calls it.

    The same outside as Mp4Writer where StreamRecorder looks (path, bytes_written, frames,
    duration, close()); `on_flush(seconds, nbytes)` after each flush reached the disk."""

    def __init__(self, path: str | os.PathLike, rate: int, channels: int, *, fragment_seconds: float = 0.5,
                 fsync: bool = True, on_flush: Callable[[float, int], None] | None = None) -> None:
        if rate <= 0 or channels <= 0:
            raise ValueError(f"a WAV needs a positive rate and channel count, got {rate} Hz x{channels}")
        if not 0 < fragment_seconds <= 60:
            raise ValueError(f"fragment_seconds must be in (0, 60], got {fragment_seconds!r}")
        self._path = os.fspath(path)
        self.rate, self.channels = rate, channels
        self.align = 2 * channels
        self.fsync, self.on_flush = fsync, on_flush
        self.flush_samples = max(1, round(fragment_seconds * rate))
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self.samples = 0          # placed on the timeline (written or pending)
        self._data = 0            # sample bytes on disk (what the header says)
        self.frames = 0           # chunks written (the recorder's "frames" for audio)
        self.silence = 0          # samples of silence put in holes
        self.dropped = 0          # samples dropped because they overlapped what was written
        self._broken: Mp4Error | None = None
        self._closed = False
        try:
            os.pwrite(self._fd, header(rate, channels, 0), 0)
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
        """Bytes on disk, header included."""
        return HEADER_BYTES + self._data

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

    def write(self, pcm: np.ndarray, pos: int) -> None:
        """s16 samples, shape (samples, channels) or (samples,) for mono, C-contiguous (a private
        copy: it is kept by reference until the flush), at sample `pos` of the file."""
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
        """Put the queued samples on disk: one writev, the header's sizes, fsync."""
        self._check()
        if not self._pending:
            return
        chunks, self._pending = self._pending, []
        nbytes = self._pending_samples * self.align
        self._pending_samples = 0
        self._commit(chunks, nbytes)

    def _commit(self, chunks: list, nbytes: int) -> None:
        t0 = time.perf_counter()
        start = self.bytes_written
        try:
            done = os.pwritev(self._fd, chunks, start)
            if done < nbytes:   # a short write: the rest, from where it stopped
                rest = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)[done:]
                while rest:
                    n = os.pwrite(self._fd, rest, start + done)
                    done += n
                    rest = rest[n:]
            data = self._data + nbytes
            os.pwrite(self._fd, struct.pack("<I", 36 + data), 4)
            os.pwrite(self._fd, struct.pack("<I", data), 40)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc)
        self._data += nbytes
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - t0, nbytes)

    def _fail(self, exc: OSError) -> None:
        try:  # back to what the header said before this flush: the file stays whole
            os.ftruncate(self._fd, self.bytes_written)
            os.pwrite(self._fd, struct.pack("<I", 36 + self._data), 4)
            os.pwrite(self._fd, struct.pack("<I", self._data), 40)
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
                self.flush()
        finally:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair(path: str | os.PathLike) -> int:
    """Make a WAV left by a crash whole: the header's RIFF and data sizes set to the last whole
    sample frame on disk, anything after it cut. Reads the header only. Returns the size kept:
    0 when the header is not whole or no sample frame is (nothing worth keeping)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:4] != b"RIFF" or head[8:16] != b"WAVE" + b"fmt ":
            return 0
        fmt_size = struct.unpack_from("<I", head, 16)[0]
        if fmt_size != 16 or head[36:40] != b"data":
            return 0  # not a header this writer makes
        align = struct.unpack_from("<H", head, 32)[0]
        if align <= 0:
            return 0
        data = (size - HEADER_BYTES) // align * align
        if data <= 0:
            return 0
        if HEADER_BYTES + data != size:
            f.truncate(HEADER_BYTES + data)
        if struct.unpack_from("<I", head, 4)[0] != 36 + data or struct.unpack_from("<I", head, 40)[0] != data:
            f.seek(4)
            f.write(struct.pack("<I", 36 + data))
            f.seek(40)
            f.write(struct.pack("<I", data))
        f.flush()
        os.fsync(f.fileno())
    return HEADER_BYTES + data
