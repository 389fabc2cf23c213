"""SIP messages: real-looking messages round-tripped, compact and folded headers, every SipError with its status
and sentence, the TCP stream parser fed byte by byte and in chunks, garbage, URIs, name-addrs and Vias."""
from __future__ import annotations

import random
import re

import pytest

from services.sip import message as sip
from services.sip.message import Message, NameAddr, SipError, SipUri, StreamParser, Via


def wire(*lines: str, body: bytes = b"", length: int | None = None) -> bytes:
    """A message from its start line and header lines, Content-Length last (the body's unless `length`)."""
    cl = len(body) if length is None else length
    return ("\r\n".join(lines) + f"\r\nContent-Length: {cl}\r\n\r\n").encode() + body


SDP = (b"v=0\r\no=- 3721904123 1823417362 IN IP4 192.168.1.10\r\ns=-\r\nc=IN IP4 192.168.1.10\r\nt=0 0\r\n"
       b"a=tool:baresip 1.0.0\r\nm=audio 10862 RTP/AVP 96 0 8 101\r\na=rtpmap:96 opus/48000/2\r\n"
       b"a=fmtp:96 stereo=1;sprop-stereo=1\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
       b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\na=label:1\r\n"
       b"m=video 10864 RTP/AVP 102\r\nb=AS:2000\r\na=rtpmap:102 H264/90000\r\n"
       b"a=fmtp:102 packetization-mode=0;profile-level-id=42e01f\r\na=rtcp-fb:102 nack\r\n"
       b"a=rtcp-fb:102 nack pli\r\na=rtcp-fb:102 ccm fir\r\na=sendrecv\r\na=label:2\r\n")

# an INVITE the way baresip 1.0 (libre) writes one
INVITE = wire(
    "INVITE sip:box@192.168.1.20 SIP/2.0",
    "Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK8d1e7a0d3c2b4f5a;rport",
    "Contact: <sip:alice-0x5581e4f3c0b0@192.168.1.10:5060>",
    "Max-Forwards: 70",
    "To: <sip:box@192.168.1.20>",
    'From: "Alice" <sip:alice@192.168.1.10>;tag=7c5f31a4b2d06e98',
    "Call-ID: 4d3b2e1f0a9c8b7d",
    "CSeq: 28183 INVITE",
    "User-Agent: baresip v1.0.0 (x86_64/linux)",
    "Allow: INVITE,ACK,BYE,CANCEL,OPTIONS,NOTIFY,SUBSCRIBE,INFO,MESSAGE,UPDATE",
    "Supported: replaces,norefersub",
    "Content-Type: application/sdp",
    body=SDP)

OK = wire(
    "SIP/2.0 200 OK",
    "Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK8d1e7a0d3c2b4f5a;rport=5060;received=192.168.1.10",
    'From: "Alice" <sip:alice@192.168.1.10>;tag=7c5f31a4b2d06e98',
    "To: <sip:box@192.168.1.20>;tag=a6c85cf",
    "Call-ID: 4d3b2e1f0a9c8b7d",
    "CSeq: 28183 INVITE",
    "Contact: <sip:box@192.168.1.20:5060;transport=udp>",
    "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS",
    "Content-Type: application/sdp",
    body=SDP.replace(b"192.168.1.10", b"192.168.1.20"))

UNAUTHORIZED = wire(
    "SIP/2.0 401 Unauthorized",
    "Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK8d1e7a0d3c2b4f5a;rport=5060",
    'From: "Alice" <sip:alice@192.168.1.10>;tag=7c5f31a4b2d06e98',
    "To: <sip:box@192.168.1.20>;tag=a6c85cf",
    "Call-ID: 4d3b2e1f0a9c8b7d",
    "CSeq: 28183 INVITE",
    'WWW-Authenticate: Digest realm="edgeroom", nonce="QOHB-gBBnIs", algorithm=SHA-256, qop="auth", opaque="24"',
    'WWW-Authenticate: Digest realm="edgeroom", nonce="QOHB-gBBnIs", algorithm=MD5, qop="auth", opaque="24"')

