"""The shape of the box's config: settings with their rules, and the registry of its parts.

The config file is one TOML document whose top-level keys are *parts*. The runtime
declares the parts every process shares ([box], [log], [bus], [control], [hub],
[hooks.NAME], [services.KIND]); every other part is declared by the package that owns it,
beside its code, when that package's `spec` module is imported (services/runtime/plugins.py
finds them): capture declares [sources.NAME], vision [vision] and [pipelines.NAME], the
recorder [recorder]. So the runtime names no service, and a new service brings its own keys.

A part is a `Section` (one table of keys: [vision]) or a `Table` (named entries of one
shape: [sources.NAME]). A table's entries may come in `Variants` chosen by one key
([sources.NAME] kind = "url" has the url source's keys, not the webcam's).

Each key is a dataclass field made by `setting()`: its metadata holds `help`, `reload`
("live": a reload, SIGHUP, applies it; "restart": the process that uses it must restart)
and its rules (min, max, choices, pattern, even, off, check), which the one generic
validator in services/runtime/config.py applies. A class may tie keys together with a
`cross_check(self, key)` method (see `CrossCheck`).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

__all__ = [
    "LIVE",
    "RESTART",
    "SCHEMA",
    "CrossCheck",
    "Part",
    "Problem",
    "Schema",
    "Section",
    "Table",
    "Variants",
    "parse_bytes",
    "parse_host_port",
    "parse_list",
    "setting",
]

LIVE, RESTART = "live", "restart"
Problem = tuple[str, str, tuple[str, ...]]  # (key, reason, related keys): a rule tying keys together failed


def setting(default: Any, help: str, reload: str, **rules: Any) -> Any:
    """A dataclass field whose metadata holds its help, reload mode and validation rules.

    `choices` may be a callable returning the allowed values (a registry's names), read at
    validation time, so a list of kinds is never copied by hand."""
    return field(default=default, metadata={"help": help, "reload": reload, **rules})


class CrossCheck(Protocol):
    """A config class whose keys depend on each other: `key("x")` is the dotted path of its key x."""

    def cross_check(self, key: Callable[[str], str]) -> Problem | None: ...


# --- parsers for string-valued settings ---------------------------------------------------

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\[\]\s/]+)\]|(?P<host>[^:\[\]\s/]+)):(?P<port>[0-9]{1,5})")
_BYTES = re.compile(r"([0-9]+)([KMGT]?)")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_host_port(text: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[IPv6]:PORT" into (host, port), brackets dropped; port 0..65535."""
    match = _HOST_PORT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected HOST:PORT (an IPv6 host in brackets, like [::1]:9750), got {text!r}")
    port = int(match["port"])
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return match["v6"] or match["host"], port


def parse_bytes(text: str) -> int:
    """A size in bytes with an optional K, M, G or T suffix (powers of 1024): "512M" -> 536870912."""
    match = _BYTES.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected a size in bytes with an optional K, M, G or T suffix, like '512M'; got {text!r}")
    return int(match[1]) * _UNITS[match[2]]


def parse_list(text: str) -> list[str]:
    """A comma-separated config list ('grayscale, blur') -> ['grayscale', 'blur']."""
    return [part.strip() for part in text.split(",") if part.strip()]


# --- the parts of the document -------------------------------------------------------------


@dataclass(frozen=True)
class Variants:
    """Entries whose keys depend on one of them: `key` picks the class among `classes()`."""

    key: str
    default: str
    classes: Callable[[], Mapping[str, type]]
    what: str = "entry"  # how an error names one entry: "a url source has no key ..."

    def pick(self, value: str) -> type:
        return self.classes()[value]

    def names(self) -> tuple[str, ...]:
        return tuple(self.classes())

    def all_keys(self) -> list[str]:
        """Every key of every variant, each once, in declaration order."""
        return list(dict.fromkeys(f.name for cls in self.classes().values() for f in fields(cls)))


@dataclass(frozen=True)
class Section:
    """One table of keys: [name]."""

    name: str
    cls: type
    help: str
    owner: str = "box"  # who declared it: the runtime ("box") or a service kind


@dataclass(frozen=True)
class Table:
    """Named entries of one shape: [name.ENTRY]."""

    name: str
    entry: type | Variants
    help: str
    names: tuple[str, ...] | str | Callable[[], tuple[str, ...]]  # allowed names, or a pattern they match
    defaults: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
    replaced: bool = False       # a file's table replaces the default entries instead of merging over them
    env_adds: bool = False       # an EDGEROOM_ variable may add a new entry
    name_rule: Callable[[str], str | None] | None = None  # extra rule on an entry's name: the reason it fails
    owner: str = "box"

    def allowed(self) -> tuple[str, ...] | str:
        return self.names() if callable(self.names) else self.names

    def entry_keys(self) -> list[str]:
        return self.entry.all_keys() if isinstance(self.entry, Variants) else [f.name for f in fields(self.entry)]


Part = Section | Table


class Schema:
    """Every part of the config, in document order: the runtime's first, then each owner's."""

    def __init__(self) -> None:
        self.parts: dict[str, Part] = {}
        self._hooks: dict[str, dict[str, Any]] = {}      # hook name -> its default [hooks.NAME] keys
        self._services: dict[str, int] = {}              # service kind -> its start order

    def add(self, *parts: Part) -> None:
        for part in parts:
            if part.name in self.parts and self.parts[part.name] != part:
                raise ValueError(f"config part [{part.name}] is declared twice "
                                 f"(by {self.parts[part.name].owner} and {part.owner})")
            self.parts[part.name] = part

    def add_sync_hook(self, name: str, **defaults: Any) -> None:
        self._hooks[name] = defaults

    @property
    def sync_hooks(self) -> dict[str, dict[str, Any]]:
        """Sync hooks by name, sorted (whatever order their specs were imported in)."""
        return dict(sorted(self._hooks.items()))

    def add_service(self, kind: str, order: int) -> None:
        self._services[kind] = order

    @property
    def services(self) -> list[str]:
        """Service kinds, in start order."""
        return sorted(self._services, key=lambda k: (self._services[k], k))

    def names(self) -> list[str]:
        return list(self.parts)

    def section(self, name: str) -> Section:
        part = self.parts[name]
        if not isinstance(part, Section):
            raise TypeError(f"[{name}] is a table of entries, not a section")
        return part

    def table(self, name: str) -> Table:
        part = self.parts[name]
        if not isinstance(part, Table):
            raise TypeError(f"[{name}] is a section, not a table of entries")
        return part

    def classes(self) -> Iterable[type]:
        """Every config class, each once (the variants of a table included)."""
        seen: dict[type, None] = {}
        for part in self.parts.values():
            if isinstance(part, Section):
                seen[part.cls] = None
            elif isinstance(part.entry, Variants):
                seen.update(dict.fromkeys(part.entry.classes().values()))
            else:
                seen[part.entry] = None
        return list(seen)


SCHEMA = Schema()
