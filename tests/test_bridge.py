"""The bridge against real peers: aiortc room calls (WebRTC over real ICE on 127.0.0.1) and baresip calls (SIP),
in rooms the bridge service routes. Each participant's pictures are checked by content (its colour, baresip's
bars at its size), its sound by its frequency."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from services.capture.sources.synthetic import frame_number
from services.control.client import HookHandler
from tests.appliance import metric_value, wait_for
from tests.webrtc_peers import ColourTrack, ToneTrack, close, connect, loopback_ice

TOKEN = "test-token-0123456789abcdef"
CAM = 'kind = "synthetic"\nwidth = 320\nheight = 240\nfps = 30.0\nencode = "h264"\ngop = 2.0\nroom = "cams"\n'
RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


def bridge_box(box, more: str = "", on_timeout: str = "allow", **bridge: object):
    """A box with the WebRTC service and the bridge (room meet bridged), a camera in another room; without a
    BEFORE_BRIDGE_VIDEO handler the hub answers `on_timeout` (tests/appliance.py's boxes say block)."""
    loopback_ice()
    keys = {"enabled": True, "rooms": "meet", "speaker_hold": 0.4, **bridge}
    table = "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in keys.items())
    b = box("[services.webrtc]\nrestart_sec = 0.2\nwatchdog_sec = 5.0\nstop_timeout = 3.0\n"
            "[services.bridge]\nrestart_sec = 0.2\nwatchdog_sec = 5.0\nstop_timeout = 3.0\n"
            f'[webrtc]\nenabled = true\nport = 0\naddress = "127.0.0.1"\nice_addresses = "127.0.0.1"\n'
            f'tokens = "test:{TOKEN}"\n[bridge]\n{table}\n{more}')
    b.config.write_text(b.config.read_text().replace('on_timeout = "block"', f'on_timeout = "{on_timeout}"'))
    b.set_source("cam", CAM)
    b.run()
    b.wait_ready("webrtc", "bridge", "capture@cam", timeout=30)
    return b


def base_url(b) -> str:
    def listening() -> str | None:
        status = b.services()["webrtc"]["status"]
        address = status.split("://", 1)[1].split(";", 1)[0]
        return None if address.endswith(":0") else f"http://{address}"
    return wait_for(listening, 10, "the WebRTC service listening")


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def colour_of(picture: np.ndarray) -> tuple[int, int, int] | None:
    """Which of the participants' colours `picture` is (its mean within 40 per channel), else None (smear, grey)."""
    mean = picture.reshape(-1, 3).mean(axis=0)
    for c in (RED, GREEN, BLUE):
        if np.abs(mean - np.array(c)).max() < 40:
            return c
    return None


def tone(peer, seconds: float = 1.0) -> float:
    """The strongest frequency of the last `seconds` the peer heard."""
    chunks = [pcm for _rate, pcm in peer.audio][-int(seconds * 50):]
    rate = peer.audio[-1][0]
    pcm = np.concatenate(chunks).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.argmax(spectrum[1:]) + 1) * rate / len(pcm)


def heard(peer, hz: float, seconds: float = 1.0) -> float:
    """The level of `hz` in what the peer heard lately, relative to the strongest frequency (1.0: it is)."""
    chunks = [pcm for _rate, pcm in peer.audio][-int(seconds * 50):]
    rate = peer.audio[-1][0]
    pcm = np.concatenate(chunks).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    at = int(round(hz * len(pcm) / rate))
    return float(spectrum[at - 3:at + 4].max() / max(spectrum.max(), 1e-9))


async def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


async def join(url: str, name: str, rgb, hz: float, gain: float = 1.0, codec: str = "h264", extra_video: int = 0):
    tone_track = ToneTrack(hz, gain)
    peer = await connect(url, f"/rooms/meet/call?session={name}", TOKEN, send=(ColourTrack(rgb), tone_track),
                         codec=codec, keep=300, extra_video=extra_video)
    peer.tone = tone_track
    return peer


