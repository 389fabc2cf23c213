"""The RTP endpoint's parts on golden packets: SDP, H.264 and VP8 (de)packetizing, the jitter buffer,
RTCP, the clock mapping, and every kind of bad input dropped with its reason."""
from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest

from services.rtp import rtcp, sdp
from services.rtp.h264 import H264Depacketizer, H264Packetizer, TooLarge, nal_units
from services.rtp.inbound import Inbound
from services.rtp.jitter import JitterBuffer
from services.rtp.vp8 import Vp8Depacketizer, Vp8Packetizer

SC = b"\x00\x00\x00\x01"
SPS = bytes.fromhex("6742c00dda0507e840000003004000000c83c50aa8")
PPS = bytes.fromhex("68ce0fc8")
IDR = bytes([0x65]) + bytes(range(1, 200))          # an IDR slice (type 5), 200 bytes
P1 = bytes([0x41]) + b"\x9a" * 50                     # a non-IDR slice (type 1)

FFMPEG_SDP = """v=0
o=- 0 0 IN IP4 127.0.0.1
s=No Name
c=IN IP4 127.0.0.1
t=0 0
a=tool:libavformat 59.27.100
m=video 5004 RTP/AVP 96
b=AS:500
a=rtpmap:96 H264/90000
a=fmtp:96 packetization-mode=1; sprop-parameter-sets=Z0LADdoFB+hAAAADAEAAAAyDxQqo,aM4PyA==; profile-level-id=42C00D
m=audio 5006 RTP/AVP 0
"""


