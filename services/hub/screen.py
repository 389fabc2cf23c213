"""The hub's `screen.*` commands: screen input, forwarded to the capture service of the screen source.

`screen.ACTION {source, ...}` goes to `capture@SOURCE`'s offer `input.ACTION` (as `keyframe`
goes to a stream's producer through its `stream.keyframe`). A source whose input is off
makes no offer, so the hub refuses at once and says which key turns it on; an action left out
of `input_actions` is refused the same way. `screen.list` tells which sources take input and
which actions, from the services' offers (what the agent tools list).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.control.protocol import ProtocolError
from services.hub.commands import Ctx, command, forward
from services.screen import commands as screen

if TYPE_CHECKING:
    from services.hub.service import Hub

__all__ = ["inputs"]

SUMMARIES = {
    "click": "click on a screen source's display: at x, y (on the X screen, or on `monitor`), or on an element "
             "described in words, found by the vision provider (args: source, x, y, monitor, element, button, "
             "count, verify)",
    "type": "type text, any Unicode, on a screen source's display (args: source, text)",
    "keys": "press keys and chords by name on a screen source's display: 'ctrl+a backspace' (args: source, keys)",
    "scroll": "scroll the wheel on a screen source's display, dy > 0 down, dx > 0 right, at x, y if given "
              "(args: source, dy, dx, x, y, monitor)",
    "monitors": "the monitors of a screen source's display, and the input actions it allows (args: source)",
}


def inputs(hub: Hub) -> dict[str, list[str]]:
    """Source -> the input actions its capture service offers now (live services only)."""
    out: dict[str, list[str]] = {}
    for service, offers in hub.offer_book.by_service.items():
        kind, _, source = service.partition("@")
        actions = [name[len(screen.OFFER):] for name in offers if name.startswith(screen.OFFER)]
        if kind == "capture" and actions and hub.service_registry.services.get(service) is not None:
            out[source] = sorted(a for a in actions if a in screen.ACTIONS)
    return out


def _route(action: str):
    def handler(hub: Hub, args: dict, ctx: Ctx) -> Any:
        source = args["source"]
        service = f"capture@{source}"
        if service not in hub.service_registry.services:
            raise ProtocolError("not_found", f"no capture of a source {source!r} is running (`edgeroom ctl source "
                                             f"list`)")
        offer = hub.offer_book.at(service, screen.OFFER + action)
        if offer is None:
            if hub.offer_book.at(service, screen.OFFER + "monitors") is None:
                raise ProtocolError("unavailable", f"screen input is off for source {source!r} (a screen source "
                                                   f"takes it with [sources.{source}] input = true)")
            raise ProtocolError("unavailable", f"screen input {action!r} is not allowed on source {source!r} "
                                               f"(its input_actions: {', '.join(inputs(hub).get(source, []))})")
        return forward(hub, screen.OFFER + action, offer, args, ctx)
    return handler


for _action in (*screen.ACTIONS, "monitors"):
    command(f"screen.{_action}", SUMMARIES[_action], args=screen.ARGS[_action],
            required=screen.REQUIRED[_action])(_route(_action))


@command("screen.list", "the screen sources that take input, with the actions each allows")
def screen_list(hub: Hub, args: dict, ctx: Ctx) -> list:
    return [{"source": s, "service": f"capture@{s}", "actions": a} for s, a in sorted(inputs(hub).items())]
