"""The RTP endpoint against real peers on loopback: ffmpeg and GStreamer send to the box and take what it
sends; every picture is checked by the frame number drawn in it (tests/media_files.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import framebus
from services.runtime.keyframes import MIN_INTERVAL
from tests.appliance import metric_value, wait_for
from tests.media_files import numbered_file, picture_number
from tests.ports import free_udp_block

HERE = Path(__file__).parent
GST_PY = "/usr/bin/python3"

SERVICES = """
[services.rtp]
restart_sec = 0.2
watchdog_sec = 3.0
stop_timeout = 2.0
"""


def rtp_box(box, extra: str, *, capture: bool = False):
    """A box with the calls in `extra`; its test camera (capture@cam) only when asked for."""
    b = box(SERVICES + extra)
    if not capture:
        text = b.config.read_text()
        b.config.write_text(text.replace("[services.capture]\n", "[services.capture]\nenabled = false\n", 1))
    return b


def h264_sdp(port: int = 0, *, mode: int = 1, pt: int = 96, host: str = "127.0.0.1", direction: str = "sendonly",
             extra: str = "") -> str:
    return (f"v=0\no=- 0 0 IN IP4 {host}\ns=peer\nc=IN IP4 {host}\nt=0 0\n"
            f"m=video {port} RTP/AVP {pt}\na=rtpmap:{pt} H264/90000\n"
            f"a=fmtp:{pt} packetization-mode={mode}\n{extra}a={direction}\n")


def rtp_table(name: str, peer_sdp: str, **keys) -> str:
    body = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower()}" for k, v in keys.items())
    return f'\n[rtp.{name}]\nroom = "lobby"\nsdp = """{peer_sdp}"""\n{body}\n'


def ports(b, session: str) -> dict:
    return wait_for(lambda: b.call("sdp", {"session": session})["ports"], 10, f"{session}'s ports")


def free_port_pair() -> int:
    """An even UDP port whose next one is free too (for a peer that listens on RTP and RTCP), of this
    test worker's own (tests/ports.py)."""
    return free_udp_block(2)


def read_pictures(b, stream: str, count: int, timeout: float, consumer=None) -> list[int]:
    """The frame numbers of pictures on `stream` until `count` came or `timeout` passed."""
    own = consumer is None
    c = consumer or framebus.Consumer.attach(stream, prefix=b.prefix, missing_ok=True, start="oldest")
    numbers: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(numbers) < count:
            item = c.receive(timeout=0.2)
            if item is not None and item.kind == "video":
                n = picture_number(item)
                if item.valid():
                    numbers.append(n)
    finally:
        if own:
            c.close()
    return numbers


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stderr.read().decode(errors="replace") if proc.stderr else ""


@pytest.fixture
def clip(tmp_path):
    """60 numbered pictures at 25 fps as raw H.264 (SPS/PPS in-band before every IDR, one every 10 frames)."""
    return numbered_file(tmp_path / "clip.h264", 60, fps=25, gop=10, fmt="h264")


