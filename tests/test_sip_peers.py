"""The real-peer SIP harness (tests/sip_peers.py) proven against real peers, before the box exists.

- baresip calls baresip (H.264 + PCMU): both established, the decoded picture is fakevideo's
  red|green|blue bars, each side hears the other's tone, the caller's hang-up closes both.
- baresip answers a SIPp UAS's digest challenge (uas_auth.xml); baresip dials SIPp's
  uas_answer.xml and gets H.264 packetization-mode 1; SIPp's uac_av.xml runs against uas_auth.xml.
- The scenarios can fail: run against StandInBox, a small Python model of a SIP service (it is
  not the box and not a SIP stack) with RoomKit's defects (the first H.264 payload type taken
  whatever its mode, the offerer's sprop-parameter-sets echoed) or answering before a CANCEL,
  each scenario that checks it fails. tests/test_sip_sipp.py runs every scenario against the
  real box.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.sip_peers import (
    LOOPBACK,
    Baresip,
    SippResult,
    dominant_frequency,
    fakevideo_bars,
    free_udp_block,
    looks_like_fakevideo,
    requires_baresip,
    requires_sipp,
    sipp,
    sipp_uas,
)

USER, PASSWORD = "alice", "secret"


def _check(result: SippResult) -> None:
    assert result.ok, result.dump()


# ---------------------------------------------------------------------------------------
# A stand-in for the box's SIP service (UDP), to validate the UAC scenarios


_COMPACT = {"i": "call-id", "v": "via", "f": "from", "t": "to", "l": "content-length", "m": "contact",
            "c": "content-type"}
_ALGOS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


class Malformed(ValueError):
    pass


@dataclass
class Msg:
    start: str
    headers: list[tuple[str, str]]
    body: str

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0]

    @property
    def branch(self) -> str:
        m = re.search(r"branch=([^;,\s]+)", self.get("via") or "")
        return m.group(1) if m else ""

    def to_tag(self) -> str | None:
        m = re.search(r";tag=([^;>\s]+)", self.get("to") or "")
        return m.group(1) if m else None


def parse_sip(data: bytes) -> Msg:
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    headers = []
    for line in lines[1:]:
        if ":" not in line:
            raise Malformed(f"header line without colon: {line!r}")
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers.append((_COMPACT.get(key, key), value.strip()))
    msg = Msg(lines[0], headers, body.decode("utf-8", "replace"))
    if not re.fullmatch(r"([A-Z]+ \S+ SIP/2\.0|SIP/2\.0 \d{3} .*)", lines[0]):
        raise Malformed(f"bad start line {lines[0]!r}")
    length = msg.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > len(body)):
        raise Malformed(f"Content-Length {length} but {len(body)} bytes of body")
    for need in ("via", "from", "to", "call-id", "cseq"):
        if msg.get(need) is None:
            raise Malformed(f"no {need}")
    return msg


def _media_sections(sdp: str) -> list[dict]:
    out: list[dict] = []
    for line in sdp.replace("\r\n", "\n").split("\n"):
        if line.startswith("m="):
            kind, port, proto, *fmts = line[2:].split()
            out.append({"kind": kind, "port": int(port), "proto": proto, "fmts": fmts, "rtpmap": {}, "fmtp": {}})
        elif out and line.startswith("a=rtpmap:"):
            pt, _, enc = line[9:].partition(" ")
            out[-1]["rtpmap"][pt] = enc
        elif out and line.startswith("a=fmtp:"):
            pt, _, params = line[7:].partition(" ")
            out[-1]["fmtp"][pt] = params
    return out


def _mode(fmtp: str) -> int:
    m = re.search(r"packetization-mode=(\d)", fmtp)
    return int(m.group(1)) if m else 0


@dataclass
class StandInBox:
    """What the box's SIP UAS must do, as far as the scenarios look (UDP only).

    defects: "first_h264" answers the first H264 payload whatever its mode (RoomKit defect 1),
    "echo_sprop" copies the offer's fmtp line into the answer (defect 2).
    """

    users: dict[str, str] = field(default_factory=lambda: {USER: PASSWORD})
    algorithms: Sequence[str] = ("MD5",)
    ring_s: float = 0.0
    challenge_reinvite: bool = False
    trying: bool = True
    answer_malformed: bool = True
    defects: Sequence[str] = ()
    realm: str = "edgeroom"

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.media = free_udp_block(4)
        self.log: list[str] = []
        self.nonces: set[str] = set()
        self.used: set[tuple[str, str]] = set()
        self.dialogs: dict[str, str] = {}  # call-id -> our tag
        self.pending: dict[str, tuple[Msg, tuple, threading.Timer, str]] = {}
        self.sent: dict[tuple[str, str], bytes] = {}
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        for _, _, timer, _ in self.pending.values():
            timer.cancel()
        self.sock.close()

    def _loop(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                break
            with self.lock:
                self._handle(data, addr)

    def _send(self, data: bytes, addr: tuple) -> None:
        self.sock.sendto(data, addr)
        self.log.append("> " + data.split(b"\r\n", 1)[0].decode())

    def _respond(self, req: Msg, addr: tuple, code: int, reason: str, *, tag: str | None = None,
                 extra: Sequence[str] = (), body: str = "") -> bytes:
        lines = [f"SIP/2.0 {code} {reason}"]
        lines += [f"Via: {v}" for v in req.all("via")]
        to = req.get("to") or ""
        if tag and ";tag=" not in to:
            to += f";tag={tag}"
        for name, value in (("From", req.get("from")), ("To", to), ("Call-ID", req.get("call-id")),
                            ("CSeq", req.get("cseq"))):
            if value is not None:
                lines.append(f"{name}: {value}")
        lines.append(f"Contact: <sip:box@{LOOPBACK}:{self.port}>")
        lines += list(extra)
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        data = ("\r\n".join(lines) + "\r\n\r\n" + body).encode()
        self._send(data, addr)
        if code >= 200:
            self.sent[(req.branch, req.method)] = data
        return data

    def _handle(self, data: bytes, addr: tuple) -> None:
        try:
            req = parse_sip(data)
        except Malformed as exc:
            self.log.append(f"< malformed: {exc}")
            if self.answer_malformed:
                self._bad_request(data, addr)
            return
        if req.start.startswith("SIP/2.0"):
            return
        self.log.append("< " + req.start)
        if req.method != "ACK" and (req.branch, req.method) in self.sent:  # retransmission
            self.sock.sendto(self.sent[(req.branch, req.method)], addr)
            return
        handler = getattr(self, f"_on_{req.method.lower()}", None)
        if handler is None:
            self._respond(req, addr, 501, "Not Implemented", tag="box")
        else:
            handler(req, addr)

    def _bad_request(self, data: bytes, addr: tuple) -> None:
        head = data.partition(b"\r\n\r\n")[0].decode("utf-8", "replace").split("\r\n")
        copy = [h for h in head[1:] if re.match(r"(?i)(via|from|to|call-id|cseq)\s*:", h)]
        if not any(h.lower().startswith("via") for h in copy):
            return  # nowhere to send an answer
        self._send(("\r\n".join(["SIP/2.0 400 Bad Request", *copy, "Content-Length: 0"]) + "\r\n\r\n").encode(), addr)

    # -- digest --

    def _challenge(self, req: Msg, addr: tuple) -> None:
        nonce = secrets.token_hex(12)
        self.nonces.add(nonce)
        hdrs = [f'WWW-Authenticate: Digest realm="{self.realm}", nonce="{nonce}", algorithm={a}, qop="auth"'
                for a in self.algorithms]
        self._respond(req, addr, 401, "Unauthorized", tag="box" + secrets.token_hex(4), extra=hdrs)

    def _authorized(self, req: Msg) -> bool:
        auth = req.get("authorization")
        if not auth or not auth.startswith("Digest "):
            return False
        p = {k: a or b for k, a, b in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]*))', auth[7:])}
        algo = p.get("algorithm", "MD5")
        if algo not in self.algorithms or p.get("nonce") not in self.nonces or p.get("username") not in self.users:
            return False
        h = _ALGOS[algo]

        def hx(s: str) -> str:
            return h(s.encode()).hexdigest()

        ha1 = hx(f"{p['username']}:{p.get('realm')}:{self.users[p['username']]}")
        ha2 = hx(f"{req.method}:{p.get('uri')}")
        if p.get("qop"):
            want = hx(f"{ha1}:{p['nonce']}:{p.get('nc')}:{p.get('cnonce')}:{p['qop']}:{ha2}")
        else:
            want = hx(f"{ha1}:{p['nonce']}:{ha2}")
        key = (p["nonce"], p.get("nc", ""))
        if want != p.get("response") or key in self.used:
            return False
        self.used.add(key)
        return True

    # -- SDP --

    def answer(self, offer: str) -> str:
        lines = ["v=0", f"o=box 1 1 IN IP4 {LOOPBACK}", "s=edgeroom", f"c=IN IP4 {LOOPBACK}", "t=0 0"]
        for i, m in enumerate(_media_sections(offer)):
            names = {pt: m["rtpmap"].get(pt, {"0": "PCMU/8000", "8": "PCMA/8000"}.get(pt, "")) for pt in m["fmts"]}
            port = self.media + 2 * i
            if m["kind"] == "audio":
                chosen = next((pt for want in ("opus", "PCMU", "PCMA") for pt in m["fmts"]
                               if names[pt].lower().startswith(want.lower() + "/")), None)
                if chosen is None:
                    lines.append(f"m=audio 0 {m['proto']} {m['fmts'][0]}")
                    continue
                te = [pt for pt in m["fmts"] if names[pt].lower().startswith("telephone-event/")]
                lines.append(f"m=audio {port} {m['proto']} {' '.join([chosen, *te])}")
                lines += [f"a=rtpmap:{pt} {names[pt]}" for pt in [chosen, *te]]
                lines += [f"a=fmtp:{pt} {m['fmtp'][pt]}" for pt in te if pt in m["fmtp"]]
                lines.append("a=sendrecv")
            elif m["kind"] == "video":
                h264 = [pt for pt in m["fmts"] if names[pt].upper().startswith("H264/")]
                if "first_h264" in self.defects:
                    ranked = h264[:1]
                else:
                    ranked = ([pt for pt in h264 if _mode(m["fmtp"].get(pt, "")) == 1]
                              + [pt for pt in h264 if _mode(m["fmtp"].get(pt, "")) == 0])
                ranked += [pt for pt in m["fmts"] if names[pt].upper().startswith("VP8/")]
                if not ranked:
                    lines.append(f"m=video 0 {m['proto']} {m['fmts'][0]}")
                    continue
                pt = ranked[0]
                lines += [f"m=video {port} {m['proto']} {pt}", f"a=rtpmap:{pt} {names[pt]}"]
                if names[pt].upper().startswith("H264/"):
                    fmtp = (m["fmtp"].get(pt, "") if "echo_sprop" in self.defects
                            else f"profile-level-id=42e01f;packetization-mode={_mode(m['fmtp'].get(pt, ''))}")
                    lines.append(f"a=fmtp:{pt} {fmtp}")
                lines += [f"a=rtcp-fb:{pt} nack", f"a=rtcp-fb:{pt} nack pli", f"a=rtcp-fb:{pt} ccm fir", "a=sendrecv"]
            else:
                lines.append(f"m={m['kind']} 0 {m['proto']} {m['fmts'][0]}")
        return "\r\n".join(lines) + "\r\n"

    # -- methods --

    def _on_invite(self, req: Msg, addr: tuple) -> None:
        call_id = req.get("call-id") or ""
        in_dialog = req.to_tag() is not None and self.dialogs.get(call_id) == req.to_tag()
        if req.to_tag() is not None and not in_dialog:
            self._respond(req, addr, 481, "Call/Transaction Does Not Exist")
            return
        if (not in_dialog or self.challenge_reinvite) and not self._authorized(req):
            self._challenge(req, addr)
            return
        tag = req.to_tag() or "box" + secrets.token_hex(4)
        if self.trying:
            self._respond(req, addr, 100, "Trying")
        body = self.answer(req.body)
        if self.ring_s and not in_dialog:
            self._respond(req, addr, 180, "Ringing", tag=tag)
            timer = threading.Timer(self.ring_s, self._answer_later, args=(req.branch,))
            self.pending[req.branch] = (req, addr, timer, tag)
            timer.start()
            return
        self.dialogs[call_id] = tag
        self._respond(req, addr, 200, "OK", tag=tag, body=body)

    def _answer_later(self, branch: str) -> None:
        with self.lock:
            if branch not in self.pending or not self.running:
                return
            req, addr, _, tag = self.pending.pop(branch)
            self.dialogs[req.get("call-id") or ""] = tag
            self._respond(req, addr, 200, "OK", tag=tag, body=self.answer(req.body))

    def _on_cancel(self, req: Msg, addr: tuple) -> None:
        pending = self.pending.pop(req.branch, None)
        if pending is None:
            self._respond(req, addr, 481, "Call/Transaction Does Not Exist", tag="box")
            return
        invite, inv_addr, timer, tag = pending
        timer.cancel()
        self._respond(req, addr, 200, "OK", tag=tag)
        self._respond(invite, inv_addr, 487, "Request Terminated", tag=tag)

    def _on_ack(self, req: Msg, addr: tuple) -> None:
        pass

    def _on_bye(self, req: Msg, addr: tuple) -> None:
        call_id = req.get("call-id") or ""
        if self.dialogs.get(call_id) is not None and self.dialogs[call_id] in (req.to_tag(), _from_tag(req)):
            del self.dialogs[call_id]
            self._respond(req, addr, 200, "OK")
        else:
            self._respond(req, addr, 481, "Call/Transaction Does Not Exist")

    def _on_options(self, req: Msg, addr: tuple) -> None:
        self._respond(req, addr, 200, "OK", tag="box",
                      extra=["Allow: INVITE, ACK, CANCEL, BYE, OPTIONS", "Accept: application/sdp"])


def _from_tag(req: Msg) -> str | None:
    m = re.search(r";tag=([^;>\s]+)", req.get("from") or "")
    return m.group(1) if m else None


def run_uac(name: str, box: StandInBox, tmp_path: Path, **kw: object) -> SippResult:
    opts: dict = {"service": "room", "user": USER, "password": PASSWORD, "duration_ms": 200, "timeout": 10,
                  "workdir": tmp_path / name}
    opts.update(kw)
    return sipp(name, box.target, **opts)


# ---------------------------------------------------------------------------------------
# SIPp scenarios against the stand-in: they catch what they check


@requires_sipp
@pytest.mark.parametrize("trying", [True, False], ids=["100-then-200", "200-alone"])
def test_cancel_scenario_fails_clearly_when_answered_at_once(trying: bool, tmp_path: Path) -> None:
    box = StandInBox(trying=trying)
    try:
        result = run_uac("uac_cancel", box, tmp_path)
    finally:
        box.close()
    assert not result.ok
    assert "BOX_ANSWERED_200_BEFORE_CANCEL" in result.errors, result.dump()
    assert "\nBYE sip:" in result.messages  # the call it got was hung up


@requires_sipp
@pytest.mark.parametrize(("scenario", "defect"), [("uac_mode0_first", "first_h264"), ("uac_av", "echo_sprop")])
def test_scenarios_catch_roomkit_defects(scenario: str, defect: str, tmp_path: Path) -> None:
    box = StandInBox(defects=(defect,))
    try:
        result = run_uac(scenario, box, tmp_path)
    finally:
        box.close()
    assert not result.ok and "regexp" in result.errors.lower(), result.dump()


@requires_sipp
def test_sipp_3_6_cannot_answer_a_sha256_challenge(tmp_path: Path) -> None:
    """SIPp 3.6's [authentication] takes the first algorithm= of all challenges, MD5 only:
    a box whose 401 lists SHA-256 first must be told to offer MD5 alone for SIPp runs."""
    box = StandInBox(algorithms=("SHA-256", "MD5"))
    try:
        result = run_uac("uac_audio_only", box, tmp_path)
    finally:
        box.close()
    assert not result.ok
    assert "MD5" in result.errors + result.stderr + result.stdout, result.dump()


# ---------------------------------------------------------------------------------------
# real peers


@requires_baresip
def test_two_baresips_call_with_h264_video_and_audio(tmp_path: Path) -> None:
    with Baresip(tmp_path, "bob", auto_answer=True, tone_hz=880) as bob, \
            Baresip(tmp_path, "alice", tone_hz=440) as alice:
        try:
            alice.dial(bob.uri)
            # auto-answer: baresip 1.0 sends no CALL_INCOMING, the call is established at once
            assert alice.wait_event("CALL_ESTABLISHED", 5)["peeruri"] == bob.uri
            assert bob.wait_event("CALL_ESTABLISHED", 5)["direction"] == "incoming"
            assert alice.call_established() and bob.call_established()

            stats = bob.wait_video_frames(10, timeout=8)
            assert stats.rx_codec == "H264" and stats.rx_size == (352, 288), stats.raw
            picture = bob.remote_picture()
            assert picture.shape == (288, 352, 3)
            assert looks_like_fakevideo(picture), fakevideo_bars(picture)
            assert looks_like_fakevideo(alice.remote_picture()), fakevideo_bars(alice.remote_picture())
            time.sleep(1.0)  # a second or so of tone in each direction

            alice.hangup()
            alice.wait_event("CALL_CLOSED", 5)
            bob.wait_event("CALL_CLOSED", 5)
            assert not alice.call_established() and not bob.call_established()
        except BaseException:
            print(alice.log(), bob.log(), sep="\n")
            raise
        # the WAV dumps are complete once the call is closed
        rate, heard_by_bob = bob.received_audio()
        assert rate == 8000 and len(heard_by_bob) > 8000, len(heard_by_bob)
        assert abs(dominant_frequency(heard_by_bob, rate) - 440) < 10
        rate, heard_by_alice = alice.received_audio()
        assert abs(dominant_frequency(heard_by_alice, rate) - 880) < 10


@requires_baresip
def test_manual_answer_and_hangup_by_the_callee(tmp_path: Path) -> None:
    with Baresip(tmp_path, "bob", auto_answer=False, video=False) as bob, \
            Baresip(tmp_path, "alice", video=False) as alice:
        alice.dial(bob.uri)
        assert bob.wait_event("CALL_INCOMING", 5)["peeruri"] == f"sip:alice@{LOOPBACK}"
        alice.wait_event("CALL_RINGING", 5)
        assert not bob.call_established()
        bob.accept()
        alice.wait_event("CALL_ESTABLISHED", 5)
        bob.wait_event("CALL_ESTABLISHED", 5)
        bob.hangup()
        bob.wait_event("CALL_CLOSED", 5)
        assert alice.wait_event("CALL_CLOSED", 5)["param"]  # the reason, e.g. "Connection reset by peer"


@requires_baresip
@requires_sipp
def test_baresip_answers_a_sipp_digest_challenge(tmp_path: Path) -> None:
    keys = {"auth_user": USER, "auth_pass": PASSWORD}
    with sipp_uas("uas_auth", service="peer", keys=keys, workdir=tmp_path / "uas", timeout=15) as uas, \
            Baresip(tmp_path, USER, password=PASSWORD, video=False) as alice:
        alice.dial(f"sip:peer@{LOOPBACK}:{uas.port}")
        alice.wait_event("CALL_ESTABLISHED", 5)
        time.sleep(0.3)
        alice.hangup()
        alice.wait_event("CALL_CLOSED", 5)
        result = uas.wait(10)
    _check(result)
    assert re.search(r'Authorization: Digest username="alice"', result.messages), result.messages


@requires_baresip
@requires_sipp
def test_baresip_with_a_wrong_password_is_refused_by_sipp(tmp_path: Path) -> None:
    keys = {"auth_user": USER, "auth_pass": PASSWORD}
    with sipp_uas("uas_auth", service="peer", keys=keys, workdir=tmp_path / "uas", timeout=15) as uas, \
            Baresip(tmp_path, USER, password="wrong", video=False) as alice:
        alice.dial(f"sip:peer@{LOOPBACK}:{uas.port}")
        closed = alice.wait_event("CALL_CLOSED", 5)
        assert "403" in closed.get("param", ""), closed
        result = uas.wait(5)
    assert not result.ok


@requires_baresip
def test_baresip_1_0_gives_up_when_a_challenge_offers_sha256(tmp_path: Path) -> None:
    """libre 1.1 (baresip 1.0) fails on ANY non-MD5 challenge, even with MD5 offered beside it."""
    cases = [(("MD5",), True), (("SHA-256", "MD5"), False), (("MD5", "SHA-256"), False)]
    for i, (algorithms, should_work) in enumerate(cases):
        box = StandInBox(algorithms=algorithms)
        try:
            with Baresip(tmp_path, f"alice{i}", user=USER, password=PASSWORD, video=False) as alice:
                alice.dial(f"sip:room@{box.target}")
                if should_work:
                    alice.wait_event("CALL_ESTABLISHED", 5)
                    alice.hangup()
                    alice.wait_event("CALL_CLOSED", 5)
                else:
                    closed = alice.wait_event("CALL_CLOSED", 5)
                    assert closed["param"] == "Function not implemented", closed  # ENOSYS
                    assert not any(e["type"] == "CALL_ESTABLISHED" for e in alice.events)
                    assert sum(line.startswith("< INVITE") for line in box.log) == 1, box.log  # no 2nd try
        finally:
            box.close()


@requires_baresip
@requires_sipp
def test_baresip_dials_sipp_uas_and_gets_h264_mode_1(tmp_path: Path) -> None:
    # video_codecs=None: baresip offers H264 mode 0 (pt 96) and mode 1 (pt 97), then others
    with sipp_uas("uas_answer", service="peer", workdir=tmp_path / "uas", timeout=15) as uas, \
            Baresip(tmp_path, "carol", video_codecs=None) as carol:
        carol.dial(f"sip:peer@{LOOPBACK}:{uas.port}")
        carol.wait_event("CALL_ESTABLISHED", 5)
        stats = carol.video_stats()
        assert stats.tx_codec == "H264" and stats.pt_enc == 97, stats.raw
        carol.hangup()
        carol.wait_event("CALL_CLOSED", 5)
        result = uas.wait(10)
    _check(result)
    offer = result.messages.split("INVITE sip:", 1)[1].split("-----", 1)[0]
    assert "a=fmtp:96 packetization-mode=0" in offer and "a=fmtp:97 packetization-mode=1" in offer, offer


@requires_sipp
def test_sipp_uac_av_against_sipp_uas_auth(tmp_path: Path) -> None:
    keys = {"auth_user": USER, "auth_pass": PASSWORD}
    with sipp_uas("uas_auth", service="peer", keys=keys, workdir=tmp_path / "uas", timeout=15) as uas:
        uac = sipp("uac_av", uas.uri_host, service="peer", user=USER, password=PASSWORD, duration_ms=300,
                   workdir=tmp_path / "uac", timeout=10)
        server = uas.wait(10)
    _check(uac)
    _check(server)
