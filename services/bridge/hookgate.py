"""BEFORE_BRIDGE_VIDEO, asked per route (source -> target), never per frame.

A route is asked about when it starts (the target is about to get the source's video),
again `recheck` seconds after its last answer (0: never), and when `ctl bridge recheck`
says so (a handler that wants to look again sends it). Until the first answer the route
sends nothing; later answers replace the one in force when they come, so video never
waits on a handler once it flows. The answer is the hub's: the handler's decision, or
the hook's `on_timeout` policy when there is no handler or it is late (docs/protocol.md,
"Synchronous hooks"). `replace` names a substitute stream in `data.stream` (say a
censored pipeline's output).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["HOOK", "Decision", "HookGate"]

HOOK = "BEFORE_BRIDGE_VIDEO"
Key = tuple[str, str]        # (source, target)


@dataclass
class Decision:
    decision: str = ""       # allow | block | replace ('' not answered yet)
    stream: str = ""         # replace: the stream sent instead
    reason: str = ""         # answered | no_handler | timeout | error
    answered_at: float = 0.0
    pending: bool = False
    asked: int = 0
    stale: bool = False      # asked again on the next decide (`ctl bridge recheck`)


class HookGate:
    def __init__(self, ask: Callable[[dict[str, Any], Callable[[Any, Exception | None], None]], None],
                 changed: Callable[[], None], counted: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`ask(data, callback)` sends hook.call; `changed()` runs when an answer changes a decision;
        `counted(decision, reason)` counts each answer."""
        self.ask, self.changed, self.counted, self.clock = ask, changed, counted, clock
        self.decisions: dict[Key, Decision] = {}

    def decide(self, key: Key, data: dict[str, Any], recheck: float) -> Decision:
        """The decision in force for `key`; asks when there is none, or it is `recheck` seconds old."""
        d = self.decisions.get(key)
        if d is None:
            d = self.decisions[key] = Decision()
        now = self.clock()
        due = not d.decision or d.stale or (recheck > 0 and now - d.answered_at >= recheck)
        if due and not d.pending:
            self._ask(key, d, data)
        return d

    def recheck(self, keep: Callable[[Key], bool] = lambda key: True) -> int:
        """Ask again about the routes `keep` picks (on the next decide); returns how many."""
        n = 0
        for key, d in self.decisions.items():
            if keep(key) and d.decision:
                d.stale = True
                n += 1
        return n

    def forget(self, live: set[Key]) -> None:
        """Routes that ended are asked again if they start again."""
        for key in [k for k in self.decisions if k not in live]:
            del self.decisions[key]

    def _ask(self, key: Key, d: Decision, data: dict[str, Any]) -> None:
        d.pending, d.stale = True, False
        d.asked += 1

        def answered(result: Any, error: Exception | None) -> None:
            if self.decisions.get(key) is not d:
                return                               # the route ended meanwhile
            d.pending = False
            before = (d.decision, d.stream)
            if error is not None or not isinstance(result, dict):
                # the hub did not answer (it restarts): allow is what it would say without a handler;
                # the route is asked again at the next recheck
                d.decision, d.stream, d.reason = d.decision or "allow", d.stream, "error"
            else:
                d.decision = str(result.get("decision", "allow"))
                data_out = result.get("data") or {}
                d.stream = str(data_out.get("stream", "")) if d.decision == "replace" else ""
                d.reason = str(result.get("reason", "answered"))
                if d.decision == "replace" and not d.stream:
                    d.decision, d.reason = "block", "replace without data.stream"
            d.answered_at = self.clock()
            self.counted(d.decision, d.reason)
            if (d.decision, d.stream) != before:
                self.changed()

        self.ask({"hook": HOOK, "data": data}, answered)
