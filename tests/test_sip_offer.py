"""SDP offer/answer of SIP calls (services/sip/offer.py) on offers and answers captured from baresip 1.0 and SIPp
(tests/golden/sip/), and on hand-made ones for what they do not send: the exact answer lines, the codec and mode
chosen, audio-only fallback, hold, refused m= lines, and the box's own offer."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.rtp import sdp
from services.sip.offer import Answer, accept, answer, changes, offer

GOLDEN = Path(__file__).parent / "golden" / "sip"
PORTS = {"audio": 40000, "video": 40002}
HEAD = ["v=0", "o=edgeroom 7 1 IN IP4 10.0.0.5", "s=edgeroom", "c=IN IP4 10.0.0.5", "t=0 0"]


def golden(name: str) -> str:
    return (GOLDEN / name).read_text()


def ans(text: str, **kw) -> Answer:
    kw = {"host": "10.0.0.5", "ports": PORTS, "session_id": 7, **kw}
    return answer(text, **kw)


def lines(a: Answer) -> list[str]:
    assert a.sdp.endswith("\r\n") and "\n" not in a.sdp.replace("\r\n", "")
    return a.sdp.split("\r\n")[:-1]


def offer_of(audio: str = "", video: str = "", host: str = "10.0.0.2", extra: str = "") -> str:
    text = f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n{extra}"
    return text + audio + video


AUDIO_PCMU_TE = ["m=audio 40000 RTP/AVP 0 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:101 telephone-event/8000",
                 "a=fmtp:101 0-15", "a=sendrecv"]


# --- baresip's offers -----------------------------------------------------------------------------------------
def test_baresip_offer_gets_h264_mode_1_pt_97_and_its_own_fmtp():
    a = ans(golden("baresip-offer.sdp"))
    assert lines(a) == HEAD + AUDIO_PCMU_TE + [
        "m=video 40002 RTP/AVP 97",
        "a=rtpmap:97 H264/90000",
        "a=fmtp:97 profile-level-id=42e01f;level-asymmetry-allowed=1;packetization-mode=1",
        "a=rtcp-fb:97 nack pli",                   # baresip offers "a=rtcp-fb:* nack pli" only: no nack, no fir
        "a=sendrecv"]
    assert a.notes == () and not a.audio_only
    v = a.video
    assert (v.codec.pt, v.codec.name, v.codec.mode, v.codec.feedback) == (97, "h264", 1, ("nack pli",))
    assert (v.peer.host, v.peer.port, v.peer.rtcp_port, v.direction, v.on_hold) == ("192.0.2.2", 20096, 20097,
                                                                                      "sendrecv", False)
    au = a.audio
    assert (au.codec.pt, au.codec.name, au.dtmf.pt, au.dtmf.clock) == (0, "pcmu", 101, 8000)
    assert au.codec.feedback == () and au.sends and au.receives


def test_mode_0_only_offer_is_answered_mode_0_never_1():
    a = ans(golden("baresip-offer-h264-mode0.sdp"))          # baresip with video_codecs=H264: mode 0 only
    assert lines(a)[-5:] == ["m=video 40002 RTP/AVP 96", "a=rtpmap:96 H264/90000",
                             "a=fmtp:96 profile-level-id=42e01f;level-asymmetry-allowed=1;packetization-mode=0",
                             "a=rtcp-fb:96 nack pli", "a=sendrecv"]
    assert a.video.codec.mode == 0 and "packetization-mode=1" not in a.sdp


def test_no_fmtp_is_mode_0_and_the_default_profile():
    a = ans(offer_of(video="m=video 5000 RTP/AVP 100\r\na=rtpmap:100 H264/90000\r\n"))
    assert "a=fmtp:100 profile-level-id=42e01f;level-asymmetry-allowed=1;packetization-mode=0" in lines(a)


def test_the_peers_sprop_parameter_sets_are_never_echoed_but_kept_for_the_depacketizer():
    video = ("m=video 5000 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
             "a=fmtp:96 packetization-mode=1; sprop-parameter-sets=Z0LADdoFB+hAAAADAEAAAAyDxQqo,aM4PyA==; "
             "profile-level-id=640c1f\r\n")
    a = ans(offer_of(video=video))
    assert "sprop" not in a.sdp
    assert "a=fmtp:96 profile-level-id=640c1f;level-asymmetry-allowed=1;packetization-mode=1" in lines(a)
    assert "sprop-parameter-sets" not in a.video.codec.fmtp
    assert a.video.offered.parameter_sets()[0][0] & 0x1F == 7          # the peer's SPS, for what it sends


def test_h263_only_video_is_refused_with_port_0_and_a_note():
    a = ans(golden("baresip-offer-h263.sdp"))
    assert lines(a) == HEAD + AUDIO_PCMU_TE + ["m=video 0 RTP/AVP 34"]
    assert a.video is None and a.audio_only
    assert a.notes == ("audio only: the offer's video codecs (H263/34, MP4V-ES/96) include none the box speaks "
                       "(H.264 mode 0 or 1, VP8)",)


def test_no_m_video_gives_an_audio_call():
    a = ans(golden("baresip-offer-audio-only.sdp"))
    assert lines(a) == HEAD + AUDIO_PCMU_TE
    assert a.audio_only and a.notes == ("audio only: the offer has no video",)


def test_sipp_default_uac_offer():
    a = ans(golden("sipp-uac-offer.sdp"))
    assert lines(a) == HEAD + ["m=audio 40000 RTP/AVP 0", "a=rtpmap:0 PCMU/8000", "a=sendrecv"]
    assert (a.audio.peer.host, a.audio.peer.port, a.audio.dtmf) == ("127.0.0.1", 6000, None)


def test_opus_first_is_chosen_and_vp8_when_no_h264():
    a = ans(golden("baresip-offer-opus-vp8.sdp"))           # audio_codecs=opus,PCMU video_codecs=VP8
    assert lines(a) == HEAD + [
        "m=audio 40000 RTP/AVP 96 101", "a=rtpmap:96 opus/48000/2", "a=fmtp:96 useinbandfec=1",
        "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-15", "a=sendrecv",
        "m=video 40002 RTP/AVP 96", "a=rtpmap:96 VP8/90000", "a=rtcp-fb:96 nack pli", "a=sendrecv"]
    assert (a.audio.codec.name, a.audio.codec.channels, a.video.codec.name) == ("opus", 2, "vp8")


def test_h264_is_preferred_to_vp8_and_mode_2_is_refused():
    video = ("m=video 5000 RTP/AVP 100 98 96\r\na=rtpmap:100 VP8/90000\r\na=rtpmap:98 H264/90000\r\n"
             "a=fmtp:98 packetization-mode=2\r\na=rtpmap:96 H264/90000\r\na=fmtp:96 packetization-mode=0\r\n")
    assert ans(offer_of(video=video)).video.codec.pt == 96                      # mode 0 before VP8
    only2 = "m=video 5000 RTP/AVP 98\r\na=rtpmap:98 H264/90000\r\na=fmtp:98 packetization-mode=2\r\n"
    a = ans(offer_of(audio="m=audio 4000 RTP/AVP 0\r\n", video=only2))
    assert lines(a)[-1] == "m=video 0 RTP/AVP 98"
    assert a.notes == ("audio only: the offer's video codecs (H264/98 mode 2) include none the box speaks "
                       "(H.264 mode 0 or 1, VP8)",)


def test_static_payload_types_need_no_rtpmap_and_the_offers_order_decides_audio():
    a = ans(offer_of(audio="m=audio 4000 RTP/AVP 8 0\r\n"))
    assert lines(a)[5:] == ["m=audio 40000 RTP/AVP 8", "a=rtpmap:8 PCMA/8000", "a=sendrecv"]
    a = ans(offer_of(audio="m=audio 4000 RTP/AVP 9 0 111\r\na=rtpmap:9 G722/8000\r\na=rtpmap:111 opus/48000/2\r\n"))
    assert a.audio.codec.pt == 0


def test_telephone_event_at_the_audio_clock_is_preferred():
    audio = ("m=audio 4000 RTP/AVP 111 101 110\r\na=rtpmap:111 opus/48000/2\r\na=rtpmap:101 telephone-event/8000\r\n"
             "a=fmtp:101 0-16\r\na=rtpmap:110 telephone-event/48000\r\na=fmtp:110 0-16\r\n")
    a = ans(offer_of(audio=audio))
    assert lines(a)[5:] == ["m=audio 40000 RTP/AVP 111 110", "a=rtpmap:111 opus/48000/2", "a=fmtp:111 useinbandfec=1",
                            "a=rtpmap:110 telephone-event/48000", "a=fmtp:110 0-16", "a=sendrecv"]
    pcmu = ans(offer_of(audio=audio.replace("111 101 110", "0 101 110")))
    assert pcmu.audio.dtmf.pt == 101


def test_rtcp_feedback_is_what_both_speak_for_that_payload_type():
    video = ("m=video 5000 RTP/AVPF 96 97\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 H264/90000\r\n"
             "a=fmtp:97 packetization-mode=1\r\na=rtcp-fb:97 ccm fir\r\na=rtcp-fb:97 goog-remb\r\n"
             "a=rtcp-fb:97 transport-cc\r\na=rtcp-fb:96 nack pli\r\na=rtcp-fb:* nack\r\n")
    a = ans(offer_of(video=video), rtcp_ports={"video": 41000})
    assert lines(a)[5:] == ["m=video 40002 RTP/AVPF 97", "a=rtpmap:97 H264/90000",
                            "a=fmtp:97 profile-level-id=42e01f;level-asymmetry-allowed=1;packetization-mode=1",
                            "a=rtcp-fb:97 nack", "a=rtcp-fb:97 ccm fir", "a=rtcp:41000", "a=sendrecv"]
    assert a.video is not None and a.audio is None            # a video-only call is a call


# --- hold and direction ---------------------------------------------------------------------------------------
def test_baresip_hold_reinvite_is_answered_recvonly():
    a = ans(golden("baresip-reinvite-hold.sdp"), version=2)
    assert lines(a)[1] == "o=edgeroom 7 2 IN IP4 10.0.0.5"
    assert [line for line in lines(a) if line in ("a=recvonly", "a=sendrecv")] == ["a=recvonly", "a=recvonly"]
    assert a.audio.on_hold and a.video.on_hold and not a.audio.sends and a.audio.receives
    assert a.notes == ("audio on hold: the offer says sendonly", "video on hold: the offer says sendonly")


@pytest.mark.parametrize("extra, media_dir, answered, held", [
    ("", "a=recvonly\r\n", "a=sendonly", False),                  # never sendrecv to a recvonly offer
    ("", "a=inactive\r\n", "a=inactive", True),
    ("a=sendonly\r\n", "", "a=recvonly", True),                   # session-level direction
    ("a=sendonly\r\n", "a=sendrecv\r\n", "a=sendrecv", False),   # the m= line's own wins
])
def test_direction_is_the_offers_reversed(extra, media_dir, answered, held):
    a = ans(offer_of(audio="m=audio 4000 RTP/AVP 0\r\n" + media_dir, extra=extra))
    assert lines(a)[-1] == answered and a.audio.on_hold is held


def test_c_0000_is_hold():
    a = ans(offer_of(audio="m=audio 4000 RTP/AVP 0\r\n", host="0.0.0.0"))
    assert lines(a)[-1] == "a=recvonly" and a.audio.on_hold and a.audio.peer.host == "0.0.0.0"
    assert a.notes == ("audio only: the offer has no video", "audio on hold: the offer says sendrecv at 0.0.0.0")


# --- refused m= lines -----------------------------------------------------------------------------------------
def test_an_application_m_line_is_refused_in_its_place():
    text = offer_of(audio="m=audio 4000 RTP/AVP 0\r\n",
                    video="m=application 5070 UDP/BFCP *\r\na=floorctrl:c-only\r\n"
                          "m=video 5000 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n")
    a = ans(text)
    assert [line for line in lines(a) if line.startswith("m=")] == [
        "m=audio 40000 RTP/AVP 0", "m=application 0 UDP/BFCP *", "m=video 40002 RTP/AVP 96"]
    assert a.notes == ("the offer's application m= line (UDP/BFCP) is refused: the box speaks audio and video over "
                       "RTP/AVP",)


def test_second_m_lines_srtp_port_0_and_video_off_are_refused():
    text = offer_of(audio="m=audio 4000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:x\r\n"
                          "m=audio 4002 RTP/AVP 8\r\nm=audio 4004 RTP/AVP 0\r\n",
                    video="m=video 0 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\nm=video 5000 RTP/AVP 96\r\n"
                          "a=rtpmap:96 VP8/90000\r\n")
    a = ans(text, video=False)
    assert [line for line in lines(a) if line.startswith("m=")] == [
        "m=audio 0 RTP/SAVP 0", "m=audio 40000 RTP/AVP 8", "m=audio 0 RTP/AVP 0", "m=video 0 RTP/AVP 96",
        "m=video 0 RTP/AVP 96"]
    assert a.notes == ("the offer's audio m= line is RTP/SAVP: the box speaks RTP/AVP and RTP/AVPF, no SRTP",
                       "the offer's second audio m= line (port 4004) is refused: the box takes one",
                       "audio only: the offer's video m= line has port 0",
                       "audio only: the call was set up with video off")


def test_video_off_refuses_a_good_video_line():
    a = ans(golden("baresip-offer.sdp"), video=False)
    assert lines(a) == HEAD + AUDIO_PCMU_TE + ["m=video 0 RTP/AVP 96"]
    assert a.notes == ("audio only: the call was set up with video off",)


def test_nothing_acceptable_is_an_sdp_error_saying_what_was_offered():
    text = offer_of(audio="m=audio 4000 RTP/AVP 9 18\r\na=rtpmap:9 G722/8000\r\na=rtpmap:18 G729/8000\r\n",
                    video="m=video 5000 RTP/AVP 34\r\na=rtpmap:34 H263/90000\r\n")
    with pytest.raises(sdp.SdpError) as err:
        ans(text)
    assert str(err.value) == ("nothing in the offer can be taken: it offers audio RTP/AVP (G722/9, G729/18); video "
                              "RTP/AVP (H263/34); the box speaks audio (Opus, PCMU, PCMA) and video (H.264 mode 0 "
                              "or 1, VP8) over RTP/AVP")


@pytest.mark.parametrize("text, message", [
    ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio x RTP/AVP 0\r\n", "SDP line 3: cannot read 'm=audio x RTP/AVP 0'"),
    ("v=0\r\nhello\r\nm=audio 4000 RTP/AVP 0\r\n", "SDP line 2: expected 'x=...', got 'hello'"),
    ("v=0\r\n", "the SDP has no m= line"),
    ("v=0\r\nm=audio 4000 RTP/AVP 0\r\n", "the audio m= line has no c= address (neither its own nor the session's)"),
    ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000\r\n", "SDP line 3: an m= line is 'media port proto fmt...'"),
])
def test_garbage_is_the_parsers_sdp_error(text, message):
    with pytest.raises(sdp.SdpError) as err:
        ans(text)
    assert str(err.value) == message


# --- re-INVITEs -----------------------------------------------------------------------------------------------
def test_reinvites_hold_resume_add_and_drop_video():
    first = ans(golden("baresip-offer-audio-only.sdp"))
    added = ans(golden("baresip-offer.sdp"), version=2)
    assert changes(first, added) == ("audio peer moved", "video added")        # another capture, other ports
    call = ans(golden("baresip-reinvite-resume.sdp"), version=3)
    held = ans(golden("baresip-reinvite-hold.sdp"), version=4)
    assert changes(call, held) == ("audio held", "video held")
    assert changes(held, call) == ("audio resumed", "video resumed")
    off = ans(golden("baresip-reinvite-video-off.sdp"), version=5)             # baresip's /video_dir inactive
    assert lines(off)[-1] == "m=video 0 RTP/AVP 0" and changes(call, off) == ("video removed",)
    assert changes(call, call) == ()


# --- the box dials --------------------------------------------------------------------------------------------
def test_the_box_offer():
    text = offer(host="10.0.0.5", ports=PORTS, session_id=9)
    fb = ["nack", "nack pli", "ccm fir"]
    assert text.split("\r\n")[:-1] == [
        "v=0", "o=edgeroom 9 1 IN IP4 10.0.0.5", "s=edgeroom", "c=IN IP4 10.0.0.5", "t=0 0",
        "m=audio 40000 RTP/AVP 111 0 8 110 101",
        "a=rtpmap:111 opus/48000/2", "a=fmtp:111 useinbandfec=1", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:110 telephone-event/48000", "a=fmtp:110 0-16", "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16", "a=sendrecv",
        "m=video 40002 RTP/AVP 96 97 98",
        "a=rtpmap:96 H264/90000", "a=fmtp:96 profile-level-id=42e01f;level-asymmetry-allowed=1;packetization-mode=1",
        *[f"a=rtcp-fb:96 {f}" for f in fb],
        "a=rtpmap:97 H264/90000", "a=fmtp:97 profile-level-id=42e01f;level-asymmetry-allowed=1;packetization-mode=0",
        *[f"a=rtcp-fb:97 {f}" for f in fb],
        "a=rtpmap:98 VP8/90000", *[f"a=rtcp-fb:98 {f}" for f in fb], "a=sendrecv"]
    assert "m=video" not in offer(host="10.0.0.5", ports={"audio": 40000}, video=False, session_id=9)


def test_the_box_answers_its_own_offer():
    a = ans(offer(host="10.0.0.9", ports={"audio": 5000, "video": 5002}, session_id=1))
    assert (a.audio.codec.pt, a.audio.dtmf.pt, a.video.codec.pt, a.video.codec.mode) == (111, 110, 96, 1)
    assert a.video.codec.feedback == sdp.FEEDBACK


def test_accept_baresips_answer():
    ours = offer(host="127.0.0.1", ports=PORTS, session_id=42)
    a = accept(ours, golden("baresip-answer.sdp"))      # baresip lists all it takes; te/48000 it does not
    assert (a.audio.codec.pt, a.audio.codec.name, a.audio.dtmf.pt, a.audio.dtmf.clock) == (111, "opus", 101, 8000)
    v = a.video
    assert (v.codec.pt, v.codec.mode, v.codec.feedback, v.peer.port, v.direction) == (96, 1, ("nack pli",), 20090,
                                                                                       "sendrecv")
    assert a.notes == () and a.sdp == golden("baresip-answer.sdp")
    audio_only = accept(offer(host="127.0.0.1", ports=PORTS, session_id=42, video=False),
                        golden("baresip-answer-audio-only.sdp"))
    assert audio_only.audio_only and audio_only.notes == ()


def test_accept_takes_the_mode_from_the_answer_and_refusals():
    ours = offer(host="127.0.0.1", ports=PORTS, session_id=1)
    audio = "m=audio 6000 RTP/AVP 0\r\n"
    mode0 = accept(ours, offer_of(audio=audio, video="m=video 6002 RTP/AVP 97\r\na=rtpmap:97 H264/90000\r\n"
                                                     "a=fmtp:97 packetization-mode=0\r\na=recvonly\r\n"))
    assert (mode0.video.codec.pt, mode0.video.codec.mode, mode0.video.codec.feedback) == (97, 0, ())
    assert mode0.video.direction == "sendonly" and mode0.audio.dtmf is None
    bare = accept(ours, offer_of(audio=audio, video="m=video 6002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"))
    assert bare.video.codec.mode == 1                      # no fmtp: pt 96 stands for the offered format
    refused = accept(ours, offer_of(audio=audio, video="m=video 0 RTP/AVP 96\r\n"))
    assert refused.audio_only and refused.notes == ("audio only: the peer refused video (port 0)",)


@pytest.mark.parametrize("answer_text, message", [
    (offer_of(audio="m=audio 6000 RTP/AVP 9\r\na=rtpmap:9 G722/8000\r\n", video="m=video 0 RTP/AVP 96\r\n"),
     "the answer's audio m= line picks payload type 9 (g722/8000), which the offer did not have (it had 111 0 8 110 "
     "101)"),
    (offer_of(audio="m=audio 6000 RTP/AVP 0\r\n"), "the answer's m= lines (audio) do not match the offer's (audio, "
                                                    "video)"),
    (offer_of(audio="m=audio 0 RTP/AVP 0\r\n", video="m=video 0 RTP/AVP 96\r\n"),
     "the answer refuses every m= line of the offer"),
])
def test_accept_refuses_a_bad_answer(answer_text, message):
    with pytest.raises(sdp.SdpError) as err:
        accept(offer(host="127.0.0.1", ports=PORTS, session_id=1), answer_text)
    assert str(err.value) == message
