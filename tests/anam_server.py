"""A local stand-in for Anam's cloud avatar (no cloud is reachable from the tests): the session API, the signalling
WebSocket and the WebRTC media, spoken as the `anam` SDK speaks them (see services/avatar/providers/anam.py).

    with AnamServer(width=320, height=240, heartbeat_s=0.2) as server:     # its own thread and event loop
        settings = Settings(url=server.url, api_key_env="...", avatar_id="test-avatar")
        ...
        assert server.audio_messages > 0 and server.sample_rates == {24000}
        server.drop_ws()                                                     # the signalling drops mid-session

What it does, as Anam does it:

* `POST /v1/engine/session` with `Authorization: Bearer KEY` (401 otherwise) answers `sessionId`, `engineHost`,
  `engineProtocol` ("http"), `signallingEndpoint` and `clientConfig` (`iceServers` [], `heartbeatIntervalSeconds`).
* `GET /v1/signalling?session_id=ID` upgrades to the signalling WebSocket: JSON `{actionType, sessionId, payload}`.
  An `offer` (payload `connectionDescription: {sdp, type}`) is answered by aiortc (`answer`, payload `{sdp, type}`),
  its ICE candidates in the SDP or, with `trickle=True`, each in an `icecandidate` message instead; `sessionready`
  follows once the peer connection is up. `agentaudioinput` (base64 pcm_s16le, sampleRate, channels,
  sequenceNumber), `agentaudioinputend`, `heartbeat` and `endsession` are counted; `endsession` ends the session.
* The media: a video track that draws a face whose MOUTH OPENS WITH THE LOUDNESS of the agent audio, and an audio
  track that plays that audio back. Both read one playout tape (`Playout`, 24 kHz) by the wall clock: the picture
  sent for time t has its mouth opened by the RMS of the 40 ms of the tape around t, and the sound sent for t is
  the tape at t. Audio is scheduled on the tape as it arrives (LATENCY_S after it arrived, or after the audio
  before it), so nothing on the tape changes once either track has read it. Idle: a closed mouth (a thin dark
  line) and silence. `mouth_opening(rgb)` measures the mouth on a received picture, at any size.

Counters, read from the test's thread: `sessions`, `unauthorized`, `bodies` (the JSON of each session request),
`offers`, `candidates_sent` (trickled), `audio_messages`, `audio_samples`, `sample_rates`, `sequence` (the
sequenceNumbers in arrival order), `audio_ends`, `heartbeats`, `endsessions`, `actions` (every actionType received,
in order).
Misbehaviour, switched from the test's thread at any time: `refuse` (the session request answers HTTP 500),
`garbage` (it answers 200 with a body that is not JSON), `answer` (False: the offer is never answered),
`drop_ws()` (close every signalling WebSocket now; the peer connections stay) and `end_sessions(reason)` (send
each session `endsession`, as Anam does when it ends one).
"""
from __future__ import annotations

import asyncio
import base64
import fractions
import threading
import time
import uuid
from typing import Any

import av
import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

__all__ = ["KEY", "AnamServer", "Playout", "mouth_opening"]

KEY = "test-anam-key-0123456789"
SESSION_PATH = "/v1/engine/session"
SIGNALLING_PATH = "/v1/signalling"

RATE = 24000                 # the playout tape's rate (Anam's recommended agent audio rate)
AUDIO_FRAME = 480            # 20 ms of the tape per audio frame (aiortc's Opus encoder resamples to 48 kHz)
LATENCY_S = 0.06             # audio goes on the tape this long after it arrives: later than any track has read
KEEP_S = 2.0                 # the tape keeps this much of its past
MOUTH_WINDOW = 960           # the 40 ms of the tape, centred on a picture's time, that open its mouth
FULL_RMS = 8000.0            # this loud (RMS) or louder: the mouth wide open

