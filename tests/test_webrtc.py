"""edgeroom-webrtc against a real WebRTC peer (aiortc in this process) over real HTTP and ICE on 127.0.0.1: WHEP
plays a camera of the bus (pass-through, checked by the pictures' content), WHIP publishes onto the bus (the
pictures and the tone checked there), a room call does both, a VP8-only viewer is served an encoder's output,
and what is refused is refused with its reason and counted."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np

import framebus
from services.capture.sources.synthetic import frame_number
from tests.appliance import metric_value, wait_for
from tests.webrtc_peers import ColourTrack, ToneTrack, close, connect, loopback_ice, post_offer, request

TOKEN = "test-token-0123456789abcdef"
CAM = 'kind = "synthetic"\nwidth = 320\nheight = 240\nfps = 30.0\nencode = "h264"\ngop = 2.0\naudio = true\n'


def webrtc_box(box, more: str = "", **keys: object):
    loopback_ice()
    extra = {"enabled": True, "port": 0, "address": "127.0.0.1", "ice_addresses": "127.0.0.1",
             "tokens": f"test:{TOKEN}", **keys}
    table = "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                      for k, v in extra.items())
    b = box(f"[services.webrtc]\nrestart_sec = 0.2\nwatchdog_sec = 5.0\nstop_timeout = 3.0\n[webrtc]\n{table}\n{more}")
    b.set_source("cam", CAM)
    b.run()
    b.wait_ready("webrtc", "capture@cam", timeout=30)
    wait_for(lambda: {"cam", "cam-audio", "cam-raw"} <= {s["stream"] for s in b.call("streams")
                                                         if s["status"] == "alive"}, 15, "the camera's streams")
    return b


def base_url(b) -> str:
    """The service's address, from its status once it listens (its first heartbeat may come before)."""
    def listening() -> str | None:
        address = b.services()["webrtc"]["status"].split("://", 1)[1].split(";", 1)[0]
        scheme = b.services()["webrtc"]["status"].split("://", 1)[0]
        return None if address.endswith(":0") else f"{scheme}://{address}"
    return wait_for(listening, 10, "the WebRTC service listening")


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def cam_now(b) -> int:
    with framebus.Consumer.attach("cam-raw", prefix=b.prefix, missing_ok=True, start="oldest") as c:
        item = c.receive(timeout=5, newest=True)
        assert item is not None
        luma = np.frombuffer(bytes(item.copy()), np.uint8)[:item.width * item.height].reshape(item.height,
                                                                                             item.width)
        return frame_number(luma)


def test_whep_plays_a_camera_as_it_is_encoded(box):
    b = webrtc_box(box)
    url = base_url(b)

    async def go():
        peer = await connect(url, "/whep/cam", TOKEN)
        try:
            deadline = time.monotonic() + 10
            while len(peer.frames) < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(peer.frames) >= 20, f"{len(peer.frames)} pictures decoded in 10 s"
            # the viewer asks for a keyframe (PLI): it reaches the camera (a second after the join's own request:
            # the route asks a producer at most once a second)
            from services.webrtc.peer import send_pli
            await asyncio.sleep(1.1)
            receiver = next(t.receiver for t in peer.pc.getTransceivers() if t.kind == "video")
            before = metric_value(b.scrape(), "edgeroom_keyframe_requests_total", stream="cam", outcome="requested")
            assert await send_pli(receiver)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and metric_value(
                    b.scrape(), "edgeroom_keyframe_requests_total", stream="cam", outcome="requested") <= before:
                await asyncio.sleep(0.1)
            listing = json.loads((await request("GET", url + "/api/webrtc", token=TOKEN)).text)
            return peer.frames[-1], listing, peer.audio
        finally:
            await close(peer)

    picture, listing, audio = run(go())
    gray = picture.mean(axis=2).astype(np.uint8)
    assert abs(frame_number(gray) - cam_now(b)) < 90, "the viewer's picture is the camera's, of the last 3 s"
    viewer = listing["sessions"][0]
    assert viewer["kind"] == "viewer" and viewer["path"] == "pass-through" and viewer["video_codec"] == "h264"
    assert audio, "the camera's audio (cam-audio) came with it"
    page = b.settled_scrape("webrtc")     # the hub shows a service's metrics as of its last heartbeat
    assert metric_value(page, "edgeroom_webrtc_feedback_total", type="pli_received") >= 1
    assert metric_value(page, "edgeroom_keyframe_requests_total", stream="cam", outcome="requested") >= 2, \
        "the join's request and the viewer's PLI reached the camera"