def ffmpeg_send(clip: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "h264", "-framerate", "25",
                             "-i", str(clip), "-c:v", "copy", *extra, "-f", "rtp",
                             f"rtp://127.0.0.1:{port}?pkt_size=1200"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def gst(pipeline: str) -> subprocess.Popen:
    """gst-launch-1.0 (Debian's GStreamer) running `pipeline`."""
    return subprocess.Popen(["gst-launch-1.0", "-q", *pipeline.split()], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def gst_decoding(pipeline: str) -> tuple[subprocess.Popen, threading.Event]:
    """gst() verbose, for a `pipeline` ending in `fakesink silent=false`, which reports each buffer it takes: the
    event is set when the first one (a decoded picture) reaches it."""
    proc = subprocess.Popen(["gst-launch-1.0", "-v", *pipeline.split()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    decoded = threading.Event()

    def read() -> None:                     # to the end: a full pipe would stop GStreamer
        for line in proc.stdout:
            if b"last-message = chain" in line:
                decoded.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, decoded


class Relay:
    """A UDP relay on loopback: what comes to `port` goes to `to`, except the datagrams `drop(n, data)` picks
    (n counts from 0); when each was dropped is kept (monotonic ns)."""

    def __init__(self, to: tuple[str, int], drop) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.to, self.drop = to, drop
        self.dropped: list[int] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            n, self.count = self.count, self.count + 1
            if self.drop(n, data):
                self.dropped.append(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
                continue
            self.sock.sendto(data, self.to)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def blast_bad_input(rtp_port: int, rtcp_port: int) -> None:
    """Garbage, a stranger's packets, RTCP garbage: none of it may reach the bus or stop the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for size in (1, 7, 40, 1400):
            s.sendto(os.urandom(size), ("127.0.0.1", rtp_port))
        s.sendto(b"\x81\xc9\x00\x09" + os.urandom(10), ("127.0.0.1", rtcp_port))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.2", 0))                  # another address of loopback: not the peer
        good = bytes([0x80, 0xE0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0x65]) + b"\x11" * 100
        for _ in range(5):
            stranger.sendto(good, ("127.0.0.1", rtp_port))
        stranger.sendto(bytes([0x80, 0xC8, 0, 1]) + os.urandom(4), ("127.0.0.1", rtcp_port))


def never_restarted(b, *services: str) -> None:
    """Whatever the test sent, the call (and its companions) ran through in one process."""
    rows = b.services()
    for service in services or ("rtp@call",):
        assert rows[service]["restarts"] == 0 and rows[service]["state"] == "ready", (rows[service], b.log()[-3000:])


def dropped(b, reason: str, media: str = "video") -> float:
    return metric_value(b.scrape(), "edgeroom_rtp_dropped_packets_total", call="call", media=media,
                        reason=reason) or 0.0


def test_ffmpeg_sends_h264_and_every_picture_is_decoded_in_order(box, clip):
    """Bad input first (garbage, a stranger's packets, RTCP garbage): dropped and counted; then ffmpeg's
    60 pictures all come out of decode@call, in order."""
    b = rtp_box(box, rtp_table("call", h264_sdp(mode=1)))
    b.run()
    b.wait_ready("rtp@call", "decode@call")
    p = ports(b, "call")["video"]
    port = p["rtp"]
    blast_bad_input(port, p["rtcp"])
    wait_for(lambda: dropped(b, "wrong_source") == 6, 5, "the stranger's packets dropped")
    assert dropped(b, "bad_rtcp") == 1 and dropped(b, "truncated") == 2
    assert dropped(b, "not_rtp") + dropped(b, "malformed") + dropped(b, "oversized") + dropped(b, "payload_type") == 2
    with framebus.Consumer.attach("call-raw", prefix=b.prefix, missing_ok=True, start="oldest") as c:
        sender = ffmpeg_send(clip, port)
        numbers = read_pictures(b, "call-raw", 60, 15, c)
        err = stop(sender)
    assert numbers == list(range(60)), f"{numbers}\nffmpeg: {err}\n{b.log()[-3000:]}"
    wait_for(lambda: metric_value(b.scrape(), "edgeroom_rtp_frames_total", call="call") == 60, 5,
             "60 access units counted")
    sessions = {s["session"]: s for s in b.call("sessions")}
    assert sessions["call"]["kind"] == "call" and sessions["call"]["room"] == "lobby"
    never_restarted(b)


def test_ffmpeg_in_packetization_mode_0_single_nal_units_of_sliced_pictures(box, tmp_path):
    """The SDP says mode 0: ffmpeg sends every NAL unit alone (its slices cut to fit: x264 slice-max-size)."""
    clip = numbered_file(tmp_path / "sliced.h264", 40, fps=25, gop=10, fmt="h264", size=(640, 480),
                         x264={"x264-params": "slice-max-size=1000"})
    b = rtp_box(box, rtp_table("call", h264_sdp(mode=0)))
    b.run()
    b.wait_ready("rtp@call", "decode@call")
    port = ports(b, "call")["video"]["rtp"]
    with framebus.Consumer.attach("call-raw", prefix=b.prefix, missing_ok=True, start="oldest") as c:
        sender = ffmpeg_send(clip, port, "-rtpflags", "h264_mode0")
        numbers = read_pictures(b, "call-raw", 40, 15, c)
        err = stop(sender)
    assert numbers == list(range(40)), f"{numbers}\nffmpeg: {err}\n{b.log()[-3000:]}"
    assert dropped(b, "packetization_mode") == 0
    never_restarted(b)


def test_gstreamer_rtpbin_sends_h264_and_every_picture_is_decoded_in_order(box, tmp_path):
    clip = numbered_file(tmp_path / "clip.mp4", 50, fps=25, gop=10)
    b = rtp_box(box, rtp_table("call", h264_sdp(mode=1)))
    b.run()
    b.wait_ready("rtp@call", "decode@call")
    p = ports(b, "call")["video"]
    sub = b.subscriber("hook.ON_VIDEO_TRACK_ADDED")
    with sub, framebus.Consumer.attach("call-raw", prefix=b.prefix, missing_ok=True, start="oldest") as c:
        sender = gst(f"rtpbin name=r filesrc location={clip} ! qtdemux ! h264parse ! "
                     f"rtph264pay pt=96 mtu=1200 config-interval=-1 ! r.send_rtp_sink_0 "
                     f"r.send_rtp_src_0 ! udpsink host=127.0.0.1 port={p['rtp']} "
                     f"r.send_rtcp_src_0 ! udpsink host=127.0.0.1 port={p['rtcp']} sync=false async=false")
        numbers = read_pictures(b, "call-raw", 50, 15, c)
        err = stop(sender)
        added = sub.recv(timeout=5)                       # media started: the call's video track came
    assert numbers == list(range(50)), f"{numbers}\ngst: {err}\n{b.log()[-3000:]}"
    assert added is not None and added.data["session"] == "call" and added.data["room"] == "lobby"
    assert (added.data["track"]["stream"], added.data["track"]["direction"]) == ("call", "recv")
    never_restarted(b)


def test_a_loss_inbound_brings_a_keyframe_from_the_peer_within_one_request_cycle(box):
    """A live GStreamer sender whose own keyframes are 100 s apart; one packet is lost on the way (a relay drops
    it): the next unit is marked damaged, decode closes its gate, the call sends PLI, x264enc answers with an
    IDR, and pictures are back within a second."""
    gst_rtcp = free_port_pair()
    peer = h264_sdp(gst_rtcp - 1, mode=1, direction="sendonly", extra=f"a=rtcp:{gst_rtcp}\n")
    b = rtp_box(box, rtp_table("call", peer))
    b.run()
    b.wait_ready("rtp@call", "decode@call")
    p = ports(b, "call")["video"]
    start = time.monotonic()
    relay = Relay(("127.0.0.1", p["rtp"]), lambda n, data: time.monotonic() - start > 2.0 and not relay.dropped
                  and data[1] & 0x80 == 0)            # one packet, not a unit's last (its marker is clear)
    sender = gst("rtpbin name=r videotestsrc is-live=true pattern=ball ! "
                 "video/x-raw,width=320,height=240,framerate=30/1 ! "
                 "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=3000 bitrate=800 ! "
                 "video/x-h264,profile=constrained-baseline ! rtph264pay pt=96 mtu=300 config-interval=-1 ! "
                 f"r.send_rtp_sink_0 r.send_rtp_src_0 ! udpsink host=127.0.0.1 port={relay.port} "
                 f"r.send_rtcp_src_0 ! udpsink host=127.0.0.1 port={p['rtcp']} sync=false async=false "
                 f"udpsrc port={gst_rtcp} ! r.recv_rtcp_sink_0")
    try:
        with framebus.Consumer.attach("call-raw", prefix=b.prefix, missing_ok=True, start="next") as c:
            wait_for(lambda: relay.dropped, 10, "the relay's drop")
            lost_at = relay.dropped[0]
            back = None
            deadline = time.monotonic() + 5
            while back is None and time.monotonic() < deadline:
                item = c.receive(timeout=0.1)
                if item is not None and item.capture_ns > lost_at + 40_000_000:
                    back = item.capture_ns
        assert back is not None, f"no picture after the loss; {b.log()[-3000:]}"
        assert (back - lost_at) / 1e9 < 1.0, f"pictures came back {(back - lost_at) / 1e9:.2f} s after the loss"
        def counted() -> str | None:
            text = b.scrape()
            return text if metric_value(text, "edgeroom_rtp_feedback_sent_total", call="call", media="video",
                                        type="pli") else None

        scrape = wait_for(counted, 5, "the PLI counted")
        assert metric_value(scrape, "edgeroom_rtp_lost_packets_total", call="call", media="video") == 1
        assert metric_value(scrape, "edgeroom_decode_dropped_frames_total", stream="call", reason="missed") is None
        never_restarted(b)
    finally:
        stop(sender)
        relay.close()


# --- the box sends ------------------------------------------------------------------------------------------
CAMERA = """
kind = "synthetic"
width = 320
height = 240
fps = 30.0
room = "lobby"
encode = "h264"
decode = false
gop = {gop}
"""
FRAME = 320 * 240


def gray_numbers(path: Path) -> list[int]:
    """The frame numbers of the 320x240 GRAY8 pictures a receiver wrote to `path`."""
    import numpy as np

    from services.capture.sources.synthetic import frame_number

    data = np.fromfile(path, np.uint8) if path.exists() else np.zeros(0, np.uint8)
    frames = data[: len(data) // FRAME * FRAME].reshape(-1, 240, 320)
    return [frame_number(f) for f in frames]


def consecutive(numbers: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(numbers, numbers[1:]))


def h264_caps(pt: int = 96, extra: str = "") -> str:
    return f"application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,payload={pt}{extra}"


def sending_box(box, gop: float, peer_sdp: str, **keys):
    b = rtp_box(box, rtp_table("call", peer_sdp, send_video="cam", decode=False, **keys), capture=True)
    b.set_source("cam", CAMERA.format(gop=gop))
    return b


def test_gstreamer_takes_what_the_box_sends_and_decodes_every_picture(box, tmp_path):
    port = free_port_pair()
    out = tmp_path / "gst.gray"
    receiver = gst(f"udpsrc port={port} caps={h264_caps()} ! rtpjitterbuffer latency=100 ! rtph264depay ! "
                   f"avdec_h264 ! videoconvert ! video/x-raw,format=GRAY8 ! filesink location={out}")
    b = sending_box(box, 60.0, h264_sdp(port, mode=1, direction="recvonly"))
    b.run()
    b.wait_ready("rtp@call", "capture@cam")
    try:
        deadline = time.monotonic() + 15
        while len(gray_numbers(out)) < 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        never_restarted(b)
    finally:
        err = stop(receiver)
    numbers = gray_numbers(out)
    assert len(numbers) >= 60 and consecutive(numbers), f"{numbers}\n{err}\n{b.log()[-4000:]}"
    sessions = {s["session"]: s for s in b.call("sessions")}
    assert [(t["stream"], t["state"]) for t in sessions["call"]["tracks"] if t.get("direction") == "send"] == [
        ("cam", "sending")]


def test_ffmpeg_reads_the_box_sdp_and_decodes_every_picture(box, tmp_path):
    port = free_port_pair()
    b = sending_box(box, 1.0, h264_sdp(port, mode=1, direction="recvonly"))
    b.run()
    b.wait_ready("rtp@call", "capture@cam")
    offer = b.call("sdp", {"session": "call", "for": "receiver"})
    assert f"m=video {port} RTP/AVP 96" in offer["sdp"] and "packetization-mode=1" in offer["sdp"]
    (tmp_path / "box.sdp").write_text(offer["sdp"])
    out = tmp_path / "ffmpeg.gray"
    receiver = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-protocol_whitelist", "file,udp,rtp",
                                 "-i", str(tmp_path / "box.sdp"), "-f", "rawvideo", "-pix_fmt", "gray", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(gray_numbers(out)) >= 60, 20, "60 pictures decoded by ffmpeg")
        never_restarted(b)
    finally:
        err = stop(receiver)
    numbers = gray_numbers(out)
    assert consecutive(numbers), f"{numbers}\n{err}"


def test_a_gstreamer_receiver_that_loses_a_packet_sends_pli_and_the_camera_answers_with_an_idr(box, tmp_path):
    """The box -> a relay that drops one packet -> GStreamer (rtpbin, PLI in its caps): its depayloader asks for a
    keyframe, rtpbin sends PLI, the call asks capture@cam, whose encoder forces an IDR (its GOP is 60 s)."""
    gst_port = free_port_pair()
    armed = threading.Event()
    relay = Relay(("127.0.0.1", gst_port), lambda n, data: armed.is_set() and not relay.dropped
                  and data[1] & 0x80 == 0)
    peer = h264_sdp(relay.port, mode=1, direction="recvonly", extra=f"a=rtcp:{gst_port + 1}\n")
    b = sending_box(box, 60.0, peer)
    b.run()
    b.wait_ready("rtp@call", "capture@cam")
    p = ports(b, "call")["video"]
    caps = h264_caps(extra=",rtcp-fb-nack-pli=(boolean)true")
    receiver, decoded = gst_decoding(
        f"rtpbin name=r latency=100 udpsrc port={gst_port} caps={caps} ! r.recv_rtp_sink_0 "
        "r. ! rtph264depay request-keyframe=true ! avdec_h264 ! fakesink silent=false "
        f"udpsrc port={gst_port + 1} ! r.recv_rtcp_sink_0 "
        f"r.send_rtcp_src_0 ! udpsink host=127.0.0.1 port={p['rtcp']} sync=false async=false")
    try:
        # The loss comes once the receiver is in its steady state, not at a fixed time after the test began (on a
        # loaded machine the receiver starts later): it decoded a picture (a receiver that joins mid-GOP asks for a
        # keyframe first: within MIN_INTERVAL of that keyframe its PLI for the loss would be served by it, 'recent'
        # in services/runtime/keyframes.py, and no IDR would follow the loss), and it sent a regular RTCP report
        # since (GStreamer holds a PLI back to its next regular report before its first one, and after an early
        # one: RFC 4585 3.5.2-3.5.3).
        assert decoded.wait(20), f"the receiver decoded no picture; {b.log()[-3000:]}"
        first_picture = time.monotonic()

        def reports() -> float:
            return metric_value(b.settled_scrape("rtp@call"), "edgeroom_rtp_feedback_received_total", call="call",
                                media="video", type="rr") or 0.0

        before = reports()
        wait_for(lambda: reports() > before, 20, "a receiver report after the receiver's first picture")
        time.sleep(max(0.0, first_picture + 2 * MIN_INTERVAL - time.monotonic()))
        armed.set()
        wait_for(lambda: relay.dropped, 15, "the relay's drop")
        lost_at = relay.dropped[0]
        with framebus.Consumer.attach("cam", prefix=b.prefix, start="oldest") as c:
            key = None
            deadline = time.monotonic() + 5
            while key is None and time.monotonic() < deadline:
                item = c.receive(timeout=0.1)
                if item is not None and item.keyframe and item.capture_ns > lost_at:
                    key = item.capture_ns
        assert key is not None, f"no IDR after the receiver's loss; {b.log()[-3000:]}"
        seconds = (key - lost_at) / 1e9
        assert seconds < 1.0, f"the IDR came {seconds:.2f} s after the loss; {b.log()[-3000:]}"
        print(f"loss at the receiver -> IDR on the bus: {seconds * 1000:.0f} ms")
        wait_for(lambda: metric_value(b.scrape(), "edgeroom_rtp_feedback_received_total", call="call",
                                      media="video", type="pli"), 5, "the receiver's PLI counted")
        wait_for(lambda: metric_value(b.scrape(), "edgeroom_keyframe_satisfied_total", stream="cam"), 5,
                 "the camera's keyframe request satisfied")
        never_restarted(b)
    finally:
        stop(receiver)
        relay.close()


def test_vp8_and_opus_round_trip_through_the_box(box, tmp_path):
    """GStreamer sends VP8 (numbered pictures) and Opus to the call; the call puts them on the bus (call,
    call-audio) and sends both back (send_video = call, send_audio = call-audio); a second GStreamer decodes
    what comes back: every picture from the first keyframe on, in order, and the tone."""
    import numpy as np

    clip = numbered_file(tmp_path / "clip.mp4", 75, fps=25, gop=10)
    video_port, audio_port = free_port_pair(), free_port_pair()
    peer = (f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=peer\nc=IN IP4 127.0.0.1\nt=0 0\n"
            f"m=video {video_port} RTP/AVP 97\na=rtpmap:97 VP8/90000\n"
            f"m=audio {audio_port} RTP/AVP 111\na=rtpmap:111 opus/48000/2\n")
    b = rtp_box(box, rtp_table("call", peer, send_video="call", send_audio="call-audio", decode=False))
    b.run()
    b.wait_ready("rtp@call")
    p = ports(b, "call")
    vout, aout = tmp_path / "vp8.gray", tmp_path / "opus.s16"
    receiver = gst(f"udpsrc port={video_port} caps=application/x-rtp,media=video,clock-rate=90000,"
                   f"encoding-name=VP8,payload=97 ! rtpjitterbuffer latency=100 ! rtpvp8depay ! vp8dec ! "
                   f"videoconvert ! video/x-raw,format=GRAY8 ! filesink location={vout} "
                   f"udpsrc port={audio_port} caps=application/x-rtp,media=audio,clock-rate=48000,"
                   f"encoding-name=OPUS,payload=111 ! rtpjitterbuffer latency=100 ! rtpopusdepay ! opusdec ! "
                   f"audio/x-raw,format=S16LE,channels=2 ! filesink location={aout}")
    sender = gst(f"filesrc location={clip} ! qtdemux ! h264parse ! avdec_h264 ! videoconvert ! "
                 f"vp8enc deadline=1 keyframe-max-dist=10 target-bitrate=800000 ! rtpvp8pay pt=97 mtu=1200 ! "
                 f"udpsink host=127.0.0.1 port={p['video']['rtp']} "
                 f"audiotestsrc is-live=true freq=440 volume=0.5 num-buffers=150 ! "
                 f"audio/x-raw,rate=48000,channels=2 ! opusenc ! rtpopuspay pt=111 ! "
                 f"udpsink host=127.0.0.1 port={p['audio']['rtp']}")
    try:
        with framebus.Consumer.attach("call-audio", prefix=b.prefix, missing_ok=True, start="oldest") as heard:
            wait_for(lambda: len(gray_numbers(vout)) >= 40, 20, "40 VP8 pictures back at the receiver")
            chunk = heard.receive(timeout=2)
            assert chunk is not None and chunk.kind == "audio" and chunk.rate == 48000 and chunk.channels == 2
        wait_for(lambda: aout.exists() and aout.stat().st_size > 48000 * 4, 5, "a second of Opus back")
        never_restarted(b)
    finally:
        err = stop(sender) + stop(receiver)
    numbers = gray_numbers(vout)
    assert consecutive(numbers) and len(numbers) >= 40, f"{numbers}\n{err}"
    pcm = np.fromfile(aout, np.int16).astype(np.float64)
    assert np.sqrt(np.mean(pcm[48000:] ** 2)) > 1000, "the tone came back silent"
    scrape = b.scrape()
    assert metric_value(scrape, "edgeroom_rtp_units_total", call="call", media="audio") > 40


# --- RTCP feedback, latching -----------------------------------------------------------------------------------
def rtp_packet(seq: int, ts: int, payload: bytes, *, marker: bool = True, ssrc: int = 0xABCD) -> bytes:
    return bytes([0x80, (0x80 if marker else 0) | 96]) + seq.to_bytes(2, "big") + ts.to_bytes(4, "big") + \
        ssrc.to_bytes(4, "big") + payload


def test_a_peer_that_ignores_pli_gets_fir(box):
    """A peer (a plain socket) whose packets show a loss and that never sends a keyframe: the call sends PLI to its
    RTCP port, and a second later, the keyframe still not there, PLI and FIR naming the peer's SSRC."""
    from aiortc.rtp import RtcpPsfbPacket

    from services.rtp import rtcp

    peer_rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_rtcp.bind(("127.0.0.1", 0))
    peer_rtcp.settimeout(0.2)
    rtcp_port = peer_rtcp.getsockname()[1]
    b = rtp_box(box, rtp_table("call", h264_sdp(rtcp_port - 1, extra=f"a=rtcp:{rtcp_port}\n"), decode=False))
    b.run()
    b.wait_ready("rtp@call")
    p = ports(b, "call")["video"]
    feedback = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        p_slice = bytes([0x41]) + b"\x9a" * 100
        for seq in (1, 2, 4):                                   # 3 never comes
            sender.sendto(rtp_packet(seq, seq * 3000, p_slice), ("127.0.0.1", p["rtp"]))
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and not any(f.fmt == 4 for f in feedback):
            try:
                data, _ = peer_rtcp.recvfrom(2048)
            except TimeoutError:
                continue
            feedback += [f for f in rtcp.parse(data) if isinstance(f, RtcpPsfbPacket)]
    peer_rtcp.close()
    kinds = [f.fmt for f in feedback]
    assert kinds[:1] == [1] and 4 in kinds, f"feedback {kinds}; {b.log()[-2000:]}"
    assert all(f.media_ssrc == 0xABCD for f in feedback if f.fmt == 1)
    assert rtcp.fir_targets(next(f for f in feedback if f.fmt == 4)) == [0xABCD]
    never_restarted(b)


def test_a_send_the_kernel_refuses_is_counted_and_the_call_goes_on(box):
    """The peer's address is one the kernel will not send to (the broadcast address, from a socket without
    SO_BROADCAST: EACCES, as a box without a route to the peer gets ENETUNREACH): the camera's packets and the
    RTCP reports are lost, counted as socket errors, and the call runs on in one process (the error's counter was
    given one label of two, so the first refused send crashed the call, once a second)."""
    b = rtp_box(box, rtp_table("call", h264_sdp(6000, host="255.255.255.255", direction="sendrecv"),
                               send_video="cam", decode=False), capture=True)
    b.set_source("cam", CAMERA.format(gop=1.0))
    b.run()
    b.wait_ready("rtp@call", "capture@cam")
    wait_for(lambda: (metric_value(b.scrape(), "edgeroom_rtp_socket_errors_total", call="call", media="video")
                      or 0) >= 30, 10, "the refused sends counted")
    time.sleep(1.5)                                       # the next RTCP report is refused too
    assert metric_value(b.scrape(), "edgeroom_rtp_packets_out_total", call="call", media="video") in (None, 0.0)
    never_restarted(b)


def test_latching_takes_the_first_address_that_sends_and_sends_there(box):
    """latch = true, and the SDP names an address nobody sends from: the first packet's address is taken, the
    camera's packets go there, and another address is dropped."""
    b = rtp_box(box, rtp_table("call", h264_sdp(6000, host="127.0.0.9", direction="sendrecv"), send_video="cam",
                               decode=False, latch=True), capture=True)
    b.set_source("cam", CAMERA.format(gop=1.0))
    b.run()
    b.wait_ready("rtp@call", "capture@cam")
    p = ports(b, "call")["video"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as nat, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        nat.settimeout(0.5)
        nat.sendto(rtp_packet(1, 0, bytes([0x41]) + b"\x11" * 20), ("127.0.0.1", p["rtp"]))
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 20 and time.monotonic() < deadline:
            try:
                got.append(nat.recv(2048))
            except TimeoutError:
                pass
        assert len(got) >= 20 and all(d[1] & 0x7F == 96 for d in got), f"{len(got)} packets at the latched address"
        other.sendto(rtp_packet(2, 3000, bytes([0x41]) + b"\x11" * 20), ("127.0.0.1", p["rtp"]))
        wait_for(lambda: dropped(b, "wrong_source") == 1, 5, "the second address's packet dropped")
    never_restarted(b)


def test_a_route_switch_reaches_the_peer_on_the_new_cameras_keyframe(box, tmp_path):
    """`route call video=cam2` during the call: GStreamer decodes cam's pictures in order, then cam2's from its
    keyframe on, in order: two unbroken runs of frame numbers, nothing smeared between them."""
    port = free_port_pair()
    out = tmp_path / "gst.gray"
    receiver = gst(f"udpsrc port={port} caps={h264_caps()} ! rtpjitterbuffer latency=100 ! rtph264depay ! "
                   f"avdec_h264 ! videoconvert ! video/x-raw,format=GRAY8 ! filesink location={out}")
    b = sending_box(box, 60.0, h264_sdp(port, mode=1, direction="recvonly"))
    b.set_source("cam2", CAMERA.format(gop=60.0).replace("fps = 30.0", "fps = 20.0"))   # its numbers fall behind
    b.run()
    b.wait_ready("rtp@call", "capture@cam", "capture@cam2")
    try:
        wait_for(lambda: len(gray_numbers(out)) >= 30, 15, "30 pictures of cam at the receiver")
        time.sleep(1.0)                                   # cam2 (20 fps) 20 or more numbers behind cam (30 fps)
        shown = b.call("route", {"session": "call", "video": "cam2"})
        assert shown["video"]["route"] == "cam2"
        before = len(gray_numbers(out))
        wait_for(lambda: len(gray_numbers(out)) >= before + 45, 15, "45 more pictures at the receiver")
        never_restarted(b)
    finally:
        err = stop(receiver)
    numbers = gray_numbers(out)
    cut = next((i for i in range(1, len(numbers)) if numbers[i] != numbers[i - 1] + 1), len(numbers))
    assert consecutive(numbers[:cut]) and consecutive(numbers[cut:]), f"{numbers}\n{err}"
    assert cut < len(numbers) and numbers[cut] < numbers[cut - 1] - 10, f"no switch to cam2 seen: {numbers}"
    assert len(numbers) - cut >= 30, f"{numbers}"
    assert b.call("route", {"session": "call"})["video"]["sending"] == "cam2"
