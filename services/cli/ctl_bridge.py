"""`edgeroom ctl bridge`: the bridge's rooms (services/bridge/).

    edgeroom ctl bridge                          # every bridged room, one line each
    edgeroom ctl bridge lobby                    # routes, policy, codecs, pass-through or transcode, the mix
    edgeroom ctl bridge on lobby                 # bridge a room (kept across restarts)
    edgeroom ctl bridge off lobby                # stop: its sessions' routes go back to the config's
    edgeroom ctl bridge pin lobby sip-3f9a1c     # everyone sees that session ('' unpins)
    edgeroom ctl bridge policy lobby grid        # speaker, pin, grid ('' the config's)
    edgeroom ctl bridge recheck lobby            # ask BEFORE_BRIDGE_VIDEO again about the room's routes
"""
from __future__ import annotations

import argparse
from typing import Any

from services.cli import hubcall
from services.cli.tables import table

__all__ = ["add_parsers"]

VERBS = {"on": 1, "off": 1, "pin": 2, "policy": 2, "recheck": 1}


def _hook(r: dict[str, Any]) -> str:
    h = r.get("hook")
    return f"{h['decision'] or 'asking'} ({h['reason']})" if h and h.get("decision") else ("asking" if h else "-")


def room_text(r: dict[str, Any]) -> str:
    head = f"room {r['room']}: policy {r['policy']}" + (f", pinned {r['pinned']}" if r.get("pinned") else "") + \
        (f", speaker {r['speaker']}" if r.get("speaker") else "") + f", {len(r['members'])} bridged"
    if r.get("refused"):
        head += f", refused (room full): {', '.join(r['refused'])}"
    rows = [[x["target"] + (f" #{x['slot']}" if x.get("slot", 1) != 1 else ""), x["source"] or "-",
             x["video"] or "-", x["path"], x["codec"] or "-", x["audio"] or "-",
             ",".join(x["heard"]) or "-", _hook(x), "yes" if x["sent"] else "on its way", x["note"][:50]]
            for x in r["routes"]]
    out = [head, table(rows, ["TARGET", "SEES", "VIDEO", "PATH", "CODEC", "AUDIO", "HEARS", "HOOK", "SENT", "NOTE"])
           if rows else "no routes (fewer than two sessions)"]
    media = [[t.get("out", ""), t.get("source", "-"), t.get("codec", ""), t.get("encoder", ""), t.get("size", ""),
              t.get("frames_out", 0), t.get("kbps", 0), t.get("decode_errors", 0), t.get("state", "")]
             for t in r.get("transcodes", [])]
    media += [[g.get("out", ""), "+".join(s.get("stream", "") for s in g.get("sources", [])), g.get("codec", ""),
               g.get("encoder", ""), g.get("size", ""), g.get("frames_out", 0), g.get("kbps", 0),
               g.get("decode_errors", 0), g.get("layout", "")] for g in r.get("grids", [])]
    if media:
        out.append(table(media, ["MADE", "FROM", "CODEC", "ENCODER", "SIZE", "FRAMES", "KBIT/S", "DECODE ERRORS",
                                 "STATE"]))
    if r.get("levels"):
        out.append("levels (dBFS): " + ", ".join(f"{k} {v}" for k, v in sorted(r["levels"].items())))
    return "\n".join(out)


def rooms_text(r: dict[str, Any]) -> str:
    if not r["rooms"]:
        return f"no room bridged ([bridge] rooms = {', '.join(r['config_rooms']) or 'none'}; " \
               "`edgeroom ctl bridge on ROOM`)"
    return table([[x["room"], x["policy"], len(x["members"]), len(x["refused"]),
                   sum(1 for y in x["routes"] if y["path"] == "pass-through"),
                   sum(1 for y in x["routes"] if y["path"] in ("transcode", "grid")), x.get("speaker") or "-"]
                  for x in r["rooms"]], ["ROOM", "POLICY", "BRIDGED", "REFUSED", "PASS-THROUGH", "TRANSCODE",
                                         "SPEAKER"])


def cmd_bridge(args: argparse.Namespace) -> int:
    words = args.words
    verb = words[0] if words and words[0] in VERBS else ""
    rest = words[1:] if verb else words
    if verb and len(rest) != VERBS[verb] and not (verb == "pin" and len(rest) == 1):
        raise ValueError(f"ctl bridge {verb} takes {'ROOM' if VERBS[verb] == 1 else 'ROOM ' + verb.upper()}")
    if not verb and len(rest) > 1:
        raise ValueError(f"ctl bridge takes a room, or one of {', '.join(VERBS)} and its arguments; got "
                         f"{' '.join(words)!r}")
    with hubcall.client(args) as client:
        if not verb:
            request = {"room": rest[0]} if rest else {}
            return hubcall.show(args, client.call("bridge.status", request), room_text if rest else rooms_text)
        request = {"room": rest[0]}
        if verb == "pin":
            request["session"] = rest[1] if len(rest) > 1 else ""
        elif verb == "policy":
            request["policy"] = rest[1]
        result = client.call(f"bridge.{verb}", request)
        if verb in ("on", "off"):
            return hubcall.show(args, result, lambda r: f"room {r['room']} is {'' if r['bridged'] else 'no longer '}"
                                                        "bridged")
        if verb == "recheck":
            return hubcall.show(args, result, lambda r: f"room {r['room']}: {r['asked']} route(s) asked again")
        return hubcall.show(args, result, room_text)


def add_parsers(ctl_sub: Any) -> None:
    p = ctl_sub.add_parser("bridge", help="the bridge: [ROOM] shows it; on|off ROOM, pin ROOM SESSION, "
                                          "policy ROOM speaker|pin|grid, recheck ROOM")
    hubcall.add_common(p)
    p.add_argument("words", nargs="*", metavar="ARGS", help="ROOM, or on|off|recheck ROOM, pin ROOM [SESSION], "
                   "policy ROOM POLICY")
    p.set_defaults(ctl_func=cmd_bridge)
