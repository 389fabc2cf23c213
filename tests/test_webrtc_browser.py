"""edgeroom-webrtc against real headless Chromium (its fake camera and microphone): a page publishes by WHIP and
the stream decodes on the bus; the box's own web page lists the streams, plays the camera by WHEP (frames decoded
keep increasing, no freeze, the picture is the camera's) and joins a room, whose call receives the camera."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import framebus
from services.capture.sources.synthetic import frame_number
from tests.appliance import metric_value, wait_for
from tests.browser import Browser, available
from tests.test_webrtc import TOKEN, base_url, cam_now, webrtc_box

pytestmark = pytest.mark.skipif(not available(), reason="chromium is not installed (scripts/test installs it)")

WHIP_JS = """(async () => {
  const media = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}, audio: true});
  const pc = new RTCPeerConnection();
  for (const t of media.getTracks()) pc.addTransceiver(t, {direction: 'sendonly'});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === 'complete') r();
                           pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); });
  const res = await fetch('/whip/chrome?room=lobby', {method: 'POST', body: pc.localDescription.sdp,
      headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer ' + %s}});
  if (res.status !== 201) throw new Error('WHIP ' + res.status + ' ' + await res.text());
  await pc.setRemoteDescription({type: 'answer', sdp: await res.text()});
  window.whip = {pc, location: res.headers.get('Location')};
  return window.whip.location;
})()"""


def stats(page, pc: str) -> dict:
    return page.evaluate(f"""(async () => {{ const out = {{}};
        (await {pc}.getStats()).forEach(s => {{ if (s.type === 'inbound-rtp' && s.kind === 'video')
            Object.assign(out, {{decoded: s.framesDecoded || 0, freezes: s.freezeCount || 0,
                                 codec: s.codecId || ''}}); }});
        return out; }})()""")


def test_a_page_publishes_its_camera_by_whip(box):
    b = webrtc_box(box)
    url = base_url(b)
    with Browser() as browser:
        page = browser.open(url + "/?token=" + TOKEN)
        location = page.evaluate(WHIP_JS % json.dumps(TOKEN))
        assert location.startswith("/whip/chrome/")
        page.wait_for("window.whip.pc.connectionState === 'connected'", 15)
        session = wait_for(lambda: next((s for s in b.call("sessions") if s["session"] == "chrome"), None), 10,
                           "the publisher's session at the hub")
        assert session["room"] == "lobby"
        import av
        decoded, codec = [], None
        with framebus.Consumer.attach("chrome", prefix=b.prefix, missing_ok=True, start="oldest") as c:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and len(decoded) < 10:
                item = c.receive(timeout=0.2)
                if item is None:
                    continue
                codec = codec or av.CodecContext.create(item.codec, "r")
                for frame in codec.decode(av.Packet(bytes(item.copy()))):
                    decoded.append(frame.to_ndarray(format="rgb24"))
        assert len(decoded) >= 10, f"{len(decoded)} of Chromium's pictures decoded off the bus"
        assert decoded[-1].shape[:2] == (240, 320) and decoded[-1].std() > 10, "the fake camera's moving picture"
        with framebus.Consumer.attach("chrome-audio", prefix=b.prefix, missing_ok=True, start="oldest") as c:
            item = c.receive(timeout=5)
            assert item is not None and item.kind == "audio", "the fake microphone's audio on the bus"
        page.evaluate(f"fetch(window.whip.location, {{method: 'DELETE', headers: "
                      f"{{Authorization: 'Bearer ' + {json.dumps(TOKEN)}}}}}).then(r => r.status)")
        wait_for(lambda: not any(s["session"] == "chrome" for s in b.call("sessions")), 10, "the session ended")


def test_the_box_page_lists_streams_plays_one_and_joins_a_room(box):
    b = webrtc_box(box, send_video="cam", send_audio="cam-audio")
    url = base_url(b)
    with Browser() as browser:
        page = browser.open(url + "/?token=" + TOKEN)
        page.wait_for("document.querySelector('figure[data-stream=cam]') !== null", 15)
        shown = page.evaluate("[...document.querySelectorAll('#streams figure')].map(f => f.dataset.stream)")
        assert "cam" in shown and "cam-audio" not in shown
        pc = "window.edgeroom.players['cam']"
        page.wait_for(f"{pc} && {pc}.connectionState === 'connected'", 15)
        page.wait_for("document.querySelector('figure[data-stream=cam] video').videoWidth === 320", 15)
        first = stats(page, pc)
        time.sleep(3)
        later = stats(page, pc)
        assert later["decoded"] - first["decoded"] >= 60, f"frames decoded in 3 s: {first} -> {later}"
        assert later["freezes"] == first["freezes"], "no freeze"
        picture = page.screenshot("figure[data-stream=cam] video")
        assert picture.std() > 20, "the player shows a picture, not a blank"
        # the camera draws its frame number as blocks: read them off the video's own pixels (drawn 1:1 on a canvas)
        luma = page.evaluate("""(() => { const v = document.querySelector('figure[data-stream=cam] video');
            const c = document.createElement('canvas'); c.width = 320; c.height = 240;
            const g = c.getContext('2d'); g.drawImage(v, 0, 0, 320, 240);
            const d = g.getImageData(0, 0, 320, 240).data; const out = new Array(320 * 240);
            for (let i = 0; i < out.length; i++) out[i] = Math.round((d[4*i] + d[4*i+1] + d[4*i+2]) / 3);
            return out; })()""")
        small = np.array(luma, np.uint8).reshape(240, 320)
        auth = "{headers: {Authorization: 'Bearer ' + " + json.dumps(TOKEN) + "}}"
        listing = json.loads(page.evaluate(f"fetch('/api/webrtc', {auth}).then(r => r.text())"))
        viewers = [s for s in listing["sessions"] if s["kind"] == "viewer" and s["name"] == "cam"]
        assert viewers and all(v["path"] == "pass-through" and v["video_codec"] == "h264" for v in viewers)
        assert abs(frame_number(small) - cam_now(b)) < 90, "the browser shows the camera's picture of the last 3 s"

        # join the room "default": the page publishes its camera and receives the room call's route (cam)
        page.wait_for("document.querySelector('#rooms .room[data-room=default] button.join') !== null", 10)
        page.evaluate("document.querySelector('#rooms .room[data-room=default] button.join').click()")
        page.wait_for("window.edgeroom.joined && window.edgeroom.joined.connectionState === 'connected'", 15)
        page.wait_for("document.getElementById('remote-video').videoWidth === 320", 15)
        remote = page.screenshot("#remote-video")
        assert remote.std() > 20
        call = wait_for(lambda: next((s for s in b.call("sessions") if s["session"].startswith("web-")), None),
                        10, "the page's room call at the hub")
        assert call["room"] == "default"
        sends = {t["kind"]: t["stream"] for t in call["tracks"] if t.get("direction") == "send"}
        assert sends == {"video": "cam", "audio": "cam-audio"}
        page.evaluate("document.getElementById('leave').click()")
        wait_for(lambda: not any(s["session"].startswith("web-") for s in b.call("sessions")), 10, "left the room")
    page_text = b.settled_scrape("webrtc")
    assert metric_value(page_text, "edgeroom_webrtc_sessions_ended_total", kind="call", reason="deleted") == 1


WS_JS = """(async () => {
  const T = %s, out = {configs: [], frames: [], decoded: 0, errors: []};
  window.wsout = out;
  const dec = new VideoDecoder({output: f => { out.decoded++; f.close(); }, error: e => out.errors.push(String(e))});
  dec.configure({codec: 'avc1.42E01F', optimizeForLatency: true});
  const ws = new WebSocket(`ws://${location.host}/ws/lobby/chromews?access_token=${T}`);
  ws.binaryType = 'arraybuffer';
  window.ws = ws;
  ws.onmessage = e => {
    if (typeof e.data === 'string') { out.configs.push(JSON.parse(e.data)); return; }
    const b = new Uint8Array(e.data), codec = (b[0] >> 1) & 7, key = (b[0] & 1) === 1;
    out.frames.push({codec, key, len: b.length});
    if (codec === 0 && (key || out.frames.some(f => f.key)))
      dec.decode(new EncodedVideoChunk({type: key ? 'key' : 'delta', timestamp: out.frames.length * 33333,
                                        data: b.subarray(5)}));
  };
  await new Promise((ok, bad) => { ws.onopen = ok; ws.onerror = bad; });
  // send H.264 made by the browser's own encoder (WebCodecs, Annex B), 40 pictures of a moving red square
  const canvas = new OffscreenCanvas(320, 240), g = canvas.getContext('2d');
  let seq = 0;
  const enc = new VideoEncoder({output: chunk => {
      const msg = new Uint8Array(5 + chunk.byteLength);
      msg[0] = chunk.type === 'key' ? 1 : 0;               // codec 0 (h264), keyframe bit
      new DataView(msg.buffer).setUint32(1, seq++);
      chunk.copyTo(msg.subarray(5));
      ws.send(msg);
    }, error: e => out.errors.push(String(e))});
  enc.configure({codec: 'avc1.42001f', width: 320, height: 240, bitrate: 500000, framerate: 30,
                 latencyMode: 'realtime', avc: {format: 'annexb'}});
  ws.send(JSON.stringify({type: 'config', codec: 'h264', width: 320, height: 240}));
  for (let i = 0; i < 40; i++) {
    g.fillStyle = '#0000c0'; g.fillRect(0, 0, 320, 240); g.fillStyle = '#e01010'; g.fillRect(i * 4, 60, 120, 120);
    const f = new VideoFrame(canvas, {timestamp: i * 33333});
    enc.encode(f, {keyFrame: i === 0});
    f.close();
    await new Promise(r => setTimeout(r, 33));
  }
  await enc.flush();
  return seq;
})()"""

RAW_JS = """(() => { const ws = window.ws, msg = new Uint8Array(5 + 64 * 48 * 3);
  window.ws.send(JSON.stringify({type: 'config', codec: 'raw_rgb24', width: 64, height: 48}));
  for (let i = 0; i < 64 * 48; i++) { msg[5 + 3*i] = 10; msg[5 + 3*i + 1] = 200; msg[5 + 3*i + 2] = 30; }
  msg[0] = (2 << 1) | 1; new DataView(msg.buffer).setUint32(1, 1000);
  ws.send(msg); return msg.length; })()"""


def test_chromium_as_a_websocket_client_sends_and_receives_h264_and_raw_rgb24(box):
    b = webrtc_box(box, send_video="cam")
    url = base_url(b)
    import av
    with Browser() as browser:
        page = browser.open(url + "/?token=" + TOKEN)
        with framebus.Consumer.attach("chromews", prefix=b.prefix, missing_ok=True, start="oldest") as c:
            sent = page.evaluate(WS_JS % json.dumps(TOKEN), timeout=30)
            assert sent >= 40
            codec, pictures = av.CodecContext.create("h264", "r"), []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(pictures) < 30:
                item = c.receive(timeout=0.2)
                if item is not None and item.kind == "encoded":
                    assert item.codec == "h264"
                    pictures += [f.to_ndarray(format="rgb24") for f in codec.decode(av.Packet(bytes(item.copy())))]
        assert len(pictures) >= 30, f"{len(pictures)} of the browser's H.264 pictures decoded off the bus"
        red = pictures[-1][70:170, 160:230].reshape(-1, 3).mean(axis=0)   # inside the square from picture 28 on
        assert red[0] > red[2], "the browser's red square on blue"
        # what the box sends back: the route (cam), H.264 with real keyframe flags, decoded by the browser
        page.wait_for("window.wsout.decoded >= 30", 15)
        frames = page.evaluate("window.wsout.frames")
        assert frames[0]["key"] and all(f["codec"] == 0 for f in frames)
        assert page.evaluate("window.wsout.configs")[0]["codec"] == "h264"
        assert not page.evaluate("window.wsout.errors")
        # raw_rgb24 both ways: the route switched to the camera's pictures, and a picture sent by the browser
        b.call("route", {"session": "chromews", "video": "cam-raw"})
        page.wait_for("window.wsout.frames.some(f => f.codec === 2)", 10)
        raw = [f for f in page.evaluate("window.wsout.frames") if f["codec"] == 2]
        assert raw[0]["len"] == 5 + 320 * 240 * 3 and raw[0]["key"]
        assert page.evaluate("window.wsout.configs.at(-1)") == {"type": "config", "codec": "raw_rgb24",
                                                                 "width": 320, "height": 240}
        with framebus.Consumer.attach("chromews", prefix=b.prefix, missing_ok=True, start="next") as c:
            page.evaluate(RAW_JS)
            item = c.receive(timeout=5)
            while item is not None and item.kind != "video":
                item = c.receive(timeout=5)
            assert item is not None and (item.width, item.height, item.format) == (64, 48, "rgb24")
            rgb = np.frombuffer(bytes(item.copy()), np.uint8).reshape(48, 64, 3)
            assert (rgb == (10, 200, 30)).all(), "the browser's raw picture, exactly"
        session = next(s for s in b.call("sessions") if s["session"] == "chromews")
        assert session["room"] == "lobby"
