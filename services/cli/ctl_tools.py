"""`edgeroom ctl tools`: the agent tools of the box (services/mcp/tools.py), for agents without MCP.

    edgeroom ctl tools                         # name and description of each tool this box answers now
    edgeroom ctl tools --json                  # the same as OpenAI function-calling definitions
    edgeroom ctl tools snapshot '{"stream": "cam"}'     # run one: its text (or --json: text, data)

The list is the MCP server's (`edgeroom mcp`, edgeroom-mcp): one registry feeds both, and a
screen tool is there only where a screen source takes input.
"""
from __future__ import annotations

import argparse
import base64
import json
from typing import Any

from services.cli import hubcall
from services.cli.tables import table
from services.mcp import tools
from services.mcp.hubline import HubLine

__all__ = ["add_parsers"]


def cmd_tools(args: argparse.Namespace) -> int:
    control, _ = hubcall.endpoints(args)
    hub = HubLine(control, timeout=args.timeout, curve=hubcall.curve(args))
    if args.name is None:
        found = tools.available(hub)
        return hubcall.show(args, tools.openai_functions(found),
                            lambda _: table([[t.name, t.description[:90]] for t, _ in found], ["TOOL", "WHAT"]))
    try:
        arguments = json.loads(args.arguments) if args.arguments else {}
    except ValueError as exc:
        raise ValueError(f"ARGS is not JSON: {exc}") from None
    try:
        result = tools.call(hub, args.name, arguments)
    except tools.ToolError as exc:
        raise ValueError(f"tool {args.name} failed: {exc}") from None
    out: dict[str, Any] = {"text": result.text, "data": result.data, "untrusted": result.untrusted}
    if result.image is not None:
        out["image_jpeg"] = base64.b64encode(result.image).decode()
    return hubcall.show(args, out, lambda r: r["text"] + (f"\n({len(result.image or b'')} bytes of JPEG; --json "
                                                          "carries it)" if result.image else ""))


def add_parsers(ctl_sub: Any) -> None:
    p = ctl_sub.add_parser("tools", help="the agent tools: list them (--json: OpenAI function schemas) or run one")
    hubcall.add_common(p)
    p.add_argument("name", nargs="?", help="a tool to run")
    p.add_argument("arguments", nargs="?", metavar="ARGS", help="its arguments as a JSON object")
    p.set_defaults(ctl_func=cmd_tools)
