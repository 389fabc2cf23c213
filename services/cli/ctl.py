"""`edgeroom ctl`: ask the hub about the box and tell it what to do.

Exit codes: 0 ok, 1 the hub answered with an error, 2 bad usage or config,
3 the hub is not reachable (the message says where it looked and what to check).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from services.cli.tables import fmt_duration, table
from services.control.client import (
    Client,
    CommandFailed,
    CurveKeys,
    HubUnreachable,
    Subscriber,
)
from services.control.endpoints import endpoints_for, runtime_dir
from services.runtime import config as configuration

__all__ = ["add_parser", "EXIT_UNREACHABLE"]

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def _endpoints(args: argparse.Namespace) -> tuple[str, str]:
    cfg = None if args.endpoint and args.timeout else configuration.load(args.config)
    if args.timeout is None:
        args.timeout = cfg.control.request_timeout
    if args.endpoint:
        return args.endpoint, args.events_endpoint or ""
    ep = endpoints_for(runtime_dir(args.runtime_dir or cfg.box.runtime_dir))
    return ep.control, args.events_endpoint or ep.events


def _curve(args: argparse.Namespace) -> CurveKeys | None:
    if not (args.server_key or args.client_key):
        return None
    if not (args.server_key and args.client_key):
        raise configuration.ConfigError("--server-key and --client-key go together")
    return CurveKeys.from_files(args.server_key, args.client_key)


def _client(args: argparse.Namespace) -> Client:
    control, _ = _endpoints(args)
    return Client(control, timeout=args.timeout, curve=_curve(args))  # _endpoints settled the timeout


def _print(args: argparse.Namespace, result, human) -> int:
    print(json.dumps(result, indent=2) if args.json else human(result))
    return 0


def _status_table(result: dict) -> str:
    rows = [[s["service"], s["state"], s["pid"], fmt_duration(s["uptime"]), s["restarts"], f"{s['rate']:.1f}",
             s["status"]] for s in result["services"]]
    out = table(rows, ["SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "RATE/s", "STATUS"])
    return f"box {result['box']}   metrics {result['metrics_url'] or 'off'}\n{out}"


def _streams_table(result: list) -> str:
    if not result:
        return "no streams on the bus"
    rows = [[s["stream"], s["kind"], s["service"] or "-", s["status"], f"{s['rate_hz']:.1f}", s["items"],
             len(s["consumers"]), s["drops"]] for s in result]
    return table(rows, ["STREAM", "KIND", "SERVICE", "STATUS", "RATE/s", "ITEMS", "CONSUMERS", "DROPS"])


def _sessions_table(result: list) -> str:
    if not result:
        return "no sessions"
    rows = [[s["session"], s["room"], s["service"], s["kind"],
             ", ".join(f"{t['id']}:{t.get('stream', '')}" for t in s["tracks"])] for s in result]
    return table(rows, ["SESSION", "ROOM", "SERVICE", "KIND", "TRACKS"])


def _rooms_table(result: dict) -> str:
    if not result:
        return "no rooms"
    rows = [[room, len(ss), ", ".join(s["session"] for s in ss)] for room, ss in sorted(result.items())]
    return table(rows, ["ROOM", "SESSIONS", "WHO"])


def _metrics_table(result: dict) -> str:
    rows = [[svc, name, f"{value:g}"] for svc, fams in result["services"].items() for name, value in fams.items()]
    return f"scrape {result['metrics_url'] or 'off'}\n" + table(rows, ["SERVICE", "METRIC", "VALUE"])


VIEWS = {"status": _status_table, "streams": _streams_table, "sessions": _sessions_table, "rooms": _rooms_table,
         "metrics": _metrics_table, "hooks": lambda r: json.dumps(r, indent=2),
         "commands": lambda r: table([[k, v] for k, v in r.items()], ["COMMAND", "WHAT"])}


def cmd_view(args: argparse.Namespace) -> int:
    call_args = {"room": args.room} if getattr(args, "room", None) else {}
    with _client(args) as client:
        return _print(args, client.call(args.ctl_command, call_args), VIEWS[args.ctl_command])


def cmd_call(args: argparse.Namespace) -> int:
    try:
        call_args = json.loads(args.args) if args.args else {}
    except ValueError as exc:
        raise configuration.ConfigError(f"ARGS is not JSON: {exc}") from None
    with _client(args) as client:
        print(json.dumps(client.call(args.name, call_args), indent=2))
    return 0


def _event_line(event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{int(event.time % 1 * 1000):03d}"
    return f"{stamp} {event.topic} {event.source} {json.dumps(event.data, separators=(',', ':'))}"


def cmd_events(args: argparse.Namespace) -> int:
    control, events_ep = _endpoints(args)  # one config read; args.timeout is settled from here on
    if not events_ep:
        raise configuration.ConfigError("--events-endpoint is needed with --endpoint")
    curve = _curve(args)
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
            print(json.dumps(event.__dict__) if args.json else _event_line(event), flush=True)
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the box's config file (default $EDGEROOM_CONFIG, else the embedded default)")
    p.add_argument("--runtime-dir", help="where the hub's sockets are (default: from the config)")
    p.add_argument("--endpoint", help="control endpoint, e.g. tcp://box:9751 (default: the IPC socket)")
    p.add_argument("--events-endpoint", help="events endpoint, e.g. tcp://box:9752")
    p.add_argument("--server-key", help="the hub's public key file (TCP with CURVE)")
    p.add_argument("--client-key", help="this client's .key_secret file (TCP with CURVE)")
    p.add_argument("--timeout", type=float, help="seconds to wait for the hub (default control.request_timeout, 2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parser(sub) -> None:
    ctl = sub.add_parser("ctl", help="ask and command the running box through the hub")
    ctl.set_defaults(func=run)
    ctl_sub = ctl.add_subparsers(dest="ctl_command", required=True)
    for name, what in [("status", "every service: state, pid, uptime, restarts, rate"),
                       ("streams", "streams on the bus and who produces them"), ("rooms", "rooms and their sessions"),
                       ("sessions", "sessions and their tracks"), ("metrics", "a summary of every service's metrics"),
                       ("hooks", "synchronous hooks: policy and handler"), ("commands", "what the hub understands")]:
        p = ctl_sub.add_parser(name, help=what)
        _common(p)
        if name == "sessions":
            p.add_argument("--room", help="only this room")
        p.set_defaults(ctl_func=cmd_view)
    ev = ctl_sub.add_parser("events", help="live tail of hooks and state events")
    _common(ev)
    ev.add_argument("topics", nargs="*", help="exact topics (hook.ON_VIDEO_SESSION_STARTED) or prefixes ending in *")
    ev.add_argument("--count", type=int, help="exit after this many events")
    ev.add_argument("--seconds", type=float, help="exit after this many seconds")
    ev.set_defaults(ctl_func=cmd_events)
    call = ctl_sub.add_parser("call", help="send any command: NAME [JSON-ARGS]")
    _common(call)
    call.add_argument("name")
    call.add_argument("args", nargs="?", help='arguments as a JSON object, e.g. \'{"room": "lobby"}\'')
    call.set_defaults(ctl_func=cmd_call)
    from services.cli import ctl_media  # the media commands: source, snapshot, list-cameras
    ctl_media.add_parsers(ctl_sub, _common)
    from services.cli import ctl_vision  # the services' commands: describe, view, record
    ctl_vision.add_parsers(ctl_sub, _common)
