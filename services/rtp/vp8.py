"""VP8 over RTP (RFC 7741): frames from packets, packets from frames.

The payload descriptor is read and written by aiortc's `VpxPayloadDescriptor`. In, a frame
starts with a packet whose descriptor has S=1 and partition 0, and ends at the marker (or
a new timestamp); a continuation without its start, or a start inside a frame, breaks the
frame, which is then dropped whole (the caller marks the next frame damaged). A keyframe is
a frame whose first payload byte has the P bit clear (RFC 6386 9.1). Out, a frame is cut
into payloads of at most `max_payload` bytes, each with a descriptor carrying a 15-bit
picture id that counts frames.
"""
from __future__ import annotations

from aiortc.codecs.vpx import VpxPayloadDescriptor

from services.rtp.h264 import Au

__all__ = ["Vp8Depacketizer", "Vp8Packetizer"]


class Vp8Depacketizer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._broken = ""
        self._keyframe = False
        self.started = False
        self._in_frame = False

    def lost(self) -> None:
        if self.started:
            self._broken = self._broken or "loss"

    def add(self, payload: bytes, marker: bool) -> tuple[str, Au | None]:
        refused = self._add(payload)
        if refused:
            self._broken = self._broken or refused
        self.started = True
        return refused, self.end() if marker else None

    def _add(self, payload: bytes) -> str:
        try:
            descr, data = VpxPayloadDescriptor.parse(payload)
        except ValueError:
            return "bad_payload"
        if not data:
            return "truncated"
        if descr.partition_start and descr.partition_id == 0:
            if self._in_frame and self._parts:
                return "bad_vp8"          # a frame began inside another
            self._in_frame = True
            self._keyframe = not data[0] & 0x01
        elif not self._in_frame:
            return "bad_vp8"              # a continuation without its start
        self._parts.append(data)
        return ""

    def end(self) -> Au | None:
        if not self.started:
            return None
        parts, broken, key = self._parts, self._broken, self._keyframe
        self._parts, self._broken, self._keyframe, self.started, self._in_frame = [], "", False, False, False
        if not parts and not broken:
            return None
        return Au(b"".join(parts), key, broken)


class Vp8Packetizer:
    def __init__(self, max_payload: int, picture_id: int = 0) -> None:
        self.max = max_payload
        self.picture_id = picture_id & 0x7FFF

    def packetize(self, frame: bytes) -> list[bytes]:
        descr = VpxPayloadDescriptor(partition_start=1, partition_id=0, picture_id=self.picture_id)
        first = bytes(descr)
        descr.partition_start = 0
        rest = bytes(descr)
        self.picture_id = (self.picture_id + 1) & 0x7FFF
        view = memoryview(frame)
        room = self.max - len(first)
        count = max(1, -(-len(view) // room))
        step = -(-len(view) // count)
        return [b"".join((first if i == 0 else rest, view[i * step:(i + 1) * step])) for i in range(count)]
