"""A small headless Chromium for tests, driven over the Chrome DevTools Protocol (CDP).

No Playwright, no Selenium: Chromium is started with ``--remote-debugging-port=0``, the
port it picked is read from ``DevToolsActivePort`` in its private user-data dir, and one
WebSocket (aiohttp's client, on a private event loop in a thread) to the browser target
carries every page's commands as flattened sessions. Its reader routes the answers to
their (synchronous) callers and keeps each page's console messages, page errors and log
entries (``page.console``) so a failing test can print them.

    with Browser() as browser:
        page = browser.open("http://127.0.0.1:8080/?token=T")
        page.wait_for("document.querySelector('video') !== null", timeout=10)
        page.evaluate("fetch('/api/status').then(r => r.json())")   # the JSON value
        pixels = page.screenshot()                                  # numpy (H, W, 3) uint8

Exit kills Chromium's whole process group (``start_new_session``): nothing is left behind.

WebRTC over loopback only (found by experiment, Chromium 156, a box with lo and eth0):

* ``--allow-loopback-in-peer-connection``: without it Chromium never gathers a 127.0.0.1
  (or ::1) host candidate, so a peer that offers only 127.0.0.1 cannot be reached.
* ``--use-fake-ui-for-media-stream`` is needed too: it grants the media permission, and
  only then does Chromium enumerate every interface (loopback included) for *every*
  RTCPeerConnection of the page, getUserMedia called or not. Without it a page gets just
  the default route's address (192.0.2.2 here), even with the loopback flag.
* The page must be a secure context on a loopback origin (``http://127.0.0.1:PORT``): a
  plain-http page on another address gets the default route's address only.
* ``--disable-features=WebRtcHideLocalIpsWithMdns``: where the interfaces are not
  enumerated, host candidates are ``<uuid>.local`` mDNS names a Python answerer cannot
  resolve; with this they are real addresses. Kept as a safety net.
* ``--force-webrtc-ip-handling-policy=...`` (any of default, default_public_interface_only,
  default_public_and_private_interfaces, disable_non_proxied_udp) changed nothing here.

With these flags two RTCPeerConnections in one page, or the page and aiortc answering with
only 127.0.0.1 (tests/test_web_page.py), connect over loopback. The selected pair need not
be 127.0.0.1 at both ends: Chromium pairs each of its host candidates with the remote
127.0.0.1, and Linux carries e.g. 192.0.2.2 -> 127.0.0.1 over lo, so under load a pair such
as (192.0.2.2, 127.0.0.1) may win; it still never leaves the box.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
from aiohttp import web

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--no-default-browser-check", "--window-size=1280,900", "--mute-audio",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]


def available() -> bool:
    return os.access(CHROMIUM, os.X_OK)


def group_alive(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that are not zombies."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                alive.append(int(pid))
    return alive


class CDPError(RuntimeError):
    """A DevTools command failed, or the JavaScript threw (the message is the JS error)."""


class Browser:
    """One headless Chromium with a private profile; ``open(url)`` gives a ``Page``."""

    def __init__(self, *, timeout: float = 20.0, extra_flags: list[str] | None = None) -> None:
        self.timeout = timeout
        self.dir = tempfile.mkdtemp(prefix="edgeroom-chromium-")
        self.stderr = open(Path(self.dir) / "stderr.log", "w+b")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, *(extra_flags or []), f"--user-data-dir={self.dir}",
             "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
            start_new_session=True)
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()  # the DevTools client's (aiohttp) private loop
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdp", daemon=True)
        self._thread.start()
        self._http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            port_file = Path(self.dir) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (rc {self.proc.poll()}): {self.log()[-2000:]}")
                time.sleep(0.05)
            port, path = port_file.read_text().split()[:2]
            self._run(self._connect(f"ws://127.0.0.1:{port}{path}"), timeout)
        except BaseException:
            self.close()
            raise

    def log(self) -> str:
        """Chromium's own stderr so far."""
        self.stderr.flush()
        return (Path(self.dir) / "stderr.log").read_text(errors="replace")

    # -- the protocol --
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _connect(self, url: str) -> None:
        self._http = aiohttp.ClientSession()
        self.ws = await self._http.ws_connect(url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read(self.ws))

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        assert self.ws is not None, "not connected"
        self._run(self.ws.send_str(json.dumps(msg)), self.timeout)
        try:
            reply = fut.result(timeout or self.timeout)
        finally:
            with self._lock:
                self._pending.pop(msg_id, None)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}".strip())
        return reply.get("result", {})  # type: ignore[no-any-return]

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for raw in ws:
                if raw.type != aiohttp.WSMsgType.TEXT:
                    continue
                msg = json.loads(raw.data)
                if "id" in msg:
                    with self._lock:
                        fut = self._pending.get(msg["id"])
                    if fut is not None:
                        fut.set_result(msg)
                elif (page := self._pages.get(msg.get("sessionId", ""))) is not None:
                    page._event(msg["method"], msg.get("params", {}))
        except Exception:  # the connection closed: fail whoever waits
            pass
        with self._lock:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_result({"error": {"message": "the DevTools connection closed"}})

    async def _disconnect(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._http is not None:
            await self._http.close()

    # -- pages --
    def open(self, url: str, *, headers: dict[str, str] | None = None, wait: bool = True) -> Page:
        """A new tab at ``url``; with ``wait``, returns once the document has loaded."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        self._pages[session] = page
        for domain in ("Runtime", "Page", "Log", "Network"):
            page.send(f"{domain}.enable")
        if headers:
            page.set_extra_headers(headers)
        page.goto(url, wait=wait)
        return page

    def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.send("Browser.close", timeout=3)
        with contextlib.suppress(Exception):
            self._run(self._disconnect(), 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(3)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: renderers, GPU, zygotes
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            if sig == signal.SIGTERM:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(3)
        self.proc.wait()
        deadline = time.monotonic() + 5  # until none of the group runs (init reaps the zombies in its time)
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab. ``console`` holds its console messages, page errors and log entries."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser, self.target, self.session = browser, target, session
        self.console: list[str] = []

    def send(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session, **kw)

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", a.get("type")))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {args}")
        elif method == "Runtime.exceptionThrown":
            self.console.append(f"page error: {_exception_text(params['exceptionDetails'])}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            self.console.append(f"log.{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}".rstrip())

    def goto(self, url: str, *, wait: bool = True, timeout: float | None = None) -> None:
        self.evaluate("window.__left = true")  # gone once the new document is there
        reply = self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise CDPError(f"navigate {url}: {reply['errorText']}")
        if wait:
            self.wait_for("!window.__left && document.readyState === 'complete'", timeout)

    def evaluate(self, js: str, *, await_promise: bool = True, timeout: float | None = None) -> Any:
        """The JSON value of the expression ``js`` (a promise is awaited); a JS error raises CDPError."""
        reply = self.send("Runtime.evaluate", {"expression": js, "awaitPromise": await_promise,
                                               "returnByValue": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in reply:
            raise CDPError(_exception_text(reply["exceptionDetails"]))
        return reply["result"].get("value")

    def wait_for(self, js_expr: str, timeout: float | None = None, *, interval: float = 0.1) -> Any:
        """Polls until ``js_expr`` (a promise is awaited) is truthy in JavaScript and returns its JSON
        value (a DOM node comes back as ``{}``); TimeoutError, with the console, if it never is."""
        deadline = time.monotonic() + (timeout or self.browser.timeout)
        last: Any = None
        probe = f"Promise.resolve({js_expr}).then(v => ({{ok: !!v, v}}))"
        while True:
            try:
                reply = self.evaluate(probe, timeout=max(1.0, deadline - time.monotonic()))
                last = reply.get("v")
                if reply["ok"]:
                    return last
            except CDPError as e:
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited for {js_expr!r}: last {last!r}\n" + "\n".join(self.console[-40:]))
            time.sleep(interval)

    def screenshot(self, selector: str | None = None) -> np.ndarray:
        """The viewport (or the box of the first element ``selector`` matches) as (H, W, 3) uint8 RGB."""
        import av

        params: dict[str, Any] = {"format": "png"}
        if selector is not None:
            rect = self.evaluate(f"(r => r && {{x: r.x, y: r.y, width: r.width, height: r.height, scale: 1}})"
                                 f"(document.querySelector({json.dumps(selector)})?.getBoundingClientRect())")
            if not rect or rect["width"] < 1 or rect["height"] < 1:
                raise CDPError(f"no visible element {selector!r}")
            params["clip"] = rect
        png = base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
        with av.open(io.BytesIO(png), format="png_pipe") as container:
            frame = next(container.decode(video=0))
            return frame.to_ndarray(format="rgb24")

    def set_extra_headers(self, headers: dict[str, str]) -> None:
        """Headers every later request of this page carries (e.g. Authorization)."""
        self.send("Network.setExtraHTTPHeaders", {"headers": headers})

    def close(self) -> None:
        self.browser._pages.pop(self.session, None)
        self.browser.send("Target.closeTarget", {"targetId": self.target})


def _exception_text(details: dict[str, Any]) -> str:
    exc = details.get("exception") or {}
    return str(exc.get("description") or exc.get("value") or details.get("text") or details)


class Served:
    """An aiohttp app served on 127.0.0.1 from a private event loop in a thread."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.url, self.loop = url, loop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Runs ``coro`` on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def serve(app: web.Application) -> Iterator[Served]:
    """Serves ``app`` on http://127.0.0.1:PORT (port 0: a free one) until the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-http", daemon=True)
    thread.start()
    runner = web.AppRunner(app, shutdown_timeout=1)
    served = Served("", loop)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    try:
        served.url = f"http://127.0.0.1:{served.call(start())}"
        yield served
    finally:
        with contextlib.suppress(Exception):
            served.call(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
