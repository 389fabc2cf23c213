"""CURVE keys for TCP control endpoints, and the hub's ZAP authenticator.

Layout of `control.curve_dir` (ZeroMQ certificate files, readable by czmq's zcert too):

    server.key, server.key_secret         the hub's key pair (`edgeroom keys init`)
    authorized/NAME.key                   public keys of clients the hub accepts
    clients/NAME.key, NAME.key_secret     pairs made by `edgeroom keys add NAME`, to hand out

IPC endpoints use no CURVE: the runtime directory's permissions guard them.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth

__all__ = ["init_server", "add_client", "load_server", "authorized_keys", "ZapAuthenticator", "ZAP_ENDPOINT"]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def _secret_pair(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def init_server(curve_dir: Path, force: bool = False) -> Path:
    """The hub's key pair; refuses to replace one unless forced (clients hold its public key)."""
    if (curve_dir / "server.key_secret").exists() and not force:
        raise FileExistsError(f"{curve_dir / 'server.key_secret'} exists: clients trust it; pass --force to replace")
    (curve_dir / "authorized").mkdir(mode=0o750, parents=True, exist_ok=True)
    return _secret_pair(curve_dir, "server")[0]


def add_client(curve_dir: Path, name: str) -> tuple[Path, Path]:
    """A client key pair under clients/, its public half authorized."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"client name {name!r} must be letters, digits, '-' or '_'")
    public, secret = _secret_pair(curve_dir / "clients", name)
    (curve_dir / "authorized").mkdir(mode=0o750, parents=True, exist_ok=True)
    shutil.copyfile(public, curve_dir / "authorized" / f"{name}.key")
    return public, secret


def load_server(curve_dir: Path) -> tuple[bytes, bytes]:
    path = curve_dir / "server.key_secret"
    if not path.exists():
        raise FileNotFoundError(f"no hub key at {path}: run `edgeroom keys init --dir {curve_dir}`")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:  # a public key file under the secret one's name: say so, not a TypeError at bind
        raise ValueError(f"{path} holds no secret key: restore the hub's key pair, or make a new one with "
                         f"`edgeroom keys init --force --dir {curve_dir}` (clients then need the new server.key)")
    return public, secret


def authorized_keys(curve_dir: Path) -> dict[bytes, str]:
    """Public key (Z85) -> client name, from authorized/*.key."""
    keys = {}
    for path in sorted((curve_dir / "authorized").glob("*.key")):
        public, _ = zmq.auth.load_certificate(str(path))
        keys[public] = path.stem
    return keys


class ZapAuthenticator:
    """ZAP (RFC 27) handler run on the hub's own loop: CURVE clients must be authorized.

    Run on the loop rather than pyzmq's ThreadAuthenticator so a refusal is counted and
    logged by the owner of the hub's state, and so the key list reloads on SIGHUP.
    """

    def __init__(self, ctx: zmq.SyncContext, curve_dir: Path,
                 on_refused: Callable[[str, str, str], None]) -> None:
        self.curve_dir, self.on_refused = curve_dir, on_refused
        self.keys = authorized_keys(curve_dir)
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)

    def reload(self) -> None:
        self.keys = authorized_keys(self.curve_dir)

    def close(self) -> None:
        self.sock.close(linger=0)

    def handle(self) -> None:
        frames = self.sock.recv_multipart()
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        user, status, text = "", b"400", b"unknown mechanism"
        if mechanism == b"NULL":
            user, status, text = "local", b"200", b"OK"
        elif mechanism == b"CURVE" and credentials:
            name = self.keys.get(zmq.utils.z85.encode(credentials[0]))
            if name is not None:
                user, status, text = name, b"200", b"OK"
            else:
                text = b"client key not authorized"
        if status != b"200":
            self.on_refused(address.decode(errors="replace"), mechanism.decode(errors="replace"), text.decode())
        self.sock.send_multipart([version, request_id, status, text, user.encode(), b""])
