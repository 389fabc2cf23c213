"""Sessions that send, on a real box: a test transport (tests/sendingservice.py) sends its session's
routes through RouteReader; `route` (hub -> the session's service -> its session.route offer) shows and
sets them; a switch between two H.264 cameras happens on the new camera's keyframe, asked for and
made within a few frames, never a delta first; a route set by command outlives the transport's
restart; bad input is refused with its reason and the transport keeps sending."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import av
import pytest

import framebus
from services.capture.sources.synthetic import frame_number
from services.control.client import CommandFailed
from tests.appliance import Box, Transport, metric_value, wait_for
from tests.media_files import numbered_file

# Cameras told apart by their size. The synthetic ones make a keyframe when asked (their own are a minute
# apart, so every later keyframe came from a request); the file cannot, its keyframes come once a second.
# No decode@NAME: nobody here needs the pictures.
CAMS = {
    "cam": 'kind = "synthetic"\nwidth = 320\nheight = 240\nfps = 30.0\nroom = "lobby"\nencode = "h264"\n'
           'gop = 60.0\ndecode = false\naudio = true\nhistory_seconds = 2.0',   # 64 slots: 2.1 s
    "cam2": 'kind = "synthetic"\nwidth = 352\nheight = 288\nfps = 30.0\nroom = "lobby"\nencode = "h264"\n'
            'gop = 60.0\ndecode = false',
}
SIZES = {"cam": 320, "cam2": 352, "clip": 384}


def _box(box, clip: Path | None = None) -> Box:
    b = box()
    for name, body in CAMS.items():
        b.set_source(name, body)
    if clip is not None:
        b.set_source("clip", f'kind = "file"\npath = "{clip}"\nloop = true\nroom = "lobby"\ndecode = false')
    b.run()
    b.wait_ready("capture@cam", "capture@cam2", *(["capture@clip"] if clip else []))
    return b


def _switch(b: Box, t: Transport, stream: str) -> tuple[int, list[dict]]:
    """Route the video to `stream`; (when it was asked, CLOCK_MONOTONIC ns; what was sent once it came)."""
    asked = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    reply = b.call("route", {"session": "a", "video": stream})["video"]
    assert (reply["route"], reply["state"], reply["origin"]) == (stream, "switching", "command")
    wait_for(lambda: [x for x in t.video() if x["stream"] == stream][5:], 5, f"the transport sending {stream}")
    return asked, t.video()


def _pictures(path: Path, sizes: list[int]) -> list[tuple[int, int]]:
    """(width, frame number) of every picture of the H.264 the transport sent, decoded as the peer would,
    one access unit at a time; a smear (a delta decoded on the wrong reference) breaks the numbers."""
    data = path.read_bytes()
    assert len(data) == sum(sizes)
    codec = av.CodecContext.create("h264", "r")
    out, at = [], 0
    for size in [*sizes, None]:
        packet = None if size is None else av.Packet(data[at:at + size])
        at += size or 0
        for frame in codec.decode(packet):
            out.append((frame.width, frame_number(frame.to_ndarray(format="gray"))))
    return out


def test_a_switch_happens_on_the_new_streams_keyframe_asked_for_and_outlives_a_restart(box, tmp_path):
    b = _box(box, numbered_file(tmp_path / "clip.mp4", 300, fps=30, gop=30, size=(384, 288)))
    t = Transport(b, "a", send_video="cam", send_audio="cam-audio")
    t.start()
    wait_for(lambda: len(t.video()) >= 15, 10, "the transport sending cam")
    [video, audio] = t.session()["tracks"]
    assert video == {"id": "send-video", "kind": "video", "direction": "send", "stream": "cam", "state": "sending"}
    assert audio == {"id": "send-audio", "kind": "audio", "direction": "send", "stream": "cam-audio",
                     "state": "sending"}
    shown = b.call("route", {"session": "a"})
    assert (shown["service"], shown["video"]["route"], shown["video"]["origin"], shown["audio"]["sending"]) == (
        "sendtest@a", "cam", "config", "cam-audio")
    assert t.video()[0]["key"] and t.video()[0]["switched"]             # the start: a keyframe first

    # to a file, which cannot make a keyframe: the switch waits for its next one, cam goes on meanwhile. The
    # switch is made just after one of the clip's keyframes (a second apart), so its deltas come first: a switch
    # that happened to land on a keyframe (1 in 30) would gate nothing, and prove nothing
    gated = shown["video"]["gated"]
    with framebus.Consumer.attach("clip", prefix=b.prefix, start="next") as clip:
        wait_for(lambda: (item := clip.receive(timeout=0.1)) is not None and item.keyframe, 5, "a clip keyframe")
    _, sent = _switch(b, t, "clip")
    at_clip = next(i for i, x in enumerate(sent) if x["stream"] == "clip")
    assert sent[at_clip]["key"] and sent[at_clip]["switched"], sent[at_clip]   # never a delta first
    assert b.call("route", {"session": "a"})["video"]["gated"] > gated  # clip's deltas before it: held back
    # to a camera that makes one when asked: within a few frames
    asked, sent = _switch(b, t, "cam2")
    at_cam2 = next(i for i, x in enumerate(sent) if x["stream"] == "cam2")
    assert sent[at_cam2]["key"] and sent[at_cam2]["switched"], sent[at_cam2]
    took = (sent[at_cam2]["at"] - asked) / 1e9
    print(f"route switch: the new camera's keyframe handed out {took * 1000:.0f} ms after the command")
    assert took < 0.25, f"the switch took {took:.3f} s (the camera's own keyframes are a minute apart)"
    segments = [(0, at_clip), (at_clip, at_cam2), (at_cam2, len(sent))]
    assert [{x["stream"] for x in sent[lo:hi]} for lo, hi in segments] == [{"cam"}, {"clip"}, {"cam2"}]

    pictures = _pictures(Path(f"{t.out}.h264"), [x["size"] for x in sent])
    assert [w for w, _ in pictures] == [SIZES[x["stream"]] for x in sent]   # every access unit one picture
    for lo, hi in segments:
        numbers = [n for _, n in pictures[lo:hi]]
        assert all(b > a for a, b in zip(numbers, numbers[1:])), numbers    # in order: no smear, no repeat
    assert {x["codec"] for x in t.sent() if x["track"] == "audio"} == {"s16"}

    def counted() -> str | None:
        text = b.scrape()
        return text if metric_value(text, "edgeroom_route_switches_total", session="a", track="video") else None

    scrape = wait_for(counted, 5, "the switch counted (the transport's metrics come with its heartbeat)")
    assert metric_value(scrape, "edgeroom_route_switches_total", session="a", track="video") == 2.0
    assert metric_value(scrape, "edgeroom_route_switch_seconds_count", track="video") == 2.0
    assert metric_value(scrape, "edgeroom_route_keyframe_asks_total", session="a", track="video",
                        reason="route switch") >= 1.0
    assert metric_value(scrape, "edgeroom_keyframe_requests_total", stream="cam2", outcome="sent") >= 1.0

    # the route set by command outlives the transport's restart; reset puts the config's back
    t.stop()
    before = len(t.sent())
    t.start()
    again = b.call("route", {"session": "a"})
    assert (again["video"]["route"], again["video"]["origin"]) == ("cam2", "command")
    wait_for(lambda: len([x for x in t.sent()[before:] if x["track"] == "video"]) > 5, 10,
             "the restarted transport sending")
    after = [x for x in t.sent()[before:] if x["track"] == "video"]
    assert {x["stream"] for x in after} == {"cam2"} and after[0]["key"]
    assert json.loads((b.rundir / "routes.json").read_text())["added"] == {"a": {"video": "cam2"}}
    reset = b.call("route", {"session": "a", "reset": True})
    assert (reset["video"]["route"], reset["video"]["origin"]) == ("cam", "config")
    wait_for(lambda: t.video()[-1]["stream"] == "cam", 5, "cam again after the reset")
    assert json.loads((b.rundir / "routes.json").read_text())["added"] == {}


def _refused(b: Box, args: dict) -> CommandFailed:
    with pytest.raises(CommandFailed) as info:
        b.call("route", args)
    return info.value


def test_bad_routes_are_refused_with_their_reason_and_the_transport_keeps_sending(box):
    b = _box(box)
    t = Transport(b, "a", send_video="cam", send_audio="cam-audio")
    pid = t.start()
    wait_for(lambda: len(t.video()) >= 5, 10, "the transport sending cam")
    err = _refused(b, {"session": "a", "video": "cam-audio"})
    assert (err.code, err.message) == ("bad_args", "route of session 'a': stream 'cam-audio' carries audio: it "
                                                   "cannot be sent as video (a video route takes encoded video)")
    err = _refused(b, {"session": "a", "audio": "cam2"})
    assert err.code == "bad_args" and "stream 'cam2' carries encoded video: it cannot be sent as audio" in err.message
    err = _refused(b, {"session": "a", "video": "no such"})
    assert err.code == "bad_args" and "bad stream name 'no such'" in err.message
    err = _refused(b, {"session": "a", "video": "cam2", "reset": True})
    assert err.code == "bad_args" and err.message.startswith("reset puts back the config's routes")
    assert _refused(b, {"session": "a", "video": 2}).message == "argument 'video' has the wrong type (int)"
    err = _refused(b, {"session": "nobody"})
    assert (err.code, err.message) == ("not_found", "no session 'nobody' (`edgeroom ctl sessions` lists them)")
    err = _refused(b, {"session": "cam"})
    assert (err.code, err.message) == ("unavailable", "session 'cam' belongs to capture@cam, which sends nothing: "
                                                      "only a call's sessions have routes")
    assert b.call("route", {"session": "a"})["video"]["route"] == "cam"   # nothing changed
    assert not (b.rundir / "routes.json").exists()

    # a stream that does not exist yet is waited for, and cam goes on meanwhile
    ghost = b.call("route", {"session": "a", "video": "ghost"})["video"]
    assert (ghost["state"], ghost["note"]) == ("switching", "sending cam until ghost exists")
    n = len(t.video())
    wait_for(lambda: len(t.video()) > n + 10, 5, "cam still sent")
    wait_for(lambda: t.session()["tracks"][0]["stream"] == "ghost", 5, "the session's track naming ghost")
    assert t.session()["tracks"][0]["state"] == "switching"
    assert t.proc.poll() is None and t.proc.pid == pid
    scrape = b.scrape()
    assert metric_value(scrape, "edgeroom_hub_forwarded_calls_total", command="session.route", outcome="error") == 4.0

    # the config's routes go through the one validator: an audio stream as the video route is refused there
    bad = Transport(b, "b", send_video="cam-audio")
    bad.start(wait=False)
    assert bad.proc.wait(timeout=15) == 78                       # a bad config: systemd does not restart it
    assert ("sendtest.b.send_video: 'cam-audio' is an audio stream (NAME-audio): route it with send_audio"
            in b.log())


def test_a_loss_on_the_bus_closes_the_gate_and_the_next_thing_sent_is_a_keyframe_asked_for(box):
    """The transport stopped (SIGSTOP) longer than the camera's ring holds misses access units: on waking
    its route closes the keyframe gate and asks for a keyframe; what it sends next is that keyframe, within
    a second, where the camera's own is a minute away. Never a delta after the gap."""
    b = _box(box)
    t = Transport(b, "a", send_video="cam")
    pid = t.start()
    wait_for(lambda: len(t.video()) >= 15, 10, "the transport sending cam")
    os.kill(pid, signal.SIGSTOP)
    time.sleep(3.0)                      # 64 slots at 30 fps is 2.1 s: the ring wraps past what it read
    woke = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: [x for x in t.video() if x["at"] > woke][3:], 5, f"sending again; log:\n{b.log()[-2000:]}")
    after = [x for x in t.video() if x["at"] > woke]
    assert after[0]["key"] and not after[0]["switched"], after[0]
    assert (after[0]["at"] - woke) / 1e9 < 1.0
    assert after[0]["capture_ns"] > woke                 # made after the request, not a keyframe from before

    def counted() -> str | None:
        text = b.scrape()
        return text if metric_value(text, "edgeroom_route_keyframe_asks_total", session="a", track="video",
                                    reason="loss") else None

    scrape = wait_for(counted, 5, "the loss counted (the transport's metrics come with its heartbeat)")
    assert metric_value(scrape, "edgeroom_route_dropped_items_total", session="a", track="video",
                        reason="missed") > 0
