"""WebSocket video in RoomKit's wire format: the format itself, then WsVideoSession with real parts: a
real aiohttp server on 127.0.0.1 hosting the sessions, a real WebSocket client (aiohttp's), real framebus
rings under a private prefix, a real RouteReader, real H.264 made by PyAV's libx264."""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from fractions import Fraction
from socket import SO_RCVBUF, SO_SNDBUF, SOL_SOCKET
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

import framebus
from services.calls.config import Route
from services.calls.route import Media, RouteMetrics, RouteReader
from services.capture.sink import Sink, SinkMetrics
from services.webrtc import wsformat as wf
from services.webrtc.wsvideo import CLOSE_IDLE, WsLimits, WsMetrics, WsVideoSession, raw_frame, response

W, H = 128, 96


# ------------------------------------------------------------------ the wire format
@pytest.mark.parametrize("codec, cid", [("h264", 0), ("vp8", 1), ("raw_rgb24", 2)])
@pytest.mark.parametrize("key", [False, True])
def test_header_round_trips_every_codec_and_the_keyframe_flag(codec, cid, key):
    header = wf.pack_header(0x01020304, key, codec)
    assert header == bytes([(cid << 1) | key, 1, 2, 3, 4])
    f = wf.parse(header + b"payload")
    assert (f.seq, f.keyframe, f.codec, bytes(f.payload)) == (0x01020304, key, codec, b"payload")
    buf = wf.frame(7, key, codec, b"xyz")
    wf.set_seq(buf, 2**32 + 9)          # seq wraps
    assert bytes(buf) == wf.pack_header(9, key, codec) + b"xyz"


def test_short_messages_are_ignored_and_bad_headers_are_named():
    for n in range(6):
        assert wf.parse(bytes(n)) is None          # 5 bytes or less: ignored, as RoomKit does
    assert wf.parse(bytes(6)).payload.nbytes == 1
    for flags, reason in ((3 << 1, "unknown_codec"), (7 << 1 | 1, "unknown_codec"), (0x10, "reserved_flags"),
                          (0x80 | 2, "reserved_flags")):
        with pytest.raises(wf.WsError) as err:
            wf.parse(bytes([flags]) + bytes(10))
        assert err.value.reason == reason, flags
    with pytest.raises(wf.WsError, match="not one of"):
        wf.pack_header(0, False, "h265")


def test_text_messages_parse_and_build_with_named_errors():
    assert wf.parse_text(wf.config_text("raw_rgb24", 640, 480)) == wf.WsConfig("raw_rgb24", 640, 480)
    assert wf.parse_text('{"type":"config","codec":"h264"}') == wf.WsConfig("h264", 0, 0)
    assert wf.parse_text(wf.keyframe_request_text()) == wf.WsKeyframeRequest("")
    assert wf.parse_text(wf.keyframe_request_text("loss")) == wf.WsKeyframeRequest("loss")
    for text, reason in (("{", "bad_json"), ("[1]", "bad_json"), (b"\xff", "bad_json"),
                         ('{"type":"hello"}', "unknown_type"), ('{"codec":"h264"}', "unknown_type"),
                         ('{"type":"config","codec":"av1"}', "bad_codec"),
                         ('{"type":"config","codec":"raw_rgb24","width":64}', "bad_size"),
                         ('{"type":"config","codec":"h264","width":-1,"height":2}', "bad_size"),
                         ('{"type":"config","codec":"vp8","width":true,"height":2}', "bad_size"),
                         ('{"type":"config","codec":"vp8","width":99999,"height":2}', "bad_size")):
        with pytest.raises(wf.WsError) as err:
            wf.parse_text(text)
        assert err.value.reason == reason, text


def test_limits_are_checked():
    with pytest.raises(ValueError, match="queue_items"):
        WsLimits(queue_items=0)
    with pytest.raises(ValueError, match="max_bytes_per_s"):
        WsLimits(max_message_bytes=1000, max_bytes_per_s=10)


# ------------------------------------------------------------------ real parts
class _Count:
    def __init__(self) -> None:
        self.n = 0

    def inc(self, k: int = 1) -> None:
        self.n += k

    def observe(self, _v: float) -> None:
        self.n += 1

    def labels(self, *_: str) -> _Count:
        return self


