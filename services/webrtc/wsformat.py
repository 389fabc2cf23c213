"""RoomKit's WebSocket video wire format, with edgeroom's extensions: pure functions, no I/O.

Binary message (one video frame), exactly RoomKit's:

    [u8 flags][u32 big-endian seq][payload]
    flags bit 0     keyframe
    flags bits 1-3  codec: 0 h264 (Annex B access unit), 1 vp8 (one frame), 2 raw_rgb24 (W*H*3 bytes)
    flags bits 4-7  reserved: 0 (a message with one set is refused: `reserved_flags`)

A binary message of 5 bytes or less carries no payload and is ignored, as RoomKit does
(`parse` returns None). Text messages are JSON objects with a `type`:

    {"type": "config", "codec": "h264"|"vp8"|"raw_rgb24", "width": W, "height": H}
        what the sender sends; raw_rgb24 needs width and height (every payload is W*H*3 bytes),
        h264/vp8 may give 0 (unknown)
    {"type": "keyframe_request"}            (edgeroom extension, both directions; an optional "reason")

Errors are `WsError(reason, message)`: `reason` is a metric label (`short_header`,
`unknown_codec`, `reserved_flags`, `bad_json`, `unknown_type`, `bad_codec`, `bad_size`),
`message` says what was wrong in words. docs/websocket.md describes the whole protocol.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CODECS",
    "FLAG_KEYFRAME",
    "HEADER_SIZE",
    "MAX_SIDE",
    "WsConfig",
    "WsError",
    "WsFrame",
    "WsKeyframeRequest",
    "codec_id",
    "config_text",
    "frame",
    "keyframe_request_text",
    "pack_header",
    "parse",
    "parse_text",
    "set_seq",
]

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size          # 5
SEQ = struct.Struct(">I")
CODECS = ("h264", "vp8", "raw_rgb24")    # the codec id is the index
_CODEC_IDS = {name: i for i, name in enumerate(CODECS)}
FLAG_KEYFRAME = 0x01
_CODEC_SHIFT = 1
_CODEC_MASK = 0x0E
_RESERVED = 0xF0
MAX_SIDE = 16384                   # the largest width or height a config may say


class WsError(ValueError):
    """A message that breaks the format: `reason` (a metric label) and the problem in words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class WsFrame:
    """One binary message. `payload` is a view of the message: no copy."""

    seq: int
    keyframe: bool
    codec: str            # h264, vp8, raw_rgb24
    payload: memoryview


@dataclass(frozen=True, slots=True)
class WsConfig:
    codec: str
    width: int            # 0: not said (h264, vp8)
    height: int


@dataclass(frozen=True, slots=True)
class WsKeyframeRequest:
    reason: str = ""


def codec_id(codec: str) -> int:
    """The wire id of `codec`; WsError(unknown_codec) for one the format lacks."""
    try:
        return _CODEC_IDS[codec]
    except KeyError:
        raise WsError("unknown_codec", f"codec {codec!r} is not one of {', '.join(CODECS)}") from None


def pack_header(seq: int, keyframe: bool, codec: str) -> bytes:
    """The 5-byte header of a frame (seq wraps at 2**32)."""
    return HEADER.pack((codec_id(codec) << _CODEC_SHIFT) | (FLAG_KEYFRAME if keyframe else 0), seq & 0xFFFFFFFF)


def frame(seq: int, keyframe: bool, codec: str, payload: bytes | bytearray | memoryview) -> bytearray:
    """Header + payload as one buffer for `send_bytes`: the payload copied once. `set_seq` restamps it."""
    out = bytearray(pack_header(seq, keyframe, codec))
    out += payload
    return out


def set_seq(buf: bytearray, seq: int) -> None:
    """Stamp `seq` into a frame built by `frame` (or any header-first buffer), in place."""
    SEQ.pack_into(buf, 1, seq & 0xFFFFFFFF)


def parse(data: bytes | bytearray | memoryview) -> WsFrame | None:
    """A binary message as a frame; None for one of 5 bytes or less (ignored, as RoomKit does);
    WsError(unknown_codec | reserved_flags) for a header the format does not allow."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.nbytes <= HEADER_SIZE:
        return None
    flags, seq = HEADER.unpack_from(view)
    if flags & _RESERVED:
        raise WsError("reserved_flags", f"flags 0x{flags:02x} set reserved bits 4-7 (only bit 0, keyframe, and "
                                        "bits 1-3, the codec, are defined)")
    cid = (flags & _CODEC_MASK) >> _CODEC_SHIFT
    if cid >= len(CODECS):
        raise WsError("unknown_codec", f"codec id {cid} in flags 0x{flags:02x} is not one of "
                                       f"{', '.join(f'{i} {c}' for i, c in enumerate(CODECS))}")
    return WsFrame(seq, bool(flags & FLAG_KEYFRAME), CODECS[cid], view[HEADER_SIZE:])


# ------------------------------------------------------------------ text messages
def _size(obj: dict[str, Any], key: str, required: bool) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIDE:
        raise WsError("bad_size", f"config {key} must be an integer from 0 to {MAX_SIDE}, got {value!r}")
    if required and value == 0:
        raise WsError("bad_size", f"a raw_rgb24 config needs a positive {key} (each payload is width*height*3 "
                                  "bytes)")
    return value


def parse_text(text: str | bytes) -> WsConfig | WsKeyframeRequest:
    """A text message: a config or a keyframe request; WsError(bad_json | unknown_type | bad_codec | bad_size)."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WsError("bad_json", f"a text message must be a JSON object: {exc}") from None
    if not isinstance(obj, dict):
        raise WsError("bad_json", f"a text message must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "config":
        codec = obj.get("codec")
        if codec not in _CODEC_IDS:
            raise WsError("bad_codec", f"config codec must be one of {', '.join(CODECS)}, got {codec!r}")
        raw = codec == "raw_rgb24"
        return WsConfig(str(codec), _size(obj, "width", raw), _size(obj, "height", raw))
    if kind == "keyframe_request":
        reason = obj.get("reason", "")
        return WsKeyframeRequest(reason[:100] if isinstance(reason, str) else "")
    raise WsError("unknown_type", f"unknown message type {kind!r} (known: config, keyframe_request)")


def config_text(codec: str, width: int, height: int) -> str:
    codec_id(codec)
    return json.dumps({"type": "config", "codec": codec, "width": int(width), "height": int(height)})


def keyframe_request_text(reason: str = "") -> str:
    return json.dumps({"type": "keyframe_request", "reason": reason} if reason else {"type": "keyframe_request"})