def rtp(seq: int, ts: int, payload: bytes, *, pt: int = 96, marker: bool = False, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def stap_a(*nals: bytes) -> bytes:
    return bytes([0x78]) + b"".join(struct.pack("!H", len(n)) + n for n in nals)


def fu_a(nal: bytes, pieces: int) -> list[bytes]:
    body, head = nal[1:], nal[0]
    step = -(-len(body) // pieces)
    out = []
    for i in range(pieces):
        fu = (head & 0x1F) | (0x80 if i == 0 else 0) | (0x40 if i == pieces - 1 else 0)
        out.append(bytes([(head & 0xE0) | 28, fu]) + body[i * step:(i + 1) * step])
    return out


# --- SDP ------------------------------------------------------------------------------------------------
def test_sdp_as_ffmpeg_writes_it_is_read_whole():
    d = sdp.parse(FFMPEG_SDP)
    video, audio = d.of("video"), d.of("audio")
    assert (video.port, video.rtcp_port, video.host, video.bandwidth_kbps) == (5004, 5005, "127.0.0.1", 500)
    h264 = sdp.negotiate(video)
    assert (h264.pt, h264.name, h264.clock, h264.mode) == (96, "h264", 90000, 1)
    assert h264.parameter_sets()[0][0] & 0x1F == 7 and h264.parameter_sets()[1][0] & 0x1F == 8
    assert h264.fmtp["profile-level-id"] == "42C00D"          # no leading space in the key after "; "
    assert sdp.negotiate(audio).name == "pcmu"                  # static payload type 0 without rtpmap


def test_sdp_mode_is_taken_from_the_fmtp_never_assumed():
    baresip = ("v=0\nc=IN IP4 10.0.0.2\nm=video 4000 RTP/AVP 96 97 98\na=rtpmap:96 H264/90000\n"
               "a=fmtp:96 packetization-mode=0\na=rtpmap:97 H264/90000\na=fmtp:97 packetization-mode=1\n"
               "a=rtpmap:98 H264/90000\na=fmtp:98 packetization-mode=2\na=rtcp:4009\na=rtcp-fb:* nack pli\n")
    video = sdp.parse(baresip).of("video")
    first = sdp.negotiate(video)
    assert (first.pt, first.mode) == (96, 0)                     # the peer's first choice, mode 0
    assert video.rtcp_port == 4009 and "nack pli" in first.feedback
    no_fmtp = sdp.parse("v=0\nc=IN IP4 1.2.3.4\nm=video 1 RTP/AVP 100\na=rtpmap:100 H264/90000\n").of("video")
    assert sdp.negotiate(no_fmtp).mode == 0                      # RFC 6184: no fmtp is mode 0
    only2 = sdp.parse("v=0\nc=IN IP4 1.2.3.4\nm=video 1 RTP/AVP 98\na=rtpmap:98 H264/90000\n"
                      "a=fmtp:98 packetization-mode=2\n").of("video")
    assert sdp.negotiate(only2) is None


def test_sdp_errors_name_the_line():
    with pytest.raises(sdp.SdpError, match="line 3"):
        sdp.parse("v=0\nc=IN IP4 1.2.3.4\nm=video x RTP/AVP 96\n")
    with pytest.raises(sdp.SdpError, match="no m= line"):
        sdp.parse("v=0\n")
    with pytest.raises(sdp.SdpError, match="no c= address"):
        sdp.parse("v=0\nm=video 5000 RTP/AVP 96\n")


def test_written_sdp_reads_back():
    codec = sdp.Codec(97, "h264", 90000, fmtp={"packetization-mode": "1"})
    text = sdp.write("box", "127.0.0.1", [(sdp.Media("video", 6000, "", 7001, (codec,), "recvonly"), codec)])
    back = sdp.parse(text).of("video")
    assert (back.port, back.rtcp_port, back.direction, sdp.negotiate(back).mode) == (6000, 7001, "recvonly", 1)
    assert "a=rtcp-fb:97 nack pli" in text and "a=rtcp-fb:97 ccm fir" in text


# --- H.264 in ---------------------------------------------------------------------------------------------
def test_h264_stap_a_and_fu_a_make_one_access_unit_with_the_parameter_sets():
    d = H264Depacketizer(1)
    assert d.add(stap_a(SPS, PPS), False) == ("", None)
    frags = fu_a(IDR, 3)
    for f in frags[:-1]:
        assert d.add(f, False) == ("", None)
    refused, au = d.add(frags[-1], True)
    assert refused == "" and au.keyframe and not au.broken
    assert au.data == SC + SPS + SC + PPS + SC + IDR
    assert d.extradata() == SC + SPS + SC + PPS


def test_h264_single_nal_units_and_sprop_parameter_sets_before_an_idr():
    d = H264Depacketizer(0, [SPS, PPS])                 # from the SDP's sprop-parameter-sets
    _, au = d.add(IDR, True)
    assert au.data == SC + SPS + SC + PPS + SC + IDR    # the IDR decodes on its own
    _, au = d.add(P1, True)
    assert au.data == SC + P1 and not au.keyframe


@pytest.mark.parametrize("payloads, why", [
    ([fu_a(IDR, 3)[1]], "bad_fua"),                                   # a middle fragment without its start
    ([fu_a(IDR, 3)[0], fu_a(IDR, 3)[0]], "bad_fua"),                  # a start inside an unfinished unit
    ([fu_a(IDR, 3)[0], fu_a(P1, 2)[1]], "bad_fua"),                   # the end of another NAL type
    ([bytes([0x7C, 0xC5]) + b"xx"], "bad_fua"),                       # start and end in one fragment
    ([fu_a(IDR, 3)[0], P1], "bad_fua"),                               # a unit that never ended
    ([b"\x65"], "truncated"),
    ([bytes([0x78, 0x00, 0x30, 0x67])], "bad_payload"),               # a STAP-A whose length runs past the end
    ([bytes([0x7A, 1, 2, 3])], "bad_payload"),                        # STAP-B: not in mode 0 or 1
])
def test_h264_bogus_packets_are_refused_and_break_the_unit(payloads, why):
    d = H264Depacketizer(1)
    reasons = [d.add(p, False)[0] for p in payloads]
    assert why in reasons
    au = d.end()
    assert au is not None and au.broken


def test_h264_mode_0_refuses_aggregates_and_fragments():
    d = H264Depacketizer(0)
    assert d.add(stap_a(SPS, PPS), False)[0] == "packetization_mode"
    assert d.add(fu_a(IDR, 2)[0], False)[0] == "packetization_mode"
    assert d.end().broken == "packetization_mode"


def test_h264_a_loss_breaks_the_unit_in_progress():
    d = H264Depacketizer(1)
    frags = fu_a(IDR, 4)
    d.add(frags[0], False)
    d.lost()
    _, au = d.add(frags[3], True)
    assert au.broken == "loss"
    _, au = d.add(P1, True)                              # the next unit is whole again
    assert not au.broken


# --- H.264 out ---------------------------------------------------------------------------------------------
def test_h264_mode_1_payloads_fit_and_come_back_as_the_same_unit():
    big = bytes([0x65]) + os.urandom(5000).replace(b"\x00\x00", b"\x00\x01")
    au = SC + SPS + SC + PPS + SC + big
    pay = H264Packetizer(1, 1188)
    payloads = pay.packetize(au)
    assert all(len(p) <= 1188 for p in payloads)
    assert payloads[0][0] & 0x1F == 24                  # SPS and PPS travel together in a STAP-A
    assert all(p[0] & 0x1F == 28 for p in payloads[1:])
    d = H264Depacketizer(1)
    out = [d.add(p, i == len(payloads) - 1) for i, p in enumerate(payloads)]
    assert all(r == "" for r, _ in out) and out[-1][1].data == au


def test_h264_every_idr_goes_out_with_the_cached_parameter_sets():
    pay = H264Packetizer(1, 1188)
    pay.packetize(SC + SPS + SC + PPS + SC + IDR)
    payloads = pay.packetize(SC + b"\x09\xf0" + SC + IDR)       # an IDR alone (its AUD is not sent)
    d = H264Depacketizer(1)
    _, au = d.add(payloads[0], True)
    assert au.data == SC + SPS + SC + PPS + SC + IDR


def test_h264_mode_0_sends_single_nal_units_and_refuses_one_too_large():
    pay = H264Packetizer(0, 1188)
    assert pay.packetize(SC + SPS + SC + PPS + SC + IDR) == [SPS, PPS, IDR]
    with pytest.raises(TooLarge, match="packetization-mode 0"):
        pay.packetize(SC + bytes([0x65]) + b"\x11" * 2000)


def test_nal_units_splits_three_and_four_byte_start_codes():
    au = SC + SPS + b"\x00\x00\x01" + PPS + SC + IDR + b"\x00"
    assert [bytes(n) for n in nal_units(au)] == [SPS, PPS, IDR]


# --- VP8 ---------------------------------------------------------------------------------------------------
def test_vp8_round_trip_and_keyframe_bit():
    frame = bytes([0x10]) + os.urandom(3000)             # P bit clear: a keyframe
    payloads = Vp8Packetizer(1188, 5).packetize(frame)
    assert len(payloads) == 3 and all(len(p) <= 1188 for p in payloads)
    d = Vp8Depacketizer()
    out = [d.add(p, i == 2) for i, p in enumerate(payloads)]
    au = out[-1][1]
    assert au.data == frame and au.keyframe and not au.broken
    inter = Vp8Packetizer(1188).packetize(bytes([0x11]) + b"x" * 10)
    assert not d.add(inter[0], True)[1].keyframe


def test_vp8_a_continuation_without_its_start_breaks_the_frame():
    payloads = Vp8Packetizer(600).packetize(bytes([0x10]) + b"y" * 1500)
    d = Vp8Depacketizer()
    assert d.add(payloads[1], False)[0] == "bad_vp8"
    assert d.add(payloads[2], True)[1].broken == "bad_vp8"


# --- the jitter buffer --------------------------------------------------------------------------------------
MS = 1_000_000


def test_jitter_buffer_puts_reordered_packets_back_in_order():
    j: JitterBuffer[int] = JitterBuffer(50 * MS)
    assert j.push(10, 10, 0) == ("", [(0, 10)])
    assert j.push(12, 12, 1 * MS) == ("", [])
    assert j.gap == [11]                                 # found missing: a NACK may bring it
    assert j.push(11, 11, 2 * MS) == ("", [(0, 11), (0, 12)])
    assert j.push(11, 11, 3 * MS)[0] == "late"
    assert j.push(14, 14, 4 * MS) == ("", [])
    assert j.push(14, 14, 5 * MS)[0] == "duplicate"


def test_jitter_buffer_gives_up_a_gap_after_the_window():
    j: JitterBuffer[int] = JitterBuffer(50 * MS)
    j.push(1, 1, 0)
    j.push(4, 4, 10 * MS)
    j.push(5, 5, 11 * MS)
    assert j.deadline() == 60 * MS
    assert j.expire(59 * MS) == []
    assert j.expire(60 * MS) == [(2, 4), (0, 5)]         # 2 and 3 lost, then what waited
    assert j.lost == 2


def test_jitter_buffer_follows_the_16_bit_wrap_and_a_restarted_sequence():
    j: JitterBuffer[int] = JitterBuffer(0)
    assert j.push(65535, 1, 0)[1] == [(0, 1)]
    assert j.push(0, 2, 0)[1] == [(0, 2)]
    assert j.push(1, 3, 0)[1] == [(0, 3)]
    assert j.push(30000, 4, 0)[1] == [(1, 4)]            # a jump: a new start, after a loss


def test_jitter_buffer_is_bounded_in_packets():
    j: JitterBuffer[int] = JitterBuffer(10_000 * MS, capacity=8)
    j.push(0, 0, 0)
    out = []
    for s in range(2, 12):
        out += j.push(s, s, 0)[1]
    assert out and out[0] == (1, 2) and len(j.held) <= 8


# --- RTCP ---------------------------------------------------------------------------------------------------
def test_rtcp_reports_and_feedback_read_back():
    from aiortc.rtp import RtcpPsfbPacket, RtcpRtpfbPacket, RtcpSdesPacket, RtcpSrPacket

    got = rtcp.parse(rtcp.report(7, "box", sent=(1234, 10, 1000),
                                 received=rtcp.Received(9, 12, 3, 70000, 40, lsr=5, lsr_at=time.monotonic() - 1)))
    assert isinstance(got[0], RtcpSrPacket) and isinstance(got[1], RtcpSdesPacket)
    sr = got[0]
    assert (sr.ssrc, sr.sender_info.rtp_timestamp, sr.sender_info.packet_count) == (7, 1234, 10)
    block = sr.reports[0]
    assert (block.ssrc, block.packets_lost, block.highest_sequence, block.lsr) == (9, 3, 70000, 5)
    assert 60000 < block.dlsr < 70000                    # about one second in 1/65536 s
    pli, = rtcp.parse(rtcp.pli(7, 9))
    assert isinstance(pli, RtcpPsfbPacket) and (pli.fmt, pli.media_ssrc) == (1, 9)
    fir, = rtcp.parse(rtcp.fir(7, 9, 3))
    assert fir.fmt == 4 and rtcp.fir_targets(fir) == [9] and fir.fci[4] == 3
    nack, = rtcp.parse(rtcp.nack(7, 9, [100, 101, 105, 140]))
    assert isinstance(nack, RtcpRtpfbPacket) and sorted(nack.lost) == [100, 101, 105, 140]


# random bytes under a fixed id: each test worker collects the same tests (pytest-xdist compares them)
@pytest.mark.parametrize("garbage", [b"", b"\x80", pytest.param(os.urandom(3), id="random3"), b"\x00" * 40,
                                     b"\x81\xc9\x00\x09" + b"\x00" * 8, rtp(1, 2, b"payload")])
def test_rtcp_garbage_is_refused(garbage):
    with pytest.raises(ValueError):
        rtcp.parse(garbage)


def test_ntp_round_trip():
    wall = time.time_ns()
    assert abs(rtcp.wall_of_ntp(rtcp.ntp_now(wall)) - wall) < 2


def test_sender_reports_line_audio_and_video_up():
    """Video (90 kHz) and audio (48 kHz) with unrelated RTP origins, each with an SR taken at the same wall
    instant: RTP times that stand for the same instant get the same capture time, whatever their arrival."""
    clocks = rtcp.Clocks()
    video, audio = rtcp.MediaClock(90000, clocks), rtcp.MediaClock(48000, clocks)
    wall = time.time_ns()
    ntp = rtcp.ntp_now(wall)
    video.sender_report(ntp, 1_000_000)
    audio.sender_report(ntp, 77_000)
    base = 5_000_000_000                                    # the box's clock when the SR instant was sent
    # one second after the SR instant: video arrives 30 ms late, audio 2 ms late (the earlier sets the offset)
    a = audio.capture_ns(77_000 + 48_000, base + 1_002_000_000)
    v = video.capture_ns(1_000_000 + 90_000, base + 1_030_000_000)
    assert abs(v - a) < 100_000                              # the same instant within 0.1 ms (the offset's creep)
    assert a == base + 1_002_000_000                          # the earliest arrival sets the offset
    alone = rtcp.MediaClock(90000, rtcp.Clocks())             # without SRs each media has only its own arrivals
    assert alone.capture_ns(1_090_000, base + 1_030_000_000) - a == 28_000_000


# --- inbound: bad input dropped with its reason ---------------------------------------------------------------
class FakeSink:
    def __init__(self) -> None:
        self.units: list[dict] = []
        self.audio_chunks: list[tuple] = []
        self.extradata = None

    def set_extradata(self, data, codec) -> None:
        self.extradata = data

    def encoded(self, data, codec, **kw) -> bool:
        self.units.append({"data": bytes(data), "codec": codec, **kw})
        return True

    def audio(self, pcm, rate, **kw) -> None:
        self.audio_chunks.append((pcm, rate, kw))


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg, *a) -> None:
        self.lines.append(msg % a)

    warning = info


def inbound(codec: sdp.Codec | None = None, **kw):
    drops: dict[str, int] = {}
    keys: list[str] = []
    sink = FakeSink()

    def drop(reason: str, n: int = 1) -> None:
        drops[reason] = drops.get(reason, 0) + n

    args = dict(jitter_ms=20, max_packet=1500, max_bps=0, drop=drop,
                drop_unit=lambda why: drop(f"unit:{why}"), want_keyframe=keys.append,
                keyframe_sent=lambda: None, lost=lambda n: drop("lost", n), missing=lambda ssrc, seqs: None, log=Log())
    args.update(kw)
    codec = codec or sdp.Codec(96, "h264", 90000, fmtp={"packetization-mode": "1"})
    return Inbound("video", "call", codec, sink, rtcp.Clocks(), **args), sink, drops, keys


def test_inbound_drops_bad_datagrams_with_their_reasons_and_goes_on():
    i, sink, drops, _ = inbound()
    now = time.monotonic_ns()
    i.datagram(os.urandom(5), now)                               # garbage, too short for a header
    i.datagram(b"\x00" * 40, now)                                # not version 2
    i.datagram(rtp(1, 0, b"x" * 2000), now)                       # larger than the call allows
    i.datagram(rtp(1, 0, P1, pt=97, marker=True), now)            # a payload type the SDP did not settle on
    i.datagram(bytes([0x90]) + rtp(1, 0, P1)[1:12] + b"\x00", now)   # an extension header cut short
    i.datagram(rtp(1, 0, IDR, marker=True), now)                 # a good one
    i.datagram(rtp(2, 3000, P1, marker=True, ssrc=0x9999), now)   # another sender while the first speaks
    i.datagram(rtp(3, 3000, P1, marker=True), now)
    assert {k: drops.get(k) for k in ("truncated", "not_rtp", "oversized", "payload_type", "malformed", "ssrc")} == {
        "truncated": 1, "not_rtp": 1, "oversized": 1, "payload_type": 1, "malformed": 1, "ssrc": 1}
    assert [u["keyframe"] for u in sink.units] == [True]          # seq 3 waits for 2 (the other sender's)


def test_inbound_loss_drops_the_unit_marks_the_next_corrupt_and_asks_for_a_keyframe():
    i, sink, drops, keys = inbound(jitter_ms=0)
    now = time.monotonic_ns()
    frags = fu_a(IDR, 3)
    i.datagram(rtp(10, 0, frags[0]), now)
    i.datagram(rtp(12, 0, frags[2], marker=True), now)           # 11 never comes: with no window, lost at once
    i.datagram(rtp(13, 3000, P1, marker=True), now + 33 * MS)
    assert drops["lost"] == 1 and drops["unit:loss"] == 1
    assert len(sink.units) == 1 and sink.units[0]["corrupt"] is True and sink.units[0]["keyframe"] is False
    assert keys                                                  # a keyframe was asked for at once


def test_inbound_asks_for_a_keyframe_once_when_a_stream_begins_mid_group_and_never_when_it_begins_with_one():
    """A call taken back after a restart (or a sender that joined late) starts with deltas: nothing decodes until a
    keyframe, so one is asked for at the first unit, not left to the peer's next own one (baresip: none for 8 s)."""
    i, sink, _, keys = inbound()
    now = time.monotonic_ns()
    for n in range(3):
        i.datagram(rtp(20 + n, 3000 * n, P1, marker=True), now + n * 33 * MS)
    assert keys == ["the stream began without a keyframe"] and len(sink.units) == 3
    j, sink, _, keys = inbound()
    j.datagram(rtp(1, 0, stap_a(SPS, PPS, IDR), marker=True), now)
    j.datagram(rtp(2, 3000, P1, marker=True), now + 33 * MS)
    assert keys == [] and [u["keyframe"] for u in sink.units] == [True, False]


def test_inbound_takes_a_new_ssrc_after_silence_as_a_discontinuity_with_continuous_pts():
    i, sink, drops, _ = inbound()
    now = time.monotonic_ns()
    i.datagram(rtp(1, 4_000_000_000, IDR, marker=True), now)
    i.datagram(rtp(2, 4_000_003_000, P1, marker=True), now + 33 * MS)
    i.last_packet -= 2.0                                          # the first sender went quiet
    i.datagram(rtp(500, 17, IDR, marker=True, ssrc=0x7777), now + 66 * MS)
    assert drops.get("ssrc") is None and i.ssrc == 0x7777
    pts = [u["pts"] for u in sink.units]
    assert pts[0] == 0 and pts[1] == 3000 and pts[2] > pts[1]       # never backwards
    assert sink.units[2]["discontinuity"] is True


def test_inbound_rtp_timestamps_wrap_without_a_rebase():
    i, sink, _, _ = inbound()
    now = time.monotonic_ns()
    for n, ts in enumerate([2**32 - 3000, 0, 3000]):
        i.datagram(rtp(n, ts, IDR if n == 0 else P1, marker=True), now + n * 33 * MS)
    assert [u["pts"] for u in sink.units] == [0, 3000, 6000]
    assert not any(u["discontinuity"] for u in sink.units)


def test_inbound_a_sender_at_ten_times_its_rate_is_cut_to_it():
    i, sink, drops, _ = inbound(max_bps=100_000)                  # 12.5 kB/s, one second of burst
    now = time.monotonic_ns()
    payload = bytes([0x41]) + b"\x01" * 1100
    for n in range(113):                                          # 10x: 125 kB in one second
        i.datagram(rtp(n, n * 3000, payload, marker=True), now + n * 8_850_000)
    assert 85 <= drops["over_rate"] <= 105
    assert 8 <= len(sink.units) <= 28


def test_inbound_audio_pcmu_goes_on_the_bus_as_s16():
    codec = sdp.Codec(0, "pcmu", 8000)
    i, sink, drops, _ = inbound(codec)
    now = time.monotonic_ns()
    for n in range(3):
        i.datagram(rtp(n, n * 160, b"\xff" * 160, pt=0), now + n * 20 * MS)   # mu-law silence
    assert [(c[0].shape, c[0].dtype, c[1]) for c in sink.audio_chunks] == [((160, 1), np.int16, 8000)] * 3
    assert [c[2]["pts"] for c in sink.audio_chunks] == [0, 160, 320]
    assert not np.abs(sink.audio_chunks[0][0]).max() > 8


# --- outbound: pacing, retransmission ------------------------------------------------------------------------
def test_a_keyframe_leaves_paced_not_in_one_burst():
    import asyncio

    from services.rtp.outbound import Pacer

    loop = asyncio.new_event_loop()
    sent: list[float] = []
    pacer = Pacer(1_000_000, 1200, lambda data: sent.append(time.monotonic()), loop.call_later)   # 125 kB/s
    loop.call_soon(lambda: pacer.put([b"x" * 1200] * 30))
    loop.call_later(0.6, loop.stop)
    loop.run_forever()
    loop.close()
    assert len(sent) == 30
    assert sum(1 for t in sent if t - sent[0] < 0.001) <= 4           # the burst: four packets
    assert 0.22 <= sent[-1] - sent[0] <= 0.4                          # the other 26 at the rate: 0.25 s


def _pace(rate_bps: int, packets: int) -> tuple[list[float], int]:
    """When each of `packets` 1200-byte packets put at once left a Pacer on a real asyncio loop, and how many
    timers it set."""
    import asyncio

    from services.rtp.outbound import Pacer

    loop = asyncio.new_event_loop()
    sent: list[float] = []
    timers = [0]

    def call_later(delay, fn):
        timers[0] += 1
        return loop.call_later(delay, fn)

    pacer = Pacer(rate_bps, 1200, lambda data: sent.append(time.monotonic()), call_later)
    loop.call_soon(lambda: pacer.put([b"x" * 1200] * packets))
    loop.call_later(0.3, loop.stop)
    loop.run_forever()
    loop.close()
    assert len(sent) == packets
    return sent, timers[0]


def test_the_pacer_holds_its_rate_within_a_tick_of_the_loops_timers():
    """The loop's timers wake in whole milliseconds. At 20 Mbit/s (a packet due every 0.48 ms) a 30-packet keyframe
    leaves over the ~12.5 ms the rate asks, never ahead of it by more than a tick; an 8-packet P-frame goes in one
    tick (it waited two: a wait for a fraction of a packet's time slept a whole tick). At 100 Mbit/s a keyframe
    leaves in a few wake-ups: the bucket's credit was capped at four packets even while packets waited, so no rate
    passed four packets a tick (38 Mbit/s) and this keyframe took 7 wake-ups, 7 ms."""
    sent, _ = _pace(20_000_000, 30)
    rate_s = (30 * 1200 - 4 * 1200) / 2_500_000                    # what leaves after the four-packet burst
    assert rate_s - 0.0011 <= sent[-1] - sent[0] <= 0.1, sent[-1] - sent[0]
    sent, timers = _pace(20_000_000, 8)
    assert timers <= 1, sent                                         # 6 at once (4 + a tick's worth), 2 a tick later
    sent, timers = _pace(100_000_000, 30)
    assert timers <= 3, (timers, [round(1000 * (t - sent[0]), 2) for t in sent])


class FakePacer:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def put(self, packets: list[bytes]) -> None:
        self.out += packets


def outbound(codec: sdp.Codec, history: int = 512):
    from services.rtp.outbound import Outbound

    unsent: list[str] = []
    pacer = FakePacer()
    out = Outbound("video", "cam", codec, mtu=1200, history=history, pacer=pacer, drop=unsent.append, log=Log())
    return out, pacer, unsent


H264_MODE1 = sdp.Codec(96, "h264", 90000, fmtp={"packetization-mode": "1"})


def test_outbound_waits_for_a_keyframe_marks_the_last_packet_and_answers_nack_from_its_buffer():
    from aiortc.rtp import RtpPacket

    out, pacer, unsent = outbound(H264_MODE1, history=8)
    assert out.access_unit(SC + P1, "h264", False, 1_000_000_000) is False
    assert out.access_unit(SC + SPS + SC + PPS + SC + IDR, "vp8", True, 1_000_000_000) is False
    assert unsent == ["waiting_keyframe", "codec"]
    big_idr = bytes([0x65]) + b"\x22" * 12000                             # 12 packets: more than are kept
    assert out.access_unit(SC + SPS + SC + PPS + SC + big_idr, "h264", True, 1_000_000_000)
    packets = [RtpPacket.parse(d) for d in pacer.out]
    assert [p.marker for p in packets] == [0] * (len(packets) - 1) + [1]
    assert all(len(d) <= 1200 for d in pacer.out) and len({p.timestamp for p in packets}) == 1
    seqs = [p.sequence_number for p in packets]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]
    before = len(pacer.out)
    assert out.resend([seqs[-1], seqs[-2], (seqs[0] - 100) & 0xFFFF]) == 2    # the last two are kept, not the rest
    assert pacer.out[before:] == [pacer.out[before - 1], pacer.out[before - 2]]
    assert out.resend([seqs[0]]) == 0                                        # 8 kept: the first one is gone


