"""`edgeroom ctl`: ask the hub about the box and tell it what to do.

The hub's own views and commands are here; the media commands (source, snapshot,
list-cameras) are in ctl_media.py, the services' commands (describe, view, pipeline,
record) in ctl_vision.py; what all of them share (options, finding the hub, printing a
reply) in hubcall.py.

Exit codes: 0 ok, 1 the hub answered with an error, 2 bad usage or config,
3 the hub is not reachable (the message says where it looked and what to check).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from services.cli import ctl_avatar, ctl_bridge, ctl_call, ctl_media, ctl_screen, ctl_tools, ctl_vision, hubcall, tables
from services.control.client import Client, CommandFailed, HubUnreachable, Subscriber
from services.runtime import config as configuration

__all__ = ["add_parser", "EXIT_UNREACHABLE", "VIEWS"]

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3

VIEWS = {"status": tables.status_table, "streams": tables.streams_table, "sessions": tables.sessions_table,
         "rooms": tables.rooms_table, "metrics": tables.metrics_table, "hooks": lambda r: json.dumps(r, indent=2),
         "commands": tables.commands_table}


def cmd_view(args: argparse.Namespace) -> int:
    call_args = {"room": args.room} if getattr(args, "room", None) else {}
    with hubcall.client(args) as client:
        return hubcall.show(args, client.call(args.ctl_command, call_args), VIEWS[args.ctl_command])


def cmd_call(args: argparse.Namespace) -> int:
    if args.name in ctl_call.VERBS:          # `ctl call dial|hangup|list`: the SIP calls
        return ctl_call.cmd_call(args)
    if len(args.rest) > 1:
        raise configuration.ConfigError(f"ctl call {args.name}: one JSON object of arguments, got {len(args.rest)}")
    args.args = args.rest[0] if args.rest else None
    try:
        call_args = json.loads(args.args) if args.args else {}
    except ValueError as exc:
        raise configuration.ConfigError(f"ARGS is not JSON: {exc}") from None
    with hubcall.client(args) as client:
        print(json.dumps(client.call(args.name, call_args), indent=2))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    control, events_ep = hubcall.endpoints(args)  # one config read; args.timeout is settled from here on
    if not events_ep:
        raise configuration.ConfigError("--events-endpoint is needed with --endpoint")
    curve = hubcall.curve(args)
    with Client(control, timeout=args.timeout, curve=curve) as client, \
            Subscriber(events_ep, args.topics or ["*"], curve=curve) as sub:
        sub.wait_ready(client, timeout=max(args.timeout, 1.0))
        print(f"# listening on {events_ep} for {' '.join(args.topics) or 'everything'}", file=sys.stderr, flush=True)
        seen, end = 0, (time.monotonic() + args.seconds) if args.seconds else None
        while (args.count is None or seen < args.count) and (end is None or time.monotonic() < end):
            event = sub.recv(timeout=0.25)
            if event is None:
                continue
            seen += 1
            print(json.dumps(event.__dict__) if args.json else tables.event_line(event), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return args.ctl_func(args)
    except HubUnreachable as exc:
        print(f"edgeroom ctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as exc:
        print(f"edgeroom ctl: the hub refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (configuration.ConfigError, OSError, ValueError) as exc:
        print(f"edgeroom ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE


def add_parser(sub) -> None:
    ctl = sub.add_parser("ctl", help="ask and command the running box through the hub")
    ctl.set_defaults(func=run)
    ctl_sub = ctl.add_subparsers(dest="ctl_command", required=True)
    for name, what in [("status", "every service: state, pid, uptime, restarts, rate"),
                       ("streams", "streams on the bus and who produces them"), ("rooms", "rooms and their sessions"),
                       ("sessions", "sessions and their tracks"), ("metrics", "a summary of every service's metrics"),
                       ("hooks", "synchronous hooks: policy and handler"), ("commands", "what the hub understands")]:
        p = ctl_sub.add_parser(name, help=what)
        hubcall.add_common(p)
        if name == "sessions":
            p.add_argument("--room", help="only this room")
        p.set_defaults(ctl_func=cmd_view)
    ev = ctl_sub.add_parser("events", help="live tail of hooks and state events")
    hubcall.add_common(ev)
    ev.add_argument("topics", nargs="*", help="exact topics (hook.ON_VIDEO_SESSION_STARTED) or prefixes ending in *")
    ev.add_argument("--count", type=int, help="exit after this many events")
    ev.add_argument("--seconds", type=float, help="exit after this many seconds")
    ev.set_defaults(ctl_func=cmd_events)
    call = ctl_sub.add_parser("call", help="send any command: NAME [JSON-ARGS]; and the SIP calls: call dial URI, "
                                           "call hangup CALL, call list")
    hubcall.add_common(call)
    call.add_argument("name", help="a command of the protocol, or dial, hangup, list (SIP calls)")
    call.add_argument("rest", nargs="*", metavar="ARGS", help='arguments as a JSON object, e.g. \'{"room": '
                      '"lobby"}\'; dial: the SIP URI; hangup: the call id')
    ctl_call.add_options(call)
    call.set_defaults(ctl_func=cmd_call)
    ctl_media.add_parsers(ctl_sub)    # source, snapshot, list-cameras
    ctl_vision.add_parsers(ctl_sub)   # describe, view, pipeline, record
    ctl_screen.add_parsers(ctl_sub)   # screen click|type|keys|scroll|monitors|list
    ctl_tools.add_parsers(ctl_sub)    # tools: the agent tools as OpenAI function schemas, and running one
    ctl_bridge.add_parsers(ctl_sub)   # bridge [ROOM], on|off|pin|policy|recheck
    ctl_avatar.add_parsers(ctl_sub)   # avatar list|start|stop|say
