"""Avatars in a real box, seen by a real caller: edgeroom-avatar, the bridge and the WebRTC service as processes.

A tone file (capture's file source: 0.5 s of 440 Hz every 1.5 s, looped) drives an avatar whose faces come from
the reference avatar server (tests/avatar_server.py: the mouth opens with the audio's loudness). An aiortc room
call in the avatar's room is the caller: it decodes the pictures and the audio the bridge sends it, and the
test measures, at the caller, the offset between the tone's onsets and the mouth's openings (lip sync).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiortc import MediaStreamTrack

from services.control.client import CommandFailed
from tests.appliance import metric_value, wait_for
from tests.avatar_server import AvatarServer, mouth_opening
from tests.test_avatar_units import write_face
from tests.test_bridge import TOKEN, base_url, run, until
from tests.webrtc_peers import ColourTrack, ToneTrack, close, connect, loopback_ice

BURST, PERIOD, HZ = 0.5, 1.5, 440.0
VOICE_RMS = 32768 * 10 ** (-30 / 20)     # -30 dBFS: where the reference server's mouth is half open


def tone_file(path: Path, seconds: float = 6.0) -> Path:
    """An MKV with a small video and the tone: BURST s of HZ every PERIOD s, silence between."""
    expr = f"0.5*sin(2*PI*{HZ}*t)*lt(mod(t\\,{PERIOD})\\,{BURST})"
    video, audio = f"testsrc=size=64x64:rate=10:d={seconds}", f"aevalsrc={expr}:s=48000:d={seconds}"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", audio,
                    "-c:v", "libx264", "-g", "10", "-pix_fmt", "yuv420p", "-c:a", "pcm_s16le", "-shortest", str(path)],
                   check=True)
    return path


def avatar_box(box, tmp_path: Path, server_url: str, *, avatar: str | None = None, section: str = "",
               more: str = ""):
    """A box with the WebRTC service, the bridge (room meet), the tone file in room backstage and the avatar
    service: `avatar` is its [avatars.*] tables (None: host, driven by the tone file; "": none), `section` more
    keys of [avatar]."""
    loopback_ice()
    face = write_face(tmp_path / "face.png")
    tone_file(tmp_path / "tone.mkv")
    host = (f'[avatars.host]\nroom = "meet"\naudio = "tone-audio"\nprovider = "websocket"\n'
            f'url = "{server_url}"\nimage = "{face}"\nsize = "256x256"\nfps = 25.0\n')
    table = host if avatar is None else avatar
    b = box("[services.webrtc]\nrestart_sec = 0.2\nwatchdog_sec = 5.0\nstop_timeout = 3.0\n"
            "[services.bridge]\nrestart_sec = 0.2\nwatchdog_sec = 5.0\nstop_timeout = 3.0\n"
            "[services.avatar]\nrestart_sec = 0.2\nwatchdog_sec = 5.0\nstop_timeout = 3.0\n"
            f'[webrtc]\nenabled = true\nport = 0\naddress = "127.0.0.1"\nice_addresses = "127.0.0.1"\n'
            f'tokens = "test:{TOKEN}"\n[bridge]\nenabled = true\nrooms = "meet"\n[avatar]\nenabled = true\n'
            f"{section}\n{table}\n{more}")
    b.config.write_text(b.config.read_text().replace('on_timeout = "block"', 'on_timeout = "allow"'))
    b.set_source("tone", f'kind = "file"\npath = "{tmp_path / "tone.mkv"}"\nloop = true\naudio = true\n'
                         'decode = false\nroom = "backstage"\n')
    b.run()
    b.wait_ready("webrtc", "bridge", "avatar", "capture@tone", timeout=30)
    return b


@dataclass
class Caller:
    """What a caller got, each stamped with the arrival of its first RTP packet at the caller (the wire: aiortc's
    own audio decoder holds 4 packets before the first leaves it, a fixed 80 ms a real player's A/V sync
    accounts for): (monotonic s, mouth opening) and (monotonic s, rms, rate, samples)."""
    pictures: list = field(default_factory=list)
    sound: list = field(default_factory=list)
    pcm: list = field(default_factory=list)
    sizes: set = field(default_factory=set)
    arrivals: dict = field(default_factory=lambda: {"audio": {}, "video": {}})
    seen: object = None                          # what before_hangup() returned


def stamp_arrivals(receiver, got: Caller) -> None:
    """Record when each RTP timestamp of the receiver's track first arrives (a decoded frame's pts is its RTP
    timestamp less the first packet's, in aiortc)."""
    handle, seen = receiver._handle_rtp_packet, got.arrivals[receiver.track.kind]
    origin: list[int] = []

    async def stamped(packet, arrival_time_ms: int) -> None:
        # aiortc's jitter buffer counts a frame's pts from its first packet's timestamp
        origin[:] = origin or [packet.timestamp]
        seen.setdefault((packet.timestamp - origin[0]) % 2 ** 32, time.monotonic())
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = stamped


