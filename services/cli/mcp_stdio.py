"""`edgeroom mcp`: the agent tools over MCP on stdin/stdout, for an agent that runs it on the box.

    {"mcpServers": {"edgeroom": {"command": "edgeroom", "args": ["mcp"]}}}

It finds the hub as `edgeroom ctl` does (--config, --runtime-dir, --endpoint, CURVE keys) and
serves the same tools as the edgeroom-mcp service (services/mcp/). Logs go to stderr; stdout
is the protocol's.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from services.cli import hubcall

__all__ = ["add_parser"]


def cmd_mcp(args: argparse.Namespace) -> int:
    import anyio

    from services.mcp.hubline import HubLine
    from services.mcp.server import build, serve_stdio
    control, _ = hubcall.endpoints(args)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    anyio.run(serve_stdio, build(HubLine(control, timeout=args.timeout, curve=hubcall.curve(args))))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("mcp", help="serve the agent tools over MCP on stdin/stdout")
    hubcall.add_common(p)
    p.set_defaults(func=cmd_mcp)