def h264(n: int, gop: int = 10) -> tuple[list[np.ndarray], list[tuple[bytes, bool]]]:
    """n pictures and their access units (Annex B, one per picture) from libx264."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = W, H, "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, 30), Fraction(30)
    enc.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(gop), "bf": "0"}
    pics, aus = [], []
    x = np.arange(W, dtype=np.int32)[None, :, None]
    y = np.arange(H, dtype=np.int32)[:, None, None]
    for i in range(n):
        pic = np.broadcast_to(((x * 2 + y + i * 8 + np.array([0, 60, 120])) % 256), (H, W, 3)).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(pic, format="rgb24")
        frame.pts = i
        pics.append(pic)
        aus += [(bytes(p), p.is_keyframe) for p in enc.encode(frame)]
    aus += [(bytes(p), p.is_keyframe) for p in enc.encode(None)]
    assert len(aus) == n
    return pics, aus


def decode(units: list[bytes]) -> list[np.ndarray]:
    dec = av.CodecContext.create("h264", "r")
    out = []
    for u in units:
        out += [f.to_ndarray(format="rgb24") for f in dec.decode(av.Packet(u))]
    return out


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) < 12


class Box:
    """The lead's server in small: GET /ws/{room}/{session} runs a WsVideoSession per client."""

    def __init__(self, prefix: str, limits: WsLimits, routes: dict[str, Route] | None = None) -> None:
        self.prefix, self.limits = prefix, limits
        self.registry = CollectorRegistry()
        self.metrics = WsMetrics(self.registry)
        self.route_metrics = RouteMetrics(self.registry)
        self.asked: list[tuple[str, str]] = []
        self.on_ask: Callable[[str, str], None] = lambda s, r: None
        self.routes = routes or {}
        self.sinks: dict[str, Sink] = {}
        self.readers: dict[str, RouteReader] = {}
        self.sessions: dict[str, WsVideoSession] = {}
        self.results: dict[str, str] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.tune: Callable[[web.Request], None] = lambda r: None
        self.runner: web.AppRunner | None = None
        self.url = ""

    def ask(self, stream: str, reason: str) -> None:
        self.asked.append((stream, reason))
        self.on_ask(stream, reason)

    async def __aenter__(self) -> Box:
        app = web.Application()
        app.router.add_get("/ws/{room}/{session}", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/ws"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()
        for r in self.readers.values():
            r.close()
        for s in self.sinks.values():
            s.close()

    def sink(self, sid: str) -> Sink:
        if sid not in self.sinks:
            self.sinks[sid] = Sink(sid, self.prefix, SinkMetrics(*(_Count() for _ in range(7))))
        return self.sinks[sid]

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        sid, room = request.match_info["session"], request.match_info["room"]
        ws = response(self.limits)
        await ws.prepare(request)
        self.tune(request)
        if sid in self.routes and sid not in self.readers:
            self.readers[sid] = RouteReader(sid, self.routes[sid], prefix=self.prefix, ask=self.ask,
                                            metrics=self.route_metrics, video_codecs=("h264", "vp8"),
                                            raw_video=True, warn=print)
        session = WsVideoSession(ws, session=sid, room=room, sink=self.sink(sid), reader=self.readers.get(sid),
                                 limits=self.limits, metrics=self.metrics, log=logging.getLogger("test.ws"),
                                 loop=asyncio.get_running_loop())
        self.sessions[sid] = session
        self.started.setdefault(sid, asyncio.Event()).set()
        self.results[sid] = await session.run()
        return ws

    async def session(self, sid: str) -> WsVideoSession:
        await asyncio.wait_for(self.started.setdefault(sid, asyncio.Event()).wait(), 5)
        return self.sessions[sid]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(test(), 20)
    asyncio.run(main())


def read_all(stream: str, prefix: str) -> list[tuple[Any, ...]]:
    c = framebus.Consumer.attach(stream, prefix=prefix, start="oldest")
    try:
        out = []
        while (item := c.poll()) is not None:
            out.append((item.copy(), item.keyframe, item.flags, item.width, item.height, item.time_base,
                        item.capture_ns))
        return out
    finally:
        c.close()


async def client(http: aiohttp.ClientSession, box: Box, sid: str, room: str = "lobby"
                 ) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(f"{box.url}/{room}/{sid}", max_msg_size=0, compress=0)


async def next_message(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await asyncio.wait_for(ws.receive(), 5)


# ------------------------------------------------------------------ inbound
def test_h264_from_the_client_lands_on_the_bus_with_its_keyframes_and_a_gap_marks_the_next_unit_corrupt(prefix):
    pics, aus = h264(20)

    async def test() -> None:
        async with Box(prefix, WsLimits()) as box, aiohttp.ClientSession() as http:
            ws = await client(http, box, "call1")
            await ws.send_str(wf.config_text("h264", W, H))
            for seq, (au, key) in enumerate(aus):
                await ws.send_bytes(wf.pack_header(seq, key, "h264") + au)
            sink = box.sink("call1")
            await until(lambda: sink.frames == 20)
            items = read_all("call1", prefix)
            assert [bytes(i[0]) for i in items] == [au for au, _ in aus]
            assert [i[1] for i in items] == [k for _, k in aus] and items[0][1] and sum(i[1] for i in items) == 2
            assert {(i[3], i[4], i[5]) for i in items} == {(W, H, Fraction(1, 90000))}
            assert all(i[2] & framebus.FLAG_CORRUPT == 0 for i in items)
            assert [i[6] for i in items] == sorted(i[6] for i in items)     # arrival on CLOCK_MONOTONIC
            got = decode([bytes(i[0]) for i in items])
            assert len(got) == 20 and all(close_to(a, b) for a, b in zip(got, pics))
            session = await box.session("call1")
            assert session.tracks() == [{"id": "video", "kind": "video", "direction": "recv", "stream": "call1",
                                         "format": "h264", "width": W, "height": H}]
            # seq 20..22 never come: the box asks the client for a keyframe, and the next unit is corrupt
            await ws.send_bytes(wf.pack_header(23, False, "h264") + aus[1][0])
            msg = await next_message(ws)
            assert msg.type is WSMsgType.TEXT and json.loads(msg.data)["type"] == "keyframe_request"
            await until(lambda: sink.frames == 21)
            c = framebus.Consumer.attach("call1", prefix=prefix, start="oldest")
            last = None
            while (item := c.poll()) is not None:
                last = item.flags
            c.close()
            assert last is not None and last & framebus.FLAG_CORRUPT
            assert box.metric("edgeroom_websocket_seq_gaps_total") == 1
            assert session.stats()["keyframe_requests_out"] == 1
            await ws.close()
            await until(lambda: "call1" in box.results)
            assert box.results["call1"] == "closed"
            assert box.metric("edgeroom_websocket_messages_total", direction="in", type="binary") == 21
    run(test)


def test_raw_rgb24_from_the_client_is_the_picture_on_the_bus(prefix):
    rng = np.random.default_rng(1)
    pics = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(3)]

    async def test() -> None:
        async with Box(prefix, WsLimits()) as box, aiohttp.ClientSession() as http:
            ws = await client(http, box, "cam9")
            await ws.send_bytes(wf.pack_header(0, True, "raw_rgb24") + pics[0].tobytes())   # no config yet
            await ws.send_str(wf.config_text("raw_rgb24", 32, 24))
            for seq, pic in enumerate(pics, 1):
                await ws.send_bytes(wf.pack_header(seq, True, "raw_rgb24") + pic.tobytes())
            await ws.send_bytes(wf.pack_header(4, True, "raw_rgb24") + bytes(32 * 24 * 3 - 1))   # wrong size
            await ws.send_str(wf.config_text("raw_rgb24", 4000, 4000))   # 48 MB a frame: over the message limit
            await until(lambda: sum(box.sessions["cam9"].refused.values()) == 3 if "cam9" in box.sessions else False)
            session = box.sessions["cam9"]
            assert session.refused == {"no_config": 1, "wrong_size": 1, "bad_size": 1}
            items = read_all("cam9", prefix)
            assert len(items) == 3 and all(np.array_equal(i[0], p) for i, p in zip(items, pics))
            assert session.tracks()[0]["format"] == "rgb24"
            await ws.close()
    run(test)


# ------------------------------------------------------------------ outbound
def test_an_h264_route_reaches_the_client_with_real_keyframe_flags_and_decodes(prefix):
    pics, aus = h264(25)

    async def test() -> None:
        cam = framebus.Producer.create("cam", "encoded", payload=1 << 20, slots=64, prefix=prefix)
        try:
            async with Box(prefix, WsLimits(), {"s1": Route(video="cam", audio="cam-audio")}) as box, \
                    aiohttp.ClientSession() as http:
                ws = await client(http, box, "s1")
                await box.session("s1")
                for au, key in aus:
                    cam.publish_encoded(au, "h264", keyframe=key, width=W, height=H)
                    await asyncio.sleep(0.005)           # a camera: the session sends as they come
                msg = await next_message(ws)
                assert json.loads(msg.data) == {"type": "config", "codec": "h264", "width": W, "height": H}
                frames = []
                while len(frames) < 25:
                    msg = await next_message(ws)
                    assert msg.type is WSMsgType.BINARY
                    frames.append(wf.parse(msg.data))
                assert [f.seq for f in frames] == list(range(25))
                assert {f.codec for f in frames} == {"h264"}
                assert [f.keyframe for f in frames] == [k for _, k in aus]
                assert [bytes(f.payload) for f in frames] == [au for au, _ in aus]
                got = decode([bytes(f.payload) for f in frames])
                assert len(got) == 25 and all(close_to(a, b) for a, b in zip(got, pics))
                assert box.sessions["s1"].tracks() == [
                    {"id": "send-video", "kind": "video", "direction": "send", "stream": "cam", "state": "sending"},
                    {"id": "send-audio", "kind": "audio", "direction": "send", "stream": "cam-audio",
                     "state": "waiting"}]
                await ws.close()
        finally:
            cam.close()
    run(test)


def test_a_raw_route_reaches_the_client_as_raw_rgb24_with_a_config_on_each_size(prefix):
    rng = np.random.default_rng(2)
    pics = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(2)]
    big = rng.integers(0, 256, (16, 48, 3), dtype=np.uint8)

    async def test() -> None:
        cam = framebus.Producer.create("cam-raw", "video", payload=32 * 24 * 3, slots=8, prefix=prefix)
        cam2 = framebus.Producer.create("cam2-raw", "video", payload=48 * 16 * 3, slots=8, prefix=prefix)
        try:
            async with Box(prefix, WsLimits(), {"s1": Route(video="cam-raw")}) as box, \
                    aiohttp.ClientSession() as http:
                ws = await client(http, box, "s1")
                session = await box.session("s1")
                for p in pics:
                    cam.publish_picture(p)
                got = [await next_message(ws) for _ in range(3)]
                assert json.loads(got[0].data) == {"type": "config", "codec": "raw_rgb24", "width": 32, "height": 24}
                for msg, p, seq in zip(got[1:], pics, range(2)):
                    f = wf.parse(msg.data)
                    assert (f.seq, f.codec, f.keyframe) == (seq, "raw_rgb24", True)
                    assert bytes(f.payload) == p.tobytes()
                box.readers["s1"].set(video="cam2-raw")     # raw pictures switch at once
                cam2.publish_picture(big[..., ::-1].copy(), "bgr24")   # converted to rgb24 on the way
                got = [await next_message(ws) for _ in range(2)]
                assert json.loads(got[0].data) == {"type": "config", "codec": "raw_rgb24", "width": 48, "height": 16}
                assert bytes(wf.parse(got[1].data).payload) == big.tobytes()
                assert session.stats()["frames_out"] == 3
                await ws.close()
        finally:
            cam.close()
            cam2.close()
    run(test)


