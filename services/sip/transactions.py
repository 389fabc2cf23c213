"""SIP transactions (RFC 3261 17), the parts a user agent needs, on the service's asyncio loop.

Server side: a request seen before (a retransmission: same top Via branch and method) gets
its last response again and goes no further. A final response to an INVITE over UDP is
sent again at T1, 2*T1, ... up to T2 until its ACK comes (a 2xx: the ACK of the dialog,
matched by Call-ID and CSeq; a non-2xx: the ACK of the transaction, same branch), or until
64*T1, when `on_no_ack` is told (a 2xx never acknowledged ends the call with BYE).

Client side: a request over UDP is sent again at T1, doubling (an INVITE until a provisional
response, a non-INVITE capped at T2) until a final response, or given up after 64*T1
(`on_response(None)`: timeout). A response is matched to its request by the top Via branch
and the CSeq method; one that matches nothing is dropped by the caller. A 2xx to an INVITE
that comes again (its ACK was lost) is handed over again, so the dialog ACKs it again.

Every entry is forgotten 64*T1 after it ended: the tables stay bounded by the traffic of the
last 32 seconds, which the rate limits in front bound, and by MAX_ENTRIES whatever comes.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.sip.message import Message, SipError, parse_via, request
from services.sip.transport import Peer

__all__ = ["T1", "T2", "TIMEOUT", "Transactions", "ack_for"]

T1, T2 = 0.5, 4.0
TIMEOUT = 64 * T1
MAX_ENTRIES = 20000        # server transactions remembered at most (a flood from many addresses: oldest forgotten)


def _branch(message: Message) -> str:
    via = message.get("Via")
    if via is None:
        raise SipError(400, "missing_header", "the message has no Via")
    return parse_via(via).branch or ""


@dataclass
class _Server:
    response: Message | None = None
    peer: Peer | None = None
    until: float = 0.0


@dataclass
class _Resend:
    message: Message
    peer: Peer
    interval: float
    cap: float
    until: float
    handle: asyncio.TimerHandle | None = None
    on_give_up: Callable[[], None] | None = None


@dataclass
class _Client:
    request: Message
    peer: Peer
    on_response: Callable[[Message | None], None]
    resend: _Resend | None = None
    final: bool = False
    until: float = 0.0


def ack_for(invite: Message, final: Message) -> Message:
    """The ACK of a non-2xx final response to `invite` (RFC 3261 17.1.1.3): same branch, the response's To."""
    number, _ = invite.cseq
    ack = request("ACK", invite.uri, call_id=invite.call_id, from_=invite.get("From") or "",
                  to=final.get("To") or "", cseq=number, via=invite.get("Via") or "")
    for route in invite.get_all("Route"):
        ack.add("Route", route)
    return ack


