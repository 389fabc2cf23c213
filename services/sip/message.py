"""SIP messages (RFC 3261): a strict parser for datagrams and streams, and a writer.

`parse()` reads one UDP datagram, `StreamParser` frames messages out of a TCP byte stream by
their Content-Length. Both raise `SipError`, which carries the status to answer with (400, 416,
505, 513; 0 for a CRLF keep-alive, which is no error and gets no answer) and a short reason for
the drop counter, with a sentence naming the exact cause.

Strict on purpose: the box faces whatever reaches port 5060, and a message it cannot read
exactly is answered 400 and dropped rather than guessed at. In particular RFC 3261 18.3 lets a
UDP receiver discard the bytes after Content-Length; here a body longer or shorter than its
Content-Length is refused (bad_content_length), except trailing CRLFs, which some stacks add.
Without a Content-Length a datagram's body is the rest of the datagram; on a stream the header
is required. Header names are kept in canonical spelling ("call-id" and "i" both become
"Call-ID"); values are kept as written, with folded lines joined by one space.

`Message.encode()` always writes Content-Length from the body. `request()` and `response()` build
messages with the headers RFC 3261 8.1.1 and 8.2.6 require; `SipUri`, `NameAddr` and `Via` read
and write the three header shapes a user agent looks into.

Requests and responses alike must carry Via, From, To, Call-ID and CSeq (a response without them
matches no transaction); a request's CSeq method must be its method. Limits: max_size bytes per
message (65535), 128 header lines, 8192 characters per line.

Written by hand, stdlib only (no third-party SIP library), so that each refusal is ours to state
and to test.
"""
from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "REASONS", "Message", "NameAddr", "SipError", "SipUri", "StreamParser", "Via", "new_branch", "new_call_id",
    "new_tag", "parse", "parse_name_addr", "parse_uri", "parse_via", "request", "response",
]

MAX_SIZE = 65535
MAX_HEADERS = 128
MAX_LINE = 8192

COMPACT = {"i": "Call-ID", "f": "From", "t": "To", "v": "Via", "m": "Contact", "l": "Content-Length",
           "c": "Content-Type", "k": "Supported", "s": "Subject", "e": "Content-Encoding", "o": "Event",
           "r": "Refer-To", "b": "Referred-By", "u": "Allow-Events", "x": "Session-Expires"}
_SPELLED = ["Call-ID", "CSeq", "Via", "From", "To", "Contact", "Content-Length", "Content-Type", "Max-Forwards",
            "WWW-Authenticate", "Authorization", "Proxy-Authenticate", "Proxy-Authorization", "Record-Route",
            "Route", "User-Agent", "Allow", "Supported", "Expires", "MIME-Version", "RAck", "RSeq", "SIP-ETag",
            "SIP-If-Match", "Min-SE", "Min-Expires", "Authentication-Info", "Session-Expires", "Subject",
            "Content-Encoding", "Event", "Refer-To", "Referred-By", "Allow-Events"]
CANONICAL = {name.lower(): name for name in _SPELLED}
# headers whose comma-separated values get_all() splits (RFC 3261 7.3.1); never the *-Authenticate ones
LISTS = {"via", "route", "record-route", "contact", "allow", "supported", "require", "proxy-require", "unsupported"}
REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")
SCHEMES = ("sip", "sips", "tel")

REASONS = {
    100: "Trying", 180: "Ringing", 183: "Session Progress", 200: "OK", 202: "Accepted", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    407: "Proxy Authentication Required", 408: "Request Timeout", 413: "Request Entity Too Large",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension", 423: "Interval Too Brief",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist", 482: "Loop Detected",
    483: "Too Many Hops", 486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    491: "Request Pending", 500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "Version Not Supported", 513: "Message Too Large", 603: "Decline",
}

_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(r"SIP/\d+\.\d+", re.IGNORECASE)
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9.])?")
_DIGITS = re.compile(r"[0-9]{1,10}")
_TEL = re.compile(r"\+?[0-9A-Fa-f*#().-]+")                   # RFC 3966 global or local number
_USER = re.compile(r"[^\s<>\"@\[\]:]+")                      # RFC 3261 25.1: no blanks, delimiters, '@'
_PARAM_VALUE = re.compile(r'[^\s;,<>?"]*|"(?:[^"\\]|\\.)*"')
_VIA = re.compile(r"SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9.!%*_+`'~-]+)\s+([^;\s]+)\s*(;.*)?", re.IGNORECASE | re.DOTALL)


