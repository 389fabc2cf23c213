"""Every `edgeroom ctl` command, in its table form and its --json form, against one live box
(`edgeroom run`: hub, a camera, vision with the offline mock provider, the recorder); and
every command finding that box's config, runtime directory and bus prefix the same way.

The commands are enumerated from the real argparse parser: a ctl command added without a
case here fails `test_every_ctl_command_has_a_case`. Each case checks that the table shows
the live box's real values (read back from the hub in the same test), not only that the
command exits 0, and that the JSON form parses and has the reply's fields.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

import framebus
import services.cli
from services.capture.cameras import list_cameras
from tests.appliance import Box, Transport, wait_for
from tests.conftest import shm_leftovers
from tests.test_avatar_units import write_face

BOX = """
[services.vision]
restart_sec = 0.2
[vision]
provider = "mock"
[pipelines.cam]
describe_interval = 0.0
[services.recorder]
restart_sec = 0.2
[recorder]
dir = "{dir}/rec"
record = ""
fragment_seconds = 0.5
max_disk_share = 0.0
[services.bridge]
restart_sec = 0.2
[bridge]
enabled = true
rooms = "phones"
[services.avatar]
restart_sec = 0.2
[avatar]
enabled = true
backoff_max = 1.0
[rtp.phone]
room = "phones"
decode = false
sdp = '''v=0
c=IN IP4 127.0.0.1
m=video 0 RTP/AVP 96
a=rtpmap:96 H264/90000
a=fmtp:96 packetization-mode=1
a=sendonly
'''
"""
SERVICES = ("hub", "capture@cam", "vision", "recorder", "rtp@phone", "bridge", "avatar", "supervisor")
DOOR = {"kind": "synthetic", "width": 160, "height": 120, "fps": 2.0, "encode": "raw", "room": "hall"}
DOOR_ARGS = ["kind=synthetic", "width=160", "height=120", "fps=2", "encode=raw", "room=hall"]
MOCK_DESCRIPTION = re.compile(r"^a .+ 320x240 picture \(mean brightness \d+\)$")


@pytest.fixture(scope="module")
def live():
    """One box for the module, under a prefix and runtime directory of its own (not the defaults)."""
    prefix = f"t{os.getpid()}ctl"
    b = Box(prefix, BOX)
    try:
        b.run()
        b.wait_ready(*SERVICES, timeout=60)
        wait_for(lambda: [s for s in b.call("sessions") if s["tracks"]], 10, "the camera's track")
        wait_for(lambda: b.services()["capture@cam"]["rate"] > 5 and b.call("streams")[0]["rate_hz"] > 5, 10,
                 "the camera's rate (measured once a second)")
        yield b
    finally:
        b.close()
        framebus.gc(prefix)
        assert not shm_leftovers(prefix)


@pytest.fixture
def ctl(live, monkeypatch):
    """ctl(*argv) -> stdout: `edgeroom ctl ARGV` run in this process (the parser and code the console
    script runs), the box found through $EDGEROOM_CONFIG alone; it must exit 0 without a traceback."""
    for var in [v for v in os.environ if v.startswith("EDGEROOM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("EDGEROOM_CONFIG", str(live.config))

    def run(*argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = services.cli.main(["ctl", *argv])
        assert rc == 0 and "Traceback" not in err.getvalue(), f"ctl {' '.join(argv)}: exit {rc}\n{err.getvalue()}"
        return out.getvalue()
    return run


def parse_table(text: str, header: str) -> list[dict]:
    """The rows of a table printed by services.cli.tables.table, as {COLUMN: cell}, found by its first
    column's name; columns are cut at the header's word starts (cells may hold spaces)."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == [header])
    starts = [m.start() for m in re.finditer(r"\S+", lines[at])]
    names = lines[at].split()
    rows = []
    for line in lines[at + 1:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        rows.append(dict(zip(names, cells)))
    return rows


def by(rows: list[dict], column: str) -> dict[str, dict]:
    return {r[column]: r for r in rows}


# --- one case per ctl command: case(box, ctl, as_json) --------------------------------------------
def _status(b: Box, ctl, as_json: bool) -> None:
    live = {s["service"]: s for s in b.call("status")["services"]}
    if as_json:
        got = json.loads(ctl("status", "--json"))
        assert got["box"] == "edgeroom" and got["metrics_url"].startswith("http://127.0.0.1:")
        rows = {s["service"]: s for s in got["services"]}
        assert set(SERVICES) <= set(rows)
        for name in SERVICES:
            assert rows[name]["state"] == "ready" and rows[name]["pid"] == live[name]["pid"]
            assert {"uptime", "restarts", "rate", "status"} <= set(rows[name])
        return
    text = ctl("status")
    assert text.splitlines()[0].split() == ["box", "edgeroom", "metrics", b.call("status")["metrics_url"]]
    rows = by(parse_table(text, "SERVICE"), "SERVICE")
    for name in SERVICES:
        assert (rows[name]["STATE"], rows[name]["PID"]) == ("ready", str(live[name]["pid"])), rows[name]
        assert rows[name]["RESTARTS"] == str(live[name]["restarts"])
    assert rows["capture@cam"]["STATUS"].startswith("synthetic 320x240 test pattern")
    assert float(rows["capture@cam"]["RATE/s"]) > 5


def _streams(b: Box, ctl, as_json: bool) -> None:
    if as_json:
        [cam] = [s for s in json.loads(ctl("streams", "--json")) if s["stream"] == "cam"]
        assert (cam["kind"], cam["service"], cam["status"]) == ("video", "capture@cam", "alive")
        assert cam["rate_hz"] > 5 and cam["items"] > 0 and cam["consumers"] and "drops" in cam
        return
    row = by(parse_table(ctl("streams"), "STREAM"), "STREAM")["cam"]
    assert (row["KIND"], row["SERVICE"], row["STATUS"]) == ("video", "capture@cam", "alive")
    assert float(row["RATE/s"]) > 5 and int(row["ITEMS"]) > 0 and int(row["CONSUMERS"]) >= 1   # vision reads it


def _rooms(b: Box, ctl, as_json: bool) -> None:
    if as_json:
        got = json.loads(ctl("rooms", "--json"))
        assert [s["session"] for s in got["lobby"]] == ["cam"]
        return
    row = by(parse_table(ctl("rooms"), "ROOM"), "ROOM")["lobby"]
    assert (row["SESSIONS"], row["WHO"]) == ("1", "cam")


def _sessions(b: Box, ctl, as_json: bool) -> None:
    if as_json:
        [cam] = json.loads(ctl("sessions", "--room", "lobby", "--json"))
        assert (cam["session"], cam["room"], cam["service"], cam["kind"]) == ("cam", "lobby", "capture@cam", "camera")
        assert [t["stream"] for t in cam["tracks"]] == ["cam"]
        return
    row = by(parse_table(ctl("sessions"), "SESSION"), "SESSION")["cam"]
    assert row == {"SESSION": "cam", "ROOM": "lobby", "SERVICE": "capture@cam", "KIND": "camera",
                   "TRACKS": "video:cam"}
    assert ctl("sessions", "--room", "nosuch").strip() == "no sessions"


def _metrics(b: Box, ctl, as_json: bool) -> None:
    if as_json:
        got = json.loads(ctl("metrics", "--json"))
        assert got["metrics_url"].startswith("http://127.0.0.1:")
        assert got["services"]["capture@cam"]["edgeroom_capture_frames"] > 0
        return
    text = ctl("metrics")
    assert text.splitlines()[0] == f"scrape {b.call('status')['metrics_url']}"
    frames = [r for r in parse_table(text, "SERVICE") if r["METRIC"] == "edgeroom_capture_frames"]
    assert [r["SERVICE"] for r in frames] == ["capture@cam"] and float(frames[0]["VALUE"]) > 0


def _hooks(b: Box, ctl, as_json: bool) -> None:
    got = json.loads(ctl("hooks", *(["--json"] if as_json else [])))   # the human form is JSON too: nested
    assert got["BEFORE_BRIDGE_VIDEO"] == {"deadline": 0.3, "on_timeout": "block", "handler": False}  # tests.appliance
    assert got == b.call("hooks")


def _commands(b: Box, ctl, as_json: bool) -> None:
    live = b.call("commands")
    if as_json:
        assert json.loads(ctl("commands", "--json")) == live
        return
    rows = by(parse_table(ctl("commands"), "COMMAND"), "COMMAND")
    assert set(rows) == set(live)
    assert rows["record.start"]["WHAT"] == live["record.start"] and "(answered by recorder)" in live["record.start"]
    assert rows["status"]["WHAT"] == live["status"]


def _events(b: Box, ctl, as_json: bool) -> None:
    # a live tail needs the box to act while it listens: the console script, in its own process
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")} | {"EDGEROOM_CONFIG": str(b.config)}
    tail = subprocess.Popen([sys.executable, "-m", "services.cli", "ctl", "events", "source.added", "--count", "1",
                             *(["--json"] if as_json else [])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert tail.stderr.readline().startswith(f"# listening on ipc://{b.rundir}/events.sock for source.added")
        b.call("source.add", {"name": "door", "source": DOOR})
        out, err = tail.communicate(timeout=15)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
        b.call("source.remove", {"name": "door"})
    assert tail.returncode == 0, err
    if as_json:
        event = json.loads(out)
        assert (event["topic"], event["source"], event["data"]) == (
            "source.added", "hub", {"name": "door", "kind": "synthetic", "room": "hall"})
        assert event["seq"] > 0 and event["time"] > 0
        return
    assert re.fullmatch(r'\d\d:\d\d:\d\d\.\d{3} source\.added hub \{"name":"door","kind":"synthetic","room":"hall"\}\n',
                        out), out


def _call(b: Box, ctl, as_json: bool) -> None:
    got = json.loads(ctl("call", "ping", *(["--json"] if as_json else [])))   # any reply is printed as JSON
    assert got["pong"] is True and got["pid"] == b.services()["hub"]["pid"]
    assert json.loads(ctl("call", "sessions", '{"room": "lobby"}'))[0]["session"] == "cam"


def _source_list(b: Box, ctl, as_json: bool) -> None:
    if as_json:
        [cam] = json.loads(ctl("source", "list", "--json"))
        assert {k: cam[k] for k in ("name", "kind", "room", "origin", "capture", "decode", "target", "streams")} == {
            "name": "cam", "kind": "synthetic", "room": "lobby", "origin": "config", "capture": "ready",
            "decode": None, "target": "320x240 raw", "streams": ["cam"]}
        return
    row = by(parse_table(ctl("source", "list"), "SOURCE"), "SOURCE")["cam"]
    assert {k: row[k] for k in ("KIND", "ROOM", "FROM", "CAPTURE", "DECODE", "TARGET")} == {
        "KIND": "synthetic", "ROOM": "lobby", "FROM": "config", "CAPTURE": "ready", "DECODE": "-",
        "TARGET": "320x240 raw"}
    assert row["STATUS"].startswith("synthetic 320x240 test pattern")


def _source_add(b: Box, ctl, as_json: bool) -> None:
    try:
        out = ctl("source", "add", "door", *DOOR_ARGS, *(["--json"] if as_json else []))
        [door] = [r for r in b.call("source.list") if r["name"] == "door"]
        assert (door["origin"], door["room"], door["target"]) == ("command", "hall", "160x120 raw")
    finally:
        b.call("source.remove", {"name": "door"})
    if as_json:
        got = json.loads(out)
        assert got["name"] == "door" and Path(got["overlay"]).is_file()
        assert {k: got["source"][k] for k in DOOR} == DOOR
        return
    assert out == "source door added (synthetic); its capture starts now\n"


def _source_remove(b: Box, ctl, as_json: bool) -> None:
    b.call("source.add", {"name": "door", "source": DOOR})
    out = ctl("source", "remove", "door", *(["--json"] if as_json else []))
    assert [r["name"] for r in b.call("source.list")] == ["cam"]
    if as_json:
        got = json.loads(out)
        assert got["name"] == "door" and Path(got["overlay"]).is_file()
        return
    assert out == "source door removed; its capture stops now\n"


def _snapshot(b: Box, ctl, as_json: bool) -> None:
    path = b.dir / f"snap-{as_json}.jpg"
    out = ctl("snapshot", "cam", str(path), "--max-width", "160", *(["--json"] if as_json else []))
    jpeg = path.read_bytes()
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (120, 160, 3)   # the 320x240 camera, scaled to --max-width
    if as_json:
        got = json.loads(out)
        assert (got["stream"], got["width"], got["height"], got["file"], got["bytes"]) == (
            "cam", 160, 120, str(path), len(jpeg))
        assert got["seq"] >= 0 and "jpeg" not in got
        return
    m = re.fullmatch(rf"{re.escape(str(path))}: 160x120 JPEG \((\d+) bytes\) of cam item (\d+)\n", out)
    assert m and int(m.group(1)) == len(jpeg), out


def _keyframe(b: Box, ctl, as_json: bool) -> None:
    """The box's camera sends raw pictures: the producer answers that it needs no keyframe."""
    out = ctl("keyframe", "cam", *(["--json"] if as_json else []))
    if as_json:
        got = json.loads(out)
        assert got["made"] is False and got["reason"] == "cam carries raw pictures: each stands alone"
        return
    assert out == "cannot: cam carries raw pictures: each stands alone\n"


def _sdp(b: Box, ctl, as_json: bool) -> None:
    """The box's call [rtp.phone] receives H.264 mode 1 on a port it picked: the SDP a sender is pointed at."""
    answer = b.call("sdp", {"session": "phone"})
    port = answer["ports"]["video"]["rtp"]
    if as_json:
        got = json.loads(ctl("sdp", "phone", "--json"))
        assert (got["session"], got["for"], got["ports"]) == ("phone", "sender", answer["ports"])
        assert f"m=video {port} RTP/AVP 96\r\n" in got["sdp"]
        return
    lines = ctl("sdp", "phone").splitlines()
    assert lines[0] == "v=0" and "c=IN IP4 127.0.0.1" in lines and f"m=video {port} RTP/AVP 96" in lines
    assert {"a=rtpmap:96 H264/90000", "a=fmtp:96 packetization-mode=1", "a=recvonly"} <= set(lines)

def _route(b: Box, ctl, as_json: bool) -> None:
    """A call's session (tests/sendingservice.py, a test transport that takes raw pictures) sends the camera;
    `ctl route` shows its routes, sets one (a stream not there yet: cam goes on until it comes), and `ctl
    sessions` shows the session's outbound tracks."""
    t = Transport(b, "call", send_video="cam", raw_video=True)
    t.start()
    try:
        wait_for(lambda: len(t.video()) > 3, 10, "the call sending cam")
        if as_json:
            shown = json.loads(ctl("route", "call", "--json"))
            assert (shown["session"], shown["service"]) == ("call", "sendtest@call")
            assert {k: shown["video"][k] for k in ("route", "origin", "sending", "state")} == {
                "route": "cam", "origin": "config", "sending": "cam", "state": "sending"}
            assert shown["video"]["items"] > 3 and shown["audio"]["state"] == "off"
            got = json.loads(ctl("route", "call", "video=later", "--json"))["video"]
            assert {k: got[k] for k in ("route", "origin", "sending", "state", "note")} == {
                "route": "later", "origin": "command", "sending": "cam", "state": "switching",
                "note": "sending cam until later exists"}
            wait_for(lambda: t.session()["tracks"][0]["stream"] == "later", 5, "the heartbeat with the new route")
            [call] = json.loads(ctl("sessions", "--room", "calls", "--json"))
            assert (call["session"], call["kind"], call["tracks"]) == ("call", "call", [
                {"id": "send-video", "kind": "video", "direction": "send", "stream": "later", "state": "switching"}])
            return
        rows = by(parse_table(ctl("route", "call"), "TRACK"), "TRACK")
        assert {k: rows["video"][k] for k in ("ROUTE", "FROM", "SENDING", "STATE", "NOTE")} == {
            "ROUTE": "cam", "FROM": "config", "SENDING": "cam", "STATE": "sending", "NOTE": "sending cam"}
        assert int(rows["video"]["ITEMS"]) > 3 and rows["audio"]["STATE"] == "off"
        out = ctl("route", "call", "video=later")
        assert out.splitlines()[0] == "session call (sendtest@call)"
        row = by(parse_table(out, "TRACK"), "TRACK")["video"]
        assert {k: row[k] for k in ("ROUTE", "FROM", "SENDING", "STATE", "NOTE")} == {
            "ROUTE": "later", "FROM": "command", "SENDING": "cam", "STATE": "switching",
            "NOTE": "sending cam until later exists"}
        wait_for(lambda: t.session()["tracks"][0]["stream"] == "later", 5, "the heartbeat with the new route")
        assert by(parse_table(ctl("sessions"), "SESSION"), "SESSION")["call"] == {
            "SESSION": "call", "ROOM": "calls", "SERVICE": "sendtest@call", "KIND": "call",
            "TRACKS": "send-video:later (switching)"}
    finally:
        b.call("route", {"session": "call", "reset": True})   # the overlay outlives the transport: the next case
        t.stop()


def _list_cameras(b: Box, ctl, as_json: bool) -> None:
    here = list_cameras()   # the hub runs on this machine: the same devices, or none
    if as_json:
        got = json.loads(ctl("list-cameras", "--json"))
        assert [(r["device"], r["capture"]) for r in got] == [(r["device"], r["capture"]) for r in here]
        return
    text = ctl("list-cameras")
    if not here:
        assert text == "no cameras (no V4L2 devices on this box)\n"
        return
    rows = by(parse_table(text, "DEVICE"), "DEVICE")
    assert {d: r["CAPTURE"] for d, r in rows.items()} == {r["device"]: "yes" if r["capture"] else "no" for r in here}


def _describe(b: Box, ctl, as_json: bool) -> None:
    out = ctl("describe", "cam", "Is anyone there?", *(["--json"] if as_json else []))
    if as_json:
        got = json.loads(out)
        assert (got["stream"], got["room"], got["question"], got["blocked"]) == ("cam", "lobby", "Is anyone there?",
                                                                               False)
        assert MOCK_DESCRIPTION.match(got["result"]["description"])
        meta = got["result"]["metadata"]
        assert (meta["provider"], meta["model"], meta["width"], meta["height"]) == ("mock", "mock-pixels", 320, 240)
        return
    description, labels, source = out.splitlines()
    assert MOCK_DESCRIPTION.match(description), out
    assert re.fullmatch(r"labels: \w+, \w+, \w+", labels) and re.fullmatch(r"-- mock mock-pixels in [\d.]+ ms", source)


def _view(b: Box, ctl, as_json: bool) -> None:
    described = b.client().call("vision.describe", {"stream": "cam", "question": ""}, timeout=30)
    wanted = described["result"]["description"]
    if as_json:
        got = json.loads(ctl("view", "lobby", "--json"))
        [cam] = got["streams"]
        assert (got["room"], cam["stream"]) == ("lobby", "cam")
        assert MOCK_DESCRIPTION.match(cam["description"]) and f"- cam: {cam['description']}" in got["note"]
        return
    lines = ctl("view", "lobby").splitlines()
    assert lines[0].startswith("```vision room=lobby updated=") and lines[-1] == "```"
    [cam] = [line for line in lines if line.startswith("- cam: ")]
    assert MOCK_DESCRIPTION.match(cam[len("- cam: "):].split(";")[0]), (cam, wanted)


def _pipeline_list(b: Box, ctl, as_json: bool) -> None:
    if as_json:
        [cam] = json.loads(ctl("pipeline", "list", "--json"))
        assert {k: cam[k] for k in ("name", "origin", "input", "output", "room", "detect", "problem")} == {
            "name": "cam", "origin": "config", "input": "cam", "output": None, "room": "lobby", "detect": False,
            "problem": ""}
        assert cam["frames"] > 0 and cam["size"] == [320, 240]
        return
    row = by(parse_table(ctl("pipeline", "list"), "PIPELINE"), "PIPELINE")["cam"]
    assert {k: row[k] for k in ("FROM", "INPUT", "OUTPUT", "DETECT", "PROBLEM")} == {
        "FROM": "config", "INPUT": "cam", "OUTPUT": "-", "DETECT": "no", "PROBLEM": ""}
    assert int(row["FRAMES"]) > 0


def _pipeline_set(b: Box, ctl, as_json: bool) -> None:
    try:
        out = ctl("pipeline", "set", "small", "input=cam", "resize=160x120", "transforms=grayscale",
                  *(["--json"] if as_json else []))
        [small] = [r for r in b.call("vision.pipelines") if r["name"] == "small"]
        assert (small["origin"], small["input"]) == ("command", "cam")
    finally:
        b.call("vision.pipeline.remove", {"name": "small"})
    overlay = b.rundir / "pipelines.json"
    if as_json:
        got = json.loads(out)
        assert got["name"] == "small" and got["overlay"] == str(overlay)
        assert (got["pipeline"]["input"], got["pipeline"]["resize"], got["pipeline"]["transforms"]) == (
            "cam", "160x120", "grayscale")
        return
    assert out == f"pipeline small set; it runs now (kept in {overlay})\n"


def _pipeline_remove(b: Box, ctl, as_json: bool) -> None:
    b.call("vision.pipeline.set", {"name": "small", "pipeline": {"input": "cam", "resize": "160x120"}})
    out = ctl("pipeline", "remove", "small", *(["--json"] if as_json else []))
    assert [r["name"] for r in b.call("vision.pipelines")] == ["cam"]
    if as_json:
        assert json.loads(out) == {"name": "small", "overlay": str(b.rundir / "pipelines.json")}
        return
    assert out == "pipeline small removed\n"


def _recording(b: Box) -> dict:
    """Start recording the camera; its row once its first fragment is on the disk."""
    b.call("record.start", {"target": "cam"})
    return wait_for(lambda: [r for r in b.call("record.list")["recordings"] if r["bytes"] > 0 and r["path"]], 15,
                    f"the recording's first frames; log:\n{b.log()[-2000:]}")[0]


def _record_start(b: Box, ctl, as_json: bool) -> None:
    try:
        out = ctl("record", "start", "cam", *(["--json"] if as_json else []))
        assert [r["target"] for r in b.call("record.list")["recordings"]] == ["cam"]
    finally:
        b.call("record.stop", {"target": "cam"})
    rec = b.dir / "rec"
    if as_json:
        got = json.loads(out)
        assert (got["target"], got["dir"]) == ("cam", str(rec)) and got["state"] and "encoder" in got
        return
    assert re.fullmatch(rf"recording cam \((\w+)\), into {re.escape(str(rec))}\n", out), out


def _record_stop(b: Box, ctl, as_json: bool) -> None:
    _recording(b)
    out = ctl("record", "stop", "cam", *(["--json"] if as_json else []))
    assert b.call("record.list")["recordings"] == []
    if as_json:
        got = json.loads(out)
        assert got["target"] == "cam" and got["segments"] >= 1 and got["frames"] > 0
        assert got["path"].endswith(".mp4") and Path(got["path"]).is_file()
        return
    m = re.fullmatch(r"stopped recording cam: (\d+) segment\(s\), (\d+) frames; last file (\S+\.mp4)\n", out)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) > 0 and Path(m.group(3)).is_file(), out


def _record_list(b: Box, ctl, as_json: bool) -> None:
    rec = b.dir / "rec"
    if not as_json:
        assert ctl("record", "list") == f"nothing is recording (recordings in {rec})\n"
    try:
        row = _recording(b)
        out = ctl("record", "list", *(["--json"] if as_json else []))
    finally:
        b.call("record.stop", {"target": "cam"})
    if as_json:
        got = json.loads(out)
        assert got["dir"] == str(rec)
        [cam] = got["recordings"]
        assert (cam["target"], cam["state"], cam["encoder"], cam["path"]) == ("cam", "recording", row["encoder"],
                                                                            row["path"])
        assert cam["frames"] >= row["frames"] and cam["bytes"] >= row["bytes"]
        return
    assert out.splitlines()[0] == f"recordings in {rec}"
    [cam] = parse_table(out, "TARGET")
    assert (cam["TARGET"], cam["STATE"], cam["ENCODER"], cam["PATH"]) == ("cam", "recording", row["encoder"],
                                                                        row["path"])
    assert int(cam["FRAMES"]) >= row["frames"] and re.fullmatch(r"[\d.]+ (B|KiB|MiB)", cam["BYTES"])


def _screen_refused(action: str, *argv: str):
    """This box's only source is a synthetic camera: screen input is refused, by the hub, with the key that turns it
    on (the actions themselves run against a real display in tests/test_agent_tools.py)."""
    def case(b: Box, ctl, as_json: bool) -> None:
        ctl("status")   # the fixture's environment (EDGEROOM_CONFIG) is in place
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = services.cli.main(["ctl", "screen", action, "cam", *argv, *(["--json"] if as_json else [])])
        assert rc == 1 and err.getvalue() == ("edgeroom ctl: the hub refused: unavailable: screen input is off for "
                                              "source 'cam' (a screen source takes it with [sources.cam] input = "
                                              "true)\n"), err.getvalue()
    return case


def _screen_list(b: Box, ctl, as_json: bool) -> None:
    if as_json:
        assert json.loads(ctl("screen", "list", "--json")) == []
        return
    assert ctl("screen", "list") == "no screen source takes input ([sources.NAME] input = true enables it)\n"


def _tools(b: Box, ctl, as_json: bool) -> None:
    if as_json:
        names = {f["function"]["name"] for f in json.loads(ctl("tools", "--json"))}
        assert {"list_streams", "snapshot", "describe_stream", "view_room", "start_recording"} <= names
        assert not {n for n in names if n.startswith("screen_")}   # no screen takes input here
        return
    rows = by(parse_table(ctl("tools"), "TOOL"), "TOOL")
    assert rows["snapshot"]["WHAT"].startswith("A JPEG of the newest picture")
    assert ctl("tools", "list_streams").startswith("cam: video")


def _bridge(b: Box, ctl, as_json: bool) -> None:
    """Room phones is bridged; its only session is the RTP call, alone: nothing to route, its config's routes apply."""
    wait_for(lambda: b.call("bridge.status", {}).get("rooms"), 10, "room phones bridged")
    if as_json:
        [room] = json.loads(ctl("bridge", "--json"))["rooms"]
        assert room["room"] == "phones" and [m["session"] for m in room["members"]] == ["phone"]
        one = json.loads(ctl("bridge", "phones", "--json"))
        assert one["routes"] == [] and one["policy"] == "speaker" and one["refused"] == []
        return
    [row] = parse_table(ctl("bridge"), "ROOM")
    assert (row["ROOM"], row["POLICY"], row["BRIDGED"], row["REFUSED"]) == ("phones", "speaker", "1", "0")
    out = ctl("bridge", "phones")
    assert out.startswith("room phones: policy speaker, 1 bridged") and "no routes (fewer than two sessions)" in out


def _face(b: Box) -> Path:
    path = b.dir / "face.png"
    if not path.exists():
        write_face(path, (96, 96))
    return path


def _avatar(b: Box, name: str = "host") -> None:
    """An avatar in room hall whose provider is down (nothing listens on port 9): idle faces, the error shown."""
    if not [a for a in b.call("avatar.list")["avatars"] if a["name"] == name]:
        b.call("avatar.start", {"name": name, "room": "hall", "image": str(_face(b)), "size": "96x96",
                                "url": "http://127.0.0.1:9", "timeout": 0.5})
    wait_for(lambda: [a for a in b.call("avatar.list")["avatars"] if a["name"] == name and a["state"] == "backoff"],
             10, "the provider found down")


def _stop_avatar(b: Box, name: str) -> None:
    b.call("avatar.stop", {"name": name})
    wait_for(lambda: name not in {s["stream"] for s in b.call("streams")}, 5, f"{name}'s streams gone at the hub")


def _avatar_list(b: Box, ctl, as_json: bool) -> None:
    _avatar(b)
    try:
        out = ctl("avatar", "list", *(["--json"] if as_json else []))
    finally:
        _stop_avatar(b, "host")      # the box's other cases count its streams
    if as_json:
        [a] = [a for a in json.loads(out)["avatars"] if a["name"] == "host"]
        assert (a["room"], a["provider"], a["state"]) == ("hall", "websocket", "backoff")
        assert "127.0.0.1:9" in a["problem"] and a["errors"] >= 1 and a["frames"]["idle"] > 0
        return
    [row] = [r for r in parse_table(out, "NAME") if r["NAME"] == "host"]
    assert (row["ROOM"], row["STATE"], row["VOICE"], row["SIZE"]) == ("hall", "backoff", "(pushed)", "96x96")
    assert int(row["IDLE"]) > 0 and "127.0.0.1:9" in row["PROBLEM"]
    assert "providers: anam (" in out and "websocket (" in out and "musetalk (" in out


def _avatar_start(b: Box, ctl, as_json: bool) -> None:
    try:
        out = ctl("avatar", "start", "hall", "--name", "greeter", "--image", str(_face(b)), "--size", "64x64",
                  "--url", "http://127.0.0.1:9", "--audio", "cam-audio", *(["--json"] if as_json else []))
        [s] = wait_for(lambda: [s for s in b.call("sessions", {"room": "hall"}) if s["session"] == "greeter"], 5,
                       "the avatar's session at the hub")
        assert s["kind"] == "avatar" and {t["stream"] for t in s["tracks"]} == {"greeter", "greeter-audio"}
    finally:
        _stop_avatar(b, "greeter")
    if as_json:
        got = json.loads(out)
        assert (got["name"], got["room"], got["audio"], got["size"]) == ("greeter", "hall", "cam-audio", "64x64")
        return
    assert out == "avatar greeter in room hall: websocket, starting, face 64x64 on greeter, voice on " \
                  "greeter-audio, driven by cam-audio\n", out


def _avatar_stop(b: Box, ctl, as_json: bool) -> None:
    _avatar(b, "leaving")
    out = ctl("avatar", "stop", "leaving", *(["--json"] if as_json else []))
    assert "leaving" not in {a["name"] for a in b.call("avatar.list")["avatars"]}
    assert out == ('{\n  "name": "leaving",\n  "stopped": true\n}\n' if as_json else "avatar leaving stopped\n")


def _avatar_say(b: Box, ctl, as_json: bool) -> None:
    _avatar(b)
    voice = b.dir / "voice.wav"
    with wave.open(str(voice), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(16000))           # half a second of silence
    try:
        out = ctl("avatar", "say", "host", str(voice), *(["--json"] if as_json else []))
    finally:
        _stop_avatar(b, "host")
    if as_json:
        got = json.loads(out)
        assert got["name"] == "host" and got["queued_s"] == 0.5 and 0.3 < got["waiting_s"] <= 0.5
        return
    assert re.fullmatch(r"avatar host: 0\.50 s of voice pushed, 0\.[345]\d s waiting\n", out), out


CASES: dict[tuple[str, ...], Callable[[Box, Callable[..., str], bool], None]] = {
    ("status",): _status, ("streams",): _streams, ("rooms",): _rooms, ("sessions",): _sessions,
    ("metrics",): _metrics, ("hooks",): _hooks, ("commands",): _commands, ("events",): _events, ("call",): _call,
    ("source", "list"): _source_list, ("source", "add"): _source_add, ("source", "remove"): _source_remove,
    ("snapshot",): _snapshot, ("keyframe",): _keyframe, ("list-cameras",): _list_cameras, ("describe",): _describe,
    ("view",): _view, ("sdp",): _sdp, ("route",): _route,
    ("pipeline", "list"): _pipeline_list, ("pipeline", "set"): _pipeline_set, ("pipeline", "remove"): _pipeline_remove,
    ("record", "start"): _record_start, ("record", "stop"): _record_stop, ("record", "list"): _record_list,
    ("screen", "list"): _screen_list, ("screen", "monitors"): _screen_refused("monitors"),
    ("screen", "click"): _screen_refused("click", "10", "10"), ("screen", "type"): _screen_refused("type", "hi"),
    ("screen", "keys"): _screen_refused("keys", "enter"), ("screen", "scroll"): _screen_refused("scroll", "--dy", "1"),
    ("tools",): _tools, ("bridge",): _bridge,
    ("avatar", "list"): _avatar_list, ("avatar", "start"): _avatar_start, ("avatar", "stop"): _avatar_stop,
    ("avatar", "say"): _avatar_say,
}


def leaves(parser: argparse.ArgumentParser,
           path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every runnable command under `parser`, by its words: {("ctl", "record", "list"): its parser, ...}."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: parser}
    return {k: v for name, p in subs[0].choices.items() for k, v in leaves(p, (*path, name)).items()}


def test_every_ctl_command_has_a_case():
    ctl_commands = {path[1:] for path in leaves(services.cli.build_parser()) if path[0] == "ctl"}
    assert len(ctl_commands) >= 22
    assert set(CASES) == ctl_commands, (f"ctl commands without a case here: {sorted(ctl_commands - set(CASES))}; "
                                        f"cases of no command: {sorted(set(CASES) - ctl_commands)}")


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("command", list(CASES), ids=" ".join)
def test_ctl_command_against_a_live_box(live, ctl, command, as_json):
    CASES[command](live, ctl, as_json)


def test_the_ctl_modules_import_each_other_only_through_hubcall():
    """ctl imports ctl_media, ctl_vision and ctl_call at the top; they import hubcall and tables, never ctl or
    each other, and no ctl module imports anything inside a function (the way a cycle is dodged)."""
    import ast

    here = Path(services.cli.__file__).parent
    for name in ("ctl", "ctl_media", "ctl_vision", "ctl_call", "ctl_screen", "ctl_tools", "ctl_bridge", "ctl_avatar",
                 "hubcall",
                 "boxconfig", "tables"):
        tree = ast.parse((here / f"{name}.py").read_text())
        top = {n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        inner = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and n not in top]
        assert not inner, f"services/cli/{name}.py imports inside a function at line(s) {inner}"
        cli = {a.name for n in top if isinstance(n, ast.ImportFrom) and n.module == "services.cli" for a in n.names}
        cli |= {n.module.rsplit(".", 1)[1] for n in top if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("services.cli.")}
        allowed = {"ctl": {"ctl_media", "ctl_vision", "ctl_call", "ctl_screen", "ctl_tools", "ctl_bridge", "ctl_avatar",
                           "hubcall", "tables"},
                   "hubcall": {"boxconfig"}}.get(
            name, {"hubcall", "tables"})
        assert cli <= allowed, f"services/cli/{name}.py imports {sorted(cli - allowed)} of services.cli"


# --- one config, read the same way by every command -------------------------------------------------
# Commands that do not read the box's config: `bus demo` runs its own streams under its own prefix,
# `demo` writes its own config, `units check` reads the unit files it is given.
NO_BOX_CONFIG = {("bus", "demo"), ("demo",), ("units", "check")}


def test_every_command_that_reads_the_box_takes_config():
    for path, parser in leaves(services.cli.build_parser()).items():
        options = {o for a in parser._actions for o in a.option_strings}
        if path in NO_BOX_CONFIG or path == ("config", "check"):   # check takes the file as its argument
            continue
        assert "--config" in options, f"`edgeroom {' '.join(path)}` cannot be pointed at a box's config"


def _edgeroom(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
    out = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=60,
                         env={**clean, **(env or {})})
    assert "Traceback" not in out.stderr, out.stderr
    return out


def _unit(rendered: str, name: str) -> str:
    """One unit's text out of `edgeroom units render`'s output."""
    return rendered.split(f"# --- {name}\n", 1)[1].split("# --- ", 1)[0]


def test_bus_ls_and_ctl_streams_see_the_same_rings_of_a_box_with_its_own_prefix(live, tmp_path):
    """The box's bus.prefix is not 'edgeroom': `bus ls` finds its rings from the config alone,
    by --config or by $EDGEROOM_CONFIG, exactly as `ctl streams` finds its hub."""
    assert live.prefix != "edgeroom"
    by_env = {"EDGEROOM_CONFIG": str(live.config)}
    hub = sorted(s["stream"] for s in json.loads(_edgeroom("ctl", "streams", "--json", env=by_env).stdout))
    for how in (["--config", str(live.config)], []):
        rows = json.loads(_edgeroom("bus", "ls", "--json", *how, env={} if how else by_env).stdout)
        # cam, and the call's video ring (made at its start, so decode attaches before the first unit)
        assert sorted(r["stream"] for r in rows) == hub == ["cam", "phone"], how
        assert rows[0]["producer_pid"] == live.services()["capture@cam"]["pid"]
        assert rows[1]["producer_pid"] == live.services()["rtp@phone"]["pid"]
    table = _edgeroom("bus", "ls", env=by_env).stdout
    assert table.splitlines()[1].split()[:4] == ["cam", "video", str(live.services()["capture@cam"]["pid"]), "alive"]
    # the config's environment override, and the command's own flag, in that order of strength
    other = _edgeroom("bus", "ls", env={**by_env, "EDGEROOM_BUS__PREFIX": "elsewhere"}).stdout
    assert other == "no streams under prefix 'elsewhere'\n"
    flag = _edgeroom("bus", "ls", "--prefix", live.prefix, env={**by_env, "EDGEROOM_BUS__PREFIX": "elsewhere"})
    assert flag.stdout.splitlines()[1].startswith("cam ")
    assert _edgeroom("bus", "gc", env=by_env).stdout == "nothing stale\n"   # nothing of the live box removed
    assert sorted(s.stream for s in framebus.list_streams(live.prefix)) == ["cam", "phone"]


def test_every_command_reads_the_box_config_from_the_same_place(live, tmp_path):
    """$EDGEROOM_CONFIG alone points ctl, bus, config check, units render and keys at one box;
    EDGEROOM_SECTION__KEY variables override its file for every one of them."""
    curve = tmp_path / "curve"
    cfg = tmp_path / "box.toml"
    cfg.write_text(live.config.read_text() + f'\n[control]\ncurve_dir = "{curve}"\n')
    env = {"EDGEROOM_CONFIG": str(cfg)}
    status = json.loads(_edgeroom("ctl", "status", "--json", env=env).stdout)
    assert status["services"][0]["pid"] == live.services()["hub"]["pid"]
    assert _edgeroom("config", "check", env=env).stdout.startswith(f"ok: {cfg}: 1 source(s); runs hub, capture@cam")
    capture = _unit(_edgeroom("units", "render", env=env).stdout, "edgeroom-capture@.service")
    assert "RestartSec=0.2s" in capture and "WatchdogSec=1.5s" in capture   # tests.appliance's [services.capture]
    keys = _edgeroom("keys", "init", env=env)
    assert keys.returncode == 0 and keys.stdout.startswith(f"hub key pair in {curve};"), keys.stderr
    assert (curve / "server.key").is_file()
    added = _edgeroom("keys", "add", "ops", env=env)
    assert added.returncode == 0 and (curve / "clients" / "ops.key_secret").is_file(), added.stderr
    # an override in the environment reaches every command the same way
    moved = {**env, "EDGEROOM_BOX__RUNTIME_DIR": str(tmp_path / "nobox")}
    unreachable = _edgeroom("ctl", "status", "--timeout", "0.5", env=moved)
    assert unreachable.returncode == 3 and f"no socket at {tmp_path}/nobox/control.sock" in unreachable.stderr
    units = _edgeroom("units", "render", env={**env, "EDGEROOM_SERVICES__CAPTURE__RESTART_SEC": "3"}).stdout
    assert "RestartSec=3s" in _unit(units, "edgeroom-capture@.service")
    nokeys = _edgeroom("keys", "init", env={"EDGEROOM_CONFIG": str(live.config)})
    assert nokeys.returncode == 1 and "give --dir, or set control.curve_dir" in nokeys.stderr
