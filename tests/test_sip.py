"""The SIP service against a real SIP phone: baresip 1.0 (H.264 from its fakevideo source, the ausine tone),
on loopback. It calls the box and the box calls it; both ends decode pictures whose content is checked, both
hear the other's tone; hang-up from either side; a SIGKILLed SIP service takes its call back."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import framebus
from services.capture.sources.synthetic import frame_number
from services.control.client import CommandFailed
from tests.appliance import metric_value, wait_for
from tests.media_files import luma
from tests.sip_peers import Baresip, free_port, free_sip_port

pytestmark = pytest.mark.skipif(not Path("/usr/bin/baresip").exists(), reason="baresip is not installed "
                                "(Debian baresip-core, baresip-ffmpeg: scripts/test installs them)")

CAM = 'kind = "synthetic"\nwidth = 320\nheight = 240\nfps = 30.0\nencode = "h264"\ngop = 1.0\naudio = true\n' \
      'room = "lobby"'


def sip_box(box, port: int, restart_sec: float = 0.2, more: str = "", stale_after: float | None = None,
            **keys: object):
    """A box whose SIP service answers at `port`; its calls are sent the test camera (cam, cam-audio); `more`:
    config tables of its own; `stale_after`: the hub's, instead of the test box's 1.5 s."""
    extra = {"enabled": True, "port": port, "users": "alice:secret", "digest_algorithms": "MD5",
             "send_video": "cam", "send_audio": "cam-audio", "rooms": "door=porch", **keys}
    table = "\n".join(f"{k} = {_toml(v)}" for k, v in extra.items())
    b = box(f"[services.sip]\nrestart_sec = {restart_sec}\nwatchdog_sec = 3.0\nstop_timeout = 2.0\n"
            f"[sip]\n{table}\n{more}")
    if stale_after is not None:
        text = b.config.read_text()
        assert text.count("\nstale_after = 1.5\n") == 1
        b.config.write_text(text.replace("\nstale_after = 1.5\n", f"\nstale_after = {stale_after}\n"))
    b.set_source("cam", CAM)
    b.run()
    b.wait_ready("sip", "capture@cam", timeout=30)
    return b


def _toml(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else (str(v) if isinstance(v, int) else f'"{v}"')


def calls(b) -> list[dict]:
    return b.call("call.list")["calls"]


def one_call(b) -> dict:
    wait_for(lambda: len(calls(b)) == 1 and calls(b)[0]["state"] == "up", 10, "one call up at the box")
    return calls(b)[0]


def session_of(b, session: str) -> dict:
    """The hub's view of `session` (it comes with the SIP service's next heartbeat)."""
    def found() -> dict | None:
        return next((s for s in b.call("sessions") if s["session"] == session), None)
    return wait_for(found, 5, f"session {session} at the hub")


def call_in(b, ua: Baresip, port: int, user: str = "lobby") -> dict:
    """`ua` calls `user` at the box; the call once it is up at both ends."""
    ua.dial(f"sip:{user}@127.0.0.1:{port}")
    ua.wait_event("CALL_ESTABLISHED", timeout=10)
    return one_call(b)


def decoded_pictures(b, stream: str, count: int, timeout: float = 10.0) -> list[np.ndarray]:
    """`count` pictures of the H.264 access units on `stream`, decoded here (RGB)."""
    import av

    codec = av.CodecContext.create("h264", "r")
    out: list[np.ndarray] = []
    deadline = time.monotonic() + timeout
    keyed = False                      # from the first keyframe on (a restarted call's ring starts anywhere)
    with framebus.Consumer.attach(stream, prefix=b.prefix, missing_ok=True, start="oldest") as c:
        while time.monotonic() < deadline and len(out) < count:
            item = c.receive(timeout=0.2)
            if item is None or item.kind != "encoded" or not (keyed or item.keyframe):
                continue
            keyed = True
            data = bytes(item.copy())
            if not item.valid():
                continue
            for frame in codec.decode(av.Packet(data)):
                out.append(frame.to_ndarray(format="rgb24"))
    assert len(out) >= count, f"{len(out)} pictures decoded from {stream} in {timeout} s"
    return out


def fakevideo_bars(rgb: np.ndarray) -> bool:
    """baresip's fakevideo picture: three vertical bars, red | green | blue."""
    w = rgb.shape[1]
    thirds = [rgb[:, i * w // 3 + 4:(i + 1) * w // 3 - 4].reshape(-1, 3).mean(axis=0) for i in range(3)]
    return all(int(np.argmax(t)) == i and t[i] > 150 and sorted(t)[1] < 80 for i, t in enumerate(thirds))


def the_cameras(b, picture: np.ndarray) -> bool:
    """Is `picture` one the test camera drew lately? Its frame number (the synthetic source draws it as 32
    black/white blocks) is among the camera's last 3 s of frames (the camera's own newest is read off cam-raw,
    which decode@cam makes a frame or two after the encoded one the call sent)."""
    drawn = frame_number(picture)
    now = frame_number(cam_picture(b))
    return now - 90 <= drawn <= now + 5


def cam_picture(b) -> np.ndarray:
    with framebus.Consumer.attach("cam-raw", prefix=b.prefix, missing_ok=True, start="oldest") as c:
        item = c.receive(timeout=5, newest=True)
        assert item is not None
        return np.array(luma(item), copy=True)


def tone_hz(pcm: np.ndarray, rate: int) -> float:
    """The strongest frequency of a mono signal."""
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.argmax(spectrum[1:]) + 1) * rate / len(pcm)


def heard_at_box(b, stream: str, seconds: float = 1.0) -> tuple[np.ndarray, int]:
    chunks, rate = [], 0
    deadline = time.monotonic() + 5
    with framebus.Consumer.attach(stream, prefix=b.prefix, missing_ok=True, start="oldest") as c:
        while time.monotonic() < deadline and sum(len(x) for x in chunks) < seconds * max(rate, 1):
            item = c.receive(timeout=0.2)
            if item is None or item.kind != "audio":
                continue
            rate = item.rate
            pcm = np.frombuffer(bytes(item.copy()), np.int16).reshape(-1, item.channels)[:, 0]
            chunks.append(pcm.astype(np.float64))
    assert chunks, f"no audio on {stream}"
    return np.concatenate(chunks), rate


def edgeroom(b, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
    env["EDGEROOM_CONFIG"] = str(b.config)
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# --- baresip calls the box -------------------------------------------------------------------------------------
def test_baresip_calls_the_box_with_digest_both_see_and_hear_the_other_and_its_hang_up_ends_the_session(
        box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with b.subscriber("hook.ON_VIDEO_SESSION_STARTED", "hook.ON_VIDEO_SESSION_ENDED") as sub, \
            Baresip(tmp_path, "alice", user="alice", password="secret", video_codecs=None, tone_hz=440) as ua:
        call = call_in(b, ua, port, "door")
        assert call["direction"] == "in" and call["room"] == "porch", call     # rooms: door=porch
        assert call["media"]["video"]["codec"] == "h264" and call["media"]["video"]["mode"] == 1, call
        started = sub.recv(timeout=5)
        assert started is not None and started.data["session"] == call["call"] and started.data["room"] == "porch"
        # what baresip sends, decoded at the box: its fakevideo bars; what it hears: its 440 Hz tone
        pictures = decoded_pictures(b, call["call"], 5)
        assert fakevideo_bars(pictures[-1]), pictures[-1][::60, ::60]
        pcm, rate = heard_at_box(b, call["call"] + "-audio")
        assert rate == 8000 and abs(tone_hz(pcm, rate) - 440) < 10
        # what the box sends, decoded by baresip: the camera's picture (its size, its scene)
        stats = ua.wait_video_frames(20)
        assert stats.rx_size == (320, 240), stats.raw
        seen = ua.remote_picture()
        assert the_cameras(b, seen) and not fakevideo_bars(seen), frame_number(seen)
        session = session_of(b, call["call"])
        assert {(t["id"], t["direction"]) for t in session["tracks"]} >= {("video", "recv"), ("audio", "recv"),
                                                                         ("send-video", "send"), ("send-audio", "send")}
        ua.hangup()
        ua.wait_event("CALL_CLOSED", timeout=5)
        wait_for(lambda: not calls(b), 5, "the call gone at the box")
        ended = sub.recv(timeout=5)
        assert ended is not None and ended.topic == "hook.ON_VIDEO_SESSION_ENDED" and \
            ended.data["session"] == call["call"]
    # baresip heard the camera's beep: 1 kHz bursts
    rate, heard = ua.received_audio()
    loud = heard[np.abs(heard) > 0.05]
    assert len(loud) > rate * 0.05, "baresip heard silence"
    assert abs(tone_hz(heard, rate) - 1000) < 30
    page = b.settled_scrape("sip")
    assert metric_value(page, "edgeroom_sip_auth_total", result="ok") == 1
    assert metric_value(page, "edgeroom_sip_calls_ended_total", direction="in", reason="peer_hung_up") == 1


def test_a_wrong_password_is_refused_and_counted(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with Baresip(tmp_path, "mallory", user="alice", password="guess", video=False) as ua:
        ua.dial(f"sip:lobby@127.0.0.1:{port}")
        closed = ua.wait_event("CALL_CLOSED", timeout=10)
        assert "401" in closed.get("param", "") or "Unauthorized" in closed.get("param", ""), closed
    assert not calls(b)
    page = b.settled_scrape("sip")
    assert metric_value(page, "edgeroom_sip_auth_total", result="wrong_digest") >= 1


def test_an_audio_only_phone_gets_an_audio_call_that_says_so_and_max_calls_holds_both_ways(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port, max_calls=1)
    with Baresip(tmp_path, "alice", user="alice", password="secret", video=False) as ua:
        call = call_in(b, ua, port, "lobby")
        assert set(call["media"]) == {"audio"} and any("audio only" in n for n in call["notes"]), call
        session = session_of(b, call["call"])
        assert "audio only" in session.get("note", ""), session
        # max_calls = 1: a second caller gets 486, and the box dials nobody
        with Baresip(tmp_path, "bob", user="alice", password="secret", video=False) as second:
            second.dial(f"sip:lobby@127.0.0.1:{port}")
            closed = second.wait_event("CALL_CLOSED", timeout=10)
            assert "486" in closed.get("param", "") or "Busy" in closed.get("param", ""), closed
            with pytest.raises(CommandFailed) as refused:
                b.client().call("call.dial", {"uri": second.uri}, timeout=5)
            assert refused.value.code == "unavailable" and "max_calls is 1" in str(refused.value)
        assert [c["call"] for c in calls(b)] == [call["call"]]
        ua.hangup()


def test_a_phone_that_takes_packetization_mode_0_only_gets_slices_that_fit_a_packet(box, tmp_path):
    """baresip restricted to H.264 offers mode 0 only: the box answers mode 0 (never mode 1), and the call's
    route is an encoder cutting slices to the packet size (slice_bytes): baresip decodes the camera's pictures
    and nothing was refused as too large."""
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port, send_video="enc",
                more='[encoders.enc]\ninput = "cam-raw"\nbitrate = 1500\ngop = 1.0\nslice_bytes = 1188\n')
    with Baresip(tmp_path, "alice", user="alice", password="secret", video_codecs=("H264",)) as ua:
        call = call_in(b, ua, port)
        assert call["media"]["video"]["mode"] == 0 and call["media"]["video"]["pt"] == 96, call
        ua.wait_video_frames(20)
        # a snapshot is one picture baresip decoded; one whose top slice was concealed reads a wrong frame number
        # (seen in 2 of 3 runs on the build machine, at the last landed commit too): the promise is that the
        # phone shows the camera's pictures, so a snapshot that does is waited for, at most 5 s
        wait_for(lambda: the_cameras(b, ua.remote_picture()), 5, "baresip showing the camera's picture")
        # while the call is up (its series leave the scrape with it); more than 100 packets sent, however slowly a
        # loaded machine encodes: a count read once, right after the 20 pictures, can fall short of it
        def sent() -> str | None:
            page = b.settled_scrape("sip")
            out = metric_value(page, "edgeroom_rtp_packets_out_total", call=call["call"], media="video") or 0
            return page if out > 100 else None
        page = wait_for(sent, 10, "more than 100 video packets sent")
        assert not metric_value(page, "edgeroom_rtp_unsent_units_total", call=call["call"], media="video",
                                reason="nal_too_large")
        ua.hangup()


# --- the box calls baresip -------------------------------------------------------------------------------------
def test_the_box_dials_baresip_with_ctl_both_see_each_other_and_ctl_hangup_ends_it(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with Baresip(tmp_path, "bob", auto_answer=True, video_codecs=None, tone_hz=660) as ua:
        done = edgeroom(b, "ctl", "call", "dial", ua.uri, "--room", "lobby")
        assert done.returncode == 0, done.stderr
        assert "is up in room lobby" in done.stdout and "video h264/96 mode 1" in done.stdout, done.stdout
        ua.wait_event("CALL_ESTABLISHED", timeout=5)
        call = one_call(b)
        assert call["direction"] == "out" and call["peer"] == ua.uri
        assert fakevideo_bars(decoded_pictures(b, call["call"], 3)[-1])
        pcm, rate = heard_at_box(b, call["call"] + "-audio")
        assert abs(tone_hz(pcm, rate) - 660) < 10
        ua.wait_video_frames(10)
        assert the_cameras(b, ua.remote_picture())
        listed = edgeroom(b, "ctl", "call", "list")
        assert call["call"] in listed.stdout and "h264/96 mode 1" in listed.stdout, listed.stdout
        hung = edgeroom(b, "ctl", "call", "hangup", call["call"])
        assert hung.returncode == 0, hung.stderr
        ua.wait_event("CALL_CLOSED", timeout=5)
        assert not calls(b)


def test_dialling_nobody_fails_with_the_reason(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with Baresip(tmp_path, "carol", auto_answer=False, video=False) as ua:
        # baresip rings and the box gives up (CANCEL) when ctl hangs the ringing call up
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "ctl", "call", "dial", ua.uri],
                                env={**{k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")},
                                     "EDGEROOM_CONFIG": str(b.config)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        ua.wait_event("CALL_INCOMING", timeout=10)
        ringing = calls(b)
        assert len(ringing) == 1 and ringing[0]["state"] in ("dialing", "ringing")
        assert edgeroom(b, "ctl", "call", "hangup", ringing[0]["call"]).returncode == 0
        ua.wait_event("CALL_CLOSED", timeout=5)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode != 0 and "ended before it was up: cancelled" in err, (out, err)


# --- restart ---------------------------------------------------------------------------------------------------
STALE = 3.0   # the hub's stale_after for the restart test below: more than the restart's 2 s


def test_a_sigkilled_sip_service_takes_its_call_back_without_bye_and_media_flows_again_within_2_s(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    # the hub counts the service stale (and ends its sessions) after stale_after s without a heartbeat: the test
    # box's 1.5 s is less than the 2 s the restart is given, and a restart that keeps that promise on a loaded
    # machine was ended
    b = sip_box(box, port, stale_after=STALE)
    with Baresip(tmp_path, "alice", user="alice", password="secret", video_codecs=None) as ua:
        before = call_in(b, ua, port, "lobby")
        ua.wait_video_frames(20)
        pid = b.services()["sip"]["pid"]
        ended = b.subscriber("hook.ON_VIDEO_SESSION_ENDED")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        rx_then = ua.video_stats().rx_frames
        # media flows again: baresip decodes new pictures, the box's stream gets new access units
        wait_for(lambda: ua.video_stats().rx_frames >= rx_then + 5, 10, "baresip decoding pictures again")
        back = time.monotonic() - killed
        after = one_call(b)
        assert after["call"] == before["call"] and after["restored"], after
        assert {k: m["port"] for k, m in after["media"].items()} == {k: m["port"] for k, m in before["media"].items()}
        assert b.services()["sip"]["pid"] != pid
        # the box's stream restarted mid-picture-group: the box asked baresip for a keyframe (a PLI) at once
        decoded_pictures(b, before["call"], 3, timeout=2.0)
        print(f"SIP restart: media at baresip again {back:.2f} s after SIGKILL")
        assert back < 2.0, f"{back:.2f} s"
        assert ua.call_established(), "baresip's call dropped"
        assert not [e for e in ua.events if e.get("type") == "CALL_CLOSED"]
        time.sleep(max(0.0, killed + STALE + 0.5 - time.monotonic()))  # heartbeats of the new one: it goes on
        with ended:
            assert ended.recv(timeout=0.5) is None, "the hub ended the call's session over the restart"
        assert session_of(b, before["call"])["room"] == "default"
        ua.hangup()
        wait_for(lambda: not calls(b), 5, "the call gone at the box after baresip hung up")


def test_a_call_whose_peer_forgot_it_during_the_restart_is_ended_quietly(box, tmp_path):
    """The SIP service is down for 2.5 s; meanwhile the phone restarts (a new baresip on the same address knows no
    call): the restarted service asks (in-dialog OPTIONS), gets 481 and ends the call without a BYE."""
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port, restart_sec=2.5)
    phone = free_sip_port()                               # the same address for both phones
    with Baresip(tmp_path, "alice", sip_port=phone, user="alice", password="secret", video=False) as ua:
        call = call_in(b, ua, port, "lobby")
        os.kill(b.services()["sip"]["pid"], signal.SIGKILL)
    with Baresip(tmp_path, "alice2", sip_port=phone, user="alice", password="secret", video=False):
        wait_for(lambda: metric_value(b.scrape(), "edgeroom_sip_calls_ended_total", direction="in",
                                      reason="gone_while_restarting") == 1, 15, "the kept call ended")
        assert not calls(b)
        page = b.settled_scrape("sip")
        # the OPTIONS goes at the restart; it is sent again (T1) while the new phone is still starting: >= 1
        assert metric_value(page, "edgeroom_sip_messages_sent_total", kind="OPTIONS") >= 1
        assert metric_value(page, "edgeroom_sip_messages_received_total", kind="4xx") >= 1    # its 481
        assert not metric_value(page, "edgeroom_sip_messages_sent_total", kind="BYE")
        assert call["call"] not in {s["session"] for s in b.call("sessions")}


def test_keys_pressed_on_the_phone_are_dtmf_hook_events(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with b.subscriber("hook.ON_DTMF") as sub, \
            Baresip(tmp_path, "alice", user="alice", password="secret", video=False) as ua:
        call = call_in(b, ua, port, "lobby")
        digits = []
        for key in "5#":
            ua.command("sndcode", key)
            event = sub.recv(timeout=5)
            assert event is not None, f"no ON_DTMF for {key}"
            digits.append(event.data["digit"])
            assert event.data["session"] == call["call"] and event.data["how"] == "rfc4733"
        assert digits == ["5", "#"]
        ua.hangup()
    assert metric_value(b.settled_scrape("sip"), "edgeroom_sip_dtmf_total", how="rfc4733") == 2


def test_re_invites_drop_the_video_and_add_it_again_mid_call_and_the_audio_goes_on(box, tmp_path):
    """baresip's `video_dir inactive` re-INVITEs with the video line at port 0: the box drops the video (its
    track leaves the session, audio goes on, the call says audio only); `video_dir sendrecv` re-INVITEs with
    video again: the box adds it (a new port pair, a keyframe asked for) and baresip decodes pictures again."""
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with Baresip(tmp_path, "alice", user="alice", password="secret", video_codecs=None) as ua:
        call = call_in(b, ua, port)["call"]
        ua.wait_video_frames(10)
        with b.subscriber("hook.ON_VIDEO_TRACK_REMOVED", "hook.ON_VIDEO_TRACK_ADDED") as sub:
            ua.command("video_dir", "inactive")
            wait_for(lambda: set(calls(b)[0]["media"]) == {"audio"}, 5, "the video dropped at the box")
            assert any("audio only" in n for n in calls(b)[0]["notes"])
            removed = sub.recv(timeout=5)
            assert removed is not None and removed.topic == "hook.ON_VIDEO_TRACK_REMOVED" and \
                removed.data["session"] == call and removed.data["track"]["kind"] == "video"
            audio = calls(b)[0]["media"]["audio"]["packets_out"]
            wait_for(lambda: calls(b)[0]["media"]["audio"]["packets_out"] > audio + 25, 3, "audio going on")
            frames = ua.video_stats().rx_frames
            ua.command("video_dir", "sendrecv")
            wait_for(lambda: "video" in calls(b)[0]["media"], 5, "the video added back at the box")
            wait_for(lambda: ua.video_stats().rx_frames > frames + 10, 5, "baresip decoding pictures again")
            added = sub.recv(timeout=5)
            assert added is not None and added.topic == "hook.ON_VIDEO_TRACK_ADDED"
        assert calls(b)[0]["call"] == call and not calls(b)[0]["notes"]
        ua.hangup()


def test_a_call_over_tcp_and_the_box_dialling_back_over_tcp(box, tmp_path):
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with Baresip(tmp_path, "alice", user="alice", password="secret", video=False) as ua:
        ua.dial(f"sip:lobby@127.0.0.1:{port};transport=tcp")
        ua.wait_event("CALL_ESTABLISHED", timeout=10)
        call = one_call(b)
        assert call["address"].endswith("/tcp"), call
        heard_at_box(b, call["call"] + "-audio")
        ua.hangup()
        wait_for(lambda: not calls(b), 5, "the call over TCP ended by its BYE")
        row = b.client().call("call.dial", {"uri": ua.uri + ";transport=tcp", "video": False}, timeout=20)
        assert row["address"].endswith("/tcp") and row["state"] == "up", row
        ua.wait_event("CALL_ESTABLISHED", timeout=5)
        b.call("call.hangup", {"call": row["call"]})
        ua.wait_event("CALL_CLOSED", timeout=5)


def test_a_reload_applies_the_live_keys_to_the_next_call(box, tmp_path):
    """rooms is live: after a reload (SIGHUP to `edgeroom run`), a call to lobby joins the room the new config
    gives it; the call up before keeps its room."""
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with Baresip(tmp_path, "alice", user="alice", password="secret", video=False) as ua:
        first = call_in(b, ua, port)
        assert first["room"] == "default"
        b.config.write_text(b.config.read_text().replace('rooms = "door=porch"', 'rooms = "lobby=hall"'))
        b.runner.send_signal(signal.SIGHUP)
        wait_for(lambda: "sip: reloaded: 1 change(s) applied (sip.rooms)" in b.log(), 10, "the SIP service reloaded")
        ua.dial(f"sip:lobby@127.0.0.1:{port}")
        wait_for(lambda: len(calls(b)) == 2, 10, "the second call up")
        rooms = {c["call"]: c["room"] for c in calls(b)}
        assert rooms.pop(first["call"]) == "default" and list(rooms.values()) == ["hall"], rooms


def test_an_invite_whose_media_cannot_open_gets_503_with_the_reason_and_the_service_goes_on(box, tmp_path):
    """The calls' RTP sockets bind to an address this box does not have: the INVITE is answered 503 naming
    the cause (not left without a final answer), counted, and OPTIONS is still answered."""
    from services.sip.message import parse, request

    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port, auth="allow", allow="127.0.0.1", local_address="192.0.2.1")
    offer = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
             b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        me = s.getsockname()[1]
        for method, body in (("INVITE", offer), ("OPTIONS", b"")):
            req = request(method, f"sip:lobby@127.0.0.1:{port}", call_id=f"{method}@t", from_="<sip:t@h>;tag=a",
                          to="<sip:lobby@h>", cseq=1, via=f"SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{method}",
                          contact=f"<sip:t@127.0.0.1:{me}>", body=body,
                          content_type="application/sdp" if body else None)
            s.sendto(req.encode(), ("127.0.0.1", port))
            while (resp := parse(s.recv(65536))).status < 200:
                continue
            if method == "INVITE":
                assert resp.status == 503 and "cannot bind 192.0.2.1" in (resp.get("Warning") or ""), resp.encode()
            else:
                assert resp.status == 200
    assert metric_value(b.settled_scrape("sip"), "edgeroom_sip_rejected_total", reason="no_media") == 1
    assert not calls(b)


def test_a_keyframe_wanted_of_a_callers_stream_is_a_pli_to_the_phone_answered_within_a_second(box, tmp_path):
    """`ctl keyframe sip-XXXXXX` (what decode or the bridge ask after a loss) sends the phone a PLI, and its
    keyframe lands on the bus within a second, each time (baresip made none of its own in 8 s, measured). The other
    way, a phone's PLI to the camera it is sent, is RtpCall's, tested against GStreamer in tests/test_rtp.py."""
    port = free_port(udp=True, tcp=True)
    b = sip_box(box, port)
    with Baresip(tmp_path, "alice", user="alice", password="secret", video_codecs=None) as ua:
        call = call_in(b, ua, port)["call"]
        ua.wait_video_frames(10)

        def keyframes() -> float:
            return metric_value(b.scrape(), "edgeroom_rtp_keyframes_total", call=call) or 0
        wait_for(lambda: keyframes() >= 1, 5, "the phone's first keyframe on the bus")
        for _ in range(3):
            before, asked = keyframes(), time.monotonic()
            answer = b.call("keyframe", {"stream": call, "reason": "test"})
            assert answer["made"] and answer["how"].startswith("pli"), answer
            wait_for(lambda n=before: keyframes() > n, 2, "the phone's keyframe after a PLI")
            assert time.monotonic() - asked < 1.5
            time.sleep(0.6)                           # past the producer's 0.5 s throttle
        page = b.settled_scrape("sip")
        assert metric_value(page, "edgeroom_rtp_feedback_sent_total", call=call, media="video", type="pli") >= 3
        ua.hangup()
