"""Rooms, sessions and tracks, and the hooks that fire when they change.

Services own their sessions (capture owns the session of its source) and report the whole
set in every heartbeat; the hub diffs what it knew against what it hears and publishes
ON_VIDEO_SESSION_STARTED/ENDED and ON_VIDEO_TRACK_ADDED/REMOVED exactly once per change.

A track is received (`direction` "recv", the default: what a camera or a peer brings in,
on the stream named by `stream`) or sent ("send": a call's outbound route, services/calls/,
with the `stream` it sends and its `state`: sending, switching, waiting, refused). A track
that keeps its id but says something new (a route switched to another stream) is updated
in place, without a hook.

The book is saved to the runtime directory on every change. A restarted hub loads it and
treats those sessions as remembered: a heartbeat from the same process confirms them
without firing anything again; a session nobody confirms within `grace` seconds ends.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.control.protocol import ProtocolError

__all__ = ["Session", "SessionBook", "check_sessions"]

STARTED, ENDED = "hook.ON_VIDEO_SESSION_STARTED", "hook.ON_VIDEO_SESSION_ENDED"
TRACK_ADDED, TRACK_REMOVED = "hook.ON_VIDEO_TRACK_ADDED", "hook.ON_VIDEO_TRACK_REMOVED"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,127}$")
_STREAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")   # framebus's rule for a stream's name
SEND_STATES = ("sending", "switching", "waiting", "refused")  # a route's state (services/calls/route.py)
Change = tuple[str, dict]


@dataclass
class Session:
    id: str
    room: str
    service: str
    pid: int
    kind: str = "video"
    tracks: dict[str, dict] = field(default_factory=dict)
    confirmed: bool = True
    since: float = field(default_factory=time.time)   # when it started (Unix time); survives hub restarts
    note: str = ""                                    # what the service says of it (a call: "audio only: ...")
    accepts: dict = field(default_factory=dict)       # what its send tracks take (a call's RouteReader.accepts())

    def public(self) -> dict:
        out = {"session": self.id, "room": self.room, "service": self.service, "kind": self.kind,
               "since": self.since, "tracks": list(self.tracks.values())}
        if self.note:
            out["note"] = self.note
        if self.accepts:
            out["accepts"] = self.accepts
        return out


def _check_track(track: object) -> dict:
    if not isinstance(track, dict) or not isinstance(track.get("id"), str) or not _ID.match(track["id"]):
        raise ProtocolError("bad_args", "each track must be an object with an 'id' matching " + _ID.pattern)
    if track.get("kind", "video") not in ("video", "audio"):
        raise ProtocolError("bad_args", f"track {track['id']!r}: kind must be video or audio")
    direction = track.get("direction", "recv")
    if direction not in ("recv", "send"):
        raise ProtocolError("bad_args", f"track {track['id']!r}: direction must be recv or send")
    stream = track.get("stream", "")
    if not isinstance(stream, str) or (direction == "send" and not _STREAM.match(stream)):
        raise ProtocolError("bad_args", f"track {track['id']!r}: a send track's 'stream' is the stream it sends, "
                                        "a stream name of the bus")
    if direction == "send" and track.get("state", "sending") not in SEND_STATES:
        raise ProtocolError("bad_args", f"track {track['id']!r}: state must be one of {', '.join(SEND_STATES)}")
    return track


def check_sessions(sessions: list) -> list[dict]:
    """Schema of the sessions a heartbeat carries; raises ProtocolError(bad_args)."""
    for s in sessions:
        if not isinstance(s, dict) or not isinstance(s.get("id"), str) or not _ID.match(s["id"]):
            raise ProtocolError("bad_args", "each session must be an object with an 'id' matching " + _ID.pattern)
        if not isinstance(s.get("room", "default"), str) or not isinstance(s.get("tracks", []), list):
            raise ProtocolError("bad_args", f"session {s['id']!r}: 'room' must be a string and 'tracks' a list")
        accepts = s.get("accepts", {})
        if not isinstance(accepts, dict) or not all(isinstance(v, (list, bool, int)) for v in accepts.values()):
            raise ProtocolError("bad_args", f"session {s['id']!r}: 'accepts' must be an object of lists and flags "
                                            "(what its send tracks take)")
        for t in s.get("tracks", []):
            _check_track(t)
    return sessions


class SessionBook:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.sessions: dict[str, Session] = {}   # key: session id (unique per box)
        self.remembered_until = 0.0

    # --- changes -------------------------------------------------------------------
    def _end(self, s: Session, reason: str) -> list[Change]:
        del self.sessions[s.id]
        out = [(TRACK_REMOVED, {**self._ctx(s), "track": t, "reason": reason}) for t in s.tracks.values()]
        return out + [(ENDED, {**s.public(), "reason": reason})]

    @staticmethod
    def _ctx(s: Session) -> dict:
        return {"session": s.id, "room": s.room, "service": s.service}

    def _start(self, service: str, pid: int, raw: dict) -> list[Change]:
        s = Session(raw["id"], raw.get("room", "default"), service, pid, str(raw.get("kind", "video")),
                    note=str(raw.get("note", ""))[:300], accepts=raw.get("accepts") or {})
        self.sessions[s.id] = s
        return [(STARTED, {**s.public(), "tracks": []})] + self._tracks(s, raw.get("tracks", []))

    def _tracks(self, s: Session, tracks: list[dict]) -> list[Change]:
        now = {t["id"]: t for t in tracks}
        out = [(TRACK_REMOVED, {**self._ctx(s), "track": s.tracks.pop(tid), "reason": "removed"})
               for tid in [t for t in s.tracks if t not in now]]
        for tid, t in now.items():
            if tid not in s.tracks:
                out.append((TRACK_ADDED, {**self._ctx(s), "track": t}))
            s.tracks[tid] = t  # the same track may say more now (a route's stream, its state): no hook
        return out

    def update(self, service: str, pid: int, sessions: list[dict]) -> list[Change]:
        """A service's full set of sessions, as its heartbeat reports it."""
        out: list[Change] = []
        reported = {raw["id"]: raw for raw in sessions}
        for s in [s for s in self.sessions.values() if s.service == service]:
            if s.pid != pid and reported.get(s.id, {}).get("resumed"):
                s.pid = pid        # a restarted service took the session back (a SIP call): it goes on
            elif s.pid != pid:
                out += self._end(s, "service restarted")
            elif s.id not in reported:
                out += self._end(s, "ended")
        for sid, raw in reported.items():
            s = self.sessions.get(sid)
            if s is not None and s.service != service:
                continue  # another service owns this id; the first owner wins
            if s is None:
                out += self._start(service, pid, raw)
            else:
                s.confirmed = True
                s.note = str(raw.get("note", ""))[:300]
                s.accepts = raw.get("accepts") or {}
                out += self._tracks(s, raw.get("tracks", []))
        return out

    def end_service(self, service: str, reason: str) -> list[Change]:
        out: list[Change] = []
        for s in [s for s in self.sessions.values() if s.service == service]:
            out += self._end(s, reason)
        return out

    def expire(self, now: float) -> list[Change]:
        """End remembered sessions that no service confirmed within the grace period."""
        if not self.remembered_until or now < self.remembered_until:
            return []
        self.remembered_until = 0.0
        out: list[Change] = []
        for s in [s for s in self.sessions.values() if not s.confirmed]:
            out += self._end(s, "not confirmed after hub restart")
        return out

    # --- views and persistence -------------------------------------------------------
    def rooms(self) -> dict[str, list[dict]]:
        rooms: dict[str, list[dict]] = {}
        for s in sorted(self.sessions.values(), key=lambda s: s.id):
            rooms.setdefault(s.room, []).append(s.public())
        return rooms

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(s) for s in self.sessions.values()]))
        os.replace(tmp, self.path)

    def load(self, now: float, grace: float) -> int:
        """Remember the sessions a previous hub saved; returns how many."""
        if self.path is None or not self.path.exists():
            return 0
        try:
            saved = json.loads(self.path.read_text())
            loaded = {s.id: s for s in (Session(**{**raw, "confirmed": False}) for raw in saved)}
        except (ValueError, TypeError) as exc:
            raise ValueError(f"hub state file {self.path} is unreadable ({exc}); starting without it") from None
        self.sessions.update(loaded)  # all or nothing: a bad entry leaves the book as it was
        self.remembered_until = now + grace if self.sessions else 0.0
        return len(self.sessions)
