"""HTTP digest authentication as SIP uses it (RFC 3261 22, RFC 2617, RFC 7616, RFC 8760): both sides.

Server side, `Challenger` writes the WWW-Authenticate values of a 401 (one per algorithm, SHA-256
first, as RFC 8760 asks) and checks the Authorization of the retried request. Its nonces need no
table to be checked: each is base64 of (issue time, 12 random bytes, HMAC-SHA256 of both under a
secret), so a nonce the box did not issue fails the HMAC (bad_nonce, as does another box's opaque)
and one older than nonce_ttl is stale (the caller challenges again with stale=true, and the peer
retries without asking its user). Replays are caught by a bounded memory of the nonces used: with
qop=auth each request must bring a larger nc; without qop (RFC 2069, which baresip and SIPp may
still send) a nonce is good for one request. The memory keeps at most `max_nonces`; a nonce
forgotten to make room counts as stale from then on, never as fresh.

Client side, `pick()` chooses the strongest challenge of a 401/407 and `answer()` writes the
Authorization (or Proxy-Authorization) value for it.

MD5 and SHA-256 only. The -sess variants are refused (bad_header here, ValueError in `answer`):
their HA1 depends on the client's first cnonce, which a stateless server cannot know, and no SIP
peer the box meets sends them. qop=auth-int is refused too (it hashes the body; nobody uses it).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Challenger", "Verdict", "answer", "parse_params", "pick"]

HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
STRENGTH = ("SHA-256", "MD5")          # strongest first
REASONS = ("ok", "no_credentials", "bad_header", "unknown_user", "bad_nonce", "stale_nonce", "replayed_nonce",
           "wrong_digest")
_NONCE = struct.Struct(">d12s")        # issue time, random
_MAC_SIZE = 16
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_VALUE = re.compile(r"[^\s,\"]+")
_SPACE = re.compile(r"\s*")
_NC = re.compile(r"[0-9a-fA-F]{8}")


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """'Digest realm="a, b", nonce=x' -> ('Digest', {'realm': 'a, b', 'nonce': 'x'}): names lower case, quoted
    strings unquoted (backslash escapes undone). ValueError saying where it went wrong."""
    m = _TOKEN.match(value.lstrip())
    if not m:
        raise ValueError(f"authentication header {value[:40]!r} does not start with a scheme")
    scheme, rest = m.group(), value.lstrip()[m.end():]
    params: dict[str, str] = {}
    pos = _skip(rest, 0)
    while pos < len(rest):
        name = _TOKEN.match(rest, pos)
        if not name:
            raise ValueError(f"expected a parameter name at {rest[pos:pos + 20]!r}")
        pos = _skip(rest, name.end())
        if rest[pos:pos + 1] != "=":
            raise ValueError(f"parameter {name.group()!r} has no '='")
        pos = _skip(rest, pos + 1)
        quoted = _QUOTED.match(rest, pos)
        found = quoted or _VALUE.match(rest, pos)
        if not found:
            raise ValueError(f"parameter {name.group()!r} has no value (or an unclosed quote)")
        text = re.sub(r"\\(.)", r"\1", found.group(1), flags=re.DOTALL) if quoted else found.group()
        key = name.group().lower()
        if key in params:
            raise ValueError(f"parameter {key!r} is given twice")
        params[key] = text
        pos = _skip(rest, found.end())
        if pos < len(rest):
            if rest[pos] != ",":
                raise ValueError(f"expected ',' after parameter {key!r}, got {rest[pos:pos + 20]!r}")
            pos = _skip(rest, pos + 1)
    return scheme, params


def _skip(text: str, pos: int) -> int:
    """`pos` moved past white space."""
    m = _SPACE.match(text, pos)
    return m.end() if m else pos


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _h(algorithm: str, text: str) -> str:
    return HASHES[algorithm](text.encode()).hexdigest()


def _response(algorithm: str, *, user: str, realm: str, password: str, method: str, uri: str, nonce: str,
              qop: str | None, nc: str = "", cnonce: str = "") -> str:
    """The digest's `response` (RFC 7616 3.4.1; RFC 2069 when qop is None)."""
    ha1 = _h(algorithm, f"{user}:{realm}:{password}")
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop is None:
        return _h(algorithm, f"{ha1}:{nonce}:{ha2}")
    return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def _usable(params: dict[str, str]) -> str:
    """Why a challenge's parameters cannot be answered, "" when they can."""
    algorithm = params.get("algorithm", "MD5").upper()
    if algorithm not in HASHES:
        return f"algorithm {algorithm} is not spoken (MD5, SHA-256; no -sess variants)"
    if "realm" not in params or "nonce" not in params:
        return "the challenge lacks realm or nonce"
    if "qop" in params and "auth" not in _qops(params["qop"]):
        return f"qop {params['qop']!r} offers no 'auth'"
    return ""


