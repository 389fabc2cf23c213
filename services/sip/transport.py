"""SIP over UDP and TCP on the service's asyncio loop: datagrams and streams in, messages out.

One UDP socket and one TCP listener on the same port. A datagram is one message; a TCP
connection is framed by Content-Length (services/sip/message.py StreamParser). What comes
in is handed to `on_message(message, peer)` or, when it does not parse, to
`on_bad(error, peer, data)` (the service answers 400/513 where it can, counts, and drops);
a TCP stream that breaks its framing is closed after the error answer (nothing after it can
be trusted). A reply goes back the way its request came: over the connection it came on,
or to the datagram's source address (RFC 3261 18.2.2 with rport: the address it came
from, not the Via's, which a NATed peer cannot be reached at).

Bounded: at most MAX_CONNECTIONS TCP connections at once (more are closed at accept),
each closed after IDLE seconds without a message, each with at most MAX_SIZE of buffered
input (the parser refuses more).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.sip.message import MAX_SIZE, Message, SipError, StreamParser, parse

__all__ = ["Peer", "Transport"]

MAX_CONNECTIONS = 256
IDLE = 300.0               # seconds a TCP connection may stay silent
READ_BATCH = 64


@dataclass(eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    addr: tuple[str, int]
    parser: StreamParser = field(default_factory=StreamParser)
    last: float = field(default_factory=time.monotonic)

    @property
    def open(self) -> bool:
        return not self.writer.is_closing()


@dataclass(frozen=True)
class Peer:
    """Where a message came from, and so where its answers go."""
    transport: str                  # udp | tcp
    addr: tuple[str, int]
    conn: Any = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}/{self.transport}"


class Transport:
    def __init__(self, aio: asyncio.AbstractEventLoop, address: str, port: int, transports: list[str],
                 on_message: Callable[[Message, Peer], None], on_bad: Callable[[SipError, Peer, bytes], None],
                 log: Any) -> None:
        self.aio, self.address, self.transports, self.log = aio, address, transports, log
        self.on_message, self.on_bad = on_message, on_bad
        self.udp: socket.socket | None = None
        self.tcp: asyncio.base_events.Server | None = None
        self.conns: dict[tuple[str, int], _Conn] = {}
        self.port = port
        self.send_errors = 0

    # ------------------------------------------------------------ life
    def bind(self) -> None:
        """Bind UDP (and reserve the port number for TCP); port 0 picks one free for both."""
        for _ in range(20 if self.port == 0 else 1):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind((self.address, self.port))
                port = udp.getsockname()[1]
                if "tcp" in self.transports:
                    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        probe.bind((self.address, port))
                    finally:
                        probe.close()
            except OSError as exc:
                udp.close()
                if self.port:
                    raise OSError(f"cannot listen for SIP on {self.address}:{self.port}: {exc.strerror}") from None
                continue
            udp.setblocking(False)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.udp, self.port = udp, port
            return
        raise OSError(f"no free port on {self.address} for SIP over UDP and TCP")

    async def start(self) -> None:
        if self.udp is not None and "udp" in self.transports:
            self.aio.add_reader(self.udp.fileno(), self._read_udp)
        if "tcp" in self.transports:
            self.tcp = await asyncio.start_server(self._accept, self.address, self.port, reuse_address=True,
                                                  limit=MAX_SIZE)

    def close(self) -> None:
        if self.udp is not None:
            with contextlib.suppress(ValueError, OSError):
                self.aio.remove_reader(self.udp.fileno())
            self.udp.close()
            self.udp = None
        if self.tcp is not None:
            self.tcp.close()
            self.tcp = None
        for conn in list(self.conns.values()):
            conn.writer.close()
        self.conns.clear()

    # ------------------------------------------------------------ in
    def _read_udp(self) -> None:
        assert self.udp is not None
        for _ in range(READ_BATCH):
            try:
                data, addr = self.udp.recvfrom(MAX_SIZE + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:           # an ICMP error queued for an earlier send
                self.log.debug("SIP UDP socket: %s", exc)
                return
            peer = Peer("udp", addr[:2])
            try:
                message = parse(data)
            except SipError as exc:
                if exc.reason != "keepalive":
                    self.on_bad(exc, peer, data)
                continue
            self.on_message(message, peer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")[:2]
        if len(self.conns) >= MAX_CONNECTIONS:
            self.on_bad(SipError(503, "too_many_connections", f"more than {MAX_CONNECTIONS} TCP connections"),
                        Peer("tcp", addr), b"")
            writer.close()
            return
        conn = _Conn(writer, addr)
        self.conns[addr] = conn
        await self._serve(conn, reader)

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        peer = Peer("tcp", conn.addr, conn)
        try:
            while conn.open:
                try:
                    data = await asyncio.wait_for(reader.read(65536), IDLE)
                except TimeoutError:
                    break
                if not data:
                    break
                conn.last = time.monotonic()
                try:
                    messages = conn.parser.feed(data)
                except SipError as exc:
                    self.on_bad(exc, peer, data)
                    break                   # the framing is lost: nothing after it can be trusted
                for message in messages:
                    self.on_message(message, peer)
        except (ConnectionError, OSError):
            pass
        finally:
            if self.conns.get(conn.addr) is conn:
                del self.conns[conn.addr]
            conn.writer.close()

    # ------------------------------------------------------------ out
    def send(self, message: Message, peer: Peer) -> bool:
        """Send `message` to `peer` (over its connection, or a new one for TCP); False when it could not go."""
        data = message.encode()
        if peer.transport == "udp":
            if self.udp is None:
                return False
            try:
                self.udp.sendto(data, peer.addr)
            except OSError as exc:
                self.send_errors += 1
                self.log.warning("SIP to %s: %s", peer, exc.strerror or exc)
                return False
            return True
        conn = peer.conn if isinstance(peer.conn, _Conn) and peer.conn.open else self.conns.get(peer.addr)
        if conn is not None and conn.open:
            conn.writer.write(data)
            return True
        task = self.aio.create_task(self._connect_and_send(peer.addr, data))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return True

    async def _connect_and_send(self, addr: tuple[str, int], data: bytes) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(addr[0], addr[1], limit=MAX_SIZE), 5.0)
        except (TimeoutError, OSError) as exc:
            self.send_errors += 1
            self.log.warning("SIP: cannot connect to %s:%d over TCP: %s", addr[0], addr[1], exc)
            return
        conn = _Conn(writer, addr)
        self.conns[addr] = conn
        writer.write(data)
        await self._serve(conn, reader)
