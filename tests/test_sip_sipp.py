"""The SIP service against SIPp 3.6: every scenario of tests/sipp run against the real box (tests/test_sip.py's
sip_box: digest with MD5 only, the one algorithm SIPp answers; the test camera sent to every call), each with what
the box must show for it (call.list while the scenario pauses, its metrics after), the box dialling SIPp UASes,
and an INVITE flood from one address while a baresip call goes on undisturbed.

Where SIPp sends no RTP of its own, `-rtp_echo` sends the box's own RTP back to it: packets that reach the call's
sockets prove the media runs both ways on the ports the SDP answer gave."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.control.client import CommandFailed
from tests.appliance import metric_value, wait_for
from tests.sip_peers import Baresip, SippProcess, SippResult, free_port, requires_baresip, requires_sipp, sipp_uas
from tests.test_sip import calls, sip_box

pytestmark = requires_sipp

USER, PASSWORD = "alice", "secret"      # sip_box's users


# --- helpers ----------------------------------------------------------------------------------------------------
@pytest.fixture
def sipp_box(box):
    """Makes a box whose SIP service answers on a port picked here: (box, "127.0.0.1:PORT"). After the test, no
    process of the box may have hit a defect (a traceback in its log, a message counted `internal`)."""
    made = []

    def make(**keys: object):
        port = free_port(udp=True, tcp=True)
        b = sip_box(box, port, **keys)
        made.append(b)
        return b, f"127.0.0.1:{port}"
    yield make
    for b in made:
        log = b.log()
        assert "Traceback" not in log, log[-8000:]
        assert not rejected(b.scrape(), "internal"), log[-8000:]


def uac(scenario: str, target: str, tmp_path: Path, *, auth: bool = True, pause_ms: int = 300,
        **kwargs: object) -> SippProcess:
    """SIPp running `scenario` (tests/sipp) against the box, in the background; the call is to sip:door@box (the
    room porch), its <pause/> lasts `pause_ms`."""
    opts: dict = {"service": "door", "duration_ms": pause_ms, "timeout": 15, "workdir": tmp_path / scenario}
    if auth:
        opts.update(user=USER, password=PASSWORD)
    return SippProcess(scenario, target, **{**opts, **kwargs})


def passed(proc: SippProcess, b) -> SippResult:
    result = proc.wait()
    assert result.ok, f"{result.dump()}\n--- box log (tail)\n{b.log()[-6000:]}"
    return result


def call_up(b, *, media: set[str] | None = None) -> dict:
    """The one call of the box once it is up (with exactly the media `media`, when given)."""
    def up() -> dict | None:
        rows = calls(b)
        if len(rows) == 1 and rows[0]["state"] == "up" and (media is None or set(rows[0]["media"]) == media):
            return rows[0]
        return None
    return wait_for(up, 10, f"one call up at the box (media {media}); log:\n{b.log()[-3000:]}")


def echoed(b, *kinds: str) -> dict:
    """The call's row once the box has received packets (SIPp's -rtp_echo of its own) on each of `kinds`."""
    def got() -> dict | None:
        row = call_up(b)
        return row if all(row["media"][k].get("packets_in", 0) > 0 for k in kinds) else None
    return wait_for(got, 8, f"RTP back from SIPp on {kinds}; log:\n{b.log()[-3000:]}")


def responses(result: SippResult, cseq: str) -> list[str]:
    """The responses SIPp received to its request `cseq` ("2 INVITE"), in order (its -trace_msg)."""
    out = []
    for chunk in result.messages.split("\n-----"):
        message = chunk.split("\n\n", 1)[-1].lstrip("\n")
        if message.startswith("SIP/2.0 ") and re.search(rf"\nCSeq: *{cseq}\r?\n", message):
            out.append(message)
    return out


def statuses(result: SippResult, cseq: str) -> list[int]:
    return [int(m.split(" ", 2)[1]) for m in responses(result, cseq)]


def rejected(page: str, reason: str) -> float:
    return metric_value(page, "edgeroom_sip_rejected_total", reason=reason) or 0


def no_calls(b) -> None:
    wait_for(lambda: not calls(b), 5, "no call left at the box")


# --- SIPp calls the box -----------------------------------------------------------------------------------------
def test_uac_av_with_digest_gets_h264_mode_1_and_media_flows_both_ways(sipp_box, tmp_path):
    b, target = sipp_box()
    proc = uac("uac_av", target, tmp_path, pause_ms=3000, extra=("-rtp_echo",))
    row = echoed(b, "audio", "video")          # the box's camera sent, echoed, received on the answer's ports
    assert row["direction"] == "in" and row["room"] == "porch" and not row["notes"], row
    assert row["media"]["video"]["codec"] == "h264" and row["media"]["video"]["pt"] == 96 and \
        row["media"]["video"]["mode"] == 1, row
    assert row["media"]["audio"]["codec"] == "pcmu" and row["media"]["audio"]["pt"] == 0, row
    assert row["media"]["video"]["packets_out"] > 0 and row["media"]["audio"]["packets_out"] > 0, row
    result = passed(proc, b)                   # the answer: mode 1 on pt 96, nack pli, no sprop echoed
    assert statuses(result, "1 INVITE")[-1] == 401 and statuses(result, "2 INVITE")[-1] == 200, result.messages
    no_calls(b)
    page = b.settled_scrape("sip")
    assert metric_value(page, "edgeroom_sip_auth_total", result="ok") == 1
    assert metric_value(page, "edgeroom_sip_auth_total", result="no_credentials") == 1
    assert metric_value(page, "edgeroom_sip_calls_ended_total", direction="in", reason="peer_hung_up") == 1


def test_uac_audio_only_gets_an_audio_call_that_says_so(sipp_box, tmp_path):
    b, target = sipp_box()
    proc = uac("uac_audio_only", target, tmp_path, pause_ms=2000)
    row = call_up(b)
    assert set(row["media"]) == {"audio"} and any("audio only" in n for n in row["notes"]), row
    passed(proc, b)                            # m=audio up, no m=video up
    no_calls(b)


def test_uac_h263_only_gets_video_refused_with_port_0_and_an_audio_call_that_says_why(sipp_box, tmp_path):
    b, target = sipp_box()
    proc = uac("uac_h263_only", target, tmp_path, pause_ms=2000)
    row = call_up(b)
    assert set(row["media"]) == {"audio"}, row
    assert any("audio only" in n and "H263" in n for n in row["notes"]), row["notes"]
    session = wait_for(lambda: next((s for s in b.call("sessions") if s["session"] == row["call"]), None), 5,
                       "the call's session at the hub")
    assert "audio only" in session.get("note", "") and "H263" in session["note"], session
    result = passed(proc, b)                   # m=video 0 in the answer
    assert "m=video 0 " in result.messages
    no_calls(b)


def test_uac_mode0_keeps_packetization_mode_0(sipp_box, tmp_path):
    b, target = sipp_box()
    proc = uac("uac_mode0", target, tmp_path, pause_ms=2000)
    row = call_up(b)
    assert row["media"]["video"]["codec"] == "h264" and row["media"]["video"]["mode"] == 0 and \
        row["media"]["video"]["pt"] == 96, row
    passed(proc, b)                            # pt 96 answered, no mode 1, no sprop echoed
    no_calls(b)


def test_uac_mode0_first_gets_mode_1_on_the_second_payload_type(sipp_box, tmp_path):
    b, target = sipp_box()
    proc = uac("uac_mode0_first", target, tmp_path, pause_ms=2000)
    row = call_up(b)
    assert row["media"]["video"]["mode"] == 1 and row["media"]["video"]["pt"] == 97, row
    passed(proc, b)                            # m=video ... 97, a=fmtp:97 ... packetization-mode=1
    no_calls(b)


def test_uac_reinvite_adds_video_to_an_audio_call(sipp_box, tmp_path):
    b, target = sipp_box()
    proc = uac("uac_reinvite_video", target, tmp_path, pause_ms=3000, extra=("-rtp_echo",))
    row = call_up(b, media={"audio", "video"})                  # after the re-INVITE
    assert row["media"]["video"]["mode"] == 1 and row["media"]["video"]["pt"] == 96 and not row["notes"], row
    echoed(b, "video")                                          # the new video ports carry media
    result = passed(proc, b)       # the first 200: audio, no video; the re-INVITE's: video on pt 96, mode 1
    assert "CSeq: 3 INVITE" in result.messages and "CSeq: 4 INVITE" not in result.messages   # no second challenge
    # both answers from the SIPp trace: audio on the same port, video added on the port call.list shows
    first, second = (_answer_ports(result, cseq) for cseq in ("2 INVITE", "3 INVITE"))
    assert first == {"audio": row["media"]["audio"]["port"]}, first
    assert second == {"audio": row["media"]["audio"]["port"], "video": row["media"]["video"]["port"]}, second
    no_calls(b)


def _answer_ports(result: SippResult, cseq: str) -> dict[str, int]:
    """The ports of the m= lines the box's 200 to `cseq` did not refuse (port 0), by kind (SIPp's trace)."""
    answer = next(m for m in responses(result, cseq) if m.startswith("SIP/2.0 200 "))
    return {k: int(p) for k, p in re.findall(r"\nm=(audio|video) (\d+) ", answer) if int(p)}


def test_uac_cancel_of_a_ringing_call_gets_487_and_is_counted_cancelled(sipp_box, tmp_path):
    b, target = sipp_box(answer_after_ms=3000)
    result = passed(uac("uac_cancel", target, tmp_path), b)
    assert "SIP/2.0 180 Ringing" in result.messages and "SIP/2.0 487" in result.messages, result.messages
    assert "SIP/2.0 200 OK" in result.messages.split("CANCEL sip:", 1)[1]          # the CANCEL's 200
    no_calls(b)
    page = b.settled_scrape("sip")
    assert metric_value(page, "edgeroom_sip_calls_ended_total", direction="in", reason="cancelled") == 1
    assert not metric_value(page, "edgeroom_sip_messages_sent_total", kind="BYE")


def test_uac_wrong_password_is_challenged_again_and_counted(sipp_box, tmp_path):
    b, target = sipp_box()
    result = passed(uac("uac_wrong_password", target, tmp_path), b)
    assert statuses(result, "2 INVITE")[-1] == 401, result.messages     # a fresh challenge, not 403
    assert not calls(b)
    page = b.settled_scrape("sip")
    assert metric_value(page, "edgeroom_sip_auth_total", result="wrong_digest") == 1
    assert rejected(page, "wrong_digest") == 1
    assert not metric_value(page, "edgeroom_sip_auth_total", result="ok")


def test_uac_bye_of_an_unknown_dialog_gets_481(sipp_box, tmp_path):
    b, target = sipp_box()
    passed(uac("uac_bye_unknown", target, tmp_path, auth=False), b)
    assert rejected(b.settled_scrape("sip"), "unknown_dialog") == 1


def test_uac_options_gets_200_with_allow(sipp_box, tmp_path):
    b, target = sipp_box()
    result = passed(uac("uac_options", target, tmp_path, auth=False), b)
    answer = result.messages.split("SIP/2.0 200 OK", 1)[1]
    assert "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO" in answer, answer


def test_uac_unknown_method_gets_501_with_allow_and_is_counted(sipp_box, tmp_path):
    b, target = sipp_box()
    result = passed(uac("uac_unknown_method", target, tmp_path, auth=False), b)
    answer = result.messages.split("SIP/2.0 501", 1)[1]
    assert "Allow: INVITE" in answer, result.messages
    assert rejected(b.settled_scrape("sip"), "method") == 1


def test_uac_malformed_messages_are_refused_by_reason_and_the_box_answers_after_each(sipp_box, tmp_path):
    b, target = sipp_box()
    result = passed(uac("uac_malformed", target, tmp_path, auth=False), b)
    assert result.messages.count("SIP/2.0 200 OK") == 4, result.messages          # the OPTIONS after each
    # the INVITE's Content-Length and the line without a colon get 400 naming the cause; a request without
    # Call-ID and a start line that is not SIP cannot be answered: dropped
    refusals = re.findall(r"\nSIP/2.0 400 Bad Request\n(?:[^\n]+\n)*?Warning: 399 \S+ \"([^\"]+)\"", result.messages)
    assert len(refusals) == result.messages.count("SIP/2.0 400") == 2, result.messages
    assert "Content-Length" in refusals[0] and "colon" in refusals[1], refusals
    page = b.settled_scrape("sip")
    assert {r: rejected(page, r) for r in ("bad_content_length", "missing_header", "bad_header",
                                           "bad_start_line")} == dict.fromkeys(
        ("bad_content_length", "missing_header", "bad_header", "bad_start_line"), 1), page
    assert metric_value(page, "edgeroom_sip_messages_received_total", kind="OPTIONS") == 4
    assert not metric_value(page, "edgeroom_sip_messages_received_total", kind="INVITE")
    assert not rejected(page, "stray_ack"), page         # the ACK of the INVITE's 400 matched its transaction
    assert not calls(b)


# --- the box dials SIPp -----------------------------------------------------------------------------------------
def dial(b, port: int) -> dict:
    return b.client().call("call.dial", {"uri": f"sip:peer@127.0.0.1:{port}", "room": "lobby"}, timeout=45)


def test_the_box_dials_sipp_uas_answer_with_h264_mode_1_and_hangs_up(sipp_box, tmp_path):
    b, _ = sipp_box()
    with sipp_uas("uas_answer", service="peer", extra=("-rtp_echo",), workdir=tmp_path / "uas",
                  timeout=20) as uas:
        row = dial(b, uas.port)
        assert row["direction"] == "out" and row["state"] == "up" and row["room"] == "lobby", row
        assert row["media"]["video"]["codec"] == "h264" and row["media"]["video"]["mode"] == 1, row
        echoed(b, "audio", "video")
        b.call("call.hangup", {"call": row["call"]})
        result = uas.wait(10)                  # it saw the ACK, then the box's BYE, and answered it
    assert result.ok, result.dump()
    assert "\nBYE sip:" in result.messages
    no_calls(b)
    page = b.settled_scrape("sip")
    assert metric_value(page, "edgeroom_sip_calls_ended_total", direction="out", reason="hung_up") == 1


def test_the_box_answers_the_digest_challenge_of_sipp_uas_auth(sipp_box, tmp_path):
    b, _ = sipp_box(dial_user=USER, dial_password=PASSWORD)
    with sipp_uas("uas_auth", service="peer", keys={"auth_user": USER, "auth_pass": PASSWORD},
                  workdir=tmp_path / "uas", timeout=20) as uas:
        row = dial(b, uas.port)
        assert row["state"] == "up" and row["media"]["video"]["mode"] == 1, row
        b.call("call.hangup", {"call": row["call"]})
        result = uas.wait(10)
    assert result.ok, result.dump()
    assert "Authorization: Digest" in result.messages and 'username="alice"' in result.messages
    no_calls(b)


def test_a_dial_the_peer_refuses_with_403_fails_naming_403(sipp_box, tmp_path):
    b, _ = sipp_box(dial_user=USER, dial_password=PASSWORD)
    with sipp_uas("uas_auth", service="peer", keys={"auth_user": USER, "auth_pass": "not-" + PASSWORD},
                  workdir=tmp_path / "uas", timeout=20) as uas:
        with pytest.raises(CommandFailed) as failed:
            dial(b, uas.port)
        result = uas.wait(10)
    assert failed.value.code == "unavailable" and "403" in str(failed.value), failed.value
    assert "SIP/2.0 403 Forbidden" in result.messages and "\nACK sip:" in result.messages.split("403 Forbidden")[1]
    no_calls(b)
    page = b.settled_scrape("sip")
    assert metric_value(page, "edgeroom_sip_calls_ended_total", direction="out", reason="rejected_403") == 1


# --- a flood ----------------------------------------------------------------------------------------------------
@requires_baresip
def test_an_invite_flood_from_one_address_is_limited_and_a_live_call_goes_on(sipp_box, tmp_path):
    b, target = sipp_box()
    port = int(target.rsplit(":", 1)[1])
    with Baresip(tmp_path, "alice", user=USER, password=PASSWORD, video_codecs=None) as ua:
        ua.dial(f"sip:lobby@127.0.0.1:{port}")
        ua.wait_event("CALL_ESTABLISHED", timeout=10)
        call = call_up(b)["call"]
        ua.wait_video_frames(10)
        pid = b.services()["sip"]["pid"]
        page = b.scrape()
        floods, limited = rejected(page, "invite_flood"), rejected(page, "rate_limited")
        # INVITEs at 500/s from 127.0.0.1 without credentials, for 6 s at most (killed once the checks are done)
        flood = SippProcess("uac_av", target, service="door", calls=3000, rate=500, timeout=10,
                            workdir=tmp_path / "flood")
        try:
            wait_for(lambda: rejected(b.scrape(), "invite_flood") > floods + 5 and
                     rejected(b.scrape(), "rate_limited") > limited + 100, 5, "the flood refused and counted")
            frames = ua.video_stats().rx_frames
            media = calls(b)[0]["media"]
            ua.wait_video_frames(frames + 30, timeout=5)      # baresip decodes the box's camera all along

            def grew() -> bool:
                now = calls(b)[0]["media"]
                return all(now[k]["packets_in"] > media[k]["packets_in"] + 20 for k in ("audio", "video"))
            wait_for(grew, 5, "the call's audio and video received at the box")
            assert flood.proc.poll() is None, "the flood ended before the checks did"
        finally:
            flood.proc.kill()
            flood.wait(5)
        assert b.services()["sip"]["pid"] == pid, "the SIP service restarted"
        assert ua.call_established() and [c["call"] for c in calls(b)] == [call]
        ua.hangup()
        no_calls(b)
    page = b.settled_scrape("sip")
    assert rejected(page, "rate_limited") - limited > 300, "hardly a flood"
    print(f"flood: invite_flood {rejected(page, 'invite_flood') - floods:.0f}, "
          f"rate_limited {rejected(page, 'rate_limited') - limited:.0f}")


# --- registration ------------------------------------------------------------------------------------------------
def test_the_box_registers_with_digest_and_refreshes_before_the_expiry_granted(sipp_box, tmp_path):
    """SIPp as a registrar: 401, the authenticated REGISTER gets 6 s; the box refreshes within them, in the same
    Call-ID, answering the new challenge; edgeroom_sip_registered is 1."""
    with sipp_uas("uas_register", keys={"auth_user": USER, "auth_pass": PASSWORD}, workdir=tmp_path / "reg",
                  timeout=20) as registrar:
        b, _ = sipp_box(registrar=f"127.0.0.1:{registrar.port}", dial_user=USER, dial_password=PASSWORD)
        result = registrar.wait(15)
    assert result.ok, result.dump()
    registers = re.findall(r"\nREGISTER sip:[^\n]*\n(?:[^\n]+\n)*?Call-ID: ([^\n]+)", result.messages)
    assert len(registers) == 4 and len(set(registers)) == 1, registers
    assert result.messages.count("Authorization: Digest") == 2 and 'username="alice"' in result.messages
    assert metric_value(b.settled_scrape("sip"), "edgeroom_sip_registered") == 1