class SipError(ValueError):
    """A message that cannot be taken: `status` is the response to answer with (0: none, a keep-alive),
    `reason` the label it is counted under."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _canon(name: str) -> str:
    low = name.lower()
    if low in COMPACT:
        return COMPACT[low]
    return CANONICAL.get(low) or "-".join(part.capitalize() for part in name.split("-"))


def _short(text: str | bytes) -> str:
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split on `sep` outside double quotes and <...>; parts stripped, empty ones dropped."""
    parts, start, quoted, angled, escaped = [], 0, False, False, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            escaped = ch == "\\"
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "<":
            angled = True
        elif ch == ">":
            angled = False
        elif ch == sep and not angled:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _params(text: str, what: str, reason: str = "bad_header") -> dict[str, str]:
    """';a=1;b' -> {'a': '1', 'b': ''}; names lower case, values as written."""
    out: dict[str, str] = {}
    for part in _split_top(text, ";"):
        name, _, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not _TOKEN.fullmatch(name) or not _PARAM_VALUE.fullmatch(value):
            raise SipError(400, reason, f"{what}: parameter {_short(part)} is not name[=value]")
        out[name] = value
    return out


def _write_params(params: dict[str, str]) -> str:
    return "".join(f";{k}={v}" if v else f";{k}" for k, v in params.items())