def arrival_of(seen: dict, pts: int | None, near: int = 1920) -> float | None:
    """When the packet of a decoded frame arrived: the RTP timestamp nearest its pts (Opus's decoder shifts pts by
    its pre-skip), within `near` ticks (40 ms at 48 kHz); older entries are forgotten."""
    if pts is None or not seen:
        return None
    diff = {ts: abs((ts - pts + 2 ** 31) % 2 ** 32 - 2 ** 31) for ts in seen}
    best = min(diff, key=diff.__getitem__)
    at = seen[best] if diff[best] <= near else None
    for ts in [ts for ts in seen if seen[ts] <= seen[best]]:
        del seen[ts]
    return at


async def _watch(track: MediaStreamTrack, got: Caller, mouth) -> None:
    seen = got.arrivals[track.kind]
    while True:
        try:
            frame = await track.recv()
        except Exception:
            return
        at = arrival_of(seen, frame.pts) or time.monotonic()
        if track.kind == "video":
            rgb = frame.to_ndarray(format="rgb24")
            got.sizes.add((rgb.shape[1], rgb.shape[0]))
            got.pictures.append((at, mouth(rgb)))
        else:
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float64)
            got.sound.append((at, float(np.sqrt(np.mean(pcm ** 2))), frame.sample_rate, len(pcm)))
            got.pcm.append(pcm)


async def call_in(url: str, seconds: float, before_hangup=None, mouth=mouth_opening) -> Caller:
    """A room call into meet (it sends a colour and a quiet tone, as a person would), watching for `seconds`;
    `mouth(rgb)` reads how open the face's mouth is."""
    got = Caller()
    peer = await connect(url, "/rooms/meet/call?session=caller", TOKEN, send=(ColourTrack((30, 200, 30)),
                         ToneTrack(300.0, 0.01)), keep=2)
    for t in peer.tasks:
        t.cancel()
    for r in peer.pc.getReceivers():
        if r.track is not None:
            stamp_arrivals(r, got)
            peer.tasks.append(asyncio.ensure_future(_watch(r.track, got, mouth)))
    await until(lambda: got.pictures and got.sound, 10, "the avatar's pictures and voice at the caller")
    await asyncio.sleep(seconds)
    if before_hangup is not None:
        got.seen = before_hangup()
    for t in peer.tasks:
        t.cancel()
    await peer.pc.close()
    return got


def onsets(times: list[float], on: list[bool], min_gap: float = 0.6) -> list[float]:
    """The times where `on` turns true after at least `min_gap` s of false."""
    out, last_on = [], -1e9
    for t, o in zip(times, on, strict=True):
        if o:
            if t - last_on > min_gap:
                out.append(t)
            last_on = t
    return out


def heard_hz(got: Caller) -> float:
    """The strongest frequency of the last 3 s the caller heard."""
    rate = got.sound[-1][2]
    pcm = np.concatenate(got.pcm[-150:])
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.argmax(spectrum[1:]) + 1) * rate / len(pcm)


