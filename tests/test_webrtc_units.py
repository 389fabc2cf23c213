"""Units of the WebRTC service: the viewer's bounded queue, H.264 profiles, the offer's codecs, bearer tokens."""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from services.control.tokens import TokenBook, add_token, list_tokens, parse_tokens, remove_token
from services.webrtc.choose import offered
from services.webrtc.peer import BusAudioTrack, BusVideoTrack, h264_keyframe, h264_profile, profile_fits, vp8_keyframe

SPS_HIGH = b"\x00\x00\x00\x01\x67\x64\x00\x1f\xac"     # profile_idc 100, constraints 0, level 31
SPS_BASE = b"\x00\x00\x00\x01\x67\x42\xc0\x1e\xda"
IDR = b"\x00\x00\x00\x01\x65\x88\x84"
DELTA = b"\x00\x00\x00\x01\x41\x9a"


def test_a_viewer_that_falls_behind_skips_to_the_next_keyframe_and_asks_for_it():
    asks, drops = [], []
    track = BusVideoTrack(max_wait_ns=200_000_000, ask_keyframe=asks.append,
                          dropped=lambda why, n: drops.append((why, n)))
    track.push(DELTA, False, 0)                       # nothing before a keyframe
    assert drops == [("gated", 1)]
    track.push(IDR, True, 1_000_000)
    for i in range(1, 4):                             # the viewer does not read: 3 deltas, 50 ms apart
        track.push(DELTA, False, 1_000_000 + i * 50_000_000)
    assert not asks
    track.push(DELTA, False, 1_000_000 + 300_000_000)   # the oldest waiting is now 300 ms old
    assert asks == ["the viewer fell behind"] and ("late", 4) in drops
    track.push(DELTA, False, 1_000_000 + 333_000_000)   # gated until the keyframe
    assert drops[-1] == ("gated", 1)
    track.push(SPS_BASE + IDR, True, 1_000_000 + 366_000_000)

    async def first():
        return await track.recv()
    packet = asyncio.new_event_loop().run_until_complete(first())
    assert bytes(packet).startswith(SPS_BASE), "the viewer goes on from the keyframe, with its parameter sets"


def test_an_idr_without_parameter_sets_gets_them():
    track = BusVideoTrack(max_wait_ns=10**9, ask_keyframe=lambda r: None, dropped=lambda w, n: None)
    track.extradata = SPS_BASE
    track.push(IDR, True, 0)
    packet = asyncio.new_event_loop().run_until_complete(track.recv())
    assert bytes(packet) == SPS_BASE + IDR and packet.pts == 0


def test_h264_and_vp8_facts():
    assert h264_profile(SPS_HIGH) == "64001f" and h264_profile(SPS_BASE) == "42c01e" and h264_profile(IDR) is None
    assert h264_keyframe(SPS_BASE + IDR) and not h264_keyframe(DELTA)
    assert vp8_keyframe(b"\x10\x02") and not vp8_keyframe(b"\x11\x02")
    assert profile_fits("42c01e", "42e01f") and profile_fits("42c01e", "640c1f")
    assert profile_fits("4d001f", "640c1f") and not profile_fits("4d001f", "42e01f")
    assert not profile_fits("64001f", "42e01f") and profile_fits(None, "42e01f")


def test_an_offers_codecs_are_read_and_garbage_is_named():
    sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
           "m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n"
           "a=rtpmap:96 VP8/90000\r\na=rtpmap:97 H264/90000\r\n"
           "a=fmtp:97 packetization-mode=1;profile-level-id=640C1F\r\n")
    video = offered(sdp)["video"]
    assert [(o.codec, o.profile) for o in video] == [("vp8", None), ("h264", "640c1f")]
    with pytest.raises(ValueError, match="not SDP"):
        offered("m=video x\r\n")


def test_tokens_from_the_config_and_the_file(tmp_path):
    path = tmp_path / "http-tokens"
    book = TokenBook(parse_tokens("ops:0123456789abcdef0"), path)
    assert book.check("0123456789abcdef0") == "ops" and book.check("nope") is None and book.check("") is None
    token = add_token(path, "viewer")
    assert token not in path.read_text(), "the file keeps the digest only"
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"
    assert book.check(token) == "viewer" and list_tokens(path) == ["viewer"]
    time.sleep(0.01)
    assert remove_token(path, "viewer") and not remove_token(path, "viewer")
    os.utime(path, (time.time() + 1, time.time() + 1))   # a new mtime even on a coarse clock
    assert book.check(token) is None, "a removed token is refused without a restart"
    with pytest.raises(ValueError, match="16 characters"):
        parse_tokens("ops:short")


def test_an_audio_route_that_switches_rate_and_layout_keeps_one_format_and_one_clock():
    """aiortc's encoder keeps one resampler per track, which refuses a frame of another layout: a route from a
    call's stereo audio to the bridge's mono mix, or to a phone's 8 kHz, must not change what the track gives."""
    import numpy as np
    track = BusAudioTrack(dropped=lambda reason, n: None)
    t = np.arange(960) / 48000
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    track.push(np.repeat(tone, 2).tobytes(), 48000, 2)        # aiortc's own decode: 48 kHz stereo
    track.push(tone.tobytes(), 48000, 1)                       # the bridge's mix: 48 kHz mono
    for _ in range(3):                                         # a phone: 8 kHz mono
        track.push(tone[::6].tobytes(), 8000, 1)

    async def take(n):
        return [await track.recv() for _ in range(n)]

    frames = asyncio.new_event_loop().run_until_complete(take(4))
    assert {(f.sample_rate, f.layout.name, f.format.name) for f in frames} == {(48000, "stereo", "s16")}
    pts = [f.pts for f in frames]
    assert pts[:3] == [0, 960, 1920] and all(b > a for a, b in zip(pts, pts[1:])), "one clock across switches"
    mono_as_stereo = frames[1].to_ndarray().reshape(-1, 2)
    assert (mono_as_stereo[:, 0] == tone).all() and (mono_as_stereo[:, 1] == tone).all()


def test_audio_chunks_of_any_length_go_out_as_whole_20_ms_frames_each_with_its_own_timestamp():
    """aiortc gives every packet of one recv() the same RTP timestamp: a 40 ms chunk (an avatar's slice, a file's
    85 ms packet) handed as one frame went out as packets a receiver takes for duplicates. Frames are 20 ms."""
    import numpy as np
    track = BusAudioTrack(dropped=lambda reason, n: None)
    ramp = (np.arange(1920 + 4080) % 30000).astype(np.int16)  # 40 ms, then 85 ms: samples that say their place
    track.push(ramp[:1920].tobytes(), 48000, 1)
    track.push(ramp[1920:].tobytes(), 48000, 1)
    track.push(np.zeros(1600, np.int16).tobytes(), 16000, 1)  # 100 ms at 16 kHz, resampled

    async def take(n):
        return [await track.recv() for _ in range(n)]

    frames = asyncio.new_event_loop().run_until_complete(take(10))
    assert [f.samples for f in frames] == [960] * 10
    assert [f.pts for f in frames] == [960 * i for i in range(10)]
    left = np.concatenate([f.to_ndarray().reshape(-1, 2)[:, 0] for f in frames[:6]])
    assert (left == ramp[:5760]).all(), "in order, nothing lost or doubled at the chunks' seams"