ACK = wire(
    "ACK sip:box@192.168.1.20:5060;transport=udp SIP/2.0",
    "Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK11aa22bb;rport",
    "Max-Forwards: 70",
    "To: <sip:box@192.168.1.20>;tag=a6c85cf",
    'From: "Alice" <sip:alice@192.168.1.10>;tag=7c5f31a4b2d06e98',
    "Call-ID: 4d3b2e1f0a9c8b7d",
    "CSeq: 28183 ACK")

BYE = wire(
    "BYE sip:alice-0x5581e4f3c0b0@192.168.1.10:5060 SIP/2.0",
    "Via: SIP/2.0/TCP [2001:db8::20]:5060;branch=z9hG4bK77cc",
    "Max-Forwards: 70",
    "From: <sip:box@192.168.1.20>;tag=a6c85cf",
    'To: "Alice" <sip:alice@192.168.1.10>;tag=7c5f31a4b2d06e98',
    "Call-ID: 4d3b2e1f0a9c8b7d",
    "CSeq: 1 BYE",
    "Reason: SIP;cause=200;text=\"Call completed\"")


# --- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [INVITE, OK, UNAUTHORIZED, ACK, BYE], ids=["invite", "200", "401", "ack", "bye"])
def test_real_messages_round_trip_byte_for_byte(raw):
    assert sip.parse(raw).encode() == raw
    assert sip.parse(sip.parse(raw).encode()) == sip.parse(raw)


def test_the_invite_is_read():
    m = sip.parse(INVITE)
    assert m.is_request and (m.method, m.uri) == ("INVITE", "sip:box@192.168.1.20")
    assert m.call_id == "4d3b2e1f0a9c8b7d" and m.cseq == (28183, "INVITE")
    assert (m.from_tag, m.to_tag) == ("7c5f31a4b2d06e98", None)
    assert m.get("content-type") == m.get("c") == "application/sdp"
    assert m.body == SDP and m.get("Content-Length") == str(len(SDP))
    assert m.get_all("Allow")[:3] == ["INVITE", "ACK", "BYE"]
    assert sip.parse_via(m.get("v")).rport == 0


def test_the_responses_are_read():
    ok = sip.parse(OK)
    assert not ok.is_request and (ok.status, ok.reason_phrase) == (200, "OK")
    assert ok.to_tag == "a6c85cf" and ok.cseq == (28183, "INVITE")
    via = sip.parse_via(ok.get("Via"))
    assert (via.rport, via.received, via.branch) == (5060, "192.168.1.10", "z9hG4bK8d1e7a0d3c2b4f5a")
    challenges = sip.parse(UNAUTHORIZED).get_all("WWW-Authenticate")
    assert len(challenges) == 2 and "algorithm=SHA-256" in challenges[0]   # commas inside are not split


def test_baresip_padded_content_length_and_header_spelling():
    raw = INVITE.replace(f"Content-Length: {len(SDP)}".encode(), f"content-length:   {len(SDP)}".encode())
    raw = raw.replace(b"Call-ID:", b"call-id :").replace(b"CSeq:", b"CSEQ:")
    m = sip.parse(raw)
    assert m.encode() == INVITE and m == sip.parse(INVITE)


def test_compact_headers():
    raw = wire("OPTIONS sip:box@192.168.1.20 SIP/2.0", "v: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx",
               "f: <sip:a@10.0.0.1>;tag=1", "t: <sip:box@192.168.1.20>", "i: abc@10.0.0.1", "CSeq: 2 OPTIONS",
               "m: <sip:a@10.0.0.1>", "k: timer", "s: hello", "c: text/plain", body=b"hi").replace(
        b"Content-Length", b"l")
    m = sip.parse(raw)
    assert [n for n, _ in m.headers] == ["Via", "From", "To", "Call-ID", "CSeq", "Contact", "Supported", "Subject",
                                         "Content-Type", "Content-Length"]
    assert m.get("Call-ID") == m.get("I") == "abc@10.0.0.1" and m.body == b"hi"
    assert b"\r\nContent-Length: 2\r\n" in m.encode()


