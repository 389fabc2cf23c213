"""`edgeroom ctl describe|view|pipeline` (the vision service) and `ctl record start|stop|list` (the recorder).

    edgeroom ctl describe door "Is anyone at the door?"
    edgeroom ctl view lobby               # the room's vision note, ready for an AI's context
    edgeroom ctl view lobby --follow      # its changes as they happen (no duplicates)
    edgeroom ctl record start door        # or room:lobby
    edgeroom ctl record stop door
    edgeroom ctl record list
    edgeroom ctl pipeline set door transforms=grayscale watermark='{stream} {timestamp}' publish=true
    edgeroom ctl pipeline remove door

The hub forwards these commands to the service that answers them (services/hub/offers.py);
a service that is not running is named in the refusal.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

from services.cli import hubcall
from services.cli.tables import fmt_bytes, table
from services.control.client import Client, Subscriber
from services.vision.spec import PipelineConfig

__all__ = ["add_parsers"]


def _describe_text(r: dict) -> str:
    if r.get("blocked"):
        return f"(the answer was blocked by the ON_VISION_RESULT hook: {r.get('reason', '')})"
    res = r.get("result") or {}
    lines = [res.get("description") or "(no description)"]
    for key in ("labels", "text"):
        if res.get(key):
            lines.append(f"{key}: {', '.join(res[key]) if isinstance(res[key], list) else res[key]}")
    meta = res.get("metadata") or {}
    lines.append(f"-- {meta.get('provider', '?')} {meta.get('model', '')} in {meta.get('latency_ms', '?')} ms")
    return "\n".join(lines)


def cmd_describe(args: argparse.Namespace) -> int:
    if args.timeout is None:
        args.timeout = 120.0  # a model can take a while; the service bounds it with [vision] timeout
    with hubcall.client(args) as client:
        return hubcall.show(args, client.call("vision.describe", {"stream": args.stream, "question": args.question}),
                            _describe_text)


def cmd_view(args: argparse.Namespace) -> int:
    if not args.follow:
        with hubcall.client(args) as client:
            return hubcall.show(args, client.call("vision.view", {"room": args.room}), lambda r: r["note"])
    control, events_ep = hubcall.endpoints(args)
    curve = hubcall.curve(args)
    with Client(control, timeout=args.timeout, curve=curve) as client, \
            Subscriber(events_ep, ["vision.view"], curve=curve) as sub:
        sub.wait_ready(client, timeout=max(args.timeout, 1.0))
        first = client.call("vision.view", {"room": args.room})
        print(json.dumps(first) if args.json else first["note"], flush=True)
        end = time.monotonic() + args.seconds if args.seconds else None
        while end is None or time.monotonic() < end:
            event = sub.recv(timeout=0.25)
            if event is None or event.data.get("room") != args.room:
                continue
            print(json.dumps(event.data) if args.json else event.data["note"], flush=True)
    return 0


_PIPELINE_TEXT = {f.name for f in fields(PipelineConfig) if f.type in (str, "str")}


def _pipelines_table(rows: list) -> str:
    if not rows:
        return "no pipelines"
    return table([[r["name"], r["origin"], r["input"], r["output"] or "-", "yes" if r["detect"] else "no",
                   r["frames"], r["skipped"], r["problem"]] for r in rows],
                 ["PIPELINE", "FROM", "INPUT", "OUTPUT", "DETECT", "FRAMES", "SKIPPED", "PROBLEM"])


def cmd_pipeline(args: argparse.Namespace) -> int:
    with hubcall.client(args) as client:
        if args.action == "list":
            return hubcall.show(args, client.call("vision.pipelines", {}), _pipelines_table)
        if args.action == "set":
            result = client.call("vision.pipeline.set", {"name": args.name,
                                                         "pipeline": hubcall.parse_pairs(args.keys, _PIPELINE_TEXT)})
            return hubcall.show(args, result, lambda r: f"pipeline {r['name']} set; it runs now "
                                                          f"(kept in {r['overlay']})")
        result = client.call("vision.pipeline.remove", {"name": args.name})
        return hubcall.show(args, result, lambda r: f"pipeline {r['name']} removed")


def _recordings_table(result: dict) -> str:
    """record.list's reply: {dir, recordings: [one row per target]} (services/recorder)."""
    rows = result["recordings"]
    if not rows:
        return f"nothing is recording (recordings in {result['dir']})"
    body = [[r["target"], r["state"], r["encoder"] + (" (hardware)" if r["hardware"] else ""), r["segments"],
             r["frames"], fmt_bytes(r["bytes"]), r["path"] or "-", r["error"]] for r in rows]
    return f"recordings in {result['dir']}\n" + table(body, ["TARGET", "STATE", "ENCODER", "SEGMENTS", "FRAMES",
                                                           "BYTES", "PATH", "PROBLEM"])


