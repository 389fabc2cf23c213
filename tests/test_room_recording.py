"""Room recording (services/recorder/room.py): real libx264, real AAC, the files read back by FFmpeg.

The sync source: video that is white for the one frame at each whole second of its clock
and audio that starts a 1 kHz beep at the same instant, fed with simulated capture times
(jitter on every stamp, a sound card 100 ppm fast, lost audio chunks, the two tracks
starting at different times) as fast as the recorder takes them.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from services.capture.sources.synthetic import H264Encoder, Pattern
from services.recorder.room import RoomConfig, RoomInputError, RoomRecorder
from services.recorder.roomfeed import RoomFeed

NS = 1_000_000_000
RATE = 48000
CHUNK = 960
W, H, FPS = 160, 120, 10
BASE = 1_000 * NS            # the capture clock at the source's second 0 (CLOCK_MONOTONIC-like)


# ------------------------------------------------------------------ the source
class SyncSource:
    """Items (arrival_ns, kind, capture_ns, payload, keyframe) of a flash+beep source, in arrival order."""

    def __init__(self, seconds: float, *, video_start_s=0.37, audio_start_s=0.013, ppm=100.0, jitter_ms=2.0,
                 lost_chunks=(), seed=1, gop_s=2.0) -> None:
        self.seconds, self.ppm, self.jitter = seconds, ppm, int(jitter_ms * 1e6)
        self.video_start, self.audio_start = int(video_start_s * NS), int(audio_start_s * NS)
        self.lost = set(lost_chunks)
        self.rng = np.random.default_rng(seed)
        self.pattern = Pattern(W, H)
        self.encoder = H264Encoder(W, H, FPS, gop_s, 0)

    def _jitter(self) -> int:
        return int(self.rng.integers(-self.jitter, self.jitter + 1))

    def video(self):
        n = round(self.video_start * FPS / NS)
        while n * NS // FPS < self.seconds * NS:
            true_ns = n * NS // FPS
            frame, (y, u, v) = self.encoder.frame()
            self.pattern.draw_yuv(y, u, v, n, flash=true_ns % NS == 0)
            for packet in self.encoder.encode(frame, n):
                capture = BASE + true_ns + self._jitter()
                yield capture + 15_000_000, "video", capture, bytes(packet), packet.is_keyframe
            n += 1

    def audio(self):
        rate = RATE * (1 + self.ppm * 1e-6)     # the card's real rate, in capture-clock samples per second
        first = round(self.audio_start * rate / NS)
        k = 0
        idx = np.arange(CHUNK)
        while True:
            s0 = first + k * CHUNK
            t = (s0 + idx) / rate                       # the true time of each sample, in seconds
            if t[0] >= self.seconds:
                return
            if k not in self.lost:
                beep = (t % 1.0) < 0.1
                pcm = (np.sin(2 * np.pi * 1000 * t) * 16000 * beep).astype(np.int16)
                capture = BASE + int(t[0] * NS) + self._jitter()
                yield capture + 25_000_000, "audio", capture, pcm, True
            k += 1

    def items(self):
        import heapq
        return heapq.merge(self.video(), self.audio(), key=lambda it: it[0])


def record(path, source: SyncSource, config: RoomConfig | None = None, *, poll_every_ms=100) -> RoomRecorder:
    rec = RoomRecorder(str(path), config or RoomConfig(fsync=False))
    rec.declare("cam", "video", {"width": W, "height": H})
    rec.declare("mic", "audio")
    next_poll = 0
    for arrival, kind, capture, payload, key in source.items():
        if arrival >= next_poll:
            rec.poll(arrival)
            next_poll = arrival + poll_every_ms * 1_000_000
        if kind == "video":
            rec.push_video("cam", payload, capture, key)
        else:
            rec.push_audio("mic", payload, capture)
    rec.close()
    return rec


# ------------------------------------------------------------------ reading back
def ffprobe_streams(path) -> list[dict]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                          "stream=index,codec_type,codec_name,start_time,duration,nb_frames,width,height",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"]


def flash_times(path) -> np.ndarray:
    """Presentation times (s) of white frames, by FFmpeg: the signalstats filter's mean luma per frame."""
    out = subprocess.run(["ffprobe", "-v", "error", "-f", "lavfi", "-i", f"movie={path},signalstats",
                          "-show_entries", "frame=pts_time:frame_tags=lavfi.signalstats.YAVG", "-of", "csv=p=0"],
                         capture_output=True, text=True, check=True)
    rows = [line.split(",") for line in out.stdout.split()]
    return np.array([float(t) for t, yavg in rows if float(yavg) > 200])


