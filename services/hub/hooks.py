"""The synchronous-hook broker: BEFORE_BRIDGE_VIDEO and ON_VISION_RESULT.

An external program registers as a hook's handler (`hook.register`, renewed within its
ttl). A service that reaches the hook sends `hook.call`; the hub forwards the call to the
handler and replies to the caller with the handler's decision: allow, block, or replace
(with new data). If no handler is registered, or it does not answer within the hook's
`deadline`, the hub answers with the hook's `on_timeout` policy (allow or block, from the
config) and says why in `reason`. One handler per hook: the latest registration wins.
Nothing blocks: pending calls sit in a table the hub's loop expires.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from services.control.protocol import ProtocolError

__all__ = ["HookBroker", "Handler", "Pending", "DECISIONS"]

DECISIONS = ("allow", "block", "replace")


@dataclass
class Handler:
    ctx: Any                 # where the handler's DEALER is: router socket and routing frames
    expires: float


@dataclass
class Pending:
    call: str
    hook: str
    caller: Any              # where to reply: router socket, routing frames, request id
    started: float
    deadline: float
    handler: list | None = None  # routing frames of the handler the call went to


class HookBroker:
    def __init__(self, policies: dict) -> None:
        self.policies = policies             # hook -> object with .deadline and .on_timeout
        self.handlers: dict[str, Handler] = {}
        self.pending: dict[str, Pending] = {}
        self._ids = itertools.count(1)

    def _policy(self, hook: str):
        policy = self.policies.get(hook)
        if policy is None:
            raise ProtocolError("not_found", f"no synchronous hook named {hook!r} (known: {', '.join(self.policies)})")
        return policy

    def register(self, hook: str, ctx: Any, ttl: float, now: float) -> None:
        self._policy(hook)
        if not 0.1 <= ttl <= 3600:
            raise ProtocolError("bad_args", f"ttl must be within 0.1..3600 seconds, got {ttl}")
        self.handlers[hook] = Handler(ctx, now + ttl)

    def handler(self, hook: str, now: float) -> Handler | None:
        h = self.handlers.get(hook)
        if h is not None and h.expires <= now:
            del self.handlers[hook]
            return None
        return h

    def open_call(self, hook: str, caller: Any, now: float) -> Pending:
        policy = self._policy(hook)
        call = f"h{next(self._ids)}"
        p = Pending(call, hook, caller, now, now + policy.deadline)
        self.pending[call] = p
        return p

    def answer(self, call: str, decision: str, data: object, envelope: list | None = None) -> tuple[Pending, dict]:
        p = self.pending.get(call)
        if p is None or (envelope is not None and p.handler is not None and envelope != p.handler):
            raise ProtocolError("not_found", f"no pending hook call {call!r} for this handler "
                                             f"(answered already, too late, or sent to another handler)")
        del self.pending[call]
        if decision not in DECISIONS:
            self.pending[call] = p
            raise ProtocolError("bad_args", f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        if decision == "replace" and not isinstance(data, dict):
            self.pending[call] = p
            raise ProtocolError("bad_args", "decision 'replace' needs 'data', an object")
        return p, {"decision": decision, "data": data if decision == "replace" else None, "reason": "answered"}

    def policy_result(self, hook: str, reason: str) -> dict:
        return {"decision": self._policy(hook).on_timeout, "data": None, "reason": reason}

    def expire(self, now: float) -> list[tuple[Pending, dict]]:
        late = [p for p in self.pending.values() if p.deadline <= now]
        for p in late:
            del self.pending[p.call]
        return [(p, self.policy_result(p.hook, "timeout")) for p in late]
