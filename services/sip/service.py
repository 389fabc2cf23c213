"""The SIP service, `sip` (unit edgeroom-sip): calls in and out, each a session of a room.

One process for every SIP call of the box: signalling on UDP and TCP (services/sip/transport.py,
transactions.py), each call's media through the RTP engine (services/rtp/call.py, one
RtpCall per call, on the same loop). What a caller sends lands on the bus as the call's
streams (`sip-XXXXXX` access units, `sip-XXXXXX-audio`); what it gets are its routes
(`send_video`/`send_audio` of [sip], or `edgeroom ctl route`).

* **Answering**: an INVITE is let in by digest (SHA-256 or MD5, services/sip/digest.py) or by
  the allow-list; it joins the room of the called user (`rooms`, else `room`); its offer is
  answered (services/sip/offer.py): H.264 mode 1 preferred, mode 0 honoured, VP8, Opus,
  PCMU, PCMA, telephone-event; no common video codec answers the video m= line with port 0
  and says so in the session (a re-INVITE may add video later).
* **Dialling**: `call.dial` (`edgeroom ctl call dial sip:user@host`) sends the box's offer,
  answers 401/407 with `dial_user`/`dial_password`, and is up on the 200's answer.
* **In a call**: re-INVITE (hold, resume, video added or dropped: the media changes in place,
  services/rtp/call.py `update`), BYE either way, CANCEL before the answer, OPTIONS, DTMF
  (RFC 4733 and SIP INFO) as `hook.ON_DTMF` events, a BYE after `media_timeout` without RTP.
* **Restart**: every call that is up is kept in the state directory (`sip-calls.json`: the
  dialog, the agreed media with its ports and SSRCs); a restarted service binds the same
  ports, sends with the same SSRCs, asks the peer with an in-dialog OPTIONS whether the call
  is still there (481: it hung up meanwhile, the call ends quietly) and sends no BYE.
* **Bad input**: a message that does not parse gets 400 or 513 where it can be answered and
  is counted by reason (`edgeroom_sip_rejected_total`), each source address has a message
  rate and an INVITE rate (over them: dropped, or 503 for an INVITE), a request of a dialog
  the box does not have gets 481. The box never forwards a request anywhere.
"""
from __future__ import annotations

import gc
import ipaddress
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

import framebus
from services.calls.book import RouteBook
from services.control.protocol import ProtocolError
from services.rtp import sdp
from services.rtp.call import Plan, RtpCall, RtpMetrics
from services.rtp.service import local_host, resolve
from services.runtime.keyframes import KeyframeRequests, cannot
from services.runtime.service import AsyncService
from services.runtime.state import state_dir
from services.sip import digest, offer
from services.sip.calls import FILE as STATE_FILE
from services.sip.calls import Call, keep, kept, taken_back
from services.sip.dialog import Dialog
from services.sip.limits import Limiter
from services.sip.message import (
    Message,
    SipError,
    new_branch,
    new_call_id,
    new_tag,
    parse_name_addr,
    parse_uri,
    parse_via,
    request,
    response,
)
from services.sip.registration import Registration
from services.sip.spec import SipConfig, parse_rooms, parse_users
from services.sip.transactions import Transactions, ack_for
from services.sip.transport import Peer, Transport

__all__ = ["Sip"]

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO"
USER_AGENT = "edgeroom"
DIAL_DEADLINE = 40.0
DTMF_TOPIC = "hook.ON_DTMF"