def test_folded_headers_are_joined_with_one_space():
    raw = ACK.replace(b"CSeq: 28183 ACK\r\n", b"CSeq: 28183 ACK\r\nSubject: I know you're there,\r\n"
                                             b"   pick up the phone\r\n\tand talk to me!\r\n")
    assert sip.parse(raw).get("Subject") == "I know you're there, pick up the phone and talk to me!"


def test_no_content_length_on_udp_takes_the_rest_and_trailing_crlf_is_forgiven():
    raw = INVITE.replace(f"Content-Length: {len(SDP)}\r\n".encode(), b"")
    assert sip.parse(raw).body == SDP
    assert sip.parse(b"\r\n" + INVITE + b"\r\n\r\n") == sip.parse(INVITE)


def test_huge_message():
    body = b"a=x-filler:" + b"0" * 60000 + b"\r\n"
    big = wire("MESSAGE sip:box@h SIP/2.0", "Via: SIP/2.0/UDP h;branch=z9hG4bK1", "From: <sip:a@h>;tag=1",
               "To: <sip:box@h>", "Call-ID: 1", "CSeq: 1 MESSAGE", body=body)
    assert sip.parse(big).body == body
    with pytest.raises(SipError) as err:
        sip.parse(big, max_size=40000)
    assert (err.value.status, err.value.reason) == (513, "too_large")
    assert str(err.value) == f"the message is {len(big)} bytes, more than 40000"


# --- every error, with its status and sentence ---------------------------------------------------------------------

MINIMAL = ["OPTIONS sip:box@h SIP/2.0", "Via: SIP/2.0/UDP h;branch=z9hG4bK1", "From: <sip:a@h>;tag=1",
           "To: <sip:box@h>", "Call-ID: 1", "CSeq: 1 OPTIONS"]


def minimal(**replace: str) -> bytes:
    """MINIMAL with lines replaced (or dropped: "") by their first word: OPTIONS, Via, From, To, Call, CSeq."""
    lines = [replace.get(re.split(r"[-: ]", line)[0], line) for line in MINIMAL]
    return wire(*[line for line in lines if line])


