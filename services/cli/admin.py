"""`edgeroom run`, `service`, `config check`, `keys` and `demo`: running and preparing a box."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services import catalog
from services.cli import boxconfig, demo

__all__ = ["add_parsers"]


def cmd_run(args: argparse.Namespace) -> int:
    from services.supervisor.supervisor import Supervisor

    box = boxconfig.of(args)
    return Supervisor(box.config, box.path, args.seconds).run()


def cmd_service(args: argparse.Namespace) -> int:
    from services.runtime.service import main

    try:
        cls = catalog.load_class(args.kind)
    except ImportError as exc:  # an extra is missing: restarting cannot help; 78 keeps systemd from trying
        print(f"edgeroom {args.kind}: cannot run: {exc}: this service needs an extra that is not installed "
              "(pip install 'edgeroom[media]', or scripts/install.sh --extras media)", file=sys.stderr)
        return 78
    if catalog.spec(args.kind).templated and not args.instance:
        raise ValueError(f"service {args.kind} runs one process per instance: give its name "
                         f"(edgeroom service {args.kind} NAME)")
    return main(cls, args.instance, boxconfig.of(args).path)  # the service reads it: a bad one exits 78


def cmd_config_check(args: argparse.Namespace) -> int:
    box = boxconfig.Box(args.file)
    path, cfg = box.path, box.config
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    units = [f"{k}@{i}" if i else k for k, i in catalog.instances(cfg)]
    print(f"ok: {path or 'embedded default'}: {len(cfg.sources)} source(s); runs {', '.join(units)}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from services.control import keys

    if args.keys_command == "token":
        return _cmd_token(args)

    where = args.dir or boxconfig.of(args).config.control.curve_dir
    if not where:
        raise ValueError("no key directory: give --dir, or set control.curve_dir in the box's config")
    curve_dir = Path(where)
    if args.keys_command == "init":
        public = keys.init_server(curve_dir, force=args.force)
        print(f"hub key pair in {curve_dir}; give clients {public} (its public key)")
    else:
        public, secret = keys.add_client(curve_dir, args.name)
        print(f"client {args.name}: {secret} (keep secret) and {public}; authorized in {curve_dir / 'authorized'}")
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from services.control import tokens
    from services.runtime.state import state_dir

    path = Path(args.file) if args.file else state_dir(boxconfig.of(args).config) / tokens.FILE
    if args.token_command == "add":
        token = tokens.add_token(path, args.name)
        print(f"token {args.name} (shown once; {path} keeps only its SHA-256):\n{token}")
    elif args.token_command == "remove":
        if not tokens.remove_token(path, args.name):
            print(f"no token {args.name} in {path}", file=sys.stderr)
            return 1
        print(f"token {args.name} removed from {path}")
    else:
        names = tokens.list_tokens(path)
        print("\n".join(names) if names else f"no tokens in {path}")
    return 0


def cmd_units_render(args: argparse.Namespace) -> int:
    from services import units

    rendered = units.render(boxconfig.of(args).config, args.exec)
    if args.out is None:
        for unit in rendered:
            print(f"# --- {unit.name}\n{unit.text}")
        return 0
    for path in units.write(rendered, Path(args.out)):
        print(f"wrote {path}")
    return 0


def cmd_units_check(args: argparse.Namespace) -> int:
    from services import units

    results = units.check(Path(args.dir), root=args.root, limit=args.max_exposure)
    for r in results:
        print(f"{r.name:34} exposure {r.exposure:.1f}  {'ok' if r.ok else 'FAIL: ' + r.problem}")
    return 0 if results and all(r.ok for r in results) else 1


def cmd_sources_sync(args: argparse.Namespace) -> int:
    from services.runtime import logs
    from services.supervisor import systemd_sync
    logs.setup("sources", "info", "text")
    start, stop = systemd_sync.sync(boxconfig.of(args).config, dry_run=args.dry_run)
    print(f"sources: started {', '.join(start) or 'nothing'}; stopped {', '.join(stop) or 'nothing'}"
          + (" (dry run)" if args.dry_run else ""))
    return 0


def add_parsers(sub) -> None:
    run = sub.add_parser("run", help="run the box's services as child processes (development, demo)")
    boxconfig.add_config_option(run)
    run.add_argument("--seconds", type=float, help="stop everything after this many seconds")
    run.set_defaults(func=cmd_run)

    svc = sub.add_parser("service", help="run one service in the foreground (what systemd units start)")
    svc.add_argument("kind", choices=sorted(catalog.specs()))
    svc.add_argument("instance", nargs="?", help="instance name for templated services (capture NAME)")
    boxconfig.add_config_option(svc)
    svc.set_defaults(func=cmd_service)

    cfg = sub.add_parser("config", help="the box's configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file; errors name the key and the reason")
    check.add_argument("file", nargs="?", help="default $EDGEROOM_CONFIG, else /etc/edgeroom/edgeroom.toml when it "
                                               "exists, else the embedded default")
    check.add_argument("--json", action="store_true", help="print the effective config as JSON")
    check.set_defaults(func=cmd_config_check)

    keys = sub.add_parser("keys", help="CURVE keys for TCP control endpoints")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="make the hub's key pair")
    init.add_argument("--dir", help="where the keys are (default: control.curve_dir of the box's config)")
    boxconfig.add_config_option(init)
    init.add_argument("--force", action="store_true", help="replace an existing hub key (clients must update)")
    init.set_defaults(func=cmd_keys)
    add = keys_sub.add_parser("add", help="make a client key pair and authorize it")
    add.add_argument("name")
    add.add_argument("--dir", help="where the keys are (default: control.curve_dir of the box's config)")
    boxconfig.add_config_option(add)
    add.set_defaults(func=cmd_keys)
    token = keys_sub.add_parser("token", help="bearer tokens for the box's HTTP endpoints (WebRTC, web page, MCP)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    for verb, text in (("add", "make a token for NAME (printed once) and keep its digest"),
                       ("remove", "remove NAME's token"), ("list", "the names that have a token")):
        p = token_sub.add_parser(verb, help=text)
        if verb != "list":
            p.add_argument("name")
        p.add_argument("--file", help="the token file (default: http-tokens in the box's state directory)")
        boxconfig.add_config_option(p)
        p.set_defaults(func=cmd_keys)

    units = sub.add_parser("units", help="systemd units for the box, from the catalog and the config")
    units_sub = units.add_subparsers(dest="units_command", required=True)
    render = units_sub.add_parser("render", help="write edgeroom.target and one unit per service")
    boxconfig.add_config_option(render)
    render.add_argument("--exec", default="/opt/edgeroom/venv/bin/edgeroom",
                        help="the edgeroom executable the units start (default /opt/edgeroom/venv/bin/edgeroom)")
    render.add_argument("--out", help="directory to write into (default: print them)")
    render.set_defaults(func=cmd_units_render)
    check = units_sub.add_parser("check", help="systemd-analyze verify and security on every unit in DIR")
    check.add_argument("dir")
    check.add_argument("--root", help="verify against this filesystem root (where the units' ExecStart lives)")
    check.add_argument("--max-exposure", type=float, default=2.0, help="highest exposure accepted (default 2.0)")
    check.set_defaults(func=cmd_units_check)

    srcs = sub.add_parser("sources", help="under systemd: start and stop instance units to match the sources")
    srcs_sub = srcs.add_subparsers(dest="sources_command", required=True)
    sync = srcs_sub.add_parser("sync", help="start the capture/decode units of added sources, stop removed ones "
                                            "(edgeroom-sources.service runs it)")
    boxconfig.add_config_option(sync)
    sync.add_argument("--dry-run", action="store_true", help="say what would be started and stopped")
    sync.set_defaults(func=cmd_sources_sync)
    demo.add_parser(sub)  # `edgeroom demo`: the embedded default, live

