"""Every tool the box gives an agent, in one registry that feeds both MCP and OpenAI function calling.

    tools = available(hub)                   # [(Tool, its JSON Schema now)], what this box offers now
    result = call(hub, "snapshot", {"stream": "cam"}, metrics)   # Result(text, data, image, untrusted)
    openai_functions(tools)                  # [{"type": "function", "function": {name, description, parameters}}]

A tool is a name, a description, a JSON Schema of its arguments, and what it asks the hub. It is
*available* while the box can answer it: `needs` names the command (vision.describe,
record.start, call.dial, ...) that must be among the hub's `commands` (a service that does not
run offers nothing), and a screen tool needs a screen source whose input allows its action
(`screen.list`); its `source` argument lists those sources. So on a box whose screen input is
off the screen tools are not there at all.

Arguments are checked against the schema before anything is asked (`bad_args`, naming the
argument); the hub and the service that answers check again. Failures are `ToolError(code,
message)`, the hub's own codes passed on. Results that carry what a model saw (describe, a
room's note, the label of a clicked element) are fenced (fence.py) and flagged `untrusted`.
"""
from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.control.client import CommandFailed, ControlError
from services.mcp.fence import fence
from services.mcp.hubline import Hub

__all__ = ["TOOLS", "Result", "Tool", "ToolError", "available", "call", "check", "openai_functions"]

MODEL_WAIT = 120.0    # a vision provider's answer (twice for a verified click)
DIAL_WAIT = 45.0      # the SIP service answers a dial within 40 s
INPUT_WAIT = 30.0


class ToolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class Result:
    text: str
    data: Any = None
    image: bytes | None = None       # a JPEG
    untrusted: bool = False


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    properties: dict[str, Any]
    required: tuple[str, ...]
    run: Callable[[Hub, dict[str, Any]], Result]
    needs: str = ""       # a command the hub must list for the tool to exist
    screen: str = ""      # a screen input action a source must allow ("monitors": any)
    fenced: bool = False  # its result carries what a model saw
    annotations: dict[str, bool] = field(default_factory=dict)

    def schema(self, sources: list[str] | None = None) -> dict[str, Any]:
        props = dict(self.properties)
        if sources is not None and "source" in props:
            props["source"] = {**props["source"], "enum": sources}
        return {"type": "object", "properties": props, "required": list(self.required),
                "additionalProperties": False}


TOOLS: dict[str, Tool] = {}


def _tool(name: str, description: str, properties: dict[str, Any] | None = None, required: tuple[str, ...] = (),
          **kw: Any) -> Callable[[Callable[[Hub, dict[str, Any]], Result]], Callable[[Hub, dict[str, Any]], Result]]:
    def register(fn: Callable[[Hub, dict[str, Any]], Result]) -> Callable[[Hub, dict[str, Any]], Result]:
        TOOLS[name] = Tool(name, description, properties or {}, required, fn, **kw)
        return fn
    return register


def _ask(hub: Hub, cmd: str, args: dict[str, Any], timeout: float | None = None) -> Any:
    try:
        return hub.call(cmd, args, timeout=timeout)
    except CommandFailed as exc:
        raise ToolError(exc.code, exc.message) from None
    except ControlError as exc:   # the hub is not there, or did not answer in time
        raise ToolError("unavailable", str(exc)) from None


def _plain(data: Any, text: str) -> Result:
    return Result(text, data)


STRING = {"type": "string", "minLength": 1}
SOURCE = {"type": "string", "description": "the screen source (a [sources.NAME] of kind screen with input on)"}
POINT = {"x": {"type": "integer", "minimum": 0, "maximum": 32767, "description": "pixels from the left edge of "
                                                                                   "the X screen (or of monitor)"},
         "y": {"type": "integer", "minimum": 0, "maximum": 32767, "description": "pixels from the top edge"},
         "monitor": {"type": "integer", "minimum": 0, "maximum": 64, "description": "x and y are relative to this "
                                                                                     "monitor (screen_monitors)"}}
