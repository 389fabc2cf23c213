"""edgeroom-mcp: the agent tools over MCP's Streamable HTTP, behind a bearer token.

uvicorn serves the MCP app (server.py) on a thread of its own, with its own asyncio loop,
on a socket bound in setup() (so a port in use fails the start, and port 0 shows the port
picked in the status). The service's loop keeps the control plane. Each tool call asks the
hub through a short-lived control client (hubline.py). Every call is counted by tool and
result, every refused token too.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

from prometheus_client import Counter

from services.control import tokens
from services.mcp.hubline import HubLine
from services.mcp.server import build, http_app
from services.runtime.schema import parse_host_port
from services.runtime.service import Service
from services.runtime.state import state_dir

__all__ = ["Mcp"]


class Mcp(Service):
    kind = "mcp"

    def setup(self) -> None:
        cfg = self.config.mcp
        self.book = tokens.TokenBook(tokens.parse_tokens(cfg.tokens), state_dir(self.config) / tokens.FILE)
        if not len(self.book):
            raise RuntimeError(f"[mcp] has no bearer token: set [mcp] tokens, or add one to {self.book.path} with "
                               f"`edgeroom keys token add NAME`")
        r = self.registry
        calls = Counter("edgeroom_mcp_tool_calls", "Agent tool calls over MCP, by tool and result (ok or the "
                        "error code: bad_args, not_found, unavailable, ...).", ["tool", "result"], registry=r)
        self.m_refused = Counter("edgeroom_mcp_auth_refused", "HTTP requests refused for a missing or unknown "
                                 "bearer token.", registry=r)
        self.calls = 0

        def count(tool: str, result: str) -> None:
            calls.labels(tool, result).inc()
            self.calls += 1

        host, port = parse_host_port(cfg.listen)
        self.sock = self.own(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        bound = self.sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}{cfg.path}"
        hub = HubLine(self.endpoints.control, timeout=self.config.control.request_timeout)
        app = http_app(build(hub, count), self.book.check, cfg.path, host, self.m_refused.inc)
        import uvicorn
        self.http = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.http.run, kwargs={"sockets": [self.sock]}, name="mcp-http",
                                       daemon=True)
        self.thread.start()
        self.on_stop(self._stop_http, "the MCP HTTP server")
        self.log.info("MCP tools on %s", self.url)

    def _stop_http(self) -> None:
        self.http.should_exit = True
        self.thread.join(timeout=0.8 * self.config.services[self.kind].stop_timeout)

    def describe(self) -> Any:
        state = None if self.thread.is_alive() else "degraded"
        return {"status": f"MCP on {self.url}, {self.calls} tool call(s)", "state": state}
