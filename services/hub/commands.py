"""The hub's commands: one small function each, in TABLE by wire name.

Each is declared with `@command(name, summary, args={name: type}, required=(...))`; `run`
checks a request's arguments against that (services/control/args.py, the check services'
own commands get too) before the handler runs. A handler gets the hub, the request's args
and a Ctx (where to reply); it returns the result, or DEFERRED when the reply comes later
(hook calls). It raises ProtocolError with code bad_args / not_found for bad input: the
hub turns that into an error reply.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.calls.config import ROUTE_OFFER
from services.capture import book
from services.capture.cameras import list_cameras
from services.control import protocol
from services.control.args import ArgTypes, check_args
from services.control.protocol import ProtocolError
from services.hub.offers import Offer, check_offers
from services.hub.registry import check_heartbeat
from services.hub.sessions import check_sessions
from services.runtime import config as configuration
from services.runtime.metrics import snapshot
from services.runtime.snapshot import SnapshotError, take
from services.runtime.state import Overlay
from services.runtime.streams import audio_stream, raw_stream

if TYPE_CHECKING:
    import zmq

    from services.hub.service import Hub

__all__ = ["TABLE", "Ctx", "DEFERRED", "run"]

DEFERRED = object()


@dataclass(frozen=True)
class Ctx:
    router: zmq.Socket
    envelope: list[bytes]
    request_id: Any


@dataclass(frozen=True)
class Command:
    handler: Callable[[Hub, dict, Ctx], Any]
    summary: str
    args: ArgTypes | None    # None: a whole body with its own schema, checked by the handler (heartbeats)
    required: tuple[str, ...]


TABLE: dict[str, Command] = {}
OWN_SCHEMA = None  # `args=OWN_SCHEMA`: the handler checks the body against its own schema


def command(name: str, summary: str, args: ArgTypes | None = {}, required: tuple[str, ...] = ()):  # noqa: B006
    def register(fn):
        TABLE[name] = Command(fn, summary, args, required)
        return fn
    return register


def run(hub: Hub, name: str, args: dict, ctx: Ctx) -> Any:
    """The hub's command `name`, its arguments checked first."""
    cmd = TABLE[name]
    if cmd.args is not None:
        args = check_args(args, cmd.args, cmd.required)
    return cmd.handler(hub, args, ctx)


# --- asking ------------------------------------------------------------------------------
@command("ping", "is the hub there: its pid and protocol version")
def ping(hub: Hub, args: dict, ctx: Ctx) -> dict:
    return {"pong": True, "pid": os.getpid(), "version": protocol.VERSION, "box": hub.box_name}


@command("commands", "every command with a one-line summary, the services' commands included")
def commands(hub: Hub, args: dict, ctx: Ctx) -> dict:
    return dict(sorted({**{name: c.summary for name, c in TABLE.items()}, **hub.offer_book.summaries()}.items()))


@command("status", "every service: state, pid, uptime, restarts, rate; the box's metrics URL")
def status(hub: Hub, args: dict, ctx: Ctx) -> dict:
    now, wall = time.monotonic(), time.time()
    hub_row = {"service": "hub", "kind": "hub", "state": "ready", "pid": os.getpid(),
               "uptime": wall - hub.started_at, "restarts": 0, "rate": 0.0, "status": hub.describe()["status"],
               "last_seen": 0.0, "streams": []}
    return {"box": hub.box_name, "metrics_url": hub.metrics_url, "endpoints": hub.bound_endpoints,
            "services": [hub_row, *hub.service_registry.rows(now, wall)]}


@command("streams", "streams on the frame bus with their producer service")
def streams(hub: Hub, args: dict, ctx: Ctx) -> list:
    return hub.streams()


@command("rooms", "rooms and the sessions in each")
def rooms(hub: Hub, args: dict, ctx: Ctx) -> dict:
    return hub.book.rooms()


@command("sessions", "sessions with their tracks (args: room)", args={"room": str})
def sessions(hub: Hub, args: dict, ctx: Ctx) -> list:
    room = args.get("room")
    return [s.public() for s in sorted(hub.book.sessions.values(), key=lambda s: s.id)
            if room is None or s.room == room]