def audio_track(path) -> tuple[float, np.ndarray]:
    """The audio as FFmpeg plays it: (time of the first sample, mono s16 samples), by the ffmpeg CLI."""
    start = float(subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                                  "frame=pts_time", "-read_intervals", "%+#1", "-of", "csv=p=0", str(path)],
                                 capture_output=True, text=True, check=True).stdout.split()[0])
    pcm = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-f", "s16le", "-"],
                         capture_output=True, check=True).stdout
    return start, np.frombuffer(pcm, np.int16)


def beep_onsets(start: float, pcm: np.ndarray) -> np.ndarray:
    """Times (s) where the beep starts: the first loud sample after at least 0.5 s of quiet."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 8000)
    if not len(loud):
        return np.array([])
    first = loud[np.concatenate(([True], np.diff(loud) > RATE // 2))]
    return start + first / RATE


def offsets(flashes: np.ndarray, beeps: np.ndarray, around: float, span: float = 3.0) -> list[float]:
    """beep - flash (s) for each flash within [around, around + span)."""
    out = []
    for f in flashes[(flashes >= around) & (flashes < around + span)]:
        out.append(float(beeps[np.argmin(np.abs(beeps - f))] - f))
    return out


# ------------------------------------------------------------------ tests
def test_av_sync_at_start_and_after_ten_minutes(tmp_path):
    path = tmp_path / "room.mp4"
    source = SyncSource(602, lost_chunks=(600, 9001, 9002, 20000, 29000))
    rec = record(path, source)
    streams = ffprobe_streams(path)
    assert [s["codec_name"] for s in streams] == ["h264", "aac"]
    flashes = flash_times(path)
    start, pcm = audio_track(path)
    beeps = beep_onsets(start, pcm)
    first, last = offsets(flashes, beeps, 0.0), offsets(flashes, beeps, 597.0)
    print(f"A/V offset (beep - flash) at start: {[round(x * 1000, 1) for x in first]} ms; "
          f"after 10 min: {[round(x * 1000, 1) for x in last]} ms; audio starts at {start:.4f} s; "
          f"{len(flashes)} flashes, {len(beeps)} beeps; counters {rec.counters()}")
    assert len(first) >= 2 and len(last) >= 2
    assert max(abs(x) for x in first + last) < 0.040          # the promise
    # what placement gives (the flash frames' stamps carry +-2 ms of jitter; deterministic, seeded):
    # catches a systematic shift well inside the promise, e.g. audio written 20 ms off
    assert max(abs(x) for x in first + last) < 0.008
    # every second has its flash and its beep, the lost chunks did not shift a thing
    assert len(flashes) == 601 and len(beeps) >= 600
    c = rec.counters()
    assert c["silence_ms"] >= 5 * 20 - 10       # the lost chunks became silence (plus the start)
    assert c["slips"] >= 10                     # the 100 ppm card was pulled back to the capture clock


def ffprobe_packets(path, stream: str) -> list[tuple[int, bool]]:
    """(pts, keyframe) of every packet of one stream, as FFmpeg's demuxer reads them."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", stream, "-show_entries", "packet=pts,flags",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True)
    return [(int(p), "K" in f) for p, f in (line.split(",") for line in out.stdout.split())]


def encoded_frames(seconds: float, fps: int = FPS, gop_s: float = 1.0):
    """(capture offset ns, Annex B bytes, keyframe) of a real libx264 stream."""
    enc = H264Encoder(W, H, fps, gop_s, 0)
    pattern = Pattern(W, H)
    for n in range(round(seconds * fps)):
        frame, (y, u, v) = enc.frame()
        pattern.draw_yuv(y, u, v, n)
        for p in enc.encode(frame, n):
            yield n * NS // fps, bytes(p), p.is_keyframe