def _qops(text: str) -> list[str]:
    return [q.strip().lower() for q in text.split(",") if q.strip()]


# --- client -----------------------------------------------------------------------------------------------------


def answer(challenge: str, *, method: str, uri: str, user: str, password: str, nc: int = 1,
           cnonce: str | None = None) -> str:
    """The Authorization (or Proxy-Authorization) value answering one WWW-Authenticate (Proxy-Authenticate)
    value: qop=auth when offered, the challenge's algorithm, its opaque echoed. ValueError when it cannot."""
    scheme, params = parse_params(challenge)
    if scheme.lower() != "digest":
        raise ValueError(f"challenge scheme {scheme!r} is not Digest")
    why = _usable(params)
    if why:
        raise ValueError(f"cannot answer the challenge: {why}")
    algorithm = params.get("algorithm", "MD5").upper()
    realm, nonce = params["realm"], params["nonce"]
    fields = [f"username={_quote(user)}", f"realm={_quote(realm)}", f"uri={_quote(uri)}"]
    if "algorithm" in params:
        fields.append(f"algorithm={algorithm}")
    fields.append(f"nonce={_quote(nonce)}")
    if "qop" in params:
        nc_text, cnonce = f"{nc:08x}", cnonce or secrets.token_hex(16)
        digest = _response(algorithm, user=user, realm=realm, password=password, method=method, uri=uri,
                           nonce=nonce, qop="auth", nc=nc_text, cnonce=cnonce)
        fields += [f"nc={nc_text}", f"cnonce={_quote(cnonce)}", "qop=auth"]
    else:
        digest = _response(algorithm, user=user, realm=realm, password=password, method=method, uri=uri,
                           nonce=nonce, qop=None)
    fields.append(f'response="{digest}"')
    if "opaque" in params:
        fields.append(f"opaque={_quote(params['opaque'])}")
    return "Digest " + ", ".join(fields)


def pick(challenges: list[str]) -> str:
    """The strongest Digest challenge among `challenges` (SHA-256 over MD5; unreadable ones and unknown algorithms
    skipped). ValueError naming what was offered when none can be answered."""
    best: tuple[int, str] | None = None
    offered = []
    for value in challenges:
        try:
            scheme, params = parse_params(value)
        except ValueError:
            offered.append("an unreadable challenge")
            continue
        algorithm = params.get("algorithm", "MD5").upper()
        offered.append(f"{scheme} {algorithm}" + (f" qop={params['qop']}" if "qop" in params else ""))
        if scheme.lower() != "digest" or _usable(params):
            continue
        rank = STRENGTH.index(algorithm)
        if best is None or rank < best[0]:
            best = (rank, value)
    if best is None:
        raise ValueError(f"no usable digest challenge among: {', '.join(offered) or 'none'}")
    return best[1]


# --- server -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    user: str | None        # the user the credentials name, once they could be read
    reason: str             # one of REASONS


