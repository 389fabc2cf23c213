"""`edgeroom ctl source add|remove|list`, `ctl snapshot`, `ctl keyframe`, `ctl route` and `ctl list-cameras`:
the media side of ctl.

    edgeroom ctl source add door kind=url url=rtsp://10.0.0.5/stream1 room=lobby
    edgeroom ctl source remove door
    edgeroom ctl source list
    edgeroom ctl snapshot door-raw door.jpg
    edgeroom ctl keyframe door
    edgeroom ctl route call1 video=door audio=door-audio     # what a call's session sends; no pairs: show
    edgeroom ctl list-cameras

`source add` takes the keys of a [sources.NAME] table as KEY=VALUE; a value is read as a
TOML value when it is one (640, 2.5, true, "text") and as a plain string otherwise, so
URLs and paths need no quotes; a text key keeps what was typed (device=0 is "0"). The hub
validates the table exactly as the config file's.
"""
from __future__ import annotations

import argparse
import base64
import os
from dataclasses import fields

from services.capture.sources import config_classes
from services.cli import hubcall
from services.cli.tables import table

__all__ = ["add_parsers"]


_TEXT_KEYS = {f.name for cls in config_classes().values() for f in fields(cls) if f.type in (str, "str")}


def _sources_table(rows: list) -> str:
    if not rows:
        return "no sources"
    return table([[r["name"], r["kind"], r["room"], r["origin"], r["capture"], r["decode"] or "-", r["target"],
                   r["status"]] for r in rows],
                 ["SOURCE", "KIND", "ROOM", "FROM", "CAPTURE", "DECODE", "TARGET", "STATUS"])


def _cameras_table(rows: list) -> str:
    if not rows:
        return "no cameras (no V4L2 devices on this box)"
    return table([[r["device"], r.get("name", ""), r.get("driver", ""), "yes" if r.get("capture") else "no",
                   r.get("error", "")] for r in rows], ["DEVICE", "NAME", "DRIVER", "CAPTURE", "PROBLEM"])


def cmd_source(args: argparse.Namespace) -> int:
    with hubcall.client(args) as client:
        if args.action == "list":
            return hubcall.show(args, client.call("source.list", {}), _sources_table)
        if args.action == "add":
            table = hubcall.parse_pairs(args.keys, _TEXT_KEYS)
            result = client.call("source.add", {"name": args.name, "source": table})
            return hubcall.show(args, result, lambda r: f"source {r['name']} added ({r['source']['kind']}); "
                                                          f"its capture starts now")
        result = client.call("source.remove", {"name": args.name})
        return hubcall.show(args, result, lambda r: f"source {r['name']} removed; its capture stops now")


def cmd_snapshot(args: argparse.Namespace) -> int:
    with hubcall.client(args) as client:
        result = client.call("snapshot", {"stream": args.stream, "max_width": args.max_width,
                                          "quality": args.quality})
    jpeg = base64.b64decode(result.pop("jpeg"))
    tmp = f"{args.file}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(jpeg)
    os.replace(tmp, args.file)
    result["file"], result["bytes"] = args.file, len(jpeg)
    return hubcall.show(args, result, lambda r: f"{r['file']}: {r['width']}x{r['height']} JPEG ({r['bytes']} bytes) "
                                                f"of {r['stream']} item {r['seq']}")


def _keyframe_text(r: dict) -> str:
    if r.get("made"):
        how = "throttled: one is on its way" if r.get("throttled") else f"asked for ({r.get('how')})"
        return f"keyframe {how}; waiting {r.get('waiting', 0):.2f} s"
    due = r.get("next_keyframe_in")
    return f"cannot: {r.get('reason')}" + (f"; its next keyframe is due in {due:.2f} s" if due is not None else "")


def cmd_keyframe(args: argparse.Namespace) -> int:
    with hubcall.client(args) as client:
        result = client.call("keyframe", {"stream": args.stream, "reason": args.reason})
    return hubcall.show(args, result, _keyframe_text)


def cmd_sdp(args: argparse.Namespace) -> int:
    with hubcall.client(args) as client:
        result = client.call("sdp", {"session": args.session, "for": args.side})
    if args.out and not args.json:
        with open(args.out, "w") as f:
            f.write(result["sdp"])
        print(f"{args.out}: the SDP of {result['session']} for a {result['for']}")
        return 0
    return hubcall.show(args, result, lambda r: r["sdp"].replace("\r\n", "\n").rstrip("\n"))