ERRORS = [
    (b"x" * 65536, 513, "too_large", "the message is 65536 bytes, more than 65535"),
    (b"", 0, "keepalive", "a keep-alive: nothing but CRLF"),
    (b"\r\n\r\n", 0, "keepalive", "a keep-alive: nothing but CRLF"),
    (b"OPTIONS sip:box@h SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n", 400, "incomplete",
     "no blank line (CRLF CRLF) ends the headers"),
    (b"HELLO\r\n\r\n", 400, "bad_start_line", "start line 'HELLO' is not 'METHOD URI SIP/2.0'"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_start_line",
     "start line 'GET / HTTP/1.1' is not SIP (no SIP/2.0)"),
    (b"SIP/2.0 2000 OK\r\n\r\n", 400, "bad_start_line", "status code '2000' is not a number from 100 to 699"),
    (minimal(OPTIONS="OPTIONS sip:box@h SIP/3.0"), 505, "bad_version",
     "SIP version 'SIP/3.0' is not spoken, only SIP/2.0"),
    (b"SIP/1.0 200 OK\r\n\r\n", 505, "bad_version", "SIP version 'SIP/1.0' is not spoken, only SIP/2.0"),
    (minimal(OPTIONS="OPTIONS http://box SIP/2.0"), 416, "bad_uri", "URI scheme 'http' is not sip, sips or tel"),
    (minimal(OPTIONS="OPTIONS box SIP/2.0"), 400, "bad_uri", "URI 'box' has no scheme"),
    (minimal(OPTIONS="OPTIONS sip:box@h:99999 SIP/2.0"), 400, "bad_uri",
     "URI 'sip:box@h:99999': port '99999' is not a number from 1 to 65535"),
    (minimal(Call="Call-ID 1"), 400, "bad_header", "line 5 has no colon: 'Call-ID 1'"),
    (minimal(Call="Call ID: 1"), 400, "bad_header", "line 5: header name 'Call ID' is not a token"),
    (minimal(Call="Call-ID: 1\x00"), 400, "bad_header", "line 5 holds a control character or a bare CR/LF"),
    (minimal(Call="Call-ID: 1\n2"), 400, "bad_header", "line 5 holds a control character or a bare CR/LF"),
    (minimal(Via=" folded: x"), 400, "bad_header", "line 2 continues a header but none comes before it"),
    (minimal(Call="Call-ID: " + "x" * 8200), 400, "bad_header", "line 5 is 8209 characters long, more than 8192"),
    (wire(*MINIMAL, *["Subject: x"] * 125), 400, "bad_header", "131 header lines, more than 128"),
    (minimal(Call="Call-ID: caf\xe9").replace(b"\xc3\xa9", b"\xe9"), 400, "bad_header",
     "byte 0xe9 at offset 115 of the headers is not UTF-8"),
    (minimal(Call=""), 400, "missing_header", "the request has no Call-ID header"),
    (minimal(Via=""), 400, "missing_header", "the request has no Via header"),
    (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\nFrom: <sip:a@h>\r\nTo: <sip:b@h>\r\nCall-ID: 1\r\n\r\n", 400,
     "missing_header", "the response has no CSeq header"),
    (minimal(CSeq="CSeq: 1 INVITE"), 400, "bad_cseq", "CSeq method 'INVITE' is not the request's method 'OPTIONS'"),
    (minimal(CSeq="CSeq: one OPTIONS"), 400, "bad_cseq",
     "CSeq 'one OPTIONS' is not 'number METHOD' with a number below 2**31"),
    (minimal(CSeq="CSeq: 2147483648 OPTIONS"), 400, "bad_cseq",
     "CSeq '2147483648 OPTIONS' is not 'number METHOD' with a number below 2**31"),
    (wire(*MINIMAL, body=b"v=0\r\no=- 1 1\r\n", length=300), 400, "bad_content_length",
     "Content-Length says 300 but the body has 14 bytes"),
    (wire(*MINIMAL, body=b"v=0\r\no=- 1 1\r\nGARBAGE", length=14), 400, "bad_content_length",
     "Content-Length says 14 but the body has 21 bytes"),
    (wire(*MINIMAL, "Content-Length: 3"), 400, "bad_content_length", "Content-Length headers disagree: 0, 3"),
    (minimal(CSeq="CSeq: 1 OPTIONS\r\nContent-Length: -1").replace(b"Content-Length: 0\r\n", b""), 400,
     "bad_content_length", "Content-Length '-1' is not a non-negative integer"),
    (minimal(CSeq="CSeq: 1 OPTIONS\r\nContent-Length: \u0663").replace(b"Content-Length: 0\r\n", b""), 400,
     "bad_content_length", "Content-Length '\u0663' is not a non-negative integer"),
]


@pytest.mark.parametrize(("data", "status", "reason", "text"), ERRORS,
                         ids=[f"{e[2]}-{i}" for i, e in enumerate(ERRORS)])
def test_each_error_has_its_status_reason_and_sentence(data, status, reason, text):
    with pytest.raises(SipError) as err:
        sip.parse(data)
    assert (err.value.status, err.value.reason, str(err.value)) == (status, reason, text)