def test_whip_publishes_pictures_and_sound_onto_the_bus(box):
    b = webrtc_box(box)
    url = base_url(b)

    async def go():
        peer = await connect(url, "/whip/phone?room=lobby", TOKEN, send=(ColourTrack((220, 30, 30)),
                                                                          ToneTrack(660)), receive=False)
        try:
            def on_bus() -> bool:
                return any(s["session"] == "phone" for s in b.call("sessions"))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not on_bus():
                await asyncio.sleep(0.2)
            pictures, audio, codecs = [], [], set()
            import av
            codec = None
            with framebus.Consumer.attach("phone", prefix=b.prefix, missing_ok=True, start="oldest") as c:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and len(pictures) < 5:
                    item = await asyncio.get_running_loop().run_in_executor(None, lambda: c.receive(timeout=0.2))
                    if item is None:
                        continue
                    codec = codec or av.CodecContext.create(item.codec, "r")
                    codecs.add(item.codec)
                    for frame in codec.decode(av.Packet(bytes(item.copy()))):
                        pictures.append(frame.to_ndarray(format="rgb24"))
            with framebus.Consumer.attach("phone-audio", prefix=b.prefix, missing_ok=True, start="oldest") as c:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and sum(len(a) for a in audio) < 24000:
                    item = await asyncio.get_running_loop().run_in_executor(None, lambda: c.receive(timeout=0.2))
                    if item is not None:
                        audio.append(np.frombuffer(bytes(item.copy()), np.int16).reshape(-1, item.channels)[:, 0])
                        rate = item.rate
            session = next(s for s in b.call("sessions") if s["session"] == "phone")
            r = await request("DELETE", url + peer.location, token=TOKEN)
            return pictures, np.concatenate(audio).astype(float), rate, session, r.status_code, codecs
        finally:
            await close(peer)

    pictures, pcm, rate, session, deleted, codecs = run(go())
    assert codecs == {"vp8"}, "aiortc offers VP8 first: its access units are on the bus as they came"
    assert len(pictures) >= 5
    mean = pictures[-1].reshape(-1, 3).mean(axis=0)
    assert mean[0] > 150 and mean[1] < 90 and mean[2] < 90, f"the publisher's red picture, got {mean}"
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    assert abs((np.argmax(spectrum[1:]) + 1) * rate / len(pcm) - 660) < 15, "the publisher's 660 Hz tone"
    assert session["room"] == "lobby" and {t["id"] for t in session["tracks"]} >= {"video", "audio"}
    assert deleted == 200
    wait_for(lambda: not any(s["session"] == "phone" for s in b.call("sessions")), 10, "the session ended")


def test_refusals_are_named_and_counted(box):
    b = webrtc_box(box)
    url = base_url(b)

    async def go():
        from aiortc import RTCPeerConnection

        from tests.webrtc_peers import gathered
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        offer = await gathered(pc)
        await pc.close()
        return {
            "no_token": await post_offer(url + "/whep/cam", offer, None),
            "wrong_token": await post_offer(url + "/whep/cam", offer, "not-the-token-at-all"),
            "unknown": await post_offer(url + "/whep/nosuch", offer, TOKEN),
            "garbage": await post_offer(url + "/whep/cam", "v=0\r\nthis is not sdp", TOKEN),
            "not_sdp": await request("POST", url + "/whep/cam", "{}", TOKEN, "application/json"),
            "no_codec": await connect_vp8(url, offer),
        }

    async def connect_vp8(url, _offer):
        from aiortc import RTCPeerConnection

        from tests.webrtc_peers import gathered, prefer
        pc = RTCPeerConnection()
        prefer(pc.addTransceiver("video", direction="recvonly"), "vp8")
        offer = await gathered(pc)
        await pc.close()
        return await post_offer(url + "/whep/cam", offer, TOKEN)

    r = run(go())
    assert r["no_token"].status_code == 401 and "bearer token" in r["no_token"].text
    assert r["wrong_token"].status_code == 401 and "not valid" in r["wrong_token"].text
    assert r["unknown"].status_code == 404 and "nosuch" in r["unknown"].text
    assert r["garbage"].status_code == 400
    assert r["not_sdp"].status_code == 415
    assert r["no_codec"].status_code == 406 and "encoders.cam-vp8" in r["no_codec"].text
    page = b.settled_scrape("webrtc")
    assert metric_value(page, "edgeroom_webrtc_refused_total", reason="token") >= 2
    assert metric_value(page, "edgeroom_webrtc_refused_total", reason="no_codec") >= 1
    assert b.services()["webrtc"]["state"] == "ready"


