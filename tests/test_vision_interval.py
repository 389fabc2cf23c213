"""IntervalCaller: the newest picture every interval, never two calls at once per stream.

The overlap proofs run against the real openai client and a real HTTP server on loopback
that is slower than the interval and counts concurrent requests per stream; the rest use
the offline mock provider (a real provider, just without a network).
"""
from __future__ import annotations

import re
import threading
import time

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.vision.interval import IntervalCaller
from services.vision.providers import ProviderError, open_provider
from services.vision.providers.mock import MockProvider
from tests.fake_ai_servers import FakeAIServer, Reply


def _jpeg(level: int) -> bytes:
    img = np.full((48, 64, 3), level, np.uint8)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


class Camera:
    """A frame getter whose picture gets brighter at each call (so results show which frame they saw)."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            self.calls += 1
            return _jpeg(min(250, 10 + 10 * self.calls))


class Sink:
    def __init__(self):
        self.results: dict[str, list] = {}
        self.errors: dict[str, list] = {}
        self.lock = threading.Lock()
        self.event = threading.Event()

    def on_result(self, stream, seq, result):
        with self.lock:
            self.results.setdefault(stream, []).append((seq, result))
        self.event.set()

    def on_error(self, stream, seq, exc):
        with self.lock:
            self.errors.setdefault(stream, []).append((seq, exc))
        self.event.set()


@pytest.fixture
def server():
    srv = FakeAIServer("openai")
    yield srv
    srv.close()


@pytest.fixture
def registry():
    return CollectorRegistry()


def _mean(result) -> float:
    return float(re.search(r"mean ([\d.]+)", result.description).group(1))


def test_no_overlap_when_the_api_is_slower_than_the_interval(server, registry):
    server.default = Reply(delay=0.45)
    provider = open_provider("openai", model="m", base_url=server.base_url, timeout=5.0)
    sink, cam = Sink(), Camera()
    caller = IntervalCaller(provider, on_result=sink.on_result, on_error=sink.on_error, workers=4,
                            registry=registry)
    caller.add("a", cam, interval=0.1, prompt="describe stream=a")
    time.sleep(2.2)
    caller.remove("a")
    stats = caller.stats("a")
    caller.close()
    provider.close()
    assert server.max_concurrent("a") == 1
    assert stats.skipped > 5, stats                 # ~20 ticks, ~4 calls
    assert 2 <= stats.calls <= 6, stats
    assert registry.get_sample_value("edgeroom_vision_interval_skipped_total",
                                     {"stream": "a", "reason": "in_flight"}) == stats.skipped
    assert cam.calls == stats.calls                 # the picture is fetched when a call starts, once
    seqs = [seq for seq, _ in sink.results["a"]]
    assert seqs == list(range(1, len(seqs) + 1))    # delivered in call order
    means = [_mean(r) for _, r in sink.results["a"]]
    assert means == sorted(means) and len(set(means)) == len(means)   # each call saw a newer picture
    reqs = server.requests_for("a")
    for earlier, later in zip(reqs, reqs[1:]):
        assert later.t_start >= earlier.t_end - 0.01  # the server never saw them overlap
    assert not sink.errors


def test_two_streams_run_concurrently(server, registry):
    server.default = Reply(delay=0.5)
    provider = open_provider("openai", model="m", base_url=server.base_url, timeout=5.0)
    sink = Sink()
    caller = IntervalCaller(provider, on_result=sink.on_result, on_error=sink.on_error, workers=2,
                            registry=registry)
    caller.add("a", Camera(), interval=0.1, prompt="describe stream=a")
    caller.add("b", Camera(), interval=0.1, prompt="describe stream=b")
    time.sleep(1.8)
    caller.close()
    provider.close()
    assert server.max_concurrent("a") == 1 and server.max_concurrent("b") == 1
    a, b = server.requests_for("a"), server.requests_for("b")
    assert len(a) >= 2 and len(b) >= 2
    overlapping = any(x.t_start < y.t_end and y.t_start < x.t_end for x in a for y in b)
    assert overlapping, "streams a and b never had calls in flight at the same time"


def test_close_is_prompt_with_a_hung_call_and_drops_its_result(server, registry):
    server.default = Reply(delay=30)
    provider = open_provider("openai", model="m", base_url=server.base_url, timeout=30.0)
    sink = Sink()
    caller = IntervalCaller(provider, on_result=sink.on_result, on_error=sink.on_error, registry=registry)
    caller.add("a", Camera(), interval=0.1, prompt="stream=a")
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.requests, "the call never reached the server"
    t0 = time.monotonic()
    caller.close(join_timeout=0.3)
    assert time.monotonic() - t0 < 1.0
    server.close()                                  # the hung call now fails (connection closed)...
    provider.close()
    time.sleep(0.5)
    assert not sink.results and not sink.errors     # ...and nothing is delivered after close()


def test_errors_are_delivered_and_the_stream_keeps_going(server, registry):
    server.default = Reply(status=401)
    provider = open_provider("openai", model="m", base_url=server.base_url, timeout=2.0)
    sink = Sink()
    with IntervalCaller(provider, on_result=sink.on_result, on_error=sink.on_error, registry=registry) as caller:
        caller.add("a", Camera(), interval=0.1, prompt="stream=a")
        end = time.monotonic() + 10  # at least 3 failed calls, however loaded the machine
        while len(sink.errors.get("a", [])) < 3 and time.monotonic() < end:
            time.sleep(0.05)
    provider.close()
    errs = sink.errors["a"]
    assert len(errs) >= 3
    assert all(isinstance(e, ProviderError) and e.reason == "auth" for _, e in errs)
    assert [seq for seq, _ in errs] == list(range(1, len(errs) + 1))
    assert registry.get_sample_value("edgeroom_vision_interval_failed_total",
                                     {"stream": "a", "reason": "auth"}) == len(errs)


def test_no_frame_is_skipped_not_an_error(registry):
    provider = MockProvider()
    sink = Sink()
    frames: list[bytes | None] = [None]
    with IntervalCaller(provider, on_result=sink.on_result, on_error=sink.on_error, registry=registry) as caller:
        caller.add("a", lambda: frames[0], interval=0.05, prompt="x")
        time.sleep(0.3)
        assert not sink.results and caller.stats("a").no_frame >= 2
        frames[0] = _jpeg(200)
        assert sink.event.wait(2)
    assert sink.results["a"][0][1].metadata["stream"] == "a" and not sink.errors


def test_a_raising_getter_or_callback_does_not_stop_the_stream(registry):
    provider = MockProvider()
    n = {"get": 0}

    def flaky():
        n["get"] += 1
        if n["get"] % 2:
            raise OSError("camera gone")
        return _jpeg(100)

    got = []

    def on_result(stream, seq, result):
        got.append(seq)
        raise RuntimeError("service bug")

    errors = []
    with IntervalCaller(provider, on_result=on_result, on_error=lambda s, q, e: errors.append(e),
                        registry=registry) as caller:
        caller.add("a", flaky, interval=0.05, prompt="x")
        time.sleep(0.5)
    assert len(got) >= 2 and len(errors) >= 2
    assert all(isinstance(e, OSError) for e in errors)
    assert registry.get_sample_value("edgeroom_vision_interval_callback_errors_total") == len(got)
    assert registry.get_sample_value("edgeroom_vision_interval_failed_total",
                                     {"stream": "a", "reason": "frame"}) == len(errors)


def test_remove_stops_calls_and_add_validates(registry):
    provider = MockProvider()
    sink = Sink()
    cam = Camera()
    with IntervalCaller(provider, on_result=sink.on_result, on_error=sink.on_error, registry=registry) as caller:
        caller.add("a", cam, interval=0.05, prompt="x")
        with pytest.raises(ValueError, match="already"):
            caller.add("a", cam, interval=0.05, prompt="x")
        with pytest.raises(ValueError, match="interval"):
            caller.add("b", cam, interval=0, prompt="x")
        assert sink.event.wait(2)
        assert caller.remove("a") and caller.streams() == []
        time.sleep(0.1)
        calls = cam.calls
        time.sleep(0.3)
        assert cam.calls == calls
    with pytest.raises(RuntimeError, match="closed"):
        caller.add("c", cam, interval=1, prompt="x")


def test_update_changes_prompt_and_interval_live(server, registry):
    provider = open_provider("openai", model="m", base_url=server.base_url, timeout=5.0)
    sink = Sink()
    with IntervalCaller(provider, on_result=sink.on_result, on_error=sink.on_error, registry=registry) as caller:
        caller.add("a", Camera(), interval=30.0, prompt="first stream=a")
        assert sink.event.wait(3)                       # the first tick is at once
        sink.event.clear()
        caller.update("a", interval=0.1, prompt="second stream=a")
        assert sink.event.wait(3)                       # not 30 s later
    provider.close()
    assert [r.prompt for r in server.requests[:2]] == ["first stream=a", "second stream=a"]