def _route_table(r: dict) -> str:
    rows = [[track, t["route"] or "-", t["origin"], t["sending"] or "-", t["state"], t["switches"], t["items"],
             t["note"]] for track, t in ((k, r[k]) for k in ("video", "audio"))]
    return f"session {r['session']} ({r['service']})\n" + table(
        rows, ["TRACK", "ROUTE", "FROM", "SENDING", "STATE", "SWITCHES", "ITEMS", "NOTE"])


def cmd_route(args: argparse.Namespace) -> int:
    call_args: dict = {"session": args.session}
    for pair in args.routes:
        track, eq, stream = pair.partition("=")
        if not eq or track not in ("video", "audio"):
            raise ValueError(f"expected video=STREAM or audio=STREAM (empty: send nothing), got {pair!r}")
        call_args[track] = stream
    if args.reset:
        call_args["reset"] = True
    if args.slot != 1:
        call_args["slot"] = args.slot
    with hubcall.client(args) as client:
        return hubcall.show(args, client.call("route", call_args), _route_table)


def cmd_cameras(args: argparse.Namespace) -> int:
    with hubcall.client(args) as client:
        return hubcall.show(args, client.call("cameras", {}), _cameras_table)


def add_parsers(ctl_sub) -> None:
    src = ctl_sub.add_parser("source", help="add, remove or list the box's sources")
    src_sub = src.add_subparsers(dest="action", required=True)
    p = src_sub.add_parser("list", help="every source, where it came from, its capture's state")
    hubcall.add_common(p)
    p = src_sub.add_parser("add", help="add a source: NAME KEY=VALUE... (the keys of [sources.NAME])")
    hubcall.add_common(p)
    p.add_argument("name")
    p.add_argument("keys", nargs="+", metavar="KEY=VALUE", help="e.g. kind=url url=rtsp://cam/1 room=lobby")
    p = src_sub.add_parser("remove", help="remove a source; its capture and decode stop")
    hubcall.add_common(p)
    p.add_argument("name")
    for p in src_sub.choices.values():
        p.set_defaults(ctl_func=cmd_source)
    snap = ctl_sub.add_parser("snapshot", help="a JPEG of the newest picture of a stream: STREAM FILE.jpg")
    hubcall.add_common(snap)
    snap.add_argument("stream", help="a raw stream, or an encoded one (its NAME-raw twin is used)")
    snap.add_argument("file")
    snap.add_argument("--max-width", type=int, default=1920, help="scale down to at most this width (default 1920)")
    snap.add_argument("--quality", type=int, default=85, help="JPEG quality 10..100 (default 85)")
    snap.set_defaults(ctl_func=cmd_snapshot)
    key = ctl_sub.add_parser("keyframe", help="ask the producer of an encoded stream for a keyframe: STREAM")
    hubcall.add_common(key)
    key.add_argument("stream")
    key.add_argument("--reason", default="asked by ctl", help="said in the producer's log and metrics")
    key.set_defaults(ctl_func=cmd_keyframe)
    sdp = ctl_sub.add_parser("sdp", help="the SDP of a call (an [rtp.NAME] session): what a peer sends to; "
                             "--for receiver: what the box sends, for ffmpeg -i or GStreamer")
    hubcall.add_common(sdp)
    sdp.add_argument("session")
    sdp.add_argument("--for", dest="side", choices=("sender", "receiver"), default="sender",
                     help="sender (default): the box's address, ports and codecs, for a peer that sends to it; "
                          "receiver: what the box sends, at the peer's address, for a peer that takes it")
    sdp.add_argument("--out", default="", help="write the SDP to this file (as it is, CRLF lines)")
    sdp.set_defaults(ctl_func=cmd_sdp)
    route = ctl_sub.add_parser("route", help="show or change what a call's session sends: SESSION [video=STREAM] "
                                             "[audio=STREAM]")
    hubcall.add_common(route)
    route.add_argument("session")
    route.add_argument("routes", nargs="*", metavar="TRACK=STREAM",
                       help="video=STREAM, audio=STREAM (empty: send nothing on that track); none: show the routes")
    route.add_argument("--reset", action="store_true", help="put back the config's routes")
    route.add_argument("--slot", type=int, default=1, help="a further video track of a room call that takes several "
                       "(2, 3, ...: docs/calls.md); video only")
    route.set_defaults(ctl_func=cmd_route)
    cams = ctl_sub.add_parser("list-cameras", help="the box's V4L2 cameras (never hangs when there are none)")
    hubcall.add_common(cams)
    cams.set_defaults(ctl_func=cmd_cameras)
