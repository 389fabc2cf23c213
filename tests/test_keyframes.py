"""Keyframe requests end to end: any reader asks the hub, the hub routes the request to the
stream's producer, a producer with an encoder forces an IDR (throttled, repeated until it
comes, counted), a file says when its next is due, and decode asks after a loss."""
from __future__ import annotations

import os
import signal
import time

import pytest

import framebus
from services.control.client import CommandFailed
from services.runtime.keyframes import KeyframeRequests
from tests.appliance import metric_value, wait_for
from tests.media_files import numbered_file

# a camera whose own keyframes are 60 s apart: every keyframe within the test came from a request
LONG_GOP = """
kind = "synthetic"
width = 320
height = 240
fps = 30.0
room = "lobby"
encode = "h264"
gop = 60.0
history_seconds = 2.0
"""  # the ring's least history (64 slots, 2.1 s at 30 fps): a reader stopped 3 s loses items


class FakeTimers:
    def __init__(self) -> None:
        self.now = 0.0
        self.due: list[tuple[float, object]] = []

    def call_later(self, delay: float, callback) -> None:
        self.due.append((self.now + delay, callback))

    def advance(self, seconds: float) -> None:
        """Time moves to each due timer in turn, as a loop would run them."""
        until = self.now + seconds
        while (ready := sorted((d for d in self.due if d[0] <= until), key=lambda d: d[0])):
            when, callback = ready[0]
            self.due.remove(ready[0])
            self.now = when
            callback()
        self.now = until


def _requests(**kw):
    from prometheus_client import CollectorRegistry
    timers, made = FakeTimers(), []
    reg = CollectorRegistry()
    r = KeyframeRequests(reg, timers, lambda s: made.append((timers.now, s)) or "idr", clock=lambda: timers.now, **kw)
    return r, timers, made, reg


def test_requests_are_throttled_repeated_until_a_keyframe_and_counted():
    r, timers, made, reg = _requests()
    assert r.request("cam", "loss")["how"] == "idr"
    assert r.request("cam", "join") == {"made": True, "how": "pending", "throttled": True, "waiting": 0.0}
    timers.advance(0.6)
    assert r.request("cam", "join")["throttled"] is False      # 0.5 s on: made again
    assert [t for t, _ in made] == [0.0, 0.6]
    timers.advance(1.5)                                         # no keyframe yet: repeated by itself
    assert [t for t, _ in made] == [0.0, 0.6, 2.0]              # a second after the last one it made
    r.keyframe("cam")
    timers.advance(5.0)
    assert len(made) == 3                                       # satisfied: nothing more
    assert reg.get_sample_value("edgeroom_keyframe_satisfied_total", {"stream": "cam"}) == 1.0
    assert reg.get_sample_value("edgeroom_keyframe_requests_total", {"stream": "cam", "outcome": "throttled"}) == 1.0
    assert reg.get_sample_value("edgeroom_keyframe_seconds_sum", {"stream": "cam"}) == pytest.approx(2.1)


def test_a_request_nobody_answers_is_given_up_after_max_tries():
    r, timers, made, reg = _requests(max_tries=3)
    r.request("cam")
    timers.advance(10.0)
    assert len(made) == 3 and "cam" not in r.pending
    assert reg.get_sample_value("edgeroom_keyframe_requests_total", {"stream": "cam", "outcome": "given_up"}) == 1.0


def _keyframes_after(b, stream: str, since_ns: int, timeout: float) -> list[int]:
    """capture_ns of the keyframes of `stream` put on the bus after since_ns (read from the ring's history)."""
    deadline, found = time.monotonic() + timeout, []
    with framebus.Consumer.attach(stream, prefix=b.prefix, start="oldest") as c:
        while time.monotonic() < deadline and not found:
            item = c.receive(timeout=0.1)
            while item is not None:
                if item.keyframe and item.capture_ns > since_ns:
                    found.append(item.capture_ns)
                item = c.receive(timeout=0)
    return found


