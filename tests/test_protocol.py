"""Unit tests of services/control/protocol.py: the control-plane wire format.

Pure functions (bytes in, objects out), plus one test over real ZeroMQ sockets that shows the
topic frame's terminating NUL makes an exact subscription exact. tests/golden/protocol.json pins
the bytes the module produces, for implementations in other languages.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq

from services.control import protocol
from services.control.protocol import Event, ProtocolError, Request

LIMIT = 4096
GOLDEN = json.loads((Path(__file__).parent / "golden" / "protocol.json").read_text(encoding="utf-8"))


def perr(body: bytes, limit: int = LIMIT) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(body, limit)
    assert info.value.code in protocol.ERROR_CODES
    assert str(info.value) == info.value.message
    return info.value


def jb(obj) -> bytes:
    return json.dumps(obj).encode()


# --- requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("rid, cmd, args", [
    ("c1", "status", {}),
    (0, "service.heartbeat", {"service": "capture@cam1", "pid": 12, "nested": {"a": [1, 2.5, None]}}),
    (-5, "hook.call", {"hook": "BEFORE_BRIDGE_VIDEO"}),
    ("x" * 64, "a", {"unicode": "caf\u00e9 \u2603"}),
    ("", "rooms-list_2.x", {}),
])
def test_request_round_trip(rid, cmd, args):
    body = protocol.encode_request(rid, cmd, args)
    assert protocol.parse_request(body, LIMIT) == Request(rid, cmd, args)


def test_encode_request_without_args_sends_empty_object():
    body = protocol.encode_request("c9", "status")
    assert json.loads(body) == {"v": 1, "id": "c9", "cmd": "status", "args": {}}
    assert protocol.parse_request(body, LIMIT).args == {}


def test_missing_args_means_empty():
    assert protocol.parse_request(b'{"v":1,"id":"a","cmd":"status"}', LIMIT) == Request("a", "status", {})


def test_bad_utf8_is_bad_json():
    e = perr(b'{"v":1,"id":"a","cmd":"\xff\xfe"}')
    assert e.code == "bad_json"
    assert e.message.startswith("body is not UTF-8 JSON: ")
    assert e.request_id is None


@pytest.mark.parametrize("body", [b"", b"not json", b'{"v":1,', b"{'v': 1}"])
def test_not_json(body):
    e = perr(body)
    assert e.code == "bad_json"
    assert e.message.startswith("body is not UTF-8 JSON: ")


@pytest.mark.parametrize("body, kind", [(b"[1, 2]", "list"), (b'"text"', "str"), (b"3", "int"), (b"null", "NoneType")])
def test_json_not_an_object(body, kind):
    e = perr(body)
    assert e.code == "bad_json"
    assert e.message == f"body must be a JSON object, got {kind}"


def test_size_limit_is_exact():
    body = protocol.encode_request("c1", "status", {"pad": ""})
    padded = protocol.encode_request("c1", "status", {"pad": "x" * (200 - len(body))})
    assert len(padded) == 200
    assert protocol.parse_request(padded, limit=200).cmd == "status"  # len == limit: accepted
    e = perr(padded, limit=199)                                          # limit + 1: rejected
    assert e.code == "too_large"
    assert e.message == "message of 200 bytes is over the limit of 199 bytes"
    assert e.request_id == "c1"  # read anyway (bounded by ZMQ_MAXMSGSIZE) so the sender can match the reply
    assert perr(b"\xff" * 300, limit=199).request_id is None  # unreadable: no id to carry


def test_too_large_wins_over_bad_json():
    assert perr(b"\xff" * 11, limit=10).code == "too_large"


@pytest.mark.parametrize("rid, kind", [
    (None, "missing"), (1.5, "float"), ([1], "list"), ({"a": 1}, "dict"), (True, "bool"), (False, "bool"),
    ("x" * 65, "too long"),
])
def test_bad_request_id(rid, kind):
    obj = {"v": 1, "cmd": "status"}
    if kind != "missing":
        obj["id"] = rid
    e = perr(jb(obj))
    assert e.code == "bad_request"
    assert e.message == "'id' must be a string of at most 64 chars or an integer"
    assert e.request_id is None


def test_id_of_exactly_64_chars_is_accepted():
    assert protocol.parse_request(jb({"v": 1, "id": "i" * 64, "cmd": "status"}), LIMIT).id == "i" * 64


@pytest.mark.parametrize("obj, shown", [
    ({"v": 2, "id": "c1", "cmd": "status"}, "2"),
    ({"id": "c1", "cmd": "status"}, "None"),
    ({"v": "1", "id": "c1", "cmd": "status"}, "'1'"),
    ({"v": 0, "id": "c1", "cmd": "status"}, "0"),
    ({"v": None, "id": "c1", "cmd": "status"}, "None"),
])
def test_wrong_version(obj, shown):
    e = perr(jb(obj))
    assert e.code == "unsupported_version"
    assert e.message == f"protocol version {shown} is not supported (this hub speaks 1)"
    assert e.request_id == "c1"  # readable, so the error reply can name the request


def test_wrong_version_with_integer_id_carries_it():
    assert perr(jb({"v": 3, "id": 42, "cmd": "status"})).request_id == 42


def test_wrong_version_is_checked_before_the_id():
    e = perr(jb({"v": 2, "id": 1.5, "cmd": "status"}))
    assert e.code == "unsupported_version"
    assert e.request_id is None


def test_boolean_version_is_rejected():
    e = perr(jb({"v": True, "id": "c1", "cmd": "status"}))
    assert e.code == "unsupported_version"


def test_unknown_envelope_fields():
    e = perr(jb({"v": 1, "id": "c7", "cmd": "status", "zeta": 1, "alpha": 2}))
    assert e.code == "bad_request"
    assert e.message == "unknown envelope field(s): alpha, zeta"
    assert e.request_id == "c7"


def test_reply_fields_in_a_request_are_unknown():
    e = perr(jb({"v": 1, "id": 3, "cmd": "status", "type": "reply"}))
    assert (e.code, e.message, e.request_id) == ("bad_request", "unknown envelope field(s): type", 3)


@pytest.mark.parametrize("cmd", [None, 5, "", "Status", "1status", "sta tus", "status!", "a" * 65, ["status"]])
def test_bad_command_name(cmd):
    obj = {"v": 1, "id": "c3"}
    if cmd is not None:
        obj["cmd"] = cmd
    e = perr(jb(obj))
    assert e.code == "bad_request"
    assert e.message == f"'cmd' must match ^[a-z][a-z0-9_.\\-]{{0,63}}$, got {cmd!r}"
    assert e.request_id == "c3"


def test_command_name_of_64_chars_is_accepted():
    assert protocol.parse_request(jb({"v": 1, "id": 1, "cmd": "a" * 64}), LIMIT).cmd == "a" * 64


@pytest.mark.parametrize("args, kind", [([], "list"), ("x", "str"), (None, "NoneType"), (3, "int")])
def test_args_not_an_object(args, kind):
    e = perr(jb({"v": 1, "id": 9, "cmd": "status", "args": args}))
    assert e.code == "bad_request"
    assert e.message == f"'args' must be an object, got {kind}"
    assert e.request_id == 9


def test_every_error_code_is_documented():
    codes = {"bad_json", "bad_request", "unsupported_version", "too_large"}
    assert codes <= set(protocol.ERROR_CODES)
    assert all(isinstance(v, str) and v for v in protocol.ERROR_CODES.values())


# --- ROUTER envelopes ------------------------------------------------------------------------

def test_split_envelope_req_style():
    env, body = protocol.split_envelope([b"\x00ident", b"", b"{}"])
    assert env == [b"\x00ident", b""]
    assert body == b"{}"


def test_split_envelope_dealer_style():
    env, body = protocol.split_envelope([b"ident", b'{"v":1}'])
    assert env == [b"ident"]
    assert body == b'{"v":1}'


def test_split_envelope_echo_reconstructs_the_frames():
    frames = [b"id", b"", b"body"]
    env, body = protocol.split_envelope(frames)
    assert env + [body] == frames


@pytest.mark.parametrize("frames, n", [
    ([b"ident"], 1),
    ([b"ident", b"x", b"body"], 3),  # 3 frames whose middle one is not the empty delimiter
    ([b"ident", b"", b"body", b"more"], 4),
    ([b"a", b"b", b"", b"body"], 4),
])
def test_split_envelope_malformed(frames, n):
    with pytest.raises(ProtocolError) as info:
        protocol.split_envelope(frames)
    assert info.value.code == "bad_request"
    assert info.value.message == (f"expected a routing id, an optional empty frame and one body frame; "
                                  f"got {n} frames")


def test_split_envelope_no_frames_is_malformed():
    with pytest.raises(ProtocolError) as info:
        protocol.split_envelope([])
    assert info.value.code == "bad_request"


# --- replies -------------------------------------------------------------------------------

@pytest.mark.parametrize("rid, result", [("c1", {"a": [1, 2]}), (5, None), (None, "text"), ("c2", [])])
def test_reply_round_trip(rid, result):
    obj = protocol.parse_reply(protocol.encode_reply(rid, result), LIMIT)
    assert obj == {"v": 1, "type": "reply", "id": rid, "ok": True, "result": result}


def test_error_round_trip():
    obj = protocol.parse_reply(protocol.encode_error("c4", "not_found", "no service 'x'"), LIMIT)
    assert obj == {"v": 1, "type": "reply", "id": "c4", "ok": False,
                   "error": {"code": "not_found", "message": "no service 'x'"}}


def test_error_from_a_protocol_error_round_trips():
    e = perr(jb({"v": 1, "id": "q", "cmd": "BAD"}))
    obj = protocol.parse_reply(protocol.encode_error(e.request_id, e.code, e.message), LIMIT)
    assert obj["id"] == "q" and obj["ok"] is False and obj["error"]["code"] == "bad_request"


def test_parse_reply_accepts_hook_calls():
    body = protocol.json_bytes({"v": 1, "type": "hook_call", "id": None, "call": "h1", "hook": "X", "data": {}})
    assert protocol.parse_reply(body, LIMIT)["call"] == "h1"


@pytest.mark.parametrize("typ", ["event", None, "Reply", 1])
def test_parse_reply_rejects_unknown_type(typ):
    obj = {"v": 1, "id": "c1", "ok": True, "result": None}
    if typ is not None:
        obj["type"] = typ
    with pytest.raises(ProtocolError) as info:
        protocol.parse_reply(jb(obj), LIMIT)
    assert info.value.code == "bad_request"
    assert info.value.message == f"unknown message type {typ!r}"


def test_parse_reply_checks_version_size_and_json():
    with pytest.raises(ProtocolError) as info:
        protocol.parse_reply(jb({"v": 2, "type": "reply", "id": "r9"}), LIMIT)
    assert (info.value.code, info.value.request_id) == ("unsupported_version", "r9")
    with pytest.raises(ProtocolError) as info:
        protocol.parse_reply(protocol.encode_reply("c", "x" * 100), 50)
    assert info.value.code == "too_large"
    with pytest.raises(ProtocolError) as info:
        protocol.parse_reply(b"[]", LIMIT)
    assert info.value.code == "bad_json"


def test_json_bytes_is_compact_and_refuses_nan():
    assert protocol.json_bytes({"a": [1, 2], "b": "c"}) == b'{"a":[1,2],"b":"c"}'
    with pytest.raises(ValueError):
        protocol.json_bytes({"x": float("nan")})


# --- topics and subscriptions ---------------------------------------------------------------

STARTED = "hook.ON_VIDEO_SESSION_STARTED"


def test_topic_frame_ends_with_nul():
    assert protocol.topic_frame(STARTED) == STARTED.encode() + b"\0"
    assert protocol.TOPIC_END == b"\0"


def test_exact_subscription_matches_only_its_topic():
    sub = protocol.subscription(STARTED)
    assert sub == STARTED.encode() + b"\0"
    assert protocol.topic_frame(STARTED).startswith(sub)
    assert not protocol.topic_frame(STARTED + "_X").startswith(sub)
    assert not protocol.topic_frame(STARTED + "X").startswith(sub)
    assert not protocol.topic_frame("hook.ON_VIDEO_SESSION").startswith(sub)


def test_shorter_exact_subscription_does_not_match_longer_topics():
    sub = protocol.subscription("hook.ON_VIDEO_SESSION")
    assert protocol.topic_frame("hook.ON_VIDEO_SESSION").startswith(sub)
    assert not protocol.topic_frame(STARTED).startswith(sub)


def test_wildcard_subscription_is_a_prefix():
    sub = protocol.subscription("hook.*")
    assert sub == b"hook."
    for topic in (STARTED, STARTED + "_X", "hook.ON_VIDEO_SESSION", "hook.BEFORE_BRIDGE_VIDEO"):
        assert protocol.topic_frame(topic).startswith(sub)
    assert not protocol.topic_frame("service.state").startswith(sub)
    assert not protocol.topic_frame("hooks.x").startswith(sub)


@pytest.mark.parametrize("pattern", ["", "*"])
def test_everything_subscription(pattern):
    assert protocol.subscription(pattern) == b""


@pytest.mark.parametrize("topic", ["", ".hook", "-x", "hook x", "hook/x", "h\u00e9", "a" * 129, "hook\0x", None, 5])
def test_invalid_topics_rejected(topic):
    with pytest.raises(ProtocolError) as info:
        protocol.topic_frame(topic)
    assert info.value.code == "bad_request"
    assert info.value.message.startswith("topic must match ")
    with pytest.raises(ProtocolError):
        protocol.check_topic(topic)


def test_topic_length_limit():
    assert protocol.check_topic("a" * 128) == "a" * 128


def test_invalid_exact_subscription_rejected():
    with pytest.raises(ProtocolError):
        protocol.subscription("bad topic")


# --- events --------------------------------------------------------------------------------

def test_event_round_trip():
    ev = Event(STARTED, {"session": "cam1", "tracks": [{"id": "v0"}]}, "hub", 3, 1700000000.5, 99)
    frames = protocol.encode_event(ev)
    assert len(frames) == 2 and frames[0] == protocol.topic_frame(STARTED)
    assert protocol.parse_event(frames, LIMIT) == ev


def test_event_defaults_round_trip():
    ev = Event("service.state", {})
    assert protocol.parse_event(protocol.encode_event(ev), LIMIT) == ev


@pytest.mark.parametrize("field, value, message", [
    ("seq", True, "event 'seq' must be an integer, got bool"),
    ("seq", "7", "event 'seq' must be an integer, got str"),
    ("time", "now", "event 'time' must be a number, got str"),
    ("mono_ns", 1.5, "event 'mono_ns' must be an integer, got float"),
    ("source", 3, "event 'source' must be a string, got int"),
])
def test_event_fields_of_the_wrong_type_are_rejected(field, value, message):
    body = protocol.json_bytes({"v": 1, "topic": "t", "data": {"k": 1}, field: value})
    with pytest.raises(ProtocolError) as info:
        protocol.parse_event([b"t\0", body], LIMIT)
    assert (info.value.code, info.value.message) == ("bad_request", message)


def test_event_optional_fields_default():
    body = protocol.json_bytes({"v": 1, "topic": "t", "data": {"k": 1}})
    assert protocol.parse_event([b"t\0", body], LIMIT) == Event("t", {"k": 1}, "", 0, 0.0, 0)


@pytest.mark.parametrize("text", [b'{"v": 1, "id": 1, "cmd": "ping", "args": {"x": NaN}}',
                                  b'{"v": 1, "id": 1, "cmd": "ping", "args": {"x": -Infinity}}'])
def test_nan_and_infinity_are_not_json(text):
    assert perr(text).code == "bad_json"


def test_float_version_is_rejected():
    assert perr(jb({"v": 1.0, "id": "c1", "cmd": "status"})).code == "unsupported_version"


def _event_body(**over) -> bytes:
    obj = {"v": 1, "topic": "a.b", "source": "hub", "seq": 1, "time": 1.0, "mono_ns": 1, "data": {}}
    obj.update(over)
    return protocol.json_bytes({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize("frames, code, message", [
    ([b"a.b\0"], "bad_request", "an event is 2 frames (topic, body), got 1"),
    ([b"a.b\0", _event_body(), b""], "bad_request", "an event is 2 frames (topic, body), got 3"),
    ([b"a.b", _event_body()], "bad_request", "topic frame must end with a NUL byte"),
    ([b"a.c\0", _event_body()], "bad_request", "body topic 'a.b' differs from frame topic 'a.c'"),
    ([b"a.b\0", _event_body(topic=...)], "bad_request", "body topic None differs from frame topic 'a.b'"),
    ([b"a.b\0", _event_body(data=[1])], "bad_request", "event 'data' must be an object"),
    ([b"a.b\0", _event_body(data=...)], "bad_request", "event 'data' must be an object"),
    ([b"a.b\0", _event_body(v=2)], "unsupported_version", "protocol version 2 is not supported (this hub speaks 1)"),
    ([b"a.b\0", _event_body(v=...)], "unsupported_version",
     "protocol version None is not supported (this hub speaks 1)"),
    ([b"a.b\0", b"[]"], "bad_json", "body must be a JSON object, got list"),
])
def test_malformed_events(frames, code, message):
    with pytest.raises(ProtocolError) as info:
        protocol.parse_event(frames, LIMIT)
    assert (info.value.code, info.value.message) == (code, message)


@pytest.mark.parametrize("raw_topic", [b"\0", b"bad topic\0", b"\xff\xfe\0", b"a\0b\0"])
def test_event_with_invalid_topic_frame(raw_topic):
    with pytest.raises(ProtocolError) as info:
        protocol.parse_event([raw_topic, _event_body()], LIMIT)
    assert info.value.code == "bad_request"
    assert info.value.message.startswith("topic must match ")


def test_event_too_large():
    frames = protocol.encode_event(Event("a.b", {"pad": "x" * 100}))
    assert protocol.parse_event(frames, len(frames[1])).data == {"pad": "x" * 100}
    with pytest.raises(ProtocolError) as info:
        protocol.parse_event(frames, len(frames[1]) - 1)
    assert info.value.code == "too_large"


def test_encode_event_rejects_invalid_topic():
    with pytest.raises(ProtocolError):
        protocol.encode_event(Event("no spaces allowed", {}))


# --- golden wire bytes ---------------------------------------------------------------------

def _b(text: str) -> bytes:
    return text.encode("utf-8")


@pytest.mark.parametrize("case", GOLDEN["requests"], ids=lambda c: str(c["id"]))
def test_golden_requests(case):
    wire = _b(case["wire"])
    assert protocol.encode_request(case["id"], case["cmd"], case["args"]) == wire
    assert protocol.parse_request(wire, LIMIT) == Request(case["id"], case["cmd"], case["args"])


@pytest.mark.parametrize("case", GOLDEN["parse_only_requests"])
def test_golden_foreign_requests_parse(case):
    assert protocol.parse_request(_b(case["wire"]), LIMIT) == Request(case["id"], case["cmd"], case["args"])


@pytest.mark.parametrize("case", GOLDEN["replies"], ids=lambda c: str(c["id"]))
def test_golden_replies(case):
    wire = _b(case["wire"])
    assert protocol.encode_reply(case["id"], case["result"]) == wire
    assert protocol.parse_reply(wire, LIMIT) == {"v": 1, "type": "reply", "id": case["id"], "ok": True,
                                                 "result": case["result"]}


@pytest.mark.parametrize("case", GOLDEN["errors"], ids=lambda c: c["code"])
def test_golden_errors(case):
    wire = _b(case["wire"])
    assert protocol.encode_error(case["id"], case["code"], case["message"]) == wire
    obj = protocol.parse_reply(wire, LIMIT)
    assert obj["ok"] is False and obj["error"] == {"code": case["code"], "message": case["message"]}


@pytest.mark.parametrize("case", GOLDEN["events"], ids=lambda c: c["topic"])
def test_golden_events(case):
    ev = Event(case["topic"], case["data"], case["source"], case["seq"], case["time"], case["mono_ns"])
    frames = [_b(f) for f in case["frames"]]
    assert frames[0].endswith(b"\0")
    assert protocol.encode_event(ev) == frames
    assert protocol.parse_event(frames, LIMIT) == ev


# --- real ZeroMQ: exact subscriptions through XPUB/SUB ----------------------------------------

def _recv(sock: zmq.Socket, timeout_ms: int = 5000):
    assert sock.poll(timeout_ms, zmq.POLLIN), "nothing arrived in time"
    return sock.recv_multipart()


def test_xpub_exact_subscription_over_ipc():
    ctx = zmq.Context.instance()
    tmp = tempfile.mkdtemp(prefix="erp", dir="/tmp")
    endpoint = f"ipc://{tmp}/ev.sock"
    pub = ctx.socket(zmq.XPUB)
    sub = ctx.socket(zmq.SUB)
    try:
        pub.bind(endpoint)
        sub.connect(endpoint)
        sentinel = "test.sentinel"
        sub.subscribe(protocol.subscription(STARTED))
        sub.subscribe(protocol.subscription(sentinel))
        # The XPUB sees each subscription as b"\x01" + prefix; once both are in, filtering is in force.
        seen = {_recv(pub)[0] for _ in range(2)}
        assert seen == {b"\x01" + protocol.subscription(STARTED), b"\x01" + protocol.subscription(sentinel)}

        for topic in (STARTED + "_LATE", "hook.ON_VIDEO_SESSION", STARTED, sentinel):
            pub.send_multipart(protocol.encode_event(Event(topic, {"topic": topic}, "test")))
        # Messages on one connection keep their order: when the sentinel arrives, everything
        # published before it that passed the filter has arrived too.
        got = []
        while True:
            ev = protocol.parse_event(_recv(sub), LIMIT)
            got.append(ev.topic)
            if ev.topic == sentinel:
                break
        assert got == [STARTED, sentinel]
        assert not sub.poll(0)
    finally:
        sub.close(linger=0)
        pub.close(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)


def test_deeply_nested_json_is_bad_json_not_a_crash():
    deep = b'{"v": 1, "id": 1, "cmd": "ping", "args": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    e = perr(deep, limit=1 << 20)
    assert (e.code, e.message) == ("bad_json", "body is nested too deeply")
    event = [b"t\0", b'{"v": 1, "topic": "t", "data": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"]
    with pytest.raises(ProtocolError) as info:
        protocol.parse_event(event, 1 << 20)
    assert info.value.code == "bad_json"
