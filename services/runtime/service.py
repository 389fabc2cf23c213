"""The base every edgeroom service runs on: config, logs, loop, sd_notify, signals, hub, metrics.

A service subclasses `Service` (or `AsyncService`, on asyncio) and fills in:

    setup()                 open what the service needs (bus rings, devices); may raise
    apply(config, changes)  take what it can of a reloaded config; return keys that need a restart
    describe()              {"rate": ..., "sessions": [...], "streams": [...], "status": "..."}

and schedules its own work on `self.loop`. The base sends READY=1 after setup(), pings
the watchdog from the loop (so a stuck loop stops pinging), heartbeats the hub with the
service's whole state and metrics, reloads on SIGHUP and stops cleanly on SIGTERM.

One lifecycle: whatever setup() acquires is registered as it is acquired, with
`self.own(thing)` (closed with thing.close(), or the closer given) or `self.on_stop(fn)`,
and released in reverse order when the service stops — also when setup() failed half
way, so nothing needs to ask what was set up. `describe()` is asked only once the service
is ready (`self.ready`); before that the base reports "starting".

A service may answer commands of its own (`record.start`, `vision.describe`): it calls
`self.offer(name, handler, summary, args=..., required=...)` in setup(), the heartbeat
announces the offer, the hub forwards clients' calls of that name here
(services/hub/offers.py), and the base checks the arguments as the hub checks its own
(services/control/args.py) before the handler runs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict, TypeVar, overload

import zmq
from prometheus_client import Counter

import framebus
from services.control.args import ArgTypes, check_args
from services.control.client import CommandFailed
from services.control.endpoints import Endpoints, endpoints_for, runtime_dir
from services.control.protocol import JsonObject, ProtocolError
from services.runtime import config as configuration
from services.runtime import logs
from services.runtime.aioloop import AsyncLoop
from services.runtime.hublink import HubLink
from services.runtime.logs import Throttled
from services.runtime.loop import Loop
from services.runtime.metrics import new_registry, process_collector, snapshot
from services.runtime.notify import Notifier

__all__ = ["KEYFRAME_OFFER", "AsyncService", "Resources", "Service", "identity", "main"]

KEYFRAME_OFFER = "stream.keyframe"  # the offer the hub's `keyframe` command routes to a stream's producer

T = TypeVar("T")


class _Closable(Protocol):
    def close(self) -> object: ...


C = TypeVar("C", bound=_Closable)


class Description(TypedDict, total=False):
    """What describe() tells the hub with every heartbeat (each key optional)."""

    state: str | None  # overrides the base's state ("degraded" while a source reopens)
    status: str  # one line for `edgeroom ctl status` and sd_notify's STATUS=
    rate: float  # items a second
    sessions: list[JsonObject]  # checked by the hub (services/hub/registry.py)
    streams: list[JsonObject]

log = logging.getLogger("edgeroom.service")

BYE_WAIT = 0.5  # seconds a stopping service waits for the hub's answer to its goodbye (service.bye)


HEARTBEAT_ENVELOPE = 4096   # bytes of a request around its body (id, command, framing), kept free under the limit

def identity(kind: str, instance: str | None) -> str:
    return f"{kind}@{instance}" if instance else kind


class Resources:
    """What a service holds, released in the reverse order of acquiring it; a failing release is
    logged and the others still run."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._held: list[tuple[str, Callable[[], object]]] = []

    def add(self, what: str, release: Callable[[], object]) -> None:
        self._held.append((what, release))

    def release(self) -> None:
        while self._held:
            what, release = self._held.pop()
            try:
                release()
            except Exception:  # one resource that fails to close must not keep the others open
                self.log.exception("releasing %s failed", what)


@dataclass(frozen=True)
class _Offer:
    handler: Callable[..., Any]
    summary: str
    deadline: float
    later: bool
    args: ArgTypes
    required: tuple[str, ...]


