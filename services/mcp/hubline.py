"""The agent tools' way to the hub: `call(cmd, args, timeout)` on a fresh control client each time.

A control client is one ZeroMQ socket, not to be shared between threads; tool calls come from
the MCP server's worker threads, several at once. An IPC connection costs well under a
millisecond, so each call opens its own.
"""
from __future__ import annotations

from typing import Any, Protocol

from services.control.client import Client, CurveKeys

__all__ = ["Hub", "HubLine"]


class Hub(Protocol):
    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any: ...


class HubLine:
    def __init__(self, endpoint: str, timeout: float = 5.0, curve: CurveKeys | None = None) -> None:
        self.endpoint, self.timeout, self.curve = endpoint, timeout, curve

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        with Client(self.endpoint, timeout=self.timeout, curve=self.curve) as client:
            return client.call(cmd, args or {}, timeout=timeout or self.timeout)
