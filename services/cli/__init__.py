"""The `edgeroom` command.

    edgeroom run [--config F]                the box's services as supervised child processes
    edgeroom demo [--seconds N]              the embedded default, with status and events shown live
    edgeroom ctl status|streams|rooms|...    ask and command the running box (see `edgeroom ctl -h`)
    edgeroom config check [FILE]             validate a config file
    edgeroom keys init|add                   CURVE keys for TCP control endpoints
    edgeroom service KIND [INSTANCE]         one service in the foreground (what systemd starts)
    edgeroom bus ls|gc|demo                  the shared-memory frame bus
    edgeroom mcp                             the agent tools over MCP on stdin/stdout

Exit codes: 0 ok, 1 the operation failed, 2 bad usage or config, 3 (ctl) hub unreachable.
"""
from __future__ import annotations

import argparse
import sys

import framebus
from services.cli import admin, bus, ctl, mcp_stdio
from services.runtime.config import ConfigError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeroom", description="Real-time video rooms on an edge box.")
    sub = p.add_subparsers(dest="command", required=True)
    admin.add_parsers(sub)
    ctl.add_parser(sub)
    bus.add_parser(sub)
    mcp_stdio.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"edgeroom: bad config: {exc}", file=sys.stderr)
        return 2
    except (framebus.BusError, ValueError, OSError, RuntimeError) as exc:
        print(f"edgeroom: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
