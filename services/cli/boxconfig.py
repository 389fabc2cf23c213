"""The box a command is about: its config, runtime directory and bus prefix, found the same
way by every `edgeroom` command (ctl, bus, run, service, config, keys, units, sources).

    box = boxconfig.of(args)      # args.config, args.runtime_dir, args.prefix when the command has them
    box.config, box.path, box.rundir, box.prefix

Each value, first found wins:

1. the command's own flag for that one value: `--runtime-dir` (ctl), `--prefix` (bus),
   `--dir` (keys);
2. the config: `--config FILE`, else `$EDGEROOM_CONFIG`, else /etc/edgeroom/edgeroom.toml
   when it exists, else the embedded defaults; `EDGEROOM_SECTION__KEY` variables over it
   (services/runtime/config.py: `box.runtime_dir`, `bus.prefix`, `control.curve_dir`);
3. for the runtime directory when `box.runtime_dir` is '': `$RUNTIME_DIRECTORY`,
   `$XDG_RUNTIME_DIR/edgeroom`, `/tmp/edgeroom-UID` (services/control/endpoints.py).

The config is read once, and only when a value needs it: `ctl --endpoint tcp://... --timeout 2`
reaches a remote hub without reading (or failing on) this machine's config.
"""
from __future__ import annotations

import argparse
import os
from functools import cached_property
from pathlib import Path

from services.control.endpoints import Endpoints, endpoints_for, runtime_dir
from services.runtime import config as configuration

__all__ = ["Box", "of", "add_config_option", "CONFIG_HELP"]

CONFIG_HELP = ("the box's config file (default $EDGEROOM_CONFIG, else /etc/edgeroom/edgeroom.toml when it exists, "
               "else the embedded default)")


class Box:
    def __init__(self, config_file: str | os.PathLike | None = None, runtime_dir: str | None = None,
                 prefix: str | None = None) -> None:
        self._file, self._runtime_dir, self._prefix = config_file, runtime_dir, prefix

    @cached_property
    def path(self) -> str | None:
        """The config file this box's config comes from; None for the embedded defaults."""
        return os.fsdecode(self._file) if self._file else configuration.config_path()

    @cached_property
    def config(self) -> configuration.Config:
        return configuration.load(self.path)

    @property
    def rundir(self) -> Path:
        return runtime_dir(self._runtime_dir or self.config.box.runtime_dir)

    @property
    def endpoints(self) -> Endpoints:
        return endpoints_for(self.rundir)

    @property
    def prefix(self) -> str:
        return self._prefix or self.config.bus.prefix


def of(args: argparse.Namespace) -> Box:
    """The box of a parsed command line: its --config, and --runtime-dir or --prefix where it has them."""
    return Box(getattr(args, "config", None), getattr(args, "runtime_dir", None), getattr(args, "prefix", None))


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=CONFIG_HELP)
