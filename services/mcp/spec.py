"""The MCP service's entry in the catalog, and its part of the config: [mcp].

`edgeroom service mcp` (unit edgeroom-mcp) serves the agent tools (tools.py) over MCP's
Streamable HTTP behind a bearer token. Off by default (`[mcp] enabled = true` runs it);
`edgeroom mcp` serves the same tools over stdio to an agent on the box without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.catalog import ServiceSpec, register
from services.runtime.schema import RESTART, SCHEMA, Section, parse_host_port, setting

__all__ = ["McpConfig"]

LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


def _check_listen(text: str) -> None:
    parse_host_port(text)


def _check_tokens(text: str) -> None:
    from services.control.tokens import parse_tokens  # the box's one bearer-token format
    parse_tokens(text)


@dataclass(frozen=True)
class McpConfig:
    enabled: bool = setting(False, "Serve the agent tools over MCP (Streamable HTTP) as edgeroom-mcp.", RESTART)
    listen: str = setting("127.0.0.1:8765", "HOST:PORT the MCP endpoint listens on; port 0 picks a free one "
                          "(shown in the status).", RESTART, check=_check_listen)
    path: str = setting("/mcp", "The URL path of the MCP endpoint.", RESTART, pattern=r"^/[A-Za-z0-9._/-]{0,63}$")
    tokens: str = setting("", "Bearer tokens let in: 'NAME:TOKEN, ...', 16 characters or more each; the state "
                          "directory's http-tokens file (`edgeroom keys token add NAME`) adds more.", RESTART,
                          check=_check_tokens)


def _network(config: Any) -> str:
    return "loopback" if parse_host_port(config.mcp.listen)[0] in LOCAL_HOSTS else "any"


def _wanted(config: Any) -> bool:
    return bool(config.mcp.enabled)


register(ServiceSpec(
    "mcp", "services.mcp.service:Mcp", "the agent tools over MCP (Streamable HTTP, bearer token)",
    order=5, network_for=_network, wanted=_wanted, docs="agent-tools.md"))

SCHEMA.add(Section("mcp", McpConfig, "The agent tools over MCP (off unless enabled).", owner="mcp"))
