"""The box's web page (services/webrtc/web/) in real headless Chromium, against a stand-in
box: an aiohttp server in the test that serves the page's three files, answers /api/* with
fixed JSON, streams Server-Sent Events, and answers WHEP and room calls with aiortc
(a generated orange picture). The lead's tests run the page against the real box too.

Loopback only: aioice leaves 127.0.0.1 out of its host candidates (``get_host_addresses``
skips it), so the stand-in patches ``aioice.ice.get_host_addresses`` to offer 127.0.0.1 and
nothing else; Chromium reaches it thanks to the harness's flags (tests/browser.py)."""
from __future__ import annotations

import asyncio
import fractions
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from tests.browser import Browser, Page, Served, available, serve

pytestmark = pytest.mark.skipif(not available(), reason="chromium is not installed (scripts/test installs it)")

aiortc = pytest.importorskip("aiortc")
av = pytest.importorskip("av")

WEB = Path(__file__).parent.parent / "services" / "webrtc" / "web"
TOKEN = "s3cret-token"
ORANGE = (255, 128, 0)

STREAMS = [
    {"stream": "synthetic", "kind": "encoded", "status": "alive", "rate_hz": 30.0, "service": "capture@synthetic"},
    {"stream": "synthetic-audio", "kind": "audio", "status": "alive", "rate_hz": 50.0, "service": "capture@synthetic"},
    {"stream": "synthetic-raw", "kind": "video", "status": "alive", "rate_hz": 30.0, "service": "decode@synthetic"},
]
ROOMS = {
    "default": [{"session": "synthetic", "room": "default", "service": "capture@synthetic", "kind": "camera",
                 "since": 1718000000.1, "tracks": [{"id": "video", "kind": "video", "stream": "synthetic",
                                                    "format": "h264"}]}],
    "lobby": [{"session": "<b>bold</b>", "room": "lobby", "service": "sip", "kind": "call", "tracks": []}],
}
STATUS = {"box": "edgeroom", "services": [
    {"service": "capture@synthetic", "state": "ready", "status": "30.0 fps"},
    {"service": "vision", "state": "starting"},
    {"service": "recorder", "state": "failed", "status": "<script>alert(1)</script>"},
]}