def test_raw_formats_are_converted_to_rgb24_or_dropped():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    expect = cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)

    def media(fmt: str, data: bytes, w: int = 32, h: int = 16) -> Media:
        return Media("video", "x", data, fmt, True, 0, 0, Fraction(1, 90000), w, h, 0, 0, 0, False)

    for fmt, data, want in (("rgb24", rgb.tobytes(), rgb), ("bgr24", rgb[..., ::-1].tobytes(), rgb),
                            ("gray", rgb[..., 0].tobytes(), np.repeat(rgb[..., :1], 3, axis=2)),
                            ("yuv420p", i420.tobytes(), expect)):
        buf = raw_frame(media(fmt, data))
        assert buf is not None and bytes(buf[:5]) == wf.pack_header(0, True, "raw_rgb24"), fmt
        assert bytes(buf[5:]) == want.tobytes(), fmt
    assert raw_frame(media("yuv420p", i420.tobytes()[:-1])) is None
    assert raw_frame(media("rgb24", rgb.tobytes()[:-3])) is None


def test_keyframe_requests_go_both_ways(prefix):
    async def test() -> None:
        async with Box(prefix, WsLimits(), {"s1": Route(video="cam")}) as box, aiohttp.ClientSession() as http:
            ws = await client(http, box, "s1")          # cam has no producer yet: asks are never throttled
            session = await box.session("s1")
            box.asked.clear()
            await ws.send_str('{"type":"keyframe_request"}')
            await until(lambda: box.asked == [("cam", "websocket")])
            assert box.metric("edgeroom_websocket_keyframe_requests_total", direction="in") == 1
            assert session.ask_keyframe("decode lost its reference") == "keyframe_request"
            assert session.ask_keyframe("again") == "throttled"       # at most once a second
            msg = await next_message(ws)
            assert json.loads(msg.data) == {"type": "keyframe_request", "reason": "decode lost its reference"}
            await ws.close()
            await until(lambda: "s1" in box.results)
            assert session.ask_keyframe("after") == "closed"
    run(test)


