"""RouteReader against real rings of the bus (in one process; tests/test_calls.py runs a transport on
a real box): the keyframe gate, a switch that waits for the new stream's keyframe, audio that switches
at once, loss that closes the gate, the wrong kind refused, one fd for the loop."""
from __future__ import annotations

import json
import select

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import framebus
from services.calls.config import Route, RouteKeys, route_problem
from services.calls.route import RouteMetrics, RouteReader, check


def au(tag: str, n: int) -> bytes:
    return f"{tag}:{n}".encode()


class Asked(list):
    def __call__(self, stream: str, reason: str) -> None:
        self.append((stream, reason))


@pytest.fixture
def bus(prefix):
    made: list[framebus.Producer] = []

    def producer(stream: str, kind: str = "encoded", slots: int = 8) -> framebus.Producer:
        p = framebus.Producer.create(stream, kind, payload=4096, slots=slots, prefix=prefix)
        made.append(p)
        return p
    yield producer
    for p in made:
        p.close()


def reader(prefix: str, route: Route, **kw) -> tuple[RouteReader, Asked, CollectorRegistry]:
    asked, registry = Asked(), CollectorRegistry()
    r = RouteReader("call1", route, prefix=prefix, ask=asked, metrics=RouteMetrics(registry), **kw)
    return r, asked, registry


def drain(r: RouteReader) -> list[tuple[str, bytes, bool, bool]]:
    out = []
    while (m := r.poll()) is not None:
        out.append((m.stream, m.data, m.keyframe, m.switched))
    return out


def send(p: framebus.Producer, tag: str, n: int, key: bool = False) -> None:
    p.publish_encoded(au(tag, n), "h264", keyframe=key, capture_ns=n)


def test_nothing_is_handed_out_before_a_keyframe_and_a_switch_waits_for_the_new_streams_keyframe(prefix, bus):
    cam1, cam2 = bus("cam1"), bus("cam2")
    r, asked, reg = reader(prefix, Route(video="cam1"))
    try:
        assert asked == [("cam1", "route start")]
        send(cam1, "a", 0)                                   # a delta first: the peer could not decode it
        send(cam1, "a", 1, key=True)
        send(cam1, "a", 2)
        assert drain(r) == [("cam1", b"a:1", True, True), ("cam1", b"a:2", False, False)]
        assert r.status()["video"]["state"] == "sending" and r.status()["video"]["gated"] == 1
        r.set(video="cam2")
        assert asked[-1] == ("cam2", "route switch")
        send(cam2, "b", 0)                                   # cam2's delta: dropped, cam1 goes on
        send(cam1, "a", 3)
        assert drain(r) == [("cam1", b"a:3", False, False)]
        status = r.status()["video"]
        assert (status["route"], status["sending"], status["state"]) == ("cam2", "cam1", "switching")
        assert "until cam2's next keyframe" in status["note"]
        send(cam2, "b", 1, key=True)
        send(cam1, "a", 4)                                   # after the switch cam1 is let go
        send(cam2, "b", 2)
        assert drain(r) == [("cam2", b"b:1", True, True), ("cam2", b"b:2", False, False)]
        assert r.status()["video"] | {"note": ""} == {"route": "cam2", "sending": "cam2", "state": "sending",
                                                       "note": "", "items": 5, "gated": 2, "switches": 1}
        assert reg.get_sample_value("edgeroom_route_switches_total", {"session": "call1", "track": "video"}) == 1
        assert reg.get_sample_value("edgeroom_route_switch_seconds_count", {"track": "video"}) == 1
        assert reg.get_sample_value("edgeroom_route_items_total", {"session": "call1", "track": "video"}) == 5
    finally:
        r.close()


