"""The `edgeroom` command.

    edgeroom bus ls [--prefix P] [--json]   streams on the frame bus
    edgeroom bus gc [--prefix P]            remove what dead processes left behind
    edgeroom demo [--seconds N]             the embedded default: a synthetic camera and consumers

Exit codes: 0 ok, 1 the operation failed, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys

import framebus

__all__ = ["main"]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def cmd_bus_ls(args: argparse.Namespace) -> int:
    streams = framebus.list_streams(args.prefix)
    if args.json:
        print(json.dumps([s.to_dict() for s in streams], indent=2))
        return 0
    if not streams:
        print(f"no streams under prefix {args.prefix or framebus.names.default_prefix()!r}")
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
    removed = framebus.gc(args.prefix)
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing stale")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services import demo

    return demo.run(seconds=args.seconds, prefix=args.prefix)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeroom", description="Real-time video rooms on an edge box.")
    sub = p.add_subparsers(dest="command", required=True)

    bus = sub.add_parser("bus", help="the shared-memory frame bus")
    bus_sub = bus.add_subparsers(dest="bus_command", required=True)
    ls = bus_sub.add_parser("ls", help="list streams: producer, status, rate, consumers, drops")
    ls.add_argument("--prefix", help="appliance prefix (default $EDGEROOM_BUS_PREFIX or 'edgeroom')")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_bus_ls)
    gcp = bus_sub.add_parser("gc", help="remove rings and wake FIFOs left by dead processes")
    gcp.add_argument("--prefix", help="appliance prefix (default $EDGEROOM_BUS_PREFIX or 'edgeroom')")
    gcp.set_defaults(func=cmd_bus_gc)

    demo = sub.add_parser("demo", help="run the embedded default: synthetic camera + consumers")
    demo.add_argument("--seconds", type=float, default=6.0, help="how long to run (default 6)")
    demo.add_argument("--prefix", default=None, help="bus prefix (default: edgeroom-demo)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (framebus.BusError, ValueError) as exc:
        print(f"edgeroom: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
