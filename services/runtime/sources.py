"""The box's sources: the config file's, changed by control commands.

`edgeroom ctl source add|remove` does not edit the config file (an admin's file is never
rewritten by the box). The hub records the change in `sources.json` in the state
directory ($STATE_DIRECTORY under systemd, /var/lib/edgeroom; the runtime directory
otherwise), as an overlay on the config's [sources]:

    {"version": 1, "added": {"cam2": {"kind": "url", "url": "rtsp://..."}}, "removed": ["synthetic"]}

`effective(config)` is the config's sources minus the removed ones plus the added ones,
each validated exactly like a table of the file. Every reader (the hub, `edgeroom run`,
a capture or decode process, `edgeroom sources sync` under systemd) goes through it, so
they all agree on what a source is. The file is replaced atomically (write, fsync, rename).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from services.control.endpoints import runtime_dir
from services.runtime import config as configuration

__all__ = ["Overlay", "effective", "lookup", "overlay_path", "state_dir"]

log = logging.getLogger("edgeroom.sources")

FILE = "sources.json"


def state_dir(config: configuration.Config, env: dict | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    return runtime_dir(config.box.runtime_dir, env)


def overlay_path(config: configuration.Config) -> Path:
    return state_dir(config) / FILE


class Overlay:
    """The added and removed entries of a config table, as read from (and written to) its
    overlay file: sources.json here, pipelines.json for the vision service's pipelines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.added: dict[str, dict] = {}
        self.removed: list[str] = []
        self.problem = ""  # why the file could not be read, if it could not

    @classmethod
    def read(cls, path: Path) -> Overlay:
        self = cls(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return self
        except (OSError, ValueError) as exc:
            self.problem = f"{path}: unreadable ({exc}); using the config's {path.stem} only"
            return self
        if not isinstance(doc, dict) or not isinstance(doc.get("added", {}), dict) \
                or not isinstance(doc.get("removed", []), list):
            self.problem = f"{path}: not a {path.stem} overlay; using the config's {path.stem} only"
            return self
        self.added = {str(k): v for k, v in doc.get("added", {}).items()}
        self.removed = [str(n) for n in doc.get("removed", [])]
        return self

    def write(self) -> None:
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        body = json.dumps({"version": 1, "added": self.added, "removed": sorted(set(self.removed))},
                          indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o640)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def effective(config: configuration.Config, overlay: Overlay | None = None) -> dict[str, configuration.SourceConfig]:
    """Every source of the box by name: the config's, less the removed, plus the added."""
    overlay = Overlay.read(overlay_path(config)) if overlay is None else overlay
    if overlay.problem:
        log.warning("%s", overlay.problem)
    out = {name: src for name, src in config.sources.items() if name not in overlay.removed}
    for name, table in overlay.added.items():
        try:
            out[name] = configuration.source_from_dict(name, table, str(overlay.path))
        except configuration.ConfigError as exc:
            log.warning("ignoring an added source: %s", exc)
    return dict(sorted(out.items()))


def lookup(config: configuration.Config, name: str) -> configuration.SourceConfig:
    """The source `name`, or ValueError saying which sources exist."""
    sources = effective(config)
    if name not in sources:
        raise ValueError(f"no source {name!r} in the config or added by command "
                         f"(sources: {', '.join(sources) or 'none'})")
    return sources[name]