def test_garbage_never_raises_anything_but_sip_error():
    rng = random.Random(17)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 400))
        with pytest.raises(SipError):
            sip.parse(data)
    for _ in range(3000):  # one valid message, damaged: a byte changed, a CRLF added or the end cut
        data = bytearray(rng.choice([INVITE, OK, UNAUTHORIZED, ACK, BYE]))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data) or 1)
            choice = rng.randrange(3)
            if choice == 0 and data:
                data[at] = rng.randrange(256)
            elif choice == 1:
                data[at:at] = rng.choice([b"\r\n", b":", b";", b",", b"<", b'"', b" ", b"\xff"])
            else:
                del data[at:]
        try:
            m = sip.parse(bytes(data))
        except SipError as exc:
            assert exc.reason in ("too_large", "keepalive", "bad_start_line", "bad_header", "missing_header",
                                  "bad_content_length", "bad_cseq", "bad_version", "bad_uri", "incomplete")
        else:
            assert sip.parse(m.encode()).encode() == m.encode()


# --- the stream parser ---------------------------------------------------------------------------------------------


def test_stream_byte_by_byte_with_keepalives():
    stream = b"\r\n\r\n" + INVITE + b"\r\n" + OK + ACK + b"\r\n\r\n"
    parser, got = StreamParser(), []
    for i in range(len(stream)):
        got += parser.feed(stream[i:i + 1])
    assert got == [sip.parse(INVITE), sip.parse(OK), sip.parse(ACK)]


def test_stream_split_at_every_point_and_two_messages_in_a_chunk():
    stream = BYE + INVITE
    for cut in range(len(stream) + 1):
        parser = StreamParser()
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert got == [sip.parse(BYE), sip.parse(INVITE)], cut


def test_stream_needs_content_length_and_breaks_for_good():
    parser = StreamParser()
    with pytest.raises(SipError) as err:
        parser.feed(ACK.replace(b"Content-Length: 0\r\n", b""))
    assert (err.value.status, err.value.reason, str(err.value)) == (
        400, "missing_header", "a message on a stream needs a Content-Length header")
    with pytest.raises(SipError) as again:
        parser.feed(BYE)
    assert again.value is err.value and parser.broken is err.value


def test_stream_too_large_headers_or_body():
    parser = StreamParser(max_size=1000)
    with pytest.raises(SipError) as err:
        parser.feed(b"INVITE sip:a@b SIP/2.0\r\nSubject: " + b"x" * 1000)
    assert (err.value.status, err.value.reason, str(err.value)) == (
        513, "too_large", "1033 bytes of headers without an end, more than 1000")
    parser = StreamParser(max_size=1000)
    with pytest.raises(SipError) as err:      # said at once, before the body arrives
        parser.feed(wire(*MINIMAL, length=5000))
    assert (err.value.reason, str(err.value)) == ("too_large", f"the message is {len(wire(*MINIMAL)) + 5000 + 3} "
                                                                "bytes, more than 1000")


def test_stream_bad_message_with_a_known_frame_is_dropped_alone():
    bad = minimal(Call="")
    parser = StreamParser()
    assert parser.feed(ACK + bad + BYE) == [sip.parse(ACK)]
    with pytest.raises(SipError) as err:
        parser.feed(b"")
    assert err.value.reason == "missing_header" and parser.broken is None
    assert parser.feed(b"") == [sip.parse(BYE)]


def test_stream_garbage():
    rng = random.Random(5)
    for _ in range(300):
        parser = StreamParser(max_size=2000)
        try:
            for _ in range(20):
                parser.feed(rng.randbytes(rng.randrange(1, 300)))
        except SipError:
            continue


# --- header shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "uri"), [
    ("sip:user@host:5062;transport=tcp", SipUri("sip", "user", "host", 5062, {"transport": "tcp"})),
    ("sips:example.com", SipUri("sips", "", "example.com")),
    ("sip:alice:secret@10.0.0.1;LR", SipUri("sip", "alice", "10.0.0.1", 0, {"lr": ""})),
    ("sip:bob@[2001:db8::1]:5061", SipUri("sip", "bob", "2001:db8::1", 5061)),
    ("SIP:bob@[::1]", SipUri("sip", "bob", "::1")),
    ("sip:alice;day=tuesday@atlanta.com", SipUri("sip", "alice;day=tuesday", "atlanta.com")),
    ("sip:b@h?subject=project", SipUri("sip", "b", "h", 0, {}, "subject=project")),
    ("tel:+1-201-555-0123;phone-context=x", SipUri("tel", "+1-201-555-0123", "", 0, {"phone-context": "x"})),
])
def test_parse_uri(text, uri):
    assert sip.parse_uri(text) == uri
    assert sip.parse_uri(str(uri)) == uri


