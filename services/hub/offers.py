"""Commands that services answer: the hub forwards them to the service that offers them.

A service offers commands (`record.start`, `vision.describe`, ...) in every heartbeat:
`"offers": {"record.start": {"summary": "...", "deadline": 5.0}}`. A client sends such a
command to the hub like any other. The hub pushes a `service_call` to the offering
service's DEALER (the routing frames of its latest heartbeat), keeps the call in a table,
and relays the service's `service.answer` to the client: the result, or the service's
error (code and message). A service that does not answer within the offer's deadline
costs the client one `timeout` error, never the hub's loop. A command of a service that is
not running is refused with `unavailable`, naming the service and how to enable it.

As with hooks, nothing blocks and the client talks only to the hub: one endpoint, one
place where CURVE, limits and metrics apply.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from services import catalog
from services.control.protocol import ProtocolError

__all__ = ["Forward", "Offer", "OfferBook", "check_offers"]

_NAME = re.compile(r"^[a-z]+(\.[a-z][a-z_]*)+$")
LIVE_STATES = ("starting", "ready", "degraded")


@dataclass
class Offer:
    service: str
    summary: str
    deadline: float
    where: Any          # the Ctx of the service's latest heartbeat: router and routing frames


@dataclass
class Forward:
    call: str
    cmd: str
    service: str
    caller: Any         # the client's Ctx
    started: float
    deadline: float


def check_offers(offers: object) -> dict[str, dict]:
    """Schema of a heartbeat's `offers`; raises ProtocolError(bad_args)."""
    if not isinstance(offers, dict):
        raise ProtocolError("bad_args", "heartbeat 'offers' must be an object of command name -> "
                                        "{summary, deadline}")
    for name, spec in offers.items():
        if not _NAME.match(name):
            raise ProtocolError("bad_args", f"offered command {name!r} must look like 'family.verb'")
        if not isinstance(spec, dict) or not isinstance(spec.get("summary", ""), str):
            raise ProtocolError("bad_args", f"offer {name!r} must be an object with a string 'summary'")
        deadline = spec.get("deadline", 5.0)
        if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or not 0.1 <= deadline <= 600:
            raise ProtocolError("bad_args", f"offer {name!r}: deadline must be 0.1..600 seconds")
    return offers


class OfferBook:
    """Offers by command, and by service: most commands have one service that answers them
    (record.start); a per-stream command (stream.keyframe) is offered by every service that
    produces streams, and the hub picks the producer of the stream (`at`)."""

    def __init__(self, reserved: set[str]) -> None:
        self.reserved = reserved           # the hub's own command names: a service cannot take them
        self.offers: dict[str, Offer] = {}              # command -> the latest service that offered it
        self.by_service: dict[str, dict[str, Offer]] = {}
        self.pending: dict[str, Forward] = {}
        self.gone: dict[str, str] = {}     # command -> the service that offered it until it stopped
        self._ids = itertools.count(1)

    def update(self, service: str, offers: dict[str, dict], where: Any) -> None:
        """The offers of one heartbeat replace that service's earlier ones."""
        for name in offers:
            if name in self.reserved:
                raise ProtocolError("bad_args", f"{service} offers {name!r}, which is a hub command")
        for name in [n for n, o in self.offers.items() if o.service == service and n not in offers]:
            del self.offers[name]
        mine = self.by_service[service] = {}
        for name, spec in offers.items():
            mine[name] = self.offers[name] = Offer(service, spec.get("summary", ""),
                                                   float(spec.get("deadline", 5.0)), where)
            self.gone.pop(name, None)

    def drop(self, service: str) -> None:
        for name in [n for n, o in self.offers.items() if o.service == service]:
            del self.offers[name]
            self.gone[name] = service
        self.by_service.pop(service, None)

    def at(self, service: str, cmd: str) -> Offer | None:
        """`service`'s offer of `cmd`, if it makes one."""
        return self.by_service.get(service, {}).get(cmd)

    def find(self, cmd: str, state_of) -> Offer:
        """The live offer of `cmd`; raises ProtocolError naming what is missing."""
        offer = self.offers.get(cmd)
        if offer is not None and state_of(offer.service) in LIVE_STATES:
            return offer
        kind = catalog.command_owner(cmd.partition(".")[0])  # who would answer it: said when nobody does
        service = offer.service if offer is not None else self.gone.get(cmd)
        if service is not None:
            raise ProtocolError("unavailable", f"{service}, which answers {cmd!r}, is {state_of(service) or 'gone'}")
        if kind is not None:
            raise ProtocolError("unavailable", f"{cmd!r} is answered by the {kind} service, which is not running "
                                               f"(is [services.{kind}] enabled? `edgeroom ctl status` shows it)")
        raise ProtocolError("unknown_command", f"unknown command {cmd!r}; `commands` lists them")

    def open(self, cmd: str, offer: Offer, caller: Any, now: float) -> Forward:
        f = Forward(f"s{next(self._ids)}", cmd, offer.service, caller, now, now + offer.deadline)
        self.pending[f.call] = f
        return f

    def answer(self, call: str, service: str) -> Forward:
        f = self.pending.get(call)
        if f is None or f.service != service:
            raise ProtocolError("not_found", f"no pending call {call!r} for {service} (answered already, "
                                             f"or too late)")
        del self.pending[call]
        return f

    def expire(self, now: float) -> list[Forward]:
        late = [f for f in self.pending.values() if f.deadline <= now]
        for f in late:
            del self.pending[f.call]
        return late

    def summaries(self) -> dict[str, str]:
        out = {}
        for name, o in self.offers.items():
            by = sorted(s for s, offers in self.by_service.items() if name in offers)
            out[name] = f"{o.summary} (answered by {', '.join(by) if len(by) <= 3 else f'{len(by)} services'})"
        return out