class Service:
    kind = ""
    loop_class: type[Loop] | type[AsyncLoop] = Loop

    def __init__(self, config: configuration.Config, instance: str | None = None,
                 config_path: str | None = None) -> None:
        self.config, self.instance, self.config_path = config, instance, config_path
        self.id = identity(self.kind, instance)
        self.log = logging.getLogger(f"edgeroom.{self.kind}")
        self.loop = self.loop_class()
        self.notifier = Notifier()
        self.state = "starting"
        self.ready = False  # setup() is done: describe() may be asked
        self.resources = Resources(self.log)
        self.started_at = time.time()
        self.rundir: Path = runtime_dir(config.box.runtime_dir)
        self.endpoints: Endpoints = endpoints_for(self.rundir, config.control.tcp_control, config.control.tcp_events)
        self.link: HubLink | None = None
        self.registry = new_registry()
        self.throttled = Throttled(self.log)
        self._offers: dict[str, _Offer] = {}
        self._beat_soon = False
        self._base_metrics()

    # --- what a service provides -------------------------------------------------
    def setup(self) -> None:
        pass

    def apply(self, new: configuration.Config, changes: list[configuration.Change]) -> list[str]:
        return [c.key for c in changes if not c.live]

    def describe(self) -> Description:
        return {}

    # --- what it holds ---------------------------------------------------------------
    @overload
    def own(self, thing: C, close: None = None, what: str = "") -> C: ...
    @overload
    def own(self, thing: T, close: Callable[[T], object], what: str = "") -> T: ...

    def own(self, thing: Any, close: Callable[[Any], object] | None = None, what: str = "") -> Any:
        """Register `thing`, just acquired, to be released when the service stops: `close(thing)`,
        else `thing.close()`. Returns `thing`."""
        release = (lambda: close(thing)) if close is not None else thing.close
        self.resources.add(what or type(thing).__name__, release)
        return thing

    def on_stop(self, release: Callable[[], object], what: str = "") -> None:
        """Run `release` when the service stops (after what was registered later, before what came earlier)."""
        self.resources.add(what or getattr(release, "__name__", "a release"), release)

    # --- commands a service answers ------------------------------------------------
    def offer(self, name: str, handler: Callable[..., Any], summary: str, *, args: ArgTypes | None = None,
              required: tuple[str, ...] = (), deadline: float = 5.0, later: bool = False) -> None:
        """Answer the command `name` (clients send it to the hub, which forwards it here).

        `args` are its arguments' types and `required` the ones it needs: the base refuses a call
        that does not fit (bad_args) before the handler runs. handler(args) returns the result, or
        raises ProtocolError(code, message). With later=True, handler(args, done) answers by calling
        done(result) or done(error=ProtocolError(...)) once, from the loop, within `deadline` seconds.
        """
        self._offers[name] = _Offer(handler, summary, deadline, later, args or {}, required)

    def offer_keyframes(self, answer: Callable[[str, str], dict[str, Any]]) -> None:
        """Answer keyframe requests for the streams this service produces: the hub routes `keyframe
        {stream}` to the stream's producer. `answer(stream, reason)` makes one (services/runtime/
        keyframes.py throttles and repeats) or says why it cannot (`keyframes.cannot`)."""
        self.offer(KEYFRAME_OFFER, lambda args: answer(args["stream"], args.get("reason", "")),
                   "make a keyframe of a stream this service produces (args: stream, reason)",
                   args={"stream": str, "reason": str}, required=("stream",))

    def request_keyframe(self, stream: str, reason: str) -> None:
        """Ask the producer of `stream` for a keyframe, through the hub; the answer is logged (debug), a
        refusal too (a producer that cannot make one says when its next one is due)."""
        if self.link is not None:
            self.link.request("keyframe", {"stream": stream, "reason": reason},
                              lambda result, error: self._keyframe_answer(stream, result, error))

    def _keyframe_answer(self, stream: str, result: object, error: Exception | None) -> None:
        self.log.debug("keyframe request for %s: %s", stream, error if error is not None else result)

    def _on_call(self, msg: JsonObject) -> None:
        call, name, args = str(msg.get("call")), str(msg.get("cmd")), msg.get("args") or {}
        entry = self._offers.get(name)
        answered = False

        def done(result: Any = None, error: Exception | None = None) -> None:
            nonlocal answered
            if answered or self.link is None:
                return
            answered = True
            body: JsonObject = {"service": self.id, "call": call}
            if isinstance(error, ProtocolError):
                body["error"] = {"code": error.code, "message": error.message}
            elif error is not None:
                self.log.error("command %s failed: %s: %s", name, type(error).__name__, error)
                body["error"] = {"code": "internal", "message": f"{self.id} failed on {name}: "
                                                                f"{type(error).__name__}: {error}"}
            else:
                body["result"] = result
            self.link.request("service.answer", body)

        if entry is None:
            done(error=ProtocolError("unknown_command", f"{self.id} does not answer {name!r}"))
            return
        try:
            args = check_args(args, entry.args, entry.required)
            if entry.later:
                entry.handler(args, done)
            else:
                done(entry.handler(args))
        except Exception as exc:  # a bug or bad input costs one call, never the service
            done(error=exc)

    # --- metrics every service has ---------------------------------------------
    def _base_metrics(self) -> None:
        r = self.registry
        self.m_heartbeats = Counter("edgeroom_service_heartbeats", "Heartbeats sent to the hub.", registry=r)
        self.m_trimmed = Counter("edgeroom_service_heartbeats_trimmed", "Heartbeats over the control plane's message "
                                 "limit, sent with their largest metric families left out.", registry=r)
        self.m_hub_reconnects = Counter("edgeroom_service_hub_reconnects",
                                        "Times the hub stopped answering and the link was reopened.", registry=r)
        self.m_reloads = Counter("edgeroom_service_reloads", "Config reloads (SIGHUP), by result.",
                                 ["result"], registry=r)
        r.register(process_collector(self.started_at))

    # --- the heartbeat ------------------------------------------------------------
    def heartbeat_body(self) -> JsonObject:
        info: Description = self.describe() if self.ready else {"status": "starting"}
        return {"service": self.id, "kind": self.kind, "instance": self.instance, "pid": os.getpid(),
                "started": self.started_at, "state": info.get("state") or self.state, "status": info.get("status", ""),
                "rate": info.get("rate", 0.0), "sessions": info.get("sessions", []),
                "streams": info.get("streams", []), "metrics": snapshot(self.registry),
                "offers": {name: {"summary": o.summary, "deadline": o.deadline} for name, o in self._offers.items()}}

    def sessions_changed(self) -> None:
        """A session began or ended, or a stream the service makes: the hub hears it with a heartbeat now, not at
        the next tick (the bridge routes a new participant on the hub's word, and a keyframe request for a new
        stream is routed by the heartbeats' streams: a picture within a second needs no second's wait)."""
        if not self._beat_soon and self.ready:
            self._beat_soon = True
            self.loop.call_later(0.0, self._beat_now)

    def _beat_now(self) -> None:
        self._beat_soon = False
        self.heartbeat()

    def heartbeat(self) -> None:
        if self.link is not None and self.link.request("service.heartbeat", self._fitted(self.heartbeat_body()),
                                                       self._heartbeat_answered):
            self.m_heartbeats.inc()

    def _fitted(self, body: JsonObject) -> JsonObject:
        """`body` within the control plane's message limit: a heartbeat over it would be refused whole, and a
        service whose heartbeats are refused goes stale (its sessions end). What gives way is the metrics: its
        largest families are left out, whole (counted, and named in a warning), until it fits; the service's own
        (edgeroom_service_*: heartbeats, CPU, memory) always go."""
        limit = self.config.control.max_message_bytes - HEARTBEAT_ENVELOPE
        size = len(json.dumps(body))
        if size <= limit:
            return body
        sizes = {f["name"]: len(json.dumps(f)) + 2 for f in body["metrics"]}
        left_out: set[str] = set()
        for name in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if size <= limit:
                break
            if not name.startswith("edgeroom_service_"):
                left_out.add(name)
                size -= sizes[name]
        body["metrics"] = [f for f in body["metrics"] if f["name"] not in left_out]
        self.m_trimmed.inc()
        self.throttled.warning("heartbeat-size", f"the heartbeat is over [control] max_message_bytes "
                                                 f"({self.config.control.max_message_bytes}): the metrics "
                                                 f"{', '.join(sorted(left_out))} are left out of it (raise the "
                                                 "limit to see them at the hub)")
        return body

    def _heartbeat_answered(self, _result: object, error: Exception | None) -> None:
        if isinstance(error, CommandFailed):  # the hub is there but refuses us: say why, once a second at most
            self.throttled.warning("heartbeat", f"the hub rejected a heartbeat: {error}")

    # --- running -------------------------------------------------------------------
    def _connect_hub(self) -> None:
        timeout = max(3 * self.config.hub.heartbeat_interval, 1.0)
        self.link = HubLink(self.endpoints, self.id, timeout=timeout,
                            max_bytes=self.config.control.max_message_bytes)
        self.link.on_socket_change = self._swap_link_socket
        self.link.on_call = self._on_call
        self.loop.add_reader(self.link.sock, self.link.readable)

    def _swap_link_socket(self, old: zmq.SyncSocket, new: zmq.SyncSocket) -> None:
        self.loop.remove_reader(old)
        self.m_hub_reconnects.inc()
        self.loop.add_reader(new, self.link.readable if self.link else lambda: None)

    def _turn(self, now: float) -> None:
        self.notifier.ping(now)
        if self.link is not None:
            self.link.check(now)

    def _on_term(self, signum: int) -> None:
        self.log.info("%s received: stopping", signal.Signals(signum).name)
        self.loop.stop()

    def _on_hup(self, _signum: int) -> None:
        self.notifier.reloading()
        try:
            new = configuration.load(self.config_path)
        except configuration.ConfigError as exc:
            self.m_reloads.labels("rejected").inc()
            self.log.error("reload rejected, keeping the running config: %s", exc)
            self.notifier.ready()
            return
        changes = configuration.diff(self.config, new)
        pending = self.apply(new, changes)
        logs.setup(self.id, new.log.level, new.log.format)
        self.config = new
        self.m_reloads.labels("applied").inc()
        applied = [c.key for c in changes if c.key not in pending]
        self.log.info("reloaded: %d change(s) applied%s%s", len(applied), f" ({', '.join(applied)})" if applied else "",
                      f"; needs a restart of {self.id}: {', '.join(pending)}" if pending else "")
        self.notifier.ready()

    def _serve(self) -> None:
        self.loop.on_signal(signal.SIGTERM, self._on_term)
        self.loop.on_signal(signal.SIGINT, self._on_term)
        self.loop.on_signal(signal.SIGHUP, self._on_hup)
        self.loop.turn_hooks.append(self._turn)
        self.loop.every(self.config.hub.heartbeat_interval, self.heartbeat)
        if self.notifier.interval > 0:  # wake the loop for the watchdog; the ping itself happens in _turn
            self.loop.every(self.notifier.interval, lambda: None)
        self.setup()
        self.state, self.ready = "ready", True
        self.notifier.ready(self.describe().get("status", "ready"))
        self.log.info("ready (pid %d)", os.getpid())
        self.heartbeat()
        self.loop.run()

    def run(self) -> int:
        """Serve until SIGTERM; 0 after a clean stop, 1 if the service could not start or crashed."""
        logs.setup(self.id, self.config.log.level, self.config.log.format)
        rc = 0
        try:
            if self.kind != "hub":
                self._connect_hub()
            self._serve()
        except ImportError as exc:  # an extra is not installed: restarting cannot help (exit 78, like a bad config)
            self.log.error("cannot run: %s: this service needs an extra that is not installed "
                           "(pip install 'edgeroom[media]', or scripts/install.sh --extras media)", exc)
            rc = 78
        except (OSError, RuntimeError, ValueError, framebus.BusError) as exc:
            self.log.error("cannot run: %s", exc)  # an expected failure: one line that names the cause
            rc = 1
        except Exception:
            self.log.exception("crashed")  # a bug: the traceback, as one log line
            rc = 1
        finally:
            self.state = "stopping"
            self.notifier.stopping(f"{self.id} stopping")
            self._stop()
        return rc

    def _stop(self) -> None:
        t0 = time.monotonic()
        self.ready = False
        try:
            self.resources.release()
        finally:
            if self.link is not None:
                # its own reply, not just any (a heartbeat's may be waiting): the hub answers an open socket
                self.link.goodbye("service.bye", {"service": self.id, "pid": os.getpid()},
                                  BYE_WAIT if self.link.connected else 0.0)  # no hub: no wait
                self.link.close()
            self.loop.close()
            self.notifier.close()
            self.log.info("stopped in %.0f ms", (time.monotonic() - t0) * 1000)


class AsyncService(Service):
    """A service on asyncio (services/runtime/aioloop.py): the same heartbeats, watchdog, sd_notify,
    reload and stop as any service; its coroutines run with `self.loop.spawn(coro)`, and
    `started()` runs as a task once the service is ready."""

    loop_class = AsyncLoop
    loop: AsyncLoop

    async def started(self) -> None:
        """Runs as a task once the service is ready (override it); an exception is logged."""

    def _serve(self) -> None:
        self.loop.aio.call_soon(lambda: self.loop.spawn(self.started(), name=f"{self.id} started"))
        super()._serve()


def main(cls: type[Service], instance: str | None = None, config_path: str | None = None) -> int:
    """Entry point of `edgeroom service KIND [INSTANCE]`."""
    try:
        config = configuration.load(config_path)
    except configuration.ConfigError as exc:
        print(f"edgeroom {cls.kind}: bad config: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG: systemd's RestartPreventExitStatus keeps it from restart-looping
    return cls(config, instance, config_path).run()