def test_a_peer_that_never_connects_is_reaped_and_open_endpoints_take_no_token(box):
    b = webrtc_box(box, connect_timeout=2.0, open="whep")
    url = base_url(b)

    async def go():
        from aiortc import RTCPeerConnection

        from tests.webrtc_peers import gathered
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        offer = await gathered(pc)
        await pc.close()    # answered, never connected
        whip = await post_offer(url + "/whip/x", offer, None)
        return await post_offer(url + "/whep/cam", offer, None), whip      # whep is open: no token

    whep, whip = run(go())
    assert whep.status_code == 201 and whip.status_code == 401
    wait_for(lambda: metric_value(b.scrape(), "edgeroom_webrtc_sessions_ended_total", kind="viewer",
                                  reason="connect_timeout") == 1, 10, "the half-open viewer reaped")


def test_a_room_call_publishes_and_receives_its_route_and_keyframes_reach_the_publisher(box):
    b = webrtc_box(box, send_video="cam", send_audio="cam-audio")
    url = base_url(b)

    async def go():
        peer = await connect(url, "/rooms/lobby/call?session=agent", TOKEN,
                             send=(ColourTrack((30, 200, 30)), ToneTrack(440)), codec="h264")
        try:
            deadline = time.monotonic() + 10
            while len(peer.frames) < 10 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            session = next((s for s in b.call("sessions") if s["session"] == "agent"), None)
            before = metric_value(b.scrape(), "edgeroom_webrtc_keyframes_total", session="agent")
            answer = b.call("keyframe", {"stream": "agent", "reason": "test"})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and metric_value(
                    b.scrape(), "edgeroom_webrtc_keyframes_total", session="agent") <= before:
                await asyncio.sleep(0.1)
            after = metric_value(b.scrape(), "edgeroom_webrtc_keyframes_total", session="agent")
            return peer.frames[-1] if peer.frames else None, session, answer, before, after
        finally:
            await close(peer)

    picture, session, answer, before, after = run(go())
    assert picture is not None, "the call received its route's pictures"
    assert abs(frame_number(picture.mean(axis=2).astype(np.uint8)) - cam_now(b)) < 90, "the camera's (send_video)"
    assert session["room"] == "lobby"
    sends = {t["kind"]: t["stream"] for t in session["tracks"] if t.get("direction") == "send"}
    assert sends == {"video": "cam", "audio": "cam-audio"}
    assert {t["id"] for t in session["tracks"] if t.get("direction") != "send"} >= {"video", "audio"}
    assert answer["made"] and answer["how"] == "pli"
    assert after > before, "a keyframe asked of the call's stream came from the browser-side encoder (PLI)"
    assert metric_value(b.scrape(), "edgeroom_webrtc_feedback_total", type="pli_sent") >= 1


def test_a_vp8_only_viewer_gets_an_encoders_output(box):
    b = webrtc_box(box, more='[encoders.cam-vp8]\ninput = "cam-raw"\ncodec = "vp8"\nbitrate = 500\n')
    b.wait_ready("encode@cam-vp8", timeout=30)
    url = base_url(b)

    async def go():
        peer = await connect(url, "/whep/cam", TOKEN, codec="vp8")
        try:
            deadline = time.monotonic() + 15
            while len(peer.frames) < 10 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            listing = json.loads((await request("GET", url + "/api/webrtc", token=TOKEN)).text)
            return peer.frames, peer.answer, listing
        finally:
            await close(peer)

    frames, answer, listing = run(go())
    assert len(frames) >= 10
    assert "VP8/90000" in answer and "H264" not in answer
    viewer = listing["sessions"][0]
    assert viewer["path"] == "transcode" and viewer["video_codec"] == "vp8" and viewer["route"]["video"] == "cam-vp8"
    assert abs(frame_number(frames[-1].mean(axis=2).astype(np.uint8)) - cam_now(b)) < 90