def test_a_declared_track_that_never_sends_does_not_hold_the_recording(tmp_path):
    path = tmp_path / "room.mp4"
    rec = RoomRecorder(str(path), RoomConfig(wait_s=2.0, fsync=False))
    rec.declare("cam", "video", {"width": W, "height": H})
    rec.declare("ghost", "video", {})          # negotiated, never sends, too little known to join later
    rec.declare("mic", "audio")
    tone = np.zeros(CHUNK, np.int16)
    started_at = None
    for offset, au, key in encoded_frames(6.0):
        now = BASE + offset
        rec.push_video("cam", au, now, key)
        for k in range(5):                      # 100 ms of audio per frame
            rec.push_audio("mic", tone, now + k * 20_000_000)
        rec.poll(now + 100_000_000)
        if started_at is None and rec.started:
            started_at = offset
    rec.push_video("ghost", b"\x00\x00\x00\x01\x65\x88", BASE + 7 * NS, True)   # too late: not in the file
    rec.close()
    assert started_at is not None and 1.8 * NS <= started_at <= 2.2 * NS       # the bounded wait, not forever
    assert rec.missing == ["ghost"]
    assert rec.stats.dropped["missing"] == 1
    streams = ffprobe_streams(path)
    assert [s["codec_type"] for s in streams] == ["video", "audio"]
    video = ffprobe_packets(path, "v:0")
    assert len(video) == 60                     # everything from the first second too: buffered, not lost
    assert abs(float(streams[1]["duration"]) - 6.1) < 0.1


def test_audio_sessions_join_late_and_are_mixed_in_place(tmp_path):
    """Two microphones: one from the start, one that was silent for 3 s; both beeps land at their capture time."""
    path = tmp_path / "room.mp4"
    rec = RoomRecorder(str(path), RoomConfig(wait_s=1.0, fsync=False))
    rec.declare("a", "audio")
    rec.declare("b", "audio")
    idx = np.arange(CHUNK)
    beep = (np.sin(2 * np.pi * 1000 * idx / RATE) * 12000).astype(np.int16)
    quiet = np.zeros(CHUNK, np.int16)
    for k in range(300):                        # 6 s
        t = BASE + k * 20_000_000
        rec.push_audio("a", beep if k == 50 else quiet, t)          # a beeps at 1.00 s
        if k >= 150:
            rec.push_audio("b", beep if k == 200 else quiet, t)     # b joins at 3.0 s, beeps at 4.00 s
        rec.poll(t)
    rec.close()
    start, pcm = audio_track(path)
    onsets = beep_onsets(start, pcm) - start - 1024 / RATE      # minus the AAC priming FFmpeg decodes first
    assert len(onsets) == 2
    assert abs(onsets[0] - 1.0) < 0.002 and abs(onsets[1] - 4.0) < 0.002
    assert rec.stats.silence_samples < 1024      # a covered every sample: only the last AAC frame's padding


def test_buffers_stay_bounded_when_a_track_floods(tmp_path):
    cfg = RoomConfig(wait_s=2.0, buffer_items=100, buffer_bytes=256 << 10, buffer_seconds=1.0, fsync=False)
    rec = RoomRecorder(str(tmp_path / "room.mp4"), cfg)
    rec.declare("cam", "video", {"width": W, "height": H})
    rec.declare("mic", "audio")                 # stalls: never sends, while cam floods before the start
    frames = list(encoded_frames(2.0, fps=25, gop_s=0.4))
    pushed = 0
    for _ in range(20):                         # the same 2 s of video again and again, 1 ms apart
        for _, au, key in frames:
            rec.push_video("cam", au, BASE + pushed * 1_000_000, key)
            pushed += 1
            track = rec.tracks["cam"]
            assert len(track.items) <= 100 and track.bytes <= 256 << 10
            assert track.items[-1][0] - track.items[0][0] <= NS
    assert not rec.started
    kept = len(rec.tracks["cam"].items)
    assert rec.stats.dropped["overflow"] == pushed - kept > 0
    # audio floods after the start (mic chunks 10 s ahead of the clock are refused as "future")
    rec.poll(BASE + pushed * 1_000_000 + 3 * NS)
    assert rec.started
    pcm = np.zeros(CHUNK, np.int16)
    now = BASE + pushed * 1_000_000 + 3 * NS
    for k in range(5000):
        rec.push_audio("mic", pcm, now + 10 * NS + k * 20_000_000)
    assert rec.stats.dropped["future"] == 5000
    for k in range(5000):                       # 100 s of audio in the reorder window at once
        rec.push_audio("mic", pcm, now - NS + k * 20_000_000)
        assert len(rec.tracks["mic"].items) <= 100
    rec.poll(now + 4 * NS)
    rec.close()
    assert rec.counters()["buffered_bytes"] == 0
    assert rec.stats.dropped["overflow"] > pushed - kept