def _hostport(text: str, what: str, reason: str) -> tuple[str, int]:
    """'host', 'host:5060', '[::1]:5060' -> (host without brackets, port or 0)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise SipError(400, reason, f"{what}: IPv6 address {_short(text)} has no closing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SipError(400, reason, f"{what}: {host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise SipError(400, reason, f"{what}: unexpected {_short(rest)} after the IPv6 address")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
        if not _HOSTNAME.fullmatch(host):
            raise SipError(400, reason, f"{what}: {_short(host)} is not a host name or address")
    if port_text is None:
        return host, 0
    if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise SipError(400, reason, f"{what}: port {_short(port_text)} is not a number from 1 to 65535")
    return host, int(port_text)


def _write_host(host: str, port: int) -> str:
    text = f"[{host}]" if ":" in host else host
    return f"{text}:{port}" if port else text


# --- URIs and header shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SipUri:
    scheme: str                     # sip | sips | tel, lower case
    user: str                       # "" when absent; the number of a tel: URI
    host: str                       # "" for tel:; an IPv6 address without its brackets
    port: int = 0                   # 0 when absent
    params: dict[str, str] = field(default_factory=dict, hash=False)
    headers: str = ""               # what follows '?', as written

    def __str__(self) -> str:
        head = f"{self.scheme}:{self.user}"
        if self.host:
            head += ("@" if self.user else "") + _write_host(self.host, self.port)
        return head + _write_params(self.params) + (f"?{self.headers}" if self.headers else "")


def parse_uri(text: str) -> SipUri:
    """A sip:, sips: or tel: URI; SipError 416 for another scheme, 400 bad_uri for anything unreadable.
    A password (sip:user:pw@host) is read and dropped (RFC 3261 19.1.1: not recommended)."""
    text = text.strip()
    scheme, colon, rest = text.partition(":")
    if not colon or not _TOKEN.fullmatch(scheme):
        raise SipError(400, "bad_uri", f"URI {_short(text)} has no scheme")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise SipError(416, "bad_uri", f"URI scheme {scheme!r} is not sip, sips or tel")
    rest, _, headers = rest.partition("?")
    if scheme == "tel":
        number, _, params = rest.partition(";")
        if not _TEL.fullmatch(number):
            raise SipError(400, "bad_uri", f"tel URI {_short(text)} has no proper number")
        return SipUri(scheme, number, "", 0, _params(params, f"URI {_short(text)}", "bad_uri"), headers)
    userinfo, at, hostpart = rest.partition("@")
    if not at:
        userinfo, hostpart = "", rest
    user = userinfo.partition(":")[0]
    if at and not _USER.fullmatch(user):
        raise SipError(400, "bad_uri", f"URI {_short(text)} has an empty or unreadable user part")
    hostport, _, params = hostpart.partition(";")
    host, port = _hostport(hostport, f"URI {_short(text)}", "bad_uri")
    return SipUri(scheme, user, host, port, _params(params, f"URI {_short(text)}", "bad_uri"), headers)


@dataclass(frozen=True)
class NameAddr:
    """From, To, Contact, Route: an optional display name, a URI, header parameters (tag, expires, lr...)."""
    display: str
    uri: str
    params: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        name = self.display.replace("\\", "\\\\").replace('"', '\\"')
        return (f'"{name}" ' if self.display else "") + f"<{self.uri}>" + _write_params(self.params)


def _quoted(text: str) -> tuple[str, str]:
    """'"Bob \\"B\\"" <...' -> ('Bob "B"', ' <...'); `text` starts with the opening quote."""
    out, i = [], 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), text[i + 1:]
        out.append(ch)
        i += 1
    raise SipError(400, "bad_header", f"display name in {_short(text)} has no closing quote")


def parse_name_addr(text: str) -> NameAddr:
    """'"Bob" <sip:bob@h>;tag=x', '<sip:b@h>', 'Bob <sip:b@h>' or a bare 'sip:b@h;tag=x' (whose parameters are
    the header's, RFC 3261 20.10); SipError 400 bad_header when unreadable."""
    text = text.strip()
    if text.startswith('"'):
        display, rest = _quoted(text)
        rest = rest.lstrip()
        if not rest.startswith("<"):
            raise SipError(400, "bad_header", f"{_short(text)}: a quoted display name must be followed by <URI>")
    elif "<" in text:
        display, _, rest = text.partition("<")
        display, rest = " ".join(display.split()), "<" + rest
    else:
        uri, _, params = text.partition(";")
        if not uri or ":" not in uri or any(c in uri for c in ' ,?"<>'):
            raise SipError(400, "bad_header", f"{_short(text)} is not a name-addr or a URI")
        return NameAddr("", uri, _params(params, _short(text)))
    uri, closing, params = rest[1:].partition(">")
    if not closing:
        raise SipError(400, "bad_header", f"{_short(text)}: '<' without '>'")
    if ":" not in uri or any(c in uri for c in " <>"):
        raise SipError(400, "bad_header", f"{_short(text)}: {_short(uri)} is not a URI")
    params = params.strip()
    if params and not params.startswith(";"):
        raise SipError(400, "bad_header", f"{_short(text)}: unexpected {_short(params)} after '>'")
    return NameAddr(display, uri, _params(params, _short(text)))


@dataclass(frozen=True)
class Via:
    transport: str                  # UDP | TCP | TLS | WS ..., upper case
    host: str                       # an IPv6 address without its brackets
    port: int = 0                   # 0 when absent
    params: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """None: absent; 0: asked for (RFC 3581 ';rport' with no value); else the port a server filled in."""
        if "rport" not in self.params:
            return None
        value = self.params["rport"]
        return int(value) if _DIGITS.fullmatch(value) else 0

    def __str__(self) -> str:
        return f"SIP/2.0/{self.transport} {_write_host(self.host, self.port)}{_write_params(self.params)}"


def parse_via(text: str) -> Via:
    """One Via value ('SIP/2.0/UDP host:port;branch=...;rport'); SipError 400 bad_header when unreadable."""
    m = _VIA.fullmatch(text.strip())
    if not m:
        raise SipError(400, "bad_header", f"Via {_short(text)} is not 'SIP/2.0/transport host[:port];params'")
    host, port = _hostport(m.group(2), f"Via {_short(text)}", "bad_header")
    return Via(m.group(1).upper(), host, port, _params(m.group(3) or "", f"Via {_short(text)}"))


# --- messages ---------------------------------------------------------------------------------------------------


@dataclass
class Message:
    method: str = ""                # a request's
    uri: str = ""
    status: int = 0                 # a response's
    reason_phrase: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def __post_init__(self) -> None:
        self.headers = [(_canon(name), value) for name, value in self.headers]

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str) -> str | None:
        """The first value of header `name` (any case, compact forms too), None when absent."""
        key = _canon(name)
        return next((v for n, v in self.headers if n == key), None)

    def get_all(self, name: str) -> list[str]:
        """Every value of `name` in order; list headers (Via, Route, Record-Route, Contact, Allow, Supported,
        Require...) split on their top-level commas."""
        key = _canon(name)
        values = [v for n, v in self.headers if n == key]
        if key.lower() in LISTS:
            return [part for v in values for part in _split_top(v, ",")]
        return values

    def set(self, name: str, value: str) -> None:
        """Replace every `name` header by one with `value`, where the first one was (at the end if none)."""
        key, value = _checked(name, value)
        at = next((i for i, (n, _) in enumerate(self.headers) if n == key), len(self.headers))
        self.remove(key)
        self.headers.insert(at, (key, value))

    def add(self, name: str, value: str) -> None:
        self.headers.append(_checked(name, value))

    def remove(self, name: str) -> None:
        key = _canon(name)
        self.headers = [(n, v) for n, v in self.headers if n != key]

    @property
    def call_id(self) -> str:
        return self.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, method) of CSeq; SipError 400 bad_cseq when absent or unreadable."""
        value = self.get("CSeq")
        if value is None:
            raise SipError(400, "bad_cseq", "the message has no CSeq")
        number, method = parts if len(parts := value.split()) == 2 else ("", "")
        if not _DIGITS.fullmatch(number) or int(number) >= 2**31 or not _TOKEN.fullmatch(method):
            raise SipError(400, "bad_cseq", f"CSeq {_short(value)} is not 'number METHOD' with a number below 2**31")
        return int(number), method

    @property
    def from_tag(self) -> str | None:
        value = self.get("From")
        return parse_name_addr(value).tag if value is not None else None

    @property
    def to_tag(self) -> str | None:
        value = self.get("To")
        return parse_name_addr(value).tag if value is not None else None

    def start_line(self) -> str:
        if self.is_request:
            return f"{self.method} {self.uri} SIP/2.0"
        return f"SIP/2.0 {self.status} {self.reason_phrase}"

    def encode(self) -> bytes:
        """The message on the wire; Content-Length written from the body, where it was or last."""
        length = str(len(self.body))
        headers = [(n, length if n == "Content-Length" else v) for n, v in self.headers]
        if not any(n == "Content-Length" for n, _ in headers):
            headers.append(("Content-Length", length))
        lines = [self.start_line()] + [f"{n}: {v}" for n, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def _checked(name: str, value: str) -> tuple[str, str]:
    """A header about to be written: a token name, a value without line breaks (no header injection)."""
    if not _TOKEN.fullmatch(name):
        raise SipError(500, "bad_header", f"header name {_short(name)} is not a token")
    if _CTL.search(value):
        raise SipError(500, "bad_header", f"value of {name} holds a line break or control character")
    return _canon(name), value


# --- parsing ----------------------------------------------------------------------------------------------------


def _head(head: bytes) -> Message:
    """Start line and headers (everything before the blank line) of a message, body empty."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipError(400, "bad_header", f"byte 0x{head[exc.start]:02x} at offset {exc.start} "
                                          "of the headers is not UTF-8") from None
    lines = text.split("\r\n")
    message = _start_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise SipError(400, "bad_header", f"{len(lines) - 1} header lines, more than {MAX_HEADERS}")
    headers: list[list[str]] = []
    for number, line in enumerate(lines[1:], 2):
        if len(line) > MAX_LINE:
            raise SipError(400, "bad_header", f"line {number} is {len(line)} characters long, more than {MAX_LINE}")
        if _CTL.search(line):
            raise SipError(400, "bad_header", f"line {number} holds a control character or a bare CR/LF")
        if line[:1] in (" ", "\t"):
            if not headers:
                raise SipError(400, "bad_header", f"line {number} continues a header but none comes before it")
            headers[-1][1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise SipError(400, "bad_header", f"line {number} has no colon: {_short(line)}")
        name = name.rstrip(" \t")
        if not _TOKEN.fullmatch(name):
            raise SipError(400, "bad_header", f"line {number}: header name {_short(name)} is not a token")
        headers.append([_canon(name), value.strip()])
    message.headers = [(n, v) for n, v in headers]
    return message


def _start_line(line: str) -> Message:
    if len(line) > MAX_LINE:
        raise SipError(400, "bad_start_line", f"the start line is {len(line)} characters long, more than {MAX_LINE}")
    if _CTL.search(line):
        raise SipError(400, "bad_start_line", "the start line holds a control character")
    if line[:4].upper() == "SIP/":
        version, _, rest = line.partition(" ")
        _check_version(version, line)
        code, _, phrase = rest.partition(" ")
        if not (len(code) == 3 and code.isdigit() and 100 <= int(code) <= 699):
            raise SipError(400, "bad_start_line", f"status code {_short(code)} is not a number from 100 to 699")
        return Message(status=int(code), reason_phrase=phrase)
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise SipError(400, "bad_start_line", f"start line {_short(line)} is not 'METHOD URI SIP/2.0'")
    _check_version(parts[2], line)
    _check_request_uri(parts[1])
    return Message(method=parts[0], uri=parts[1])


def _check_version(version: str, line: str) -> None:
    if version.upper() == "SIP/2.0":
        return
    if _VERSION.fullmatch(version):
        raise SipError(505, "bad_version", f"SIP version {version!r} is not spoken, only SIP/2.0")
    raise SipError(400, "bad_start_line", f"start line {_short(line)} is not SIP (no SIP/2.0)")


def _check_request_uri(uri: str) -> None:
    parse_uri(uri)   # 416 for another scheme, 400 bad_uri when unreadable


def _content_length(message: Message) -> int | None:
    values = {v for n, v in message.headers if n == "Content-Length"}
    if not values:
        return None
    if len(values) > 1:
        raise SipError(400, "bad_content_length", f"Content-Length headers disagree: {', '.join(sorted(values))}")
    value = values.pop()
    if not _DIGITS.fullmatch(value):
        raise SipError(400, "bad_content_length", f"Content-Length {_short(value)} is not a non-negative integer")
    return int(value)


def _check(message: Message) -> None:
    """What every message must carry (RFC 3261 8.1.1): Via, From, To, Call-ID, CSeq; a request's CSeq its method."""
    present = {n for n, _ in message.headers}
    for name in REQUIRED:
        if name not in present:
            kind = "request" if message.is_request else "response"
            raise SipError(400, "missing_header", f"the {kind} has no {name} header")
    _, method = message.cseq
    if message.is_request and method != message.method:
        raise SipError(400, "bad_cseq", f"CSeq method {method!r} is not the request's method {message.method!r}")


def parse(data: bytes, *, max_size: int = MAX_SIZE) -> Message:
    """The message in one datagram. SipError: 513 too_large, 505 bad_version, 416 bad_uri, 400 for anything
    else unreadable, status 0 reason keepalive for an empty or CRLF-only datagram (ignore it)."""
    if len(data) > max_size:
        raise SipError(513, "too_large", f"the message is {len(data)} bytes, more than {max_size}")
    data = data.lstrip(b"\r\n")
    if not data:
        raise SipError(0, "keepalive", "a keep-alive: nothing but CRLF")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise SipError(400, "incomplete", "no blank line (CRLF CRLF) ends the headers")
    message = _head(data[:end])
    body = data[end + 4:]
    length = _content_length(message)
    if length is not None and length != len(body):
        if length < len(body) and not body[length:].strip(b"\r\n"):
            body = body[:length]
        else:
            raise SipError(400, "bad_content_length", f"Content-Length says {length} but the body has "
                                                      f"{len(body)} bytes")
    message.body = body
    _check(message)
    return message


class StreamParser:
    """Messages out of a TCP stream, framed by Content-Length (RFC 3261 18.3), CRLF keep-alives skipped.

    `feed()` returns the messages complete so far and keeps the rest. A SipError that loses the framing
    (too large, no or bad Content-Length, unreadable headers) leaves the parser `broken`: every later feed
    raises it again and the caller closes the connection. A SipError in a message whose frame is known
    (a missing Call-ID, say) drops only that message; the caller answers 400 and feeds on. When messages
    came before the error in the same feed, they are returned and the error is raised by the next feed.
    """

    def __init__(self, max_size: int = MAX_SIZE) -> None:
        self.max_size = max_size
        self.broken: SipError | None = None
        self._buffer = bytearray()
        self._scanned = 0                                   # no CRLF CRLF ends before this offset
        self._waiting: tuple[Message, int, int] | None = None   # headers read, body due: (head, body at, end)
        self._pending: SipError | None = None

    def feed(self, data: bytes) -> list[Message]:
        if self.broken:
            raise self.broken
        self._buffer += data
        if self._pending:
            error, self._pending = self._pending, None
            raise error
        out: list[Message] = []
        while True:
            try:
                message = self._next()
            except SipError as exc:
                if not out:
                    raise
                self._pending = exc
                return out
            if message is None:
                return out
            out.append(message)

    def _next(self) -> Message | None:
        if self._waiting is None:
            self._waiting = self._frame()
            if self._waiting is None:
                return None
        message, start, total = self._waiting
        if len(self._buffer) < total:
            return None
        message.body = bytes(self._buffer[start:total])
        del self._buffer[:total]
        self._waiting, self._scanned = None, 0
        _check(message)
        return message

    def _frame(self) -> tuple[Message, int, int] | None:
        """The next message's headers, where its body starts and where it ends; None while its headers are due."""
        buffer = self._buffer
        if buffer.startswith((b"\r", b"\n")):
            del buffer[:len(buffer) - len(buffer.lstrip(b"\r\n"))]
        end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(buffer)
            if len(buffer) > self.max_size:
                raise self._break(SipError(513, "too_large", f"{len(buffer)} bytes of headers without an end, "
                                                             f"more than {self.max_size}"))
            return None
        try:
            message = _head(bytes(buffer[:end]))
            length = _content_length(message)
        except SipError as exc:
            raise self._break(exc) from None
        if length is None:
            raise self._break(SipError(400, "missing_header", "a message on a stream needs a Content-Length header"))
        total = end + 4 + length
        if total > self.max_size:
            raise self._break(SipError(513, "too_large", f"the message is {total} bytes, more than {self.max_size}"))
        return message, end + 4, total

    def _break(self, error: SipError) -> SipError:
        self.broken = error
        return error


# --- building ---------------------------------------------------------------------------------------------------


def new_branch() -> str:
    """A Via branch (RFC 3261 8.1.1.7: the magic cookie, then unique)."""
    return "z9hG4bK" + secrets.token_hex(10)


def new_tag() -> str:
    return secrets.token_hex(8)


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(16)}@{host}"


