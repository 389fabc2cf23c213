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
from services.recorder.mp4 import Mp4Writer, read_state, repair
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


# ------------------------------------------------------------------ resume state and appending
def _aus(n: int, gop: int = 30) -> list[tuple[bytes, bool]]:
    """n H.264 access units of a 160x120 picture getting brighter (libx264 zerolatency)."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = 160, 120, "yuv420p", Fraction(1, 30)
    enc.options, enc.gop_size = {"tune": "zerolatency", "x264-params": "repeat-headers=1:scenecut=0"}, gop
    out = []
    for i in range(n):
        f = av.VideoFrame.from_ndarray(np.full((120, 160, 3), i * 2 % 256, np.uint8), format="rgb24").reformat(
            format="yuv420p")
        f.pts = i
        out += [(bytes(p), p.is_keyframe) for p in enc.encode(f)]
    return out


def _samples(path) -> int:
    """Samples the file's fragments hold (the trun counts), read from the boxes."""
    data = open(path, "rb").read()
    from services.recorder.mp4 import _children
    total = 0
    for kind, pos, end in _children(data, 0, len(data)):
        if kind == b"moof":
            for k2, p2, e2 in _children(data, pos + 8, end):
                if k2 == b"traf":
                    total += sum(int.from_bytes(data[p3 + 12:p3 + 16], "big")
                                 for k3, p3, _ in _children(data, p2 + 8, e2) if k3 == b"trun")
    return total


def _packet_pts(path) -> list[int]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "0", "-show_entries", "packet=pts", "-of",
                          "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout.split()
    return [int(x) for x in out]


def _decode_errors(path) -> str:
    r = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True, text=True)
    return r.stderr.strip() + ("" if r.returncode == 0 else f" (exit {r.returncode})")


def test_a_file_cut_anywhere_says_exactly_which_items_it_holds(tmp_path):
    """A SIGKILL or a power cut may end the file at any byte. After repair, the last state box
    names the last item of the fragments the file holds: never one more (a gap on resume),
    never one fewer (a duplicate)."""
    aus = _aus(60)
    path = tmp_path / "k.mp4"
    w = Mp4Writer(path, fragment_seconds=0.2, fsync=False, state=lambda: {"mine": 1})
    t = w.add_video_copy("h264", 160, 120)
    for i, (au, key) in enumerate(aus):
        w.write_packet(t, au, i * 3000, keyframe=key, token=[7, i])
    whole = open(path, "rb").read()  # as a SIGKILL leaves it: no trailer
    st = read_state(path)
    assert st["owner"] == {"mine": 1} and st["tracks"][0]["tok"][1] + 1 == _samples(path) < 60
    cut_file = tmp_path / "cut.mp4"
    seen = set()
    for cut in range(len(whole) - 1, 700, -7):
        cut_file.write_bytes(whole[:cut])
        kept = repair(cut_file)
        state = read_state(cut_file)
        n = _samples(cut_file)
        if state is None:  # not even the header's state box: the header alone, or nothing
            assert n == 0 and kept < 800, cut
            continue
        tok = state["tracks"][0]["tok"]
        assert (tok[1] + 1 if tok else 0) == n == state["tracks"][0]["frames"], cut
        if n and n not in seen:
            assert _decode_errors(cut_file) == "" and ffprobe_frames(cut_file) == n, cut
        seen.add(n)
    assert len(seen) >= 5, seen  # cuts inside several fragments were tried


