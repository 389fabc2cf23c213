"""Bearer tokens for the box's HTTP endpoints (WebRTC, WebSocket, the web page's API, MCP over HTTP).

Two places hold tokens, and a request is let in when its token matches either:

* the config, `tokens = "NAME:TOKEN, ..."` of the service's table (plain text: a box whose
  config file is readable by the service user only);
* the token file of the state directory, `http-tokens` (`edgeroom keys token add NAME`):
  one `NAME SHA256-HEX` line per token, so the file never holds a token itself. The
  token is printed once when it is made.

A presented token is compared with every known one in constant time (`hmac.compare_digest`
over SHA-256 digests): how long a refusal takes says nothing about how close a guess was.
The file is read again when its modification time changes, so `keys token add|remove`
takes effect without a restart.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

__all__ = ["TokenBook", "add_token", "list_tokens", "parse_tokens", "remove_token", "FILE"]

FILE = "http-tokens"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str) -> dict[str, str]:
    """'ops:abc, viewer:def' -> {name: token}; ValueError naming a bad entry (never the token)."""
    tokens = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, token = entry.partition(":")
        name = name.strip()
        if not sep or not _NAME.match(name) or len(token.strip()) < 16:
            raise ValueError(f"a token is 'NAME:TOKEN' with a token of 16 characters or more, got {name!r}:...")
        tokens[name] = token.strip()
    return tokens


class TokenBook:
    """Who a presented token belongs to."""

    def __init__(self, inline: dict[str, str], path: Path | None = None) -> None:
        self.inline = {name: _digest(token) for name, token in inline.items()}
        self.path = path
        self._mtime: float | None = None
        self._file: dict[str, bytes] = {}

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            self._file, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        self._file, self._mtime = _read(self.path), mtime

    def __len__(self) -> int:
        self._load()
        return len(self.inline) + len(self._file)

    def check(self, presented: str) -> str | None:
        """The name of the token, or None. Every known digest is compared (constant time per entry)."""
        if not presented:
            return None
        self._load()
        digest = _digest(presented)
        found = None
        for name, known in (*self.inline.items(), *self._file.items()):
            if hmac.compare_digest(digest, known) and found is None:
                found = name
        return found


def _read(path: Path) -> dict[str, bytes]:
    entries = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and _NAME.match(parts[0]) and re.fullmatch(r"[0-9a-f]{64}", parts[1]):
            entries[parts[0]] = bytes.fromhex(parts[1])
    return entries


def _write(path: Path, entries: dict[str, bytes]) -> None:
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write("# edgeroom HTTP bearer tokens: NAME SHA256(token); made by `edgeroom keys token add NAME`\n")
        for name, digest in sorted(entries.items()):
            f.write(f"{name} {digest.hex()}\n")
    os.replace(tmp, path)


def add_token(path: Path, name: str) -> str:
    """A new token for `name` (replacing its old one), stored as its digest; the token itself is returned once."""
    if not _NAME.match(name):
        raise ValueError(f"a token name is letters, digits and _.@- (1-64), got {name!r}")
    token = secrets.token_urlsafe(32)
    entries = _read(path)
    entries[name] = _digest(token)
    _write(path, entries)
    return token


def remove_token(path: Path, name: str) -> bool:
    entries = _read(path)
    if name not in entries:
        return False
    del entries[name]
    _write(path, entries)
    return True


def list_tokens(path: Path) -> list[str]:
    return sorted(_read(path))
