"""The bridge's media against the real bus and real codecs: services/bridge/transcode.py's Transcoder and
services/bridge/grid.py's Grid.

Sources are written the way capture writes them (services/capture/sink.py's Sink, access units of PyAV's
libx264 / libvpx with the encode service's settings) onto rings under a private prefix; the transcoder and the
grid are driven the way the service's loop drives them (pump() while fileno() polls readable, tick() on a
clock); what they write is read off the bus and decoded with PyAV. Pictures carry their frame number
(services.capture.sources.synthetic's blocks), or a solid colour, so the checks are on what came out, not
just how much.
"""
from __future__ import annotations

import logging
import select
import time
from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import framebus
from services.bridge.grid import Grid, fit, layout
from services.bridge.transcode import Transcoder
from services.capture.sink import Sink, SinkMetrics
from services.capture.sources.synthetic import Pattern, frame_number
from services.decode.decoder import nal_spans
from services.encode.encoder import Encoder

W, H = 320, 240
FRAME_NS = 33_333_333
log = logging.getLogger("test.bridge")


def _sink_metrics() -> SinkMetrics:
    nothing = SimpleNamespace(inc=lambda n=1: None, observe=lambda v: None)
    return SinkMetrics(frames=nothing, bytes=nothing, keyframes=nothing, latency=nothing,
                       dropped=SimpleNamespace(labels=lambda reason: nothing), audio_chunks=nothing, rebases=nothing)


def _corrupt(au: bytes) -> bytes:
    """Damage in the middle of the slice data (as tests/test_decoder.py does)."""
    b = bytearray(au)
    third = len(b) // 3
    for j in range(third, third + 20):
        b[j] ^= 0x5A
    return bytes(b)


class Camera:
    """An encoded source on the bus, as capture puts it there: numbered pictures (or a solid colour)."""

    def __init__(self, prefix: str, stream: str, codec: str = "h264", size: tuple[int, int] = (W, H),
                 colour: tuple[int, int, int] | None = None) -> None:
        self.prefix, self.stream, self.codec, self.colour = prefix, stream, codec, colour
        self.sink = Sink(stream, prefix, _sink_metrics())
        self.t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self.n = 0
        self.sent: list[int] = []          # capture_ns of each access unit
        self._open(*size)

    def _open(self, w: int, h: int) -> None:
        self.size = (w, h)
        name = "libx264" if self.codec == "h264" else "libvpx"
        self.enc = Encoder(name, self.codec, w, h, "yuv420p", kbps=1500, fps=30.0, gop=10.0, hardware=False)
        self.pattern = Pattern(w, h)
        self.rgb = np.empty((h, w, 3), np.uint8)
        self.fresh = True

    def send(self, *, keyframe: bool = False, corrupt: bool = False, size: tuple[int, int] | None = None) -> int:
        if size is not None and size != self.size:
            self._open(*size)
        if self.colour is not None:
            self.rgb[:] = self.colour
        else:
            self.pattern.draw(self.rgb, self.n)
        frame = av.VideoFrame.from_ndarray(self.rgb, format="rgb24").reformat(format="yuv420p")
        packets = self.enc.encode(frame, self.n * 3000, keyframe or self.fresh)
        self.fresh = False
        capture_ns = self.t0 + self.n * FRAME_NS
        for p in packets:
            data = bytes(p)
            self.sink.encoded(_corrupt(data) if corrupt else data, self.codec, keyframe=bool(p.is_keyframe),
                              pts=self.n, time_base=Fraction(1, 30), capture_ns=capture_ns, width=self.size[0],
                              height=self.size[1])
        self.sent.append(capture_ns)
        self.n += 1
        return capture_ns

    def close(self) -> None:
        self.sink.close()


class Out:
    """Everything written on a stream, read off the bus."""

    def __init__(self, prefix: str, stream: str) -> None:
        self.consumer = framebus.Consumer.attach(stream, prefix=prefix, missing_ok=True, start="oldest")
        self.items: list[SimpleNamespace] = []

    def read(self) -> list[SimpleNamespace]:
        while (item := self.consumer.poll()) is not None:
            self.items.append(SimpleNamespace(data=item.array.tobytes(), key=item.keyframe, codec=item.codec,
                                              capture_ns=item.capture_ns, pts=item.pts, width=item.width,
                                              height=item.height, flags=item.flags))
        return self.items

    def close(self) -> None:
        self.consumer.close()