def test_an_appending_writer_continues_the_file_it_resumes(tmp_path):
    """A writer made from a killed file's state appends to it: one file, every frame once,
    timestamps continuing at the frame rate, fragments numbered on, clean decode, and the
    pictures those of an unbroken recording."""
    aus = _aus(120)
    path, ref = tmp_path / "r.mp4", tmp_path / "ref.mp4"
    with Mp4Writer(ref, fsync=False) as w:
        t = w.add_video_copy("h264", 160, 120)
        for i, (au, key) in enumerate(aus):
            w.write_packet(t, au, 100_000 + i * 3000, keyframe=key)
    w = Mp4Writer(path, fragment_seconds=0.3, fsync=False, state=lambda: {"t0": 5})
    t = w.add_video_copy("h264", 160, 120)
    for i, (au, key) in enumerate(aus[:50]):
        w.write_packet(t, au, 100_000 + i * 3000, keyframe=key, token=[1, i])
    os.close(w._fd)  # noqa: SLF001 - killed: what was not in a fragment on disk is gone
    repair(path)
    st = read_state(path)
    nxt = st["tracks"][0]["tok"][1] + 1
    assert nxt < 50 and aus[nxt][1] is False  # it resumes in the middle of a GOP
    w = Mp4Writer(path, fragment_seconds=0.3, fsync=False, resume=st)
    assert w.resumed
    t = w.add_video_copy("h264", 160, 120)
    for i in range(nxt, 120):
        w.write_packet(t, aus[i][0], 100_000 + i * 3000, keyframe=aus[i][1], token=[1, i])
    w.close()
    assert ffprobe_frames(path) == 120 and _decode_errors(path) == ""
    pts = _packet_pts(path)
    assert pts == [i * 3000 for i in range(120)], pts
    data = path.read_bytes()
    assert data.count(b"ftyp") == 1 and data.count(b"moov") == 1
    seqs = [int.from_bytes(data[i + 12:i + 16], "big") for i in range(len(data)) if data[i + 4:i + 8] == b"mfhd"]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    md5 = ["ffmpeg", "-v", "error", "-i", "X", "-f", "framemd5", "-"]
    frames = [subprocess.run([*md5[:4], str(p), *md5[5:]], capture_output=True, text=True).stdout.splitlines()[-120:]
              for p in (path, ref)]
    assert [f.split(",")[-1] for f in frames[0]] == [f.split(",")[-1] for f in frames[1]]
    assert read_state(path)["tracks"][0]["tok"] == [1, 119]


def test_an_appended_video_track_keeps_its_times_where_the_audio_starts_earlier(tmp_path):
    """The appending writer's audio starts AUDIO_PREROLL frames before the file's end, and a
    video that comes back after a hole (its producer restarted) starts at its next keyframe,
    later still: FFmpeg, shifting a file to start at 0 without edit lists, would give that
    first video sample the difference as its duration, and every sample after it in the
    fragment would play that much late (the next fragment's tfdt then jumping back:
    'non monotonically increasing dts'). Appended, the video keeps the times it was given."""
    aus = _aus(120)
    rate = 48000
    path = tmp_path / "av.mp4"

    def audio(w, t, frm, to):
        for s in range(frm, to, 960):
            w.write_audio(t, np.full((960, 1), 100, np.int16), s)

    w = Mp4Writer(path, fragment_seconds=0.3, fsync=False, state=lambda: {"t0": 5})
    v, a = w.add_video_copy("h264", 160, 120), w.add_audio(rate, 1)
    for i in range(59):
        w.write_packet(v, aus[i][0], i * 3000, keyframe=aus[i][1], token=[1, i])
        audio(w, a, i * 1600, (i + 1) * 1600)
    os.close(w._fd)  # noqa: SLF001 - killed
    repair(path)
    st = read_state(path)
    nxt = st["tracks"][0]["tok"][1] + 1
    assert 40 < nxt < 60 and aus[60][1], nxt  # a hole of a few pictures, then a keyframe
    w = Mp4Writer(path, fragment_seconds=0.8, fsync=False, resume=st)  # (longer than the hole: one fragment)
    v, a = w.add_video_copy("h264", 160, 120), w.add_audio(rate, 1)
    audio(w, a, a.next_input, 60 * 1600)
    for i in range(60, 120):
        w.write_packet(v, aus[i][0], i * 3000, keyframe=aus[i][1], token=[1, i])
        audio(w, a, i * 1600, (i + 1) * 1600)
    w.close()
    assert _decode_errors(path) == ""
    pts = _packet_pts(path)
    shift = pts[1] - 3000  # the file's own start (AAC's priming): its first picture is held from 0
    assert pts[1:] == [i * 3000 + shift for i in [*range(1, nxt), *range(60, 120)]], pts


