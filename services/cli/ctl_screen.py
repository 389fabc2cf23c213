"""`edgeroom ctl screen click|type|keys|scroll|monitors|list`: input on a screen source's display.

    edgeroom ctl screen list                                  # sources that take input, and their actions
    edgeroom ctl screen monitors desk                         # the display's monitors (0: all of them)
    edgeroom ctl screen click desk 1500 300                   # on the X screen
    edgeroom ctl screen click desk 300 300 --monitor 2        # relative to monitor 2's top-left corner
    edgeroom ctl screen click desk --element "the Save button" --verify
    edgeroom ctl screen type desk "naïve café, Ж"
    edgeroom ctl screen keys desk ctrl+a backspace
    edgeroom ctl screen scroll desk --dy 3 --at 1500,300

Off unless the source says `input = true` (docs/agent-tools.md); the hub refuses otherwise.
"""
from __future__ import annotations

import argparse
from typing import Any

from services.cli import hubcall
from services.cli.tables import table

__all__ = ["add_parsers"]

LOCATE_WAIT = 120.0   # a click on an element waits for the vision provider (twice with --verify)
ACTION_WAIT = 30.0    # the capture service's deadline for the other actions


def _request(args: argparse.Namespace) -> dict[str, Any]:
    a = args.action
    req: dict[str, Any] = {"source": args.source} if a != "list" else {}
    if a == "click":
        if args.element is not None:
            if args.x is not None:
                raise ValueError("ctl screen click: give X Y, or --element, not both")
            req["element"] = args.element
            if args.verify:
                req["verify"] = True
        elif args.x is None or args.y is None:
            raise ValueError("ctl screen click: give X Y (pixels), or --element DESCRIPTION")
        else:
            req |= {"x": args.x, "y": args.y}
        if args.button != "left":
            req["button"] = args.button
        if args.double:
            req["count"] = 2
    elif a == "type":
        req["text"] = args.text
    elif a == "keys":
        req["keys"] = " ".join(args.keys)
    elif a == "scroll":
        req |= {k: v for k, v in (("dy", args.dy), ("dx", args.dx)) if v}
        if args.at:
            try:
                req["x"], req["y"] = (int(v) for v in args.at.split(","))
            except ValueError:
                raise ValueError(f"--at takes X,Y in pixels, got {args.at!r}") from None
    if getattr(args, "monitor", None) is not None:
        req["monitor"] = args.monitor
    return req


def _text(action: str, r: Any) -> str:
    if action == "list":
        if not r:
            return "no screen source takes input ([sources.NAME] input = true enables it)"
        return table([[s["source"], ", ".join(s["actions"])] for s in r], ["SOURCE", "ACTIONS"])
    if action == "monitors":
        return f"{r['source']} on {r['display']} (captures monitor {r['captured']}; actions " \
               f"{', '.join(r['actions'])})\n" + table([[m["monitor"], m["left"], m["top"], m["width"], m["height"]]
                                                       for m in r["monitors"]],
                                                      ["MONITOR", "LEFT", "TOP", "WIDTH", "HEIGHT"])
    where = f" at ({r['x']}, {r['y']}) on monitor {r['monitor']}" if "x" in r else ""
    if action == "click":
        found = f" on {r['element']!r} (seen as {r.get('label')!r}{', verified' if r.get('verified') else ''})" \
            if "element" in r else ""
        return f"clicked {r['button']}{' x' + str(r['count']) if r['count'] > 1 else ''}{found}{where}"
    if action == "type":
        return f"typed {r['characters']} character(s)"
    if action == "keys":
        return f"pressed {' '.join(r['keys'])}"
    return f"scrolled dy={r['dy']} dx={r['dx']}{where}"


def cmd_screen(args: argparse.Namespace) -> int:
    if args.timeout is None and args.action != "list":   # typing is paced by the display; a locate by a model
        args.timeout = LOCATE_WAIT if getattr(args, "element", None) is not None else ACTION_WAIT
    request = _request(args)
    with hubcall.client(args) as client:
        return hubcall.show(args, client.call(f"screen.{args.action}", request), lambda r: _text(args.action, r))


def add_parsers(ctl_sub: Any) -> None:
    screen = ctl_sub.add_parser("screen", help="click, type, press keys and scroll on a screen source's display")
    sub = screen.add_subparsers(dest="action", required=True)
    p = sub.add_parser("list", help="the screen sources that take input")
    p = sub.add_parser("monitors", help="the monitors of a source's display")
    p.add_argument("source")
    p = sub.add_parser("click", help="click at X Y, or on an element described in words (--element)")
    p.add_argument("source")
    p.add_argument("x", type=int, nargs="?", help="pixels, on the X screen (or on --monitor)")
    p.add_argument("y", type=int, nargs="?")
    p.add_argument("--element", help="what to click, in words: found by the vision provider on a screenshot")
    p.add_argument("--verify", action="store_true", help="with --element: a second, closer look before clicking")
    p.add_argument("--button", choices=("left", "middle", "right"), default="left")
    p.add_argument("--double", action="store_true", help="a double click")
    p.add_argument("--monitor", type=int, help="X Y are relative to this monitor (--element: search it)")
    p = sub.add_parser("type", help="type TEXT (any Unicode)")
    p.add_argument("source")
    p.add_argument("text")
    p = sub.add_parser("keys", help="press keys and chords by name: ctrl+a backspace enter")
    p.add_argument("source")
    p.add_argument("keys", nargs="+")
    p = sub.add_parser("scroll", help="scroll the wheel: --dy N (down), --dx N (right); negative the other way")
    p.add_argument("source")
    p.add_argument("--dy", type=int, default=0)
    p.add_argument("--dx", type=int, default=0)
    p.add_argument("--at", help="X,Y: where to scroll (the pointer stays where it is otherwise)")
    p.add_argument("--monitor", type=int, help="--at is relative to this monitor")
    for p in sub.choices.values():
        hubcall.add_common(p)
        p.set_defaults(ctl_func=cmd_screen)
