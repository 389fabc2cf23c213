"""The SIP service's parts without peers: transactions (retransmissions until the ACK, a retransmitted request
answered from the cache), the per-address rate limit, the salvage of a malformed request's head for its 400,
and the dialog and media plan kept for a restart (a round trip through JSON)."""
from __future__ import annotations

import asyncio
import json
import time

from services.rtp import sdp
from services.rtp.call import Identity, Plan
from services.sip.dialog import Dialog, plan_from_dict, plan_to_dict
from services.sip.limits import Limiter
from services.sip.message import Message, parse, request, response
from services.sip.service import _salvage
from services.sip.transactions import Transactions
from services.sip.transport import Peer

T1 = 0.1                    # RFC 3261's T1 (0.5 s) shortened: the same doubling, a fifth of the wait

PEER = Peer("udp", ("127.0.0.1", 5062))


def invite(branch: str = "z9hG4bKaaa", cseq: int = 1) -> Message:
    return request("INVITE", "sip:lobby@127.0.0.1", call_id="c1@h", from_="<sip:a@h>;tag=ft", to="<sip:lobby@h>",
                   cseq=cseq, via=f"SIP/2.0/UDP 127.0.0.1:5062;branch={branch}", contact="<sip:a@127.0.0.1:5062>")


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[float, Message]] = []

    def send(self, message: Message, peer: Peer) -> bool:
        self.sent.append((time.monotonic(), message))
        return True


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_a_200_to_an_invite_goes_again_at_t1_then_2t1_until_its_ack():
    async def go():
        wire = Wire()
        tx = Transactions(asyncio.get_running_loop(), wire.send, None, t1=T1, t2=8 * T1)
        req = invite()
        assert not tx.seen(req, PEER)
        start = time.monotonic()
        tx.respond(req, PEER, response(req, 200, to_tag="tt"))
        await asyncio.sleep(T1 * 3.5)         # sent at 0, T1, 3*T1
        ack = request("ACK", "sip:a@127.0.0.1:5062", call_id="c1@h", from_="<sip:a@h>;tag=ft",
                      to="<sip:lobby@h>;tag=tt", cseq=1, via="SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKack")
        assert tx.acked(ack)
        count = len(wire.sent)
        await asyncio.sleep(T1 * 4)
        return start, wire.sent, count
    start, sent, count = run(go())
    at = [round((t - start) / T1) for t, _ in sent]
    assert count == len(sent) == 3 and at == [0, 1, 3], at        # nothing after the ACK
    assert all(m.status == 200 for _, m in sent)


def test_a_retransmitted_request_gets_the_last_response_again_and_goes_no_further():
    async def go():
        wire = Wire()
        tx = Transactions(asyncio.get_running_loop(), wire.send, None, t1=T1, t2=8 * T1)
        req = request("OPTIONS", "sip:lobby@h", call_id="o1", from_="<sip:a@h>;tag=x", to="<sip:lobby@h>", cseq=7,
                      via="SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKopt")
        assert not tx.seen(req, PEER)
        tx.respond(req, PEER, response(req, 200))
        again = tx.seen(parse(req.encode()), PEER)
        other = tx.seen(parse(req.encode().replace(b"z9hG4bKopt", b"z9hG4bKnew")), PEER)
        return again, other, wire.sent, tx.retransmissions
    again, other, sent, retransmissions = run(go())
    assert again and not other and retransmissions == 1
    assert [m.status for _, m in sent] == [200, 200]


def test_a_request_of_ours_goes_again_until_a_response_matches_it():
    async def go():
        wire = Wire()
        tx = Transactions(asyncio.get_running_loop(), wire.send, None, t1=T1, t2=8 * T1)
        got: list[Message | None] = []
        req = invite(branch="z9hG4bKours")
        tx.request(req, PEER, got.append)
        await asyncio.sleep(T1 * 1.5)
        stray = response(invite(branch="z9hG4bKother"), 200, to_tag="x")
        assert not tx.response(stray)
        assert tx.response(response(req, 180, to_tag="x"))       # a provisional stops an INVITE's resends
        await asyncio.sleep(T1 * 2.5)
        assert tx.response(response(req, 200, to_tag="x"))
        assert tx.response(response(req, 200, to_tag="x"))       # a 2xx again: handed over again (to re-ACK)
        return wire.sent, got
    sent, got = run(go())
    assert [m.method for _, m in sent] == ["INVITE", "INVITE"]
    assert [m.status for m in got if m is not None] == [180, 200, 200]


def test_the_rate_limit_takes_a_burst_then_the_rate_per_address():
    limiter = Limiter()
    assert [limiter.allow("10.0.0.1", 10, 5) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("10.0.0.2", 10, 5)                     # another address has its own bucket
    time.sleep(0.25)                                            # 2.5 tokens back
    assert [limiter.allow("10.0.0.1", 10, 5) for _ in range(3)] == [True, True, False]


def test_a_malformed_requests_head_is_salvaged_to_answer_it_and_garbage_is_not():
    good = invite().encode()
    broken = good.replace(b"Content-Length: 0", b"Content-Length: 300")
    req = _salvage(broken)
    assert req is not None and req.method == "INVITE" and req.call_id == "c1@h"
    assert response(req, 400).get("Via") == "SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKaaa"
    assert _salvage(b"\x16\x03\x01garbage") is None
    assert _salvage(good.replace(b"Call-ID: c1@h\r\n", b"")) is None             # nothing to copy: no answer
    assert _salvage(good.replace(b"INVITE sip:", b"ACK sip:", 1).replace(b"1 INVITE", b"1 ACK")) is None


def test_a_dialog_and_its_media_plan_survive_a_round_trip_through_json():
    d = Dialog("c1@h", "lt", "rt", "<sip:lobby@h>", '"A" <sip:a@h>', "sip:a@127.0.0.1:5062", 12, 3,
               ["<sip:p1@10.0.0.1;lr>"], "tcp", ("10.0.0.1", 5060))
    assert Dialog.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    codec = sdp.Codec(97, "h264", 90000, 1, {"packetization-mode": "1"}, ("nack", "nack pli"))
    peer = sdp.Media("video", 20096, "127.0.0.1", 20097, (codec,), "sendrecv", 500)
    plan = Plan("video", codec, peer, "127.0.0.1", True, True, 40000, Identity(0xDEADBEEF, 65000, 123), -1)
    kept = json.loads(json.dumps(plan_to_dict(plan, plan.identity, 40000)))
    assert plan_from_dict(kept) == plan


def test_the_next_request_of_a_dialog_advances_its_cseq_and_goes_to_its_target_through_its_routes():
    d = Dialog("c1@h", "lt", "rt", "<sip:lobby@h>", "<sip:a@h>", "sip:a@127.0.0.1:5062", 12, 3,
               ["<sip:p1@10.0.0.1;lr>"])
    bye = d.request("BYE", via=("127.0.0.1", 5060, "udp"), contact="<sip:edgeroom@127.0.0.1:5060>")
    assert bye.uri == "sip:a@127.0.0.1:5062" and bye.cseq == (13, "BYE") and bye.get("Route") == "<sip:p1@10.0.0.1;lr>"
    assert bye.from_tag == "lt" and bye.to_tag == "rt"
    ack = d.request("ACK", via=("127.0.0.1", 5060, "udp"), contact="<sip:edgeroom@127.0.0.1:5060>", cseq=13)
    assert ack.cseq == (13, "ACK") and d.local_seq == 13
    assert Dialog.where(d.remote_target, d.route_set, ("0.0.0.0", 0)) == ("10.0.0.1", 5060)