class Challenger:
    """Challenges and checks digest credentials for one realm; one owner (not thread-safe)."""

    def __init__(self, realm: str, users: Mapping[str, str], *, algorithms: tuple[str, ...] = ("SHA-256", "MD5"),
                 nonce_ttl: float = 300.0, secret: bytes | None = None, clock: Callable[[], float] = time.monotonic,
                 max_nonces: int = 4096) -> None:
        unknown = [a for a in algorithms if a not in HASHES]
        if unknown or not algorithms:
            raise ValueError(f"digest algorithms must be among MD5, SHA-256; got {', '.join(algorithms) or 'none'}")
        self.realm = realm
        self.users = users
        self.algorithms = tuple(dict.fromkeys(algorithms))    # the order given: the order a 401 offers them
        self.nonce_ttl = nonce_ttl
        self.max_nonces = max_nonces
        self._secret = secret if secret is not None else os.urandom(32)
        self._clock = clock
        self.opaque = hmac.new(self._secret, b"opaque", hashlib.sha256).hexdigest()[:16]
        # nonce -> (issue time, last nc or None when used without qop), in order of first use
        self._used: OrderedDict[str, tuple[float, int | None]] = OrderedDict()
        self._forgotten_until = float("-inf")                        # latest issue time of a forgotten nonce

    def _nonce(self) -> str:
        payload = _NONCE.pack(self._clock(), os.urandom(12))
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_SIZE]
        return base64.urlsafe_b64encode(payload + mac).decode()

    def _issued(self, nonce: str) -> float | None:
        """When the box issued `nonce`; None when it did not."""
        try:
            raw = base64.urlsafe_b64decode(nonce.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return None
        if len(raw) != _NONCE.size + _MAC_SIZE or base64.urlsafe_b64encode(raw).decode() != nonce:
            return None     # the second test: b64decode skips stray characters, a nonce has one spelling
        payload, mac = raw[:_NONCE.size], raw[_NONCE.size:]
        if not hmac.compare_digest(mac, hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_SIZE]):
            return None
        issued: float = _NONCE.unpack(payload)[0]
        return issued

    def challenge(self, stale: bool = False) -> list[str]:
        """The WWW-Authenticate (or Proxy-Authenticate) values of a 401 (407): one per algorithm, in the order
        given (the default: SHA-256 first, RFC 8760)."""
        nonce = self._nonce()
        return [f"Digest realm={_quote(self.realm)}, nonce=\"{nonce}\", algorithm={algorithm}, qop=\"auth\", "
                f"opaque=\"{self.opaque}\"" + (", stale=true" if stale else "") for algorithm in self.algorithms]

    def verify(self, method: str, header: str | None, *, uri: str | None = None) -> Verdict:
        """Whether the Authorization value `header` proves its user for `method` (and the request `uri`, when
        given: the credentials' uri must be it)."""
        if header is None:
            return Verdict(False, None, "no_credentials")
        try:
            scheme, params = parse_params(header)
        except ValueError:
            return Verdict(False, None, "bad_header")
        if scheme.lower() != "digest" or self._malformed(params, uri):
            return Verdict(False, params.get("username"), "bad_header")
        user, nonce = params["username"], params["nonce"]
        issued = self._issued(nonce)
        if issued is None or params.get("opaque", self.opaque) != self.opaque:
            return Verdict(False, user, "bad_nonce")
        now = self._clock()
        if not 0 <= now - issued <= self.nonce_ttl or (nonce not in self._used and issued <= self._forgotten_until):
            return Verdict(False, user, "stale_nonce")
        password = self.users.get(user)
        if password is None:
            return Verdict(False, user, "unknown_user")
        qop = params.get("qop")
        expected = _response(params.get("algorithm", "MD5").upper(), user=user, realm=self.realm, password=password,
                             method=method, uri=params["uri"], nonce=nonce, qop=qop, nc=params.get("nc", ""),
                             cnonce=params.get("cnonce", ""))
        if not hmac.compare_digest(expected.encode(), params["response"].lower().encode()):
            return Verdict(False, user, "wrong_digest")
        nc = int(params["nc"], 16) if qop else None
        if not self._remember(nonce, issued, nc):
            return Verdict(False, user, "replayed_nonce")
        return Verdict(True, user, "ok")

    def _malformed(self, params: dict[str, str], uri: str | None) -> bool:
        if any(k not in params for k in ("username", "realm", "nonce", "uri", "response")):
            return True
        if params.get("algorithm", "MD5").upper() not in self.algorithms or params["realm"] != self.realm:
            return True
        if uri is not None and params["uri"] != uri:
            return True
        if "qop" in params:
            return params["qop"].lower() != "auth" or not _NC.fullmatch(params.get("nc", "")) or not params.get(
                "cnonce")
        return False

    def _remember(self, nonce: str, issued: float, nc: int | None) -> bool:
        """Record a use of `nonce` (nc None: without qop); False when it is a replay."""
        if nonce in self._used:
            last = self._used[nonce][1]
            if nc is None or last is None or nc <= last:
                return False
            self._used[nonce] = (issued, nc)
            return True
        self._used[nonce] = (issued, nc)
        horizon = self._clock() - self.nonce_ttl
        while self._used and next(iter(self._used.values()))[0] < horizon:
            self._used.popitem(last=False)      # expired: stale by its age, nothing to keep
        while len(self._used) > self.max_nonces:
            _, (old, _) = self._used.popitem(last=False)
            self._forgotten_until = max(self._forgotten_until, old)
        return True