def decode(items: list[SimpleNamespace], codec: str) -> list[av.VideoFrame]:
    dec = av.CodecContext.create(codec, "r")
    frames = []
    for it in items:
        frames += dec.decode(av.Packet(it.data))
    return frames + dec.decode(None)


def numbers(frames: list[av.VideoFrame]) -> list[int]:
    return [frame_number(f.to_ndarray(format="gray")) for f in frames]


def drain(media, timeout: float = 0.5) -> None:
    """What the service loop does: pump() while fileno() polls readable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([media.fileno()], [], [], 0.02)
        if not ready:
            return
        media.pump()


@pytest.fixture
def asks():
    return []


def _transcoder(prefix: str, asks: list, source: str, out: str, codec: str, registry: CollectorRegistry | None = None,
                **kw) -> Transcoder:
    return Transcoder(source, out, codec, prefix=prefix, registry=registry or CollectorRegistry(), log=log,
                      ask_keyframe=lambda s, r: asks.append((s, r)), **kw)


def test_h264_to_vp8_pictures_timing_first_keyframe_and_keyframe_on_request(prefix, asks):
    """The transcoder comes before its source (it attaches when the ring appears); every picture comes out, in
    order, as VP8, with its access unit's capture_ns and pts; the first is a key frame, and keyframe() makes the
    next one a key frame (and only then)."""
    registry = CollectorRegistry()
    t = _transcoder(prefix, asks, "cam", "cam-vp8", "vp8", registry, kbps=1200)
    out = Out(prefix, "cam-vp8")
    cam = Camera(prefix, "cam")
    try:
        assert t.status()["state"] == "waiting for the stream"
        for _ in range(20):
            cam.send()
            drain(t)
        answer = t.keyframe("test")
        assert answer["made"] and answer["how"] == "keyframe" and not answer["throttled"]
        assert t.keyframe("again")["throttled"]          # one pending: served by the same key frame
        for _ in range(10):
            cam.send()
            drain(t)
        items = out.read()
        assert len(items) == 30 and all(it.codec == "vp8" for it in items)
        assert [i for i, it in enumerate(items) if it.key] == [0, 20]
        assert all((it.data[0] & 1) == (0 if it.key else 1) for it in items)  # VP8's own key-frame bit
        assert [it.capture_ns for it in items] == cam.sent                     # A/V timing carried through
        assert [it.pts for it in items] == list(range(30))
        assert {(it.width, it.height) for it in items} == {(W, H)}
        assert numbers(decode(items, "vp8")) == list(range(30))
        st = t.status()
        assert st["source"] == "cam" and st["out"] == "cam-vp8" and st["codec"] == "vp8"
        assert st["state"] == "running" and st["source_codec"] == "h264" and st["encoder"] == "libvpx"
        assert (st["frames_in"], st["frames_out"], st["keyframes_out"], st["decode_errors"]) == (30, 30, 2, 0)
        assert st["size"] == f"{W}x{H}" and st["kbps"] > 0 and not st["keyframe_pending"]
        def sample(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(f"edgeroom_bridge_transcode_{name}", {"stream": "cam-vp8", **labels})
        assert sample("frames_in_total") == sample("frames_out_total") == 30
        assert sample("keyframes_total") == 2 and sample("decode_errors_total") == 0
        assert sample("hardware", backend="libvpx") == 0 and sample("encode_seconds_count") == 30
    finally:
        t.close()
        out.close()
        cam.close()


def test_vp8_to_h264_parameter_sets_before_every_idr(prefix, asks):
    """The other way: VP8 in, H.264 out, an IDR with SPS and PPS in front at the start and on request, the
    ring's extradata holding them (for a late reader, an SDP)."""
    cam = Camera(prefix, "web", codec="vp8")
    cam.send()                  # sent before the transcoder came: start="next" skips it...
    t = _transcoder(prefix, asks, "web", "web-h264", "h264")
    out = Out(prefix, "web-h264")
    try:
        for i in range(12):
            cam.send(keyframe=i == 0)   # ...and waits for the next key frame
            drain(t)
        assert t.keyframe("pli")["how"] == "idr"
        for _ in range(3):
            cam.send()
            drain(t)
        items = out.read()
        assert [i for i, it in enumerate(items) if it.key] == [0, 12]
        for it in items:
            types = [it.data[s] & 0x1F for s, _ in nal_spans(it.data)]
            assert (types[:2] == [7, 8] and 5 in types) if it.key else (5 not in types and 7 not in types)
        assert numbers(decode(items, "h264")) == list(range(1, 16))
        codec, extra = out.consumer.extradata() or ("", b"")
        assert codec == "h264" and [extra[s] & 0x1F for s, _ in nal_spans(extra)] == [7, 8]
        assert t.status()["encoder"] == "libx264"
    finally:
        t.close()
        out.close()
        cam.close()