def test_outbound_rtp_time_follows_capture_time():
    out, pacer, _ = outbound(H264_MODE1)
    from aiortc.rtp import RtpPacket

    out.access_unit(SC + IDR, "h264", True, 2_000_000_000)
    out.access_unit(SC + P1, "h264", False, 2_033_333_333)
    a, b = (RtpPacket.parse(d).timestamp for d in pacer.out)
    assert (b - a) & 0xFFFFFFFF == 3000                                       # 1/30 s at 90 kHz


def test_outbound_mode_0_refuses_a_unit_with_a_nal_larger_than_a_packet():
    out, pacer, unsent = outbound(sdp.Codec(96, "h264", 90000))             # no fmtp: mode 0
    assert out.access_unit(SC + bytes([0x65]) + b"\x33" * 3000, "h264", True, 1) is False
    assert unsent == ["nal_too_large"] and pacer.out == []


def test_outbound_opus_from_s16_chunks_at_any_rate():
    from aiortc.rtp import RtpPacket

    from services.rtp.outbound import Outbound

    pacer = FakePacer()
    out = Outbound("audio", "cam-audio", sdp.Codec(111, "opus", 48000, 2), mtu=1200, history=0, pacer=pacer,
                   drop=lambda why: None, log=Log())
    t = np.arange(16000) / 16000
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).reshape(-1, 1)    # 1 s, 16 kHz mono
    for i in range(0, 16000, 1600):
        out.audio(tone[i:i + 1600], 16000, 1_000_000_000 + i * 62_500)
    packets = [RtpPacket.parse(d) for d in pacer.out]
    assert 45 <= len(packets) <= 50                                          # 20 ms each at 48 kHz
    steps = {(b.timestamp - a.timestamp) & 0xFFFFFFFF for a, b in zip(packets, packets[1:])}
    assert steps == {960}
