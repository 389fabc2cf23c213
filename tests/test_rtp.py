"""The RTP endpoint against real peers on loopback: ffmpeg and GStreamer send to the box and take what it
sends; every picture is checked by the frame number drawn in it (tests/media_files.py)."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import framebus
from tests.appliance import metric_value, wait_for
from tests.media_files import numbered_file, picture_number

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
    """An even UDP port whose next one is free too (for a peer that listens on RTP and RTCP)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port % 2 or port > 65000:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free UDP port pair")


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


def test_ffmpeg_sends_h264_and_every_picture_is_decoded_in_order(box, clip):
    b = rtp_box(box, rtp_table("call", h264_sdp(mode=1)))
    b.run()
    b.wait_ready("rtp@call", "decode@call")
    port = ports(b, "call")["video"]["rtp"]
    with framebus.Consumer.attach("call-raw", prefix=b.prefix, missing_ok=True, start="oldest") as c:
        sender = ffmpeg_send(clip, port)
        numbers = read_pictures(b, "call-raw", 60, 15, c)
        err = stop(sender)
    assert numbers == list(range(60)), f"{numbers}\nffmpeg: {err}\n{b.log()[-3000:]}"
    wait_for(lambda: metric_value(b.scrape(), "edgeroom_rtp_frames_total", call="call") == 60, 5,
             "60 access units counted")
    sessions = {s["session"]: s for s in b.call("sessions")}
    assert sessions["call"]["kind"] == "call" and sessions["call"]["room"] == "lobby"