def test_two_participants_see_and_hear_each_other_and_a_newcomer_has_a_picture_within_a_second(box):
    b = bridge_box(box)
    url = base_url(b)

    async def go():
        alice = await join(url, "alice", RED, 440)
        try:
            await asyncio.sleep(1.0)                   # alice alone: the bridge sends her nothing
            assert not alice.frames, "a participant alone in the room gets no video (never its own)"
            bob = await join(url, "bob", GREEN, 660)
            try:
                await until(lambda: bob.pc.connectionState == "connected", 10, "bob connected")
                up = time.monotonic()
                await until(lambda: bob.frames and colour_of(bob.frames[-1]) == RED, 5, "bob sees alice")
                first_picture = time.monotonic() - up
                await until(lambda: alice.frames and colour_of(alice.frames[-1]) == GREEN, 5, "alice sees bob")
                await asyncio.sleep(1.5)
                status = b.call("bridge.status", {"room": "meet"})
                sessions = {s["session"]: s for s in b.call("sessions", {"room": "meet"})}
                return (first_picture, [colour_of(f) for f in alice.frames[-30:]], [colour_of(f) for f in bob.frames],
                        tone(alice), tone(bob), status, sessions, b.call("route", {"session": "bob"}))
            finally:
                await close(bob)
        finally:
            await close(alice)

    first_picture, alice_saw, bob_saw, alice_heard, bob_heard, status, sessions, shown = run(go())
    assert first_picture < 1.0, f"bob's first picture of alice {first_picture:.3f} s after he connected"
    assert set(alice_saw) == {GREEN}, "alice sees bob only"
    assert set(bob_saw) == {RED}, "bob saw alice only, from his first picture on (no smear: it was a keyframe)"
    assert abs(alice_heard - 660) < 15 and abs(bob_heard - 440) < 15, (alice_heard, bob_heard)
    routes = {r["target"]: r for r in status["routes"]}
    assert routes["alice"]["video"] == "bob" and routes["alice"]["audio"] == "bob-audio"
    assert routes["bob"]["video"] == "alice" and routes["bob"]["path"] == "pass-through"
    sends = {t["kind"]: t["stream"] for t in sessions["alice"]["tracks"] if t.get("direction") == "send"}
    assert sends == {"video": "bob", "audio": "bob-audio"}
    assert shown["video"]["origin"] == "bridge"


def test_three_participants_the_video_follows_the_speaker_without_smear_and_each_hears_the_others(box):
    b = bridge_box(box)
    url = base_url(b)

    async def go():
        alice = await join(url, "alice", RED, 440, gain=1.0)
        bob = await join(url, "bob", GREEN, 660, gain=0.0)
        carol = await join(url, "carol", BLUE, 880, gain=0.0)
        peers = (alice, bob, carol)
        try:
            await until(lambda: bob.frames and colour_of(bob.frames[-1]) == RED
                        and carol.frames and colour_of(carol.frames[-1]) == RED, 10, "bob and carol see alice")
            speaking = await until(lambda: b.call("bridge.status", {"room": "meet"})["speaker"] == "alice" or None,
                                   5, "alice is the speaker")
            assert speaking
            # carol talks, alice stops: after the hold, everyone but carol sees carol; carol sees alice
            mark = [len(p.frames) for p in peers]
            bob.frames.clear()
            alice.tone.gain, carol.tone.gain = 0.0, 1.0
            switched = time.monotonic()
            await until(lambda: bob.frames and colour_of(bob.frames[-1]) == BLUE, 10, "bob sees carol")
            took = time.monotonic() - switched
            await until(lambda: alice.frames and colour_of(alice.frames[-1]) == BLUE, 5, "alice sees carol")
            # each hears the others, never itself: carol speaks now; bob hears her, carol does not hear herself
            await until(lambda: heard(bob, 880, 0.5) > 0.5, 5, "bob hears carol in his mix")
            assert heard(carol, 880, 0.5) < 0.1, "carol does not hear herself"
            status = b.call("bridge.status", {"room": "meet"})
            return took, mark, list(bob.frames), carol, alice, bob, status
        finally:
            for p in peers:
                await close(p)

    took, _mark, bob_frames, carol, alice, bob, status = run(go())
    assert took >= 0.4, f"the switch came {took:.2f} s after the voice changed: before the hold (0.4 s)"
    seen = [colour_of(f) for f in bob_frames]
    assert None not in seen, "every picture bob got around the switch is a whole picture of one participant " \
                             "(a switch on a keyframe: no smear)"
    first_blue = seen.index(BLUE)
    assert set(seen[first_blue:]) == {BLUE}, "no going back once switched"
    assert status["speaker"] == "carol" and status["policy"] == "speaker"
    routes = {r["target"]: r for r in status["routes"]}
    assert routes["alice"]["source"] == "carol" and routes["bob"]["source"] == "carol"
    assert routes["carol"]["source"] == "alice", "the speaker sees the previous speaker, never herself"
    assert routes["bob"]["audio"] == "mix-bob-audio" and set(routes["bob"]["heard"]) == {"alice", "carol"}
    page = b.settled_scrape("bridge")
    assert metric_value(page, "edgeroom_bridge_speaker_switches_total", room="meet") >= 2