def test_video_pts_strictly_increase_with_repeated_and_backwards_times(tmp_path):
    path = tmp_path / "room.mp4"
    rec = RoomRecorder(str(path), RoomConfig(wait_s=0.5, reorder_ms=0, fsync=False))
    rec.declare("cam", "video", {"width": W, "height": H})
    # capture times (ms): repeats, a step back, a step back across a poll
    times_ms = [0, 40, 40, 40, 30, 120, 160, 150, 150, 240, 280, 281, 100, 400, 440, 480, 520, 560, 600, 640]
    frames = list(encoded_frames(len(times_ms) / FPS))
    assert len(frames) == len(times_ms)
    for (_, au, key), ms in zip(frames, times_ms):
        rec.push_video("cam", au, BASE + ms * 1_000_000, key)
        rec.poll(BASE + ms * 1_000_000)
    rec.close()
    packets = ffprobe_packets(path, "v:0")
    pts = [p for p, _ in packets]
    assert len(pts) == len(times_ms)
    assert all(b > a for a, b in zip(pts, pts[1:])), pts
    assert rec.stats.pts_fixed >= 5


def test_raw_and_encoded_sessions_each_get_their_own_track(tmp_path):
    """Layout: one video track per session; H.264 is remuxed (same frame count and keyframes), raw is encoded."""
    path = tmp_path / "room.mp4"
    rec = RoomRecorder(str(path), RoomConfig(fsync=False))
    rec.declare("cam", "video", {"width": W, "height": H})
    rec.declare("screen", "picture", {"width": 64, "height": 48, "fmt": "rgb24"})
    rec.declare("mic", "audio")
    frames = list(encoded_frames(3.0))
    picture = np.zeros((48, 64, 3), np.uint8)
    for offset, au, key in frames:
        t = BASE + offset
        rec.push_video("cam", au, t, key)
        picture[:] = (offset // 10_000_000) % 255
        rec.push_picture("screen", picture, "rgb24", 64, 48, t + 3_000_000)
        for k in range(5):
            rec.push_audio("mic", np.zeros(CHUNK, np.int16), t + k * 20_000_000)
        rec.poll(t)
    rec.close()
    streams = ffprobe_streams(path)
    assert [(s["codec_type"], s.get("width")) for s in streams] == [("video", W), ("video", 64), ("audio", None)]
    cam = ffprobe_packets(path, "v:0")
    assert len(cam) == len(frames)
    assert [k for _, k in cam] == [key for _, _, key in frames]    # the camera's own keyframes: no re-encode
    screen = ffprobe_packets(path, "v:1")   # its first picture comes 3 ms after t0: held from 0 (below)
    assert len(screen) == len(frames) + 1 and screen[0] == (0, True) and rec.stats.held_start == 1
    assert rec.stats.frames == {"cam": len(frames), "screen": len(frames)}


def test_bad_items_are_refused_with_their_reason(tmp_path):
    rec = RoomRecorder(str(tmp_path / "room.mp4"), RoomConfig(fsync=False))
    rec.declare("mic", "audio")
    with pytest.raises(RoomInputError, match="no track 'cam' was declared") as exc:
        rec.push_video("cam", b"x", BASE, True)
    assert exc.value.reason == "unknown_track"
    with pytest.raises(RoomInputError, match="int16") as exc:
        rec.push_audio("mic", np.zeros(960, np.float32), BASE)
    with pytest.raises(RoomInputError, match="44100 Hz"):
        rec.push_audio("mic", np.zeros(960, np.int16), BASE, rate=44100)
    with pytest.raises(ValueError, match="kind must be one of"):
        rec.declare("x", "subtitles")
    assert rec.stats.dropped == {"unknown_track": 1, "bad_audio": 1, "bad_rate": 1}
    rec.close()


def test_an_encoded_session_declared_with_its_parameter_sets_joins_late(tmp_path):
    path = tmp_path / "room.mp4"
    frames = list(encoded_frames(6.0))
    first = frames[0][1]
    idr = first.find(b"\x00\x00\x01\x65")
    extradata = first[: idr - 1 if first[idr - 1] == 0 else idr]        # SPS, PPS (and x264's SEI)
    rec = RoomRecorder(str(path), RoomConfig(wait_s=1.0, fsync=False))
    rec.declare("cam", "video", {"width": W, "height": H})
    rec.declare("late", "video", {"width": W, "height": H, "extradata": extradata})
    rec.declare("mic", "audio")
    for offset, au, key in frames:
        t = BASE + offset
        rec.push_video("cam", au, t, key)
        if offset >= 3 * NS:                    # the second camera starts sending 3 s in
            rec.push_video("late", au, t, key)
        rec.push_audio("mic", np.zeros(CHUNK * 5, np.int16), t)
        rec.poll(t)
    rec.close()
    assert rec.missing == []
    late = ffprobe_packets(path, "v:1")
    # A fragmented MP4 has no edit list: players start each track at 0. So its first picture
    # is held from 0, and every picture, the first included, plays at its capture time
    # (3.0 s after the start, plus the AAC priming shift both tracks get).
    assert len(late) == 31 and late[0] == (0, True)
    assert abs(late[1][0] / 90000 - (3.0 + 1024 / RATE)) < 0.002
    assert abs(late[2][0] / 90000 - (3.1 + 1024 / RATE)) < 0.002
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:1", "-f", "null", "-"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == ""


# ------------------------------------------------------------------ units: placement and mixing
def test_placer_absorbs_jitter_fills_gaps_trims_overlaps_and_follows_drift():
    from services.recorder.room_audio import AudioPlacer
    p = AudioPlacer(0, RATE, jitter_ms=10, drift_ms=2, window=25)
    rng = np.random.default_rng(3)
    # jitter of +-3 ms on every stamp: placed back to back
    positions = [p.place(k * 20_000_000 + int(rng.integers(-3_000_000, 3_000_001)), CHUNK).pos for k in range(10)]
    assert positions[1:] == [positions[0] + k * CHUNK for k in range(1, 10)]
    # a lost chunk: the next one goes to its capture time, the hole stays silent
    placed = p.place(11 * 20_000_000, CHUNK)
    assert placed.pos == 11 * CHUNK and placed.gap > 0
    # a chunk that starts 15 ms inside the last one: its head is trimmed
    placed = p.place(12 * 20_000_000 - 15_000_000, CHUNK)
    assert placed.trimmed == 720 and placed.pos == 12 * CHUNK
    # a card 200 ppm slow: the position follows the capture clock within drift_ms over an hour
    q = AudioPlacer(0, RATE, jitter_ms=10, drift_ms=2)
    worst = 0
    for k in range(180_000):                    # one hour of 20 ms chunks
        capture = round(k * 20_000_000 * (1 + 200e-6))
        placed = q.place(capture, CHUNK)
        worst = max(worst, abs(placed.pos - q.ideal(capture)))
    assert worst <= 2.5 * RATE / 1000           # drift_ms, plus what accrues while the median window fills


def test_mixer_sums_with_clipping_and_counts_silence():
    from services.recorder.room_audio import AudioMixer
    m = AudioMixer(1, 4800)
    m.add(0, np.full(100, 30000, np.int16))
    m.add(50, np.full(100, 30000, np.int16))
    m.add(300, np.full(10, -5, np.int16))
    out, start, silent = m.take(400)
    assert start == 0 and len(out) == 400
    assert out[49] == 30000 and out[50] == 32767 and out[149] == 30000 and out[150] == 0 and out[305] == -5
    assert silent == 400 - 150 - 10
    m.add(350, np.ones(100, np.int16))          # half of it was already written: trimmed, counted late
    assert m.late == 50
    out, start, _ = m.take(500)
    assert start == 400 and out[:50, 0].tolist() == [1] * 50


def test_a_room_feed_declares_each_track_of_the_hub_s_sessions_once(tmp_path, prefix):
    """The recorder's room:NAME feed (services/recorder/roomfeed.py) on the hub's session list:
    each track declared once, with what the hub said of it, in the first file and the next
    segment's; a session joining later joins the open file."""
    events = []
    feed = RoomFeed("room:lobby", tmp_path, prefix, lambda topic, data: events.append(topic), fsync=False)
    video = {"id": "video", "kind": "video", "stream": "cam", "format": "h264", "width": W, "height": H}
    audio = {"id": "audio", "kind": "audio", "stream": "cam-audio", "format": "s16", "rate": RATE}
    cam = {"session": "cam", "room": "lobby", "tracks": [video, audio]}
    try:
        feed.sessions([cam])      # the first track opened the file and was then declared again: ValueError
        feed.sessions([cam])
        assert feed.settled and sorted(feed.rec.tracks) == ["cam/audio", "cam/video"]
        assert feed.rec.tracks["cam/video"].info == {"width": W, "height": H}
        feed.sessions([cam, {"session": "door", "room": "lobby", "tracks": [dict(video, stream="door")]}])
        assert sorted(feed.rec.tracks) == ["cam/audio", "cam/video", "door/video"]
        feed._finish()            # a segment ends; the next file has the same tracks
        rec = feed._recorder()
        assert sorted(rec.tracks) == ["cam/audio", "cam/video", "door/video"]
        assert rec.tracks["door/video"].info == {"width": W, "height": H}
    finally:
        feed.stop()
    assert events == ["record.stopped"]


def test_a_session_that_flaps_while_its_capture_restarts_loses_no_frame(tmp_path, prefix):
    """The hub drops a session when its capture process dies and lists it again when the new
    one registers, which can come after the new process already sent frames (the chaos
    benchmark saw it: 1.5 s of the room lost, up to the next keyframe). A track back on the
    same ring goes straight on: every frame is in the file, and no gap is reported. A track
    whose ring no longer held what followed its last item waits for a keyframe and says so."""
    import time

    import av

    import framebus
    from services.capture.sources.synthetic import frame_number

    events = []
    feed = RoomFeed("room:lobby", tmp_path, prefix, lambda topic, data: events.append((topic, data)), fsync=False,
                    segment_seconds=60)
    video = {"id": "video", "kind": "video", "stream": "cam", "format": "h264", "width": W, "height": H}
    cam = {"session": "cam", "room": "lobby", "tracks": [video]}
    encoder, pattern = H264Encoder(W, H, FPS, 60.0, 0), Pattern(W, H)   # one keyframe: the first

    t0 = time.monotonic_ns()      # the feed takes what is newer than its start (less a fresh start's history)

    def send(p, n0: int, count: int) -> None:
        for n in range(n0, n0 + count):
            frame, (y, u, v) = encoder.frame()
            pattern.draw_yuv(y, u, v, n)
            for packet in encoder.encode(frame, n):
                p.publish_encoded(bytes(packet), "h264", keyframe=packet.is_keyframe, pts=n, time_base=(1, FPS),
                                  capture_ns=t0 + n * NS // FPS)

    with framebus.Producer.create("cam", "encoded", payload=1 << 16, slots=64, prefix=prefix) as p:
        try:
            feed.sessions([cam])
            feed.sessions([cam])
            send(p, 0, 20)
            feed.pump(t0 + 2 * NS)
            feed.sessions([])                  # the session left ...
            send(p, 20, 20)                    # ... while its camera went on
            feed.sessions([cam])               # back: the consumer reads from the ring's oldest
            feed.sessions([cam])
            send(p, 40, 20)
            feed.pump(t0 + 6 * NS)
        finally:
            path = feed.stop()
    with av.open(str(path)) as f:
        got = [frame_number(fr.to_ndarray(format="gray")) for fr in f.decode(video=0)]
    assert got == list(range(60)), got
    assert not [d for t, d in events if t == "record.gap"], events

    # a ring that no longer holds what followed: the track waits for a keyframe, and says so
    events.clear()
    feed = RoomFeed("room:lobby", tmp_path / "2", prefix, lambda topic, data: events.append((topic, data)),
                    fsync=False, segment_seconds=60)
    encoder = H264Encoder(W, H, FPS, 3.5, 0)                        # a keyframe every 35 frames
    with framebus.Producer.create("cam", "encoded", payload=1 << 16, slots=8, prefix=prefix) as p:
        try:
            feed.sessions([cam])
            feed.sessions([cam])
            for n in range(0, 20, 4):          # 8 slots: read as it goes
                send(p, n, 4)
                feed.pump(t0 + 2 * NS)
            feed.sessions([])
            send(p, 20, 20)                    # frames 20-31 are gone when it is back
            feed.sessions([cam])
            feed.sessions([cam])
            for n in range(40, 60, 4):
                send(p, n, 4)
                feed.pump(t0 + 6 * NS)
        finally:
            path = feed.stop()
    with av.open(str(path)) as f:
        got = [frame_number(fr.to_ndarray(format="gray")) for fr in f.decode(video=0)]
    assert got == list(range(20)) + list(range(35, 60)), got   # on from the keyframe at 35
    gaps = [d for t, d in events if t == "record.gap"]
    assert [(g["track"], g["reason"]) for g in gaps] == [("cam/video", "overrun")], gaps
    assert gaps[0]["seconds"] == pytest.approx(15 / FPS, abs=0.02), gaps
