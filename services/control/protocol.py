"""The control-plane wire format: request/reply envelopes, errors, event frames and topics.

Everything here is pure (bytes in, objects out) so it can be tested without sockets and
so the hub, the client and the services parse one way. JSON, not msgpack: every language
has it in its standard library, `edgeroom ctl --json` and a packet capture read the same
text, and control messages are small and rare (a heartbeat a second per service), so its
cost does not matter. Never pickle. docs/protocol.md is the human version of this file.

A request body:  {"v": 1, "id": "c1", "cmd": "status", "args": {...}}
A reply body:    {"v": 1, "type": "reply", "id": "c1", "ok": true, "result": ...}
             or  {"v": 1, "type": "reply", "id": "c1", "ok": false,
                  "error": {"code": "unknown_command", "message": "..."}}
An event:        two frames, [topic + b"\\0", body], body {"v": 1, "topic": ..., "data": ...}
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "VERSION", "ProtocolError", "Request", "Event", "ERROR_CODES", "TOPIC_END",
    "parse_request", "encode_request", "encode_reply", "encode_error", "parse_reply",
    "topic_frame", "subscription", "json_bytes", "check_topic", "parse_event", "encode_event", "split_envelope",
    "JsonObject",
]

# A decoded JSON object. Its values are whatever the peer sent (checked where they are used),
# so Any is the honest type for them.
JsonObject = dict[str, Any]

VERSION = 1
TOPIC_END = b"\0"  # ends every topic frame, so a subscription can match exactly
_TOPIC = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_COMMAND = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")
_MAX_ID = 64

# Stable error codes: programs branch on these, people read the message.
ERROR_CODES = {
    "bad_json": "the body is not a UTF-8 JSON object",
    "bad_request": "the envelope lacks a field or has one of the wrong type",
    "unsupported_version": "the envelope's v is not a version this hub speaks",
    "too_large": "the message is over control.max_message_bytes",
    "unknown_command": "no such command",
    "bad_args": "the command's arguments are missing, unknown or of the wrong type",
    "not_found": "the named service, stream, room, session or hook does not exist",
    "no_handler": "a synchronous hook has no registered handler",
    "timeout": "a peer did not answer in time",
    "unavailable": "the command cannot run now (the service is stopping or not ready)",
    "internal": "the hub failed; the message says how (a bug: please report it)",
}


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    id: str | int
    cmd: str
    args: JsonObject = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    topic: str
    data: JsonObject
    source: str = ""
    seq: int = 0
    time: float = 0.0
    mono_ns: int = 0


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], bytes]:
    """ROUTER frames -> (routing envelope to echo back, body).

    A REQ peer arrives as [identity, b"", body], a DEALER as [identity, body] or
    [identity, b"", body]; anything with more frames is malformed.
    """
    if len(frames) == 2 or (len(frames) == 3 and frames[1] == b""):
        return frames[:-1], frames[-1]
    raise ProtocolError("bad_request", f"expected a routing id, an optional empty frame and one body frame; "
                                       f"got {len(frames)} frames")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _load_object(body: bytes, limit: int | None) -> JsonObject:
    if limit is not None and len(body) > limit:
        rid = _readable_id(body)
        raise ProtocolError("too_large", f"message of {len(body)} bytes is over the limit of {limit} bytes", rid)
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_no_constant)  # NaN/Infinity are not JSON
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("bad_json", f"body is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("bad_json", "body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"body must be a JSON object, got {type(obj).__name__}")
    return obj


def _readable_id(body: bytes) -> Any:
    """The id of an oversized request, so its sender can match the too_large reply (the body is
    bounded by ZMQ_MAXMSGSIZE, so parsing it costs little)."""
    try:
        rid = _load_object(body, None).get("id")
    except ProtocolError:
        return None
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


def _check_version(obj: JsonObject, request_id: Any) -> None:
    v = obj.get("v")
    if type(v) is not int or v != VERSION:  # not true, not 1.0: an integer
        raise ProtocolError("unsupported_version",
                            f"protocol version {v!r} is not supported (this hub speaks {VERSION})", request_id)


def _request_id(obj: JsonObject) -> str | int:
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and len(rid) > _MAX_ID):
        raise ProtocolError("bad_request", f"'id' must be a string of at most {_MAX_ID} chars or an integer")
    return rid


def parse_request(body: bytes, limit: int) -> Request:
    obj = _load_object(body, limit)
    rid = obj.get("id") if isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool) else None
    _check_version(obj, rid)
    rid = _request_id(obj)
    unknown = sorted(set(obj) - {"v", "id", "cmd", "args"})
    if unknown:
        raise ProtocolError("bad_request", f"unknown envelope field(s): {', '.join(unknown)}", rid)
    cmd, args = obj.get("cmd"), obj.get("args", {})
    if not isinstance(cmd, str) or not _COMMAND.match(cmd):
        raise ProtocolError("bad_request", f"'cmd' must match {_COMMAND.pattern}, got {cmd!r}", rid)
    if not isinstance(args, dict):
        raise ProtocolError("bad_request", f"'args' must be an object, got {type(args).__name__}", rid)
    return Request(rid, cmd, args)


def json_bytes(obj: JsonObject) -> bytes:
    """Compact JSON, NaN refused (it is not JSON)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str).encode()