def test_appended_audio_continues_on_the_frame_grid_without_a_click(tmp_path):
    """An AAC track resumed two frames before the file's end (those samples again, from the
    bus's history): the decoded result matches an unbroken encode to within the codec's own
    noise at the splice, with every packet on the 1024-sample grid."""
    rate, n = 48000, 960
    sig = (np.sin(2 * np.pi * 440 * np.arange(rate * 5) / rate) * 8000).astype(np.int16)
    chunks = [sig[i:i + n] for i in range(0, len(sig), n)]
    ref, path = tmp_path / "ref.mp4", tmp_path / "a.mp4"
    for p, upto in ((ref, len(chunks)), (path, 150)):
        w = Mp4Writer(p, fragment_seconds=0.5, fsync=False)
        t = w.add_audio(rate, 1)
        for i, c in enumerate(chunks[:upto]):
            w.write_audio(t, c.reshape(-1, 1), i * n)
        if p == ref:
            w.close()
    os.close(w._fd)  # noqa: SLF001
    repair(path)
    st = read_state(path)
    end = st["tracks"][0]["end"]
    assert end % 1024 == 0 and end < 150 * n
    w = Mp4Writer(path, fragment_seconds=0.5, fsync=False, resume=st)
    t = w.add_audio(rate, 1)
    assert t.next_input == end - 2 * 1024
    for i, c in enumerate(chunks):
        if (i + 1) * n > t.next_input:
            w.write_audio(t, c.reshape(-1, 1), i * n)
    w.close()
    assert _decode_errors(path) == ""
    assert _packet_pts(path) == _packet_pts(ref)

    def pcm(p):
        return np.frombuffer(subprocess.run(["ffmpeg", "-v", "error", "-i", str(p), "-f", "s16le", "-"],
                                            capture_output=True, check=True).stdout, np.int16).astype(int)
    a, b = pcm(ref), pcm(path)
    assert len(a) == len(b)
    splice = end + 1024  # in the decoded output (after the priming)
    noise = np.abs(a - b)[splice + 4096: len(a) - 4096].max()  # two encoders' rounding apart, away from it
    assert np.abs(a - b)[splice - 4096: splice + 4096].max() <= max(2 * noise, 600), noise


# ------------------------------------------------------------------ StreamRecorder across restarts
class _Item:
    """What a framebus consumer hands the recorder, for an encoded access unit."""

    kind, codec = "encoded", "h264"
    width = height = 0  # not said: the recorder reads the size from the SPS

    def __init__(self, au: bytes, key: bool, gen: int, seq: int, cap: int) -> None:
        self.array = np.frombuffer(au, np.uint8)
        self.keyframe, self.generation, self.seq, self.capture_ns = key, gen, seq, cap
        self.pts, self.time_base = cap, Fraction(1, 1_000_000_000)

    def valid(self) -> bool:
        return True


class _Events(list):
    def __call__(self, topic: str, data: dict) -> None:
        self.append((topic, data))

    def of(self, topic: str) -> list[dict]:
        return [d for t, d in self] if topic == "*" else [d for t, d in self if t == topic]


def _stream(aus, gen: int = 1, start: int = 0, t0: int = 10**12) -> list[_Item]:
    """Items of one capture process: 30 fps, sequence numbers from `start`."""
    return [_Item(au, key, gen, start + i, t0 + (start + i) * 33_333_333) for i, (au, key) in enumerate(aus)]


