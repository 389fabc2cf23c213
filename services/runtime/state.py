"""The box's state directory, and overlays: what commands changed in a table of the config.

The box never rewrites the admin's config file. A command that adds or removes an entry
of a config table (`ctl source add`, `ctl pipeline set`, `ctl record start`) writes an
*overlay* in the state directory ($STATE_DIRECTORY under systemd, /var/lib/edgeroom; the
runtime directory otherwise):

    {"version": 1, "added": {"cam2": {"kind": "url", "url": "rtsp://..."}}, "removed": ["synthetic"]}

`Overlay.apply(entries, build)` is the config's entries minus the removed ones plus the
added ones, each added table validated by `build` exactly like a table of the file (one
that fails is skipped with a warning). The file is replaced atomically (write, fsync,
rename), so a crash leaves the old overlay or the new one, never half of one.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from services.control.endpoints import runtime_dir

__all__ = ["Overlay", "state_dir"]

log = logging.getLogger("edgeroom.state")
T = TypeVar("T")


def state_dir(config: Any, env: Mapping[str, str] | None = None) -> Path:
    """Where the box keeps what outlives a process: $STATE_DIRECTORY, else the runtime directory."""
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    return runtime_dir(config.box.runtime_dir, env)


class Overlay:
    """The added and removed entries of one config table, as kept in its file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.added: dict[str, Any] = {}
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

    def add(self, name: str, table: Any) -> None:
        """`name` is there (again), with `table`."""
        self.added[name] = table
        self.removed = [n for n in self.removed if n != name]

    def remove(self, name: str, in_config: bool) -> None:
        """`name` is gone; one of the config file's stays hidden until added again."""
        self.added.pop(name, None)
        if in_config and name not in self.removed:
            self.removed.append(name)

    def apply(self, entries: Mapping[str, T], build: Callable[[str, Any], T]) -> dict[str, T]:
        """The config's `entries` with this overlay applied, sorted by name."""
        if self.problem:
            log.warning("%s", self.problem)
        out = {name: value for name, value in entries.items() if name not in self.removed}
        for name, table in self.added.items():
            try:
                out[name] = build(name, table)
            except ValueError as exc:  # a ConfigError: the file was edited by hand, or the schema moved on
                log.warning("ignoring %s from %s: %s", name, self.path, exc)
        return dict(sorted(out.items()))

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
