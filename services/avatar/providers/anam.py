"""Anam's cloud avatar: a session over HTTPS, signalling over a WebSocket, the face and its voice over WebRTC.

    p = open_provider("anam", Settings(avatar_id="...", api_key_env="ANAM_API_KEY"), outputs)
    fps = await p.start(face)          # session, signalling, offer/answer, ICE, DTLS: returns at the first picture

A *streamed* provider (`paired = False`): Anam plays the agent's voice back itself, in step with the face it
animates, so its audio (`outputs.on_audio`, as aiortc decodes it: 48 kHz stereo int16) and its pictures
(`outputs.on_frame`, scaled to the started size) are published as they come; between turns the stream goes
on with the idle face. Anam's "audio passthrough" mode: no brain, no TTS of Anam's, our voice in.

The protocol, as the `anam` Python SDK (anam-org/python-sdk: src/anam/_api.py, _signalling.py, _streaming.py,
types.py) and the JS SDK (anam-org/javascript-sdk: src/modules/SignallingClient.ts) speak it:

1. `POST {url}/v1/engine/session`, `Authorization: Bearer KEY`, JSON `{clientLabel, personaConfig: {avatarId,
   enableAudioPassthrough: true}}` -> `{sessionId, engineHost, engineProtocol, signallingEndpoint, clientConfig:
   {iceServers, heartbeatIntervalSeconds, ...}}`. 401/403 is `auth`; any other refusal (402 no plan, 429 limits,
   5xx) is `refused`, with its status.
2. The signalling WebSocket `ws[s]://{engineHost's host}{signallingEndpoint}?session_id=ID` (wss unless
   engineProtocol is "http"). Every message is JSON `{actionType, sessionId, payload}`.
3. An aiortc peer connection: a data channel "session", video recvonly, audio sendrecv (nothing is sent on it:
   the voice goes over signalling), the ICE servers of clientConfig (none: no STUN, host candidates only).
   `offer` payload `{connectionDescription: {sdp, type}, userUid: sessionId}`; the server's `answer` payload
   `{sdp, type}`; `icecandidate` payload `{candidate, sdpMid, sdpMLineIndex}` from the server is added (aiortc
   puts its own candidates in the offer: it does not trickle). `heartbeat` (payload "") every
   heartbeatIntervalSeconds (5 s by default). `sessionready` from the server: it takes audio from then on.
4. The voice: `agentaudioinput` payload `{audioData: base64 pcm_s16le, encoding: "pcm_s16le", sampleRate,
   channels: 1, sequenceNumber}`, the sequence counted from 0 in each turn; `agentaudioinputend` (payload {})
   ends the turn and the count starts again. Anam recommends 24 kHz (the SDK warns under 16 and over 24).
5. `endsession` from the server ends the session (reported `closed`); stop() sends one too (payload: a reason
   string, as the server's). The SDKs only close the socket: the server is assumed to take either.

`feed()` queues and returns; one task batches the queue into messages of 40 to 100 ms of audio (the oldest
sample waits at most 40 ms), so a caller's 10 ms chunks are not 100 messages a second, and holds them until
`sessionready` (for at most `timeout` after start: a server that never says it still gets the audio).

Errors, each naming the API's URL and never the key: connection refused or reset `down`, no answer within
`timeout` (the session request, the WebSocket, the first picture) `timeout`, an answer that is not JSON or
lacks a field, or a signalling message that is not JSON, `garbage`. After start, a dropped WebSocket, a closed
peer connection or a track that ends is `closed`, a failed ICE/DTLS connection `down`, reported once through
`outputs.on_error`.

ICE: host candidates are the ones aioice offers (every interface but loopback, or `[avatar] ice_addresses`, which
the avatar service sets for its process); Anam's TURN servers come with the session. The client libraries
(aiohttp, aiortc, av) are imported at start, so the box's config loads on the core without them.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import numpy as np

from services.avatar.providers.base import (
    AvatarError,
    AvatarProvider,
    Face,
    Outputs,
    Pcm,
    Rgb,
    Settings,
    Unavailable,
    avatar_provider,
)

if TYPE_CHECKING:
    import aiohttp
    from aiortc import MediaStreamTrack, RTCIceCandidate, RTCPeerConnection

__all__ = ["AnamProvider"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_URL = "https://api.anam.ai"
DEFAULT_KEY_ENV = "ANAM_API_KEY"
SESSION_PATH = "/v1/engine/session"
CLIENT_LABEL = "edgeroom"
HEARTBEAT_S = 5.0            # the SDKs' default when clientConfig gives none
BATCH_MIN_S = 0.04           # a message carries at least this much audio...
BATCH_MAX_S = 0.1            # ...at most this much...
BATCH_WAIT_S = 0.04          # ...and the oldest sample waits at most this long for the rest
END_TURN = None              # in the send queue: agentaudioinputend


@dataclass(frozen=True)
class Engine:
    """What the session request answered: where to signal, which ICE servers, how often to beat."""
    session_id: str
    signalling_url: str
    ice_servers: list[dict[str, Any]]
    heartbeat_s: float

    @classmethod
    def from_answer(cls, data: Any) -> Engine:
        """Raises ValueError (`garbage`) naming what is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"the session answer is a JSON {type(data).__name__}, not an object")
        for name in ("sessionId", "engineHost", "signallingEndpoint"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise ValueError(f"the session answer has no {name}")
        config = data.get("clientConfig") or {}
        if not isinstance(config, dict):
            raise ValueError("the session answer's clientConfig is not an object")
        ice = config.get("iceServers", data.get("iceServers")) or []
        if not isinstance(ice, list) or not all(isinstance(s, dict) and s.get("urls") for s in ice):
            raise ValueError("the session answer's iceServers is not a list of {urls, username, credential}")
        beat = config.get("heartbeatIntervalSeconds") or HEARTBEAT_S
        if not isinstance(beat, int | float) or beat <= 0:
            raise ValueError(f"the session answer's heartbeatIntervalSeconds is {beat!r}")
        return cls(data["sessionId"], signalling_url(data), ice, float(beat))


def signalling_url(data: dict[str, Any]) -> str:
    """The WebSocket URL as the SDK builds it: the engine host's host name (a scheme before it or a path after it
    dropped), the signalling endpoint's path, `session_id` in the query; an endpoint that is a URL is taken as it is."""
    endpoint, sid = data["signallingEndpoint"], quote(data["sessionId"], safe="")
    if "://" in endpoint:
        base = "ws" + endpoint[4:] if endpoint.startswith("http") else endpoint
    else:
        scheme = "ws" if data.get("engineProtocol") == "http" else "wss"
        host = data["engineHost"].split("://")[-1].split("/")[0]
        base = f"{scheme}://{host}/{endpoint.lstrip('/')}"
    return f"{base}{'&' if '?' in base else '?'}session_id={sid}"


def parse_candidate(payload: Any) -> RTCIceCandidate | None:
    """An icecandidate payload as aiortc's candidate; None for an empty one (the end of the candidates)."""
    from aiortc.sdp import candidate_from_sdp
    if not isinstance(payload, dict) or not isinstance(payload.get("candidate", ""), str):
        raise ValueError("an icecandidate message has no candidate")
    line = payload.get("candidate", "").strip()
    if not line:
        return None
    candidate = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
    candidate.sdpMid, candidate.sdpMLineIndex = payload.get("sdpMid"), payload.get("sdpMLineIndex")
    if candidate.sdpMid is None and candidate.sdpMLineIndex is None:
        candidate.sdpMLineIndex = 0
    return candidate


def audio_pcm(frame: Any) -> Pcm:
    """A decoded audio frame as int16 (samples, channels), whatever its sample layout."""
    channels = len(frame.layout.channels)
    pcm = frame.to_ndarray()
    pcm = pcm.T if frame.format.is_planar else pcm.reshape(-1, channels)
    if pcm.dtype.kind == "f":
        return (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
    return np.ascontiguousarray(pcm, dtype=np.int16)


@avatar_provider("anam", "Anam's cloud avatar: session API, signalling WebSocket, WebRTC media (aiortc)")
class AnamProvider(AvatarProvider):
    paired = False
    default_rate = 24000

    def __init__(self, settings: Settings, outputs: Outputs) -> None:
        super().__init__(settings, outputs)
        self.url = (settings.url or DEFAULT_URL).rstrip("/")
        self.key_env = settings.api_key_env or DEFAULT_KEY_ENV
        self.timeout = settings.timeout
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pc: RTCPeerConnection | None = None
        self._tasks: set[asyncio.Task] = set()
        self._queue: asyncio.Queue[bytes | None] | None = None
        self._first: asyncio.Future[None] | None = None     # the first picture, or the failure before it
        self._ready = asyncio.Event()                      # the server said sessionready
        self._send_lock = asyncio.Lock()
        self._early: list[RTCIceCandidate | None] = []     # candidates that came before the answer
        self._answered = False
        self._engine: Engine | None = None
        self._face: Face | None = None
        self._last: Rgb | None = None
        self._running = self._stopping = self._reported = False
        self._seq = 0
        self.audio_chunks_sent = self.audio_samples_sent = self.turns_ended = 0
        self.frames_received = self.audio_frames_received = self.audio_dropped = 0

    # the contract

    async def start(self, face: Face) -> float:
        await self.stop()
        key, avatar = self._api_key(), self._avatar_id()
        import aiohttp
        self._begin(face)
        try:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout))
            engine = self._engine = await self._step("the session request", self._create_session(key, avatar))
            await self._step("the signalling WebSocket", self._open_signalling(engine))
            await self._step("the WebRTC offer", self._offer(engine))
            assert self._first is not None
            await self._step("the first picture", self._first)
        except BaseException:
            await self.stop()
            raise
        self._running = True
        self._spawn(self._send_audio())
        log.info("anam: session %s at %s: pictures coming", engine.session_id, self.url)
        return face.fps

    async def idle_frame(self) -> Rgb:
        if self._last is None:
            if self._first is None:
                raise AvatarError("closed", self._say("no session: idle_frame() before start()"))
            await self._step("the first picture", asyncio.shield(self._first))
        assert self._last is not None
        return self._last

    def feed(self, pcm: Pcm) -> None:
        if self._queue is None or not self._running or self._reported:   # not started, or broken: nobody listens
            self.audio_dropped += int(np.size(pcm))
            return
        self._queue.put_nowait(np.ascontiguousarray(pcm, dtype="<i2").reshape(-1).tobytes())

    def end_turn(self) -> None:
        if self._queue is not None and self._running and not self._reported:
            self._queue.put_nowait(END_TURN)

    async def stop(self) -> None:
        self._stopping, self._running = True, False
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            if self._engine is not None:
                await self._try(self._signal_on(ws, "endsession", "the avatar was stopped"))
            await self._try(ws.close())
        pc, self._pc = self._pc, None
        if pc is not None:
            await self._try(pc.close())
        http, self._http = self._http, None
        if http is not None:
            await self._try(http.close())
        first, self._first = self._first, None
        if first is not None and not first.cancelled() and first.done():
            first.exception()                              # retrieved: no "never retrieved" warning
        elif first is not None:
            first.cancel()
        self._queue, self._engine = None, None

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "session": self._engine.session_id if self._engine else None,
                "connection": self._pc.connectionState if self._pc else "none", "ready": self._ready.is_set(),
                "audio_chunks_sent": self.audio_chunks_sent, "audio_seconds_sent": self._seconds_sent(),
                "turns_ended": self.turns_ended, "frames_received": self.frames_received,
                "audio_frames_received": self.audio_frames_received, "audio_samples_dropped": self.audio_dropped}

    # starting

    def _api_key(self) -> str:
        key = os.environ.get(self.key_env, "").strip()
        if not key:
            raise Unavailable(f"anam ({self.url}): no API key: set ${self.key_env} to an Anam API key "
                              f"(api_key_env names another variable)")
        return key

    def _avatar_id(self) -> str:
        if not self.settings.avatar_id:
            raise Unavailable(f"anam ({self.url}): no avatar_id: set avatar_id to one of lab.anam.ai/avatars")
        return self.settings.avatar_id

    def _begin(self, face: Face) -> None:
        """A fresh session's state (the counters too: status() tells of this session)."""
        self._face, self._last, self._engine = face, None, None
        self._running = self._stopping = self._reported = self._answered = False
        self._first = asyncio.get_running_loop().create_future()
        self._ready, self._send_lock, self._queue = asyncio.Event(), asyncio.Lock(), asyncio.Queue()
        self._early, self._seq = [], 0
        self.audio_chunks_sent = self.audio_samples_sent = self.turns_ended = 0
        self.frames_received = self.audio_frames_received = self.audio_dropped = 0

    async def _step(self, what: str, step: Awaitable[T]) -> T:
        """One step of start() within `timeout`, its network failures said as AvatarErrors."""
        import aiohttp
        try:
            async with asyncio.timeout(self.timeout):
                return await step
        except TimeoutError:
            raise AvatarError("timeout", self._say(f"{what}: nothing within {self.timeout:g}s")) from None
        except aiohttp.WSServerHandshakeError as e:
            reason = "auth" if e.status in (401, 403) else "refused"
            raise AvatarError(reason, self._say(f"{what}: HTTP {e.status} {e.message}")) from None
        except (aiohttp.ClientError, OSError) as e:
            raise AvatarError("down", self._say(f"{what}: {type(e).__name__}: {e}")) from None

    async def _create_session(self, key: str, avatar: str) -> Engine:
        assert self._http is not None
        body = {"clientLabel": CLIENT_LABEL, "personaConfig": {"avatarId": avatar, "enableAudioPassthrough": True}}
        async with self._http.post(self.url + SESSION_PATH, json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as r:
            text = (await r.text(errors="replace")).replace(key, "***")
            if r.status in (401, 403):
                raise AvatarError("auth", self._say(f"HTTP {r.status}: the API key in ${self.key_env} was refused "
                                                    f"({_clip(text)})"))
            if r.status not in (200, 201):
                raise AvatarError("refused", self._say(f"the session request: HTTP {r.status} {_clip(text)}"))
        try:
            return Engine.from_answer(json.loads(text))
        except ValueError as e:           # json.JSONDecodeError is one
            raise AvatarError("garbage", self._say(f"the session request: {e} ({_clip(text)})")) from None

    async def _open_signalling(self, engine: Engine) -> None:
        assert self._http is not None
        self._ws = await self._http.ws_connect(engine.signalling_url)
        self._spawn(self._read_signals(self._ws))
        self._spawn(self._heartbeat(engine.heartbeat_s))

    async def _offer(self, engine: Engine) -> None:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
        servers = [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
                   for s in engine.ice_servers]
        pc = self._pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_connection_state)
        pc.createDataChannel("session", ordered=True)
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription
        await self._signal("offer", {"connectionDescription": {"sdp": offer.sdp, "type": offer.type},
                                     "userUid": engine.session_id})

    # running

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        """A task's unexpected exception is the session's failure, not a lost log line."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            log.error("anam: a task failed", exc_info=e)
            self._fail("garbage", f"{type(e).__name__}: {e}")

    def _fail(self, reason: str, cause: str) -> None:
        """The session broke: start() raises it if it is still starting, else on_error hears it, once."""
        if self._stopping:
            return
        error = AvatarError(reason, self._say(cause))
        if not self._running:
            if self._first is not None and not self._first.done():
                self._first.set_exception(error)
            return
        if not self._reported:
            self._reported = True
            log.warning("%s", error)
            self.outputs.on_error(error)

    async def _read_signals(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        import aiohttp
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    await self._on_signal(msg.data)
                except ValueError as e:
                    self._fail("garbage", f"signalling: {e}")
                    return
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                              aiohttp.WSMsgType.ERROR):
                break
        self._fail("closed", f"the signalling WebSocket closed (code {ws.close_code})")

    async def _on_signal(self, text: str) -> None:
        """One signalling message from the server; ValueError when it is not what the protocol says."""
        from aiortc import RTCSessionDescription
        message = json.loads(text)
        if not isinstance(message, dict):
            raise ValueError(f"a message is a JSON {type(message).__name__}, not an object")
        action, payload = str(message.get("actionType", "")).lower(), message.get("payload")
        if action == "answer":
            if not isinstance(payload, dict) or not isinstance(payload.get("sdp"), str):
                raise ValueError("the answer has no sdp")
            assert self._pc is not None
            await self._pc.setRemoteDescription(RTCSessionDescription(payload["sdp"], payload.get("type", "answer")))
            self._answered = True
            for candidate in self._early:
                await self._pc.addIceCandidate(candidate)
            self._early.clear()
        elif action == "icecandidate":
            candidate = parse_candidate(payload)
            if self._answered and self._pc is not None:
                await self._pc.addIceCandidate(candidate)
            else:
                self._early.append(candidate)
        elif action == "sessionready":
            self._ready.set()
        elif action == "endsession":
            self._fail("closed", f"the server ended the session ({payload or 'no reason given'})")
        elif action == "warning":
            log.warning("anam (%s): the server warns: %s", self.url, payload)
        elif action != "heartbeat":
            log.debug("anam: signalling %r ignored", action)

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not await self._signal("heartbeat", ""):
                return

    async def _signal(self, action: str, payload: Any) -> bool:
        """Send one signalling message; False (and the failure reported) when the WebSocket is gone."""
        ws = self._ws
        if ws is None:
            return False
        try:
            await self._signal_on(ws, action, payload)
            return True
        except (OSError, RuntimeError) as e:          # aiohttp: ClientConnectionResetError, "closing transport"
            self._fail("closed", f"the signalling WebSocket is gone ({type(e).__name__}: {e})")
            return False

    async def _signal_on(self, ws: aiohttp.ClientWebSocketResponse, action: str, payload: Any) -> None:
        session = self._engine.session_id if self._engine else ""
        async with self._send_lock:
            await ws.send_str(json.dumps({"actionType": action, "sessionId": session, "payload": payload}))

    async def _send_audio(self) -> None:
        """Drain the feed queue into agentaudioinput messages of BATCH_MIN_S..BATCH_MAX_S, after sessionready."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._ready.wait()
        except TimeoutError:
            log.info("anam (%s): no sessionready within %gs: sending the audio anyway", self.url, self.timeout)
        assert self._queue is not None
        loop, queue = asyncio.get_running_loop(), self._queue
        least, most = 2 * round(self.sample_rate * BATCH_MIN_S), 2 * round(self.sample_rate * BATCH_MAX_S)
        buffered, deadline = bytearray(), 0.0
        while True:
            try:
                async with asyncio.timeout_at(deadline if buffered else None):
                    item = await queue.get()
            except TimeoutError:
                item = b""                                  # the oldest sample waited long enough
            if item:
                deadline = deadline if buffered else loop.time() + BATCH_WAIT_S
                buffered += item
            if item is END_TURN or not item or len(buffered) >= least:
                if not await self._send_buffered(buffered, most):
                    return
            if item is END_TURN:
                if not await self._signal("agentaudioinputend", {}):
                    return
                self._seq = 0
                self.turns_ended += 1

    async def _send_buffered(self, buffered: bytearray, most: int) -> bool:
        """Send everything buffered, in messages of at most `most` bytes; empties `buffered`."""
        while buffered:
            chunk = bytes(buffered[:most])
            del buffered[:most]
            payload = {"audioData": base64.b64encode(chunk).decode("ascii"), "encoding": "pcm_s16le",
                       "sampleRate": self.sample_rate, "channels": 1, "sequenceNumber": self._seq}
            if not await self._signal("agentaudioinput", payload):
                return False
            self._seq += 1
            self.audio_chunks_sent += 1
            self.audio_samples_sent += len(chunk) // 2
        return True

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self._spawn(self._pull_video(track))
        elif track.kind == "audio":
            self._spawn(self._pull_audio(track))

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState if self._pc is not None else "closed"
        if state == "failed":
            self._fail("down", "the WebRTC connection failed (ICE or DTLS)")
        elif state == "closed":
            self._fail("closed", "the WebRTC connection closed")

    async def _pull_video(self, track: MediaStreamTrack) -> None:
        """The face's pictures, scaled to the started size, to on_frame; the first one lets start() return."""
        from aiortc.mediastreams import MediaStreamError
        assert self._face is not None
        width, height = self._face.width, self._face.height
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self._fail("closed", "the avatar's video track ended")
                return
            rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
            self._last = rgb
            self.frames_received += 1
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
            if self._running:
                self.outputs.on_frame(rgb)

    async def _pull_audio(self, track: MediaStreamTrack) -> None:
        """The avatar's voice, as aiortc decodes it, to on_audio."""
        from aiortc.mediastreams import MediaStreamError
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self._fail("closed", "the avatar's audio track ended")
                return
            self.audio_frames_received += 1
            if self._running:
                self.outputs.on_audio(audio_pcm(frame), frame.sample_rate)

    # helpers

    def _say(self, cause: str) -> str:
        return f"anam ({self.url}): {cause}"

    def _seconds_sent(self) -> float:
        return round(self.audio_samples_sent / self.sample_rate, 3)

    @staticmethod
    async def _try(step: Awaitable[Any]) -> None:
        """A step of stop(): at most 2 s, and its failure is no reason not to go on releasing the rest."""
        try:
            async with asyncio.timeout(2.0):
                await step
        except Exception as e:
            log.debug("anam: while stopping: %s: %s", type(e).__name__, e)


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