def test_uri_written():
    assert str(sip.parse_uri("sip:alice:pw@[2001:db8::1]:5060;transport=tcp;lr")) == \
        "sip:alice@[2001:db8::1]:5060;transport=tcp;lr"


@pytest.mark.parametrize(("text", "status", "message"), [
    ("http://x", 416, "URI scheme 'http' is not sip, sips or tel"),
    ("sip:", 400, "URI 'sip:': '' is not a host name or address"),
    ("sip:@h", 400, "URI 'sip:@h' has an empty or unreadable user part"),
    ("sip:b@[::1", 400, "URI 'sip:b@[::1': IPv6 address '[::1' has no closing ']'"),
    ("sip:b@[nope]", 400, "URI 'sip:b@[nope]': 'nope' is not an IPv6 address"),
    ("sip:b@h:0", 400, "URI 'sip:b@h:0': port '0' is not a number from 1 to 65535"),
    ("sip:b@h h", 400, "URI 'sip:b@h h': 'h h' is not a host name or address"),
    ("tel:", 400, "tel URI 'tel:' has no proper number"),
])
def test_bad_uris(text, status, message):
    with pytest.raises(SipError) as err:
        sip.parse_uri(text)
    assert (err.value.status, err.value.reason, str(err.value)) == (status, "bad_uri", message)


@pytest.mark.parametrize(("text", "na"), [
    ('"Bob" <sip:bob@h>;tag=x', NameAddr("Bob", "sip:bob@h", {"tag": "x"})),
    ('"Bob \\"The\\" Builder, Jr" <sip:bob@h>', NameAddr('Bob "The" Builder, Jr', "sip:bob@h")),
    ("<sip:b@h;transport=tcp>;expires=60", NameAddr("", "sip:b@h;transport=tcp", {"expires": "60"})),
    ("Bob  Smith <sip:b@h>", NameAddr("Bob Smith", "sip:b@h")),
    ("sip:b@h;tag=x;lr", NameAddr("", "sip:b@h", {"tag": "x", "lr": ""})),
    ('<sip:a@h>;+sip.instance="<urn:uuid:1;2>"', NameAddr("", "sip:a@h", {"+sip.instance": '"<urn:uuid:1;2>"'})),
])
def test_parse_name_addr(text, na):
    assert sip.parse_name_addr(text) == na
    assert sip.parse_name_addr(str(na)) == na


@pytest.mark.parametrize(("text", "message"), [
    ('"Bob <sip:b@h>', "display name in '\"Bob <sip:b@h>' has no closing quote"),
    ('"Bob" sip:b@h', "'\"Bob\" sip:b@h': a quoted display name must be followed by <URI>"),
    ("<sip:b@h", "'<sip:b@h': '<' without '>'"),
    ("<sip:b@h> junk", "'<sip:b@h> junk': unexpected 'junk' after '>'"),
    ("bob", "'bob' is not a name-addr or a URI"),
    ("<nothing>", "'<nothing>': 'nothing' is not a URI"),
    ("<sip:b@h>;=x", "'<sip:b@h>;=x': parameter '=x' is not name[=value]"),
])
def test_bad_name_addrs(text, message):
    with pytest.raises(SipError) as err:
        sip.parse_name_addr(text)
    assert (err.value.status, err.value.reason, str(err.value)) == (400, "bad_header", message)


def test_name_addr_written():
    assert str(NameAddr('a "b"', "sip:x@h", {"tag": "1"})) == '"a \\"b\\"" <sip:x@h>;tag=1'
    assert str(NameAddr("", "sip:x@h;lr")) == "<sip:x@h;lr>"


