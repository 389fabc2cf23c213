"""The hub's commands: one small function each, in TABLE by wire name.

A handler gets the hub, the request's args and a Ctx (where to reply); it returns the
result, or DEFERRED when the reply comes later (hook calls). It raises ProtocolError
with code bad_args / not_found for bad input: the hub turns that into an error reply.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

from services.control import protocol
from services.control.protocol import ProtocolError
from services.hub.offers import Offer, check_offers
from services.hub.registry import check_heartbeat
from services.hub.sessions import check_sessions
from services.runtime import config as configuration
from services.runtime import sources
from services.runtime.metrics import snapshot
from services.runtime.scrub import scrub

if TYPE_CHECKING:
    import zmq

    from services.hub.service import Hub

__all__ = ["TABLE", "Ctx", "DEFERRED"]

DEFERRED = object()


@dataclass(frozen=True)
class Ctx:
    router: zmq.Socket
    envelope: list[bytes]
    request_id: Any


TABLE: dict[str, Callable[[Hub, dict, Ctx], Any]] = {}
HELP: dict[str, str] = {}


def command(name: str, summary: str):
    def register(fn):
        TABLE[name], HELP[name] = fn, summary
        return fn
    return register


def _args(args: dict, allowed: dict[str, type | tuple], required: tuple[str, ...] = ()) -> dict:
    """Check a command's args: no unknown names, required ones present, types right."""
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ProtocolError("bad_args", f"unknown argument(s): {', '.join(unknown)} "
                                        f"(allowed: {', '.join(allowed) or 'none'})")
    for name in required:
        if name not in args:
            raise ProtocolError("bad_args", f"missing argument {name!r}")
    for name, value in args.items():
        kind = allowed[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            raise ProtocolError("bad_args", f"argument {name!r} has the wrong type ({type(value).__name__})")
    return args


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


# --- asking ------------------------------------------------------------------------------
@command("ping", "is the hub there: its pid and protocol version")
def ping(hub: Hub, args: dict, ctx: Ctx) -> dict:
    _args(args, {})
    return {"pong": True, "pid": os.getpid(), "version": protocol.VERSION, "box": hub.box_name}


@command("commands", "every command with a one-line summary, the services' commands included")
def commands(hub: Hub, args: dict, ctx: Ctx) -> dict:
    _args(args, {})
    return dict(sorted({**HELP, **hub.offer_book.summaries()}.items()))


@command("status", "every service: state, pid, uptime, restarts, rate; the box's metrics URL")
def status(hub: Hub, args: dict, ctx: Ctx) -> dict:
    _args(args, {})
    now, wall = time.monotonic(), time.time()
    hub_row = {"service": "hub", "kind": "hub", "state": "ready", "pid": os.getpid(),
               "uptime": wall - hub.started_at, "restarts": 0, "rate": 0.0, "status": hub.describe()["status"],
               "last_seen": 0.0, "streams": []}
    return {"box": hub.box_name, "metrics_url": hub.metrics_url, "endpoints": hub.bound_endpoints,
            "services": [hub_row, *hub.service_registry.rows(now, wall)]}


@command("streams", "streams on the frame bus with their producer service")
def streams(hub: Hub, args: dict, ctx: Ctx) -> list:
    _args(args, {})
    return hub.streams()


@command("rooms", "rooms and the sessions in each")
def rooms(hub: Hub, args: dict, ctx: Ctx) -> dict:
    _args(args, {})
    return hub.book.rooms()


@command("sessions", "sessions with their tracks (args: room)")
def sessions(hub: Hub, args: dict, ctx: Ctx) -> list:
    room = _args(args, {"room": str}).get("room")
    return [s.public() for s in sorted(hub.book.sessions.values(), key=lambda s: s.id)
            if room is None or s.room == room]


@command("metrics", "a summary of the box's metrics per service")
def metrics(hub: Hub, args: dict, ctx: Ctx) -> dict:
    _args(args, {})
    out = {}
    for service, families in sorted({**hub.collector.snapshots, "hub": snapshot(hub.registry)}.items()):
        out[service] = {f["name"]: sum(s[2] for s in f["samples"] if s[0] in (f["name"], f["name"] + "_total"))
                        for f in families if f.get("type") in ("counter", "gauge")}
    return {"metrics_url": hub.metrics_url, "services": out}


# --- services ------------------------------------------------------------------------------
@command("service.heartbeat", "a service's state, sessions, streams and metrics (services send it)")
def heartbeat(hub: Hub, args: dict, ctx: Ctx) -> dict:
    body = check_heartbeat(args)
    check_sessions(body.get("sessions", []))
    offers = check_offers(body.get("offers", {}))
    rec, previous, restarted = hub.service_registry.heartbeat(body, time.monotonic())
    hub.offer_book.update(rec.id, offers, ctx)
    if previous != rec.state or restarted:
        hub.log.info("service %s is %s (pid %d)%s", rec.id, rec.state, rec.pid, " after a restart" if restarted else "")
        hub.publish_state(rec, previous, restarted)
    hub.publish_changes(hub.book.update(rec.id, rec.pid, body.get("sessions", [])))
    hub.store_snapshot(rec.id, body.get("metrics", []))
    return {"service": rec.id, "state": rec.state}


@command("service.bye", "a service stops cleanly (services send it)")
def bye(hub: Hub, args: dict, ctx: Ctx) -> dict:
    a = _args(args, {"service": str, "pid": int}, ("service", "pid"))
    known = hub.service_registry.services.get(a["service"])
    previous = known.state if known else None
    rec = hub.service_registry.bye(a["service"], a["pid"])
    if rec is not None:
        hub.offer_book.drop(rec.id)
        hub.log.info("service %s stopped", rec.id)
        hub.publish_state(rec, previous)
        hub.publish_changes(hub.book.end_service(rec.id, "service stopped"))
    return {"known": rec is not None}


SERVICE_RESULTS = ("success", "protocol", "timeout", "exit-code", "signal", "core-dump", "watchdog",
                   "start-limit-hit", "resources", "oom-kill")


@command("service.exited", "systemd says how a unit's process ended (its ExecStopPost sends this)")
def exited(hub: Hub, args: dict, ctx: Ctx) -> dict:
    a = _args(args, {"service": str, "result": str, "code": str, "status": str}, ("service", "result"))
    check_heartbeat({"service": a["service"], "pid": 0, "started": 0, "state": "ready"})  # the id's shape
    if a["result"] not in SERVICE_RESULTS:
        raise ProtocolError("bad_args", f"result must be one of {', '.join(SERVICE_RESULTS)} "
                                        f"(systemd's $SERVICE_RESULT), got {a['result']!r}")
    hub.m_exits.labels(a["service"], a["result"]).inc()
    how = f"{a['result']} ({a.get('code', '')} {a.get('status', '')})".replace(" ( )", "")
    (hub.log.info if a["result"] == "success" else hub.log.warning)("service %s ended: %s", a["service"], how)
    hub.publish("service.exited", {"service": a["service"], "result": a["result"], "code": a.get("code", ""),
                                   "status": a.get("status", "")})
    return {"counted": True}


# --- events and hooks --------------------------------------------------------------------
@command("events.probe", "publish an empty event on a probe.* topic (confirms a subscription)")
def probe(hub: Hub, args: dict, ctx: Ctx) -> dict:
    topic = _args(args, {"topic": str}, ("topic",))["topic"]
    if not topic.startswith("probe."):
        raise ProtocolError("bad_args", f"probe topics start with 'probe.', got {topic!r}")
    hub.publish(protocol.check_topic(topic), {})
    return {"published": topic}


@command("hook.register", "become the handler of a synchronous hook (args: hook, ttl)")
def hook_register(hub: Hub, args: dict, ctx: Ctx) -> dict:
    a = _args(args, {"hook": str, "ttl": (int, float)}, ("hook",))
    hub.broker.register(a["hook"], ctx, float(a.get("ttl", 3.0)), time.monotonic())
    return {"hook": a["hook"], "deadline": hub.broker.policies[a["hook"]].deadline}


@command("hook.call", "run a synchronous hook: the handler's decision, or the policy's (args: hook, data)")
def hook_call(hub: Hub, args: dict, ctx: Ctx) -> Any:
    a = _args(args, {"hook": str, "data": dict}, ("hook",))
    now = time.monotonic()
    pending = hub.broker.open_call(a["hook"], ctx, now)
    handler = hub.broker.handler(a["hook"], now)
    if handler is None:
        del hub.broker.pending[pending.call]
        hub.finish_hook(pending, hub.broker.policy_result(a["hook"], "no_handler"))
        return DEFERRED
    push = {"v": protocol.VERSION, "type": "hook_call", "call": pending.call, "hook": a["hook"],
            "data": a.get("data", {}), "deadline_ms": int((pending.deadline - now) * 1000)}
    pending.handler = handler.ctx.envelope
    hub.reply(handler.ctx.router, handler.ctx.envelope, protocol.json_bytes(push))
    hub.loop.call_at(pending.deadline, hub.expire_hooks)  # the policy applies on time, not on the next tick
    return DEFERRED


@command("hook.answer", "a handler's decision on a hook call (args: call, decision, data)")
def hook_answer(hub: Hub, args: dict, ctx: Ctx) -> dict:
    a = _args(args, {"call": str, "decision": str, "data": (dict, type(None))}, ("call", "decision"))
    pending, result = hub.broker.answer(a["call"], a["decision"], a.get("data"), ctx.envelope)
    hub.finish_hook(pending, result)
    return {"accepted": True}


@command("hooks", "synchronous hooks: policy and whether a handler is registered")
def hooks(hub: Hub, args: dict, ctx: Ctx) -> dict:
    _args(args, {})
    now = time.monotonic()
    return {name: {"deadline": p.deadline, "on_timeout": p.on_timeout,
                   "handler": hub.broker.handler(name, now) is not None}
            for name, p in hub.broker.policies.items()}


# --- commands that services answer -----------------------------------------------------------
def forward(hub: Hub, cmd: str, offer: Offer, args: dict, ctx: Ctx) -> Any:
    """Push the call to the service that offers `cmd`; its `service.answer` completes the reply."""
    call = hub.offer_book.open(cmd, offer, ctx, time.monotonic())
    push = {"v": protocol.VERSION, "type": "service_call", "call": call.call, "cmd": cmd, "args": args,
            "deadline_ms": int(offer.deadline * 1000)}
    hub.reply(offer.where.router, offer.where.envelope, protocol.json_bytes(push))
    hub.loop.call_at(call.deadline, hub.expire_hooks)  # a silent service costs the client a timeout, on time
    return DEFERRED


@command("service.answer", "a service's answer to a forwarded command (services send it; args: service, call, "
                           "result or error)")
def service_answer(hub: Hub, args: dict, ctx: Ctx) -> dict:
    a = _args(args, {"service": str, "call": str, "result": object, "error": dict}, ("service", "call"))
    call = hub.offer_book.answer(a["call"], a["service"])
    caller, err = call.caller, a.get("error")
    if err is not None:
        hub.m_forwards.labels(call.cmd, "error").inc()
        body = protocol.encode_error(caller.request_id, str(err.get("code", "internal")), str(err.get("message", "")))
    else:
        hub.m_forwards.labels(call.cmd, "ok").inc()
        body = protocol.encode_reply(caller.request_id, a.get("result"))
    hub.reply(caller.router, caller.envelope, body)
    return {"relayed": True}


# --- sources -------------------------------------------------------------------------------
def _source_row(hub: Hub, name: str, src, origin: str, now: float, wall: float) -> dict:
    services = {r["service"]: r for r in hub.service_registry.rows(now, wall)}
    capture = services.get(f"capture@{name}", {})
    decode = services.get(f"decode@{name}")
    target = {"file": src.path, "url": scrub(src.url), "webcam": src.device,
              "screen": f"monitor {src.monitor}"}.get(src.kind, f"{src.width}x{src.height} {src.encode}")
    streams = [name] + ([f"{name}-raw"] if src.wants_decode() else []) + ([f"{name}-audio"] if src.audio else [])
    return {"name": name, "kind": src.kind, "room": src.room, "target": target, "origin": origin,
            "streams": streams, "capture": capture.get("state", "absent"), "status": capture.get("status", ""),
            "decode": decode.get("state", "absent") if decode else None}


@command("source.list", "every source: kind, room, target, where it came from, its capture's state")
def source_list(hub: Hub, args: dict, ctx: Ctx) -> list:
    _args(args, {})
    overlay = sources.Overlay.read(sources.overlay_path(hub.config))
    now, wall = time.monotonic(), time.time()
    return [_source_row(hub, name, src, "command" if name in overlay.added else "config", now, wall)
            for name, src in sources.effective(hub.config, overlay).items()]


@command("source.add", "add a source to the running box (args: name, source: the keys of a [sources.NAME] table)")
def source_add(hub: Hub, args: dict, ctx: Ctx) -> dict:
    a = _args(args, {"name": str, "source": dict}, ("name", "source"))
    name = a["name"]
    try:
        src = configuration.source_from_dict(name, a["source"], "source.add")
    except configuration.ConfigError as exc:
        raise ProtocolError("bad_args", str(exc)) from None
    overlay = sources.Overlay.read(sources.overlay_path(hub.config))
    if name in sources.effective(hub.config, overlay):
        raise ProtocolError("bad_args", f"source {name!r} exists already; remove it first")
    overlay.added[name] = a["source"]
    overlay.removed = [n for n in overlay.removed if n != name]
    _save(overlay)
    hub.log.info("source %s added by command (%s)", name, src.kind)
    hub.publish("source.added", {"name": name, "kind": src.kind, "room": src.room})
    shown = {**asdict(src), "url": scrub(src.url)}
    return {"name": name, "source": shown, "overlay": str(overlay.path)}


@command("source.remove", "remove a source from the running box; its capture and decode stop (args: name)")
def source_remove(hub: Hub, args: dict, ctx: Ctx) -> dict:
    name = _args(args, {"name": str}, ("name",))["name"]
    overlay = sources.Overlay.read(sources.overlay_path(hub.config))
    present = sources.effective(hub.config, overlay)
    if name not in present:
        raise ProtocolError("not_found", f"no source {name!r} (sources: {', '.join(present) or 'none'})")
    overlay.added.pop(name, None)
    if name in hub.config.sources:
        overlay.removed.append(name)  # a source of the config file: hidden until added again
    _save(overlay)
    hub.log.info("source %s removed by command", name)
    hub.publish("source.removed", {"name": name})
    return {"name": name, "overlay": str(overlay.path)}


def _save(overlay: sources.Overlay) -> None:
    try:
        overlay.write()
    except OSError as exc:
        raise ProtocolError("unavailable", f"cannot write {overlay.path}: {exc.strerror or exc}") from None


@command("cameras", "the V4L2 cameras of the box (enumerated without opening a stream; never hangs)")
def cameras(hub: Hub, args: dict, ctx: Ctx) -> list:
    _args(args, {})
    from services.capture.cameras import list_cameras
    return list_cameras()


@command("snapshot", "a JPEG of the newest picture of a stream (args: stream, max_width, quality)")
def snapshot_cmd(hub: Hub, args: dict, ctx: Ctx) -> dict:
    a = _args(args, {"stream": str, "max_width": int, "quality": int}, ("stream",))
    from services.hub.snapshot import SnapshotError, take
    try:
        return take(hub.config.bus.prefix, a["stream"], max_width=a.get("max_width", 1920),
                    quality=a.get("quality", 85), limit=hub.limit * 3 // 4)
    except SnapshotError as exc:
        raise ProtocolError(exc.code, str(exc)) from None