def request(method: str, uri: str, *, call_id: str, from_: str | NameAddr, to: str | NameAddr, cseq: int,
            via: str | Via, contact: str | NameAddr | None = None, headers: Iterable[tuple[str, str]] = (),
            body: bytes = b"", content_type: str | None = None, max_forwards: int = 70) -> Message:
    """A request with the headers RFC 3261 8.1.1 requires, then `headers`; Content-Length from the body."""
    if not _TOKEN.fullmatch(method):
        raise SipError(500, "bad_start_line", f"method {_short(method)} is not a token")
    _check_request_uri(uri)
    message = Message(method=method, uri=uri)
    for name, value in [("Via", str(via)), ("Max-Forwards", str(max_forwards)), ("From", str(from_)),
                        ("To", str(to)), ("Call-ID", call_id), ("CSeq", f"{cseq} {method}")]:
        message.add(name, value)
    if contact is not None:
        message.add("Contact", str(contact))
    _finish(message, headers, body, content_type)
    return message


def response(req: Message, status: int, reason: str | None = None, *, to_tag: str | None = None,
             headers: Iterable[tuple[str, str]] = (), body: bytes = b"", content_type: str | None = None) -> Message:
    """A response to `req` (RFC 3261 8.2.6): its Via headers, From, To (with ;tag=to_tag added when it has no tag),
    Call-ID and CSeq copied; its Record-Route too in a 101-299 (12.1.1: the response may set up a dialog)."""
    if not 100 <= status <= 699:
        raise ValueError(f"status {status} is not from 100 to 699")
    if reason is None and status not in REASONS:
        raise ValueError(f"no default reason phrase for {status}: pass reason=")
    message = Message(status=status, reason_phrase=REASONS[status] if reason is None else reason)
    copied = ("Via", "From", "To", "Call-ID", "CSeq") + (("Record-Route",) if 100 < status < 300 else ())
    for name, value in req.headers:
        if name in copied:
            if name == "To" and to_tag and parse_name_addr(value).tag is None:
                value += f";tag={to_tag}"
            message.add(name, value)
    _finish(message, headers, body, content_type)
    return message


def _finish(message: Message, headers: Iterable[tuple[str, str]], body: bytes, content_type: str | None) -> None:
    for name, value in headers:
        message.add(name, value)
    if content_type is not None:
        message.set("Content-Type", content_type)
    message.body = body