def test_a_route_to_a_stream_that_does_not_exist_yet_waits_for_it_and_the_old_one_goes_on(prefix, bus):
    cam1 = bus("cam1")
    r, asked, _ = reader(prefix, Route(video="cam1"))
    try:
        send(cam1, "a", 0, key=True)
        assert len(drain(r)) == 1
        r.set(video="later")
        assert r.status()["video"]["note"] == "sending cam1 until later exists"
        send(cam1, "a", 1)
        assert drain(r) == [("cam1", b"a:1", False, False)]
        later = bus("later")
        send(later, "c", 0)                                   # its first delta asks again at once
        assert drain(r) == []
        assert asked[-1] == ("later", "route switch") and len([a for a in asked if a[0] == "later"]) == 2
        send(later, "c", 1, key=True)
        assert drain(r) == [("later", b"c:1", True, True)]
    finally:
        r.close()


def test_a_route_with_no_producer_says_it_waits(prefix):
    r, _, _ = reader(prefix, Route(video="nobody", audio="nobody-audio"))
    try:
        assert r.poll() is None
        assert r.status()["video"]["note"] == "waiting for stream nobody (no producer yet)"
        assert r.tracks() == [
            {"id": "send-video", "kind": "video", "direction": "send", "stream": "nobody", "state": "waiting"},
            {"id": "send-audio", "kind": "audio", "direction": "send", "stream": "nobody-audio", "state": "waiting"}]
    finally:
        r.close()


def test_items_missed_on_the_bus_close_the_gate_and_ask_for_a_keyframe(prefix, bus):
    cam1 = bus("cam1", slots=4)
    r, asked, reg = reader(prefix, Route(video="cam1"))
    try:
        send(cam1, "a", 0, key=True)
        assert len(drain(r)) == 1
        for n in range(1, 11):                               # more than the ring holds: the reader misses some
            send(cam1, "a", n)
        assert drain(r) == []                                # what is left are deltas after a gap
        assert asked[-1] == ("cam1", "loss")
        assert reg.get_sample_value("edgeroom_route_dropped_items_total",
                                    {"session": "call1", "track": "video", "reason": "missed"}) > 0
        assert r.status()["video"]["state"] == "waiting"
        send(cam1, "a", 11, key=True)
        assert drain(r) == [("cam1", b"a:11", True, False)]
    finally:
        r.close()


def test_audio_switches_at_once_and_the_fd_says_when_there_is_news(prefix, bus):
    a1, a2 = bus("one-audio", "audio"), bus("two-audio", "audio")
    r, asked, _ = reader(prefix, Route(audio="one-audio"))
    pcm = np.zeros((960, 1), np.int16)
    try:
        assert select.select([r.fileno()], [], [], 0)[0] == []
        a1.publish_audio(pcm, 48000, capture_ns=1)
        assert select.select([r.fileno()], [], [], 1.0)[0] == [r.fileno()]
        m = r.poll()
        assert (m.track, m.stream, m.codec, m.rate, m.channels, m.samples, len(m.data)) == (
            "audio", "one-audio", "s16", 48000, 1, 960, 1920)
        assert r.poll() is None and select.select([r.fileno()], [], [], 0)[0] == []   # drained
        r.set(audio="two-audio")
        a2.publish_audio(pcm, 48000, capture_ns=2)
        a1.publish_audio(pcm, 48000, capture_ns=3)
        assert [(m.stream, m.switched) for m in iter(r.poll, None)] == [("two-audio", True)]
        assert asked == []                                   # audio has no keyframes to ask for
    finally:
        r.close()


def test_a_stream_of_the_wrong_kind_is_refused(prefix, bus):
    bus("cam1-audio", "audio")
    bus("raw", "video")
    with pytest.raises(ValueError, match=r"stream 'cam1-audio' carries audio: it cannot be sent as video"):
        check("video", "cam1-audio", prefix)
    with pytest.raises(ValueError, match=r"stream 'raw' carries raw pictures: it cannot be sent as video \(a video "
                                         r"route takes encoded video\)"):
        check("video", "raw", prefix)
    check("video", "raw", prefix, raw_video=True)
    with pytest.raises(ValueError, match="named as audio"):
        check("video", "ghost-audio", prefix)
    with pytest.raises(ValueError, match="bad stream name"):
        check("audio", "no/slash", prefix)
    r, _, reg = reader(prefix, Route(video="cam1"))
    try:
        with pytest.raises(ValueError, match="carries audio"):
            r.set(video="cam1-audio", audio="raw")
        assert r.route == Route(video="cam1")               # nothing changed: both are checked first
    finally:
        r.close()
    assert route_problem(RouteKeys(send_video="door-audio"))[0] == "send_video"