def test_a_hook_handler_blocks_then_replaces_a_route_and_a_slow_handler_meets_the_policy(box):
    b = bridge_box(box, on_timeout="block", hook_recheck=0.0)    # deadline 0.3 s (tests/appliance.py)
    url = base_url(b)
    wait_for(lambda: "cam" in {s["stream"] for s in b.call("streams") if s["status"] == "alive"}, 15, "the camera")
    decisions = {"bob": ("block", None)}
    asked: list[dict] = []
    stop = threading.Event()
    slow = threading.Event()

    def answer(data: dict):
        asked.append(data)
        if slow.is_set():
            time.sleep(1.0)                           # past the 0.3 s deadline
        return decisions.get(data["target"], ("allow", None))

    handler = HookHandler(b.control, "BEFORE_BRIDGE_VIDEO", answer)
    handler.register()
    thread = threading.Thread(target=handler.serve, kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()

    def route_of(target: str) -> dict:
        return {r["target"]: r for r in b.call("bridge.status", {"room": "meet"})["routes"]}.get(target, {})

    async def go():
        alice = await join(url, "alice", RED, 440)
        bob = await join(url, "bob", GREEN, 660)
        try:
            await until(lambda: alice.frames and colour_of(alice.frames[-1]) == GREEN, 10, "alice sees bob (allowed)")
            blocked = route_of("bob")
            await asyncio.sleep(1.0)
            bob_frames_blocked = len(bob.frames)
            # the handler changes its mind: replace alice by the camera; the bridge asks again when told to
            decisions["bob"] = ("replace", {"stream": "cam"})
            b.call("bridge.recheck", {"room": "meet", "target": "bob"})
            await until(lambda: bob.frames and abs(frame_number(bob.frames[-1].mean(axis=2).astype(np.uint8)))
                        > 0 and colour_of(bob.frames[-1]) is None, 10, "bob sees the camera instead")
            replaced = route_of("bob")
            # a handler too slow for the deadline: the policy (block) decides
            slow.set()
            b.call("bridge.recheck", {"room": "meet"})
            await until(lambda: route_of("alice").get("path") == "blocked", 5, "alice's route blocked by the policy")
            timed_out = route_of("alice")
            return blocked, bob_frames_blocked, replaced, timed_out
        finally:
            await close(alice)
            await close(bob)

    try:
        blocked, bob_frames_blocked, replaced, timed_out = run(go())
    finally:
        stop.set()
        thread.join(5)
        handler.close()
    assert blocked["path"] == "blocked" and blocked["video"] == "" and blocked["hook"]["decision"] == "block"
    assert bob_frames_blocked == 0, "bob got no picture of alice while the handler blocked it"
    assert replaced["path"] == "replaced" and replaced["video"] == "cam"
    assert timed_out["hook"]["reason"] == "timeout"
    assert {(d["source"], d["target"]) for d in asked} >= {("alice", "bob"), ("bob", "alice")}
    page = b.settled_scrape("bridge")
    assert metric_value(page, "edgeroom_bridge_hook_answers_total", decision="block", reason="timeout") >= 1


def test_a_room_past_max_participants_refuses_the_next_and_ctl_shows_the_room(box, tmp_path):
    b = bridge_box(box, max_participants=2)
    url = base_url(b)

    async def go():
        peers = [await join(url, n, c, hz) for n, c, hz in (("alice", RED, 440), ("bob", GREEN, 660),
                                                             ("carol", BLUE, 880))]
        try:
            await until(lambda: peers[0].frames and colour_of(peers[0].frames[-1]) == GREEN, 10, "alice sees bob")
            status = await until(lambda: (s := b.call("bridge.status", {"room": "meet"}))["refused"] and s, 5,
                                 "carol refused")
            await asyncio.sleep(1.0)
            return status, len(peers[2].frames)
        finally:
            for p in peers:
                await close(p)

    status, carol_frames = run(go())
    assert status["refused"] == ["carol"] and {m["session"] for m in status["members"]} == {"alice", "bob"}
    assert carol_frames == 0, "the refused participant is sent nothing"
    assert {r["target"] for r in status["routes"]} == {"alice", "bob"}
    page = b.settled_scrape("bridge")
    assert metric_value(page, "edgeroom_bridge_refused_total", room="meet", reason="full") == 1


def test_a_grid_shows_each_participant_the_others_side_by_side_and_a_pin_shows_one(box):
    b = bridge_box(box, policy="grid", grid_size="320x120", grid_fps=15.0)
    url = base_url(b)

    def halves(picture: np.ndarray) -> tuple:
        w = picture.shape[1]
        return colour_of(picture[:, : w // 2 - 8][30:-30]), colour_of(picture[:, w // 2 + 8:][30:-30])

    async def go():
        alice = await join(url, "alice", RED, 440)
        bob = await join(url, "bob", GREEN, 660, gain=0.0)
        carol = await join(url, "carol", BLUE, 880, gain=0.0)
        peers = (alice, bob, carol)
        try:
            await until(lambda: alice.frames and halves(alice.frames[-1]) == (GREEN, BLUE), 15,
                        "alice's grid: bob | carol")
            await until(lambda: carol.frames and halves(carol.frames[-1]) == (RED, GREEN), 10,
                        "carol's grid: alice | bob")
            grid = b.call("bridge.status", {"room": "meet"})
            b.call("bridge.policy", {"room": "meet", "policy": "pin"})
            b.call("bridge.pin", {"room": "meet", "session": "bob"})
            await until(lambda: alice.frames and colour_of(alice.frames[-1]) == GREEN
                        and carol.frames and colour_of(carol.frames[-1]) == GREEN, 10, "everyone sees bob")
            pinned = b.call("bridge.status", {"room": "meet"})
            return alice.frames[-1].shape, grid, pinned
        finally:
            for p in peers:
                await close(p)

    shape, grid, pinned = run(go())
    assert shape == (240, 320, 3), "after the pin alice gets bob's own picture, not a grid"
    routes = {r["target"]: r for r in grid["routes"]}
    assert routes["alice"]["path"] == "grid" and routes["alice"]["video"] == "grid-alice"
    assert {g["out"] for g in grid["grids"]} == {"grid-alice", "grid-bob", "grid-carol"}
    assert pinned["pinned"] == "bob" and pinned["policy"] == "pin" and not pinned["grids"], "grids stop when unused"
    assert {r["target"]: r["source"] for r in pinned["routes"]}["alice"] == "bob"


def test_a_participant_that_changes_size_mid_call_is_seen_at_its_new_size_through_pass_through_and_transcode(box):
    b = bridge_box(box)
    url = base_url(b)

    async def go():
        alice = await join(url, "alice", RED, 440)
        bob = await join(url, "bob", GREEN, 660, gain=0.0, codec="vp8")
        carol = await join(url, "carol", BLUE, 880, gain=0.0)
        peers = (alice, bob, carol)
        try:
            await until(lambda: bob.frames and colour_of(bob.frames[-1]) == RED and carol.frames
                        and colour_of(carol.frames[-1]) == RED, 10, "bob (VP8) and carol (H.264) see alice")
            video = next(t for t in alice.pc.getSenders() if t.track and t.track.kind == "video").track
            picture = np.zeros((360, 480, 3), np.uint8)
            picture[:] = RED
            video.picture = picture                        # alice's camera changes its size mid-call
            await until(lambda: bob.frames[-1].shape == (360, 480, 3) and carol.frames[-1].shape == (360, 480, 3),
                        10, "both see alice at her new size")
            assert colour_of(bob.frames[-1]) == RED and colour_of(carol.frames[-1]) == RED
            status = b.call("bridge.status", {"room": "meet"})
            before = len(alice.frames)
            await asyncio.sleep(1.0)
            return status, len(alice.frames) - before
        finally:
            for p in peers:
                await close(p)

    status, alice_went_on = run(go())
    transcode = next(t for t in status["transcodes"] if t["source"] == "alice")
    assert transcode["size"] == "480x360" and transcode["reopens"] >= 2, transcode
    assert alice_went_on > 15, "alice's own picture never stopped meanwhile"


def test_a_browser_that_takes_several_video_tracks_gets_every_other_participant_on_its_own(box):
    b = bridge_box(box)
    url = base_url(b)

    async def go():
        alice = await join(url, "alice", RED, 440)
        bob = await join(url, "bob", GREEN, 660, gain=0.0)
        dave = await join(url, "dave", BLUE, 880, gain=0.0, extra_video=2)     # three video tracks to receive on
        peers = (alice, bob, dave)
        try:
            await until(lambda: dave.frames and colour_of(dave.frames[-1]) == RED and dave.more[0]
                        and colour_of(dave.more[0][-1]) == GREEN, 10,
                        "dave sees the speaker (alice) on his first track and bob on the second")
            await asyncio.sleep(1.0)
            status = b.call("bridge.status", {"room": "meet"})
            sessions = {s["session"]: s for s in b.call("sessions", {"room": "meet"})}
            shown = b.call("route", {"session": "dave", "slot": 2})
            return [colour_of(f) for f in dave.more[0][-20:]], len(dave.more[1]), status, sessions, shown
        finally:
            for p in peers:
                await close(p)

    second, third, status, sessions, shown = run(go())
    assert set(second) == {GREEN}, "one source per track, never switched into another's"
    assert third == 0, "a third track with nobody left to show sends nothing (never dave's own video)"
    assert sessions["dave"]["accepts"]["video_tracks"] == 3
    assert sessions["alice"].get("accepts", {}).get("video_tracks", 1) == 1
    routes = {(r["target"], r["slot"]): r for r in status["routes"]}
    assert routes[("dave", 1)]["source"] == "alice" and routes[("dave", 2)]["source"] == "bob"
    assert ("dave", 3) not in routes and ("alice", 2) not in routes
    assert shown["video"]["route"] == "bob" and shown["video"]["origin"] == "bridge"
    sends = {t["id"]: t["stream"] for t in sessions["dave"]["tracks"] if t.get("direction") == "send"}
    assert sends["send-video"] == "alice" and sends["send-video2"] == "bob"


def test_the_box_page_joined_to_a_bridged_room_shows_every_other_participant_in_its_own_tile(box):
    from tests.browser import Browser, available
    if not available():
        pytest.skip("chromium is not installed (scripts/test installs it)")
    b = bridge_box(box)
    url = base_url(b)
    colours_js = """(() => Array.from(document.querySelectorAll('#call-section video:not(#local-video)'))
        .filter(v => v.videoWidth && !v.closest('figure').hidden).map(v => {
          const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
          const g = c.getContext('2d'); g.drawImage(v, 0, 0);
          const d = g.getImageData(0, 0, c.width, c.height).data; let r = 0, gg = 0, bb = 0, n = d.length / 4;
          for (let i = 0; i < d.length; i += 4) { r += d[i]; gg += d[i + 1]; bb += d[i + 2]; }
          return [r / n, gg / n, bb / n]; }))()"""

    async def go():
        peers = [await join(url, "alice", RED, 440), await join(url, "bob", GREEN, 660, gain=0.0),
                 await join(url, "carol", BLUE, 880, gain=0.0)]
        try:
            loop = asyncio.get_running_loop()

            def browse():
                with Browser() as browser:
                    page = browser.open(url + "/?token=" + TOKEN)
                    page.wait_for("document.querySelector('#rooms .room[data-room=meet] button.join')", 15)
                    page.evaluate("document.querySelector('#rooms .room[data-room=meet] button.join').click()")
                    deadline = time.monotonic() + 20
                    seen: list = []
                    while time.monotonic() < deadline:
                        seen = [colour_of(np.array([[c]], np.uint8)) for c in page.evaluate(colours_js)]
                        if sorted(map(str, seen)) == sorted(map(str, [RED, GREEN, BLUE])):
                            return seen, ""
                        time.sleep(0.2)
                    # what the page had, for the failure's message
                    videos = page.evaluate("Array.from(document.querySelectorAll('#call-section video')).map(v => "
                                           "[v.id, v.videoWidth, v.readyState, !!(v.closest('figure') || {}).hidden])")
                    return seen, f"videos (id, width, readyState, hidden): {videos}\nchromium:\n{browser.log()[-2000:]}"

            return await loop.run_in_executor(None, browse)    # the aiortc peers go on sending meanwhile
        finally:
            for p in peers:
                await close(p)

    seen, state = run(go())
    assert sorted(map(str, seen)) == sorted(map(str, [RED, GREEN, BLUE])), \
        f"the page shows alice, bob and carol, each in its own tile: {seen}\n{state}\nbox:\n{b.log()[-3000:]}"