def _started_text(r: dict) -> str:
    return f"recording {r['target']} ({r['state']}), into {r['dir']}"


def _stopped_text(r: dict) -> str:
    return (f"stopped recording {r['target']}: {r['segments']} segment(s), {r['frames']} frames; "
            f"last file {r['path'] or '(none written)'}")


def cmd_record(args: argparse.Namespace) -> int:
    with hubcall.client(args) as client:
        if args.action == "list":
            return hubcall.show(args, client.call("record.list", {}), _recordings_table)
        result = client.call(f"record.{args.action}", {"target": args.target})
        return hubcall.show(args, result, _started_text if args.action == "start" else _stopped_text)


def add_parsers(ctl_sub) -> None:
    d = ctl_sub.add_parser("describe", help="ask the vision provider about the newest picture of a stream")
    hubcall.add_common(d)
    d.add_argument("stream")
    d.add_argument("question", nargs="?", default="", help="what to ask (default: [vision] prompt)")
    d.set_defaults(ctl_func=cmd_describe)
    v = ctl_sub.add_parser("view", help="what vision knows about a room, as a note for an AI's context")
    hubcall.add_common(v)
    v.add_argument("room")
    v.add_argument("--follow", action="store_true", help="print each change as it happens (no duplicates)")
    v.add_argument("--seconds", type=float, help="with --follow: stop after this many seconds")
    v.set_defaults(ctl_func=cmd_view)
    pipe = ctl_sub.add_parser("pipeline", help="set, remove or list the vision pipelines of the running box")
    pipe_sub = pipe.add_subparsers(dest="action", required=True)
    p = pipe_sub.add_parser("list", help="every pipeline: input, output, counts, problems")
    hubcall.add_common(p)
    p = pipe_sub.add_parser("set", help="add or replace a pipeline: NAME KEY=VALUE... (the keys of [pipelines.NAME])")
    hubcall.add_common(p)
    p.add_argument("name")
    p.add_argument("keys", nargs="*", metavar="KEY=VALUE", help="e.g. transforms=grayscale watermark='{stream}' "
                                                               "publish=true")
    p = pipe_sub.add_parser("remove", help="remove a pipeline")
    hubcall.add_common(p)
    p.add_argument("name")
    for p in pipe_sub.choices.values():
        p.set_defaults(ctl_func=cmd_pipeline)
    rec = ctl_sub.add_parser("record", help="start, stop or list recordings (a stream, or room:NAME)")
    rec_sub = rec.add_subparsers(dest="action", required=True)
    for action, what in (("start", "start recording TARGET"), ("stop", "stop recording TARGET")):
        p = rec_sub.add_parser(action, help=what)
        hubcall.add_common(p)
        p.add_argument("target", help="a stream name, or room:NAME")
    p = rec_sub.add_parser("list", help="what is recording, and where")
    hubcall.add_common(p)
    for p in rec_sub.choices.values():
        p.set_defaults(ctl_func=cmd_record)