def lip_sync(got: Caller) -> tuple[list[float], list[float], list[float]]:
    """(voice onsets, mouth onsets, offsets mouth - voice) at the caller, each mouth onset matched to the nearest
    voice onset within 0.3 s."""
    voice = onsets([t for t, *_ in got.sound], [r > VOICE_RMS for _, r, _, _ in got.sound])
    mouth = onsets([t for t, _ in got.pictures], [o > 0.5 for _, o in got.pictures])
    offsets = []
    for m in mouth:
        near = min(voice, key=lambda v: abs(v - m), default=None)
        if near is not None and abs(near - m) < 0.3:
            offsets.append(m - near)
    return voice, mouth, offsets


def test_a_caller_sees_the_mouth_follow_a_tone_file_and_hears_it_in_sync(box, tmp_path):
    with AvatarServer(fps=25.0) as server:
        b = avatar_box(box, tmp_path, server.url)
        url = base_url(b)
        [s] = wait_for(lambda: b.call("sessions", {"room": "meet"}), 10, "the avatar's session in room meet")
        assert s["session"] == "host" and s["kind"] == "avatar"
        assert {t["stream"] for t in s["tracks"]} == {"host", "host-audio"}
        got = run(call_in(url, 6.0, lambda: b.call("bridge.status", {"room": "meet"})["routes"]))
        assert server.starts == 1 and server.images == [(240, 320)], "the reference image was sent"
        assert server.sample_rates == [16000]
        status = b.call("avatar.list")["avatars"][0]
        page = b.settled_scrape("avatar")
        routes = got.seen
    assert got.sizes == {(256, 256)}
    # the mouth opens while the tone plays and is closed in the silences, at the caller
    voice, mouth, offsets = lip_sync(got)
    assert len(voice) >= 3 and len(mouth) >= 3, (voice, mouth)
    assert len(offsets) >= 3, (voice, mouth)
    print(f"lip sync at the caller: mouth - voice onsets {[round(o * 1000) for o in offsets]} ms")
    # a frame is 40 ms: the mouth opens on the frame whose audio holds the onset, anywhere within it
    assert max(abs(o) for o in offsets) < 0.045, offsets
    # the whole voice is heard: every 20 ms of it its own packet (two packets of one timestamp lost one)
    span = got.sound[-1][0] - got.sound[0][0]
    assert sum(n / rate for _, _, rate, n in got.sound) > 0.9 * span
    opened = [o for _, o in got.pictures if o > 0.5]
    closed = [o for _, o in got.pictures if o < 0.1]
    assert len(opened) > 20 and len(closed) > 40
    assert abs(heard_hz(got) - HZ) < 10, "the caller hears the tone (and not its own 300 Hz)"
    # the bridge transcodes the avatar's raw pictures for the caller, and sends the avatar's voice as it is
    [route] = [r for r in routes if r["target"] == "caller"]
    assert route["source"] == "host" and route["path"] == "transcode" and route["audio"] == "host-audio"
    assert status["state"] == "ready" and status["frames"]["held"] == 0 and status["latency_p50_ms"] < 150
    assert metric_value(page, "edgeroom_avatar_frames_total", avatar="host", kind="provider") > 100


