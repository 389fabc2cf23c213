"""The hub over real ZeroMQ sockets: bad messages, exact topics, sync hooks, CURVE, the ctl CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from services.control import protocol
from services.control.client import Client, CommandFailed, CurveKeys, HookHandler, HubUnreachable, context
from tests.appliance import metric_value, read_json, wait_for

LIMIT = 262144


@pytest.fixture
def hub(box):
    """A hub on its own (no supervisor): `edgeroom service hub`."""
    b = box()
    b.spawn("service", "hub")
    wait_for(lambda: b.call("ping")["pong"], 10, f"the hub; log:\n{b.log()}")
    return b


def raw(b, frames: list[bytes], kind: int = zmq.DEALER, timeout: float = 2.0) -> dict | None:
    """Send raw frames on a fresh socket; the parsed reply, or None if none came."""
    sock = context().socket(kind)
    sock.linger = 0
    sock.connect(b.control)
    try:
        sock.send_multipart(frames)
        if not sock.poll(int(timeout * 1000)):
            return None
        return json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close()


def rejected(b, code: str) -> float:
    return metric_value(b.scrape(), "edgeroom_control_rejected_total", service="hub", code=code) or 0.0


@pytest.mark.parametrize("body, code", [
    (b"\xff\xfe garbage", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (b'{"v": 2, "id": 7, "cmd": "ping"}', "unsupported_version"),
    (b'{"v": 1, "id": 7, "cmd": "launch_missiles"}', "unknown_command"),
    (b'{"v": 1, "id": 7, "cmd": "ping", "args": [1]}', "bad_request"),
    (b'{"v": 1, "id": 7, "cmd": "sessions", "args": {"room": 5}}', "bad_args"),
    (b'{"v": 1, "id": 7, "cmd": "service.heartbeat", "args": {"service": "x", "pid": "1"}}', "bad_args"),
    (b'{"v": 1, "id": 7, "cmd": "service.heartbeat", "args": {"service": "x", "pid": 1, "started": 0, '
     b'"state": "ready", "rate": NaN}}', "bad_json"),
])
def test_bad_requests_get_an_error_reply_and_a_count(hub, body, code):
    reply = raw(hub, [b"", body])
    assert reply is not None, "the hub must answer, not hang"
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    if b'"id": 7' in body and code != "bad_json":
        assert reply["id"] == 7
    assert wait_for(lambda: rejected(hub, code) >= 1, 3, f"{code} counted")
    assert hub.call("ping")["pong"]


def test_oversized_and_misshapen_messages(hub):
    big = protocol.encode_request(1, "ping", {"pad": "x" * LIMIT})
    reply = raw(hub, [b"", big])
    assert reply["error"]["code"] == "too_large" and f"limit of {LIMIT} bytes" in reply["error"]["message"]
    assert raw(hub, [b"", b"{}", b"extra", b"frames"])["error"]["code"] == "bad_request"
    # past twice the limit libzmq cuts the connection: no reply, and the hub is unharmed
    assert raw(hub, [b"", b"x" * (2 * LIMIT + 1)], timeout=0.5) is None
    assert hub.call("ping")["pong"]
    assert wait_for(lambda: rejected(hub, "too_large") >= 1, 3, "too_large counted")


def test_req_socket_works_and_ids_come_back(hub):
    reply = raw(hub, [protocol.encode_request("abc", "ping")], kind=zmq.REQ)
    assert reply["ok"] and reply["id"] == "abc" and reply["result"]["version"] == protocol.VERSION


def test_a_flood_of_garbage_does_not_starve_real_clients(hub):
    sock = context().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(hub.control)
    for _ in range(2000):
        sock.send_multipart([b"", b"not json at all"])
    t0 = time.monotonic()
    assert hub.call("ping")["pong"]
    assert time.monotonic() - t0 < 2.0
    sock.close()


def test_topics_match_exactly_through_the_hub(hub):
    pub = context().socket(zmq.PUB)
    pub.linger = 0
    pub.connect(hub.events_in)
    topics = ["hook.ON_VIDEO_SESSION_STARTED", "hook.ON_VIDEO_SESSION_STARTED_LATE", "hook.ON_VIDEO_SESSION"]
    with hub.subscriber("hook.ON_VIDEO_SESSION_STARTED") as exact, hub.subscriber("hook.*") as every:
        def send_all():
            for i, topic in enumerate(topics):
                pub.send_multipart(protocol.encode_event(protocol.Event(topic, {"i": i}, "test")))
        first = wait_for(lambda: (send_all(), every.recv(timeout=0.2))[1], 5, "publisher connected")
        got_every = {first.topic}
        while (e := every.recv(timeout=0.5)) is not None:
            got_every.add(e.topic)
        got_exact = set()
        while (e := exact.recv(timeout=0.2)) is not None:
            got_exact.add(e.topic)
    pub.close()
    assert got_exact == {"hook.ON_VIDEO_SESSION_STARTED"}
    assert got_every == set(topics)


def test_malformed_events_are_dropped_and_counted(hub):
    pub = context().socket(zmq.PUB)
    pub.linger = 0
    pub.connect(hub.events_in)
    good = protocol.encode_event(protocol.Event("hook.ON_VIDEO_DETECTION", {"labels": ["person"]}, "test"))
    bad = [[b"hook.X\0", b"{not json"], [b"no-nul", good[1]], [b"hook.ON_VIDEO_DETECTION\0", b'{"v":1}'],
           [b"one frame"], [b"hook.X\0", b'{"v": 1, "topic": "hook.X", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}"]]
    with hub.subscriber("*") as sub:
        wait_for(lambda: ([pub.send_multipart(f) for f in bad], pub.send_multipart(good),
                          sub.recv(timeout=0.2))[2], 5, "publisher connected")
        while (e := sub.recv(timeout=0.3)) is not None:
            assert e.topic == "hook.ON_VIDEO_DETECTION" and e.data == {"labels": ["person"]}
    pub.close()
    total = sum(metric_value(hub.scrape(), "edgeroom_events_rejected_total", service="hub", code=c) or 0
                for c in ("bad_json", "bad_request"))
    assert total >= 5
    assert hub.call("ping")["pong"]


def _handler(b, decision, data=None, delay=0.0):
    def answer(call_data: dict):
        time.sleep(delay)
        return decision, data
    handler = HookHandler(b.control, "BEFORE_BRIDGE_VIDEO", answer)
    handler.register()
    stop = threading.Event()
    thread = threading.Thread(target=handler.serve, kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()
    return handler, stop, thread


@pytest.mark.parametrize("decision, data", [("allow", None), ("block", None), ("replace", {"layout": "grid"})])
def test_sync_hook_handler_decides(hub, decision, data):
    handler, stop, thread = _handler(hub, decision, data)
    try:
        result = hub.call("hook.call", {"hook": "BEFORE_BRIDGE_VIDEO", "data": {"from": "a", "to": "b"}})
    finally:
        stop.set()
        thread.join()
        handler.close()
    assert result["reason"] == "answered" and result["decision"] == decision and result["data"] == data
    assert result["latency_ms"] < 300


def test_sync_hook_policy_applies_without_a_handler_or_past_the_deadline(hub):
    result = hub.call("hook.call", {"hook": "BEFORE_BRIDGE_VIDEO", "data": {}})
    assert (result["decision"], result["reason"]) == ("block", "no_handler")  # on_timeout = "block" in the box
    handler, stop, thread = _handler(hub, "allow", delay=0.6)  # the deadline is 0.3 s
    try:
        t0 = time.monotonic()
        late = hub.call("hook.call", {"hook": "BEFORE_BRIDGE_VIDEO", "data": {}})
        took = time.monotonic() - t0
    finally:
        stop.set()
        thread.join()
        handler.close()
    assert (late["decision"], late["reason"]) == ("block", "timeout")
    assert 0.25 < took < 0.6
    with pytest.raises(CommandFailed) as err:
        hub.call("hook.call", {"hook": "NOT_A_HOOK", "data": {}})
    assert err.value.code == "not_found"
    scrape = hub.scrape()
    assert metric_value(scrape, "edgeroom_hook_calls_total", service="hub", hook="BEFORE_BRIDGE_VIDEO",
                        outcome="timeout") == 1


def edgeroom(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=30)


def test_tcp_needs_an_authorized_curve_key(box):
    b = box('[control]\ntcp_control = "127.0.0.1:0"\ntcp_events = "127.0.0.1:0"\ncurve_dir = "{dir}/curve"\n')
    keys = b.dir / "curve"
    assert edgeroom("keys", "init", "--dir", str(keys)).returncode == 0
    assert edgeroom("keys", "add", "ops", "--dir", str(keys)).returncode == 0
    assert edgeroom("keys", "add", "mallory", "--dir", str(keys)).returncode == 0
    (keys / "authorized" / "mallory.key").unlink()  # made, then not authorized
    b.spawn("service", "hub")
    wait_for(lambda: b.call("ping"), 10, f"hub; log:\n{b.log()}")
    tcp = read_json(b.rundir / "endpoints.json")["tcp_control"]
    assert tcp.startswith("tcp://127.0.0.1:") and not tcp.endswith(":0")

    good = CurveKeys.from_files(keys / "server.key", keys / "clients" / "ops.key_secret")
    with Client(tcp, timeout=2.0, curve=good) as client:
        assert client.call("ping")["pong"]
    bad = CurveKeys.from_files(keys / "server.key", keys / "clients" / "mallory.key_secret")
    with Client(tcp, timeout=0.5, curve=bad) as client, pytest.raises(HubUnreachable):
        client.call("ping")
    with Client(tcp, timeout=0.5) as plain, pytest.raises(HubUnreachable):
        plain.call("ping")
    refused = wait_for(lambda: metric_value(b.scrape(), "edgeroom_control_auth_refused_total", service="hub"),
                       5, "refusal counted")
    assert refused >= 1
    out = edgeroom("ctl", "status", "--endpoint", tcp, "--server-key", str(keys / "server.key"),
                   "--client-key", str(keys / "clients" / "ops.key_secret"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["services"][0]["service"] == "hub"


def test_a_hub_key_file_without_its_secret_is_named_not_a_type_error(tmp_path):
    from services.control.keys import init_server, load_server

    init_server(tmp_path)
    assert load_server(tmp_path)[1]  # the pair as made: public and secret
    # the public half copied over the secret file (an easy slip when handing keys out)
    (tmp_path / "server.key_secret").write_bytes((tmp_path / "server.key").read_bytes())
    with pytest.raises(ValueError, match=r"server\.key_secret holds no secret key.*keys init --force"):
        load_server(tmp_path)


def test_ctl_without_a_hub_says_where_it_looked_and_exits_3(tmp_path):
    t0 = time.monotonic()
    out = edgeroom("ctl", "status", "--runtime-dir", str(tmp_path))
    assert out.returncode == 3
    assert time.monotonic() - t0 < 5
    assert f"no socket at {tmp_path}/control.sock" in out.stderr and "edgeroom run" in out.stderr
    (tmp_path / "control.sock").touch()  # a socket file nobody serves: timeout, not a hang
    out = edgeroom("ctl", "status", "--runtime-dir", str(tmp_path), "--timeout", "0.5")
    assert out.returncode == 3 and "nothing answered" in out.stderr


def test_ctl_commands_against_a_running_box(box):
    b = box()
    b.run()
    b.wait_ready("hub", "capture@cam", "supervisor")
    wait_for(lambda: [s for s in b.call("sessions") if s["tracks"]], 5, "the camera's track (after its first frame)")
    env = ["--config", str(b.config)]
    status = edgeroom("ctl", "status", *env)
    assert status.returncode == 0 and "capture@cam" in status.stdout and "RESTARTS" in status.stdout
    sessions = json.loads(edgeroom("ctl", "sessions", "--room", "lobby", "--json", *env).stdout)
    assert [s["session"] for s in sessions] == ["cam"] and sessions[0]["tracks"][0]["stream"] == "cam"
    streams = edgeroom("ctl", "streams", *env)
    assert "capture@cam" in streams.stdout
    bad = edgeroom("ctl", "call", "nope", *env)
    assert bad.returncode == 1 and "unknown_command" in bad.stderr
    events = subprocess.Popen([sys.executable, "-m", "services.cli", "ctl", "events", "service.state",
                               "--count", "1", "--json", *env], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert events.stderr.readline().startswith("# listening on")
    os.kill(b.services()["capture@cam"]["pid"], signal.SIGKILL)
    line = events.communicate(timeout=15)[0].strip()
    assert json.loads(line)["topic"] == "service.state"


def test_a_heartbeat_with_garbage_metrics_keeps_the_rest_and_the_hub(hub):
    body = {"service": "capture@junk", "pid": 4242, "started": 0.0, "state": "ready", "sessions": [], "streams": [],
            "metrics": [{"name": "edgeroom_ok", "type": "gauge", "help": "fine", "samples": [
                ["edgeroom_ok", {}, 1.5], ["edgeroom_ok", {"bad label": "x"}, 2], ["edgeroom_ok", {}, True]]},
                7, {"name": "not_ours", "type": "gauge", "samples": []}, {"name": "edgeroom_x", "type": "bogus"}]}
    assert hub.call("service.heartbeat", body)["state"] == "ready"
    assert hub.call("metrics")["services"]["capture@junk"] == {"edgeroom_ok": 1.5}
    text = hub.scrape()
    assert metric_value(text, "edgeroom_ok", service="capture@junk") == 1.5
    assert metric_value(text, "edgeroom_hub_metrics_dropped_total", service="hub") == 5, text + hub.log()


def test_service_exits_reported_by_systemd_are_counted_by_result(hub):
    args = {"service": "capture@cam1", "result": "watchdog", "code": "killed", "status": "ABRT"}
    assert hub.call("service.exited", args) == {"counted": True}
    with pytest.raises(CommandFailed) as err:
        hub.call("service.exited", {**args, "result": "exploded"})
    assert err.value.code == "bad_args" and "$SERVICE_RESULT" in err.value.message
    with pytest.raises(CommandFailed):
        hub.call("service.exited", {**args, "service": "Not A Service"})
    assert metric_value(hub.scrape(), "edgeroom_service_exits_total", service="capture@cam1", result="watchdog") == 1


def test_ctl_as_a_user_outside_the_group_is_told_so(tmp_path):
    """Run ctl as `nobody` against a runtime dir of mode 0750: the message says permission, not 'no hub'."""
    import shutil
    import sysconfig

    rundir = Path(tempfile.mkdtemp(prefix="erperm", dir="/tmp"))
    try:
        rundir.chmod(0o750)
        (rundir / "control.sock").touch(mode=0o660)
        paths = sysconfig.get_paths()
        env = {"PATH": "/usr/bin:/bin",
               "PYTHONPATH": f"{Path(__file__).parent.parent}:{paths['purelib']}:{paths['platlib']}"}
        runuser, python = shutil.which("runuser"), "/usr/bin/python3"
        probe = subprocess.run([runuser, "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()], python,
                                "-c", "import zmq, services.cli"], capture_output=True, text=True) if runuser else None
        if probe is None or probe.returncode != 0:
            pytest.skip(f"cannot run ctl as another user here: {probe.stderr[-200:] if probe else 'no runuser'}")
        out = subprocess.run([runuser, "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()], python,
                              "-m", "services.cli", "ctl", "status", "--runtime-dir", str(rundir)],
                             capture_output=True, text=True, timeout=30)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    assert out.returncode == 3
    assert f"permission denied on {rundir}/control.sock" in out.stderr and "usermod -aG edgeroom" in out.stderr


def test_a_reply_to_a_peer_that_left_is_counted_not_warned(hub):
    """A caller that leaves before its answer (a hook call past its deadline here; a client that
    gave up, a service that stopped) costs the hub a lost reply: counted, logged as info."""
    pushed = threading.Event()

    def answer(_data: dict):
        pushed.set()
        time.sleep(0.6)   # past the 0.3 s deadline: the hub answers the caller with the policy
        return "allow", None
    handler = HookHandler(hub.control, "BEFORE_BRIDGE_VIDEO", answer)
    handler.register()
    stop = threading.Event()
    thread = threading.Thread(target=handler.serve, kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()
    caller = context().socket(zmq.DEALER)
    caller.connect(hub.control)
    try:
        caller.send_multipart([b"", protocol.encode_request("gone-1", "hook.call",
                                                            {"hook": "BEFORE_BRIDGE_VIDEO", "data": {}})])
        assert pushed.wait(5), "the hub never pushed the call to the handler"
        caller.close(linger=0)   # gone before the deadline
        wait_for(lambda: metric_value(hub.scrape(), "edgeroom_control_replies_lost_total", service="hub") == 1,
                 5, f"the lost reply counted; log:\n{hub.log()}")
    finally:
        stop.set()
        thread.join()
        handler.close()
    lines = [line for line in hub.log().splitlines() if "a reply could not be delivered" in line]
    assert lines and all(" info " in line and "its peer has left" in line for line in lines), lines


def test_a_goodbye_waits_for_its_own_reply_not_an_earlier_one(hub):
    """A stopping service says service.bye and closes its socket: it must wait for that reply,
    or the hub answers a closed socket. A heartbeat's reply already waiting does not count."""
    from services.control.endpoints import endpoints_for
    from services.runtime.hublink import HubLink

    link = HubLink(endpoints_for(hub.rundir), "capture@bye")
    try:
        assert link.request("ping")
        assert link.sock.poll(5000)   # the ping's reply is there, unread
        assert link.goodbye("service.bye", {"service": "capture@bye", "pid": os.getpid()}, 5.0)
        assert not link.sock.poll(200), "the goodbye's reply was not the last one read"
    finally:
        link.close()
    time.sleep(0.3)
    assert not metric_value(hub.scrape(), "edgeroom_control_replies_lost_total", service="hub")
