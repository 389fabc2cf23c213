"""Recorder units: the encoder probe and its fallback, crash repair, naming, retention, the writer."""
from __future__ import annotations

import os
import subprocess
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from services.recorder import encoder, segments
from services.recorder.mp4 import Mp4Writer, repair
from tests.media_files import ffprobe_frames, numbered_file


def test_auto_picks_libx264_when_no_hardware_encoder_really_encodes():
    listed = []
    for name in encoder.HARDWARE:
        try:
            av.codec.Codec(name, "w")
            listed.append(name)
        except Exception:  # noqa: BLE001
            pass
    choice = encoder.choose("auto", 320, 240)
    if choice.hardware:  # a box with a working NVENC/Jetson encoder: the probe found it
        assert encoder.probe(choice.name, 320, 240) is None
        return
    assert choice.name == "libx264"
    for name in listed:  # listed by FFmpeg, yet the probe encode failed: that is the point
        assert name in choice.note and encoder.probe(name, 320, 240) is not None


def test_a_named_encoder_that_fails_falls_back_and_says_why():
    choice = encoder.choose("h264_nosuch", 320, 240)
    assert choice.name in ("libx264",) + encoder.HARDWARE
    assert "h264_nosuch is not in this FFmpeg build" in choice.note and "fell back to auto" in choice.note
    assert encoder.choose("libx264", 320, 240) == encoder.Choice("libx264", False, "")


@pytest.mark.gpu
def test_nvenc_probe_encodes_on_a_gpu_box(tmp_path):
    if not os.path.exists("/dev/nvidiactl"):
        pytest.skip("no NVIDIA GPU here (the CPU-side probe and fallback are tested above)")
    assert encoder.probe("h264_nvenc", 640, 480) is None
    choice = encoder.choose("auto", 640, 480)
    assert choice == encoder.Choice("h264_nvenc", True, "")
    out = tmp_path / "nv.mp4"
    with Mp4Writer(out, fragment_seconds=0.5) as w:
        t = w.add_video_encode("h264_nvenc", 640, 480, "yuv420p", Fraction(1, 90000),
                               encoder.encoder_options("h264_nvenc"))
        for i in range(60):
            w.write_picture(t, np.full((480, 640, 3), i * 4, np.uint8), "rgb24", i * 3000)
    assert ffprobe_frames(out) == 60


def _remux(src, out, frag=0.5):
    flushes = []
    w = Mp4Writer(out, fragment_seconds=frag, on_flush=lambda s, n: flushes.append(n))
    t = w.add_video_copy("h264", 320, 240, None, Fraction(1, 90000))
    with av.open(str(src)) as inp:
        for i, p in enumerate(inp.demux(video=0)):
            if p.size:
                w.write_packet(t, bytes(p), i * 3600, keyframe=p.is_keyframe)
    return w, flushes


def test_fragments_reach_the_disk_at_most_fragment_seconds_apart(tmp_path):
    src = numbered_file(tmp_path / "s.h264", 100, fps=25, gop=50, fmt="h264")  # keyframes 2 s apart
    w, flushes = _remux(src, tmp_path / "o.mp4", frag=0.5)
    # header + one fragment per 0.5 s even though keyframes are 2 s apart
    assert len(flushes) >= 1 + 7 and os.path.getsize(w.path) == w.bytes_written
    w.close()
    assert ffprobe_frames(tmp_path / "o.mp4") == 100


def test_timestamps_are_made_strictly_increasing(tmp_path):
    with Mp4Writer(tmp_path / "t.mp4") as w:
        t = w.add_video_encode("libx264", 64, 64, "yuv420p", Fraction(1, 90000), {"preset": "ultrafast"})
        for pts in (0, 3000, 3000, 2000, 9000):
            w.write_picture(t, np.zeros((64, 64, 3), np.uint8), "rgb24", pts)
        assert t.adjusted == 2
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "packet=pts", "-of", "csv=p=0",
                          str(tmp_path / "t.mp4")], capture_output=True, text=True, check=True).stdout.split()
    pts = [int(x) for x in out]
    assert all(b > a for a, b in zip(pts, pts[1:])), pts


def test_repair_cuts_half_a_fragment_and_a_file_without_header_is_empty(tmp_path):
    src = numbered_file(tmp_path / "s.h264", 50, fps=25, gop=10, fmt="h264")
    w, _ = _remux(src, tmp_path / "r.mp4")
    good = w.bytes_written
    w._container = None  # noqa: SLF001 - leave it as a crash would: no trailer
    os.close(w._fd)  # noqa: SLF001
    with open(tmp_path / "r.mp4", "ab") as f:
        f.write(b"\x00\x00\x10\x00moof" + b"\x01" * 100)  # a fragment the power cut broke off
    assert repair(tmp_path / "r.mp4") == good
    assert ffprobe_frames(tmp_path / "r.mp4") > 0
    (tmp_path / "h.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\0" * 16)
    assert repair(tmp_path / "h.mp4") == 0


def test_names_recover_and_retention(tmp_path):
    p1 = segments.new_path(tmp_path, "room:lobby", wall=0)
    p1.write_bytes(b"x")
    p2 = segments.new_path(tmp_path, "room:lobby", wall=0)
    assert p1.name == "room-lobby-19700101T000000Z.mp4.partial" and p2.name.endswith("Z-1.mp4.partial")
    got = segments.recover(tmp_path)
    assert got.removed == [p1] and not p1.exists()
    old = tmp_path / "cam" / "cam-old.mp4"
    old.parent.mkdir()
    old.write_bytes(b"o" * 1000)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    new = tmp_path / "cam" / "cam-new.mp4"
    new.write_bytes(b"n" * 1000)
    live = tmp_path / "cam" / "cam-live.mp4.partial"
    live.write_bytes(b"l" * 1000)
    assert segments.sweep(tmp_path, max_age_s=3600) == [old]
    assert segments.sweep(tmp_path, max_share=1e-15) == [new]  # share: oldest first, never the partial
    assert live.exists()


@pytest.mark.parametrize("chunk", [960, 1024, 4800])
def test_audio_lands_where_its_pts_says_whatever_the_chunk_size(tmp_path, chunk):
    """AAC's frames are 1024 samples; the bus's chunks are 960 (20 ms). A beep put at sample
    48000·k must play there (after the encoder's 1024-sample priming), not a chunk late."""
    rate, n = 48000, 48000 * 4
    t = np.arange(n) / rate
    pcm = (np.sin(2 * np.pi * 1000 * t) * 16000 * ((t % 1) < 0.1) * (t > 0.5)).astype(np.int16)
    path = tmp_path / "a.mp4"
    w = Mp4Writer(path, fsync=False)
    track = w.add_audio(rate, 1)
    for pos in range(0, n, chunk):
        w.write_audio(track, pcm[pos:pos + chunk], pos)
    w.close()
    with av.open(str(path)) as f:
        decoded = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)])
    loud = np.flatnonzero(np.abs(decoded) > 0.25)
    onsets = loud[np.concatenate(([True], np.diff(loud) > rate // 2))] - 1024
    assert list(np.abs(onsets - np.array([48000, 96000, 144000])) <= 16) == [True] * 3, onsets