# ------------------------------------------------------------------ bad input
def test_bad_input_is_counted_and_an_oversized_message_closes_that_socket_only(prefix):
    limits = WsLimits(max_message_bytes=64 * 1024, max_messages_per_s=20, max_bytes_per_s=1e6, over_rate_close=1000)

    async def test() -> None:
        async with Box(prefix, limits) as box, aiohttp.ClientSession() as http:
            bad, good = await client(http, box, "bad"), await client(http, box, "good")
            await bad.send_bytes(bytes([3 << 1]) + bytes(10))          # codec id 3
            await bad.send_bytes(bytes([0x10]) + bytes(10))            # a reserved bit
            await bad.send_bytes(b"abc")                               # 5 bytes or less: ignored
            await bad.send_str("{not json")
            await bad.send_str('{"type":"subscribe"}')
            for seq in range(40):                                      # 5 above went in: 15 more fit the burst
                await bad.send_bytes(wf.pack_header(seq, seq == 0, "h264") + b"\x00\x00\x00\x01\x65")
            await until(lambda: box.metric("edgeroom_websocket_refused_messages_total", reason="over_rate") >= 5)
            session = box.sessions["bad"]
            assert {k: session.refused[k] for k in ("unknown_codec", "reserved_flags", "short", "bad_json",
                                                    "unknown_type")} == dict.fromkeys(
                ("unknown_codec", "reserved_flags", "short", "bad_json", "unknown_type"), 1)
            assert not bad.closed
            await bad.send_bytes(bytes(100_000))                       # over max_message_bytes
            msg = await next_message(bad)
            assert msg.type is WSMsgType.CLOSE and msg.data == 1009
            await until(lambda: "bad" in box.results)
            assert box.results["bad"] == "too_large"
            assert box.metric("edgeroom_websocket_refused_messages_total", reason="too_large") == 1
            # the other session goes on
            await good.send_bytes(wf.pack_header(0, True, "h264") + b"\x00\x00\x00\x01\x65\x88")
            await until(lambda: box.sink("good").frames == 1)
            assert not good.closed and "good" not in box.results
            assert box.metric("edgeroom_websocket_sessions") == 1
            await good.close()
            await until(lambda: "good" in box.results)
            assert box.metric("edgeroom_websocket_sessions") == 0
            assert box.metric("edgeroom_websocket_sessions_ended_total", reason="too_large") == 1
    run(test)