@pytest.mark.parametrize(("text", "via"), [
    ("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;rport", Via("UDP", "10.0.0.1", 5060, {"branch": "z9hG4bKa",
                                                                                     "rport": ""})),
    ("SIP / 2.0 / tcp  host.example ;branch=z9hG4bKb ; received=1.2.3.4;rport=9",
     Via("TCP", "host.example", 0, {"branch": "z9hG4bKb", "received": "1.2.3.4", "rport": "9"})),
    ("SIP/2.0/TLS [2001:db8::5]:5061;branch=z9hG4bKc", Via("TLS", "2001:db8::5", 5061, {"branch": "z9hG4bKc"})),
])
def test_parse_via(text, via):
    assert sip.parse_via(text) == via
    assert sip.parse_via(str(via)) == via


def test_via_properties():
    via = sip.parse_via("SIP/2.0/UDP h;branch=z9hG4bKa;received=10.1.1.1;rport=5070")
    assert (via.branch, via.received, via.rport) == ("z9hG4bKa", "10.1.1.1", 5070)
    bare = sip.parse_via("SIP/2.0/UDP h")
    assert (bare.branch, bare.received, bare.rport) == (None, None, None)


@pytest.mark.parametrize(("text", "message"), [
    ("SIP/2.0 h", "Via 'SIP/2.0 h' is not 'SIP/2.0/transport host[:port];params'"),
    ("SIP/1.0/UDP h", "Via 'SIP/1.0/UDP h' is not 'SIP/2.0/transport host[:port];params'"),
    ("SIP/2.0/UDP h:x", "Via 'SIP/2.0/UDP h:x': port 'x' is not a number from 1 to 65535"),
])
def test_bad_vias(text, message):
    with pytest.raises(SipError) as err:
        sip.parse_via(text)
    assert (err.value.status, err.value.reason, str(err.value)) == (400, "bad_header", message)


def test_get_all_splits_list_headers_at_top_level_commas_only():
    m = sip.parse(wire(*MINIMAL[:2], "Via: SIP/2.0/UDP a;branch=z9hG4bK2 , SIP/2.0/TCP b;branch=z9hG4bK3",
                       *MINIMAL[2:], 'Contact: "Smith, Bob" <sip:b@h;x=1,2>;q=0.5, <sip:c@h>',
                       "Record-Route: <sip:p1;lr>,<sip:p2;lr>", "Subject: one, two"))
    assert m.get_all("Via") == ["SIP/2.0/UDP h;branch=z9hG4bK1", "SIP/2.0/UDP a;branch=z9hG4bK2",
                                "SIP/2.0/TCP b;branch=z9hG4bK3"]
    assert m.get_all("m") == ['"Smith, Bob" <sip:b@h;x=1,2>;q=0.5', "<sip:c@h>"]
    assert m.get_all("Record-Route") == ["<sip:p1;lr>", "<sip:p2;lr>"]
    assert m.get_all("Subject") == ["one, two"] and m.get_all("Route") == []


def test_set_add_remove_and_no_header_injection():
    m = sip.parse(ACK)
    m.add("Route", "<sip:p1;lr>")
    m.add("route", "<sip:p2;lr>")
    m.set("ROUTE", "<sip:p3;lr>")
    assert m.get_all("Route") == ["<sip:p3;lr>"]
    m.set("Max-Forwards", "69")
    assert m.headers[1] == ("Max-Forwards", "69")
    m.remove("i")
    assert m.get("Call-ID") is None and m.call_id == ""
    with pytest.raises(SipError) as err:
        m.add("Subject", "x\r\nVia: SIP/2.0/UDP evil")
    assert (err.value.status, str(err.value)) == (500, "value of Subject holds a line break or control character")
    with pytest.raises(SipError, match="header name 'Bad Name' is not a token"):
        m.set("Bad Name", "x")


