"""The wire shape of screen input, shared by the hub (`screen.*`), the capture service that answers
(`input.*` offers), `edgeroom ctl screen` and the agent tools.

    screen.click    {source, x, y, monitor?, button?, count?}  or  {source, element, monitor?, button?, count?, verify?}
    screen.type     {source, text}
    screen.keys     {source, keys}                 chords by name: "ctrl+a backspace"
    screen.scroll   {source, dy?, dx?, x?, y?, monitor?}
    screen.monitors {source}
    screen.list     {}                             the sources that take input, and which actions

The hub forwards `screen.ACTION` to `capture@SOURCE`'s offer `input.ACTION`: a source whose
input is off makes no such offer, so the refusal comes from the hub, at once.
"""
from __future__ import annotations

from typing import Any

from services.control.protocol import ProtocolError
from services.runtime.schema import parse_list

__all__ = ["ACTIONS", "ARGS", "OFFER", "REQUIRED", "check", "parse_actions"]

ACTIONS = ("click", "type", "keys", "scroll")
OFFER = "input."           # the capture service's offers: input.click, ..., input.monitors
MAX_TEXT = 2000
MAX_SCROLL = 50

ARGS: dict[str, dict[str, Any]] = {
    "click": {"source": str, "x": int, "y": int, "monitor": int, "element": str, "button": str, "count": int,
              "verify": bool},
    "type": {"source": str, "text": str},
    "keys": {"source": str, "keys": str},
    "scroll": {"source": str, "dy": int, "dx": int, "x": int, "y": int, "monitor": int},
    "monitors": {"source": str},
}
REQUIRED = {"click": ("source",), "type": ("source", "text"), "keys": ("source", "keys"), "scroll": ("source",),
            "monitors": ("source",)}
BUTTONS = ("left", "middle", "right")


def parse_actions(text: str) -> list[str]:
    """`input_actions` ('click, type'; '' is every action) -> the actions; ValueError naming a bad one."""
    given = parse_list(text)
    wrong = [a for a in given if a not in ACTIONS]
    if wrong:
        raise ValueError(f"unknown input action(s) {', '.join(wrong)} (known: {', '.join(ACTIONS)})")
    return given or list(ACTIONS)


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_args", message)


def check(action: str, args: dict[str, Any]) -> None:
    """What the types alone do not say; raises ProtocolError(bad_args)."""
    has_xy = ("x" in args, "y" in args)
    if action in ("click", "scroll") and has_xy[0] != has_xy[1]:
        raise _bad("x and y go together")
    if action == "click":
        if ("element" in args) == has_xy[0]:
            raise _bad("screen.click takes either x and y, or element (a description of what to click)")
        if "element" in args and not args["element"].strip():
            raise _bad("element must describe what to click")
        if "verify" in args and "element" not in args:
            raise _bad("verify applies to a click on an element")
        if args.get("button", "left") not in BUTTONS:
            raise _bad(f"button must be one of {', '.join(BUTTONS)}")
        if not 1 <= args.get("count", 1) <= 3:
            raise _bad("count must be 1..3 (a double click is 2)")
    elif action == "type":
        if not args["text"] or len(args["text"]) > MAX_TEXT:
            raise _bad(f"text must have 1..{MAX_TEXT} characters")
    elif action == "scroll":
        dy, dx = args.get("dy", 0), args.get("dx", 0)
        if not (dy or dx) or abs(dy) > MAX_SCROLL or abs(dx) > MAX_SCROLL:
            raise _bad(f"scroll needs dy and/or dx, each -{MAX_SCROLL}..{MAX_SCROLL} wheel clicks, not both 0")
    if "monitor" in args and not 0 <= args["monitor"] <= 64:
        raise _bad("monitor must be 0..64")