class ColourTrack(aiortc.mediastreams.VideoStreamTrack):  # type: ignore[misc]
    """320x240 orange frames with a moving dark bar."""

    async def recv(self) -> Any:
        pts, time_base = await self.next_timestamp()
        picture = np.empty((240, 320, 3), np.uint8)
        picture[:] = ORANGE
        x = (pts // 3000) % 300
        picture[:, x:x + 20] = 40
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        frame.pts, frame.time_base = pts, fractions.Fraction(time_base)
        return frame


class StandInBox:
    def __init__(self) -> None:
        self.pcs: dict[str, Any] = {}
        self.ids = itertools.count(1)
        self.listeners: list[asyncio.Queue[dict[str, Any] | None]] = []
        self.deleted: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (room, session)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth])
        for name in ("index.html", "app.js", "style.css"):
            app.router.add_get("/" + ("" if name == "index.html" else name), self.file(name))
        for path, value in (("streams", STREAMS), ("rooms", ROOMS), ("status", STATUS)):
            app.router.add_get(f"/api/{path}", self.json(value))
        app.router.add_get("/api/events", self.events)
        app.router.add_post("/whep/{stream}", self.whep)
        app.router.add_post("/rooms/{room}/call", self.call)
        app.router.add_delete("/whep/{stream}/{id}", self.delete)
        app.router.add_delete("/rooms/{room}/call/{id}", self.delete)
        return app

    @staticmethod
    def file(name: str) -> Any:
        async def handler(request: web.Request) -> web.FileResponse:
            return web.FileResponse(WEB / name)
        return handler

    @staticmethod
    def json(value: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(value)
        return handler

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(("/api", "/whep", "/rooms")):
            ok = request.headers.get("Authorization") == f"Bearer {TOKEN}"
            ok = ok or (request.path == "/api/events" and request.query.get("access_token") == TOKEN)
            if not ok:
                return web.json_response({"error": "unknown token"}, status=401)
        return await handler(request)  # type: ignore[no-any-return]

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.listeners.append(queue)
        try:
            await response.write(b": hello\n\n")
            while (ev := await queue.get()) is not None:
                await response.write(f"event: {ev['topic']}\ndata: {json.dumps(ev)}\n\n".encode())
        finally:
            self.listeners.remove(queue)
        return response

    async def publish(self, topic: str, data: dict[str, Any]) -> None:
        for queue in self.listeners:
            queue.put_nowait({"topic": topic, "source": "test", "time": 1718000100.5, "data": data})

    async def answer(self, request: web.Request, path: str) -> web.Response:
        assert request.content_type == "application/sdp"
        pc = aiortc.RTCPeerConnection()
        await pc.setRemoteDescription(aiortc.RTCSessionDescription(await request.text(), "offer"))
        pc.addTrack(ColourTrack())  # onto the offer's video transceiver; the audio one stays unanswered
        await pc.setLocalDescription(await pc.createAnswer())
        location = f"{path}/{next(self.ids)}"
        self.pcs[location] = pc
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": location})

    async def whep(self, request: web.Request) -> web.Response:
        return await self.answer(request, f"/whep/{request.match_info['stream']}")

    async def call(self, request: web.Request) -> web.Response:
        self.calls.append((request.match_info["room"], request.query["session"]))
        return await self.answer(request, f"/rooms/{request.match_info['room']}/call")

    async def delete(self, request: web.Request) -> web.Response:
        self.deleted.append(request.path)
        pc = self.pcs.pop(request.path, None)
        if pc is None:
            return web.json_response({"error": "no such session"}, status=404)
        await pc.close()
        return web.Response(status=204)

    async def close(self) -> None:
        for queue in self.listeners:
            queue.put_nowait(None)  # end the event streams
        for pc in self.pcs.values():
            await pc.close()


@pytest.fixture
def box(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[StandInBox, Served]]:
    # aioice skips loopback: offer 127.0.0.1 only, so nothing but loopback can connect
    monkeypatch.setattr("aioice.ice.get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    stand_in = StandInBox()
    with serve(stand_in.app()) as served:
        yield stand_in, served
        served.call(stand_in.close())


@pytest.fixture
def browser() -> Iterator[Browser]:
    with Browser() as b:
        yield b


def frames_decoded(page: Page, pc: str) -> int:
    return int(page.evaluate(f"""(async () => {{
      const pc = {pc}; let n = 0;
      if (pc) (await pc.getStats()).forEach(s => {{
        if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0; }});
      return n; }})()"""))


def wait_frames(page: Page, pc: str, more_than: int, timeout: float = 10) -> int:
    page.wait_for(f"window.edgeroom && {pc} && {pc}.connectionState === 'connected'", timeout)
    page.wait_for(f"""(async () => {{ let n = 0; (await {pc}.getStats()).forEach(s => {{
        if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0; }});
        return n > {more_than}; }})()""", timeout)
    return frames_decoded(page, pc)


def orange(pixels: np.ndarray) -> bool:
    h, w, _ = pixels.shape
    middle = pixels[h // 4: 3 * h // 4, w // 3: 2 * w // 3].reshape(-1, 3).astype(float)
    r, g, b = np.median(middle, axis=0)
    return bool(r > 200 and 80 < g < 180 and b < 80)


def until(condition: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def text(page: Page, selector: str) -> str:
    return str(page.evaluate(f"document.querySelector({json.dumps(selector)})?.textContent ?? ''"))


def test_page_shows_the_box_and_plays_whep(box: tuple[StandInBox, Served], browser: Browser) -> None:
    stand_in, served = box
    page = browser.open(f"{served.url}/?token={TOKEN}")
    try:
        page.wait_for("document.querySelectorAll('#streams figure').length === 2 && "
                      "document.querySelectorAll('#services tbody tr').length === 3")
        assert page.evaluate("location.search") == ""  # the token left the address bar
        assert page.evaluate("localStorage.getItem('edgeroom.token')") == TOKEN
        assert page.evaluate("[...document.querySelectorAll('#streams figure')].map(f => f.dataset.stream)") == [
            "synthetic", "synthetic-raw"]  # no player for -audio
        rooms = text(page, "#rooms")
        assert "default" in rooms and "capture@synthetic" in rooms and "video: synthetic (h264)" in rooms
        assert "<b>bold</b>" in rooms and page.evaluate("document.querySelector('#rooms b')") is None  # escaped
        services = text(page, "#services")
        assert "<script>alert(1)</script>" in services and "failed" in services
        assert page.evaluate("document.querySelectorAll('#rooms button.join').length") == 2

        # the WHEP players play: frames decoded go up, and the picture is the stand-in's orange
        pc = "window.edgeroom.players['synthetic']"
        first = wait_frames(page, pc, 3)
        wait_frames(page, pc, first + 5)
        wait_frames(page, "window.edgeroom.players['synthetic-raw']", 3)
        page.wait_for("document.querySelector('figure[data-stream=synthetic] video').videoWidth === 320")
        assert orange(page.screenshot("figure[data-stream=synthetic] video")), "the player's picture is not orange"

        # events arrive by SSE, newest first
        until(lambda: stand_in.listeners)
        served.call(stand_in.publish("hook.ON_VIDEO_DETECTION", {
            "stream": "synthetic-raw", "room": "default", "labels": ["person"], "confidence": 0.91,
            "detections": [{"label": "person", "confidence": 0.91, "box": [10, 20, 100, 200]}]}))
        served.call(stand_in.publish("hook.ON_VISION_RESULT", {
            "stream": "synthetic-raw", "room": "default", "question": "what is there?",
            "result": {"description": "A person <at> a desk.", "labels": ["person", "desk"]}}))
        page.wait_for("document.querySelectorAll('#events li').length === 2")
        assert page.evaluate("[...document.querySelectorAll('#events li')].map(li => li.dataset.topic)") == [
            "hook.ON_VISION_RESULT", "hook.ON_VIDEO_DETECTION"]
        events = text(page, "#events")
        assert "A person <at> a desk." in events and "person 91%" in events and "asked: what is there?" in events
        assert page.evaluate("window.edgeroom.events.length") == 2

        # leaving the page hangs the players up
        page.goto("about:blank", wait=False)
        until(lambda: len(stand_in.deleted) >= 2)
        assert sorted(p.rsplit("/", 1)[0] for p in stand_in.deleted) == ["/whep/synthetic", "/whep/synthetic-raw"]
        assert not stand_in.pcs
    except BaseException:
        print("\n".join(page.console))
        raise


def test_wrong_token_asks_again(box: tuple[StandInBox, Served], browser: Browser) -> None:
    _, served = box
    page = browser.open(f"{served.url}/?token=wrong")
    try:
        page.wait_for("!document.getElementById('login').hidden && document.getElementById('app').hidden")
        page.wait_for("document.getElementById('token-error').textContent.includes('unknown token')")
        assert page.evaluate("localStorage.getItem('edgeroom.token')") is None
        assert page.evaluate("Object.keys(window.edgeroom.players).length") == 0
        page.evaluate(f"""document.getElementById('token-input').value = {json.dumps(TOKEN)};
                          document.getElementById('token-form').requestSubmit()""")
        page.wait_for("document.getElementById('login').hidden && !document.getElementById('app').hidden")
        page.wait_for("document.querySelectorAll('#streams figure').length === 2")
        assert page.evaluate("localStorage.getItem('edgeroom.token')") == TOKEN
    except BaseException:
        print("\n".join(page.console))
        raise


def test_join_a_room(box: tuple[StandInBox, Served], browser: Browser) -> None:
    stand_in, served = box
    page = browser.open(f"{served.url}/?token={TOKEN}")
    try:
        page.wait_for("document.querySelector('#rooms .room[data-room=lobby] button.join')")
        page.evaluate("document.querySelector('#rooms .room[data-room=lobby] button.join').click()")
        wait_frames(page, "window.edgeroom.joined", 3)
        assert [room for room, _ in stand_in.calls] == ["lobby"] and stand_in.calls[0][1].startswith("web-")
        assert not page.evaluate("document.getElementById('call-section').hidden")
        assert page.evaluate("document.getElementById('local-video').srcObject.getTracks().length") == 2
        page.wait_for("document.querySelector('#rooms .room[data-room=default] button.join').disabled")
        page.wait_for("document.getElementById('remote-video').videoWidth === 320")
        assert orange(page.screenshot("#remote-video"))
        page.evaluate("document.getElementById('leave').click()")
        page.wait_for("window.edgeroom.joined === null && document.getElementById('call-section').hidden")
        until(lambda: any(p.startswith("/rooms/lobby/call/") for p in stand_in.deleted))
    except BaseException:
        print("\n".join(page.console))
        raise
