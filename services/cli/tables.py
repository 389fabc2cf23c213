"""Plain text tables and human units for the CLI, and the tables of the hub's own replies
(status, streams, sessions, rooms, metrics, commands) and of its events, as `edgeroom ctl`
and `edgeroom demo` print them."""
from __future__ import annotations

import json
import time

__all__ = ["table", "fmt_bytes", "fmt_duration", "status_table", "streams_table", "sessions_table", "rooms_table",
           "metrics_table", "commands_table", "event_line"]


def table(rows: list[list], header: list[str]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# --- the hub's replies (docs/protocol.md) ---------------------------------------------------
def status_table(result: dict) -> str:
    rows = [[s["service"], s["state"], s["pid"], fmt_duration(s["uptime"]), s["restarts"], f"{s['rate']:.1f}",
             s["status"]] for s in result["services"]]
    out = table(rows, ["SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "RATE/s", "STATUS"])
    return f"box {result['box']}   metrics {result['metrics_url'] or 'off'}\n{out}"


def streams_table(result: list) -> str:
    if not result:
        return "no streams on the bus"
    rows = [[s["stream"], s["kind"], s["service"] or "-", s["status"], f"{s['rate_hz']:.1f}", s["items"],
             len(s["consumers"]), s["drops"]] for s in result]
    return table(rows, ["STREAM", "KIND", "SERVICE", "STATUS", "RATE/s", "ITEMS", "CONSUMERS", "DROPS"])


def _track(t: dict) -> str:
    """id:stream; a send track (a call's route) that is not sending says its state."""
    state = t.get("state", "sending") if t.get("direction") == "send" else "sending"
    return f"{t['id']}:{t.get('stream', '')}" + ("" if state == "sending" else f" ({state})")


def sessions_table(result: list) -> str:
    if not result:
        return "no sessions"
    rows = [[s["session"], s["room"], s["service"], s["kind"],
             ", ".join(_track(t) for t in s["tracks"])] for s in result]
    return table(rows, ["SESSION", "ROOM", "SERVICE", "KIND", "TRACKS"])


def rooms_table(result: dict) -> str:
    if not result:
        return "no rooms"
    rows = [[room, len(ss), ", ".join(s["session"] for s in ss)] for room, ss in sorted(result.items())]
    return table(rows, ["ROOM", "SESSIONS", "WHO"])


def metrics_table(result: dict) -> str:
    rows = [[svc, name, f"{value:g}"] for svc, fams in result["services"].items() for name, value in fams.items()]
    return f"scrape {result['metrics_url'] or 'off'}\n" + table(rows, ["SERVICE", "METRIC", "VALUE"])


def commands_table(result: dict) -> str:
    return table([[k, v] for k, v in result.items()], ["COMMAND", "WHAT"])


def event_line(event) -> str:
    """One event as a line: local time, topic, source, the data as compact JSON."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{int(event.time % 1 * 1000):03d}"
    return f"{stamp} {event.topic} {event.source} {json.dumps(event.data, separators=(',', ':'))}"
