"""What every `edgeroom ctl` command shares: its options, where the hub is, a client, the printed reply.

    add_common(parser)            --config --runtime-dir --endpoint --events-endpoint --server-key
                                  --client-key --timeout --json
    with client(args) as c:       a control client to the box's hub (services/cli/boxconfig.py finds it)
        return show(args, c.call("status"), tables.status_table)

ctl.py, ctl_media.py and ctl_vision.py import this module; none of them imports another's helpers.
"""
from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Callable
from typing import Any

from services.cli import boxconfig
from services.control.client import Client, CurveKeys
from services.runtime import config as configuration

__all__ = ["add_common", "endpoints", "curve", "client", "show", "parse_pairs"]


def endpoints(args: argparse.Namespace) -> tuple[str, str]:
    """(control, events) endpoints of the hub; settles args.timeout (control.request_timeout unless given).
    With --endpoint and --timeout both given, the local config is not read."""
    box = boxconfig.of(args)
    if args.timeout is None:
        args.timeout = box.config.control.request_timeout
    if args.endpoint:
        return args.endpoint, args.events_endpoint or ""
    ep = box.endpoints
    return ep.control, args.events_endpoint or ep.events


def curve(args: argparse.Namespace) -> CurveKeys | None:
    if not (args.server_key or args.client_key):
        return None
    if not (args.server_key and args.client_key):
        raise configuration.ConfigError("--server-key and --client-key go together")
    return CurveKeys.from_files(args.server_key, args.client_key)


def client(args: argparse.Namespace) -> Client:
    control, _ = endpoints(args)
    return Client(control, timeout=args.timeout, curve=curve(args))  # endpoints() settled the timeout


def show(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> int:
    """Print a reply: as JSON with --json, else as `human(result)` renders it."""
    print(json.dumps(result, indent=2) if args.json else human(result))
    return 0


def parse_pairs(pairs: list[str], text_keys: set[str]) -> dict:
    """KEY=VALUE pairs -> a config table: text keys (url, path, device, ...) keep the text as
    typed (device=0 is the string "0"); other values are read as TOML (640, 2.5, true)."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        out[key] = parsed if key not in text_keys or isinstance(parsed, str) else value
    return out


def add_common(p: argparse.ArgumentParser) -> None:
    boxconfig.add_config_option(p)
    p.add_argument("--runtime-dir", help="where the hub's sockets are (default: from the config)")
    p.add_argument("--endpoint", help="control endpoint, e.g. tcp://box:9751 (default: the IPC socket)")
    p.add_argument("--events-endpoint", help="events endpoint, e.g. tcp://box:9752")
    p.add_argument("--server-key", help="the hub's public key file (TCP with CURVE)")
    p.add_argument("--client-key", help="this client's .key_secret file (TCP with CURVE)")
    p.add_argument("--timeout", type=float, help="seconds to wait for the hub (default control.request_timeout, 2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
