"""The bridge with real SIP phones: two baresip calls into one bridged room see and hear each other (each decodes
the other's bars at the other's size, hears the other's tone), and a VP8 WebRTC participant (aiortc) talks with an
H.264-only phone through the bridge's transcodes, both ways."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.appliance import metric_value, wait_for
from tests.sip_peers import Baresip, free_port
from tests.test_bridge import GREEN, TOKEN, base_url, colour_of, join, run, tone, until
from tests.test_sip import fakevideo_bars, tone_hz

pytestmark = pytest.mark.skipif(not Path("/usr/bin/baresip").exists(), reason="baresip is not installed "
                                "(Debian baresip-core, baresip-ffmpeg: scripts/test installs them)")


def sip_bridge_box(box, port: int, webrtc: bool = False):
    more = ""
    if webrtc:
        more = ("[services.webrtc]\nrestart_sec = 0.2\nwatchdog_sec = 5.0\nstop_timeout = 3.0\n"
                f'[webrtc]\nenabled = true\nport = 0\naddress = "127.0.0.1"\nice_addresses = "127.0.0.1"\n'
                f'tokens = "test:{TOKEN}"\n')
    b = box("[services.sip]\nrestart_sec = 0.2\nwatchdog_sec = 3.0\nstop_timeout = 2.0\n"
            "[services.bridge]\nrestart_sec = 0.2\nwatchdog_sec = 5.0\nstop_timeout = 3.0\n"
            f'[sip]\nenabled = true\nport = {port}\nusers = "alice:secret"\ndigest_algorithms = "MD5"\n'
            f'room = "meet"\n[bridge]\nenabled = true\nrooms = "meet"\n{more}')
    b.config.write_text(b.config.read_text().replace('on_timeout = "block"', 'on_timeout = "allow"'))
    b.run()
    b.wait_ready("sip", "bridge", *(["webrtc"] if webrtc else []), timeout=30)
    return b


def calls_up(b, n: int) -> list[dict]:
    def up():
        calls = [c for c in b.call("call.list")["calls"] if c["state"] == "up"]
        return calls if len(calls) == n else None
    return wait_for(up, 10, f"{n} call(s) up at the box")


def test_two_phones_in_a_bridged_room_see_and_hear_each_other(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_bridge_box(box, port)
    with Baresip(tmp_path, "one", user="alice", password="secret", video_codecs=None, tone_hz=440,
                 video_size=(352, 288)) as one, \
            Baresip(tmp_path, "two", user="alice", password="secret", video_codecs=None, tone_hz=660,
                    video_size=(320, 240)) as two:
        one.dial(f"sip:meet@127.0.0.1:{port}")
        one.wait_event("CALL_ESTABLISHED", timeout=10)
        two.dial(f"sip:meet@127.0.0.1:{port}")
        two.wait_event("CALL_ESTABLISHED", timeout=10)
        calls = calls_up(b, 2)
        assert {c["room"] for c in calls} == {"meet"}
        # each decodes the other's picture: baresip's bars, at the other phone's size
        one_stats = one.wait_video_frames(20, timeout=15)
        two_stats = two.wait_video_frames(20, timeout=15)
        assert one_stats.rx_size == (320, 240), one_stats.raw
        assert two_stats.rx_size == (352, 288), two_stats.raw
        assert fakevideo_bars(one.remote_picture()) and fakevideo_bars(two.remote_picture())
        status = b.call("bridge.status", {"room": "meet"})
        time.sleep(2.0)                        # two seconds of each other's voice
        one.hangup()
        two.hangup()
        one.wait_event("CALL_CLOSED", timeout=5)
        two.wait_event("CALL_CLOSED", timeout=5)
    routes = {r["target"]: r for r in status["routes"]}
    a, c = calls[0]["call"], calls[1]["call"]
    assert routes[a]["source"] == c and routes[c]["source"] == a
    assert {r["path"] for r in routes.values()} == {"pass-through"}, "both take H.264: the bytes go through"
    for ua, other_hz in ((one, 660), (two, 440)):
        rate, pcm = ua.received_audio()
        loud = pcm[np.abs(pcm) > 0.05]
        assert len(loud) > rate * 0.5, f"{ua.name} heard silence"
        assert abs(tone_hz(pcm[-rate:], rate) - other_hz) < 15, f"{ua.name} hears the other phone's tone"


def test_a_sigkilled_sip_service_takes_its_calls_back_and_the_bridge_routes_them_again(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_bridge_box(box, port)
    with Baresip(tmp_path, "one", user="alice", password="secret", video_codecs=None, tone_hz=440,
                 video_size=(352, 288)) as one, \
            Baresip(tmp_path, "two", user="alice", password="secret", video_codecs=None, tone_hz=660,
                    video_size=(320, 240)) as two:
        for ua in (one, two):
            ua.dial(f"sip:meet@127.0.0.1:{port}")
            ua.wait_event("CALL_ESTABLISHED", timeout=10)
        calls_up(b, 2)
        one.wait_video_frames(20, timeout=15)
        two.wait_video_frames(20, timeout=15)
        pid = b.services()["sip"]["pid"]
        os.kill(pid, signal.SIGKILL)       # its calls come back with their sessions; its routes were in memory
        killed = time.monotonic()
        rx = (one.video_stats().rx_frames, two.video_stats().rx_frames)
        wait_for(lambda: one.video_stats().rx_frames >= rx[0] + 10 and two.video_stats().rx_frames >= rx[1] + 10,
                 15, "both phones decoding each other again")
        back = time.monotonic() - killed
        assert b.services()["sip"]["pid"] != pid
        assert one.video_stats().rx_size == (320, 240) and two.video_stats().rx_size == (352, 288)
        routes = {r["target"]: r for r in b.call("bridge.status", {"room": "meet"})["routes"]}
        assert all(r["sent"] for r in routes.values())
        print(f"bridge over a SIP restart: pictures again {back:.2f} s after SIGKILL")
        one.hangup()
        two.hangup()


def test_a_vp8_browser_peer_and_an_h264_phone_meet_through_the_transcodes(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_bridge_box(box, port, webrtc=True)
    url = base_url(b)
    with Baresip(tmp_path, "phone", user="alice", password="secret", video_codecs=("H264",), tone_hz=440,
                 video_size=(320, 240)) as phone:
        phone.dial(f"sip:meet@127.0.0.1:{port}")
        phone.wait_event("CALL_ESTABLISHED", timeout=10)
        call = calls_up(b, 1)[0]

        async def go():
            peer = await join(url, "web", GREEN, 660, codec="vp8")
            try:
                await until(lambda: peer.frames and fakevideo_bars(peer.frames[-1]), 15,
                            "the VP8 peer sees the phone's bars")
                # baresip is driven in a thread: this loop keeps the WebRTC peer sending meanwhile
                loop = asyncio.get_running_loop()
                stats = await loop.run_in_executor(None, phone.wait_video_frames, 20, 15)
                picture = await loop.run_in_executor(None, phone.remote_picture)
                await asyncio.sleep(1.5)
                return stats, picture, b.call("bridge.status", {"room": "meet"}), tone(peer)
            finally:
                from tests.webrtc_peers import close
                await close(peer)

        stats, picture, status, peer_heard = run(go())
        phone.hangup()
        phone.wait_event("CALL_CLOSED", timeout=5)
    assert stats.rx_codec and "264" in stats.rx_codec.upper(), stats.raw
    assert colour_of(picture) == GREEN, "the phone decodes the VP8 peer's green, made H.264 by the bridge"
    routes = {r["target"]: r for r in status["routes"]}
    assert routes["web"]["path"] == "transcode" and routes["web"]["codec"] == "vp8"
    assert routes["web"]["video"] == f"{call['call']}-to-vp8"
    assert routes[call["call"]]["path"] == "transcode" and routes[call["call"]]["video"] == "web-to-h264"
    assert {t["out"] for t in status["transcodes"]} == {f"{call['call']}-to-vp8", "web-to-h264"}
    assert abs(peer_heard - 440) < 15
    assert all(t["frames_out"] > 0 for t in status["transcodes"]), status["transcodes"]
    rate, pcm = phone.received_audio()
    assert abs(tone_hz(pcm[-rate:], rate) - 660) < 15
    page = b.settled_scrape("bridge")
    assert metric_value(page, "edgeroom_bridge_route_commands_total", result="ok") >= 2


CHROME_CALL_JS = """(async () => {
  const media = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}, audio: true});
  const pc = new RTCPeerConnection();
  const video = document.createElement('video');
  video.muted = true; video.autoplay = true; video.playsInline = true;
  document.body.appendChild(video);
  pc.ontrack = e => { if (e.track.kind === 'video') video.srcObject = new MediaStream([e.track]); };
  for (const t of media.getTracks()) {
    const tr = pc.addTransceiver(t, {direction: 'sendrecv'});
    if (t.kind === 'video')   // VP8 only: the phone takes H.264 only, so the bridge transcodes both ways
      tr.setCodecPreferences(RTCRtpReceiver.getCapabilities('video').codecs
                              .filter(c => /VP8|rtx/i.test(c.mimeType)));
  }
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === 'complete') r();
                           pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); });
  const res = await fetch('/rooms/meet/call?session=chrome', {method: 'POST', body: pc.localDescription.sdp,
      headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer ' + %s}});
  if (res.status !== 201) throw new Error('call ' + res.status + ' ' + await res.text());
  await pc.setRemoteDescription({type: 'answer', sdp: await res.text()});
  window.call = {pc, video};
  return true;
})()"""

FRAME_JS = """(() => { const v = window.call.video; if (!v.videoWidth) return null;
  const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0);
  return {w: c.width, h: c.height, px: Array.from(g.getImageData(0, 0, c.width, c.height).data)}; })()"""


def test_chromium_on_vp8_and_an_h264_phone_decode_each_other_through_the_transcodes(box, tmp_path):
    from tests.browser import Browser, available
    from tests.test_webrtc_browser import stats
    if not available():
        pytest.skip("chromium is not installed (scripts/test installs it)")
    port = free_port(udp=True, tcp=True)
    b = sip_bridge_box(box, port, webrtc=True)
    url = base_url(b)
    with Baresip(tmp_path, "phone", user="alice", password="secret", video_codecs=("H264",), tone_hz=440,
                 video_size=(320, 240)) as phone, Browser() as browser:
        phone.dial(f"sip:meet@127.0.0.1:{port}")
        phone.wait_event("CALL_ESTABLISHED", timeout=10)
        call = calls_up(b, 1)[0]
        page = browser.open(url + "/?token=" + TOKEN)
        page.evaluate(CHROME_CALL_JS % json.dumps(TOKEN))
        page.wait_for("window.call.pc.connectionState === 'connected'", 15)
        page.wait_for("window.call.video.videoWidth > 0", 15)
        first = stats(page, "window.call.pc")
        time.sleep(2.0)
        later = stats(page, "window.call.pc")
        codec = page.evaluate("""(async () => { let mime = '';
            (await window.call.pc.getStats()).forEach(s => { if (s.type === 'codec' && /video/.test(s.mimeType))
                mime += s.mimeType + ' '; }); return mime; })()""")
        frame = page.evaluate(FRAME_JS)
        phone_stats = phone.wait_video_frames(20, timeout=15)
        seen = phone.remote_picture()
        status = b.call("bridge.status", {"room": "meet"})
        phone.hangup()
        phone.wait_event("CALL_CLOSED", timeout=5)
    assert later["decoded"] > first["decoded"] + 20, (first, later)
    assert later.get("freezes", 0) == 0
    assert "VP8" in codec.upper() and "H264" not in codec.upper(), codec
    picture = np.array(frame["px"], np.uint8).reshape(frame["h"], frame["w"], 4)[:, :, :3]
    assert fakevideo_bars(picture), "Chromium shows the phone's bars, sent as VP8"
    assert phone_stats.rx_size == (320, 240) and seen.std() > 10 and not fakevideo_bars(seen), \
        "the phone decodes Chromium's fake camera, sent as H.264"
    routes = {r["target"]: r for r in status["routes"]}
    assert routes["chrome"]["path"] == "transcode" and routes["chrome"]["video"] == f"{call['call']}-to-vp8"
    assert routes[call["call"]]["path"] == "transcode" and routes[call["call"]]["video"] == "chrome-to-h264"