def test_an_item_of_the_wrong_codec_is_dropped_and_said(prefix, bus):
    vp8, cam1 = bus("vp8cam"), bus("cam1")
    r, _, reg = reader(prefix, Route(video="vp8cam"), video_codecs=("h264",))
    try:
        vp8.publish_encoded(b"x", "vp8", keyframe=True)
        assert r.poll() is None
        assert r.status()["video"] == {"route": "vp8cam", "sending": "", "state": "refused", "note": "vp8cam "
                                       "carries vp8; this transport sends h264", "items": 0, "gated": 0, "switches": 0}
        assert reg.get_sample_value("edgeroom_route_dropped_items_total",
                                    {"session": "call1", "track": "video", "reason": "wrong_codec"}) == 1
        r.set(video="cam1")                                  # nothing flowed: straight to cam1
        send(cam1, "a", 0, key=True)
        assert drain(r) == [("cam1", b"a:0", True, True)]
        r.set(video="vp8cam")                                # a switch that cannot happen: cam1 goes on
        vp8.publish_encoded(b"y", "vp8", keyframe=True)
        send(cam1, "a", 1)
        assert drain(r) == [("cam1", b"a:1", False, False)]
        assert (r.status()["video"]["state"], r.status()["video"]["note"]) == (
            "switching", "sending cam1; cannot switch: vp8cam carries vp8; this transport sends h264")
    finally:
        r.close()


class FakeService:
    """What RouteBook uses of a Service: its config, registry, offers, keyframe requests and logs."""

    def __init__(self, rundir, prefix: str) -> None:
        import logging

        from services.runtime import config as configuration
        from services.runtime.logs import Throttled
        self.id, self.config = "sendtest@a", configuration.loads(
            f'[box]\nruntime_dir = "{rundir}"\n[bus]\nprefix = "{prefix}"', env={})
        self.registry, self.offers, self.asked = CollectorRegistry(), {}, Asked()
        self.log = logging.getLogger("test")
        self.throttled = Throttled(self.log)

    def offer(self, name, handler, summary, **kw) -> None:
        self.offers[name] = handler

    def request_keyframe(self, stream: str, reason: str) -> None:
        self.asked(stream, reason)


def test_a_route_that_cannot_be_kept_is_undone_and_the_command_says_why(prefix, bus, tmp_path, monkeypatch):
    from services.calls.book import RouteBook
    from services.control.protocol import ProtocolError
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    bus("cam1"), bus("cam2")
    service = FakeService(tmp_path, prefix)
    book = RouteBook(service)
    r = book.reader("a", Route(video="cam1"))
    try:
        route = service.offers["session.route"]
        assert route({"session": "a", "video": "cam2"})["video"]["origin"] == "command"
        assert json.loads((tmp_path / "routes.json").read_text())["added"] == {"a": {"video": "cam2"}}
        (tmp_path / "routes.json").unlink()
        (tmp_path / "routes.json").mkdir()                   # the file cannot be replaced now
        with pytest.raises(ProtocolError) as info:
            route({"session": "a", "video": "cam1"})
        assert info.value.code == "unavailable" and "cannot keep the route in" in info.value.message
        assert r.route == Route(video="cam2")                # undone: what is in effect is what was kept
        with pytest.raises(ProtocolError) as info:
            route({"session": "b"})
        assert (info.value.code, info.value.message) == ("not_found", "sendtest@a has no session 'b' (its sessions: a)")
    finally:
        r.close()
