"""The event plane, relayed to the web page as Server-Sent Events (`GET /api/events`).

One ZeroMQ subscription for the whole service (hook.*, vision.*, record.*, service.state),
read on the service's loop; each event goes to every open event stream as

    event: hook.ON_VIDEO_DETECTION
    data: {"v": 1, "topic": "...", "source": "vision", "time": ..., "data": {...}}

Each client has a bounded queue (`QUEUE` events): a page that does not read loses its oldest
events (counted), never the service's memory. A comment line every 15 s keeps proxies from
closing an idle stream.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import zmq

from services.control import protocol
from services.control.client import Subscriber

__all__ = ["EventRelay", "TOPICS"]

TOPICS = ("hook.", "vision.", "record.", "service.state", "source.")
QUEUE = 256


class EventRelay:
    def __init__(self, endpoint: str, loop: Any, counter: Any, max_bytes: int = 262144) -> None:
        self.sub = Subscriber(endpoint, [t + "*" if t.endswith(".") else t for t in TOPICS], max_bytes=max_bytes)
        self.loop = loop
        self.counter = counter
        self.max_bytes = max_bytes
        self.clients: set[asyncio.Queue[bytes]] = set()
        loop.add_reader(self.sub.sock, self._readable)

    def _readable(self) -> None:
        sock = self.sub.sock
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = protocol.parse_event(frames, self.max_bytes * 2)
            except protocol.ProtocolError:
                continue
            if event.topic.startswith("probe."):
                continue
            body = {"v": 1, "topic": event.topic, "source": event.source, "time": event.time, "data": event.data}
            self.publish(event.topic, body)

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        if not self.clients:
            return
        message = f"event: {topic}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
        for q in self.clients:
            if q.full():
                q.get_nowait()
                self.counter.labels("dropped").inc()
            q.put_nowait(message)
            self.counter.labels("sent").inc()

    def join(self) -> asyncio.Queue[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        self.clients.add(q)
        return q

    def leave(self, q: asyncio.Queue[bytes]) -> None:
        self.clients.discard(q)

    def close(self) -> None:
        self.loop.remove_reader(self.sub.sock)
        self.sub.close()