def _recorder(root, events):
    from services.recorder.stream import Settings, StreamRecorder
    return StreamRecorder("cam", root, Settings(fragment_seconds=0.2, fsync=False), events)


def _kill(rec) -> None:
    """As a SIGKILL leaves it: whatever is not in a fragment on disk is gone."""
    os.close(rec.writer._fd)  # noqa: SLF001


def _restart(root, events):
    """A new recorder that takes up where the file ends, as the service does at start."""
    cut = segments.newest_partial(root, "cam")
    got = segments.recover(root, keep={cut} if cut else set())
    assert got.continued == ([cut] if cut else [])
    rec = _recorder(root, events)
    doc, _ = segments.last_state(root, "cam")
    rec.resume(doc, cut)
    return rec


def _frames(path) -> int:
    return ffprobe_frames(path)


def test_a_killed_stream_recorder_resumes_in_the_same_file_mid_gop(tmp_path):
    aus = _aus(150)
    items = _stream(aus)
    ev = _Events()
    rec = _recorder(tmp_path, ev)
    for it in items[:70]:
        rec.feed(it)
    _kill(rec)
    rec = _restart(tmp_path, ev)
    for it in items:  # the ring's history: from its oldest item on
        rec.feed(it)
    rec.stop()
    files = sorted((tmp_path / "cam").glob("*.mp4"))
    assert len(files) == 1 and not list((tmp_path / "cam").glob("*.partial"))
    assert _frames(files[0]) == 150 and _decode_errors(files[0]) == ""
    assert _packet_pts(files[0]) == [i * 33_333_333 * 9 // 100_000 for i in range(150)]
    assert [d["appended"] for d in ev.of("record.resumed")] == [True] and not ev.of("record.gap")


def test_a_clean_stop_resumes_in_a_new_segment_from_the_keyframe_before(tmp_path):
    """After a clean stop the file is finished: the next run starts a new segment, and since
    that must begin at a keyframe, it repeats the GOP head before the next item: nothing lost."""
    aus = _aus(150)  # keyframes every 30
    items = _stream(aus)
    ev = _Events()
    rec = _recorder(tmp_path, ev)
    for it in items[:70]:
        rec.feed(it)
    rec.stop(final=False)  # the service shutting down
    first = sorted((tmp_path / "cam").glob("*.mp4"))
    held = _frames(first[0])
    rec = _restart(tmp_path, ev)
    for it in items:
        rec.feed(it)
    rec.stop()
    files = sorted((tmp_path / "cam").glob("*.mp4"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2 and files[0] == first[0]
    second = _frames(files[1])
    assert held + second == 150 + (held - 60), "the second repeats the first's last GOP head (from 60), no more"
    assert _decode_errors(files[1]) == ""


def test_overrun_and_source_gaps_are_reported_with_their_length_and_the_segment_goes_on(tmp_path):
    aus = _aus(300)
    ev = _Events()
    rec = _recorder(tmp_path, ev)
    run1 = _stream(aus[:150])
    for it in run1[:60]:
        rec.feed(it)
    _kill(rec)
    last = read_state(segments.newest_partial(tmp_path, "cam"))["tracks"][0]["tok"]
    rec = _restart(tmp_path, ev)
    for it in run1[100:]:  # the ring lost the items up to 99: an overrun; 120 is the next keyframe
        rec.feed(it)
    gap = ev.of("record.gap")
    assert [g["reason"] for g in gap] == ["overrun"]
    assert gap[0]["seconds"] == round((run1[120].capture_ns - last[2] - 33_333_333) / 1e9, 3)
    # the capture process restarts: a new generation, 2 s later, the same stream shape
    run2 = _stream(aus[:60], gen=2, t0=run1[-1].capture_ns + 2 * 10**9)
    for it in run2:
        rec.feed(it)
    rec.stop()
    gap = ev.of("record.gap")
    assert [g["reason"] for g in gap] == ["overrun", "source"]
    assert gap[1]["seconds"] == round((run2[0].capture_ns - run1[-1].capture_ns - 33_333_333) / 1e9, 3)
    files = list((tmp_path / "cam").glob("*.mp4"))
    assert len(files) == 1 and _decode_errors(files[0]) == ""
    assert _frames(files[0]) == (last[1] + 1) + 30 + 60
    pts = _packet_pts(files[0])
    holes = [round((b - a) / 90000, 3) for a, b in zip(pts, pts[1:]) if b - a > 3100]
    assert holes == [round(gap[0]["seconds"] + 1 / 30, 3), round(gap[1]["seconds"] + 1 / 30, 3)], holes


def test_a_restart_with_another_shape_or_of_another_boot_starts_a_new_segment(tmp_path):
    aus = _aus(90)
    ev = _Events()
    rec = _recorder(tmp_path, ev)
    for it in _stream(aus)[:50]:
        rec.feed(it)
    _kill(rec)
    cut = segments.newest_partial(tmp_path, "cam")
    doc = read_state(cut)
    rec = _restart(tmp_path, ev)
    bigger = _stream([(au, key) for au, key in _aus_sized(60, 320, 240)], gen=2, t0=10**13)
    for it in bigger:
        rec.feed(it)
    rec.stop()
    files = sorted((tmp_path / "cam").glob("*.mp4"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2 and files[0].name == cut.name.removesuffix(".partial")
    assert _frames(files[1]) == 60
    closed = ev.of("record.segment")[0]  # the cut file, finished as it was: its extent from its state
    assert closed["path"] == str(files[0]) and closed["frames"] == _frames(files[0])
    assert abs(closed["duration"] - closed["frames"] / 30) < 0.05, closed
    # a state from another boot says nothing about this boot's rings
    doc["boot"] = "another"
    rec = _recorder(tmp_path, ev)
    rec.resume(doc, None)
    assert rec.resume_at is None


def _aus_sized(n: int, w: int, h: int) -> list[tuple[bytes, bool]]:
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = w, h, "yuv420p", Fraction(1, 30)
    enc.options, enc.gop_size = {"tune": "zerolatency", "x264-params": "repeat-headers=1:scenecut=0"}, 30
    out = []
    for i in range(n):
        f = av.VideoFrame.from_ndarray(np.full((h, w, 3), i % 256, np.uint8), format="rgb24").reformat(format="yuv420p")
        f.pts = i
        out += [(bytes(p), p.is_keyframe) for p in enc.encode(f)]
    return out


# ------------------------------------------------------------------ WAV, VP8 and B-frames across restarts
class _Chunk:
    kind = "audio"

    def __init__(self, pcm: np.ndarray, gen: int, seq: int, cap: int) -> None:
        self.array, self.rate, self.channels = pcm.reshape(-1, 1), 48000, 1
        self.generation, self.seq, self.capture_ns = gen, seq, cap

    def valid(self) -> bool:
        return True


def _tone_chunks(seconds: int = 6, n: int = 960) -> list[_Chunk]:
    """20 ms chunks of a 440 Hz tone, as capture puts them on the bus."""
    rate = 48000
    sig = (np.sin(2 * np.pi * 440 * np.arange(rate * seconds) / rate) * 8000).astype(np.int16)
    return [_Chunk(sig[i:i + n], 1, k, 10**12 + i * 10**9 // rate) for k, i in enumerate(range(0, len(sig), n))]


def _wav_pcm(path) -> np.ndarray:
    import wave
    with wave.open(str(path)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), np.int16)


def test_a_killed_wav_recording_resumes_in_the_same_file_sample_for_sample(tmp_path):
    """NAME-audio: 20 ms chunks, a kill, a restart fed from the ring's history: one WAV, the
    same samples as an unbroken recording's, none twice, none missing."""
    chunks = _tone_chunks()
    ev = _Events()
    ref = _recorder(tmp_path / "ref", ev)
    for c in chunks:
        ref.feed(c)
    ref.stop()
    (want,) = (tmp_path / "ref" / "cam").glob("*.wav")
    root = tmp_path / "r"
    rec = _recorder(root, ev)
    for c in chunks[:170]:
        rec.feed(c)
    _kill(rec)  # the chunks queued since the last flush are gone, the ring still has them
    rec = _restart(root, ev)
    for c in chunks:  # the ring's history, from its oldest chunk on
        rec.feed(c)
    rec.stop()
    files = list((root / "cam").glob("*.wav"))
    assert len(files) == 1 and not list((root / "cam").glob("*.partial")) and _decode_errors(files[0]) == ""
    assert np.array_equal(_wav_pcm(files[0]), _wav_pcm(want))
    assert [d["appended"] for d in ev.of("record.resumed")] == [True] and not ev.of("record.gap")
    seg = ev.of("record.segment")[-1]
    assert seg["path"] == str(files[0]) and seg["start_ns"] == chunks[0].capture_ns


def test_a_cut_wav_whose_audio_does_not_come_back_is_finished_not_left_partial(tmp_path):
    """The restarted recorder keeps the cut file to continue it; when its audio has not come
    back within segment_seconds of the file's end it is finished as it is."""
    from services.recorder.stream import Settings, StreamRecorder
    chunks = _tone_chunks(2)
    ev = _Events()
    rec = _recorder(tmp_path, ev)
    for c in chunks[:60]:
        rec.feed(c)
    _kill(rec)
    cut = segments.newest_partial(tmp_path, "cam")
    segments.recover(tmp_path, keep={cut})
    rec = StreamRecorder("cam", tmp_path, Settings(segment_seconds=30, fragment_seconds=0.2, fsync=False), ev)
    doc, _ = segments.last_state(tmp_path, "cam")
    rec.resume(doc, cut)
    end = doc["tracks"][0]["tok"][2]
    rec.expire(end + 29 * 10**9)
    assert cut.exists() and not ev.of("record.segment"), "still waiting for its audio"
    rec.expire(end + 31 * 10**9)
    done = cut.with_name(cut.name.removesuffix(".partial"))
    assert not cut.exists() and done.exists() and _decode_errors(done) == ""
    seg = ev.of("record.segment")[0]
    assert seg["path"] == str(done) and seg["frames"] == doc["tracks"][0]["frames"]
    assert abs(seg["duration"] - len(_wav_pcm(done)) / 48000) < 1e-3


def test_a_killed_vp8_recording_resumes_mid_gop_without_waiting_for_a_keyframe(tmp_path):
    """VP8 is decoded and encoded: a restart cannot append to the encoder's file, so the next
    picture begins a new segment; its decoder is first given the GOP up to the resume point,
    so that picture is the one after the file's last, not the next keyframe's."""
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = 160, 96, "yuv420p", Fraction(1, 30)
    enc.gop_size, enc.options = 30, {"deadline": "realtime", "lag-in-frames": "0"}
    aus = []
    for i in range(120):
        f = av.VideoFrame.from_ndarray(np.full((96, 160, 3), i * 2 % 256, np.uint8), format="rgb24").reformat(
            format="yuv420p")
        f.pts = i
        aus += [(bytes(p), p.is_keyframe) for p in enc.encode(f)]
    assert len(aus) == 120 and [i for i, (_, k) in enumerate(aus) if k] == [0, 30, 60, 90]
    items = _stream(aus)
    for it in items:
        it.codec = "vp8"
    ev = _Events()
    rec = _recorder(tmp_path, ev)
    for it in items[:62]:
        rec.feed(it)
    _kill(rec)
    after = read_state(segments.newest_partial(tmp_path, "cam"))["tracks"][0]["tok"][1] + 1
    assert after % 30 and after < 60, f"the resume point ({after}) is mid-GOP"
    rec = _restart(tmp_path, ev)
    for it in items:
        rec.feed(it)
    rec.stop()
    files = sorted((tmp_path / "cam").glob("*.mp4"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2 and all(_decode_errors(f) == "" for f in files)
    first, second = (_frames(f) for f in files)
    assert (first, second) == (after, 120 - after)
    assert rec.dropped.get("waiting_keyframe", 0) == 0


def _bframe_stream(n: int, gen: int = 1, t0: int = 10**12) -> list[_Item]:
    """n H.264 access units with B-frames (x264 -bf 2), as capture puts them on the bus: in
    decode order, capture times 33 ms apart, the encoder's pts (1/30 s)."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = 160, 120, "yuv420p", Fraction(1, 30)
    enc.gop_size, enc.max_b_frames = 30, 2
    enc.options = {"preset": "veryfast", "x264-params": "repeat-headers=1:scenecut=0:b-adapt=0:bframes=2"}
    packets = []
    for i in range(n):
        f = av.VideoFrame.from_ndarray(np.full((120, 160, 3), i * 2 % 256, np.uint8), format="rgb24").reformat(
            format="yuv420p")
        f.pts = i
        packets += list(enc.encode(f))
    packets += list(enc.encode(None))
    items = []
    for seq, p in enumerate(packets):
        it = _Item(bytes(p), p.is_keyframe, gen, seq, t0 + seq * 33_333_333)
        it.pts, it.time_base = p.pts, Fraction(1, 30)
        items.append(it)
    assert any(b.pts < a.pts for a, b in zip(items, items[1:])), "the stream reorders"
    return items


def _frame_pts(path) -> list[int]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts", "-of",
                          "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout.split()
    return [int(x.split(",")[0]) for x in out]


def test_b_frames_resume_through_the_window_and_go_on_after_a_producer_restart(tmp_path):
    """The 8 access units the B-frame window holds are not in the file when the recorder dies;
    the resume state names the last one that is, so the restart takes them from the ring: one
    file, the same packets and timestamps as an unbroken recording. A capture restart (its
    pts start at 0 again) then goes on in the same file: presentation times strictly
    increasing across the gap, which is as long as it was."""
    run1 = _bframe_stream(150)
    ev = _Events()
    ref = _recorder(tmp_path / "ref", ev)
    for it in run1:
        ref.feed(it)
    ref.stop()
    (want,) = (tmp_path / "ref" / "cam").glob("*.mp4")
    root = tmp_path / "r"
    rec = _recorder(root, ev)
    for it in run1[:70]:
        rec.feed(it)
    held = len(rec.held)
    _kill(rec)
    state = read_state(segments.newest_partial(root, "cam"))
    assert held == 8 and state["tracks"][0]["tok"][1] < 70 - held, "the held units are not in the file"
    rec = _restart(root, ev)
    for it in run1:
        rec.feed(it)
    files = list((root / "cam").glob("*.mp4*"))
    assert len(files) == 1
    run2 = _bframe_stream(60, gen=2, t0=run1[-1].capture_ns + 2 * 10**9)
    for it in run2:
        rec.feed(it)
    rec.stop()
    (got,) = (root / "cam").glob("*.mp4")
    assert _decode_errors(got) == "" and _frames(got) == 210
    pts, ref_pts = _packet_pts(got), _packet_pts(want)
    assert pts[:150] == ref_pts, "the same timestamps as an unbroken recording"
    shown = _frame_pts(got)
    assert all(b > a for a, b in zip(shown, shown[1:])), "presentation times strictly increasing"
    gaps = ev.of("record.gap")
    assert [g["reason"] for g in gaps] == ["source"]
    assert gaps[0]["seconds"] == round((run2[0].capture_ns - run1[-1].capture_ns - 33_333_333) / 1e9, 3)
    hole = (min(pts[150:]) - max(pts[:150])) / 90000
    assert abs(hole - (run2[0].capture_ns - run1[-1].capture_ns) / 1e9) < 0.2, hole