BUTTON = {"type": "string", "enum": ["left", "middle", "right"], "default": "left"}
READ = {"readOnlyHint": True}


# --- what the box has -------------------------------------------------------------------
@_tool("list_streams", "The streams on the box's frame bus: cameras, screens, decoded pictures, audio, vision "
                       "output; with who produces each and its rate.", annotations=READ)
def _streams(hub: Hub, args: dict[str, Any]) -> Result:
    rows = [{k: s.get(k) for k in ("stream", "kind", "status", "rate_hz", "service")}
            for s in _ask(hub, "streams", {})]
    return _plain(rows, "\n".join(f"{r['stream']}: {r['kind']}, {r['status']}, {r['rate_hz']} Hz, from "
                                  f"{r['service'] or '?'}" for r in rows) or "no streams")


@_tool("list_cameras", "The box's V4L2 video devices (webcams, capture cards), whether each captures, and any "
                       "error opening it.", annotations=READ)
def _cameras(hub: Hub, args: dict[str, Any]) -> Result:
    rows = _ask(hub, "cameras", {})
    return _plain(rows, "\n".join(f"{c['device']}: {c['name']} ({'captures' if c['capture'] else 'no capture'})"
                                  f"{' ' + c['error'] if c['error'] else ''}" for c in rows) or "no cameras")


@_tool("snapshot", "A JPEG of the newest picture of a stream (a camera, a screen, any picture stream).",
       {"stream": STRING, "max_width": {"type": "integer", "minimum": 16, "maximum": 1920, "default": 640}},
       ("stream",), annotations=READ)
def _snapshot(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "snapshot", {"stream": args["stream"], "max_width": args.get("max_width", 640)})
    meta = {k: r[k] for k in ("stream", "width", "height", "source_width", "source_height", "seq")}
    return Result(f"{r['stream']}: {r['width']}x{r['height']} (of {r['source_width']}x{r['source_height']})",
                  meta, image=base64.b64decode(r["jpeg"]))


# --- vision -----------------------------------------------------------------------------
@_tool("describe_stream", "Ask the vision model about the newest picture of a stream (a screen, a webcam, any "
                          "camera): what it shows, or an answer to a question.",
       {"stream": STRING, "question": {"type": "string", "description": "what to ask; the box's default prompt "
                                                                         "when left out"}},
       ("stream",), needs="vision.describe", fenced=True, annotations=READ)
def _describe(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "vision.describe", {"stream": args["stream"], "question": args.get("question", "")}, MODEL_WAIT)
    if r.get("blocked"):
        return Result(f"the answer about {args['stream']} was withheld by the box's policy hook", r)
    res = r.get("result") or {}
    seen = {k: res.get(k) for k in ("description", "labels", "text", "faces") if res.get(k)}
    data = {"stream": r.get("stream"), "question": r.get("question"), "seen": seen, "untrusted": True}
    return Result(fence(f"what a vision model said about the newest picture of {r.get('stream')}", seen), data,
                  untrusted=True)


@_tool("view_room", "What vision knows about a room now: a short note per stream (description, labels, "
                    "detections), ready for an agent's context.", {"room": STRING}, ("room",), needs="vision.view",
       fenced=True, annotations=READ)
def _view(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "vision.view", {"room": args["room"]})
    return Result(fence(f"the vision note of room {args['room']}, written from what models saw", r.get("note", "")),
                  {"room": r.get("room"), "updated": r.get("updated"), "note": r.get("note"), "untrusted": True},
                  untrusted=True)


# --- recordings -------------------------------------------------------------------------
TARGET = {"type": "string", "minLength": 1, "description": "a stream name, or room:NAME for a whole room"}


@_tool("start_recording", "Start recording a stream or a room (crash-safe fragmented MP4 on the box).",
       {"target": TARGET}, ("target",), needs="record.start")