@command("metrics", "a summary of the box's metrics per service")
def metrics(hub: Hub, args: dict, ctx: Ctx) -> dict:
    out = {}
    for service, families in sorted({**hub.collector.snapshots, "hub": snapshot(hub.registry)}.items()):
        out[service] = {f["name"]: sum(s[2] for s in f["samples"] if s[0] in (f["name"], f["name"] + "_total"))
                        for f in families if f.get("type") in ("counter", "gauge")}
    return {"metrics_url": hub.metrics_url, "services": out}


# --- services ------------------------------------------------------------------------------
@command("service.heartbeat", "a service's state, sessions, streams and metrics (services send it)",
         args=OWN_SCHEMA)
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


@command("service.bye", "a service stops cleanly (services send it)",
         args={"service": str, "pid": int}, required=("service", "pid"))
def bye(hub: Hub, args: dict, ctx: Ctx) -> dict:
    known = hub.service_registry.services.get(args["service"])
    previous = known.state if known else None
    rec = hub.service_registry.bye(args["service"], args["pid"])
    if rec is not None:
        hub.offer_book.drop(rec.id)
        hub.log.info("service %s stopped", rec.id)
        hub.publish_state(rec, previous)
        hub.publish_changes(hub.book.end_service(rec.id, "service stopped"))
    return {"known": rec is not None}


SERVICE_RESULTS = ("success", "protocol", "timeout", "exit-code", "signal", "core-dump", "watchdog",
                   "start-limit-hit", "resources", "oom-kill")


@command("service.exited", "systemd says how a unit's process ended (its ExecStopPost sends this)",
         args={"service": str, "result": str, "code": str, "status": str}, required=("service", "result"))
def exited(hub: Hub, args: dict, ctx: Ctx) -> dict:
    check_heartbeat({"service": args["service"], "pid": 0, "started": 0, "state": "ready"})  # the id's shape
    if args["result"] not in SERVICE_RESULTS:
        raise ProtocolError("bad_args", f"result must be one of {', '.join(SERVICE_RESULTS)} "
                                        f"(systemd's $SERVICE_RESULT), got {args['result']!r}")
    hub.m_exits.labels(args["service"], args["result"]).inc()
    how = f"{args['result']} ({args.get('code', '')} {args.get('status', '')})".replace(" ( )", "")
    (hub.log.info if args["result"] == "success" else hub.log.warning)("service %s ended: %s", args["service"], how)
    hub.publish("service.exited", {"service": args["service"], "result": args["result"], "code": args.get("code", ""),
                                   "status": args.get("status", "")})
    return {"counted": True}


# --- events and hooks --------------------------------------------------------------------
@command("events.probe", "publish an empty event on a probe.* topic (confirms a subscription)",
         args={"topic": str}, required=("topic",))
def probe(hub: Hub, args: dict, ctx: Ctx) -> dict:
    topic = args["topic"]
    if not topic.startswith("probe."):
        raise ProtocolError("bad_args", f"probe topics start with 'probe.', got {topic!r}")
    hub.publish(protocol.check_topic(topic), {})
    return {"published": topic}


@command("hook.register", "become the handler of a synchronous hook (args: hook, ttl)",
         args={"hook": str, "ttl": (int, float)}, required=("hook",))
def hook_register(hub: Hub, args: dict, ctx: Ctx) -> dict:
    hub.broker.register(args["hook"], ctx, float(args.get("ttl", 3.0)), time.monotonic())
    return {"hook": args["hook"], "deadline": hub.broker.policies[args["hook"]].deadline}


@command("hook.call", "run a synchronous hook: the handler's decision, or the policy's (args: hook, data)",
         args={"hook": str, "data": dict}, required=("hook",))
def hook_call(hub: Hub, args: dict, ctx: Ctx) -> Any:
    now = time.monotonic()
    pending = hub.broker.open_call(args["hook"], ctx, now)
    handler = hub.broker.handler(args["hook"], now)
    if handler is None:
        del hub.broker.pending[pending.call]
        hub.finish_hook(pending, hub.broker.policy_result(args["hook"], "no_handler"))
        return DEFERRED
    push = {"v": protocol.VERSION, "type": "hook_call", "call": pending.call, "hook": args["hook"],
            "data": args.get("data", {}), "deadline_ms": int((pending.deadline - now) * 1000)}
    pending.handler = handler.ctx.envelope
    hub.reply(handler.ctx.router, handler.ctx.envelope, protocol.json_bytes(push))
    hub.loop.call_at(pending.deadline, hub.expire_hooks)  # the policy applies on time, not on the next tick
    return DEFERRED