class Transactions:
    def __init__(self, aio: asyncio.AbstractEventLoop, send: Callable[[Message, Peer], bool], log: Any, *,
                 t1: float = T1, t2: float = T2) -> None:
        """`t1`, `t2`: RFC 3261's timer values (a test shortens them; 64*t1 is the transaction timeout)."""
        self.aio, self.send, self.log = aio, send, log
        self.t1, self.t2, self.timeout = t1, t2, 64 * t1
        self.server: dict[tuple[str, str], _Server] = {}
        self.unacked: dict[tuple[str, int], _Resend] = {}      # (Call-ID, CSeq) of a final INVITE response
        self.client: dict[tuple[str, str], _Client] = {}
        self.retransmissions = 0

    # ------------------------------------------------------------ server side
    def seen(self, req: Message, peer: Peer) -> bool:
        """A retransmitted request: its last response goes again (True); a new one is recorded (False)."""
        key = (_branch(req), req.method)
        tx = self.server.get(key)
        if tx is not None:
            self.retransmissions += 1
            if tx.response is not None:
                self.send(tx.response, peer)
            return True
        self.server[key] = _Server(peer=peer, until=time.monotonic() + self.timeout)
        self._sweep()
        return False

    def respond(self, req: Message, peer: Peer, response: Message, *,
                on_no_ack: Callable[[], None] | None = None) -> None:
        """Send `response` to `req` and keep it for retransmissions; a final INVITE response over UDP is sent
        again until its ACK."""
        key = (_branch(req), req.method)
        tx = self.server.setdefault(key, _Server(peer=peer))
        tx.response, tx.until = response, time.monotonic() + self.timeout
        self.send(response, peer)
        if req.method == "INVITE" and response.status >= 200:
            number, _ = req.cseq
            ack_key = (req.call_id, number)
            old = self.unacked.pop(ack_key, None)
            if old is not None and old.handle is not None:
                old.handle.cancel()
            if peer.transport == "udp":
                r = _Resend(response, peer, self.t1, self.t2, time.monotonic() + self.timeout, on_give_up=on_no_ack)
                self.unacked[ack_key] = r
                r.handle = self.aio.call_later(self.t1, self._again, r, ack_key, self.unacked)

    def acked(self, ack: Message) -> bool:
        """An ACK: the final response it acknowledges is no longer sent again. False: it matches none."""
        number, _ = ack.cseq
        r = self.unacked.pop((ack.call_id, number), None)
        if r is None:
            return False
        if r.handle is not None:
            r.handle.cancel()
        return True

    # ------------------------------------------------------------ client side
    def request(self, req: Message, peer: Peer, on_response: Callable[[Message | None], None]) -> None:
        key = (_branch(req), req.method)
        tx = _Client(req, peer, on_response, until=time.monotonic() + self.timeout)
        self.client[key] = tx
        self.send(req, peer)
        if peer.transport == "udp":
            cap = 1e9 if req.method == "INVITE" else self.t2
            tx.resend = _Resend(req, peer, self.t1, cap, tx.until)
            tx.resend.handle = self.aio.call_later(self.t1, self._again, tx.resend, key, None)
        self.aio.call_later(self.timeout, self._timeout, key, tx)
        self._sweep()

    def response(self, resp: Message) -> bool:
        """A response: handed to its request's waiter (True), or it matches no request of ours (False)."""
        try:
            key = (_branch(resp), resp.cseq[1])
        except SipError:
            return False
        tx = self.client.get(key)
        if tx is None:
            return False
        if resp.status < 200:
            if tx.request.method == "INVITE":
                self._stop(tx)
            tx.on_response(resp)
            return True
        if tx.final and not (tx.request.method == "INVITE" and resp.status < 300):
            return True            # a retransmitted final response: absorbed (an INVITE's 2xx is ACKed again)
        tx.final = True
        self._stop(tx)
        tx.on_response(resp)
        return True

    def cancel_retransmits(self, req: Message) -> None:
        tx = self.client.get((_branch(req), req.method))
        if tx is not None:
            self._stop(tx)

    def _stop(self, tx: _Client) -> None:
        if tx.resend is not None and tx.resend.handle is not None:
            tx.resend.handle.cancel()
        tx.resend = None

    def _timeout(self, key: tuple[str, str], tx: _Client) -> None:
        if self.client.get(key) is tx and not tx.final:
            self._stop(tx)
            tx.final = True
            tx.on_response(None)

    # ------------------------------------------------------------ timers
    def _again(self, r: _Resend, key: Any, table: dict[Any, _Resend] | None) -> None:
        if time.monotonic() >= r.until:
            if table is not None and table.get(key) is r:
                del table[key]
                if r.on_give_up is not None:
                    r.on_give_up()
            return
        if table is not None and table.get(key) is not r:
            return
        self.retransmissions += 1
        self.send(r.message, r.peer)
        r.interval = min(r.interval * 2, r.cap)
        r.handle = self.aio.call_later(r.interval, self._again, r, key, table)

    def _sweep(self) -> None:
        now = time.monotonic()
        if len(self.server) > 64:
            for key in [k for k, tx in self.server.items() if tx.until and tx.until < now]:
                del self.server[key]
        while len(self.server) > MAX_ENTRIES:              # insertion order: the oldest first
            del self.server[next(iter(self.server))]
        if len(self.client) > 64:
            for key in [k for k, c in self.client.items() if c.final and c.until < now]:
                del self.client[key]
