"""What vision knows about each room right now: a note for an AI's context, and its changes.

RoomKit's `setup_video_vision` injected each vision result into an AI channel's context;
`setup_realtime_vision` pushed them into a realtime voice session. Here both are one
view per room, kept by the vision service from its detections and provider results:

* `vision.view {room}` answers with the view and its `note`: a fenced block, ready to put
  into a model's context as it is (streams in name order, newest facts only, bounded size);
* every change of a room's note body is published once as a `vision.view` event (the
  same data), so a realtime agent subscribes to one topic and never sees a duplicate:
  a note identical to the last one published (times aside) is not sent again.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from services.vision.types import Detection

__all__ = ["RoomViews", "StreamView"]

MAX_DESCRIPTION = 600   # characters of one stream's description in the note
MAX_STREAMS = 16        # streams shown in one room's note


@dataclass
class StreamView:
    stream: str
    description: str = ""
    labels: list[str] = field(default_factory=list)
    text: str = ""
    described_at: float = 0.0        # Unix time of the provider's answer
    detected: dict[str, int] = field(default_factory=dict)   # label -> count in the last detection
    best: float = 0.0
    detected_at: float = 0.0

    def line(self) -> str:
        parts = []
        if self.description:
            desc = self.description.strip().replace("\n", " ")
            parts.append(desc if len(desc) <= MAX_DESCRIPTION else desc[:MAX_DESCRIPTION - 1] + "…")
        if self.labels:
            parts.append("labels: " + ", ".join(self.labels[:12]))
        if self.detected:
            seen = ", ".join(f"{label} x{n}" if n > 1 else label for label, n in sorted(self.detected.items()))
            parts.append(f"detected: {seen}")  # no confidences: a note changes when what is seen changes
        if self.text:
            parts.append(f'text: "{self.text.strip()[:200]}"')
        return f"- {self.stream}: " + ("; ".join(parts) if parts else "nothing seen yet")

    def public(self) -> dict:
        return {"stream": self.stream, "description": self.description, "labels": self.labels, "text": self.text,
                "described_at": self.described_at, "detected": self.detected, "best": round(self.best, 4),
                "detected_at": self.detected_at}


class RoomViews:
    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, StreamView]] = {}
        self._published: dict[str, str] = {}

    def _stream(self, room: str, stream: str) -> StreamView:
        return self.rooms.setdefault(room, {}).setdefault(stream, StreamView(stream))

    def detections(self, room: str, stream: str, dets: list[Detection], wall: float | None = None) -> None:
        v = self._stream(room, stream)
        v.detected = dict(Counter(d.label for d in dets))
        v.best = max((d.confidence for d in dets), default=0.0)
        v.detected_at = wall or time.time()

    def result(self, room: str, stream: str, result: dict, wall: float | None = None) -> None:
        v = self._stream(room, stream)
        v.description = str(result.get("description") or "")
        v.labels = [str(x) for x in result.get("labels") or []]
        v.text = str(result.get("text") or "")
        v.described_at = wall or time.time()

    def _body(self, room: str) -> list[str]:
        streams = self.rooms.get(room, {})
        return [streams[name].line() for name in sorted(streams)[:MAX_STREAMS]]

    def view(self, room: str) -> dict:
        streams = self.rooms.get(room, {})
        updated = max((max(v.described_at, v.detected_at) for v in streams.values()), default=0.0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(updated)) if updated else "never"
        body = self._body(room) or ["- nothing seen yet"]
        note = "\n".join([f"```vision room={room} updated={stamp}", *body, "```"])
        return {"room": room, "updated": updated, "note": note,
                "streams": [streams[n].public() for n in sorted(streams)]}

    def changed(self, room: str) -> dict | None:
        """The room's view if its note body differs from the last one published, else None."""
        body = "\n".join(self._body(room))
        if self._published.get(room) == body:
            return None
        self._published[room] = body
        return self.view(room)
