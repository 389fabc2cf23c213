"""The Anam avatar provider against a local Anam (tests/anam_server.py: its session API, signalling WebSocket and
aiortc media), over real HTTP, a real WebSocket and real ICE/DTLS on 127.0.0.1: the session is asked for with the
key, the face comes at the asked size, a tone opens its mouth and comes back as sound of its frequency, heartbeats
and endsession go out, and every way it fails is the error the avatar service counts and retries by."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable

import aioice.ice
import numpy as np
import pytest

from services.avatar.providers.anam import AnamProvider, Engine, signalling_url
from services.avatar.providers.base import PROVIDERS, AvatarError, Face, Outputs, Settings, Unavailable
from tests.anam_server import KEY, AnamServer, mouth_opening
from tests.ports import closed_port

KEY_ENV = "EDGEROOM_TEST_ANAM_KEY"
FACE = Face(image=b"", width=256, height=192, fps=25.0)      # the server sends 320x240: the provider scales
TONE_HZ, RATE = 440.0, 24000


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    """Both peers offer 127.0.0.1 as their host candidate (as tests/webrtc_peers.loopback_ice, undone after)."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else [])


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def server():
    with AnamServer(width=320, height=240, fps=25.0, heartbeat_s=0.2) as s:
        yield s


class Sink:
    """What the provider delivers, with the time it came."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, np.ndarray]] = []
        self.audio: list[tuple[float, np.ndarray, int]] = []
        self.errors: list[AvatarError] = []
        self.outputs = Outputs(on_frame=lambda rgb: self.frames.append((time.monotonic(), rgb)),
                               on_audio=lambda pcm, rate: self.audio.append((time.monotonic(), pcm, rate)),
                               on_error=self.errors.append)

    def openings(self, start: float, end: float) -> list[float]:
        return [mouth_opening(rgb) for t, rgb in self.frames if start <= t <= end]

    def sound(self, start: float, end: float) -> tuple[np.ndarray, int]:
        """The first channel of the audio that came between start and end, and its rate."""
        parts = [(pcm[:, 0], rate) for t, pcm, rate in self.audio if start <= t <= end]
        assert parts, "no audio came back"
        return np.concatenate([p for p, _ in parts]), parts[0][1]


def anam(url: str, sink: Sink, **settings: object) -> AnamProvider:
    keys = {"url": url, "api_key_env": KEY_ENV, "avatar_id": "test-avatar", "timeout": 5.0, **settings}
    return AnamProvider(Settings(**keys), sink.outputs)  # type: ignore[arg-type]


async def until(condition: Callable[[], object], timeout: float = 5.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        await asyncio.sleep(0.02)


async def failure(p: AnamProvider) -> AvatarError:
    """start() fails: the error it raised (and stop() after it is safe)."""
    with pytest.raises(AvatarError) as caught:
        await p.start(FACE)
    await p.stop()
    return caught.value


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * TONE_HZ * t) * 16000).astype(np.int16)


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


def edges(levels: list[tuple[float, float]], threshold: float) -> tuple[float, float]:
    """When a (time, level) series first rose above `threshold`, and when it next fell below it."""
    rise = next(t for t, level in levels if level > threshold)
    fall = next(t for t, level in levels if t > rise and level < threshold)
    return rise, fall


def test_it_registers_and_imports_no_client_library():
    """The box's config loads on the core: aiohttp and aiortc come only when an avatar starts."""
    assert PROVIDERS["anam"].factory is AnamProvider and AnamProvider.paired is False
    code = ("import sys, services.avatar.providers.anam; "
            "print(sorted({'aiohttp', 'aiortc', 'av'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_session_answer_is_read_as_the_sdk_reads_it():
    answer = {"sessionId": "s 1", "engineHost": "connect-eu.anam.ai/v1/webrtc/engines/x", "engineProtocol": "https",
              "signallingEndpoint": "/ws", "clientConfig": {"iceServers": [{"urls": ["turn:t.example"]}]}}
    engine = Engine.from_answer(answer)
    assert engine.signalling_url == "wss://connect-eu.anam.ai/ws?session_id=s%201"
    assert engine.ice_servers == [{"urls": ["turn:t.example"]}] and engine.heartbeat_s == 5.0
    local = {**answer, "engineHost": "127.0.0.1:8080", "engineProtocol": "http", "clientConfig": {}}
    assert signalling_url(local) == "ws://127.0.0.1:8080/ws?session_id=s%201"
    assert signalling_url({**answer, "signallingEndpoint": "https://e.example/ws?a=1"}) == \
        "wss://e.example/ws?a=1&session_id=s%201"
    for broken, says in (([], "not an object"), ({**answer, "sessionId": ""}, "no sessionId"),
                         ({**answer, "engineHost": None}, "no engineHost"),
                         ({**answer, "clientConfig": {"iceServers": [{}]}}, "iceServers"),
                         ({**answer, "clientConfig": {"heartbeatIntervalSeconds": -1}}, "heartbeatIntervalSeconds")):
        with pytest.raises(ValueError, match=says):
            Engine.from_answer(broken)


def test_a_session_streams_the_face_at_the_asked_size(server, key):
    sink = Sink()

    async def scenario() -> None:
        p = anam(server.url, sink)
        p.feed(tone(0.1))                                   # before start: dropped, not queued, not raised
        assert await p.start(FACE) == FACE.fps
        await until(lambda: len(sink.frames) >= 10 and server.heartbeats >= 2, what="pictures and heartbeats")
        idle = await p.idle_frame()
        status = p.status()
        await p.stop()
        await until(lambda: server.endsessions == 1, what="endsession")
        await p.stop()                                      # twice: nothing more
        assert idle.shape == (FACE.height, FACE.width, 3) and idle.dtype == np.uint8
        assert mouth_opening(idle) < 0.2                    # nobody speaks: the mouth is shut
        assert status["session"] and status["url"] == server.url and status["frames_received"] >= 10
        assert status["connection"] == "connected" and status["ready"] is True

    asyncio.run(scenario())
    assert server.sessions == 1 and server.unauthorized == 0 and server.audio_messages == 0
    assert server.bodies == [{"clientLabel": "edgeroom",
                              "personaConfig": {"avatarId": "test-avatar", "enableAudioPassthrough": True}}]
    assert {rgb.shape for _, rgb in sink.frames} == {(FACE.height, FACE.width, 3)}
    assert server.actions[0] == "offer" and server.actions[-1] == "endsession"
    assert sink.errors == []


def test_a_tone_opens_the_mouth_and_comes_back_as_its_sound(server, key):
    """1 s of 440 Hz fed as a voice comes (100 ms ahead, then 20 ms chunks as the clock goes): the mouth opens
    while it plays and shuts after the turn ends, in step with the sound that comes back, which is the tone; the
    chunks went as a few larger, numbered messages."""
    sink = Sink()
    voice, lead, step = tone(1.0), RATE // 10, RATE // 50

    async def scenario() -> tuple[float, float]:
        p = anam(server.url, sink)
        await p.start(FACE)
        await asyncio.sleep(0.3)
        began = time.monotonic()
        p.feed(voice[:lead])
        for i in range(lead, len(voice), step):
            await asyncio.sleep(max(0.0, began + (i - lead) / RATE - time.monotonic()))
            p.feed(voice[i:i + step])
        p.end_turn()
        ended = time.monotonic()
        await asyncio.sleep(1.0)
        await p.stop()
        return began, ended

    began, ended = asyncio.run(scenario())
    before, during, after = (sink.openings(began - 0.3, began), sink.openings(began + 0.3, ended),
                             sink.openings(ended + 0.5, ended + 1.0))
    assert during and before and after
    assert max(before) < 0.2, before
    assert np.median(during) > 0.6, during
    assert max(after) < 0.2, after
    sound, rate = sink.sound(began + 0.3, ended)
    assert rate == 48000 and abs(peak_hz(sound, rate) - TONE_HZ) < 5
    assert rms(sound) > 10 * rms(sink.sound(ended + 0.5, ended + 1.0)[0]) + 1
    mouth_on, mouth_off = edges([(t, mouth_opening(rgb)) for t, rgb in sink.frames if t > began], 0.5)
    sound_on, sound_off = edges([(t, rms(pcm[:, 0]) / 8000) for t, pcm, _ in sink.audio if t > began], 0.5)
    assert abs(mouth_on - sound_on) < 0.15 and abs(mouth_off - sound_off) < 0.15, (mouth_on - sound_on,
                                                                                  mouth_off - sound_off)
    assert server.sample_rates == {RATE} and server.audio_samples == len(voice) and server.audio_ends == 1
    assert 10 <= server.audio_messages <= 30                # 40 to 100 ms a message, not 50 of 20 ms
    assert server.sequence == list(range(server.audio_messages))
    assert sink.errors == []


def test_trickled_ice_candidates_connect(key):
    """The answer without candidates, each sent after it in an icecandidate message: the face still comes."""
    sink = Sink()
    with AnamServer(width=160, height=120, trickle=True) as server:
        async def scenario() -> None:
            p = anam(server.url, sink)
            await p.start(FACE)
            await until(lambda: len(sink.frames) >= 3, what="pictures")
            await p.stop()

        asyncio.run(scenario())
        assert server.candidates_sent >= 1
    assert sink.frames[0][1].shape == (FACE.height, FACE.width, 3) and sink.errors == []


def test_a_dropped_websocket_is_reported_once(server, key):
    sink = Sink()

    async def scenario() -> None:
        p = anam(server.url, sink)
        await p.start(FACE)
        await asyncio.to_thread(server.drop_ws)
        await until(lambda: sink.errors, what="on_error")
        p.feed(tone(0.1))                                   # the service may still feed: it must not raise
        p.end_turn()
        await asyncio.sleep(0.5)
        await p.stop()

    asyncio.run(scenario())
    assert len(sink.errors) == 1, sink.errors
    error = sink.errors[0]
    assert error.reason == "closed" and "signalling WebSocket closed" in str(error) and server.url in str(error)


def test_the_server_ending_the_session_is_reported(server, key):
    sink = Sink()

    async def scenario() -> None:
        p = anam(server.url, sink)
        await p.start(FACE)
        await asyncio.to_thread(server.end_sessions, "session length limit")
        await until(lambda: sink.errors, what="on_error")
        await p.stop()

    asyncio.run(scenario())
    assert [e.reason for e in sink.errors] == ["closed"] and "session length limit" in str(sink.errors[0])


def test_no_key_is_unavailable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("ANAM_API_KEY", raising=False)
    sink = Sink()
    error = asyncio.run(failure(anam("http://127.0.0.1:9", sink)))
    assert isinstance(error, Unavailable) and error.reason == "unavailable" and f"${KEY_ENV}" in str(error)
    error = asyncio.run(failure(anam("", sink, api_key_env="")))
    assert isinstance(error, Unavailable) and "$ANAM_API_KEY" in str(error) and "https://api.anam.ai" in str(error)


def test_no_avatar_is_unavailable(key):
    error = asyncio.run(failure(anam("http://127.0.0.1:9", Sink(), avatar_id="")))
    assert isinstance(error, Unavailable) and "avatar_id" in str(error)


def test_a_wrong_key_is_auth(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "not-the-key-4242")
    error = asyncio.run(failure(anam(server.url, Sink())))
    assert error.reason == "auth" and "HTTP 401" in str(error) and server.url in str(error)
    assert KEY_ENV in str(error) and "not-the-key-4242" not in str(error)
    assert server.unauthorized == 1 and server.sessions == 0


def test_a_refusal_and_a_garbage_answer(server, key):
    server.refuse = True
    error = asyncio.run(failure(anam(server.url, Sink())))
    assert error.reason == "refused" and "HTTP 500" in str(error) and server.url in str(error)
    server.refuse, server.garbage = False, True
    error = asyncio.run(failure(anam(server.url, Sink())))
    assert error.reason == "garbage" and "no session today" in str(error)
    assert server.sessions == 0


def test_a_closed_port_is_down(key):
    url = f"http://127.0.0.1:{closed_port()}"     # nothing listens there (tests/ports.py)
    error = asyncio.run(failure(anam(url, Sink())))
    assert error.reason == "down" and url in str(error) and "session request" in str(error)


def test_an_unanswered_offer_times_out(server, key):
    server.answer = False
    began = time.monotonic()
    error = asyncio.run(failure(anam(server.url, Sink(), timeout=1.0)))
    assert error.reason == "timeout" and "first picture" in str(error)
    assert time.monotonic() - began < 4
    assert server.offers == 1