def encode_request(rid: str | int, cmd: str, args: JsonObject | None = None) -> bytes:
    return json_bytes({"v": VERSION, "id": rid, "cmd": cmd, "args": args or {}})


def encode_reply(rid: Any, result: Any) -> bytes:
    return json_bytes({"v": VERSION, "type": "reply", "id": rid, "ok": True, "result": result})


def encode_error(rid: Any, code: str, message: str) -> bytes:
    return json_bytes({"v": VERSION, "type": "reply", "id": rid, "ok": False,
                       "error": {"code": code, "message": message}})


def parse_reply(body: bytes, limit: int) -> JsonObject:
    """A message a client receives: a reply, or a hook call or service call pushed by the hub."""
    obj = _load_object(body, limit)
    _check_version(obj, obj.get("id"))
    if obj.get("type") not in ("reply", "hook_call", "service_call"):
        raise ProtocolError("bad_request", f"unknown message type {obj.get('type')!r}")
    return obj


def check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not _TOPIC.match(topic):
        raise ProtocolError("bad_request", f"topic must match {_TOPIC.pattern}, got {topic!r}")
    return topic


def topic_frame(topic: str) -> bytes:
    return check_topic(topic).encode() + TOPIC_END


def subscription(pattern: str) -> bytes:
    """What to pass to SUBSCRIBE: exact unless the pattern ends in '*' ('' or '*' is everything)."""
    if pattern in ("", "*"):
        return b""
    if pattern.endswith("*"):
        return pattern[:-1].encode()
    return topic_frame(pattern)


def encode_event(event: Event) -> list[bytes]:
    body = {"v": VERSION, "topic": event.topic, "source": event.source, "seq": event.seq,
            "time": event.time, "mono_ns": event.mono_ns, "data": event.data}
    return [topic_frame(event.topic), json_bytes(body)]


def parse_event(frames: list[bytes], limit: int) -> Event:
    if len(frames) != 2:
        raise ProtocolError("bad_request", f"an event is 2 frames (topic, body), got {len(frames)}")
    raw_topic, body = frames
    if not raw_topic.endswith(TOPIC_END):
        raise ProtocolError("bad_request", "topic frame must end with a NUL byte")
    topic = check_topic(raw_topic[:-1].decode("utf-8", "replace"))
    obj = _load_object(body, limit)
    _check_version(obj, None)
    if obj.get("topic") != topic:
        raise ProtocolError("bad_request", f"body topic {obj.get('topic')!r} differs from frame topic {topic!r}")
    if not isinstance(obj.get("data"), dict):
        raise ProtocolError("bad_request", "event 'data' must be an object")
    for key, kinds in _EVENT_FIELDS.items():
        value = obj.get(key, 0 if key != "source" else "")
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ProtocolError("bad_request", f"event '{key}' must be {_EVENT_WHAT[key]}, got {type(value).__name__}")
    return Event(topic, obj["data"], obj.get("source", ""), obj.get("seq", 0), float(obj.get("time", 0.0)),
                 obj.get("mono_ns", 0))


_EVENT_FIELDS: dict[str, type | tuple[type, ...]] = {"source": str, "seq": int, "time": (int, float), "mono_ns": int}
_EVENT_WHAT = {"source": "a string", "seq": "an integer", "time": "a number", "mono_ns": "an integer"}
