"""`edgeroom ctl call dial|hangup|list`: the box's SIP calls (services/sip/).

`ctl call NAME [JSON]` sends any command of the protocol; these three words are the SIP verbs
(no command of the protocol is named dial, hangup or list).

    edgeroom ctl call dial sip:alice@192.0.2.7 --room lobby     # waits until the call is up or refused
    edgeroom ctl call dial sip:door@10.0.0.9:5080;transport=tcp --no-video
    edgeroom ctl call list
    edgeroom ctl call hangup sip-3f9a1c
"""
from __future__ import annotations

import argparse
from typing import Any

from services.cli import hubcall
from services.cli.tables import table

__all__ = ["VERBS", "add_options", "cmd_call"]

VERBS = ("dial", "hangup", "list")

DIAL_WAIT = 45.0     # the SIP service answers within 40 s (a peer that rings that long is given up)


def _media(row: dict[str, Any]) -> str:
    parts = []
    for kind, m in sorted(row.get("media", {}).items()):
        mode = f" mode {m['mode']}" if "mode" in m else ""
        parts.append(f"{kind} {m['codec']}/{m['pt']}{mode}")
    return ", ".join(parts) or "-"


def _numbers(row: dict[str, Any]) -> tuple[str, str, str, str]:
    media = row.get("media", {}).values()
    packets = f"{sum(m.get('packets_in', 0) for m in media)}/{sum(m.get('packets_out', 0) for m in media)}"
    lost = str(sum(m.get("lost", 0) for m in media))
    jitter = max((m.get("jitter", 0.0) for m in media), default=0.0)
    kbps = sum(m.get("kbps_in", 0.0) for m in media)
    return packets, lost, f"{jitter * 1000:.1f}", f"{kbps:.0f}"


def _calls_table(result: dict[str, Any]) -> str:
    rows = result.get("calls", [])
    if not rows:
        return f"no calls (SIP on {result.get('listen', '?')}, {result.get('transports', '')})"
    return table([[r["call"], r["direction"], r["state"], r["room"], r["peer"], _media(r), f"{r['duration']:.0f}s",
                   *_numbers(r), "; ".join(r.get("notes", []))[:60]] for r in rows],
                 ["CALL", "DIR", "STATE", "ROOM", "PEER", "MEDIA", "UP", "PKTS IN/OUT", "LOST", "JITTER MS",
                  "KBIT/S IN", "NOTE"])


def cmd_call(args: argparse.Namespace) -> int:
    """`ctl call dial URI`, `ctl call hangup CALL`, `ctl call list` (ctl.py's `call` hands these three over)."""
    want = {"dial": 1, "hangup": 1, "list": 0}[args.name]
    if len(args.rest) != want:
        raise ValueError(f"ctl call {args.name} takes {'no argument' if not want else 'one argument'}: "
                         + {"dial": "the SIP URI", "hangup": "the call id (from `ctl call list`)",
                            "list": "it lists every call"}[args.name])
    with hubcall.client(args) as client:
        if args.name == "list":
            return hubcall.show(args, client.call("call.list", {}), _calls_table)
        if args.name == "hangup":
            result = client.call("call.hangup", {"call": args.rest[0]})
            return hubcall.show(args, result, lambda r: f"call {r['call']} with {r['peer']} hung up")
        request: dict[str, Any] = {"uri": args.rest[0], "video": not args.no_video}
        if args.room:
            request["room"] = args.room
        result = client.call("call.dial", request, timeout=max(args.timeout, DIAL_WAIT))
        return hubcall.show(args, result, lambda r: f"call {r['call']} with {r['peer']} is up in room {r['room']}: "
                                                    f"{_media(r)}" + (f" ({'; '.join(r['notes'])})"
                                                                      if r.get("notes") else ""))


def add_options(call: argparse.ArgumentParser) -> None:
    """The options of `ctl call dial` (on ctl's `call` parser, which also sends any command)."""
    call.add_argument("--room", default="", help="dial: the room the call joins ([sip] room by default)")
    call.add_argument("--no-video", action="store_true", help="dial: offer audio only")