def _record_start(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "record.start", {"target": args["target"]})
    return _plain(r, f"recording {r.get('target')} ({r.get('state')}) into {r.get('dir')}")


@_tool("stop_recording", "Stop recording a stream or a room.", {"target": TARGET}, ("target",), needs="record.stop")
def _record_stop(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "record.stop", {"target": args["target"]})
    return _plain(r, f"stopped recording {r.get('target')}: {r.get('segments')} segment(s), last file "
                     f"{r.get('path') or '(none)'}")


# --- calls ------------------------------------------------------------------------------
@_tool("list_calls", "The box's SIP calls: peer, room, codecs, duration.", needs="call.list", annotations=READ)
def _calls(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "call.list", {})
    rows = r.get("calls", [])
    return _plain(r, "\n".join(f"{c['call']}: {c['direction']} {c['state']} with {c['peer']} in {c['room']}"
                               for c in rows) or "no calls")


@_tool("dial_call", "Dial a SIP URI; answers once the call is up (or refused). The call joins a room.",
       {"uri": {"type": "string", "pattern": "^sips?:", "description": "sip:user@host[:port]"},
        "room": {"type": "string", "minLength": 1}, "video": {"type": "boolean", "default": True}},
       ("uri",), needs="call.dial")
def _dial(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "call.dial", {k: args[k] for k in ("uri", "room", "video") if k in args}, DIAL_WAIT)
    return _plain(r, f"call {r.get('call')} with {r.get('peer')} is up in room {r.get('room')}")


@_tool("hangup_call", "Hang up a SIP call (its id from list_calls or dial_call).", {"call": STRING}, ("call",),
       needs="call.hangup")
def _hangup(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "call.hangup", {"call": args["call"]})
    return _plain(r, f"call {r.get('call')} hung up")


# --- screen input -------------------------------------------------------------------------
@_tool("screen_monitors", "The monitors of a screen source's display (monitor 0 is all of them) and the input "
                          "actions it allows: where x and y land.", {"source": SOURCE}, ("source",),
       screen="monitors", annotations=READ)
def _monitors(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "screen.monitors", {"source": args["source"]})
    return _plain(r, "\n".join(f"monitor {m['monitor']}: {m['width']}x{m['height']} at {m['left']},{m['top']}"
                               for m in r["monitors"]))


def _clicked(r: dict[str, Any]) -> str:
    return f"clicked {r['button']} x{r['count']} at ({r['x']}, {r['y']}) on monitor {r['monitor']}"


@_tool("screen_click", "Click at a point of a screen source's display: x, y on the X screen, or relative to "
                       "`monitor`. A point off every monitor is refused.",
       {"source": SOURCE, **POINT, "button": BUTTON, "double": {"type": "boolean", "default": False}},
       ("source", "x", "y"), screen="click")
def _click(hub: Hub, args: dict[str, Any]) -> Result:
    req = {k: args[k] for k in ("source", "x", "y", "monitor", "button") if k in args}
    r = _ask(hub, "screen.click", req | ({"count": 2} if args.get("double") else {}), INPUT_WAIT)
    return _plain(r, _clicked(r))


@_tool("screen_click_element", "Click on an element of a screen source's display described in words (\"the Save "
                               "button\"): the vision model finds it on a screenshot; nothing is clicked if it "
                               "does not. verify: a second, closer look first.",
       {"source": SOURCE, "element": STRING, "monitor": POINT["monitor"], "button": BUTTON,
        "verify": {"type": "boolean", "default": False}}, ("source", "element"), screen="click", fenced=True)
def _click_element(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "screen.click", {k: args[k] for k in ("source", "element", "monitor", "button", "verify")
                                   if k in args}, MODEL_WAIT)
    data = {k: r.get(k) for k in ("source", "x", "y", "monitor", "box", "button", "verified")}
    data["label"], data["untrusted"] = r.get("label", ""), True
    return Result(_clicked(r) + "; the element as the vision model labelled it:\n"
                  + fence("the label a vision model gave the element it found", r.get("label", "")), data,
                  untrusted=True)


