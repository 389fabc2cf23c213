"""`edgeroom bus ls|gc`: the shared-memory frame bus, read straight from /dev/shm (no hub needed).

They look under the box's prefix: `--prefix`, else `bus.prefix` of the box's config, found as
every command finds it (services/cli/boxconfig.py: --config, $EDGEROOM_CONFIG,
/etc/edgeroom/edgeroom.toml, the default; EDGEROOM_BUS__PREFIX over it). `bus demo` runs
its own synthetic streams under its own prefix, apart from any box.
"""
from __future__ import annotations

import argparse
import json

import framebus
from services.cli import boxconfig
from services.cli.tables import fmt_bytes as _fmt_bytes
from services.cli.tables import table

__all__ = ["add_parser"]


def cmd_bus_ls(args: argparse.Namespace) -> int:
    prefix = boxconfig.of(args).prefix
    streams = framebus.list_streams(prefix)
    if args.json:
        print(json.dumps([s.to_dict() for s in streams], indent=2))
        return 0
    if not streams:
        print(f"no streams under prefix {prefix!r}")
        return 0
    rows = []
    for s in streams:
        live = [c for c in s.consumers if c.alive]
        lag = max((c.lag for c in live), default=0)
        rows.append([
            s.stream, s.kind, s.producer_pid or "-", s.status, s.generation, f"{s.rate_hz:.1f}",
            s.items, len(live), s.drops, lag, f"{s.slots}x{_fmt_bytes(s.payload_bytes)}",
            s.error,
        ])
    print(table(rows, ["STREAM", "KIND", "PRODUCER", "STATUS", "GEN", "RATE/s", "ITEMS",
                       "CONSUMERS", "DROPS", "MAXLAG", "SLOTS", ""]))
    return 0


def cmd_bus_gc(args: argparse.Namespace) -> int:
    removed = framebus.gc(boxconfig.of(args).prefix)
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing stale")
    return 0


def cmd_bus_demo(args: argparse.Namespace) -> int:
    from services import demo

    return demo.run(seconds=args.seconds, prefix=args.prefix)


def add_parser(sub) -> None:
    bus = sub.add_parser("bus", help="the shared-memory frame bus")
    bus_sub = bus.add_subparsers(dest="bus_command", required=True)
    ls = bus_sub.add_parser("ls", help="list streams: producer, status, rate, consumers, drops")
    ls.add_argument("--prefix", help="the bus prefix (default: bus.prefix of the box's config)")
    boxconfig.add_config_option(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_bus_ls)
    gcp = bus_sub.add_parser("gc", help="remove rings and wake FIFOs left by dead processes")
    gcp.add_argument("--prefix", help="the bus prefix (default: bus.prefix of the box's config)")
    boxconfig.add_config_option(gcp)
    gcp.set_defaults(func=cmd_bus_gc)
    demo = bus_sub.add_parser("demo", help="a synthetic camera and three kinds of reader, with their rates")
    demo.add_argument("--seconds", type=float, default=6.0, help="how long to run (default 6)")
    demo.add_argument("--prefix", default=None, help="bus prefix (default: edgeroom-demo)")
    demo.set_defaults(func=cmd_bus_demo)