@command("hook.answer", "a handler's decision on a hook call (args: call, decision, data)",
         args={"call": str, "decision": str, "data": (dict, type(None))}, required=("call", "decision"))
def hook_answer(hub: Hub, args: dict, ctx: Ctx) -> dict:
    pending, result = hub.broker.answer(args["call"], args["decision"], args.get("data"), ctx.envelope)
    hub.finish_hook(pending, result)
    return {"accepted": True}


@command("hooks", "synchronous hooks: policy and whether a handler is registered")
def hooks(hub: Hub, args: dict, ctx: Ctx) -> dict:
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
                           "result or error)",
         args={"service": str, "call": str, "result": object, "error": dict}, required=("service", "call"))
def service_answer(hub: Hub, args: dict, ctx: Ctx) -> dict:
    call = hub.offer_book.answer(args["call"], args["service"])
    caller, err = call.caller, args.get("error")
    if err is not None:
        hub.m_forwards.labels(call.cmd, "error").inc()
        body = protocol.encode_error(caller.request_id, str(err.get("code", "internal")), str(err.get("message", "")))
    else:
        hub.m_forwards.labels(call.cmd, "ok").inc()
        body = protocol.encode_reply(caller.request_id, args.get("result"))
    hub.reply(caller.router, caller.envelope, body)
    return {"relayed": True}


# --- keyframe requests ------------------------------------------------------------------------
KEYFRAME = "stream.keyframe"  # what a producer offers (Service.offer_keyframes)


@command("keyframe", "ask the producer of an encoded stream for a keyframe: an encoder forces one, a call "
                     "transport asks its peer, a file or camera says when its next is due (args: stream, reason)",
         args={"stream": str, "reason": str}, required=("stream",))
def keyframe(hub: Hub, args: dict, ctx: Ctx) -> Any:
    stream = args["stream"]
    producer = next((rec for rec in hub.service_registry.services.values() if stream in rec.streams), None)
    if producer is None:
        raise ProtocolError("not_found", f"no service produces a stream {stream!r} (`edgeroom ctl streams`)")
    offer = hub.offer_book.at(producer.id, KEYFRAME)
    if offer is None:
        raise ProtocolError("unavailable", f"{producer.id}, which produces {stream!r}, does not make keyframes on "
                                           "request")
    hub.m_keyframes.labels(stream).inc()
    return forward(hub, KEYFRAME, offer, args, ctx)


# --- a call's SDP ----------------------------------------------------------------------------
SESSION_SDP = "session.sdp"  # what a call transport offers (services/rtp/service.py)


@command("sdp", "the SDP of a call session: the box's side, what a peer sends to (for=sender, the default), or "
                "what the box sends, addressed to the peer (for=receiver: what ffmpeg -i or GStreamer reads) "
                "(args: session, for)", args={"session": str, "for": str}, required=("session",))
def session_sdp(hub: Hub, args: dict, ctx: Ctx) -> Any:
    session = hub.book.sessions.get(args["session"])
    if session is None:
        raise ProtocolError("not_found", f"no session {args['session']!r} (`edgeroom ctl sessions`)")
    offer = hub.offer_book.at(session.service, SESSION_SDP)
    if offer is None:
        raise ProtocolError("unavailable", f"{session.service}, which has the session {session.id!r}, has no SDP "
                                           f"(it is a {session.kind} session, not a call)")
    return forward(hub, SESSION_SDP, offer, args, ctx)

# --- routes: what a session sends -----------------------------------------------------------
@command("route", "show or change what a session sends: its video and audio routes, switched on the new stream's "
                  "keyframe (args: session, video, audio, reset, by, slot)",
         args={"session": str, "video": str, "audio": str, "reset": bool, "by": str, "slot": int},
         required=("session",))