def test_ctl_avatar_start_say_survives_a_sigkill_and_stop(box, tmp_path):
    """An agent's voice pushed with `ctl avatar say` (no stream of the bus); the avatar started by command comes
    back after its service is SIGKILLed (avatars.json); `stop` ends its session."""
    with AvatarServer(fps=25.0) as server:
        b = avatar_box(box, tmp_path, server.url, avatar="")
        face = tmp_path / "face.png"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")},
               "EDGEROOM_CONFIG": str(b.config)}

        def ctl(*args: str) -> str:
            r = subprocess.run([os.sys.executable, "-m", "services.cli", "ctl", "avatar", *args], env=env,
                               capture_output=True, text=True, timeout=20)
            assert r.returncode == 0, r.stderr
            return r.stdout

        out = ctl("start", "meet", "--name", "agent", "--image", str(face), "--url", server.url, "--size",
                  "128x128", "--audio", "")
        assert out.startswith("avatar agent in room meet: websocket") and "pushed voice" in out
        wait_for(lambda: b.call("avatar.list")["avatars"][0]["state"] == "ready", 10, "the provider up")
        voice = tmp_path / "voice.wav"
        t = np.arange(int(1.0 * 24000)) / 24000
        with wave.open(str(voice), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(24000)
            w.writeframes((np.sin(2 * np.pi * 440 * t) * 16000).astype("<i2").tobytes())
        url = base_url(b)

        async def listen() -> Caller:
            task = asyncio.ensure_future(call_in(url, 2.5))
            await asyncio.sleep(1.0)
            await asyncio.get_running_loop().run_in_executor(None, ctl, "say", "agent", str(voice))
            return await task

        got = run(listen())
        bad = {"pcm": "not base64!", "rate": 24000}, {"pcm": "AAAA", "rate": 24000}, {"pcm": "AAA=", "rate": 4}
        for args, why in zip(bad, ("not base64", "not whole 1-channel s16 samples", "rate must be"), strict=True):
            with pytest.raises(CommandFailed, match=why) as err:
                b.call("avatar.say", {"name": "agent", **args})
            assert err.value.code == "bad_args"
        for args, why in (({"image": str(tmp_path / "none.png")}, "none.png: No such file"),
                          ({"image": str(face), "provider": "hologram"}, "provider: unknown avatar provider"),
                          ({"image": str(face), "size": "13x7"}, "size: "),
                          ({"image": str(face), "url": "ws://x"}, "url: the websocket provider needs")):
            with pytest.raises(CommandFailed, match=why):
                b.call("avatar.start", {"room": "meet", "name": "bad", "url": server.url, **args})
        assert [a["name"] for a in b.call("avatar.list")["avatars"]] == ["agent"]
        opened = [o for _, o in got.pictures if o > 0.5]
        assert len(opened) >= 15, "the pushed voice moved the mouth"
        assert got.sizes == {(128, 128)}
        listing = ctl("list")
        assert "agent" in listing and "ready" in listing and "(pushed)" in listing
        pid = b.services()["avatar"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: b.services()["avatar"]["pid"] != pid and b.call("avatar.list")["avatars"], 15,
                 "the avatar service restarted with its avatar")
        [again] = b.call("avatar.list")["avatars"]
        assert again["name"] == "agent" and again["origin"] == "command"
        assert json.loads(ctl("stop", "agent", "--json")) == {"name": "agent", "stopped": True}
        wait_for(lambda: not b.call("sessions", {"room": "meet"}), 5, "the avatar's session gone")
        assert server.starts >= 2


def test_without_the_bridge_the_encode_service_makes_the_face_playable(box, tmp_path):
    """The avatar's raw pictures through an encoder of the box ([encoders.NAME] input = the avatar), played with
    WHEP: the way to a peer when no bridge routes the room."""
    with AvatarServer(fps=25.0) as server:
        b = avatar_box(box, tmp_path, server.url, more='[encoders.face]\ninput = "host"\ncodec = "h264"\n'
                                                       '[services.encode]\nrestart_sec = 0.2\n')
        b.wait_ready("encode@face", timeout=20)
        url = base_url(b)

        async def watch() -> list[float]:
            peer = await connect(url, "/whep/face", TOKEN, keep=400)
            await until(lambda: len(peer.frames) > 100, 15, "100 pictures of the encoded face")
            await close(peer)
            return [mouth_opening(f) for f in peer.frames]

        openings = run(watch())
    assert sum(o > 0.5 for o in openings) > 15 and sum(o < 0.1 for o in openings) > 30, openings