# The face, in fractions of the picture's width and height (so a picture scaled to any size measures the same).
BACKGROUND, SKIN, DARK = (40, 60, 90), (230, 190, 160), (50, 15, 25)
FACE_A, FACE_B = 0.40, 0.44                      # the face: an ellipse centred on the picture
EYE_X, EYE_Y, EYE_A, EYE_B = 0.14, 0.38, 0.05, 0.05
MOUTH_Y, MOUTH_A, MOUTH_B = 0.68, 0.14, 0.10     # the mouth's centre, half width and half height wide open
CLOSED_PX = 1.5                                  # a closed mouth's half height in pixels: a thin line


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


class FacePainter:
    """Pictures of the face at one size: the still part drawn once, the mouth drawn per picture (numpy masks)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        self.x, self.y = (x + 0.5) / width, (y + 0.5) / height
        self.base = np.empty((height, width, 3), np.uint8)
        self.base[:] = BACKGROUND
        self.base[_ellipse(self.x, self.y, 0.5, 0.5, FACE_A, FACE_B)] = SKIN
        for side in (-1, 1):
            self.base[_ellipse(self.x, self.y, 0.5 + side * EYE_X, EYE_Y, EYE_A, EYE_B)] = DARK
        rows = slice(int((MOUTH_Y - MOUTH_B) * height) - 2, int((MOUTH_Y + MOUTH_B) * height) + 3)
        cols = slice(int((0.5 - MOUTH_A) * width) - 2, int((0.5 + MOUTH_A) * width) + 3)
        self.mouth = (rows, cols)

    def draw(self, opening: float) -> np.ndarray:
        """The face with its mouth `opening` (0 closed .. 1 wide) open: (H, W, 3) RGB."""
        picture = self.base.copy()
        half = max(MOUTH_B * min(max(opening, 0.0), 1.0), CLOSED_PX / self.height)
        rows, cols = self.mouth
        mask = _ellipse(self.x[rows, cols], self.y[rows, cols], 0.5, MOUTH_Y, MOUTH_A, half)
        picture[rows, cols][mask] = DARK
        return picture


def mouth_opening(rgb: np.ndarray) -> float:
    """How open the face's mouth is on a received picture: 0 closed .. 1 wide. It counts the dark rows of a strip
    down the mouth's middle, against the rows of a wide-open mouth; a closed mouth (a line a few pixels thick,
    blurred by the codec) measures below 0.15."""
    height, width = rgb.shape[:2]
    top, bottom = int((MOUTH_Y - MOUTH_B) * height), int(np.ceil((MOUTH_Y + MOUTH_B) * height))
    left, right = int((0.5 - MOUTH_A / 3) * width), int(np.ceil((0.5 + MOUTH_A / 3) * width))
    luma = rgb[top:bottom, left:right].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    dark_rows = int((luma.mean(axis=1) < 110).sum())
    return min(dark_rows / max(bottom - top, 1), 1.0)


class Playout:
    """One session's audio on a wall-clock tape at RATE: the agent audio goes on as it arrives, the audio track
    plays it and the video track opens the mouth by it, both reading the tape at the same wall-clock time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.base = 0                            # the tape's first sample, counted from t0
        self.tape = np.zeros(0, np.int16)

    def index(self, t: float) -> int:
        return int(round((t - self.t0) * RATE))

    def append(self, pcm: np.ndarray) -> None:
        """Put `pcm` (int16 mono at RATE) on the tape after what is there, LATENCY_S from now at the earliest."""
        now = time.monotonic()
        end = self.base + len(self.tape)
        start = max(end, self.index(now + LATENCY_S))
        self.tape = np.concatenate([self.tape, np.zeros(start - end, np.int16), pcm.astype(np.int16)])
        keep_from = self.index(now - KEEP_S)
        if keep_from > self.base:
            self.tape = self.tape[keep_from - self.base:]
            self.base = keep_from

    def read(self, start: int, n: int) -> np.ndarray:
        """The tape's samples [start, start + n): silence where nothing was put."""
        out = np.zeros(n, np.int16)
        lo, hi = max(start, self.base), min(start + n, self.base + len(self.tape))
        if hi > lo:
            out[lo - start:hi - start] = self.tape[lo - self.base:hi - self.base]
        return out

    def opening(self, t: float) -> float:
        """The mouth for time t: the RMS of the 40 ms of the tape around t, against FULL_RMS."""
        window = self.read(self.index(t) - MOUTH_WINDOW // 2, MOUTH_WINDOW).astype(np.float64)
        return min(float(np.sqrt(np.mean(window ** 2))) / FULL_RMS, 1.0)


class _Paced(MediaStreamTrack):
    """A track whose frame n is sent at its first frame's time + n * period (the wall clock the tape uses)."""

    def __init__(self, playout: Playout, period: float) -> None:
        super().__init__()
        self.playout, self.period = playout, period
        self.n, self.start = 0, 0.0

    async def _next_time(self) -> float:
        if self.n == 0:
            self.start = time.monotonic()
        t = self.start + self.n * self.period
        wait = t - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.n += 1
        return t


class FaceTrack(_Paced):
    kind = "video"

    def __init__(self, playout: Playout, width: int, height: int, fps: float) -> None:
        super().__init__(playout, 1.0 / fps)
        self.painter = FacePainter(width, height)

    async def recv(self) -> av.VideoFrame:
        t = await self._next_time()
        frame = av.VideoFrame.from_ndarray(self.painter.draw(self.playout.opening(t)), format="rgb24")
        frame.pts, frame.time_base = round((self.n - 1) * self.period * 90000), fractions.Fraction(1, 90000)
        return frame


class VoiceTrack(_Paced):
    kind = "audio"

    def __init__(self, playout: Playout) -> None:
        super().__init__(playout, AUDIO_FRAME / RATE)

    async def recv(self) -> av.AudioFrame:
        t = await self._next_time()
        pcm = self.playout.read(self.playout.index(t), AUDIO_FRAME)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.time_base = RATE, fractions.Fraction(1, RATE)
        frame.pts = (self.n - 1) * AUDIO_FRAME
        return frame


def to_tape(payload: dict[str, Any]) -> np.ndarray:
    """An agentaudioinput payload's audio as int16 mono at RATE (its channels averaged, its rate interpolated)."""
    pcm = np.frombuffer(base64.b64decode(payload["audioData"]), "<i2")
    channels = int(payload.get("channels", 1))
    mono = pcm.reshape(-1, channels).mean(axis=1)
    rate = int(payload["sampleRate"])
    if rate != RATE and len(mono):
        n = int(round(len(mono) * RATE / rate))
        mono = np.interp(np.arange(n) * rate / RATE, np.arange(len(mono)), mono)
    return mono.astype(np.int16)


def split_candidates(sdp: str) -> tuple[str, list[dict[str, Any]]]:
    """The SDP without its candidates, and each candidate as an icecandidate payload (trickled instead)."""
    lines, candidates, mid, mline = [], [], None, -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            mline, mid = mline + 1, None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        if line.startswith("a=candidate:"):
            candidates.append({"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": mline})
        elif line != "a=end-of-candidates":
            lines.append(line)
    return "\r\n".join(lines) + "\r\n", candidates


class _Session:
    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.playout = Playout()
        self.ws: web.WebSocketResponse | None = None
        self.pc: RTCPeerConnection | None = None
        self.channels: list = []

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.pc is not None:
            await self.pc.close()


class AnamServer:
    """Anam's session API, signalling and media on 127.0.0.1 (a free port), in a thread with its own event loop."""

    def __init__(self, *, key: str = KEY, width: int = 512, height: int = 512, fps: float = 25.0,
                 heartbeat_s: float = 5.0, trickle: bool = False) -> None:
        self.key, self.width, self.height, self.fps = key, width, height, fps
        self.heartbeat_s, self.trickle = heartbeat_s, trickle
        self.refuse = False          # the session request answers HTTP 500
        self.garbage = False         # the session request answers 200 with a body that is not JSON
        self.answer = True           # False: offers are never answered
        self.sessions = self.unauthorized = self.offers = 0
        self.bodies: list[dict] = []
        self.audio_messages = self.audio_samples = self.audio_ends = self.heartbeats = self.endsessions = 0
        self.candidates_sent = 0
        self.sample_rates: set[int] = set()
        self.sequence: list[int] = []
        self.actions: list[str] = []
        self.port = 0
        self._sessions: dict[str, _Session] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AnamServer:
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="anam-server", daemon=True)
        self._thread.start()
        if not started.wait(10) or not self.port:
            raise RuntimeError("the Anam test server did not start")
        return self

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> AnamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop_ws(self) -> None:
        """Close every signalling WebSocket now (the server going away mid-session); peer connections stay."""
        async def drop() -> None:
            for session in list(self._sessions.values()):
                if session.ws is not None:
                    await session.ws.close(code=WSCloseCode.GOING_AWAY, message=b"dropped by the test")
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(drop(), self._loop).result(5)

    def end_sessions(self, reason: str = "the session was ended by the test") -> None:
        """Send every session `endsession` (the way Anam ends one: its length limit, its own failure)."""
        async def end() -> None:
            for session in list(self._sessions.values()):
                await self._send(session, "endsession", reason)
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(end(), self._loop).result(5)

    # the server's own thread

    def _run(self, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._listen())
        finally:
            started.set()
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    async def _listen(self) -> None:
        app = web.Application()
        app.router.add_post(SESSION_PATH, self._create_session)
        app.router.add_get(SIGNALLING_PATH, self._signalling)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _shutdown(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()
        self._sessions.clear()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _create_session(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            self.unauthorized += 1
            return web.json_response({"error": "Unauthorized", "message": "Invalid API key"}, status=401)
        if self.refuse:
            return web.json_response({"error": "Internal Server Error"}, status=500)
        if self.garbage:
            return web.Response(text="<html>no session today</html>", content_type="text/html")
        self.bodies.append(await request.json())
        self.sessions += 1
        sid = uuid.uuid4().hex
        self._sessions[sid] = _Session(sid)
        return web.json_response({
            "sessionId": sid, "engineHost": f"127.0.0.1:{self.port}", "engineProtocol": "http",
            "signallingEndpoint": SIGNALLING_PATH,
            "clientConfig": {"iceServers": [], "heartbeatIntervalSeconds": self.heartbeat_s,
                             "maxWsReconnectionAttempts": 5}})

    async def _signalling(self, request: web.Request) -> web.StreamResponse:
        session = self._sessions.get(request.query.get("session_id", ""))
        if session is None:
            return web.json_response({"error": "unknown session"}, status=404)
        ws = session.ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await self._on_message(session, msg.json())
        return ws

    async def _on_message(self, session: _Session, message: dict[str, Any]) -> None:
        action, payload = message.get("actionType", ""), message.get("payload")
        self.actions.append(action)
        if action == "offer":
            self.offers += 1
            if self.answer:
                await self._answer(session, payload["connectionDescription"])
        elif action == "agentaudioinput":
            self.audio_messages += 1
            self.sample_rates.add(int(payload["sampleRate"]))
            self.sequence.append(int(payload["sequenceNumber"]))
            pcm = to_tape(payload)
            self.audio_samples += len(pcm)
            session.playout.append(pcm)
        elif action == "agentaudioinputend":
            self.audio_ends += 1
        elif action == "heartbeat":
            self.heartbeats += 1
        elif action == "endsession":
            self.endsessions += 1
            await session.close()

    async def _answer(self, session: _Session, offer: dict[str, str]) -> None:
        pc = session.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.on("datachannel", session.channels.append)

        @pc.on("connectionstatechange")
        async def ready() -> None:
            if pc.connectionState == "connected":
                await self._send(session, "sessionready", "")

        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], offer["type"]))
        pc.addTrack(FaceTrack(session.playout, self.width, self.height, self.fps))
        pc.addTrack(VoiceTrack(session.playout))
        await pc.setLocalDescription(await pc.createAnswer())
        sdp, candidates = pc.localDescription.sdp, []
        if self.trickle:
            sdp, candidates = split_candidates(sdp)
        await self._send(session, "answer", {"sdp": sdp, "type": "answer"})
        for candidate in candidates:
            await self._send(session, "icecandidate", candidate)
            self.candidates_sent += 1

    async def _send(self, session: _Session, action: str, payload: Any) -> None:
        if session.ws is not None and not session.ws.closed:
            await session.ws.send_json({"actionType": action, "sessionId": session.sid, "payload": payload})
