"""A reference avatar server for the tests: RoomKit's WebSocket avatar protocol, with a mouth that follows loudness.

    with AvatarServer() as server:             # 127.0.0.1, a port of its own (or port=P), its own thread and loop
        url = server.url                       # http://127.0.0.1:PORT
        server.delay = 0.2                     # misbehave: each stream message answered 0.2 s late
        server.starts, server.sample_rates, server.images   # what the clients sent

The protocol (services/avatar/providers/websocket.py): `POST /start` {reference_image, width, height,
sample_rate} answers {"fps"}; `GET /idle_frame`; `POST /stop`; `WS /ws/stream`: PCM16 LE in; for each message,
one frame per 1/fps of audio received so far (a server buffers what is not a whole frame yet), then an empty
message; an empty message from the client flushes: the partial frame's audio gets a frame too.

The face: the reference image the client sent (decoded: a test can tell it was really sent), scaled to the
asked size, with a black mouth box in its lower middle whose open height follows the RMS of the frame's
audio: closed (a thin line) below -50 dBFS, fully open at -10 dBFS. `mouth_opening(rgb)` reads it back from
any picture of the face (scaled, decoded from H.264), as 0 (closed) to 1 (wide open).

Misbehaviour, for the tests of a provider that is down, slow or answers garbage: `refuse` (HTTP 503 on
/start and /idle_frame), `delay` (seconds before each stream message is answered), `garbage` (frames whose size
does not match their header), `drop_after` (close the stream after that many messages).
"""
from __future__ import annotations

import asyncio
import base64
import io
import threading

import av
import numpy as np
from aiohttp import WSMsgType, web

from services.avatar.providers.websocket import encode_frame

__all__ = ["AvatarServer", "MOUTH", "mouth_opening", "face_picture"]

MOUTH = (0.35, 0.65, 0.60, 0.85)      # the mouth's box: x0, x1, y0, y1 as fractions of the picture
CLOSED_DB, OPEN_DB = -50.0, -10.0
BACKGROUND = (40, 90, 160)


def face_picture(reference: np.ndarray | None, width: int, height: int, opening: float) -> np.ndarray:
    """The face at width x height with the mouth open by `opening` (0..1): numpy slices, no pixel loops."""
    if reference is None:
        rgb = np.empty((height, width, 3), np.uint8)
        rgb[:] = BACKGROUND
    else:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(reference), format="rgb24")
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
    x0, x1, y0, y1 = (int(f * n) for f, n in zip(MOUTH, (width, width, height, height), strict=True))
    rgb[y0:y1, x0:x1] = (230, 190, 160)                       # lips' surround: light
    mid = (y0 + y1) // 2
    half = max(1, int(round(opening * (y1 - y0) / 2)))
    rgb[mid - half:mid + half, x0:x1] = (0, 0, 0)              # the open mouth: black
    return rgb


def mouth_opening(rgb: np.ndarray) -> float:
    """How open the mouth is in a picture of the face (any size, lossy codecs included): 0 closed .. 1 wide."""
    h, w = rgb.shape[:2]
    x0, x1, y0, y1 = (int(f * n) for f, n in zip(MOUTH, (w, w, h, h), strict=True))
    inner = rgb[y0 + 1:y1 - 1, x0 + (x1 - x0) // 4:x1 - (x1 - x0) // 4].astype(np.int32).sum(axis=2)
    dark_rows = (inner < 150).mean(axis=1) > 0.5
    return float(dark_rows.mean())


def opening_of(pcm: np.ndarray) -> float:
    """The mouth opening for a frame's audio (int16 mono)."""
    if len(pcm) == 0:
        return 0.0
    rms = float(np.sqrt(np.mean(np.square(pcm.astype(np.float64))))) / 32768.0
    db = 20 * np.log10(max(rms, 1e-9))
    return float(np.clip((db - CLOSED_DB) / (OPEN_DB - CLOSED_DB), 0.0, 1.0))


class AvatarServer:
    def __init__(self, fps: float = 25.0, port: int = 0) -> None:
        self.fps = fps
        self.refuse = False
        self.delay = 0.0
        self.garbage = False
        self.drop_after = 0
        self.starts = 0
        self.stops = 0
        self.sample_rates: list[int] = []
        self.images: list[tuple[int, int]] = []    # (height, width) of each reference image decoded
        self.messages = 0
        self.flushes = 0
        self.frames_sent = 0
        self.connections = 0
        self.size = (512, 512)
        self.rate = 16000
        self.reference: np.ndarray | None = None
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="avatar-server", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ HTTP
    async def _start(self, request: web.Request) -> web.Response:
        if self.refuse:
            return web.Response(status=503, text="the model is loading")
        body = await request.json()
        self.size = (int(body["width"]), int(body["height"]))
        self.rate = int(body.get("sample_rate", 16000))
        self.sample_rates.append(self.rate)
        image = base64.b64decode(body.get("reference_image", ""))
        self.reference = None
        if image:
            with av.open(io.BytesIO(image)) as c:
                self.reference = next(c.decode(video=0)).to_ndarray(format="rgb24")
            self.images.append(self.reference.shape[:2])
        self.starts += 1
        return web.json_response({"fps": self.fps})

    async def _idle(self, _request: web.Request) -> web.Response:
        if self.refuse:
            return web.Response(status=503, text="the model is loading")
        return web.Response(body=encode_frame(face_picture(self.reference, *self.size, 0.0)))

    async def _stop(self, _request: web.Request) -> web.Response:
        self.stops += 1
        return web.json_response({})

    # ------------------------------------------------------------ the stream
    async def _stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.connections += 1
        buf = np.zeros(0, np.int16)
        made = 0                           # frames made for this connection's audio
        got = 0                            # samples received
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            self.messages += 1
            if self.drop_after and self.messages >= self.drop_after:
                await ws.close()
                break
            if self.delay:
                await asyncio.sleep(self.delay)
            frames: list[bytes] = []
            if msg.data:
                buf = np.concatenate((buf, np.frombuffer(msg.data, "<i2")))
                got += len(msg.data) // 2
                due = int(got * self.fps / self.rate)       # one frame per 1/fps of the audio so far
                while made < due:
                    n = int((made + 1) * self.rate / self.fps) - int(made * self.rate / self.fps)
                    frames.append(self._frame(buf[:n]))
                    buf = buf[n:]
                    made += 1
            else:
                self.flushes += 1
                if len(buf):                                 # the partial frame's audio gets its frame
                    frames.append(self._frame(buf))
                    made += 1
                    got = int(made * self.rate / self.fps)
                    buf = buf[:0]
            for f in frames:
                await ws.send_bytes(f)
            await ws.send_bytes(b"")
        return ws

    def _frame(self, pcm: np.ndarray) -> bytes:
        self.frames_sent += 1
        data = encode_frame(face_picture(self.reference, *self.size, opening_of(pcm)))
        return data[:-7] if self.garbage else data

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes([web.post("/start", self._start), web.get("/idle_frame", self._idle),
                        web.post("/stop", self._stop), web.get("/ws/stream", self._stream)])
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]      # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    def start(self) -> AvatarServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the avatar server did not start")
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> AvatarServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

