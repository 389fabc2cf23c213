"""Registering with a registrar ([sip] registrar): the box's Contact bound to dial_user's address of record.

REGISTER with `Expires: register_expires`; a 401/407 is answered once with dial_user and
dial_password (the strongest digest algorithm offered); the binding is refreshed at 80 % of
the expiry the registrar granted (its Expires, or the Contact's expires parameter); a
failure or no answer is tried again every 30 s. `gauge` is 1 while the binding holds.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.rtp.service import resolve
from services.sip import digest
from services.sip.message import Message, new_call_id, new_tag, parse_name_addr, request
from services.sip.transactions import Transactions
from services.sip.transport import Peer

__all__ = ["Registration"]


class Registration:
    def __init__(self, cfg: Any, tx: Transactions, via: Callable[[Peer], str], contact: Callable[[Peer], str],
                 aio: Any, gauge: Any, log: Any, throttled: Any) -> None:
        self.cfg, self.tx, self.via, self.contact, self.aio = cfg, tx, via, contact, aio
        self.gauge, self.log, self.throttled = gauge, log, throttled
        self._registration: tuple[Peer, str, str, str] | None = None
        self._register_seq = 0

    def register(self) -> None:
        """REGISTER the box's contact as dial_user at the registrar (digest with dial_user/dial_password),
        refreshed at 80 % of the expiry granted; retried every 30 s while it fails."""
        host, _, port = self.cfg.registrar.rpartition(":")
        try:
            peer = Peer("udp", (resolve(host or self.cfg.registrar), int(port) if host else 5060))
        except (OSError, ValueError) as exc:
            self.log.warning("cannot register with %s: %s", self.cfg.registrar, exc)
            self.aio.call_later(30.0, self.register)
            return
        user = self.cfg.dial_user or "edgeroom"
        aor = f"<sip:{user}@{host or self.cfg.registrar}>"
        if self._registration is None:      # one Call-ID and From tag for the binding's life (RFC 3261 10.2)
            self._registration = (peer, aor, new_call_id(self.cfg.domain), new_tag())
        self._send_register(None)

    def _send_register(self, auth: tuple[str, str] | None) -> None:
        assert self._registration is not None
        peer, aor, call_id, tag = self._registration
        self._register_seq += 1
        req = request("REGISTER", f"sip:{peer.addr[0]}:{peer.addr[1]}", call_id=call_id, from_=f"{aor};tag={tag}",
                      to=aor, cseq=self._register_seq, via=self.via(peer), contact=self.contact(peer),
                      headers=[("Expires", str(self.cfg.register_expires)), *([auth] if auth else [])])
        self.tx.request(req, peer, lambda resp: self._registered(req, resp, auth is not None))

    def _registered(self, req: Message, resp: Message | None, authed: bool) -> None:
        if resp is not None and resp.status < 200:
            return
        if resp is not None and resp.status in (401, 407) and not authed and self.cfg.dial_user:
            header, answer = (("WWW-Authenticate", "Authorization") if resp.status == 401 else
                              ("Proxy-Authenticate", "Proxy-Authorization"))
            try:
                value = digest.answer(digest.pick(resp.get_all(header)), method="REGISTER", uri=req.uri,
                                      user=self.cfg.dial_user, password=self.cfg.dial_password)
            except ValueError as exc:
                self.log.warning("registering with %s: %s", self.cfg.registrar, exc)
            else:
                self._send_register((answer, value))
                return
        if resp is None or resp.status >= 300:
            self.gauge.set(0)
            why = "no answer" if resp is None else f"{resp.status} {resp.reason_phrase}"
            self.throttled.warning("register", f"registering with {self.cfg.registrar} failed: {why}; again in 30 s")
            self.aio.call_later(30.0, self.register)
            return
        granted = self.cfg.register_expires
        expires = resp.get("Expires")
        if expires and expires.isdigit():
            granted = int(expires)
        for contact in resp.get_all("Contact"):
            value = parse_name_addr(contact).params.get("expires", "")
            if value.isdigit():
                granted = int(value)
        self.gauge.set(1)
        self.log.info("registered with %s for %d s", self.cfg.registrar, granted)
        self.aio.call_later(max(5.0, granted * 0.8), self.register)
