"""Screen input inside a screen source's capture process: its `input.*` offers, events and metrics.

    ScreenInput(service, cfg)   # from Capture.setup(), only when [sources.NAME] input = true

It offers `input.monitors` and one `input.ACTION` per allowed action (`input_actions`; '' is
all of click, type, keys, scroll). Every action runs on one worker thread that owns the X
connection (opened at the first action, so a capture with no display yet still starts) and
the vision provider (opened at the first click on an element, from [vision]): actions run in
the order they came, one at a time. Each is answered later (the offer's `later`), published
as a `screen.input` event (what, where, result; a typed text's length, never the text) and
counted in `edgeroom_screen_input_actions_total{source, action, result}`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import Counter, Histogram

from services.control.protocol import ProtocolError
from services.screen import commands
from services.screen.keys import KeyNameError, parse_chords
from services.screen.locate import NotFound, Screenshot, ask
from services.screen.monitors import OffMonitor, place, rows
from services.screen.xtest import BUTTONS, InputUnavailable, XInput

__all__ = ["EVENT", "ScreenInput"]

EVENT = "screen.input"
CLOSE_UP_WIDTH = 1920   # the second look is sent at full resolution up to this width


class ScreenInput:
    def __init__(self, service: Any, cfg: Any) -> None:
        self.svc, self.cfg, self.source = service, cfg, service.instance
        self.allowed = commands.parse_actions(cfg.input_actions)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"input-{self.source}")
        self.x: XInput | None = None
        self.provider: Any = None
        r = service.registry
        self.m_actions = Counter("edgeroom_screen_input_actions", "Screen input actions by result: ok, or why "
                                 "nothing was done (bad_args, off_monitor, not_found, unavailable, internal).",
                                 ["source", "action", "result"], registry=r)
        self.m_seconds = Histogram("edgeroom_screen_input_seconds", "Time an action took, finding an element by "
                                   "vision included.", ["source", "action"], registry=r,
                                   buckets=(.005, .02, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        vision = service.config.vision
        slow = min(600.0, 2 * vision.timeout * (vision.retries + 1) + 10)   # two looks at the provider
        service.offer(f"{commands.OFFER}monitors", self._handler("monitors", self._monitors),
                      f"the monitors of {self.source}'s display (args: source)", args=commands.ARGS["monitors"],
                      required=commands.REQUIRED["monitors"], later=True)
        for action in self.allowed:
            service.offer(f"{commands.OFFER}{action}", self._handler(action, getattr(self, f"_{action}")),
                          f"screen input on {self.source}: {action}", args=commands.ARGS[action],
                          required=commands.REQUIRED[action], deadline=slow if action == "click" else 30.0,
                          later=True)
        service.on_stop(self.close, "screen input")

    # --- running an action ------------------------------------------------------------------
    def _handler(self, action: str, work: Callable[[dict], dict]) -> Callable[[dict, Callable], None]:
        def handle(args: dict, done: Callable) -> None:
            if args.get("source", self.source) != self.source:
                raise ProtocolError("not_found", f"{self.svc.id} has the screen {self.source}, not "
                                                 f"{args['source']!r}")
            try:
                commands.check(action, args)
            except ProtocolError as exc:
                self._finish(action, args, exc.code, None, exc, done, 0.0)
                return
            self.worker.submit(self._run, action, args, work, done)
        return handle

    def _run(self, action: str, args: dict, work: Callable[[dict], dict], done: Callable) -> None:
        t0 = time.monotonic()
        result: dict | None = None
        error: ProtocolError | None = None
        try:
            result = work(args)
            reason = "ok"
        except OffMonitor as exc:
            reason, error = "off_monitor", ProtocolError("bad_args", str(exc))
        except NotFound as exc:
            reason, error = "not_found", ProtocolError("not_found", str(exc))
        except (KeyNameError, ValueError) as exc:
            reason, error = "bad_args", ProtocolError("bad_args", str(exc))
        except ProtocolError as exc:
            reason, error = exc.code, exc
        except InputUnavailable as exc:
            reason, error = "unavailable", ProtocolError("unavailable", str(exc))
        except Exception as exc:   # the provider, the X server: one action fails, the service goes on
            why = getattr(exc, "reason", "")
            reason = "unavailable" if why else "internal"
            error = ProtocolError(reason, f"screen {action} on {self.source} failed"
                                          f"{f' (vision provider: {why})' if why else ''}: {type(exc).__name__}: {exc}")
            if not why:
                self.svc.log.exception("screen input %s failed", action)
        elapsed = time.monotonic() - t0
        self.svc.loop.call_soon_threadsafe(lambda: self._finish(action, args, reason, result, error, done, elapsed))

    def _finish(self, action: str, args: dict, reason: str, result: dict | None, error: ProtocolError | None,
                done: Callable, elapsed: float) -> None:
        """On the loop: count, publish, answer."""
        self.m_actions.labels(self.source, action, reason).inc()
        if action != "monitors":
            self.m_seconds.labels(self.source, action).observe(elapsed)
            event = {"source": self.source, "action": action, "result": reason, **_what(args),
                     **{k: v for k, v in (result or {}).items() if k in ("x", "y", "monitor", "label", "box")}}
            if error is not None:
                event["message"] = error.message
            if self.svc.link is not None:
                self.svc.link.publish(EVENT, event)
        done(result) if error is None else done(error=error)

    # --- the X connection and the provider, on the worker ------------------------------------
    def _input(self) -> XInput:
        if self.x is None:
            self.x = XInput(None)
        return self.x

    def _provider(self) -> Any:
        if self.provider is None:
            self.provider = open_provider(self.svc.config.vision, self.svc.registry)
        return self.provider

    def close(self) -> None:
        """After the actions already queued; an action still in flight after a second is left behind."""
        closed = self.worker.submit(self._close_worker)
        self.worker.shutdown(wait=False)
        try:
            closed.result(timeout=1.0)
        except Exception:  # timed out behind a slow provider call, or the display was gone: the process ends
            self.svc.log.warning("screen input: the X connection was not closed in time")

    def _close_worker(self) -> None:
        if self.x is not None:
            self.x.close()
            self.x = None
        if self.provider is not None:
            self.provider.close()

    # --- the actions (on the worker) -----------------------------------------------------
    def _monitors(self, args: dict) -> dict:
        mons = self._input().monitors()
        return {"source": self.source, "display": self._input().name, "monitors": rows(mons),
                "actions": self.allowed, "captured": self.cfg.monitor}

    def _point(self, args: dict) -> tuple[int, int, int]:
        return place(self._input().monitors(), args["x"], args["y"], args.get("monitor"))

    def _click(self, args: dict) -> dict:
        button, count = args.get("button", "left"), args.get("count", 1)
        out: dict[str, Any] = {"source": self.source, "action": "click", "button": button, "count": count}
        if "element" in args:
            x, y, extra = self._locate(args["element"], args.get("monitor"), args.get("verify", False))
            out |= extra
            x, y, monitor = place(self._input().monitors(), x, y)
        else:
            x, y, monitor = self._point(args)
        self._input().click(x, y, BUTTONS[button], count)
        return out | {"x": x, "y": y, "monitor": monitor}

    def _rect(self, monitor: int | None) -> tuple[int, int, int, int]:
        """What a search looks at: the monitor asked for, else the source's own monitor and region."""
        mons = self._input().monitors()
        index = self.cfg.monitor if monitor is None else monitor
        if not 0 <= index < len(mons):
            raise OffMonitor(f"no monitor {index} on {self._input().name}")
        m = mons[index]
        if monitor is None and self.cfg.region:
            from services.capture.sources.screen import parse_region
            x, y, w, h = parse_region(self.cfg.region)
            return m.left + x, m.top + y, min(w, m.width - x), min(h, m.height - y)
        return m.left, m.top, m.width, m.height

    def _locate(self, element: str, monitor: int | None, verify: bool) -> tuple[int, int, dict]:
        provider = self._provider()
        shot = Screenshot.grab(None, self._rect(monitor), self.svc.config.vision.max_image_width)
        found = ask(provider, shot, element)
        x, y = shot.to_screen(found.centre())
        box = [*shot.to_screen(found.box[:2]), *shot.to_screen(found.box[2:])]
        extra: dict[str, Any] = {"element": element, "label": found.label, "verified": False}
        if verify:
            close = Screenshot.grab(None, shot.around(found), CLOSE_UP_WIDTH)
            try:
                again = ask(provider, close, element)
            except NotFound as exc:
                raise NotFound(f"the second look did not confirm {element!r} near ({x}, {y}): {exc}") from None
            x, y = close.to_screen(again.centre())
            box = [*close.to_screen(again.box[:2]), *close.to_screen(again.box[2:])]
            extra |= {"label": again.label or found.label, "verified": True}
        return x, y, extra | {"box": box}

    def _type(self, args: dict) -> dict:
        text = args["text"]
        self._input().type_text(text)
        return {"source": self.source, "action": "type", "characters": len(text)}

    def _keys(self, args: dict) -> dict:
        chords = parse_chords(args["keys"])
        self._input().press(chords)
        return {"source": self.source, "action": "keys", "keys": [str(c) for c in chords]}

    def _scroll(self, args: dict) -> dict:
        if "monitor" in args and "x" not in args:
            raise ProtocolError("bad_args", "monitor goes with x and y (where to scroll)")
        at = self._point(args) if "x" in args else None
        self._input().scroll(args.get("dy", 0), args.get("dx", 0), at[:2] if at else None)
        where = {"x": at[0], "y": at[1], "monitor": at[2]} if at else {}
        return {"source": self.source, "action": "scroll", "dy": args.get("dy", 0), "dx": args.get("dx", 0), **where}


def _what(args: dict) -> dict:
    """An action's arguments as an event shows them: the text typed only by its length."""
    out = {k: v for k, v in args.items() if k not in ("source", "text")}
    if "text" in args:
        out["characters"] = len(args["text"])
    return out


def open_provider(vision: Any, registry: Any) -> Any:
    """The [vision] provider, opened as the vision service opens it; unavailable when there is none."""
    if vision.provider == "none":
        raise ProtocolError("unavailable", "no vision provider to find an element with: set [vision] provider "
                                           "(mock, openai or gemini); a click at x, y needs none")
    from services.vision.providers import ProviderMetrics
    from services.vision.providers import open_provider as open_one
    kwargs: dict[str, Any] = {"metrics": ProviderMetrics(registry)}
    if vision.provider != "mock":
        kwargs.update(timeout=vision.timeout, retries=vision.retries)
        for key, arg in (("provider_model", "model"), ("base_url", "base_url"), ("api_key_env", "api_key_env")):
            if getattr(vision, key):
                kwargs[arg] = getattr(vision, key)
    return open_one(vision.provider, **kwargs)
