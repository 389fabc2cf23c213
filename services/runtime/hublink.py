"""A service's link to the hub: heartbeats that re-register, events out, requests with callbacks.

Every heartbeat carries the service's whole state (identity, state, sessions, streams,
metrics), so a hub that restarts knows everything again after one heartbeat: there is no
separate registration to lose. The link is non-blocking and runs on the service's loop.
If the hub stops answering for `timeout` seconds the DEALER socket is thrown away and a
fresh one connects (ZeroMQ would otherwise resend stale requests into the new hub).
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from services.control import protocol
from services.control.client import CommandFailed, CurveKeys, HubUnreachable, context
from services.control.endpoints import Endpoints
from services.control.protocol import JsonObject

__all__ = ["HubLink"]

log = logging.getLogger("edgeroom.hublink")
Callback = Callable[[Any, Exception | None], None]


class HubLink:
    def __init__(self, endpoints: Endpoints, service_id: str, timeout: float = 3.0,
                 curve: CurveKeys | None = None, max_bytes: int = 262144) -> None:
        self.endpoints, self.service_id, self.timeout = endpoints, service_id, timeout
        self.curve, self.max_bytes = curve, max_bytes
        self.pub = context().socket(zmq.PUB)
        self.pub.linger = 0
        self.pub.sndhwm = 1000
        self.pub.connect(endpoints.events_in)
        self.pending: dict[str, tuple[float, Callback | None]] = {}
        self.connected = False
        self.last_reply = 0.0
        self._ids = itertools.count(1)
        self._event_seq = itertools.count(1)
        self.on_socket_change: Callable[[zmq.SyncSocket, zmq.SyncSocket], None] | None = None  # (old, new)
        self.on_call: Callable[[JsonObject], None] | None = None
        self.sock = self._dealer()

    def _dealer(self) -> zmq.SyncSocket:
        sock = context().socket(zmq.DEALER)
        sock.linger = 0
        sock.maxmsgsize = self.max_bytes * 2
        sock.sndhwm = 100
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.endpoints.control)
        return sock

    def _open(self) -> None:
        """Throw the DEALER away (with any stale requests queued in it) for a fresh one."""
        old, self.sock = self.sock, self._dealer()
        if self.on_socket_change is not None:
            self.on_socket_change(old, self.sock)
        old.close(linger=0)

    def request(self, cmd: str, args: JsonObject | None = None, callback: Callback | None = None) -> bool:
        """Send without waiting; `callback(result, error)` runs on the loop when the reply comes."""
        rid = f"{self.service_id}-{next(self._ids)}"
        try:
            self.sock.send_multipart([b"", protocol.encode_request(rid, cmd, args)], flags=zmq.NOBLOCK)
        except zmq.Again:
            if callback is not None:
                callback(None, HubUnreachable(f"hub at {self.endpoints.control} is not accepting requests"))
            return False
        self.pending[rid] = (time.monotonic() + self.timeout, callback)
        return True

    def goodbye(self, cmd: str, args: JsonObject | None, wait: float) -> bool:
        """Send a last request and wait up to `wait` s for its own reply, so that the hub does
        not answer a socket that is already closed. Replies to earlier requests that come first
        are read and dropped (the service is stopping: their callbacks do not run). True when
        the reply came."""
        rid = f"{self.service_id}-{next(self._ids)}"
        try:
            self.sock.send_multipart([b"", protocol.encode_request(rid, cmd, args)], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(max(1, int(left * 1000))):
            frames = self.sock.recv_multipart()
            try:
                msg = protocol.parse_reply(frames[-1], self.max_bytes * 2)
            except protocol.ProtocolError:
                continue
            if msg.get("id") == rid:
                return True
        return False

    def readable(self) -> None:
        """Drain replies; call when the DEALER polls readable."""
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            try:
                msg = protocol.parse_reply(frames[-1], self.max_bytes * 2)
            except protocol.ProtocolError as exc:
                log.warning("unreadable message from the hub: %s", exc)
                continue
            if msg.get("type") == "service_call":  # a command the hub forwards to us (see Service.offer)
                if self.on_call is not None:
                    self.on_call(msg)
                continue
            self._on_reply(msg)

    def _on_reply(self, msg: JsonObject) -> None:
        if not self.connected:
            log.info("connected to the hub at %s", self.endpoints.control)
        self.connected, self.last_reply = True, time.monotonic()
        _, callback = self.pending.pop(str(msg.get("id")), (0.0, None))
        if callback is None:
            if not msg.get("ok"):  # e.g. too_large with an unreadable id: nobody else will say it
                log.warning("the hub rejected a message: %s", msg.get("error"))
            return
        if msg.get("ok"):
            callback(msg.get("result"), None)
        else:
            err = msg.get("error") or {}
            callback(None, CommandFailed(str(err.get("code")), str(err.get("message"))))

    def check(self, now: float) -> None:
        """Expire requests the hub never answered; reconnect when it went silent."""
        expired = [rid for rid, (deadline, _) in self.pending.items() if deadline <= now]
        for rid in expired:
            _, callback = self.pending.pop(rid)
            if callback is not None:
                callback(None, HubUnreachable(f"no reply from the hub within {self.timeout:g} s"))
        if expired and now - self.last_reply > self.timeout:
            if self.connected:
                log.warning("hub at %s stopped answering; reconnecting", self.endpoints.control)
            self.connected = False
            self._open()  # the service counts it (edgeroom_service_hub_reconnects_total) in on_socket_change

    def publish(self, topic: str, data: JsonObject) -> None:
        """An event through the hub's fan-out; dropped (and counted by ZeroMQ's HWM) if the hub is away."""
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        event = protocol.Event(topic, data, self.service_id, next(self._event_seq), time.time(), now_ns)
        self.pub.send_multipart(protocol.encode_event(event), flags=zmq.NOBLOCK)  # PUB drops at HWM, never raises

    def close(self) -> None:
        for sock in (self.sock, self.pub):
            sock.close(linger=0)  # a second close does nothing

