"""A small client of the hub: commands, event subscriptions and synchronous hook handlers.

`edgeroom ctl` is built on it, and so is every service's link to the hub. Nothing here
blocks longer than the timeout it is given: a hub that is down, restarting or wedged
turns into HubUnreachable with the endpoint and what to check, never a hang.
"""
from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from services.control import protocol
from services.control.protocol import JsonObject

__all__ = ["ControlError", "HubUnreachable", "CommandFailed", "CurveKeys", "Client", "Subscriber",
           "HookHandler", "context"]

_ids = itertools.count(1)


def context() -> zmq.SyncContext:
    """One ZeroMQ context per process (never one per object)."""
    return zmq.Context.instance()


class ControlError(Exception):
    pass


class HubUnreachable(ControlError):
    pass


class CommandFailed(ControlError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE client identity: the hub's public key and this client's key pair (Z85 bytes)."""
    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key: str | os.PathLike[str], client_secret: str | os.PathLike[str]) -> CurveKeys:
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(str(server_key))
        public, secret = zmq.auth.load_certificate(str(client_secret))
        if secret is None:
            raise ControlError(f"{client_secret} holds no secret key (use the .key_secret file)")
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.SyncSocket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def _hint(endpoint: str) -> str:
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://"):])
        denied = (path.parent.is_dir() and not os.access(path.parent, os.X_OK)) or \
            (os.path.lexists(path) and not os.access(path, os.R_OK | os.W_OK))
        if denied:
            return (f"permission denied on {path}: the box's sockets are for its group only "
                    f"(`sudo usermod -aG edgeroom $USER`, then log in again)")
        if not path.exists():
            return (f"no socket at {path}: the hub is not running there (start it with `edgeroom run` or "
                    f"`systemctl start edgeroom.target`, or point --config/--runtime-dir at the right box)")
        return (f"{path} exists but nothing answered: the hub may be stopped or stuck "
                f"(check `systemctl status edgeroom-hub` or the `edgeroom run` output)")
    return (f"nothing answered at {endpoint}: check the hub's control.tcp_control setting, the network, "
            f"and that your CURVE keys are authorized (refused clients get no reply)")


def _socket(kind: int, endpoint: str, curve: CurveKeys | None, max_bytes: int) -> zmq.SyncSocket:
    sock = context().socket(kind)
    sock.linger = 0
    sock.maxmsgsize = max_bytes * 2
    sock.ipv6 = endpoint.startswith("tcp://[")
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    return sock


class Client:
    """Request/reply against the hub's control endpoint (a DEALER: replies are matched by id)."""

    def __init__(self, endpoint: str, timeout: float = 2.0, curve: CurveKeys | None = None,
                 max_bytes: int = 262144) -> None:
        self.endpoint, self.timeout, self.curve, self.max_bytes = endpoint, timeout, curve, max_bytes
        self._sock: zmq.SyncSocket | None = None
        self.on_push: Callable[[JsonObject], None] | None = None  # hook calls arriving between replies

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def socket(self) -> zmq.SyncSocket:
        if self._sock is None:
            self._sock = _socket(zmq.DEALER, self.endpoint, self.curve, self.max_bytes)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def send(self, cmd: str, args: JsonObject | None = None) -> str:
        """Send a request without waiting; returns its id."""
        rid = f"{os.getpid()}-{next(_ids)}"
        body = protocol.encode_request(rid, cmd, args)
        if len(body) > self.max_bytes:
            raise CommandFailed("too_large", f"request of {len(body)} bytes is over the limit of {self.max_bytes}")
        self.socket.send_multipart([b"", body], flags=zmq.NOBLOCK)
        return rid

    def call(self, cmd: str, args: JsonObject | None = None, timeout: float | None = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        if self.endpoint.startswith("ipc://") and not os.access(self.endpoint[6:], os.R_OK | os.W_OK):
            raise HubUnreachable(f"hub not reachable at {self.endpoint}: {_hint(self.endpoint)}")
        try:
            rid = self.send(cmd, args)
        except zmq.Again:
            self.close()
            raise HubUnreachable(f"hub not reachable at {self.endpoint}: {_hint(self.endpoint)}") from None
        return self._await(rid, cmd, timeout)

    def _await(self, rid: str, cmd: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                continue
            msg = self._read()
            if msg is None or msg.get("id") != rid:
                continue  # a stale reply to an abandoned request, or a push handled by on_push
            if msg.get("ok"):
                return msg.get("result")
            err = msg.get("error") or {}
            raise CommandFailed(str(err.get("code", "internal")), str(err.get("message", "")))
        self.close()  # the lazy-pirate rule: a socket with a lost request is thrown away
        raise HubUnreachable(f"no reply to {cmd!r} from the hub at {self.endpoint} within "
                             f"{timeout:g} s: {_hint(self.endpoint)}")

    def _read(self) -> JsonObject | None:
        frames = self.socket.recv_multipart()
        try:
            msg = protocol.parse_reply(frames[-1], self.max_bytes * 2)
        except protocol.ProtocolError:
            return None
        if msg.get("type") == "hook_call":
            if self.on_push is not None:
                self.on_push(msg)
            return None
        return msg


class Subscriber:
    """Events from the hub's XPUB, filtered exactly ('hook.X') or by an explicit prefix ('hook.*')."""

    def __init__(self, endpoint: str, patterns: list[str] | tuple[str, ...] = ("*",),
                 curve: CurveKeys | None = None, max_bytes: int = 262144) -> None:
        self.max_bytes = max_bytes
        self.sock = _socket(zmq.SUB, endpoint, curve, max_bytes)
        for p in patterns or ("*",):
            self.sock.subscribe(protocol.subscription(p))

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, client: Client, timeout: float = 5.0) -> None:
        """Return once the hub has our subscriptions: it echoes a private probe topic back.

        Subscriptions travel in order on one connection, so when the probe (subscribed
        last) arrives, every earlier subscription is in force at the hub too.
        """
        topic = f"probe.{uuid.uuid4().hex}"
        self.sock.subscribe(protocol.subscription(topic))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                client.call("events.probe", {"topic": topic})
                if self._drain_until(topic, time.monotonic() + 0.1):
                    return
            raise HubUnreachable(f"subscription not confirmed by the hub within {timeout:g} s")
        finally:
            self.sock.unsubscribe(protocol.subscription(topic))

    def _drain_until(self, topic: str, deadline: float) -> bool:
        frame = protocol.topic_frame(topic)
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1) and self.sock.recv_multipart()[0] == frame:
                return True
        return False

    def recv(self, timeout: float | None = None) -> protocol.Event | None:
        """The next event, or None after `timeout` seconds (None: wait forever). Malformed ones are skipped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.sock.poll(None if left is None else int(left * 1000)):
                return None
            try:
                event = protocol.parse_event(self.sock.recv_multipart(), self.max_bytes * 2)
            except protocol.ProtocolError:
                continue
            if not event.topic.startswith("probe."):
                return event


Decision = tuple[str, JsonObject | None]  # ("allow" | "block" | "replace", replacement data or None)


class HookHandler:
    """Answers one synchronous hook (e.g. BEFORE_BRIDGE_VIDEO) for the hub.

    The registration lives `ttl` seconds and is renewed every ttl/3, so a handler that
    dies stops being asked within `ttl`; until then the hub applies the hook's timeout policy.
    """

    def __init__(self, endpoint: str, hook: str, handler: Callable[[JsonObject], Decision], ttl: float = 3.0,
                 curve: CurveKeys | None = None) -> None:
        self.hook, self.handler, self.ttl = hook, handler, ttl
        self.client = Client(endpoint, curve=curve)
        self.client.on_push = self._answer
        self.answered = 0
        self._renew_at = 0.0

    def close(self) -> None:
        self.client.close()

    def _answer(self, msg: JsonObject) -> None:
        decision, data = self.handler(dict(msg.get("data") or {}))
        self.client.send("hook.answer", {"call": msg.get("call"), "decision": decision, "data": data})
        self.answered += 1

    def register(self) -> None:
        self.client.call("hook.register", {"hook": self.hook, "ttl": self.ttl})
        self._renew_at = time.monotonic() + self.ttl / 3

    def serve(self, seconds: float | None = None, stop: Callable[[], bool] = lambda: False) -> None:
        end = None if seconds is None else time.monotonic() + seconds
        while not stop() and (end is None or time.monotonic() < end):
            if time.monotonic() >= self._renew_at:
                try:
                    self.register()
                except HubUnreachable:
                    self._renew_at = time.monotonic() + 0.2
                    continue
            if self.client.socket.poll(100):
                self.client._read()
