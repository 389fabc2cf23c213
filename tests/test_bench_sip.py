"""benchmarks/sip.py: its reading of SIPp's message trace, its caller's offer, and one --quick run end to end (real
SIPp, a real box, real calls carrying media both ways)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import benchmark_module, shm_leftovers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("sip")


def _entry(at: str, sent: bool, message: str) -> str:
    how = f"UDP message sent ({len(message)} bytes):" if sent else f"UDP message received [{len(message)}] bytes :"
    return f"----------------------------------------------- 2026-12-07 {at}\n{how}\n\n{message}\n\n"


def _msg(first: str, call_id: str, cseq: str, body: str = "") -> str:
    return (f"{first}\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\nCall-ID: {call_id}\nCSeq: {cseq}\n"
            f"Content-Length: {len(body)}\n\n{body}")


def test_the_sipp_message_trace_gives_invite_to_200_per_call(bench, tmp_path):
    video = "v=0\nc=IN IP4 127.0.0.1\nm=audio 4000 RTP/AVP 0\nm=video 4002 RTP/AVP 96\n"
    trace = "".join([
        _entry("12:00:00.100000", True, _msg("INVITE sip:bench@127.0.0.1:5060 SIP/2.0", "1-9@h", "1 INVITE")),
        _entry("12:00:00.100400", False, _msg("SIP/2.0 100 Trying", "1-9@h", "1 INVITE")),
        _entry("12:00:00.100300", True, _msg("INVITE sip:bench@127.0.0.1:5060 SIP/2.0", "2-9@h", "1 INVITE")),
        _entry("12:00:00.103600", False, _msg("SIP/2.0 200 OK", "1-9@h", "1 INVITE", video)),
        _entry("12:00:00.103700", True, _msg("ACK sip:edgeroom@127.0.0.1:5060 SIP/2.0", "1-9@h", "1 ACK")),
        _entry("12:00:00.104300", False, _msg("SIP/2.0 200 OK", "2-9@h", "1 INVITE", "v=0\nm=audio 4 RTP/AVP 0\n")),
        _entry("12:00:00.105000", False, _msg("SIP/2.0 200 OK", "1-9@h", "1 INVITE", video)),   # sent again
        _entry("12:00:00.300000", True, _msg("BYE sip:edgeroom@127.0.0.1:5060 SIP/2.0", "1-9@h", "2 BYE")),
        _entry("12:00:00.300500", False, _msg("SIP/2.0 200 OK", "1-9@h", "2 BYE")),
    ])
    (tmp_path / "msg.log").write_text(trace)
    calls = bench.sipp_times(tmp_path / "msg.log")
    assert set(calls) == {"1-9@h", "2-9@h"}
    one, two = calls["1-9@h"], calls["2-9@h"]
    assert 1000 * (one["ok"] - one["invite"]) == pytest.approx(3.6, abs=1e-3)       # the first 200, not the BYE's
    assert 1000 * (one["first"] - one["invite"]) == pytest.approx(0.4, abs=1e-3)
    assert 1000 * (two["ok"] - two["invite"]) == pytest.approx(4.0, abs=1e-3)
    assert one["video"] is True and two["video"] is False
    assert bench.sipp_times(tmp_path / "none.log") == {}


def test_the_callers_offer_is_answered_with_pcmu_and_h264_mode_1(bench):
    from services.sip import offer

    a = offer.answer(bench.offer_sdp(40000, 40002), host="127.0.0.1", ports={"audio": 50000, "video": 50002},
                     session_id=1)
    assert a.audio is not None and a.audio.codec.name == "pcmu" and a.audio.peer.port == 40000
    assert a.video is not None and a.video.codec.name == "h264" and a.video.codec.pt == 96
    assert a.video.codec.mode == 1 and a.video.peer.port == 40002
    assert bench.answer_ports(a.sdp) == {"audio": 50000, "video": 50002}


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.skipif(shutil.which("sipp") is None, reason="needs sipp (Debian sip-tester)")
def test_quick_run_measures_every_row_and_the_calls_carry_media(tmp_path):
    out = tmp_path / "sip.json"
    r = subprocess.run([sys.executable, "benchmarks/sip.py", "--quick", "--seconds", "2", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert not [x for x in rows if x.get("failure")], rows
    kinds = [x["kind"] for x in rows]
    assert kinds[:4] == ["naive", "setup_limit", "setup_box", "first_picture"], kinds
    assert {x["calls"] for x in rows if x["kind"] == "calls"} == {1, 2}        # --quick: N up to 2

    for x in rows:
        if x["kind"] in ("setup_limit", "setup_box"):      # SIPp: every call set up and hung up
            assert x["successful"] == x["answered"] == x["calls"] == res["setup_calls"] == 5, x
            assert x["failed"] == 0 and x["sipp_rc"] == 0, x
            assert 0 < x["first_response_p50_ms"] <= x["p50_ms"] <= x["p99_ms"] <= x["max_ms"], x
    box = next(x for x in rows if x["kind"] == "setup_box")
    assert box["answered_with_video"] == box["calls"], box          # the box answers audio and video

    pic = next(x for x in rows if x["kind"] == "first_picture")
    assert pic["pictures"] == pic["calls"] == res["pictures"] == 3, pic
    for t in pic["trials"]:
        assert t["status"] == 200 and t["bye"] == 200 and t["call"].startswith("sip-"), t
        assert t["first_unit_keyframe"] and t["size"] == [1280, 720], t
        assert 0 < t["invite_200_ms"] < t["bus_ms"] < t["picture_ms"], t
    assert 0 < pic["p50_ms"] <= pic["p99_ms"], pic

    for x in (x for x in rows if x["kind"] == "calls"):
        assert x["window_s"] >= 1.9 and x["cpu_per_call_ms"] > 0 and x["byes_ok"] == x["calls"], x
        assert len(x["per_call"]) == x["calls"], x
        for c in x["per_call"]:
            assert c["state"] == "up" and c["call"].startswith("sip-"), c
            assert c["video"]["codec"] == "h264" and c["audio"]["codec"] == "pcmu", c
            for kind in ("video", "audio"):     # media into the box: what was sent arrived, next to nothing lost
                m = c[kind]
                assert m["sent"] > 0 and m["packets_in"] > 0 and m["packets_out"] > 0, c
                assert m["packets_in"] >= 0.95 * m["sent"] and m["lost"] <= max(2, 0.02 * m["sent"]), c
            got = c["received"]                 # and out of it: the cam and its audio reached the caller
            assert got["video_packets"] > 0 and got["video_units"] > 0 and got["audio_packets"] > 0, c

    naive = next(x for x in rows if x["kind"] == "naive")
    assert naive["cpu_per_call_ms"] > 0 and naive["frames"] >= 50 and naive["out_kbps"] > 0, naive
    assert res["highest_sustained"] in (0, 1, 2)
    assert "| concurrent calls N=1 | 1 |" in r.stdout and "## summary" in r.stdout
    assert not shm_leftovers(res["info"]["prefix"])                # the box's bus objects are gone