class Sip(AsyncService):
    kind = "sip"

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        try:
            import aiortc.rtp  # noqa: F401  # the calls' RTP packets
            import av  # noqa: F401  # their audio codecs
        except ImportError as exc:
            raise RuntimeError(f"the SIP service needs the media and webrtc extras ({exc.name} is missing): "
                               "pip install 'edgeroom[media,webrtc]' (scripts/install.sh installs them by "
                               "default)") from None
        self.cfg: SipConfig = self.config.sip
        self._metrics()
        self.state_path = state_dir(self.config) / STATE_FILE
        users = parse_users(self.cfg.users)
        if self.cfg.users_file:
            users.update(self._users_file(self.cfg.users_file))
        self.challenger = digest.Challenger(self.cfg.domain, users, algorithms=tuple(
            a.strip() for a in self.cfg.digest_algorithms.split(",") if a.strip()))
        self.allowed = [ipaddress.ip_network(a, strict=False) for a in self.cfg.allow.split(",") if a.strip()]
        self.limits = Limiter()
        self.calls: dict[str, Call] = {}
        self.transport = Transport(self.loop.aio, self.cfg.address, self.cfg.port,
                                   [t.strip() for t in self.cfg.transports.split(",")], self._message, self._bad,
                                   self.log)
        self.transport.bind()
        self.own(self.transport, lambda t: t.close(), "SIP sockets")
        self.tx = Transactions(self.loop.aio, self._send, self.log)
        self.rtp_metrics = RtpMetrics(self.registry)
        self.keyframes = KeyframeRequests(self.registry, self.loop, self._make_keyframe)
        self.routes = RouteBook(self, video_codecs=("h264", "vp8"))
        self.offer_keyframes(self._keyframe_request)
        self.offer("call.dial", self.cmd_dial, "dial a SIP URI: {uri, room?, video?} (answers once the call is up "
                   "or failed)", args={"uri": str, "room": str, "video": bool}, required=("uri",), later=True,
                   deadline=DIAL_DEADLINE)
        self.offer("call.hangup", self.cmd_hangup, "hang up a call: {call}", args={"call": str}, required=("call",))
        self.offer("call.list", self.cmd_list, "the calls: peer, codecs, duration, packets, loss, jitter, bitrate")
        self._restore()
        self.on_stop(self._stopping, "calls kept for the next start")
        self.loop.every(1.0, self._tick)
        self.log.info("SIP on %s:%d (%s), auth %s, %d call(s) taken back", self.cfg.address, self.transport.port,
                      self.cfg.transports, self.cfg.auth, len(self.calls))

    def _users_file(self, path: str) -> dict[str, str]:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise OSError(f"[sip] users_file: cannot read {path}: {exc.strerror}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        try:
            return parse_users(", ".join(lines))
        except ValueError as exc:
            raise ValueError(f"[sip] users_file {path}: {exc}") from None

    def _metrics(self) -> None:
        r = self.registry
        self.m_in = Counter("edgeroom_sip_messages_received", "SIP messages received, by method or status class.",
                            ["kind"], registry=r)
        self.m_out = Counter("edgeroom_sip_messages_sent", "SIP messages sent, by method or status class.", ["kind"],
                             registry=r)
        self.m_rejected = Counter("edgeroom_sip_rejected", "SIP messages refused or dropped, by reason.", ["reason"],
                                  registry=r)
        self.m_auth = Counter("edgeroom_sip_auth", "Authentication of INVITEs, by result (ok, and each refusal).",
                              ["result"], registry=r)
        self.m_calls = Gauge("edgeroom_sip_calls", "SIP calls up now.", ["direction"], registry=r)
        self.m_ended = Counter("edgeroom_sip_calls_ended", "SIP calls ended, by direction and how.",
                               ["direction", "reason"], registry=r)
        self.m_setup = Histogram("edgeroom_sip_setup_seconds", "From an INVITE to its 200 OK.", ["direction"],
                                 registry=r, buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
        self.m_restored = Counter("edgeroom_sip_calls_restored", "Calls taken back after a restart.", registry=r)
        self.m_dtmf = Counter("edgeroom_sip_dtmf", "DTMF digits received.", ["how"], registry=r)
        self.m_registered = Gauge("edgeroom_sip_registered", "1 while the registration with [sip] registrar holds.",
                                  registry=r)

    async def started(self) -> None:
        await self.transport.start()
        if self.cfg.registrar:
            self.registration = Registration(self.cfg, self.tx, self._via_header, self._contact, self.loop.aio,
                                             self.m_registered, self.log, self.throttled)
            self.registration.register()
        for call in self.calls.values():
            if call.media is not None:
                call.media.start()
            self._check_restored(call)
        gc.collect()
        gc.freeze()

    def apply(self, new: Any, changes: list[Any]) -> list[str]:
        """A reload: the live keys (rooms, rates, ring time, routes, dial credentials, ...) apply from the next
        message on, each call's routes follow the config's (where no command set them); the others need a
        restart."""
        self.cfg = new.sip
        for call in self.calls.values():
            self.routes.configure(call.id, self.cfg.route())
        return [c.key for c in changes if not c.live]

    def _stopping(self) -> None:
        """A stop (SIGTERM, a restart): the calls are kept, not hung up; their media closes."""
        self._save()
        for call in self.calls.values():
            if call.media is not None:
                call.media.close()

    # ------------------------------------------------------------ messages in
    def _send(self, message: Message, peer: Peer) -> bool:
        if message.is_request:
            message.set("User-Agent", USER_AGENT)
        self.m_out.labels(message.method or f"{message.status // 100}xx").inc()
        return self.transport.send(message, peer)

    def _bad(self, error: SipError, peer: Peer, data: bytes) -> None:
        """A message that does not parse: counted; answered 400/513 when its head can be read enough to."""
        self.m_rejected.labels(error.reason).inc()
        self.throttled.warning(f"bad-{error.reason}", f"SIP from {peer}: {error}")
        if not self.limits.allow(peer.addr[0], self.cfg.rate, 2 * self.cfg.rate) or error.status < 400:
            return
        req = _salvage(data)
        if req is not None:
            try:      # in a transaction: an INVITE's 400 is sent again until its ACK, and the ACK is matched
                self.tx.respond(req, peer, response(req, error.status, headers=[("Warning", _warning(str(error)))]))
            except (SipError, ValueError):
                pass

    def _message(self, msg: Message, peer: Peer) -> None:
        if not self.limits.allow(peer.addr[0], self.cfg.rate, 2 * self.cfg.rate):
            self.m_rejected.labels("rate_limited").inc()
            self.throttled.warning("rate", f"SIP from {peer.addr[0]}: over {self.cfg.rate:g} messages/s, dropped")
            return
        self.m_in.labels(msg.method or f"{msg.status // 100}xx").inc()
        try:
            if msg.is_request:
                self._request(msg, peer)
            elif not self.tx.response(msg):
                self.m_rejected.labels("stray_response").inc()
        except SipError as exc:
            self._bad(exc, peer, msg.encode())
        except Exception as exc:              # a defect costs this message, never the service
            self.m_rejected.labels("internal").inc()
            self.log.error("SIP %s from %s tripped a defect: %s", msg.method or msg.status, peer, exc, exc_info=True)

    def _request(self, req: Message, peer: Peer) -> None:
        for name in ("From", "To"):
            parse_name_addr(req.get(name) or "")     # a bad one: SipError 400 (answered by _bad)
        if req.method == "ACK":
            self._ack(req)
            return
        if self.tx.seen(req, peer):
            return
        handler = {"INVITE": self._invite, "BYE": self._bye, "CANCEL": self._cancel, "OPTIONS": self._options,
                   "INFO": self._info}.get(req.method)
        if handler is None:
            self.m_rejected.labels("method").inc()
            status = 405 if req.method in ("REGISTER", "SUBSCRIBE", "NOTIFY", "MESSAGE", "REFER", "PUBLISH",
                                           "UPDATE", "PRACK") else 501
            self._reply(req, peer, status, headers=[("Allow", ALLOW)])
            return
        handler(req, peer)

    def _reply(self, req: Message, peer: Peer, status: int, *, to_tag: str | None = None,
               headers: list[tuple[str, str]] | None = None, body: bytes = b"",
               on_no_ack: Callable[[], None] | None = None) -> None:
        resp = response(req, status, to_tag=to_tag, headers=headers or [], body=body,
                        content_type="application/sdp" if body else None)
        self.tx.respond(req, peer, resp, on_no_ack=on_no_ack)

    def _dialog_call(self, req: Message) -> Call | None:
        """The call whose dialog `req` belongs to (its To tag is ours, its From tag theirs, same Call-ID)."""
        for call in self.calls.values():
            d = call.dialog
            if d is not None and d.call_id == req.call_id and d.local_tag == req.to_tag and \
                    d.remote_tag == req.from_tag:
                return call
        return None

    # ------------------------------------------------------------ INVITE in
    def _invite(self, req: Message, peer: Peer) -> None:
        if req.to_tag:
            call = self._dialog_call(req)
            if call is None:
                self.m_rejected.labels("unknown_dialog").inc()
                self._reply(req, peer, 481)
            else:
                self._reinvite(call, req, peer)
            return
        if not self.limits.allow("invite " + peer.addr[0], self.cfg.invite_rate, 5 * self.cfg.invite_rate):
            self.m_rejected.labels("invite_flood").inc()
            self.throttled.warning("invite-flood", f"INVITEs from {peer.addr[0]} over {self.cfg.invite_rate:g}/s: "
                                                   "503")
            self._reply(req, peer, 503, headers=[("Retry-After", "5")])
            return
        if not self._admitted(req, peer):
            return
        if self._active() >= self.cfg.max_calls:
            self.m_rejected.labels("busy").inc()
            self._reply(req, peer, 486, headers=[("Warning", _warning(f"{self.cfg.max_calls} calls already"))])
            return
        contact = req.get("Contact")
        if not contact:
            self.m_rejected.labels("missing_header").inc()
            self._reply(req, peer, 400, headers=[("Warning", _warning("an INVITE needs a Contact"))])
            return
        if not req.body or (req.get("Content-Type") or "").split(";")[0].strip().lower() != "application/sdp":
            self.m_rejected.labels("no_offer").inc()
            status = 415 if req.body else 488
            self._reply(req, peer, status, headers=[("Accept", "application/sdp"), ("Warning", _warning(
                "the box answers an SDP offer in the INVITE (application/sdp); an INVITE without one is refused"))])
            return
        user = parse_uri(req.uri).user
        room = parse_rooms(self.cfg.rooms).get(user, self.cfg.room)
        call = Call(_call_id(), "in", room, peer, state="ringing", invite=req, user=user,
                    remote=parse_name_addr(req.get("From") or "").uri, video=self.cfg.video)
        number, _ = req.cseq
        target = parse_name_addr(contact).uri
        route_set = req.get_all("Record-Route")
        call.dialog = Dialog(req.call_id, new_tag(), req.from_tag or "", _strip_tag(req.get("To") or ""),
                             _strip_tag(req.get("From") or ""), target, secrets.randbelow(10000) + 1, number,
                             route_set, peer.transport, Dialog.where(target, route_set, peer.addr))
        self._reply(req, peer, 100)
        try:
            self._new_media(call)
            answer = self._answer(call, req.body.decode("utf-8", "replace"))
        except (sdp.SdpError, ValueError) as exc:
            self._drop_media(call)
            self.m_rejected.labels("bad_sdp").inc()
            self.log.info("INVITE from %s refused: %s", peer, exc)
            self._reply(req, peer, 488, to_tag=call.dialog.local_tag, headers=[("Warning", _warning(str(exc)))])
            return
        except (framebus.BusError, OSError) as exc:      # no free ports, a route's stream with no reader left
            self._drop_media(call)
            self.m_rejected.labels("no_media").inc()
            self.log.warning("INVITE from %s refused: the call's media cannot open: %s", peer, exc)
            self._reply(req, peer, 503, to_tag=call.dialog.local_tag,
                        headers=[("Retry-After", "10"), ("Warning", _warning(f"media: {exc}"))])
            return
        self.calls[call.id] = call
        self.log.info("call %s from %s (%s) to room %s: %s", call.id, call.remote, peer, room,
                      "; ".join(call.media.describe_media() + list(answer.notes)) if call.media else "")
        if self.cfg.answer_after_ms:
            self._reply(req, peer, 180, to_tag=call.dialog.local_tag, headers=[("Contact", self._contact(peer))])
            call.timer = self.loop.aio.call_later(self.cfg.answer_after_ms / 1000, self._pick_up, call)
        else:
            self._pick_up(call)

    def _admitted(self, req: Message, peer: Peer) -> bool:
        if self.cfg.auth == "allow":
            ip = ipaddress.ip_address(peer.addr[0])
            if any(ip in net for net in self.allowed):
                self.m_auth.labels("allowed").inc()
                return True
            self.m_auth.labels("not_allowed").inc()
            self.m_rejected.labels("not_allowed").inc()
            self._reply(req, peer, 403, headers=[("Warning", _warning(f"{peer.addr[0]} is not in [sip] allow"))])
            return False
        header = req.get("Authorization") or req.get("Proxy-Authorization")
        verdict = self.challenger.verify(req.method, header, uri=req.uri)
        self.m_auth.labels(verdict.reason).inc()
        if verdict.ok:
            return True
        if verdict.reason != "no_credentials":
            self.m_rejected.labels(verdict.reason).inc()
            self.throttled.warning(f"auth-{verdict.reason}", f"INVITE from {peer}: authentication failed: "
                                                             f"{verdict.reason}")
        challenges = self.challenger.challenge(stale=verdict.reason == "stale_nonce")
        self._reply(req, peer, 401, to_tag=new_tag(), headers=[("WWW-Authenticate", c) for c in challenges])
        return False

    def _pick_up(self, call: Call) -> None:
        """Answer the ringing call: 200 with the SDP answer; its media already runs."""
        if call.state != "ringing" or call.invite is None or call.dialog is None:
            return
        call.state = "up"
        call.answered = time.monotonic()
        self.m_setup.labels("in").observe(call.answered - call.began)
        self._reply(call.invite, call.peer, 200, to_tag=call.dialog.local_tag, body=call.local_sdp.encode(),
                    headers=[("Contact", self._contact(call.peer)), ("Allow", ALLOW)],
                    on_no_ack=lambda: self._end(call, "no_ack", bye=True))
        if call.media is not None and not call.media.started:
            call.media.start()
        self._count_calls()
        self._save()

    def _ack(self, req: Message) -> None:
        if not self.tx.acked(req):
            self.m_rejected.labels("stray_ack").inc()

    # ------------------------------------------------------------ media of a call
    def _new_media(self, call: Call) -> None:
        call.media = RtpCall(self, call.id, self.cfg, self.rtp_metrics, self.routes, self.cfg.route(),
                             keyframes=self.keyframes, on_dtmf=lambda digit, ms, c=call: self._dtmf(c, digit, ms,
                                                                                                   "rfc4733"))

    def _drop_media(self, call: Call, forget: bool = True) -> None:
        if call.media is not None:
            call.media.close(forget=forget)
            call.media = None

    def _ports(self, call: Call) -> dict[str, int]:
        """The call's RTP port per kind: the ones it has, a new reserved pair for a kind it has not."""
        assert call.media is not None
        have = {k: m.port for k, m in call.media.media.items()}
        call.ports = {k: have.get(k) or call.media.reserve() for k in ("audio", "video")}
        return call.ports

    def _host_for(self, peer: Peer) -> str:
        return local_host(self.cfg.local_address, peer.addr[0])

    def _answer(self, call: Call, offer_text: str) -> offer.Answer:
        """Answer an offer (an INVITE's or a re-INVITE's): the media open or change to match."""
        assert call.media is not None
        ports = self._ports(call)
        answer = offer.answer(offer_text, host=self._host_for(call.peer), ports=ports,
                              video=call.video and self.cfg.video, session_id=int(call.started), version=call.version)
        self._apply(call, [answer.audio, answer.video], answer.notes)
        call.local_sdp = answer.sdp
        call.version += 1
        return answer

    def _apply(self, call: Call, agreed: list[offer.Negotiated | None], notes: tuple[str, ...]) -> None:
        assert call.media is not None
        plans = []
        for n in agreed:
            if n is None:
                continue
            port = call.ports.get(n.kind, 0)
            host = n.peer.host if n.peer.host != "0.0.0.0" else ""
            sends = n.direction in ("sendrecv", "sendonly") and bool(n.peer.port)
            receives = n.direction in ("sendrecv", "recvonly")
            plans.append(Plan(n.kind, n.codec, n.peer, resolve(host) if host else "", sends, receives, port,
                              dtmf_pt=n.dtmf.pt if n.dtmf is not None else -1))
        call.notes = notes
        if call.media.reader is None:
            call.media.open(plans)
        else:
            changed = call.media.update(plans)
            if changed:
                self.log.info("call %s: %s", call.id, "; ".join(changed))
        call.media.release_reserved()

    # ------------------------------------------------------------ in a call
    def _reinvite(self, call: Call, req: Message, peer: Peer) -> None:
        assert call.dialog is not None
        number, _ = req.cseq
        if number <= call.dialog.remote_seq:
            self._reply(req, peer, 500, headers=[("Retry-After", "1"), ("Warning", _warning("CSeq out of order"))])
            return
        call.dialog.remote_seq = number
        if contact := req.get("Contact"):
            call.dialog.remote_target = parse_name_addr(contact).uri
        if not req.body:
            self._reply(req, peer, 200, body=call.local_sdp.encode(), headers=[("Contact", self._contact(peer))])
            return
        try:
            answer = self._answer(call, req.body.decode("utf-8", "replace"))
        except (sdp.SdpError, ValueError, framebus.BusError, OSError) as exc:
            if call.media is not None:
                call.media.release_reserved()
            self.m_rejected.labels("bad_sdp").inc()
            self._reply(req, peer, 488, headers=[("Warning", _warning(str(exc)))])
            return
        self.log.info("call %s: re-INVITE: %s", call.id, "; ".join(answer.notes) or "media as before")
        self._reply(req, peer, 200, body=call.local_sdp.encode(), headers=[("Contact", self._contact(peer))])
        self._save()

    def _bye(self, req: Message, peer: Peer) -> None:
        call = self._dialog_call(req)
        if call is None:
            self.m_rejected.labels("unknown_dialog").inc()
            self._reply(req, peer, 481)
            return
        self._reply(req, peer, 200)
        self._end(call, "peer_hung_up")

    def _cancel(self, req: Message, peer: Peer) -> None:
        branch = _top_branch(req)
        call = next((c for c in self.calls.values() if c.state == "ringing" and c.direction == "in" and
                     c.invite is not None and _top_branch(c.invite) == branch and c.invite.call_id == req.call_id),
                    None)
        if call is None:
            self.m_rejected.labels("unknown_transaction").inc()
            self._reply(req, peer, 481)
            return
        self._reply(req, peer, 200)
        assert call.invite is not None and call.dialog is not None
        self._reply(call.invite, call.peer, 487, to_tag=call.dialog.local_tag)
        self._end(call, "cancelled")

    def _options(self, req: Message, peer: Peer) -> None:
        if req.to_tag and self._dialog_call(req) is None:
            self._reply(req, peer, 481)
            return
        self._reply(req, peer, 200, headers=[("Allow", ALLOW), ("Accept", "application/sdp")])

    def _info(self, req: Message, peer: Peer) -> None:
        call = self._dialog_call(req)
        if call is None:
            self._reply(req, peer, 481)
            return
        self._reply(req, peer, 200)
        kind = (req.get("Content-Type") or "").lower()
        if "dtmf" in kind:              # application/dtmf-relay: "Signal=5\r\nDuration=160"
            text = req.body.decode("utf-8", "replace").replace(" ", "")
            values = {k.lower(): v for k, _, v in (line.partition("=") for line in text.splitlines())}
            duration = values.get("duration", "")
            if values.get("signal"):
                self._dtmf(call, values["signal"][:1], int(duration) if duration.isdigit() else 0, "info")

    def _dtmf(self, call: Call, digit: str, ms: int, how: str) -> None:
        self.m_dtmf.labels(how).inc()
        self.log.info("call %s: DTMF %s (%d ms, %s)", call.id, digit, ms, how)
        if self.link is not None:
            self.link.publish(DTMF_TOPIC, {"session": call.id, "room": call.room, "digit": digit,
                                           "duration_ms": ms, "how": how})

    def _end(self, call: Call, reason: str, *, bye: bool = False) -> None:
        """The call is over: BYE first when we hang up (`bye`), the media closed, its session gone."""
        if call.state == "ended":
            return
        if bye and call.dialog is not None and call.state == "up":
            self._in_dialog(call, "BYE", lambda resp: None)
        if call.timer is not None:
            call.timer.cancel()
        if call.media is not None:
            call.media.bye()
        was = call.state
        call.state = "ended"
        self._drop_media(call)
        self.calls.pop(call.id, None)
        self.m_ended.labels(call.direction, reason).inc()
        self.log.info("call %s ended (%s, was %s) after %.1f s", call.id, reason, was, time.monotonic() - call.began)
        if call.done is not None:
            call.done(error=ProtocolError("unavailable", f"call {call.id} to {call.user} ended before it was up: "
                                                         f"{reason}"))
            call.done = None
        self._count_calls()
        self._save()

    def _in_dialog(self, call: Call, method: str, on_response: Callable[[Message | None], None],
                   body: bytes = b"") -> None:
        d = call.dialog
        assert d is not None
        req = d.request(method, via=self._via(call.peer), contact=self._contact(call.peer), body=body,
                        content_type="application/sdp" if body else None)
        self.tx.request(req, Peer(d.transport, d.peer), on_response)

    # ------------------------------------------------------------ dialling
    def cmd_dial(self, args: dict[str, Any], done: Callable[..., None]) -> None:
        try:
            uri = parse_uri(args["uri"])
        except SipError as exc:
            raise ProtocolError("bad_args", f"uri: {exc}") from None
        if uri.scheme != "sip" or not uri.host:
            raise ProtocolError("bad_args", f"uri: dial a sip: URI with a host (sips: and TLS are not spoken), got "
                                            f"{args['uri']!r}")
        if self._active() >= self.cfg.max_calls:
            raise ProtocolError("unavailable", f"{self._active()} calls already, [sip] max_calls is "
                                               f"{self.cfg.max_calls}")
        room = args.get("room") or self.cfg.room
        transport = uri.params.get("transport", "udp").lower()
        if transport not in ("udp", "tcp") or transport not in self.cfg.transports:
            raise ProtocolError("bad_args", f"uri: transport {transport} is not one the box speaks "
                                            f"({self.cfg.transports})")
        try:
            host = resolve(uri.host)
        except OSError as exc:
            raise ProtocolError("unavailable", str(exc)) from None
        peer = Peer(transport, (host, uri.port or 5060))
        call = Call(_call_id(), "out", room, peer, state="dialing", video=bool(args.get("video", True)),
                    user=args["uri"], remote=args["uri"], done=done)
        self._new_media(call)
        assert call.media is not None
        try:
            ports = self._ports(call)
        except OSError as exc:
            self._drop_media(call)
            raise ProtocolError("unavailable", f"the call's media cannot open: {exc}") from None
        call.local_sdp = offer.offer(host=self._host_for(peer), ports=ports, video=call.video and self.cfg.video,
                                     session_id=int(call.started), version=call.version)
        call.version += 1
        local = f"<sip:edgeroom@{self.cfg.domain}>"
        call.dialog = Dialog(new_call_id(self.cfg.domain), new_tag(), "", local, f"<{args['uri']}>", args["uri"],
                             secrets.randbelow(10000) + 1, 0, [], transport, peer.addr)
        self.calls[call.id] = call
        self._send_invite(call, None)
        self.log.info("call %s: dialling %s (room %s)", call.id, args["uri"], room)

    def _send_invite(self, call: Call, auth: tuple[str, str] | None) -> None:
        d = call.dialog
        assert d is not None
        d.local_seq += 1
        headers = [auth] if auth is not None else []
        req = request("INVITE", d.remote_target, call_id=d.call_id, from_=f"{d.local_uri};tag={d.local_tag}",
                      to=d.remote_uri, cseq=d.local_seq, via=self._via_header(call.peer),
                      contact=self._contact(call.peer), headers=[*headers, ("Allow", ALLOW)],
                      body=call.local_sdp.encode(), content_type="application/sdp")
        call.invite = req
        self.tx.request(req, call.peer, lambda resp: self._invite_response(call, resp))

    def _invite_response(self, call: Call, resp: Message | None) -> None:
        if resp is None:
            self._end(call, "timeout")
            return
        if resp.status < 200:
            if resp.status in (180, 183) and call.state == "dialing":
                call.state = "ringing"
            return
        assert call.invite is not None and call.dialog is not None
        if resp.status >= 300:
            self._send(ack_for(call.invite, resp), call.peer)
            if call.state == "ended":
                return
            if resp.status in (401, 407) and call.auth_tries == 0 and self.cfg.dial_user:
                call.auth_tries += 1
                self._authenticate(call, resp)
                return
            self._end(call, f"rejected_{resp.status}")
            return
        if call.state == "up":                     # a 2xx again: our ACK was lost
            if call.ack is not None:
                self._send(call.ack, Peer(call.dialog.transport, call.dialog.peer))
            return
        if call.state == "ended":                  # answered after we gave up: ACK and BYE (RFC 3261 15)
            return
        self._established(call, resp)

    def _authenticate(self, call: Call, resp: Message) -> None:
        header, answer_header = (("WWW-Authenticate", "Authorization") if resp.status == 401 else
                                 ("Proxy-Authenticate", "Proxy-Authorization"))
        try:
            challenge = digest.pick(resp.get_all(header))
            assert call.dialog is not None
            value = digest.answer(challenge, method="INVITE", uri=call.dialog.remote_target,
                                  user=self.cfg.dial_user, password=self.cfg.dial_password)
        except ValueError as exc:
            self._end(call, f"auth_failed: {exc}")
            return
        self._send_invite(call, (answer_header, value))

    def _established(self, call: Call, resp: Message) -> None:
        d = call.dialog
        assert d is not None and call.media is not None
        d.remote_tag = resp.to_tag or ""
        d.remote_uri = _strip_tag(resp.get("To") or d.remote_uri)
        if contact := resp.get("Contact"):
            d.remote_target = parse_name_addr(contact).uri
        d.route_set = list(reversed(resp.get_all("Record-Route")))
        d.peer = Dialog.where(d.remote_target, d.route_set, call.peer.addr)
        number, _ = resp.cseq
        call.ack = d.request("ACK", via=self._via(call.peer), contact=self._contact(call.peer), cseq=number)
        self._send(call.ack, Peer(d.transport, d.peer))
        try:
            agreed = offer.accept(call.local_sdp, resp.body.decode("utf-8", "replace"))
            self._apply(call, [agreed.audio, agreed.video], agreed.notes)
        except (sdp.SdpError, ValueError, framebus.BusError, OSError) as exc:
            self.log.warning("call %s: the answer cannot be used: %s; hanging up", call.id, exc)
            call.state = "up"
            if call.done is not None:
                call.done(error=ProtocolError("unavailable", f"{call.user} answered with SDP the box cannot use: "
                                                             f"{exc}"))
                call.done = None
            self._end(call, "bad_answer", bye=True)
            return
        call.state = "up"
        call.answered = time.monotonic()
        self.m_setup.labels("out").observe(call.answered - call.began)
        call.media.start()
        self._count_calls()
        self._save()
        if call.done is not None:
            call.done(self._row(call))
            call.done = None

    def cmd_hangup(self, args: dict[str, Any]) -> dict[str, Any]:
        call = self.calls.get(args["call"])
        if call is None:
            raise ProtocolError("not_found", f"no call {args['call']!r} (calls: {', '.join(self.calls) or 'none'})")
        row = self._row(call)
        if call.state == "ringing" and call.direction == "in" and call.invite is not None:
            assert call.dialog is not None
            self._reply(call.invite, call.peer, 603, to_tag=call.dialog.local_tag)
            self._end(call, "declined")
        elif call.state in ("dialing", "ringing") and call.invite is not None:
            self._cancel_invite(call)
            self._end(call, "cancelled")
        else:
            self._end(call, "hung_up", bye=True)
        return {**row, "state": "ended"}

    def _cancel_invite(self, call: Call) -> None:
        invite = call.invite
        assert invite is not None
        number, _ = invite.cseq
        cancel = request("CANCEL", invite.uri, call_id=invite.call_id, from_=invite.get("From") or "",
                         to=invite.get("To") or "", cseq=number, via=invite.get("Via") or "")
        self.tx.cancel_retransmits(invite)
        self.tx.request(cancel, call.peer, lambda resp: None)

    # ------------------------------------------------------------ where the box is
    def _via_host(self, peer: Peer) -> str:
        return local_host(self.cfg.address, peer.addr[0])

    def _via(self, peer: Peer) -> tuple[str, int, str]:
        return self._via_host(peer), self.transport.port, peer.transport

    def _via_header(self, peer: Peer) -> str:
        host, port, transport = self._via(peer)
        return f"SIP/2.0/{transport.upper()} {host}:{port};branch={new_branch()};rport"

    def _contact(self, peer: Peer) -> str:
        suffix = ";transport=tcp" if peer.transport == "tcp" else ""
        return f"<sip:edgeroom@{self._via_host(peer)}:{self.transport.port}{suffix}>"

    # ------------------------------------------------------------ keyframes of a call's stream
    def _keyframe_request(self, stream: str, reason: str) -> dict[str, Any]:
        call = self.calls.get(stream)
        if call is None or call.media is None:
            raise ProtocolError("not_found", f"{self.id} has no call producing {stream!r}")
        why = call.media.can_make_keyframe()
        return cannot(why) if why is not None else self.keyframes.request(stream, reason)

    def _make_keyframe(self, stream: str) -> str:
        call = self.calls.get(stream)
        return call.media.make_keyframe() if call is not None and call.media is not None else "none (no call)"

    # ------------------------------------------------------------ once a second
    def _tick(self) -> None:
        now = time.monotonic()
        for call in list(self.calls.values()):
            if call.media is None or call.state != "up":
                continue
            call.media.tick()
            if self.cfg.media_timeout and not self._on_hold(call):
                last = max([m.inbound.last_packet for m in call.media.media.values() if m.inbound is not None]
                           + [call.answered, call.began])
                if now - last > self.cfg.media_timeout:
                    self.log.warning("call %s: no RTP from the peer for %.0f s: hanging up", call.id, now - last)
                    self._end(call, "media_timeout", bye=True)
        if self.calls:
            self._save()

    def _on_hold(self, call: Call) -> bool:
        return all(not p.receives for p in call.plans())

    def _active(self) -> int:
        return sum(1 for c in self.calls.values() if c.state != "ended")

    def _count_calls(self) -> None:
        self.sessions_changed()
        for direction in ("in", "out"):
            self.m_calls.labels(direction).set(sum(1 for c in self.calls.values()
                                                   if c.direction == direction and c.state == "up"))

    # ------------------------------------------------------------ kept across a restart
    def _save(self) -> None:
        try:
            keep(self.state_path, [c for c in self.calls.values() if c.state == "up" and c.media is not None])
        except OSError as exc:
            self.throttled.warning("save", f"cannot keep the calls in {self.state_path}: {exc.strerror}; a restart "
                                           "would lose them")

    def _restore(self) -> None:
        try:
            rows = kept(self.state_path)
        except (OSError, ValueError) as exc:
            self.log.warning("the kept calls in %s cannot be read (%s): starting without them", self.state_path, exc)
            return
        for row in rows:
            try:
                call, plans = taken_back(row)
                self._new_media(call)
                assert call.media is not None
                call.media.open(plans)
            except Exception as exc:     # one bad entry costs that call only
                self.log.warning("kept call %s cannot be taken back: %s", row.get("id", "?"), exc)
                continue
            self.calls[call.id] = call
            self.m_restored.inc()
            self.log.info("call %s with %s taken back: %s", call.id, call.remote,
                          "; ".join(call.media.describe_media()))

    def _check_restored(self, call: Call) -> None:
        """Is the peer still in the call? An in-dialog OPTIONS: 481 (or no answer) ends it without BYE."""
        if call.checked:
            return

        def answered(resp: Message | None) -> None:
            call.checked = True
            if resp is None or resp.status in (404, 408, 410, 480, 481):
                self._end(call, "gone_while_restarting")
        self._in_dialog(call, "OPTIONS", answered)

    # ------------------------------------------------------------ what the hub and ctl see
    def _row(self, call: Call) -> dict[str, Any]:
        now = time.monotonic()
        stats = call.media.stats() if call.media is not None else {}
        duration = now - call.answered if call.answered else 0.0
        for s in stats.values():
            s["kbps_in"] = round(s.get("octets_in", 0) * 8 / 1000 / duration, 1) if duration > 0 else 0.0
        return {"call": call.id, "direction": call.direction, "state": call.state, "room": call.room,
                "peer": call.remote, "address": str(call.peer), "duration": round(duration, 1),
                "media": stats, "notes": list(call.notes), "restored": call.restored}

    def cmd_list(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"calls": [self._row(c) for c in self.calls.values()],
                "listen": f"{self.cfg.address}:{self.transport.port}", "transports": self.cfg.transports}

    def describe(self) -> dict[str, Any]:
        up = [c for c in self.calls.values() if c.state == "up"]
        sessions = []
        for call in up:
            session: dict[str, Any] = {"id": call.id, "room": call.room, "kind": "call",
                                       "tracks": call.media.tracks() if call.media is not None else []}
            if call.media is not None and call.media.reader is not None:
                session["accepts"] = call.media.reader.accepts()
            if call.notes:
                session["note"] = "; ".join(call.notes)
            if call.restored:
                session["resumed"] = True        # the hub keeps the session across this process's restart
            sessions.append(session)
        streams = [s for c in up if c.media is not None for s in c.media.sink.streams()]
        status = f"SIP on {self.cfg.address}:{self.transport.port}; {len(up)} call(s) up"
        if up:
            status += ": " + ", ".join(f"{c.id} {c.direction} {c.remote}" for c in up)
        return {"status": status[:200], "streams": streams, "sessions": sessions}


def _call_id() -> str:
    return "sip-" + secrets.token_hex(3)


def _strip_tag(name_addr: str) -> str:
    na = parse_name_addr(name_addr)
    params = "".join(f";{k}={v}" if v else f";{k}" for k, v in na.params.items() if k != "tag")
    display = f'"{na.display}" ' if na.display else ""
    return f"{display}<{na.uri}>{params}"


def _top_branch(msg: Message) -> str:
    return parse_via(msg.get("Via") or "").branch or ""


def _warning(text: str) -> str:
    """A Warning header (RFC 3261 20.43): 399 (miscellaneous), the box, the text quoted."""
    clean = text.replace("\\", "/").replace('"', "'").replace("\r", " ").replace("\n", " ")[:200]
    return f'399 {socket.gethostname()} "{clean}"'


def _salvage(data: bytes) -> Message | None:
    """The head of a request that failed to parse, read leniently enough to answer it (Via, From, To, Call-ID,
    CSeq are what a response copies); None when even that cannot be read."""
    head = data.split(b"\r\n\r\n", 1)[0][:8192]
    try:
        lines = head.decode("utf-8").split("\r\n")
    except UnicodeDecodeError:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "SIP/2.0":
        return None
    msg = Message(method=parts[0], uri=parts[1])
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            try:
                msg.add(name.strip(), value.strip())
            except SipError:
                continue
    if not all(msg.get(h) for h in ("Via", "From", "To", "Call-ID", "CSeq")) or msg.method == "ACK":
        return None
    return msg
