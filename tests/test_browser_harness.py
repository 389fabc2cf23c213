"""The headless Chromium harness (tests/browser.py) against real Chromium: the fake camera
into a <video>, and two RTCPeerConnections of one page connected over loopback only."""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from aiohttp import web

from tests.browser import Browser, CDPError, Served, available, group_alive, serve

pytestmark = pytest.mark.skipif(not available(), reason="chromium is not installed (scripts/test installs it)")

PAGE = """<!doctype html><html><head><title>harness</title>
<style>body { margin: 0; background: #fff } video { width: 320px; height: 240px; display: block }</style>
</head><body><video id="v" autoplay muted playsinline></video>
<script>console.log("page loaded");</script></body></html>"""

# two peer connections of one page; every candidate that is not 127.0.0.1 is dropped on
# both sides, so they can only connect over loopback
LOOPBACK_CALL = """(async () => {
  const stream = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}});
  const a = new RTCPeerConnection(), b = new RTCPeerConnection();
  window.pcs = {a, b};
  const only = sdp => sdp.split('\\r\\n').filter(l => !l.startsWith('a=candidate') || l.split(' ')[4] === '127.0.0.1')
                         .join('\\r\\n');
  const gathered = pc => new Promise(r => {
    if (pc.iceGatheringState === 'complete') r();
    pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && r());
  });
  stream.getTracks().forEach(t => a.addTrack(t, stream));
  b.ontrack = e => { document.getElementById('v').srcObject = e.streams[0]; };
  await a.setLocalDescription(await a.createOffer()); await gathered(a);
  await b.setRemoteDescription({type: 'offer', sdp: only(a.localDescription.sdp)});
  await b.setLocalDescription(await b.createAnswer()); await gathered(b);
  await a.setRemoteDescription({type: 'answer', sdp: only(b.localDescription.sdp)});
  return only(a.localDescription.sdp).split('\\r\\n').filter(l => l.startsWith('a=candidate')).length;
})()"""

DECODED = """(async () => {
  let n = 0;
  (await pcs.b.getStats()).forEach(s => { if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded; });
  return n;
})()"""

SELECTED_PAIR = """(async () => {
  const st = await pcs.b.getStats(); let pair = null;
  st.forEach(s => { if (s.type === 'transport') pair = st.get(s.selectedCandidatePairId); });
  return pair && [st.get(pair.localCandidateId).address, st.get(pair.remoteCandidateId).address];
})()"""


@pytest.fixture
def server() -> Iterator[Served]:
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app.router.add_get("/", index)
    with serve(app) as served:
        yield served


@pytest.fixture
def browser() -> Iterator[Browser]:
    with Browser() as b:
        yield b


def blank(pixels: np.ndarray) -> bool:
    return bool(pixels.std() < 3)


def test_evaluate_console_and_errors(server: Served, browser: Browser) -> None:
    page = browser.open(server.url + "/")
    assert page.evaluate("Promise.resolve({a: [1, 2], b: document.title})") == {"a": [1, 2], "b": "harness"}
    assert page.evaluate("undefined") is None
    with pytest.raises(CDPError, match="boom"):
        page.evaluate("Promise.reject(new Error('boom'))")
    page.evaluate("setTimeout(() => { throw new Error('late one') }, 0); console.warn('careful', 42)")
    page.wait_for("true")
    with pytest.raises(TimeoutError):
        page.wait_for("false", timeout=0.3)
    assert any("page loaded" in m for m in page.console), page.console
    assert page.wait_for("1") == 1
    deadline_msgs = page.console
    assert any("console.warning: careful 42" in m for m in deadline_msgs), deadline_msgs
    assert any("page error" in m and "late one" in m for m in page.console), page.console


def test_fake_camera_shows_in_a_video(server: Served, browser: Browser) -> None:
    page = browser.open(server.url + "/")
    page.evaluate("navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}})"
                  ".then(s => { document.getElementById('v').srcObject = s; })")
    page.wait_for("document.getElementById('v').currentTime > 0.2", timeout=10)
    first = page.screenshot("#v")
    assert first.shape == (240, 320, 3) and first.dtype == np.uint8
    assert not blank(first), "the fake camera's picture is blank"
    whole = page.screenshot()
    assert whole.shape[1] == 1280 and whole[600:, 400:].min() == 255  # the page's white background
    page.evaluate("new Promise(r => setTimeout(r, 300))")
    assert np.abs(page.screenshot("#v").astype(int) - first).max() > 30, "the fake camera's picture does not move"


def test_two_peer_connections_over_loopback_only(server: Served, browser: Browser) -> None:
    page = browser.open(server.url + "/")
    try:
        assert page.evaluate(LOOPBACK_CALL, timeout=15) >= 1, "no 127.0.0.1 candidate: is the loopback flag gone?"
        page.wait_for("pcs.b.connectionState === 'connected'", timeout=10)
        # each side signalled 127.0.0.1 only; a side may still send from its other host address
        # (Linux carries 192.0.2.2 -> 127.0.0.1 over lo), so one end of the pair may not be 127.0.0.1
        assert "127.0.0.1" in page.evaluate(SELECTED_PAIR)
        page.wait_for(f"{DECODED}.then(n => n > 5)", timeout=10)
        before = page.evaluate(DECODED)
        page.wait_for(f"{DECODED}.then(n => n > {before} + 5)", timeout=10)
        page.wait_for("document.getElementById('v').videoWidth === 320", timeout=5)
        assert not blank(page.screenshot("#v"))
    except BaseException:
        print("\n".join(page.console))
        raise


def test_nothing_left_behind() -> None:
    with Browser() as b:
        b.open("about:blank", wait=False)
        pgid, profile = b.proc.pid, b.dir
        assert os.path.exists(os.path.join(profile, "DevToolsActivePort"))
    assert not os.path.exists(profile)
    assert not group_alive(pgid)  # zombies aside: this box's init reaps orphans a second or two later
