"""The hub: control endpoint, service registry, rooms and sessions, event fan-out, hook broker.

Sockets (paths under the runtime directory, see services/control/endpoints.py):
    control.sock    ROUTER  requests from `edgeroom ctl`, services' heartbeats, hook handlers
    events-in.sock  XSUB    services publish here; every event is checked before fan-out
    events.sock     XPUB    subscribers; topics match exactly (see protocol.topic_frame)
and, when configured, the same control and events endpoints on TCP with CURVE.
Everything runs on one loop (services/runtime/loop.py): no locks, no threads except
prometheus-client's HTTP server, which reads the metrics snapshot by reference.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

import framebus
from services.control import protocol
from services.control.client import context
from services.control.endpoints import hold_lock, prepare_runtime_dir, secure_socket_file
from services.control.keys import ZapAuthenticator, load_server
from services.hub import commands
from services.hub import screen as _screen  # noqa: F401 (registers the screen.* commands)
from services.hub.commands import DEFERRED, Ctx
from services.hub.hooks import HookBroker
from services.hub.offers import OfferBook
from services.hub.registry import STATES, Registry
from services.hub.sessions import SessionBook
from services.runtime.logs import Throttled
from services.runtime.metrics import BoxCollector, Derived, clean_families
from services.runtime.schema import parse_host_port
from services.runtime.service import Service

__all__ = ["Hub"]

log = logging.getLogger("edgeroom.hub")


class Hub(Service):
    kind = "hub"

    def setup(self) -> None:
        cfg = self.config
        prepare_runtime_dir(self.rundir)
        self._lock = hold_lock(self.rundir, "hub")  # raises if another hub owns the runtime directory
        self.on_stop(self._remove_files)  # released last: after the sockets are closed
        self.limit = cfg.control.max_message_bytes
        self.box_name, self.prefix = cfg.box.name, cfg.bus.prefix  # restart-only: reloads do not move them
        self.service_registry = Registry(cfg.hub.heartbeat_interval, cfg.hub.stale_after)
        self.book = SessionBook(self.rundir / "hub-state.json")
        self.on_stop(self.book.save)
        self._book_dirty = False
        self.broker = HookBroker(cfg.hooks)
        self.offer_book = OfferBook(set(commands.TABLE))
        self.throttled = Throttled(log)
        self.collector = BoxCollector()
        self.collector.live["hub"] = self.registry
        self.metrics_url = ""
        self._event_seq = 0
        self._hub_metrics()
        self._load_state()
        self._bind()
        self._serve_metrics()
        self._write_endpoints()
        self.loop.every(min(0.25, cfg.hub.heartbeat_interval / 2), self._tick)

    # --- sockets -------------------------------------------------------------------------
    def _socket(self, kind: int, endpoint: str, curve: bool) -> zmq.Socket:
        sock = context().socket(kind)
        sock.linger = 0
        sock.maxmsgsize = 2 * self.limit  # past this libzmq drops the connection; below it we answer too_large
        if kind == zmq.ROUTER:
            sock.router_mandatory = True  # a reply to a vanished peer raises, so it is counted, not lost silently
        if endpoint.startswith("tcp://[") or endpoint.startswith("tcp://*"):
            sock.ipv6 = True
        if curve:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self._server_keys
        self.own(sock, lambda s: s.close(linger=0), f"the socket at {endpoint}")
        if endpoint.startswith("ipc://") and os.path.exists(endpoint[6:]):
            os.unlink(endpoint[6:])  # a dead hub's socket file; we are the only hub of this runtime dir
        sock.bind(endpoint)
        secure_socket_file(endpoint)
        self.bound.append(sock.last_endpoint.decode())  # tcp port 0 becomes the port picked
        return sock

    def _bind(self) -> None:
        ep, cfg = self.endpoints, self.config.control
        tcp = bool(ep.tcp_control or ep.tcp_events)
        self.zap = None
        self.bound: list[str] = []
        if tcp:
            self._server_keys = load_server(self._curve_dir())
            self.zap = self.own(ZapAuthenticator(context(), self._curve_dir(), self._auth_refused))
            self.loop.add_reader(self.zap.sock, self.zap.handle)
        self.routers = [self._socket(zmq.ROUTER, ep.control, False)]
        if cfg.tcp_control:
            self.routers.append(self._socket(zmq.ROUTER, ep.tcp_control, True))
        for router in self.routers:
            self.loop.add_reader(router, lambda r=router: self._on_request(r))
        self.xsub = self._socket(zmq.XSUB, ep.events_in, False)
        self.xsub.send(b"\x01")  # subscribe to everything: the hub checks every event itself
        self.xpubs = [self._socket(zmq.XPUB, ep.events, False)]
        if cfg.tcp_events:
            self.xpubs.append(self._socket(zmq.XPUB, ep.tcp_events, True))
        self.loop.add_reader(self.xsub, self._on_event_in)
        for xpub in self.xpubs:
            self.loop.add_reader(xpub, lambda x=xpub: self._drain_subscriptions(x))
        log.info("listening on %s", ", ".join(self.bound))

    def _curve_dir(self) -> Path:
        return Path(self.config.control.curve_dir)

    def _auth_refused(self, address: str, mechanism: str, reason: str) -> None:
        self.m_auth_refused.inc()
        self.throttled.warning("auth", f"refused a {mechanism} client from {address or '?'}: {reason}")

    def _serve_metrics(self) -> None:
        listen = self.config.hub.metrics_listen
        if not listen:
            return
        host, port = parse_host_port(listen)
        box = CollectorRegistry(auto_describe=False)
        box.register(self.collector)
        try:
            http, _ = start_http_server(port, host, registry=box)
        except OSError as exc:
            raise OSError(f"hub.metrics_listen = {listen!r}: cannot listen ({exc.strerror}); pick another "
                          f"port, or '' to turn the scrape endpoint off") from None
        self.own(http, lambda h: h.shutdown(), "the metrics server")
        self.metrics_url = f"http://{f'[{host}]' if ':' in host else host}:{http.server_port}/metrics"
        log.info("metrics at %s", self.metrics_url)

    def _write_endpoints(self) -> None:
        """What the hub really bound (ports picked for port 0 included), for tools and tests."""
        ep = {"control": self.routers[0].last_endpoint.decode(), "events": self.xpubs[0].last_endpoint.decode(),
              "events_in": self.xsub.last_endpoint.decode(), "metrics": self.metrics_url,
              "tcp_control": self.routers[1].last_endpoint.decode() if len(self.routers) > 1 else "",
              "tcp_events": self.xpubs[1].last_endpoint.decode() if len(self.xpubs) > 1 else ""}
        tmp = self.rundir / "endpoints.json.tmp"
        tmp.write_text(json.dumps(ep, indent=2) + "\n")
        os.replace(tmp, self.rundir / "endpoints.json")
        self.bound_endpoints = ep

    # --- requests ------------------------------------------------------------------------
    def _on_request(self, router: zmq.Socket) -> None:
        for _ in range(100):  # bounded, so one flood cannot starve the rest of the loop
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(router, frames)

    def _handle(self, router: zmq.Socket, frames: list[bytes]) -> None:
        envelope, rid = frames[:1], None
        try:
            envelope, body = protocol.split_envelope(frames)
            req = protocol.parse_request(body, self.limit)
            rid = req.id
            if req.cmd not in commands.TABLE:  # a command a service offers (record.start, ...), or none
                offer = self.offer_book.find(req.cmd, self.service_state)
                self.m_requests.labels(req.cmd).inc()
                result = commands.forward(self, req.cmd, offer, req.args, Ctx(router, envelope, rid))
            else:
                self.m_requests.labels(req.cmd).inc()
                result = commands.run(self, req.cmd, req.args, Ctx(router, envelope, rid))
        except protocol.ProtocolError as exc:
            self._reject(router, envelope, exc.request_id if rid is None else rid, exc.code, exc.message)
            return
        except Exception as exc:  # a bug in a command must cost one request, never the hub
            log.exception("command failed")
            self._reject(router, envelope, rid, "internal", f"the hub failed on this request: "
                                                           f"{type(exc).__name__}: {exc}")
            return
        if result is not DEFERRED:
            self.reply(router, envelope, protocol.encode_reply(rid, result))

    def _reject(self, router: zmq.Socket, envelope: list[bytes], rid: Any, code: str, message: str) -> None:
        self.m_rejected.labels(code).inc()
        self.throttled.warning(code, f"rejected a control message: {code}: {message}")
        self.reply(router, envelope, protocol.encode_error(rid, code, message))

    def reply(self, router: zmq.Socket, envelope: list[bytes], body: bytes) -> None:
        try:
            router.send_multipart([*envelope, body], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone or its queue is full: the reply is lost, say so
            self.m_replies_lost.inc()
            if exc.errno == zmq.EHOSTUNREACH:  # it left: a client that gave up waiting, a service that stopped
                self.throttled.info("reply-gone", f"a reply could not be delivered: its peer has left ({exc})")
            else:  # its queue is full: a peer that does not read
                self.throttled.warning("reply", f"a reply could not be delivered: {exc}")

    # --- events --------------------------------------------------------------------------
    def _on_event_in(self) -> None:
        for _ in range(100):
            try:
                frames = self.xsub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = protocol.parse_event(frames, self.limit)
            except protocol.ProtocolError as exc:
                self.m_events_rejected.labels(exc.code).inc()
                self.throttled.warning("event", f"dropped a malformed event: {exc.message}")
                continue
            except Exception as exc:  # whatever a publisher sends must cost one event, never the hub
                log.exception("event check failed")
                self.m_events_rejected.labels("internal").inc()
                self.throttled.warning("event", f"dropped an event the hub failed to check: {exc}")
                continue
            if event.topic.startswith("probe."):
                continue  # probes are the hub's own
            self._fan_out(frames)

    def _fan_out(self, frames: list[bytes]) -> None:
        self.m_events.inc()
        for xpub in self.xpubs:
            xpub.send_multipart(frames, flags=zmq.NOBLOCK)  # XPUB never blocks: a full subscriber loses events

    def _drain_subscriptions(self, xpub: zmq.Socket) -> None:
        while xpub.poll(0):
            xpub.recv()  # (un)subscriptions: ZeroMQ filters for us, nothing to forward upstream

    def publish(self, topic: str, data: dict) -> None:
        self._event_seq += 1
        event = protocol.Event(topic, data, "hub", self._event_seq, time.time(),
                               time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        self._fan_out(protocol.encode_event(event))

    def publish_state(self, rec, previous: str | None, restarted: bool = False) -> None:
        """service.state: one shape for every transition."""
        self.publish("service.state", {"service": rec.id, "state": rec.state, "previous": previous,
                                       "pid": rec.pid, "restarted": restarted})

    def publish_changes(self, changes: list[tuple[str, dict]]) -> None:
        if not changes:
            return
        for topic, data in changes:
            log.info("%s %s", topic.split(".", 1)[1], data.get("session", ""))
            self.publish(topic, data)
        self._book_dirty = True  # saved by the next tick: one write for a burst of changes, not one each

    # --- time ---------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        for rec, previous in self.service_registry.sweep(now):
            log.warning("service %s is %s (was %s)", rec.id, rec.state, previous)
            self.publish_state(rec, previous)
            if rec.state == "stale":
                self.publish_changes(self.book.end_service(rec.id, "service stale"))
        self.publish_changes(self.book.expire(now))
        self.expire_hooks()
        self._refresh_metrics(now)
        if self._book_dirty:
            self._book_dirty = False
            self.book.save()

    def expire_hooks(self) -> None:
        for pending, result in self.broker.expire(time.monotonic()):
            self.finish_hook(pending, result)
        for call in self.offer_book.expire(time.monotonic()):
            self.m_forwards.labels(call.cmd, "timeout").inc()
            self.reply(call.caller.router, call.caller.envelope, protocol.encode_error(
                call.caller.request_id, "timeout", f"{call.service} did not answer {call.cmd!r} within "
                                                   f"{call.deadline - call.started:g} s"))

    def service_state(self, service: str) -> str | None:
        rec = self.service_registry.services.get(service)
        return rec.state if rec else None

    def finish_hook(self, pending, result: dict) -> None:
        latency = time.monotonic() - pending.started
        self.m_hook_calls.labels(pending.hook, result["reason"]).inc()
        self.m_hook_latency.labels(pending.hook).observe(latency)
        result = {**result, "hook": pending.hook, "latency_ms": round(latency * 1000, 3)}
        caller = pending.caller
        self.reply(caller.router, caller.envelope, protocol.encode_reply(caller.request_id, result))

    def _load_state(self) -> None:
        try:
            n = self.book.load(time.monotonic(), self.config.hub.session_grace)
        except ValueError as exc:
            log.error("%s", exc)
            return
        if n:
            log.info("remembered %d session(s) from the previous hub; waiting %.0f s for their services",
                     n, self.config.hub.session_grace)

    # --- metrics -------------------------------------------------------------------------
    def _hub_metrics(self) -> None:
        r = self.registry
        self.m_requests = Counter("edgeroom_control_requests", "Control requests accepted, by command.",
                                  ["command"], registry=r)
        self.m_rejected = Counter("edgeroom_control_rejected", "Control messages rejected, by error code.",
                                  ["code"], registry=r)
        self.m_replies_lost = Counter("edgeroom_control_replies_lost", "Replies the hub could not deliver.",
                                      registry=r)
        self.m_auth_refused = Counter("edgeroom_control_auth_refused",
                                      "TCP clients refused by CURVE authentication.", registry=r)
        self.m_metrics_dropped = Counter("edgeroom_hub_metrics_dropped", "Malformed metric families or samples "
                                         "in heartbeats, dropped.", registry=r)
        self.m_events = Counter("edgeroom_events_published", "Events fanned out to subscribers.", registry=r)
        self.m_events_rejected = Counter("edgeroom_events_rejected", "Malformed events dropped, by error code.",
                                         ["code"], registry=r)
        self.m_hook_calls = Counter("edgeroom_hook_calls", "Synchronous hook calls, by hook and outcome.",
                                    ["hook", "outcome"], registry=r)
        self.m_hook_latency = Histogram("edgeroom_hook_latency_seconds", "Time from hook call to answer.",
                                        ["hook"], registry=r,
                                        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.m_keyframes = Counter("edgeroom_hub_keyframe_requests", "Keyframe requests routed to a stream's "
                                   "producer, by stream.", ["stream"], registry=r)
        self.m_forwards = Counter("edgeroom_hub_forwarded_calls", "Commands forwarded to the service that offers "
                                  "them, by command and outcome (ok, error, timeout).", ["command", "outcome"],
                                  registry=r)
        self.m_exits = Counter("edgeroom_service_exits", "How units' processes ended, as systemd reports it "
                               "($SERVICE_RESULT: success, signal, watchdog, core-dump, ...).",
                               ["service", "result"], registry=r)
        self.m_sessions = Gauge("edgeroom_hub_sessions", "Sessions the hub knows.", registry=r)
        self.m_rooms = Gauge("edgeroom_hub_rooms", "Rooms with at least one session.", registry=r)
        self.m_services = Gauge("edgeroom_hub_services", "Services by state.", ["state"], registry=r)
        r.register(Derived(self._service_families))
        r.register(Derived(self._bus_families))

    def _service_families(self) -> list:
        up = GaugeMetricFamily("edgeroom_service_up", "1 while the service heartbeats and is not stale or stopped.",
                               labels=["service"])
        restarts = CounterMetricFamily("edgeroom_service_restarts", "Restarts the hub has seen (a new pid under a "
                                       "known id) since the hub started.", labels=["service"])
        state = GaugeMetricFamily("edgeroom_service_state", "1 for the state the service is in.",
                                  labels=["service", "state"])
        up.add_metric(["hub"], 1)  # the hub answers this scrape, so it is up
        for rec in list(self.service_registry.services.values()):
            up.add_metric([rec.id], 1 if rec.state in ("ready", "degraded", "starting") else 0)
            restarts.add_metric([rec.id], rec.restarts)
            for name in STATES:
                state.add_metric([rec.id, name], 1 if rec.state == name else 0)
        return [up, restarts, state]

    def _bus_families(self) -> list:
        """The bus as the scrape sees it, read from /dev/shm at scrape time (any thread may read it)."""
        g, c = GaugeMetricFamily, CounterMetricFamily
        fams = {
            "alive": g("edgeroom_bus_producer_alive", "1 while the stream's producer lives.", labels=["stream"]),
            "items": c("edgeroom_bus_items", "Items sent on the stream (this generation of the ring).",
                       labels=["stream"]),
            "slots": g("edgeroom_bus_slots", "Slots in the stream's ring.", labels=["stream"]),
            "slot_bytes": g("edgeroom_bus_slot_bytes", "Payload bytes per slot.", labels=["stream"]),
            "occupied": g("edgeroom_bus_occupied_slots", "Slots holding items the slowest live consumer has "
                          "not read yet.", labels=["stream"]),
            "consumers": g("edgeroom_bus_consumers", "Live consumers attached to the stream.", labels=["stream"]),
            "lag": g("edgeroom_bus_consumer_lag_items", "Items the slowest live consumer is behind.",
                     labels=["stream"]),
            "missed": g("edgeroom_bus_consumers_missed_items", "Items the live consumers missed (overwritten "
                        "before they read them), summed.", labels=["stream"]),
            "overruns": c("edgeroom_bus_holdback_overruns", "Times a reliable consumer's hold-back bound ran out.",
                          labels=["stream"]),
            "held": c("edgeroom_bus_held_seconds", "Time the producer waited for reliable consumers.",
                      labels=["stream"]),
        }
        for info in framebus.list_streams(self.prefix):
            live = [x for x in info.consumers if x.alive]
            lag = max((x.lag for x in live), default=0)
            values = {"alive": info.status == "alive", "items": info.items, "slots": info.slots,
                      "slot_bytes": info.payload_bytes, "occupied": min(info.slots, lag), "consumers": len(live),
                      "lag": lag, "missed": sum(x.missed for x in live), "overruns": info.overruns,
                      "held": info.held_s}
            for key, fam in fams.items():
                fam.add_metric([info.stream], float(values[key]))
        return list(fams.values())

    def _refresh_metrics(self, now: float) -> None:
        self.m_sessions.set(len(self.book.sessions))
        self.m_rooms.set(len({s.room for s in self.book.sessions.values()}))
        for state, n in self.service_registry.counts().items():
            self.m_services.labels(state).set(n)

    def store_snapshot(self, service: str, families: list) -> None:
        kept, dropped = clean_families(families)
        if dropped:
            self.m_metrics_dropped.inc(dropped)
            self.throttled.warning("metrics", f"dropped {dropped} malformed metric families/samples from {service}")
        self.collector.snapshots = {**self.collector.snapshots, service: kept}

    # --- the base class's contract -----------------------------------------------------------
    def describe(self) -> dict:
        n = len(self.service_registry.services)
        return {"status": f"{n} service(s), metrics {self.metrics_url or 'off'}"}

    def apply(self, new, changes) -> list[str]:
        live = [c for c in changes if c.live]
        self.service_registry.stale_after = new.hub.stale_after  # heartbeat_interval needs a restart: keep ours
        self.broker.policies = new.hooks
        if self.zap is not None:
            self.zap.reload()
        return [c.key for c in changes if c not in live]

    def _remove_files(self) -> None:
        """The runtime directory's files of this hub (it holds the directory's lock)."""
        for name in ("control.sock", "events-in.sock", "events.sock", "endpoints.json"):
            try:
                os.unlink(self.rundir / name)
            except FileNotFoundError:
                pass

    def streams(self) -> list[dict]:
        owners = {rec.pid: rec.id for rec in self.service_registry.services.values()}
        rows = []
        for info in framebus.list_streams(self.prefix):
            row = info.to_dict()
            row["service"] = owners.get(info.producer_pid, "")
            rows.append(row)
        return rows

