"""The box's sources: the config file's [sources], changed by control commands.

`edgeroom ctl source add|remove` does not edit the config file. The hub records the change
in `sources.json` in the state directory, an overlay on the config's [sources]
(services/runtime/state.py). `effective(config)` is what the box runs: the config's sources
minus the removed ones plus the added ones, each validated exactly like a table of the
file. Every reader (the hub, `edgeroom run`, a capture or decode process, `edgeroom sources
sync` under systemd) goes through it, so they all agree on what a source is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from services.capture.sources import SourceConfig
from services.runtime import config as configuration
from services.runtime.state import Overlay, state_dir

__all__ = ["FILE", "effective", "from_dict", "lookup", "overlay", "overlay_path"]

FILE = "sources.json"


def overlay_path(config: Any) -> Path:
    return state_dir(config) / FILE


def overlay(config: Any) -> Overlay:
    return Overlay.read(overlay_path(config))


def from_dict(name: str, table: Any, origin: str = "command") -> SourceConfig:
    """One [sources.NAME] table (what `edgeroom ctl source add` sends), validated exactly as in the file."""
    return configuration.entry_from_dict("sources", name, table, origin)


def effective(config: Any, added: Overlay | None = None) -> dict[str, SourceConfig]:
    """Every source of the box by name: the config's, less the removed, plus the added."""
    added = overlay(config) if added is None else added
    return added.apply(config.sources, lambda name, table: from_dict(name, table, str(added.path)))


def lookup(config: Any, name: str) -> SourceConfig:
    """The source `name`, or ValueError saying which sources exist."""
    sources = effective(config)
    if name not in sources:
        raise ValueError(f"no source {name!r} in the config or added by command "
                         f"(sources: {', '.join(sources) or 'none'})")
    return sources[name]