def test_encode_writes_content_length_from_the_body():
    m = sip.parse(OK)
    m.body = b"short"
    assert m.encode().endswith(b"Content-Type: application/sdp\r\nContent-Length: 5\r\n\r\nshort")
    m.remove("Content-Length")
    assert sip.parse(m.encode()).body == b"short"


# --- builders ----------------------------------------------------------------------------------------------------


def test_request_builder_round_trips():
    via = Via("UDP", "192.168.1.20", 5060, {"branch": sip.new_branch(), "rport": ""})
    req = sip.request("INVITE", "sip:alice@192.168.1.10", call_id=sip.new_call_id("192.168.1.20"),
                      from_=NameAddr("edgeroom", "sip:box@192.168.1.20", {"tag": sip.new_tag()}),
                      to="<sip:alice@192.168.1.10>", cseq=1, via=via, contact="<sip:box@192.168.1.20:5060>",
                      headers=[("User-Agent", "edgeroom")], body=SDP, content_type="application/sdp")
    assert [n for n, _ in req.headers] == ["Via", "Max-Forwards", "From", "To", "Call-ID", "CSeq", "Contact",
                                           "User-Agent", "Content-Type"]
    assert sip.parse(req.encode()) == sip.parse(sip.parse(req.encode()).encode())
    back = sip.parse(req.encode())
    assert back.cseq == (1, "INVITE") and back.body == SDP and sip.parse_via(back.get("Via")) == via
    assert back.call_id.endswith("@192.168.1.20") and back.from_tag
    with pytest.raises(SipError) as err:
        sip.request("INVITE", "mailto:x", call_id="1", from_="<sip:a@h>", to="<sip:b@h>", cseq=1, via="SIP/2.0/UDP h")
    assert err.value.status == 416


def test_response_copies_what_8_2_6_says():
    req = sip.parse(INVITE.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\nVia: SIP/2.0/UDP proxy;branch="
                                   b"z9hG4bKp\r\nRecord-Route: <sip:proxy;lr>\r\n"))
    ok = sip.response(req, 200, to_tag="box1", body=b"v=0\r\n", content_type="application/sdp")
    assert (ok.status, ok.reason_phrase) == (200, "OK")
    assert ok.get_all("Via") == req.get_all("Via") and len(ok.get_all("Via")) == 2
    assert ok.get("To") == "<sip:box@192.168.1.20>;tag=box1" and ok.to_tag == "box1"
    assert (ok.get("From"), ok.call_id, ok.cseq) == (req.get("From"), req.call_id, req.cseq)
    assert ok.get("Record-Route") == "<sip:proxy;lr>"
    assert sip.parse(ok.encode()).encode() == ok.encode()
    trying = sip.response(req, 100)
    assert trying.reason_phrase == "Trying" and trying.get("Record-Route") is None and trying.to_tag is None
    tagged = sip.response(sip.parse(ok.encode()), 486, to_tag="other")
    assert tagged.to_tag == "box1" and tagged.reason_phrase == "Busy Here"
    assert sip.response(req, 299, "Odd").reason_phrase == "Odd"
    with pytest.raises(ValueError, match="no default reason phrase for 299"):
        sip.response(req, 299)


def test_reason_table_and_ids():
    assert {100, 180, 183, 200, 202, 400, 401, 403, 404, 405, 407, 408, 413, 415, 416, 420, 423, 480, 481, 482, 483,
            486, 487, 488, 491, 500, 501, 503, 505, 513, 603} <= set(sip.REASONS)
    branches = {sip.new_branch() for _ in range(100)}
    assert len(branches) == 100 and all(b.startswith("z9hG4bK") for b in branches)
    assert sip.new_tag() != sip.new_tag()


def test_message_built_by_hand_gets_canonical_names():
    m = Message(method="OPTIONS", uri="sip:h", headers=[("i", "1"), ("call-id", "2"), ("cseq", "1 OPTIONS")])
    assert m.headers == [("Call-ID", "1"), ("Call-ID", "2"), ("CSeq", "1 OPTIONS")]
    assert m.get_all("Call-ID") == ["1", "2"]