def test_an_encoder_in_the_source_answers_a_request_with_an_idr_within_a_few_frames(box):
    b = box()
    b.set_source("cam", LONG_GOP)
    b.run()
    b.wait_ready("capture@cam", "decode@cam")
    wait_for(lambda: any(s["stream"] == "cam" and s["items"] > 10 for s in b.call("streams")), 10, "cam flowing")
    asked = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    answer = b.call("keyframe", {"stream": "cam", "reason": "a test"})
    assert answer["made"] is True and answer["how"] == "idr" and answer["throttled"] is False
    again = b.call("keyframe", {"stream": "cam"})
    assert again["throttled"] is True                          # within 0.5 s: the same keyframe serves both
    keys = _keyframes_after(b, "cam", asked, 3.0)
    assert keys, "no keyframe came after the request"
    assert (keys[0] - asked) / 1e9 < 0.25, f"the IDR came {(keys[0] - asked) / 1e9:.3f} s after the request"
    def satisfied() -> str | None:
        text = b.scrape()
        return text if metric_value(text, "edgeroom_keyframe_satisfied_total", stream="cam") else None

    scrape = wait_for(satisfied, 5, "the request counted as satisfied")
    assert metric_value(scrape, "edgeroom_keyframe_requests_total", stream="cam", outcome="sent") == 1.0
    assert metric_value(scrape, "edgeroom_keyframe_requests_total", stream="cam", outcome="throttled") == 1.0
    assert metric_value(scrape, "edgeroom_hub_keyframe_requests_total", stream="cam") == 2.0


def test_decode_asks_for_a_keyframe_after_a_loss_and_pictures_come_back_at_once(box):
    """decode@cam stopped (SIGSTOP) longer than the encoded ring holds misses access units; on waking it
    closes its keyframe gate and asks for a keyframe: pictures on cam-raw return within a second, where
    the camera's own next keyframe is a minute away."""
    b = box()
    b.set_source("cam", LONG_GOP)
    b.run()
    rows = b.wait_ready("capture@cam", "decode@cam")
    wait_for(lambda: any(s["stream"] == "cam-raw" and s["items"] > 10 for s in b.call("streams")), 10,
             "cam-raw flowing")
    decode = rows["decode@cam"]["pid"]
    os.kill(decode, signal.SIGSTOP)
    time.sleep(3.0)                      # 64 slots at 30 fps is 2.1 s: the ring wraps past what decode read
    woke = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    os.kill(decode, signal.SIGCONT)
    with framebus.Consumer.attach("cam-raw", prefix=b.prefix, start="next") as c:
        deadline, picture = time.monotonic() + 5.0, None
        while time.monotonic() < deadline and picture is None:
            item = c.receive(timeout=0.1)
            if item is not None and item.capture_ns > woke:
                picture = item
    assert picture is not None, f"no picture after the loss within 5 s (camera GOP 60 s); log:\n{b.log()[-3000:]}"
    assert (picture.capture_ns - woke) / 1e9 < 1.0
    scrape = b.settled_scrape("decode@cam")  # decode counted the loss just now: after its last heartbeat, maybe
    assert metric_value(scrape, "edgeroom_decode_dropped_frames_total", stream="cam", reason="missed")
    assert metric_value(scrape, "edgeroom_hub_keyframe_requests_total", stream="cam") >= 1.0


def test_a_file_cannot_make_a_keyframe_and_says_when_its_next_is_due(box, tmp_path):
    clip = numbered_file(tmp_path / "clip.mp4", 120, fps=30, gop=30)
    b = box()
    b.set_source("cam", f'kind = "file"\npath = "{clip}"\nloop = true\nroom = "lobby"')
    b.run()
    b.wait_ready("capture@cam", "decode@cam")
    time.sleep(2.5)                      # two keyframes seen: the gap is known
    answer = b.call("keyframe", {"stream": "cam"})
    assert answer["made"] is False and "file source passes on the keyframes it gets" in answer["reason"]
    assert 0.0 <= answer["next_keyframe_in"] <= 1.05
    with pytest.raises(CommandFailed) as info:
        b.call("keyframe", {"stream": "nope"})
    assert info.value.code == "not_found"


def test_a_request_just_after_a_keyframe_was_made_for_another_is_served_by_it():
    """The encoder answers within a frame: a second reader's request that comes after the IDR went out, but within
    min_interval, costs no second IDR (the answer does not depend on which came first)."""
    r, timers, made, reg = _requests()
    assert r.request("cam", "loss")["how"] == "idr"
    r.keyframe("cam")                                            # the IDR is on the bus before the next request
    timers.advance(0.1)
    assert r.request("cam", "join") == {"made": True, "how": "recent", "throttled": True, "waiting": 0.0}
    assert len(made) == 1 and "cam" not in r.pending
    timers.advance(0.5)
    assert r.request("cam", "join")["how"] == "idr", "past min_interval a request makes one again"
    assert reg.get_sample_value("edgeroom_keyframe_requests_total", {"stream": "cam", "outcome": "throttled"}) == 1.0
