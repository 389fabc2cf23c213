"""RoomKit's WebSocket avatar protocol: any animation server that speaks it (MuseTalk, Wav2Lip, SadTalker...).

The protocol, exactly as RoomKit's `WebSocketAvatarProvider` speaks it (roomkit/video/avatar/websocket.py):

    POST {url}/start       JSON {reference_image: base64, width, height, sample_rate}; the reply may give fps
    GET  {url}/idle_frame  one frame: [u16 BE width][u16 BE height][width x height x 3 bytes RGB24]
    POST {url}/stop
    WS   {url}/ws/stream   binary PCM16 LE mono in; frames out in the same format as /idle_frame; an empty
                           binary message from the server ends the frames of one message, an empty one from
                           the client asks the server to flush what it buffered

What this provider does better than RoomKit's:

* **The reference image is sent** (RoomKit starts with an empty one) and `fps` is sent too (a server that does
  not know the key ignores it); a reply's `fps` and `sample_rate` are honoured.
* **Non-blocking.** RoomKit sends one chunk and waits for its frames (one round trip per chunk, on a thread).
  Here a sender task drains a queue and a reader task takes frames as they come: audio keeps flowing while
  frames come back, and a slow server delays frames, not the audio the service publishes (services/avatar/).
* **Errors are named and reported once.** A server that is down, that answers garbage (a reply that is not the
  JSON it should be, a frame whose size does not match its header), that closes the stream or that falls more
  than MAX_BACKLOG_S of audio behind is an `AvatarError` with the URL and the cause; the service reconnects
  with backoff and shows idle frames meanwhile.

Frames of another size than the face's are scaled to it (FFmpeg's swscale, through PyAV).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
from collections import deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from services.avatar.providers.base import AvatarError, AvatarProvider, Face, Rgb, avatar_provider, fit

__all__ = ["WebSocketProvider", "decode_frame", "encode_frame"]

HEADER = struct.Struct("!HH")
MAX_BACKLOG_S = 3.0           # audio queued or sent without a frame back: the server is not keeping up
MAX_BAD_FRAMES = 3            # malformed frames in a row before the stream is given up as garbage
MAX_SIDE = 4096


def encode_frame(rgb: Rgb) -> bytes:
    """The wire format of a frame: [u16 BE width][u16 BE height][RGB24]."""
    h, w = rgb.shape[:2]
    return HEADER.pack(w, h) + np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()


def decode_frame(data: bytes) -> Rgb:
    """A frame of the wire format as an (H, W, 3) array (a view of `data`); ValueError saying what is wrong."""
    if len(data) <= HEADER.size:
        raise ValueError(f"a frame of {len(data)} bytes has no picture")
    w, h = HEADER.unpack_from(data)
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise ValueError(f"a frame says it is {w}x{h}")
    if len(data) - HEADER.size != w * h * 3:
        raise ValueError(f"a frame says {w}x{h} (RGB24: {w * h * 3} bytes) but carries {len(data) - HEADER.size}")
    return np.frombuffer(data, np.uint8, offset=HEADER.size).reshape(h, w, 3)


def _ws_url(base: str, path: str) -> str:
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


@avatar_provider("websocket", "RoomKit's WebSocket avatar protocol: any animation server that speaks it")
class WebSocketProvider(AvatarProvider):
    paired = True
    default_rate = 16000      # what RoomKit's servers are written for; the rate is said in /start either way

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.base = self.settings.url.rstrip("/")
        self.face: Face | None = None
        self.http: Any = None
        self.ws: Any = None
        self.queue: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.failed = False
        self.sent_samples = 0          # audio sent since start (samples)
        self.frames = self.batches = self.bad_in_row = self.bad_frames = 0
        self.queued_samples = 0
        self.fps = 0.0

    # ------------------------------------------------------------ lifecycle
    def _error(self, reason: str, what: str) -> AvatarError:
        return AvatarError(reason, f"websocket avatar at {self.base}: {what}")

    async def start(self, face: Face) -> float:
        import aiohttp
        if not self.base.startswith(("http://", "https://")):
            raise self._error("refused", "url must be http:// or https:// (the server's base URL)")
        self.face = face
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        self.http = aiohttp.ClientSession(timeout=timeout)
        body = {"reference_image": base64.b64encode(face.image).decode(), "width": face.width,
                "height": face.height, "sample_rate": self.sample_rate, "fps": face.fps}
        reply = await self._request("POST", "/start", json=body)
        fps = face.fps
        if reply:
            try:
                doc = json.loads(reply)
            except ValueError:
                raise self._error("garbage", f"/start answered {reply[:80]!r}, not JSON") from None
            if not isinstance(doc, dict):
                raise self._error("garbage", f"/start answered {reply[:80]!r}, not a JSON object")
            got = doc.get("fps", fps)
            if isinstance(got, bool) or not isinstance(got, int | float) or not 1 <= got <= 120:
                raise self._error("garbage", f"/start says fps {got!r} (1 to 120 expected)")
            fps = float(got)
            rate = doc.get("sample_rate")
            if isinstance(rate, int) and not isinstance(rate, bool) and 8000 <= rate <= 48000:
                self.sample_rate = rate
        try:
            self.ws = await self.http.ws_connect(_ws_url(self.base, "/ws/stream"), max_msg_size=0,
                                                 timeout=aiohttp.ClientWSTimeout(ws_close=1.0))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._connect_error("/ws/stream", exc) from None
        self.fps = fps
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._send(), name="avatar ws send"),
                      loop.create_task(self._read(), name="avatar ws read")]
        return fps

    def _connect_error(self, path: str, exc: BaseException) -> AvatarError:
        if isinstance(exc, TimeoutError):
            return self._error("timeout", f"{path}: no answer within {self.settings.timeout:g} s")
        return self._error("down", f"{path}: {exc.__class__.__name__}: {exc}")

    async def _request(self, method: str, path: str, **kw: Any) -> bytes:
        import aiohttp
        try:
            async with self.http.request(method, self.base + path, **kw) as resp:
                data = await resp.read()
                if resp.status in (401, 403):
                    raise self._error("auth", f"{path}: HTTP {resp.status}")
                if resp.status >= 400:
                    text = data[:120].decode("utf-8", "replace")
                    raise self._error("down" if resp.status >= 500 else "refused", f"{path}: HTTP {resp.status} "
                                      f"{text!r}")
                return bytes(data)
        except AvatarError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._connect_error(path, exc) from None

    async def idle_frame(self) -> Rgb:
        assert self.face is not None
        data = await self._request("GET", "/idle_frame")
        try:
            rgb = decode_frame(data)
        except ValueError as exc:
            raise self._error("garbage", f"/idle_frame: {exc}") from None
        return fit(rgb, self.face.width, self.face.height)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        self.tasks = []
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 1.0)
            self.ws = None
        if self.http is not None:
            if self.face is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._request("POST", "/stop"), 1.0)
            await self.http.close()
            self.http = None
        self.queue.clear()
        self.queued_samples = 0

    # ------------------------------------------------------------ audio out, frames in
    def feed(self, pcm: Any) -> None:
        if len(pcm):
            self.queue.append(np.ascontiguousarray(pcm, dtype="<i2").tobytes())
            self.queued_samples += len(pcm)
            self.wake.set()

    def end_turn(self) -> None:
        self.queue.append(b"")
        self.wake.set()

    async def _send(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.queue:
                    data = self.queue.popleft()
                    self.queued_samples -= len(data) // 2
                    await self.ws.send_bytes(data)
                    self.sent_samples += len(data) // 2
                    behind = self.sent_samples / self.sample_rate - self.frames / self.fps
                    if behind > MAX_BACKLOG_S:
                        self._fail(self._error("timeout", f"{behind:.1f} s of audio sent without its frames back: "
                                                          "the server does not keep up"))
                        return
        except Exception as exc:    # whatever the connection raises ends this stream, never the service
            self._fail(self._error("closed", f"sending audio: {exc.__class__.__name__}: {exc}"))

    async def _read(self) -> None:
        try:
            await self._frames()
        except Exception as exc:    # whatever the connection raises ends this stream, never the service
            self._fail(self._error("closed", f"reading frames: {exc.__class__.__name__}: {exc}"))

    async def _frames(self) -> None:
        import aiohttp
        assert self.face is not None
        w, h = self.face.width, self.face.height
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._bad(f"a text message on the stream ({msg.data[:60]!r})")
                    if self.failed:
                        return
                    continue
                break
            if not msg.data:
                self.batches += 1
                continue
            try:
                rgb = decode_frame(msg.data)
            except ValueError as exc:
                self._bad(str(exc))
                if self.failed:
                    return
                continue
            self.bad_in_row = 0
            self.frames += 1
            self.outputs.on_frame(fit(rgb, w, h))
            if self.failed:
                return
        self._fail(self._error("closed", f"the stream closed ({self.ws.close_code or 'no close code'})"))

    def _bad(self, why: str) -> None:
        self.bad_frames += 1
        self.bad_in_row += 1
        if self.bad_in_row >= MAX_BAD_FRAMES:
            self._fail(self._error("garbage", f"{self.bad_in_row} malformed frames in a row, the last: {why}"))

    def _fail(self, error: AvatarError) -> None:
        if not self.failed:
            self.failed = True
            self.outputs.on_error(error)

    def status(self) -> dict[str, Any]:
        return {"url": self.base, "sample_rate": self.sample_rate, "audio_sent_s": round(self.sent_samples /
                self.sample_rate, 2), "frames": self.frames, "bad_frames": self.bad_frames,
                "queued_s": round(self.queued_samples / self.sample_rate, 3)}