def test_websocket_limits_close_one_socket_and_a_wrong_token_is_refused(box):
    b = webrtc_box(box, ws_max_message_bytes=4096)
    url = base_url(b).replace("http://", "ws://")

    async def go():
        import aiohttp
        async with aiohttp.ClientSession() as http:
            refused = None
            try:
                await http.ws_connect(f"{url}/ws/lobby/nobody?access_token=wrong-token-wrong-token")
            except aiohttp.WSServerHandshakeError as exc:
                refused = exc.status
            good = await http.ws_connect(f"{url}/ws/lobby/good?access_token={TOKEN}")
            bad = await http.ws_connect(f"{url}/ws/lobby/bad?access_token={TOKEN}")
            await good.send_str(json.dumps({"type": "config", "codec": "raw_rgb24", "width": 8, "height": 8}))
            await bad.send_bytes(bytes(5) + bytes(8000))            # over ws_max_message_bytes
            closed = await bad.receive(timeout=5)
            header = bytes([(2 << 1) | 1, 0, 0, 0, 1])
            with framebus.Consumer.attach("good", prefix=b.prefix, missing_ok=True, start="oldest") as c:
                await good.send_bytes(header + bytes([200, 100, 50]) * 64)
                item = await c.receive_async(timeout=5)
                picture = None if item is None else ((item.width, item.height),
                                                     np.frombuffer(bytes(item.copy()), np.uint8)[:3].tolist())
            alive = not good.closed
            await good.close()
            return refused, closed, bad.close_code, alive, picture

    refused, closed, code, alive, picture = run(go())
    assert refused == 401
    assert code == 1009, f"the oversized message closed that socket with 1009 ({closed})"
    assert alive, "the other socket went on"
    assert picture == ((8, 8), [200, 100, 50]), "and its raw_rgb24 picture reached the bus"


def _self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "box.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "box.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "box.pem", tmp_path / "box.key"


def test_https_with_the_configured_certificate(box, tmp_path):
    cert, key = _self_signed(tmp_path)
    b = webrtc_box(box, tls_cert=str(cert), tls_key=str(key))
    url = base_url(b)
    assert url.startswith("https://")

    async def go():
        import ssl

        import aiohttp
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/", ssl=trust) as r:
                page = (r.status, await r.text())
            async with http.get(url + "/api/streams", ssl=trust,
                                headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                streams = await r.json()
        return page, streams

    (code, html), streams = run(go())
    assert code == 200 and "<html" in html.lower()
    assert "cam" in {s["stream"] for s in streams}


def test_trickle_ice_by_patch_and_unknown_resources(box):
    b = webrtc_box(box)
    url = base_url(b)

    async def go():
        peer = await connect(url, "/whep/cam", TOKEN)
        try:
            frag = "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\na=mid:0\r\n" \
                   "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\na=end-of-candidates\r\n"
            ok = await request("PATCH", url + peer.location, frag, TOKEN, "application/trickle-ice-sdpfrag")
            bad = await request("PATCH", url + peer.location, "a=mid:0\r\na=candidate:garbage\r\n", TOKEN,
                                "application/trickle-ice-sdpfrag")
            wrong_type = await request("PATCH", url + peer.location, frag, TOKEN, "application/sdp")
            gone = await request("DELETE", url + "/whep/cam/0000000000000000", token=TOKEN)
            deleted = await request("DELETE", url + peer.location, token=TOKEN)
            again = await request("DELETE", url + peer.location, token=TOKEN)
            return ok.status_code, bad.status_code, wrong_type.status_code, gone.status_code, deleted.status_code, \
                again.status_code
        finally:
            await close(peer)

    assert run(go()) == (204, 400, 415, 404, 200, 404)
    assert b.services()["webrtc"]["state"] == "ready"


def test_a_viewer_that_goes_away_without_delete_is_ended(box):
    b = webrtc_box(box)
    url = base_url(b)

    async def go():
        peer = await connect(url, "/whep/cam", TOKEN)
        deadline = time.monotonic() + 10
        while not peer.frames and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await close(peer)       # no DELETE: the DTLS close is all the box hears
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listing = json.loads((await request("GET", url + "/api/webrtc", token=TOKEN)).text)
            if not listing["sessions"]:
                return True
            await asyncio.sleep(0.2)
        return False

    assert run(go()), "the viewer left the service's sessions"
    page = b.settled_scrape("webrtc")     # the hub shows a service's metrics as of its last heartbeat
    assert metric_value(page, "edgeroom_webrtc_sessions_ended_total", kind="viewer", reason="closed") == 1