def test_a_corrupt_access_unit_is_counted_the_picture_freezes_and_a_keyframe_is_asked_for(prefix, asks):
    cam = Camera(prefix, "cam")
    t = _transcoder(prefix, asks, "cam", "cam-vp8", "vp8")
    out = Out(prefix, "cam-vp8")
    try:
        for i in range(30):
            cam.send(keyframe=i == 20, corrupt=i == 10)
            drain(t)
        items = out.read()
        got = numbers(decode(items, "vp8"))
        assert got == list(range(10)) + list(range(20, 30))   # frozen from the damage to the next keyframe
        st = t.status()
        assert st["decode_errors"] >= 1 and st["dropped"].get("corrupt", 0) >= 1
        assert st["dropped"].get("corrupt", 0) + st["dropped"].get("waiting_keyframe", 0) == 10
        assert asks and all(s == "cam" for s, _ in asks)
        assert len(asks) <= 2                                  # throttled: once a second
        assert st["frames_out"] == 20 and st["state"] == "running"
        # the output goes on as it was: the peer's references are the transcoder's own pictures, never broken
        assert [i for i, it in enumerate(items) if it.key] == [0]
        assert items[10].capture_ns == cam.sent[20]
    finally:
        t.close()
        out.close()
        cam.close()


def test_a_size_change_reopens_the_encoder_its_first_output_a_keyframe(prefix, asks):
    cam = Camera(prefix, "cam")
    t = _transcoder(prefix, asks, "cam", "cam-vp8", "vp8")
    out = Out(prefix, "cam-vp8")
    try:
        for _ in range(8):
            cam.send()
            drain(t)
        for _ in range(8):
            cam.send(size=(480, 272))   # a new encoder at the source: an IDR with new parameter sets
            drain(t)
        items = out.read()
        assert [(it.width, it.height) for it in items] == [(W, H)] * 8 + [(480, 272)] * 8
        assert [i for i, it in enumerate(items) if it.key] == [0, 8]
        frames = decode(items, "vp8")
        assert [(f.width, f.height) for f in frames] == [(W, H)] * 8 + [(480, 272)] * 8
        assert numbers(frames) == list(range(16))
        st = t.status()
        assert st["size"] == "480x272" and st["reopens"] == 2 and st["decode_errors"] == 0
    finally:
        t.close()
        out.close()
        cam.close()


def test_a_backlog_is_worked_off_in_bounded_turns_and_one_too_long_is_jumped(prefix, asks):
    """pump() does a bounded batch and keeps fileno() readable while more waits; a reader more than MAX_LAG
    items behind jumps to the newest (counted late), asks for a keyframe and goes on from it."""
    cam = Camera(prefix, "cam")
    t = _transcoder(prefix, asks, "cam", "cam-vp8", "vp8")
    out = Out(prefix, "cam-vp8")
    pumps = 0
    try:
        for _ in range(25):             # more than a batch (16), less than MAX_LAG (30)
            cam.send()
        while select.select([t.fileno()], [], [], 0.05)[0]:
            t.pump()
            pumps += 1
        assert pumps >= 2 and len(out.read()) == 25
        for _ in range(40):             # a stall: more than MAX_LAG behind
            cam.send()
        drain(t)
        assert t.status()["dropped"]["late"] >= 30 and asks and asks[-1][0] == "cam"
        assert len(out.read()) == 25    # the newest was a delta: nothing until the keyframe
        for i in range(3):
            cam.send(keyframe=i == 0)
            drain(t)
        items = out.read()
        assert numbers(decode(items, "vp8")) == list(range(25)) + [65, 66, 67]
        assert t.status()["state"] == "running"
    finally:
        t.close()
        out.close()
        cam.close()