def test_a_client_over_the_rate_is_closed_and_an_idle_one_too(prefix):
    limits = WsLimits(max_messages_per_s=10, over_rate_close=5, idle_timeout_s=0.3)

    async def test() -> None:
        async with Box(prefix, limits, {"viewer": Route(video="nocam")}) as box, aiohttp.ClientSession() as http:
            fast, idle = await client(http, box, "fast"), await client(http, box, "idle")
            viewer = await client(http, box, "viewer")    # waits for its route's stream: not idle
            for seq in range(30):
                await fast.send_bytes(wf.pack_header(seq, True, "vp8") + b"\x10\x02\x00")
            msg = await next_message(fast)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1008) and msg.extra.startswith("over_rate")
            msg = await next_message(idle)
            assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, CLOSE_IDLE, "idle: nothing for 0.3 s")
            await until(lambda: len(box.results) == 2)
            assert box.results == {"fast": "over_rate", "idle": "idle"}
            assert box.sessions["fast"].refused["over_rate"] >= 5 and 10 <= box.sink("fast").frames <= 12
            await asyncio.sleep(0.4)
            assert not viewer.closed and "viewer" not in box.results
            await viewer.close()
    run(test)


# ------------------------------------------------------------------ a slow client
def test_a_client_that_stops_reading_costs_a_bounded_queue_and_gets_a_keyframe_first_when_it_reads_again(prefix):
    limits = WsLimits(queue_items=6, queue_bytes=2 * 1024 * 1024, queue_seconds=0.5)
    size = 128 * 1024

    async def test() -> None:
        cam = framebus.Producer.create("cam", "encoded", payload=size + 64, slots=256, prefix=prefix)
        want_key = [True]
        try:
            async with Box(prefix, limits, {"s1": Route(video="cam")}) as box, aiohttp.ClientSession() as http:
                box.on_ask = lambda stream, reason: want_key.__setitem__(0, True)
                # small socket buffers, so that a client that does not read blocks the box's sends soon
                box.tune = lambda r: r.transport.get_extra_info("socket").setsockopt(SOL_SOCKET, SO_SNDBUF, 1 << 16)
                ws = await client(http, box, "s1")
                ws.get_extra_info("socket").setsockopt(SOL_SOCKET, SO_RCVBUF, 1 << 16)
                session = await box.session("s1")
                filler = bytes(size)

                def publish(n: int, force: bool = False) -> None:
                    key = force or want_key[0] or n % 100 == 0
                    want_key[0] = False
                    cam.publish_encoded(struct.pack(">I", n) + filler, "h264", keyframe=key, width=W, height=H)

                for n in range(150):                    # the client reads nothing meanwhile
                    publish(n)
                    await asyncio.sleep(0.008)           # 1.2 s: past the route's 1 s between asks
                    assert len(session._queue) <= limits.queue_items
                    assert session._queued_bytes <= limits.queue_bytes
                dropped = session.stats()["dropped"]
                assert dropped.get("queue_full", 0) >= 1, dropped
                assert sum(dropped.values()) >= 20, dropped
                assert box.metric("edgeroom_websocket_dropped_frames_total", reason="queue_full") >= 1
                assert any(reason == "slow client" for _, reason in box.asked)
                assert session.peak_items <= limits.queue_items and session.peak_bytes <= limits.queue_bytes
                publish(150, force=True)                  # the end: a keyframe, so that it is sent
                got: list[wf.WsFrame] = []                # it reads again
                while not got or struct.unpack(">I", got[-1].payload[:4])[0] < 150:
                    msg = await next_message(ws)
                    if msg.type is WSMsgType.BINARY:
                        got.append(wf.parse(msg.data))
                ns = [struct.unpack(">I", f.payload[:4])[0] for f in got]
                assert [f.seq for f in got] == list(range(len(got)))      # seq has no gaps
                assert got[0].keyframe
                jumps = [i for i in range(1, len(ns)) if ns[i] != ns[i - 1] + 1]
                assert jumps, ns                                          # frames were dropped for it ...
                assert all(got[i].keyframe for i in jumps), (ns, [f.keyframe for f in got])   # ... then a keyframe
                await ws.close()
        finally:
            cam.close()
    run(test)
