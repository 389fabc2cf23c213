"""The avatar engine on a real bus, against the reference WebSocket avatar server: pairing, turns, idle, failures.

Each test runs one `Avatar` (services/avatar/avatar.py) on an asyncio loop in the test's process, with
tests/avatar_server.py as its provider and real framebus rings in and out.
"""
from __future__ import annotations

import asyncio
import io
import logging
import time
from pathlib import Path

import av
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import framebus
from services.avatar.avatar import Avatar, AvatarSpec, Timing, slice_bounds
from services.avatar.face import load_face
from services.avatar.metrics import AvatarMetrics
from services.avatar.providers import AvatarError, Outputs, Settings, open_provider
from services.avatar.providers.websocket import decode_frame, encode_frame
from services.avatar.voice import BusVoice, PushedVoice
from tests.avatar_server import AvatarServer, face_picture, mouth_opening

RATE = 16000
log = logging.getLogger("test.avatar")


def write_face(path: Path, size: tuple[int, int] = (320, 240)) -> Path:
    """A PNG of a face-like picture (the reference image)."""
    rgb = face_picture(None, size[0], size[1], 0.0)
    rgb[: size[1] // 3] = (200, 150, 110)           # a forehead the server keeps: the image really was sent
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = size[0], size[1], "rgb24"
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    path.write_bytes(buf.getvalue())
    return path


def tone(seconds: float, hz: float = 440.0, gain: float = 0.5, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * gain * 32767).astype(np.int16)


class Rig:
    """An avatar on its own loop, a voice producer, and readers of what it publishes."""

    def __init__(self, prefix: str, tmp: Path, server: AvatarServer, *, audio: str = "voice",
                 timing: Timing | None = None, timeout: float = 2.0) -> None:
        self.prefix = prefix
        self.loop = asyncio.new_event_loop()
        self.registry = CollectorRegistry()
        image = write_face(tmp / "face.png")
        spec = AvatarSpec(name="ava", room="meet", provider="websocket", image=str(image), width=256, height=256,
                          fps=25.0, audio=f"{audio}-audio" if audio else "",
                          settings=Settings(url=server.url, timeout=timeout))
        face, picture = load_face(spec.image, spec.width, spec.height, spec.fps)
        self.avatar = Avatar(spec, face=face, reference=picture, prefix=prefix, metrics=AvatarMetrics(self.registry),
                             timing=timing or Timing(), log=log)
        self.producer = framebus.Producer.create("voice-audio", "audio", payload=RATE // 10 * 2 * 2, slots=64,
                                                 prefix=prefix) if audio else None
        self.video = framebus.Consumer.attach("ava", prefix=prefix, missing_ok=True, start="oldest")
        self.audio = framebus.Consumer.attach("ava-audio", prefix=prefix, missing_ok=True, start="oldest")
        self.pictures: list[tuple[int, float, float]] = []     # (capture_ns, opening, got monotonic)
        self.chunks: list[tuple[int, float, float]] = []       # (capture_ns, rms, seconds)
        self.avatar.begin(self.loop)
        self.loop.call_soon(self._keep_draining)

    def _keep_draining(self) -> None:
        """The face's ring keeps 8 pictures: read as they come, as a caller's transport does."""
        self.drain()
        self._drainer = self.loop.call_later(0.01, self._keep_draining)

    def run(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.drain()

    def drain(self) -> None:
        while (item := self.video.poll()) is not None:
            rgb = np.array(item.array).reshape(item.height, item.width, 3)
            self.pictures.append((item.capture_ns, mouth_opening(rgb), time.monotonic()))
        while (item := self.audio.poll()) is not None:
            pcm = np.array(item.array)[:, 0].astype(np.float64)
            self.chunks.append((item.capture_ns, float(np.sqrt(np.mean(pcm ** 2))), len(pcm) / item.rate))

    async def _speak(self, pcm: np.ndarray, chunk: int) -> None:
        assert self.producer is not None
        start = time.monotonic_ns()
        for i in range(0, len(pcm), chunk):
            due = start + i * 1_000_000_000 // RATE
            await asyncio.sleep(max(0.0, (due - time.monotonic_ns()) / 1e9))
            part = pcm[i:i + chunk].reshape(-1, 1)
            self.producer.publish_audio(part, RATE, pts=i, time_base=(1, RATE), capture_ns=due)

    def speak(self, pcm: np.ndarray, chunk: int = 320) -> None:
        """Publish voice in real time, 20 ms chunks, stamped with their due times."""
        self.loop.run_until_complete(self._speak(pcm, chunk))
        self.drain()

    def close(self) -> None:
        self._drainer.cancel()
        self.loop.run_until_complete(self.avatar.close())
        for c in (self.video, self.audio):
            c.close()
        if self.producer is not None:
            self.producer.close()
        self.loop.close()

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"avatar": "ava", **labels}) or 0.0