@_tool("screen_type", "Type text on a screen source's display, into whatever has the keyboard focus (any "
                      "Unicode).", {"source": SOURCE, "text": {"type": "string", "minLength": 1, "maxLength": 2000}},
       ("source", "text"), screen="type")
def _type(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "screen.type", {"source": args["source"], "text": args["text"]}, INPUT_WAIT)
    return _plain(r, f"typed {r['characters']} character(s)")


@_tool("screen_keys", "Press keys and chords by name on a screen source's display: 'ctrl+a backspace', "
                      "'alt+tab', 'enter'. Unknown names are refused with the known ones listed.",
       {"source": SOURCE, "keys": {"type": "string", "minLength": 1, "maxLength": 400}}, ("source", "keys"),
       screen="keys")
def _keys(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "screen.keys", {"source": args["source"], "keys": args["keys"]}, INPUT_WAIT)
    return _plain(r, f"pressed {' '.join(r['keys'])}")


@_tool("screen_scroll", "Scroll the mouse wheel on a screen source's display: dy > 0 down, dx > 0 right, in "
                        "wheel clicks; at x, y when given.",
       {"source": SOURCE, "dy": {"type": "integer", "minimum": -50, "maximum": 50},
        "dx": {"type": "integer", "minimum": -50, "maximum": 50}, **POINT}, ("source",), screen="scroll")
def _scroll(hub: Hub, args: dict[str, Any]) -> Result:
    r = _ask(hub, "screen.scroll", {k: args[k] for k in ("source", "dy", "dx", "x", "y", "monitor") if k in args},
             INPUT_WAIT)
    return _plain(r, f"scrolled dy={r['dy']} dx={r['dx']}")


# --- the registry's uses ----------------------------------------------------------------
def available(hub: Hub) -> list[tuple[Tool, dict[str, Any]]]:
    """The tools this box answers now, each with its schema (screen tools list their sources)."""
    commands = _ask(hub, "commands", {})
    screens = _ask(hub, "screen.list", {}) if "screen.list" in commands else []
    out = []
    for t in TOOLS.values():
        if t.needs and t.needs not in commands:
            continue
        if t.screen:
            sources = sorted(s["source"] for s in screens if t.screen == "monitors" or t.screen in s["actions"])
            if not sources:
                continue
            out.append((t, t.schema(sources)))
        else:
            out.append((t, t.schema()))
    return out


def check(tool: Tool, args: Any) -> dict[str, Any]:
    """`args` checked against the tool's schema; integral numbers made ints; raises ToolError(bad_args)."""
    import jsonschema  # the mcp extra's dependency; imported where it is used
    if args is None:
        args = {}
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(tool.schema()).iter_errors(args))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "arguments"
        raise ToolError("bad_args", f"{tool.name}: {where}: {error.message}")
    return {k: int(v) if tool.properties.get(k, {}).get("type") == "integer" else v for k, v in args.items()}


def call(hub: Hub, name: str, args: Any, count: Callable[[str, str], None] | None = None) -> Result:
    """Run the tool `name`; every call is counted by `count(tool, result)` (ok or the error code)."""
    try:
        tool = TOOLS.get(name)
        if tool is None:
            raise ToolError("unknown_tool", f"no tool {name!r} (tools: {', '.join(TOOLS)})")
        result = tool.run(hub, check(tool, args))
    except ToolError as exc:
        if count:
            count(name if name in TOOLS else "unknown", exc.code)
        raise
    if count:
        count(name, "ok")
    return result


def openai_functions(tools: list[tuple[Tool, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The tools as OpenAI function-calling definitions (chat completions `tools`)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": schema}}
            for t, schema in tools]