def route(hub: Hub, args: dict, ctx: Ctx) -> Any:
    sid = args["session"]
    session = hub.book.sessions.get(sid)
    if session is None:
        raise ProtocolError("not_found", f"no session {sid!r} (`edgeroom ctl sessions` lists them)")
    offer = hub.offer_book.at(session.service, ROUTE_OFFER)
    if offer is None:
        raise ProtocolError("unavailable", f"session {sid!r} belongs to {session.service}, which sends nothing: "
                                           "only a call's sessions have routes")
    return forward(hub, ROUTE_OFFER, offer, args, ctx)


# --- sources -------------------------------------------------------------------------------
def _source_row(hub: Hub, name: str, src: Any, origin: str, now: float, wall: float) -> dict:
    services = {r["service"]: r for r in hub.service_registry.rows(now, wall)}
    capture = services.get(f"capture@{name}", {})
    decode = services.get(f"decode@{name}")
    streams = [name] + ([raw_stream(name)] if src.wants_decode() else []) + \
        ([audio_stream(name)] if src.has_audio() else [])
    return {"name": name, "kind": src.kind, "room": src.room, "target": src.target(), "origin": origin,
            "streams": streams, "capture": capture.get("state", "absent"), "status": capture.get("status", ""),
            "decode": decode.get("state", "absent") if decode else None}


@command("source.list", "every source: kind, room, target, where it came from, its capture's state")
def source_list(hub: Hub, args: dict, ctx: Ctx) -> list:
    overlay = book.overlay(hub.config)
    now, wall = time.monotonic(), time.time()
    return [_source_row(hub, name, src, "command" if name in overlay.added else "config", now, wall)
            for name, src in book.effective(hub.config, overlay).items()]


@command("source.add", "add a source to the running box (args: name, source: the keys of a [sources.NAME] table)",
         args={"name": str, "source": dict}, required=("name", "source"))
def source_add(hub: Hub, args: dict, ctx: Ctx) -> dict:
    name = args["name"]
    try:
        src = book.from_dict(name, args["source"], "source.add")
    except configuration.ConfigError as exc:
        raise ProtocolError("bad_args", str(exc)) from None
    overlay = book.overlay(hub.config)
    if name in book.effective(hub.config, overlay):
        raise ProtocolError("bad_args", f"source {name!r} exists already; remove it first")
    overlay.add(name, args["source"])
    _save(overlay)
    hub.log.info("source %s added by command (%s)", name, src.kind)
    hub.publish("source.added", {"name": name, "kind": src.kind, "room": src.room})
    return {"name": name, "source": src.shown(), "overlay": str(overlay.path)}


@command("source.remove", "remove a source from the running box; its capture and decode stop (args: name)",
         args={"name": str}, required=("name",))
def source_remove(hub: Hub, args: dict, ctx: Ctx) -> dict:
    name = args["name"]
    overlay = book.overlay(hub.config)
    present = book.effective(hub.config, overlay)
    if name not in present:
        raise ProtocolError("not_found", f"no source {name!r} (sources: {', '.join(present) or 'none'})")
    overlay.remove(name, in_config=name in hub.config.sources)
    _save(overlay)
    hub.log.info("source %s removed by command", name)
    hub.publish("source.removed", {"name": name})
    return {"name": name, "overlay": str(overlay.path)}


def _save(overlay: Overlay) -> None:
    try:
        overlay.write()
    except OSError as exc:
        raise ProtocolError("unavailable", f"cannot write {overlay.path}: {exc.strerror or exc}") from None


@command("cameras", "the V4L2 cameras of the box (enumerated without opening a stream; never hangs)")
def cameras(hub: Hub, args: dict, ctx: Ctx) -> list:
    return list_cameras()


@command("snapshot", "a JPEG of the newest picture of a stream (args: stream, max_width, quality)",
         args={"stream": str, "max_width": int, "quality": int}, required=("stream",))
def snapshot_cmd(hub: Hub, args: dict, ctx: Ctx) -> dict:
    try:
        return take(hub.config.bus.prefix, args["stream"], max_width=args.get("max_width", 1920),
                    quality=args.get("quality", 85), limit=hub.limit * 3 // 4)
    except SnapshotError as exc:
        raise ProtocolError(exc.code, str(exc)) from None