@pytest.fixture
def server():
    with AvatarServer(fps=25.0) as s:
        yield s


@pytest.fixture
def rig(prefix, tmp_path, server):
    r = Rig(prefix, tmp_path, server)
    yield r
    r.close()


def wait_ready(rig: Rig, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while rig.avatar.state != "ready" and time.monotonic() < end:
        rig.run(0.05)
    assert rig.avatar.state == "ready", rig.avatar.problem


# ---------------------------------------------------------------- units
def test_slices_cover_every_sample_once_at_any_rate_and_fps():
    for rate, fps in ((16000, 25.0), (24000, 30.0), (22050, 29.97), (48000, 24.0)):
        bounds = [slice_bounds(i, rate, fps) for i in range(301)]
        sizes = np.diff(bounds)
        assert bounds[0] == 0 and sizes.min() >= int(rate / fps) and sizes.max() <= int(rate / fps) + 1
        assert abs(bounds[300] - 300 * rate / fps) < 1


def test_pushed_voice_is_released_in_real_time_on_its_own_clock():
    v = PushedVoice(rate=16000, limit_s=2.0)
    v.push(tone(1.0, rate=24000).reshape(-1, 1), 24000, now_ns=1_000_000_000)     # resampled to 16 kHz
    assert abs(v.pending_s() - 1.0) < 0.01
    assert v.due(1_000_000_000) == []
    (pcm, at), = v.due(1_100_000_000)
    assert len(pcm) == 1600 and at == 1_000_000_000
    (pcm, at), = v.due(1_250_000_000)
    assert len(pcm) == 2400 and at == 1_100_000_000
    with pytest.raises(ValueError, match="at most 2 s"):
        v.push(tone(1.5).reshape(-1, 1), 16000, now_ns=1_250_000_000)


def test_the_wire_format_round_trips_and_a_short_frame_is_named():
    rgb = face_picture(None, 64, 48, 0.5)
    assert np.array_equal(decode_frame(encode_frame(rgb)), rgb)
    with pytest.raises(ValueError, match="says 64x48"):
        decode_frame(encode_frame(rgb)[:-3])


def test_a_bad_reference_image_is_named(tmp_path):
    bad = tmp_path / "face.jpg"
    bad.write_bytes(b"not a picture at all")
    with pytest.raises(ValueError, match="face.jpg is not a picture"):
        load_face(str(bad), 64, 64, 25.0)
    with pytest.raises(ValueError, match="No such file"):
        load_face(str(tmp_path / "none.png"), 64, 64, 25.0)


# ---------------------------------------------------------------- the provider alone
def test_the_websocket_provider_sends_the_image_and_the_rate_and_never_waits_for_frames(server, tmp_path):
    frames: list[np.ndarray] = []
    errors: list[AvatarError] = []

    async def go() -> tuple[float, float]:
        p = open_provider("websocket", Settings(url=server.url, sample_rate=24000),
                          Outputs(frames.append, lambda *_: None, errors.append))
        image = write_face(tmp_path / "f.png").read_bytes()
        from services.avatar.providers import Face
        fps = await p.start(Face(image, 128, 96, 25.0))
        server.delay = 0.1                           # each message answered 0.1 s late
        t0 = time.monotonic()
        for _ in range(10):                          # 10 x 40 ms of voice: fed without waiting
            p.feed(tone(0.04, rate=24000))
        fed = time.monotonic() - t0
        await asyncio.sleep(1.0)
        p.end_turn()
        await asyncio.sleep(0.5)
        await p.stop()
        return fps, fed

    fps, fed = asyncio.run(go())
    assert fps == 25.0 and server.sample_rates == [24000]
    assert server.images == [(240, 320)]              # the reference image was sent and decoded
    assert fed < 0.01, "feed() waited for the server"
    assert len(frames) == 10 and all(f.shape == (96, 128, 3) for f in frames)
    assert all(mouth_opening(f) > 0.5 for f in frames)
    assert server.stops == 1 and errors == []


# ---------------------------------------------------------------- the engine
def test_idle_face_flows_before_any_voice_at_the_frame_rate(rig):
    wait_ready(rig)
    rig.pictures.clear()
    rig.run(1.0)
    n = len(rig.pictures)
    assert 20 <= n <= 27, n
    assert all(p[1] < 0.1 for p in rig.pictures), "the idle face has its mouth closed"
    gaps = np.diff([p[0] for p in rig.pictures]) / 1e6
    assert gaps.max() < 60, gaps


def test_voice_and_frames_go_out_paired_with_the_voices_capture_times(rig):
    wait_ready(rig)
    silence = np.zeros(int(0.4 * RATE), np.int16)
    rig.speak(np.concatenate([tone(0.4), silence, tone(0.4), silence]))
    rig.run(0.8)
    chunk_at = {ns: rms for ns, rms, _ in rig.chunks}
    paired = [(ns, opening) for ns, opening, _ in rig.pictures if ns in chunk_at]
    # every slice of the voice went out with its frame: 1.6 s at 25 fps
    assert len(paired) >= 39, (len(paired), len(rig.pictures), len(rig.chunks))
    loud = [o for ns, o in paired if chunk_at[ns] > 3000]
    quiet = [o for ns, o in paired if chunk_at[ns] < 10]
    assert len(loud) >= 18 and len(quiet) >= 18
    assert min(loud) > 0.5 and max(quiet) < 0.1, (loud, quiet)
    assert rig.metric("edgeroom_avatar_frames_total", kind="held") == 0
    assert rig.metric("edgeroom_avatar_turns_total") == 1
    # the voice's own clock: consecutive slices 40 ms apart by their capture times
    times = sorted(ns for ns, _ in paired)
    assert np.allclose(np.diff(times[:30]) / 1e6, 40.0, atol=1.0)
    lat = sorted(rig.avatar.latencies)
    assert lat[len(lat) // 2] < 0.2, lat


def test_a_slow_server_never_holds_the_voice_longer_than_max_delay(prefix, tmp_path, server):
    r = Rig(prefix, tmp_path, server, timing=Timing(max_delay=0.2))
    try:
        wait_ready(r)
        server.delay = 0.5
        r.speak(tone(1.0))
        r.run(1.5)
        assert sum(n for _, _, n in r.chunks) >= 0.95                # all the voice went out
        assert r.metric("edgeroom_avatar_frames_total", kind="held") >= 20
        assert r.metric("edgeroom_avatar_dropped_frames_total", reason="late") >= 1
        lag = [(got_ns) for got_ns in r.chunks]
        assert lag, "no audio"
    finally:
        r.close()


def test_a_server_that_is_down_gives_the_reference_face_and_the_voice_then_recovers(prefix, tmp_path):
    server = AvatarServer()
    server.refuse = True
    server.start()
    r = Rig(prefix, tmp_path, server)
    try:
        r.run(1.2)
        assert r.avatar.state == "backoff" and "HTTP 503" in r.avatar.problem
        assert r.metric("edgeroom_avatar_provider_errors_total", provider="websocket", reason="down") >= 1
        assert len(r.pictures) >= 20, "idle frames continue while the provider is down"
        r.speak(tone(0.4))
        r.run(0.2)
        assert sum(n for _, _, n in r.chunks) >= 0.39, "the voice goes out without the provider"
        server.refuse = False
        wait_ready(r, timeout=5.0)
        assert r.metric("edgeroom_avatar_provider_connects_total") == 1
    finally:
        r.close()
        server.close()


def test_a_dropped_stream_is_counted_and_the_provider_comes_back(rig, server):
    wait_ready(rig)
    server.drop_after = server.messages + 3
    rig.speak(tone(0.5))
    rig.run(0.3)
    assert rig.metric("edgeroom_avatar_provider_errors_total", provider="websocket", reason="closed") == 1
    server.drop_after = 0
    wait_ready(rig, timeout=4.0)
    assert rig.metric("edgeroom_avatar_provider_connects_total") == 2
    rig.pictures.clear()
    rig.speak(tone(0.4))
    rig.run(0.6)
    assert max(o for _, o, _ in rig.pictures) > 0.5, "the mouth moves again after the reconnection"


def test_garbage_frames_are_an_error_and_idle_frames_continue(rig, server):
    wait_ready(rig)
    server.garbage = True
    rig.speak(tone(0.4))
    rig.run(0.4)
    assert rig.metric("edgeroom_avatar_provider_errors_total", provider="websocket", reason="garbage") == 1
    assert "malformed frames" in rig.avatar.problem
    rig.pictures.clear()
    rig.run(0.5)
    assert len(rig.pictures) >= 10


def test_pushed_voice_drives_the_face_in_real_time(prefix, tmp_path, server):
    r = Rig(prefix, tmp_path, server, audio="")
    try:
        wait_ready(r)
        t0 = time.monotonic()
        r.avatar.say(tone(0.8, rate=24000).reshape(-1, 1), 24000)
        r.run(1.4)
        out = sorted(r.chunks)
        assert abs(sum(n for _, _, n in out) - 0.8) < 0.05
        span = (out[-1][0] - out[0][0]) / 1e9
        assert 0.7 < span < 0.85, "pushed voice is stamped on its real-time clock"
        opened = [t for ns, o, t in r.pictures if o > 0.5]
        assert opened and opened[0] - t0 < 0.3 and opened[-1] - opened[0] > 0.6
    finally:
        r.close()


def test_a_voice_stream_that_carries_pictures_is_counted_and_the_face_goes_on(prefix, tmp_path, server):
    r = Rig(prefix, tmp_path, server, audio="")
    wrong = framebus.Producer.create("pictures-audio", "video", payload=64 * 64 * 3, slots=4, prefix=prefix)
    try:
        r.avatar.voice = BusVoice("pictures-audio", prefix=prefix, rate=r.avatar.rate,
                                  on_drop=r.avatar._voice_dropped)
        wait_ready(r)
        for _ in range(3):
            loan = wrong.loan_picture(64, 64, "rgb24")
            loan.send(pts=0, time_base=(1, 90000), capture_ns=time.monotonic_ns())
            r.avatar._on_voice()
        r.pictures.clear()
        r.run(0.4)
        assert r.metric("edgeroom_avatar_voice_dropped_total", reason="wrong_kind") == 3
        assert len(r.pictures) >= 8 and r.avatar.turn is None, "idle faces go on; no turn began"
    finally:
        r.avatar.voice.close()
        r.avatar.voice = None
        wrong.close()
        r.close()


def test_frames_a_finished_turn_still_owes_are_not_taken_for_the_next_turns(prefix, tmp_path, server):
    """A loud turn ends (its voice stops for turn_gap) while a slow server still owes its frames; a quiet turn
    follows at once: every frame that goes out with the quiet turn's voice has its mouth shut."""
    r = Rig(prefix, tmp_path, server, timing=Timing(turn_gap=0.1, max_delay=1.0))
    try:
        wait_ready(r)
        server.delay = 0.05
        r.speak(tone(0.3))
        r.run(0.15)                                   # the voice pauses: the turn ends, its frames still coming
        quiet_from = time.monotonic_ns()
        r.speak(np.zeros(int(0.6 * RATE), np.int16))
        r.run(1.2)
        chunk_at = {ns for ns, _, _ in r.chunks if ns >= quiet_from}
        quiet = [o for ns, o, _ in r.pictures if ns in chunk_at]
        assert len(quiet) >= 10 and max(quiet) < 0.1, quiet
        assert r.metric("edgeroom_avatar_turns_total") == 2
        assert r.metric("edgeroom_avatar_dropped_frames_total", reason="unpaired") == 0
    finally:
        r.close()
