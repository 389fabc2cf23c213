"""WebSocket video in RoomKit's wire format (services/webrtc/wsformat.py): one client, one session.

    ws = response(limits)                     # max_msg_size, no compression, heartbeat pings
    await ws.prepare(request)
    session = WsVideoSession(ws, session=sid, room=room, sink=sink, reader=reader, limits=limits,
                             metrics=metrics, log=log, loop=loop)
    why = await session.run()                 # closed, idle, too_large, over_rate, "error: ..."
    # the caller owns sink and reader: it closes them (sink.close(), RouteBook.close(sid))

**Inbound** (what the client sends, put on the bus through its `Sink`): h264/vp8 frames are
access units (`sink.encoded`), raw_rgb24 frames pictures (`loan_picture` + one copy +
`send_picture`, their size checked against the last config first). pts and capture_ns are
the arrival time on CLOCK_MONOTONIC (pts in 1/90000 from the first frame). A gap in `seq`
(a message lost or refused on the way) marks the next access unit FLAG_CORRUPT, as RTP's
inbound does after a loss, and asks the client for a keyframe (`{"type":"keyframe_request"}`).
`ask_keyframe(reason)` does the same for the service's `stream.keyframe` offer (a decoder
that lost its reference), at most once a second.

**Outbound** (the session's `RouteReader`, video track): h264/vp8 access units are sent with
their real keyframe flag and codec; raw pictures as raw_rgb24: rgb24 as is, bgr24 and gray
converted with numpy, yuv420p/nv12 (tight, even size: what decode makes) with OpenCV when it
is installed; anything else is dropped and counted (`format`). A `config` text message goes
before the first frame and whenever the codec or size changes. Audio items (track "audio")
are not part of RoomKit's video format: they are read off the route and ignored (counted in
`stats()["audio_ignored"]`); route no audio to a WebSocket session. `seq` counts the binary
messages sent, without gaps: what the box drops for a slow client is always followed by a
keyframe.

**A slow client never adds latency or memory.** One sender task sends (aiohttp's
`send_bytes` waits while the client does not read); frames wait in a queue bounded by
`queue_items`, `queue_bytes` and `queue_seconds`. When it is full a delta is dropped, every
delta after it too until the next keyframe, and the route is asked for one; a keyframe that
finds the queue full replaces what is queued (stale now). Drops are counted by reason.

**Bad input** is counted by reason and never raised out of `run()`: over the rate (the
message dropped; `over_rate_close` of them in a row close the socket, 1008), malformed
(dropped), a raw picture of the wrong size (dropped), larger than `max_message_bytes`
(aiohttp closes the socket with 1009), nothing either way for `idle_timeout_s` while the session has
no video route to wait for (4000; a dead client is dropped by aiohttp's heartbeat).
docs/websocket.md has the protocol, the limits, the close codes and the metrics.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple, cast

import numpy as np
from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.calls.route import Media, RouteReader
from services.capture.sink import Sink
from services.webrtc.wsformat import (
    HEADER_SIZE,
    WsConfig,
    WsError,
    WsFrame,
    config_text,
    frame,
    keyframe_request_text,
    pack_header,
    parse,
    parse_text,
    set_seq,
)

try:   # yuv420p/nv12 -> rgb24; edgeroom[media] brings it
    import cv2
    _CV2_CODES = {"yuv420p": cv2.COLOR_YUV2RGB_I420, "nv12": cv2.COLOR_YUV2RGB_NV12}
except ImportError:  # pragma: no cover
    _CV2_CODES = {}

__all__ = ["CLOSE_IDLE", "WsLimits", "WsMetrics", "WsVideoSession", "raw_frame", "response"]

CLOSE_IDLE = 4000                 # idle_timeout_s with nothing either way
CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_ERROR, CLOSE_GOING_AWAY = 1008, 1009, 1011, 1001
TIME_BASE = Fraction(1, 90000)
ASK_EVERY = 1.0                   # seconds between two keyframe requests to the client
FLOWING = 3.0                     # seconds after its last frame the inbound track is still shown
ROUTE_BATCH = 64                  # route items handled per wake-up (the fd stays readable for the rest)
ENCODED = ("h264", "vp8")
RAW_FORMATS = ("rgb24", "bgr24", "gray", "yuv420p", "nv12")


@dataclass(frozen=True)
class WsLimits:
    max_message_bytes: int = 8 * 1024 * 1024    # one message, header included (a 1080p raw_rgb24 picture fits)
    max_messages_per_s: float = 120.0           # token buckets with one second of burst
    max_bytes_per_s: float = 100_000_000.0      # raw_rgb24 720p at 30/s is 83 MB/s
    over_rate_close: int = 50                   # messages over the rate in a row that close the socket
    idle_timeout_s: float = 30.0                # nothing received, nothing sent and no video route: closed
    queue_items: int = 15                       # the send queue: about 0.5 s of 30/s video
    queue_bytes: int = 16 * 1024 * 1024
    queue_seconds: float = 0.5                  # the oldest queued frame waited this long: the queue is full
    close_timeout_s: float = 2.0                # a close handshake that takes longer drops the connection

    def __post_init__(self) -> None:
        for key, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"websocket limit {key} must be positive, got {value!r}")
        if self.max_bytes_per_s < self.max_message_bytes:
            raise ValueError("websocket limit max_bytes_per_s must allow at least one message of max_message_bytes")


def response(limits: WsLimits, *, heartbeat: float | None = 15.0) -> web.WebSocketResponse:
    """The WebSocketResponse a session needs: the message limit, no permessage-deflate (video does not
    compress; it would cost CPU per frame), pings every `heartbeat` s (a dead client is dropped)."""
    return web.WebSocketResponse(max_msg_size=limits.max_message_bytes, compress=False, heartbeat=heartbeat)


class WsMetrics:
    """The WebSocket video metrics of a service, one set for all its sessions (docs/websocket.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter("edgeroom_websocket_messages", "WebSocket video messages, by direction (in, out) "
                                "and type (binary, text).", ["direction", "type"], registry=registry)
        self.bytes = Counter("edgeroom_websocket_bytes", "Bytes of WebSocket video messages, by direction.",
                             ["direction"], registry=registry)
        self.refused = Counter("edgeroom_websocket_refused_messages", "Messages from clients not taken, by reason.",
                               ["reason"], registry=registry)
        self.dropped = Counter("edgeroom_websocket_dropped_frames", "Frames of a route not sent to a client, by "
                               "reason.", ["reason"], registry=registry)
        self.gaps = Counter("edgeroom_websocket_seq_gaps", "Gaps in the seq of clients' frames (the next access "
                            "unit is marked corrupt).", registry=registry)
        self.keyframe_requests = Counter("edgeroom_websocket_keyframe_requests", "keyframe_request messages, by "
                                         "direction (in: a client asked; out: the box asked a client).",
                                         ["direction"], registry=registry)
        self.sessions = Gauge("edgeroom_websocket_sessions", "WebSocket video sessions open.", registry=registry)
        self.ended = Counter("edgeroom_websocket_sessions_ended", "WebSocket video sessions ended, by why (closed, "
                             "idle, too_large, over_rate, error, cancelled).", ["reason"], registry=registry)


class _Out(NamedTuple):
    buf: bytearray          # header + payload; the seq is stamped when it is sent
    keyframe: bool
    codec: str
    width: int
    height: int
    at: float               # when it was queued (monotonic s)


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def raw_frame(m: Media) -> bytearray | None:
    """A raw picture of a route as a raw_rgb24 frame (seq 0, keyframe): rgb24 copied once into the message
    buffer, bgr24 and gray converted into it with numpy, yuv420p/nv12 (tight, even size) with OpenCV;
    None for anything else (a size that does not match, no OpenCV, another format)."""
    w, h, fmt, data = m.width, m.height, m.codec, m.data
    if fmt == "rgb24":
        return frame(0, True, "raw_rgb24", data) if len(data) == w * h * 3 else None
    src = np.frombuffer(data, np.uint8)
    buf = bytearray(HEADER_SIZE + w * h * 3)
    buf[:HEADER_SIZE] = pack_header(0, True, "raw_rgb24")
    out = np.frombuffer(buf, np.uint8, offset=HEADER_SIZE).reshape(h, w, 3)
    if fmt == "bgr24" and src.size == w * h * 3:
        np.copyto(out, src.reshape(h, w, 3)[..., ::-1])
    elif fmt == "gray" and src.size == w * h:
        np.copyto(out, src.reshape(h, w, 1))
    elif fmt in _CV2_CODES and w % 2 == 0 and h % 2 == 0 and src.size == w * h * 3 // 2:
        made = cv2.cvtColor(src.reshape(h * 3 // 2, w), _CV2_CODES[fmt], dst=out)
        if made.ctypes.data != out.ctypes.data:   # OpenCV made its own: copy it in
            np.copyto(out, made)
    else:
        return None
    return buf


class WsVideoSession:
    """One WebSocket client = one session of a room (see the module's docstring). Not thread-safe: the loop's."""

    def __init__(self, ws: web.WebSocketResponse, *, session: str, room: str, sink: Sink,
                 reader: RouteReader | None, limits: WsLimits, metrics: WsMetrics, log: logging.Logger,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.ws, self.session, self.room, self.sink, self.reader = ws, session, room, sink, reader
        self.limits, self.metrics, self.log, self.loop = limits, metrics, log, loop
        m = metrics
        self._m_in = (m.messages.labels("in", "binary"), m.messages.labels("in", "text"), m.bytes.labels("in"))
        self._m_out = (m.messages.labels("out", "binary"), m.messages.labels("out", "text"), m.bytes.labels("out"))
        self.counts: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        now = time.monotonic()
        self._last_in = self._last_out = now
        self._end: tuple[int, str, str] | None = None      # (close code, close text, what run() returns)
        self._tasks: set[asyncio.Task[None]] = set()
        # inbound
        self._config: WsConfig | None = None
        self._seq: int | None = None
        self._corrupt_next = False
        self._t0_ns: int | None = None
        self._units = 0
        self._inbound: tuple[str, int, int] | None = None   # format, width, height of the last frame taken
        self._inbound_at = 0.0
        self._msg_tokens, self._byte_tokens, self._tokens_at = limits.max_messages_per_s, limits.max_bytes_per_s, now
        self._over = 0
        self._asked_at = -ASK_EVERY
        # outbound
        self._queue: collections.deque[_Out] = collections.deque()
        self._queued_bytes = self.peak_items = self.peak_bytes = 0
        self._control: collections.deque[str] = collections.deque(maxlen=8)
        self._wake = asyncio.Event()
        self._need_key = False
        self._out_seq = 0
        self._sent_config: tuple[str, int, int] | None = None

    # ------------------------------------------------------------------ the session
    async def run(self) -> str:
        """Serve the client until the socket closes; why it ended. Never raises (but CancelledError)."""
        self.metrics.sessions.inc()
        sender = self.loop.create_task(self._send_loop(), name=f"ws-send {self.session}")
        fd = self.reader.fileno() if self.reader is not None else None
        why = "cancelled"
        try:
            if fd is not None:
                self.loop.add_reader(fd, self._on_route)
            why = await self._receive_loop()
        except Exception as exc:
            self.log.exception("websocket %s: %s", self.session, exc)
            why = f"error: {exc}"
            await self._close(CLOSE_ERROR, "internal error")
        finally:
            if fd is not None:
                self.loop.remove_reader(fd)
            for task in (sender, *self._tasks):
                task.cancel()
            await asyncio.gather(sender, *self._tasks, return_exceptions=True)
            self._queue.clear()
            self._queued_bytes = 0
            if not self.ws.closed:
                await self._close(CLOSE_GOING_AWAY if why == "cancelled" else 1000, why)
            self.metrics.sessions.dec()
            self.metrics.ended.labels(why.split(":", 1)[0]).inc()
            self.log.info("websocket %s (room %s) ended: %s", self.session, self.room, why)
        return why

    async def close(self, code: int = CLOSE_GOING_AWAY, message: str = "going away") -> None:
        """End the session from the box (the service stops, the session is removed): run() returns "closed"."""
        self._finish(code, message, "closed")
        await self._close(code, message)

    def _finish(self, code: int, text: str, why: str) -> None:
        if self._end is None:
            self._end = (code, text, why)

    def _fail(self, why: str) -> None:
        """End from a callback (no await there): close in a task."""
        self._finish(CLOSE_ERROR, "internal error", why)
        task = self.loop.create_task(self._close(CLOSE_ERROR, "internal error"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, code: int, text: str) -> None:
        if self.ws.closed:
            return
        try:
            async with asyncio.timeout(self.limits.close_timeout_s):
                await self.ws.close(code=code, message=text.encode()[:120])
        except (TimeoutError, ConnectionError, RuntimeError):
            pass  # aiohttp dropped the connection: nothing more to say to it

    async def _receive_loop(self) -> str:
        ws, limits = self.ws, self.limits
        while True:
            if self._end is not None:
                await self._close(self._end[0], self._end[1])
                return self._end[2]
            left = max(self._last_in, self._last_out) + limits.idle_timeout_s - time.monotonic()
            if left <= 0 and self.reader is not None and self.reader.route.video:
                self._last_in, left = time.monotonic(), limits.idle_timeout_s   # a viewer waits for its route
            if left <= 0:
                self._finish(CLOSE_IDLE, f"idle: nothing for {limits.idle_timeout_s:g} s", "idle")
                continue
            try:
                msg = await ws.receive(timeout=max(left, 0.001))
            except TimeoutError:
                continue
            if msg.type is WSMsgType.BINARY:
                self._binary(msg.data)
            elif msg.type is WSMsgType.TEXT:
                self._text(msg.data)
            elif msg.type is WSMsgType.ERROR:
                exc = msg.data
                if isinstance(exc, WebSocketError) and exc.code == CLOSE_TOO_BIG:   # aiohttp closed with 1009
                    self._refuse("too_large", str(exc))
                    return "too_large"
                if isinstance(exc, TimeoutError):   # the heartbeat's ping was not answered: a dead or stuck client
                    return "idle"
                return self._end[2] if self._end is not None else f"error: {exc}"
            else:  # CLOSE, CLOSING, CLOSED: the client or the box closed
                return self._end[2] if self._end is not None else "closed"

    # ------------------------------------------------------------------ inbound
    def _afford(self, size: int) -> bool:
        """Token buckets (messages and bytes, one second of burst); `over_rate_close` refusals in a row end it."""
        lim, now = self.limits, time.monotonic()
        dt, self._tokens_at = now - self._tokens_at, now
        self._msg_tokens = min(lim.max_messages_per_s, self._msg_tokens + dt * lim.max_messages_per_s)
        self._byte_tokens = min(lim.max_bytes_per_s, self._byte_tokens + dt * lim.max_bytes_per_s)
        if self._msg_tokens >= 1 and self._byte_tokens >= size:
            self._msg_tokens -= 1
            self._byte_tokens -= size
            self._over = 0
            return True
        self._over += 1
        self._refuse("over_rate", f"over {lim.max_messages_per_s:g} messages/s or {lim.max_bytes_per_s:g} bytes/s")
        if self._over >= lim.over_rate_close:
            self._finish(CLOSE_POLICY, f"over_rate: {self._over} messages over the rate in a row", "over_rate")
        return False

    def _refuse(self, reason: str, why: str = "") -> None:
        self.metrics.refused.labels(reason).inc()
        self.refused[reason] += 1
        level = logging.WARNING if self.refused[reason] == 1 else logging.DEBUG
        self.log.log(level, "websocket %s: message refused (%s)%s", self.session, reason, f": {why}" if why else "")

    def _binary(self, data: bytes) -> None:
        self._last_in = time.monotonic()
        self._m_in[0].inc()
        self._m_in[2].inc(len(data))
        self.counts["messages_in"] += 1
        self.counts["bytes_in"] += len(data)
        if not self._afford(len(data)):
            return
        try:
            f = parse(data)
        except WsError as exc:
            self._refuse(exc.reason, str(exc))
            return
        if f is None:
            self._refuse("short", "5 bytes or less: ignored, as RoomKit does")
            return
        encoded = f.codec in ENCODED
        if self._seq is not None and f.seq != (self._seq + 1) & 0xFFFFFFFF:
            self.metrics.gaps.inc()
            self.counts["seq_gaps"] += 1
            if encoded:
                self._corrupt_next = True
                self.ask_keyframe(f"seq gap: {self._seq} then {f.seq}")
        self._seq = f.seq
        arrival = _now_ns()
        if self._t0_ns is None:
            self._t0_ns = arrival
        pts = (arrival - self._t0_ns) * 9 // 100_000
        if encoded:
            self._unit(f, pts, arrival)
        else:
            self._picture(f, pts, arrival)

    def _unit(self, f: WsFrame, pts: int, arrival: int) -> None:
        cfg = self._config
        w, h = (cfg.width, cfg.height) if cfg is not None and cfg.codec == f.codec else (0, 0)
        if not self._units and not f.keyframe:
            self.ask_keyframe("the stream began without a keyframe")
        corrupt, self._corrupt_next = self._corrupt_next, False
        if not self.sink.encoded(f.payload, f.codec, keyframe=f.keyframe, pts=pts, time_base=TIME_BASE,
                                 capture_ns=arrival, width=w, height=h, corrupt=corrupt):
            self._refuse("bus", "the sink did not take the access unit")
            return
        self._took(f.codec, w, h, f.keyframe)

    def _picture(self, f: WsFrame, pts: int, arrival: int) -> None:
        cfg = self._config
        if cfg is None or cfg.codec != "raw_rgb24":
            self._refuse("no_config", "a raw_rgb24 frame before a raw_rgb24 config said its width and height")
            return
        w, h = cfg.width, cfg.height
        if f.payload.nbytes != w * h * 3:
            self._refuse("wrong_size", f"a {w}x{h} raw_rgb24 payload is {w * h * 3} bytes, got {f.payload.nbytes}")
            return
        loan = self.sink.loan_picture(w, h, "rgb24")
        try:
            np.copyto(loan.array, np.frombuffer(f.payload, np.uint8).reshape(h, w, 3))
        except BaseException:
            loan.abort()
            raise
        self.sink.send_picture(loan, pts=pts, time_base=TIME_BASE, capture_ns=arrival)
        self._took("rgb24", w, h, True)

    def _took(self, fmt: str, w: int, h: int, keyframe: bool) -> None:
        self._units += 1
        self.counts["frames_in"] += 1
        self.counts["keyframes_in"] += keyframe
        self._inbound, self._inbound_at = (fmt, w, h), time.monotonic()

    def _text(self, data: str) -> None:
        self._last_in = time.monotonic()
        size = len(data.encode())
        self._m_in[1].inc()
        self._m_in[2].inc(size)
        self.counts["messages_in"] += 1
        self.counts["bytes_in"] += size
        if not self._afford(size):
            return
        try:
            msg = parse_text(data)
        except WsError as exc:
            self._refuse(exc.reason, str(exc))
            return
        if isinstance(msg, WsConfig):
            if msg.codec == "raw_rgb24" and msg.width * msg.height * 3 + HEADER_SIZE > self.limits.max_message_bytes:
                self._refuse("bad_size", f"a {msg.width}x{msg.height} raw_rgb24 frame would be over the "
                                         f"{self.limits.max_message_bytes}-byte message limit")
                return
            self._config = msg
            return
        self.metrics.keyframe_requests.labels("in").inc()
        self.counts["keyframe_requests_in"] += 1
        if self.reader is not None:
            self.reader.request_keyframe("websocket")

    def ask_keyframe(self, reason: str) -> str:
        """Ask the client for a keyframe of what it sends (the `stream.keyframe` offer, a seq gap); at most
        once a second. Returns what was done: "keyframe_request", "throttled" or "closed"."""
        if self._end is not None or self.ws.closed:
            return "closed"
        now = time.monotonic()
        if now - self._asked_at < ASK_EVERY:
            return "throttled"
        self._asked_at = now
        self._control.append(keyframe_request_text(reason))
        self._wake.set()
        self.metrics.keyframe_requests.labels("out").inc()
        self.counts["keyframe_requests_out"] += 1
        return "keyframe_request"

    # ------------------------------------------------------------------ outbound
    def _on_route(self) -> None:
        """The route's fd is readable: queue what it hands out (a batch; the fd stays readable for more)."""
        reader = self.reader
        assert reader is not None
        try:
            for _ in range(ROUTE_BATCH):
                media = reader.poll()
                if media is None:
                    return
                if media.track != "video":
                    self.counts["audio_ignored"] += 1
                    continue
                self._offer(media)
        except Exception as exc:
            self.log.exception("websocket %s: route: %s", self.session, exc)
            self.loop.remove_reader(reader.fileno())
            self._fail(f"error: route: {exc}")

    def _drop(self, reason: str, n: int = 1) -> None:
        self.metrics.dropped.labels(reason).inc(n)
        self.dropped[reason] += n

    def _offer(self, m: Media) -> None:
        raw = m.codec in RAW_FORMATS
        if not raw and m.codec not in ENCODED:
            self._drop("codec")
            return
        keyframe = raw or m.keyframe
        if self._need_key and not keyframe:
            self._drop("await_keyframe")
            self._ask_route()
            return
        size = HEADER_SIZE + (m.width * m.height * 3 if raw else len(m.data))
        now = time.monotonic()
        q, lim = self._queue, self.limits
        if q and (len(q) >= lim.queue_items or self._queued_bytes + size > lim.queue_bytes
                  or now - q[0].at > lim.queue_seconds):
            if not keyframe:
                self._drop("queue_full")
                self._need_key = True
                self._ask_route()
                return
            self._drop("superseded", len(q))    # a keyframe: what waits is stale, and not needed to decode it
            q.clear()
            self._queued_bytes = 0
        buf = raw_frame(m) if raw else frame(0, m.keyframe, m.codec, m.data)
        if buf is None:
            self._drop("format")
            return
        self._need_key = False if keyframe else self._need_key
        q.append(_Out(buf, keyframe, "raw_rgb24" if raw else m.codec, m.width, m.height, now))
        self._queued_bytes += len(buf)
        self.peak_items, self.peak_bytes = max(self.peak_items, len(q)), max(self.peak_bytes, self._queued_bytes)
        self._wake.set()

    def _ask_route(self) -> None:
        if self.reader is not None:
            self.reader.request_keyframe("slow client")   # the route asks the producer at most once a second

    async def _send_loop(self) -> None:
        """The one sender: keyframe requests first, then frames in order, each after its config if it changed."""
        ws, (m_bin, m_text, m_bytes) = self.ws, self._m_out
        try:
            while True:
                if not self._control and not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if ws.closed:
                    return
                if self._control:
                    text = self._control.popleft()
                    await ws.send_str(text)
                    m_text.inc()
                    m_bytes.inc(len(text))
                else:
                    item = self._queue.popleft()
                    self._queued_bytes -= len(item.buf)
                    config = (item.codec, item.width, item.height)
                    if config != self._sent_config:
                        text = config_text(*config)
                        await ws.send_str(text)
                        self._sent_config = config
                        m_text.inc()
                        m_bytes.inc(len(text))
                    set_seq(item.buf, self._out_seq)
                    self._out_seq = (self._out_seq + 1) & 0xFFFFFFFF
                    await ws.send_bytes(cast(bytes, item.buf))   # aiohttp takes a bytearray as it is
                    m_bin.inc()
                    m_bytes.inc(len(item.buf))
                    self.counts["frames_out"] += 1
                    self.counts["keyframes_out"] += item.keyframe
                    self.counts["bytes_out"] += len(item.buf)
                self.counts["messages_out"] += 1
                self._last_out = time.monotonic()
        except (ConnectionError, RuntimeError):
            return   # the connection went: the receive side sees it and ends the session
        except Exception as exc:
            self.log.exception("websocket %s: send: %s", self.session, exc)
            self._finish(CLOSE_ERROR, "internal error", f"error: send: {exc}")
            await self._close(CLOSE_ERROR, "internal error")

    # ------------------------------------------------------------------ status
    def tracks(self) -> list[dict[str, Any]]:
        """The inbound video track while frames flow, then the route's send tracks."""
        out: list[dict[str, Any]] = []
        if self._inbound is not None and time.monotonic() - self._inbound_at <= FLOWING:
            fmt, w, h = self._inbound
            out.append({"id": "video", "kind": "video", "direction": "recv", "stream": self.sink.stream,
                        "format": fmt, "width": w, "height": h})
        return out + (self.reader.tracks() if self.reader is not None else [])

    def stats(self) -> dict[str, Any]:
        """Counters for `ctl`: messages, bytes and frames each way, refusals and drops by reason, the queue."""
        return {**{k: self.counts[k] for k in ("messages_in", "bytes_in", "frames_in", "keyframes_in", "seq_gaps",
                                               "messages_out", "bytes_out", "frames_out", "keyframes_out",
                                               "keyframe_requests_in", "keyframe_requests_out", "audio_ignored")},
                "refused": dict(self.refused), "dropped": dict(self.dropped),
                "queue": {"items": len(self._queue), "bytes": self._queued_bytes, "peak_items": self.peak_items,
                          "peak_bytes": self.peak_bytes}}

    def describe(self) -> dict[str, Any]:
        """The session for the heartbeat (id, room, kind, tracks) with its counters."""
        return {"id": self.session, "room": self.room, "kind": "call", "tracks": self.tracks(),
                "counters": self.stats()}
