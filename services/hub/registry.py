"""The hub's registry of services, kept from their heartbeats.

States: starting (heartbeats, not ready yet), ready, degraded (the service says so, or
its heartbeats are late), stale (none for `stale_after` seconds), stopped (it said goodbye).
A heartbeat from a new pid under a known id is a restart: the count goes up.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from services.control.protocol import ProtocolError

__all__ = ["ServiceRecord", "Registry", "check_heartbeat", "STATES"]

STATES = ("starting", "ready", "degraded", "stale", "stopped")
_ID = re.compile(r"^[a-z]+(@[A-Za-z0-9][A-Za-z0-9_.\-]{0,63})?$")


@dataclass
class ServiceRecord:
    id: str
    kind: str
    pid: int
    started: float
    state: str = "starting"
    reported: str = "starting"
    status: str = ""
    rate: float = 0.0
    last_seen: float = 0.0
    restarts: int = 0
    streams: list = field(default_factory=list)

    def row(self, now: float, wall: float) -> dict:
        return {"service": self.id, "kind": self.kind, "state": self.state, "pid": self.pid,
                "uptime": max(0.0, wall - self.started), "restarts": self.restarts, "rate": self.rate,
                "status": self.status, "last_seen": round(now - self.last_seen, 3), "streams": self.streams}


def _need(body: dict, key: str, kind: type | tuple, what: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError("bad_args", f"heartbeat '{key}' must be {what}, got {type(value).__name__}")
    return value


def check_heartbeat(body: dict) -> dict:
    """Schema of service.heartbeat's arguments; returns them or raises ProtocolError(bad_args)."""
    sid = _need(body, "service", str, "a service id")
    if not _ID.match(sid):
        raise ProtocolError("bad_args", f"service id {sid!r} must look like 'kind' or 'kind@instance'")
    _need(body, "pid", int, "an integer")
    _need(body, "started", (int, float), "a number")
    if body.get("state") not in ("starting", "ready", "degraded"):
        raise ProtocolError("bad_args", f"heartbeat 'state' must be starting, ready or degraded, "
                                        f"got {body.get('state')!r}")
    for key in ("sessions", "streams", "metrics"):
        if not isinstance(body.get(key, []), list):
            raise ProtocolError("bad_args", f"heartbeat '{key}' must be a list")
    rate = body.get("rate", 0.0)
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise ProtocolError("bad_args", "heartbeat 'rate' must be a number")
    return body


class Registry:
    def __init__(self, heartbeat_interval: float, stale_after: float) -> None:
        self.interval, self.stale_after = heartbeat_interval, stale_after
        self.services: dict[str, ServiceRecord] = {}

    def heartbeat(self, body: dict, now: float) -> tuple[ServiceRecord, str | None, bool]:
        """Record a heartbeat; returns (record, previous state or None if new, restarted?)."""
        sid, pid = body["service"], body["pid"]
        rec = self.services.get(sid)
        previous = rec.state if rec else None
        restarted = rec is not None and rec.pid != pid
        if rec is None or restarted:
            restarts = (rec.restarts + 1) if rec else 0
            rec = self.services[sid] = ServiceRecord(sid, sid.split("@")[0], pid, float(body["started"]),
                                                     restarts=restarts)
        rec.reported, rec.last_seen = body["state"], now
        rec.status, rec.rate = str(body.get("status", ""))[:200], float(body.get("rate", 0.0))
        rec.streams = [s for s in body.get("streams", []) if isinstance(s, str)]
        rec.state = rec.reported
        return rec, previous, restarted

    def bye(self, sid: str, pid: int) -> ServiceRecord | None:
        rec = self.services.get(sid)
        if rec is None or rec.pid != pid:
            return None
        rec.state = "stopped"
        return rec

    def sweep(self, now: float) -> list[tuple[ServiceRecord, str]]:
        """Apply lateness: returns (record, previous state) for every record whose state changed."""
        changed = []
        for rec in self.services.values():
            if rec.state == "stopped":
                continue
            age = now - rec.last_seen
            state = "stale" if age > self.stale_after else "degraded" if age > 2.5 * self.interval else rec.reported
            if state != rec.state:
                changed.append((rec, rec.state))
                rec.state = state
        return changed

    def rows(self, now: float, wall: float) -> list[dict]:
        return [rec.row(now, wall) for rec in sorted(self.services.values(), key=lambda r: r.id)]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for rec in self.services.values():
            counts[rec.state] += 1
        return counts