def test_layout_and_fit():
    assert layout(1, 640, 360) == [(0, 0, 640, 360)]
    assert layout(2, 640, 360) == [(0, 0, 320, 360), (320, 0, 320, 360)]
    assert layout(2, 360, 640) == [(0, 0, 360, 320), (0, 320, 360, 320)]
    assert layout(3, 640, 360) == [(0, 0, 320, 180), (320, 0, 320, 180), (0, 180, 320, 180)]
    nine = layout(12, 640, 360)
    assert len(nine) == 9 and all(r[2:] == (212, 120) for r in nine) and nine[0][:2] == (2, 0)
    assert fit(1280, 720, 320, 180) == (0, 0, 320, 180)
    assert fit(320, 240, 320, 360) == (0, 60, 320, 240)      # letterboxed, aspect ratio kept


def _rgb_at(frame: av.VideoFrame, x: int, y: int) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")[y - 4: y + 4, x - 4: x + 4].reshape(-1, 3).mean(axis=0)


def test_grid_two_sources_in_their_tiles_dark_until_a_picture_kept_when_one_stops(prefix, asks):
    red = Camera(prefix, "red", colour=(220, 30, 30))
    blue = Camera(prefix, "blue", codec="vp8", colour=(30, 30, 220))
    g = Grid("grid", "h264", prefix=prefix, registry=CollectorRegistry(), log=log,
             ask_keyframe=lambda s, r: asks.append((s, r)), width=640, height=360, fps=15.0)
    out = Out(prefix, "grid")
    try:
        g.set_sources(["red", "blue"])
        g.tick()                                   # nothing yet: a dark picture, on the clock
        first = decode(out.read(), "h264")
        assert len(first) == 1 and _rgb_at(first[0], 160, 180).max() < 40
        for _ in range(3):
            red.send()
            blue.send()
            drain(g)
            g.tick()
        items = out.read()
        assert items[0].key and (items[0].width, items[0].height) == (640, 360)
        last = decode(items, "h264")[-1]
        assert (last.width, last.height) == (640, 360)
        r, b = _rgb_at(last, 160, 180), _rgb_at(last, 480, 180)    # the tiles' centres
        assert r[0] > 180 and r[2] < 80, r
        assert b[2] > 180 and b[0] < 80, b
        assert _rgb_at(last, 160, 20).max() < 40                   # 320x240 in a 320x360 tile: dark bars
        st = g.status()
        assert st["layout"] == "2x1" and [s["stream"] for s in st["sources"]] == ["red", "blue"]
        assert [s["codec"] for s in st["sources"]] == ["h264", "vp8"]
        assert st["ticks"] == 4 and st["frames_out"] == 4 and st["decode_errors"] == 0
        red.close()                                # a source that stops keeps its last picture
        drain(g)
        blue.send()
        drain(g)
        g.tick()
        assert g.keyframe("pli")["how"] == "idr"
        g.tick()
        items = out.read()
        assert items[-1].key and not items[-2].key
        last = decode(items, "h264")[-1]
        assert _rgb_at(last, 160, 180)[0] > 180 and _rgb_at(last, 480, 180)[2] > 180
        assert g.status()["sources"][0]["state"] == "closed, waiting for it to return"
        g.set_sources(["blue"])                    # one left: 1x1, the whole picture blue
        g.tick()
        last = decode(out.read(), "h264")[-1]
        assert _rgb_at(last, 320, 180)[2] > 180 and _rgb_at(last, 100, 180)[2] > 180
        assert g.status()["layout"] == "1x1"
    finally:
        g.close()
        out.close()
        blue.close()
        red.close()
