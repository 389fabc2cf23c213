"""Avatars seen by real callers of other kinds: a SIP phone (baresip, H.264 packetization-mode 0) calling into the
avatar's room, and the same room with the face drawn by the Anam-protocol server (tests/anam_server.py) over
WebRTC, the avatar service being its aiortc client."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.anam_server import KEY, AnamServer
from tests.anam_server import mouth_opening as anam_mouth
from tests.appliance import wait_for
from tests.avatar_server import AvatarServer, mouth_opening
from tests.sip_peers import Baresip, free_port
from tests.test_avatar import BURST, HZ, PERIOD, avatar_box, call_in, heard_hz, lip_sync
from tests.test_avatar_units import write_face
from tests.test_bridge import base_url, run
from tests.test_sip import tone_hz

baresip = pytest.mark.skipif(not Path("/usr/bin/baresip").exists(), reason="baresip is not installed "
                             "(Debian baresip-core, baresip-ffmpeg: scripts/test installs them)")
SIP = '[services.sip]\nrestart_sec = 0.2\nwatchdog_sec = 3.0\nstop_timeout = 2.0\n'


def runs(flags: list[bool], times: list[float]) -> list[tuple[float, float]]:
    """(start, end) of each run of True seen whole: not one already under way at the first sample (its start, the
    first sample's time, is not when it began: taken for an onset, it put a period 0.4 s short whenever sampling
    began in a burst, as it does when a loaded machine shifts the call's timing), nor one still going at the last."""
    out: list[tuple[float, float]] = []
    start = None
    began = False                                # a False seen: the next True is an onset
    for t, f in zip(times, flags, strict=True):
        if f and start is None and began:
            start = t
        elif not f:
            if start is not None:
                out.append((start, t))
                start = None
            began = True
    return out


@baresip
def test_a_phone_sees_the_mouth_open_with_the_tone_and_shut_in_the_silences_and_hears_it(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    with AvatarServer(fps=25.0) as server:
        b = avatar_box(box, tmp_path, server.url, more=SIP + f'[sip]\nenabled = true\nport = {port}\n'
                                                        f'users = "alice:secret"\ndigest_algorithms = "MD5"\n'
                                                        f'room = "meet"\n')
        b.wait_ready("sip", timeout=30)
        with Baresip(tmp_path, "phone", user="alice", password="secret", video_codecs=("H264",), tone_hz=660,
                     video_size=(320, 240)) as phone:
            phone.dial(f"sip:meet@127.0.0.1:{port}")
            phone.wait_event("CALL_ESTABLISHED", timeout=10)
            stats = phone.wait_video_frames(20, timeout=15)
            times, openings = [], []
            end = time.monotonic() + 3 * PERIOD + 0.2
            while time.monotonic() < end:             # the phone's decoded picture, as often as it saves one
                picture = phone.remote_picture()
                times.append(time.monotonic())
                openings.append(mouth_opening(picture))
            routes = {r["target"]: r for r in b.call("bridge.status", {"room": "meet"})["routes"]}
            time.sleep(0.5)
            phone.hangup()
            phone.wait_event("CALL_CLOSED", timeout=5)
    assert stats.rx_size == (256, 256), stats.raw
    [route] = [r for r in routes.values() if r["source"] == "host"]
    assert route["path"] == "transcode" and route["codec"] == "h264" and route["audio"] == "host-audio"
    # open while the tone plays, shut in the silences: a third of the pictures open (BURST of every PERIOD), in
    # runs no longer than a burst (a snapshot is taken as often as the phone saves one: its timing is coarse)
    assert len(times) >= 15, times
    step = float(np.max(np.diff(times)))
    opened = runs([o > 0.5 for o in openings], times)
    share = sum(o > 0.5 for o in openings) / len(openings)
    assert abs(share - BURST / PERIOD) < 0.15 and sum(o < 0.1 for o in openings) >= 0.5 * len(openings), openings
    assert len(opened) >= 2 and all(e - s < BURST + step for s, e in opened), (opened, step)
    # and hears it: the tone, with silences between
    rate, pcm = phone.received_audio()
    assert abs(tone_hz(pcm[-rate * 2:], rate) - HZ) < 15
    level = np.sqrt(np.convolve(pcm ** 2, np.ones(rate // 20) / (rate // 20), mode="valid"))
    assert (level > 0.1).mean() > 0.15 and (level < 0.01).mean() > 0.3


def test_a_caller_sees_the_anam_face_move_with_the_tone_and_hears_it(box, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_ANAM_KEY", KEY)
    with AnamServer(width=256, height=256, fps=25.0, heartbeat_s=1.0) as server:
        face = write_face(tmp_path / "face.png")
        b = avatar_box(box, tmp_path, server.url, avatar=(
            f'[avatars.host]\nroom = "meet"\naudio = "tone-audio"\nprovider = "anam"\nurl = "{server.url}"\n'
            f'api_key_env = "TEST_ANAM_KEY"\navatar_id = "test-avatar"\nimage = "{face}"\nsize = "256x256"\n'),
            section='ice_addresses = "127.0.0.1"\n')
        wait_for(lambda: b.call("avatar.list")["avatars"][0]["state"] == "ready", 20, "the anam session up")
        got = run(call_in(base_url(b), 6.0, mouth=anam_mouth))
        status = b.call("avatar.list")["avatars"][0]
    assert server.sessions == 1 and server.sample_rates == {24000}
    assert server.audio_samples / 24000 > 4.0, (server.audio_messages, server.audio_samples, status)
    assert server.bodies[0]["personaConfig"]["avatarId"] == "test-avatar"
    assert status["state"] == "ready" and status["provider"] == "anam"
    opened = [o for _, o in got.pictures if o > 0.5]
    assert len(opened) > 20 and len(got.pictures) - len(opened) > 40
    voice, mouth, offsets = lip_sync(got)
    print(f"anam lip sync at the caller: mouth - voice onsets {[round(o * 1000) for o in offsets]} ms")
    # Anam's own sync (the test server's mouth is drawn for the 40 ms around a picture's time) plus the way
    # through the box; the first turn's start is Anam's session warming up
    assert len(offsets) >= 3 and max(abs(o) for o in offsets[1:]) < 0.1, offsets
    assert abs(heard_hz(got) - HZ) < 10, "the caller hears the tone, as Anam sent it back"

