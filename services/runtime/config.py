"""The box's configuration: one TOML file, `EDGEROOM_` environment overrides, one validation.

One load path, always in this order:

1. defaults: the field defaults of the config classes, plus the default entries of the
   tables (every sync hook, every service, one `synthetic` source);
2. the TOML file: `load(path)`, else `$EDGEROOM_CONFIG` when set, else the installed box's
   /etc/edgeroom/edgeroom.toml when it exists, else none. A file's table of entries merges
   over the default entries key by key, except a table declared `replaced` (sources,
   pipelines): if the file has it at all, it replaces the default entries entirely;
3. the environment: `EDGEROOM_` + the dotted key upper-cased with `.` written `__`, e.g.
   `EDGEROOM_HUB__HEARTBEAT_INTERVAL=0.5` or `EDGEROOM_SOURCES__CAM_1__FPS=25`. Names inside
   the tables match case-insensitively; a variable may add a new entry only to a table
   that allows it (sources). A variable with `__` that names no key is an error; the names
   are checked, in sorted order, before any value. Variables without `__` (EDGEROOM_CONFIG,
   EDGEROOM_BUS_PREFIX, ...) are not configuration;
4. one validation of the merged tree, in file order: unknown keys, strict types (a bool is
   not an int; an int is a float; environment strings are parsed by the key's type), the
   bounds and choices in each field's metadata, then the rules that tie two keys together
   (a class's `cross_check`). The first problem raises ConfigError naming its source (file
   or `env VAR`) and dotted key.

The parts of the document are declared in services/runtime/schema.py's registry: here the
ones every process shares ([box], [log], [bus], [control], [hub], [hooks.NAME],
[services.KIND]); each service's own beside its code (its `spec` module).
"""
from __future__ import annotations

import copy
import functools
import math
import operator
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

from services.runtime import plugins
from services.runtime.schema import (
    LIVE,
    RESTART,
    SCHEMA,
    Part,
    Problem,
    Section,
    Table,
    Variants,
    parse_bytes,
    parse_host_port,
    setting,
)

__all__ = [
    "ENV_PREFIX",
    "BoxConfig",
    "BusConfig",
    "Change",
    "Config",
    "ConfigError",
    "ControlConfig",
    "HookConfig",
    "HubConfig",
    "LogConfig",
    "ServiceConfig",
    "config_path",
    "defaults",
    "diff",
    "entry_from_dict",
    "load",
    "loads",
]

ENV_PREFIX = "EDGEROOM_"
_KeyPath = tuple[str, ...]  # a dotted key, split


class ConfigError(ValueError):
    """A configuration problem; `key` is the dotted key, `source` the file or `env VAR`."""

    def __init__(self, reason: str, *, key: str | None = None, source: str | None = None):
        super().__init__(": ".join(part for part in (source, key, reason) if part))
        self.reason, self.key, self.source = reason, key, source

    def __reduce__(self) -> tuple[Any, ...]:  # keep key and source across pickling (process pools)
        return functools.partial(ConfigError, key=self.key, source=self.source), (self.reason,)


def _check_memory(text: str) -> None:
    if parse_bytes(text) == 0:
        raise ValueError(f"must be more than 0 bytes, got {text!r}")


_PERCENT = re.compile(r"([0-9]{1,5})%")


def _check_cpu_quota(text: str) -> None:
    match = _PERCENT.fullmatch(text)
    if match is None or not 1 <= int(match[1]) <= 10000:
        raise ValueError(f"expected a percentage 1%..10000% like '150%', got {text!r}")


# --- the parts every process shares ---------------------------------------------------------


@dataclass(frozen=True)
class BoxConfig:
    name: str = setting("edgeroom", "The box's name, shown by `edgeroom ctl status` and `ping`.", RESTART,
                        pattern=r"^[A-Za-z0-9_.-]{1,63}$")
    runtime_dir: str = setting("", "Directory for the box's sockets and state; '' means automatic.", RESTART)


@dataclass(frozen=True)
class LogConfig:
    level: str = setting("info", "Least severe log level written.", LIVE,
                         choices=("debug", "info", "warning", "error"))
    format: str = setting("text", "Log line format.", LIVE, choices=("text", "json"))


@dataclass(frozen=True)
class BusConfig:
    prefix: str = setting("edgeroom", "Prefix of every shared-memory object of the box.",
                          RESTART, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class ControlConfig:
    max_message_bytes: int = setting(262144, "Largest control message accepted, in bytes.", RESTART,
                                     min=1024, max=16777216)
    request_timeout: float = setting(2.0, "Seconds a control client waits for a reply.", LIVE, min=0.1, max=60)
    tcp_control: str = setting("", "HOST:PORT for remote control requests (CURVE-encrypted); '' is off.",
                               RESTART, off="", check=parse_host_port)
    tcp_events: str = setting("", "HOST:PORT for remote event subscribers (CURVE-encrypted); '' is off.",
                              RESTART, off="", check=parse_host_port)
    curve_dir: str = setting("", "Directory of the CURVE keys; required when a tcp_ endpoint is set.", RESTART)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        if (self.tcp_control or self.tcp_events) and not self.curve_dir:
            return "curve_dir", f"required when {key('tcp_control')} or {key('tcp_events')} is set", \
                ("tcp_control", "tcp_events")
        return None


@dataclass(frozen=True)
class HubConfig:
    """The control plane's centre, which every service's runtime talks to."""

    heartbeat_interval: float = setting(1.0, "Seconds between heartbeats (every service reads it at start).",
                                        RESTART, min=0.05, max=60)
    stale_after: float = setting(5.0, "Seconds without a heartbeat before a peer counts as stale; "
                                 "must be greater than heartbeat_interval.", LIVE, max=3600)
    session_grace: float = setting(10.0, "Seconds a restarted hub keeps a remembered session before ending it.",
                                   LIVE, min=0, max=3600)
    metrics_listen: str = setting("127.0.0.1:9750", "HOST:PORT of the metrics endpoint; port 0 picks a free "
                                  "port; '' is off.", RESTART, off="", check=parse_host_port)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        if self.stale_after <= self.heartbeat_interval:
            return "stale_after", f"must be greater than {key('heartbeat_interval')} ({self.heartbeat_interval})", \
                ("heartbeat_interval",)
        return None


@dataclass(frozen=True)
class HookConfig:
    deadline: float = setting(0.5, "Seconds the pipeline waits for the hook's answer.", LIVE, min=0.01, max=30)
    on_timeout: str = setting("allow", "What happens when the deadline passes.", LIVE, choices=("allow", "block"))


@dataclass(frozen=True)
class ServiceConfig:
    enabled: bool = setting(True, "Whether the supervisor runs the service.", RESTART)
    restart: str = setting("on-failure", "When the supervisor restarts the service after it exits.", LIVE,
                           choices=("no", "on-failure", "always"))
    restart_sec: float = setting(0.5, "First delay before a restart; doubles on each failure in a row.", LIVE,
                                 min=0, max=600)
    restart_max_sec: float = setting(10.0, "Largest restart delay; must be >= restart_sec.", LIVE, min=0, max=3600)
    healthy_sec: float = setting(2.0, "Seconds a run must stay ready to end a crash loop: the next restart waits "
                                 "restart_sec again and the start limit counts afresh.", LIVE, min=0, max=3600)
    start_limit_burst: int = setting(5, "Starts allowed within start_limit_interval before giving up.", LIVE,
                                     min=1, max=1000)
    start_limit_interval: float = setting(30.0, "Window, in seconds, of start_limit_burst.", LIVE, min=1, max=86400)
    start_timeout: float = setting(15.0, "Seconds a starting service has to report ready.", LIVE, min=0.5, max=600)
    stop_timeout: float = setting(5.0, "Seconds between SIGTERM and SIGKILL.", LIVE, min=0.1, max=600)
    watchdog_sec: float = setting(10.0, "Seconds without a watchdog ping before the service is killed; 0 is off.",
                                  RESTART, off=0, min=0.2, max=3600)
    nice: int = setting(0, "CPU scheduling niceness.", RESTART, min=-20, max=19)
    cpu_quota: str = setting("", "CPU limit like '150%' (1%..10000%); '' is none.", RESTART,
                             off="", check=_check_cpu_quota)
    memory_max: str = setting("", "Memory limit in bytes with K/M/G/T suffix like '512M'; '' is none.", RESTART,
                              off="", check=_check_memory)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        if self.restart_max_sec < self.restart_sec:
            return "restart_max_sec", f"must be >= {key('restart_sec')} ({self.restart_sec})", ("restart_sec",)
        return None


SCHEMA.add(
    Section("box", BoxConfig, "The box itself."),
    Section("log", LogConfig, "Logging."),
    Section("bus", BusConfig, "The shared-memory frame bus."),
    Section("control", ControlConfig, "The ZeroMQ control plane."),
    Section("hub", HubConfig, "The hub: heartbeats, sessions, metrics."),
    Table("hooks", HookConfig, "Sync hooks by name (each declared by the service that calls it).",
          names=lambda: tuple(SCHEMA.sync_hooks), defaults=lambda: SCHEMA.sync_hooks),
    Table("services", ServiceConfig, "How each service is supervised, by kind.",
          names=lambda: tuple(SCHEMA.services), defaults=lambda: {kind: {} for kind in SCHEMA.services}),
)


def _schema() -> dict[str, Part]:
    """Every part, after discovery, in document order: the shared ones, then each service's in start order."""
    plugins.discover()
    rank = {kind: n for n, kind in enumerate(SCHEMA.services)}
    order = sorted(SCHEMA.parts.values(), key=lambda p: -1 if p.owner == "box" else rank.get(p.owner, len(rank)))
    return {p.name: p for p in order}


def _default_entries(table: Table) -> dict[str, Any]:
    """A table's default entries, built from their (empty or partial) default key tables."""
    return {name: _build_entry(table, name, dict(values)) for name, values in table.defaults().items()}


def _build_entry(table: Table, name: str, values: dict[str, Any]) -> Any:
    cls = table.entry.pick(values.get(table.entry.key, table.entry.default)) if isinstance(table.entry, Variants) \
        else table.entry
    return cls(**values)


class Config:
    """The validated config: one attribute per part ([box] is `config.box`, [sources] `config.sources`).

    Immutable and comparable; `Config()` is the embedded defaults."""

    __slots__ = ("_parts",)

    def __init__(self, **parts: Any) -> None:
        schema = _schema()
        unknown = sorted(set(parts) - set(schema))
        if unknown:
            raise TypeError(f"unknown config part(s): {', '.join(unknown)}")
        built = {}
        for name, part in schema.items():
            if name in parts:
                built[name] = parts[name]
            else:
                built[name] = part.cls() if isinstance(part, Section) else _default_entries(part)
        object.__setattr__(self, "_parts", built)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_parts")[name]
        except KeyError:
            raise AttributeError(f"the config has no part {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the config is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._parts == other._parts

    __hash__ = None  # type: ignore[assignment]  # unhashable on purpose; typeshed types __hash__ as a method

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self._parts.items())})"

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial(Config, **self._parts), ()

    def parts(self) -> list[str]:
        return list(self._parts)

    def to_dict(self) -> dict[str, Any]:
        """Every effective value as plain, JSON-able dicts."""
        return {name: {k: asdict(v) for k, v in value.items()} if isinstance(value, dict) else asdict(value)
                for name, value in self._parts.items()}


# --- the generic field validator ------------------------------------------------------------

_EXPECTED = {bool: "expected true or false", int: "expected an integer",
             float: "expected a number", str: "expected a string"}
_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}


def _choices(c: Any) -> Any:
    return c() if callable(c) else c


_RULES: tuple[tuple[str, Callable[[Any, Any], bool], Callable[[Any, Any], str]], ...] = (
    ("choices", lambda v, c: v in _choices(c), lambda v, c: f"must be one of {', '.join(_choices(c))}; got {v!r}"),
    ("min", operator.ge, lambda v, m: f"must be >= {m}, got {v!r}"),
    ("max", operator.le, lambda v, m: f"must be <= {m}, got {v!r}"),
    ("even", lambda v, _: v % 2 == 0, lambda v, _: f"must be even, got {v!r}"),
    ("pattern", lambda v, p: re.fullmatch(p, v) is not None, lambda v, p: f"must match {p}, got {v!r}"),
)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value) if isinstance(value, (str, int, float)) else str(value)


def _check_type(kind: type, value: Any) -> Any:
    """`value` as `kind`; strict: only an int may stand in for a float."""
    if not (type(value) is kind or (kind is float and type(value) is int)):
        raise ValueError(f"{_EXPECTED[kind]}, got {_show(value)}")
    if kind is float and isinstance(value, (int, float)):  # it is, after the check above
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {_show(value)}")
        return float(value)
    return value


def _parse_env(kind: type, text: str) -> Any:
    """An environment string parsed as `kind`."""
    if kind is str:
        return text
    word = text.strip()
    if kind is bool:
        if word.lower() not in _BOOLS:
            raise ValueError(f"expected true or false (or 1/0, yes/no, on/off), got {text!r}")
        return _BOOLS[word.lower()]
    try:
        number = kind(word)
    except ValueError:
        raise ValueError(f"{_EXPECTED[kind]}, got {text!r}") from None
    return _check_type(kind, number)


def _check_rules(meta: Mapping[str, Any], value: Any) -> None:
    """Apply the rules in a field's metadata; the `off` value skips them all."""
    if "off" in meta and value == meta["off"]:
        return
    hint = f"; {_show(meta['off'])} turns it off" if "off" in meta else ""
    for rule, test, message in _RULES:
        if rule in meta and not test(value, meta[rule]):
            raise ValueError(message(value, meta[rule]) + hint)
    if "check" in meta:
        try:
            meta["check"](value)
        except ValueError as e:
            raise ValueError(f"{e}{hint}") from None


def _dotted(path: _KeyPath, *more: str) -> str:
    return ".".join((*path, *more))


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _field_type(f: Any) -> type:
    """A field's type as a class (annotations are strings under `from __future__ import annotations`)."""
    return _TYPES[f.type] if isinstance(f.type, str) else f.type


# --- validation: the merged tree into a Config ----------------------------------------------


class _Builder:
    """Turns the merged tree into a Config; `origins` maps a key path to its file or `env VAR`."""

    def __init__(self, origins: dict[_KeyPath, str | None], schema: dict[str, Part]):
        self.origins, self.schema = origins, schema

    def error(self, path: _KeyPath, reason: str, related: tuple[_KeyPath, ...] = ()) -> ConfigError:
        source = next((self.origins[p] for p in (path, *related) if self.origins.get(p)), None)
        return ConfigError(reason, key=_dotted(path), source=source)

    def config(self, tree: dict[str, Any]) -> Config:
        parts = {}
        for name, value in tree.items():
            part = self.schema.get(name)
            if part is None:
                raise self.error((name,), f"unknown key (known: {', '.join(self.schema)})")
            parts[name] = self.table(part, value) if isinstance(part, Table) else \
                self.section(part.cls, value, (name,))
        return Config(**parts)

    def need_table(self, value: Any, path: _KeyPath) -> None:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_show(value)}")

    def table(self, table: Table, value: Any) -> dict[str, Any]:
        self.need_table(value, (table.name,))
        names = table.allowed()
        built = {}
        for entry, body in value.items():
            self.check_name(table, names, (table.name, entry))
            built[entry] = self.entry(table, body, (table.name, entry))
        return {n: built[n] for n in names if n in built} if isinstance(names, tuple) else built

    def check_name(self, table: Table, names: tuple[str, ...] | str, path: _KeyPath) -> None:
        if isinstance(names, tuple) and path[-1] not in names:
            raise self.error(path, f"unknown key (known: {', '.join(names)})")
        if isinstance(names, str) and not re.fullmatch(names, path[-1]):
            raise self.error(path, f"a name here must match {names}")
        reason = table.name_rule(path[-1]) if table.name_rule else None
        if reason:
            raise self.error(path, reason)

    def entry(self, table: Table, value: Any, path: _KeyPath) -> Any:
        if not isinstance(table.entry, Variants):
            return self.section(table.entry, value, path)
        self.need_table(value, path)
        variants = table.entry
        kind = value.get(variants.key, variants.default)
        kind_path = path + (variants.key,)
        if not isinstance(kind, str):
            raise self.error(kind_path, f"expected a string, got {_show(kind)}")
        if kind not in variants.names():
            raise self.error(kind_path, f"must be one of {', '.join(variants.names())}; got {kind!r}")
        return self.section(variants.pick(kind), value, path, f"a {kind} {variants.what}")

    def section(self, cls: type, value: Any, path: _KeyPath, what: str = "") -> Any:
        self.need_table(value, path)
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, item in value.items():
            if key not in known:
                whose = f" of {what}" if what else ""
                raise self.error(path + (key,), f"unknown key{whose} (known: {', '.join(known)})")
            values[key] = self.value(known[key], item, path + (key,))
        return self.cross_check(cls(**values), path)

    def value(self, f: Any, value: Any, path: _KeyPath) -> Any:
        from_env = (self.origins.get(path) or "").startswith("env ")
        kind = _field_type(f)
        try:
            value = _parse_env(kind, value) if from_env else _check_type(kind, value)
            _check_rules(f.metadata, value)
        except ValueError as e:
            raise self.error(path, str(e)) from None
        return value

    def cross_check(self, obj: Any, path: _KeyPath) -> Any:
        check = getattr(type(obj), "cross_check", None)
        problem = check(obj, lambda key: _dotted(path, key)) if check else None
        if problem:
            key, reason, related = problem
            raise self.error(path + (key,), reason, tuple(path + (r,) for r in related))
        return obj


# --- merging the layers -----------------------------------------------------------------------


def _merge(over: Any, base: Any, replaced: set[_KeyPath], path: _KeyPath = ()) -> Any:
    """`over` on top of `base`, in `over`'s key order, then the keys only `base` has."""
    if not (isinstance(over, dict) and isinstance(base, dict)) or path in replaced:
        return over
    merged = {k: _merge(v, base[k], replaced, path + (k,)) if k in base else v for k, v in over.items()}
    merged.update((k, v) for k, v in base.items() if k not in over)
    return merged


def _note(tree: dict[str, Any], source: str | None, origins: dict[_KeyPath, str | None], path: _KeyPath = ()) -> None:
    for key, value in tree.items():
        origins[path + (key,)] = source
        if isinstance(value, dict):
            _note(value, source, origins, path + (key,))


def _env_error(var: str, path: _KeyPath, reason: str) -> ConfigError:
    return ConfigError(reason, key=_dotted(path) or None, source=f"env {var}")


def _env_entry(var: str, table: Table, name: str, tree: dict[str, Any]) -> str:
    """The entry of `table` that `name` (lower-cased) names: a present one, or a new one where allowed."""
    present: list[str] = list(tree.get(table.name) or {}) if isinstance(tree.get(table.name), dict) else []
    found = [n for n in present if n.lower() == name]
    if found:
        return found[0]
    pattern = table.allowed()
    if isinstance(pattern, tuple):  # a fixed set of names (services, hooks): every one has its entry
        raise _env_error(var, (table.name, name), f"unknown key (known: {', '.join(pattern)})")
    if table.env_adds:
        if name and re.fullmatch(pattern, name):
            return name
        raise _env_error(var, (table.name, name), f"a name here must match {pattern}")
    raise _env_error(var, (table.name, name), f"no such entry (present: {', '.join(present)}); add it to the file")


def _env_path(var: str, tree: dict[str, Any], schema: dict[str, Part]) -> _KeyPath | None:
    """The key path an `EDGEROOM_A__B` variable sets; None when the variable is not configuration."""
    rest = var[len(ENV_PREFIX):]
    if not var.startswith(ENV_PREFIX) or "__" not in rest:
        return None
    top, _, rest = rest.lower().partition("__")
    part = schema.get(top)
    if part is None:
        raise _env_error(var, (top,), f"unknown key (known: {', '.join(schema)})")
    prefix: _KeyPath
    if isinstance(part, Section):
        known, prefix = [f.name for f in fields(part.cls)], (top,)
    else:
        name, _, rest = rest.rpartition("__")
        if not name:
            raise _env_error(var, (top,), f"expected {ENV_PREFIX}{top.upper()}__NAME__KEY")
        known, prefix = part.entry_keys(), (top, _env_entry(var, part, name, tree))
    if rest not in known:
        raise _env_error(var, prefix + (rest,), f"unknown key (known: {', '.join(known)})")
    return prefix + (rest,)


def _set(tree: dict[str, Any], path: _KeyPath, value: str) -> None:
    for key in path[:-1]:
        child = tree.setdefault(key, {})
        if not isinstance(child, dict):  # the file has a value where a table belongs: validation says so
            return
        tree = child
    tree[path[-1]] = value


def _apply_env(tree: dict[str, Any], env: Mapping[str, str], origins: dict[_KeyPath, str | None],
               schema: dict[str, Part]) -> None:
    for var in sorted(env):
        path = _env_path(var, tree, schema)
        if path is not None:
            _set(tree, path, env[var])
            origins[path] = f"env {var}"


# --- the public entry points -------------------------------------------------------------------


def _base_tree(schema: dict[str, Part]) -> dict[str, Any]:
    return {name: copy.deepcopy(dict(part.defaults())) if isinstance(part, Table) else {}
            for name, part in schema.items()}


def _from_document(doc: dict[str, Any], env: Mapping[str, str] | None, source: str | None) -> Config:
    schema = _schema()
    origins: dict[_KeyPath, str | None] = {}
    _note(doc, source, origins)
    replaced: set[_KeyPath] = {(name,) for name, part in schema.items() if isinstance(part, Table) and part.replaced}
    tree = _merge(doc, _base_tree(schema), replaced)
    _apply_env(tree, os.environ if env is None else env, origins, schema)
    return _Builder(origins, schema).config(tree)


def loads(text: str, env: Mapping[str, str] | None = None, source: str | None = "<string>") -> Config:
    """The configuration from TOML `text` (then `env`, default os.environ); errors name `source`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", source=source) from None
    return _from_document(doc, env, source)


SYSTEM_CONFIG = "/etc/edgeroom/edgeroom.toml"  # where the installer puts the box's config


def config_path(env: Mapping[str, str] | None = None) -> str | None:
    """The file `load(None)` reads: $EDGEROOM_CONFIG, else the installed box's config if there is one."""
    env = os.environ if env is None else env
    if env.get(ENV_PREFIX + "CONFIG"):
        return env[ENV_PREFIX + "CONFIG"]
    return SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The configuration from `path` (else config_path(): $EDGEROOM_CONFIG, else /etc/edgeroom/edgeroom.toml
    when it exists, else defaults only) and `env`."""
    env = os.environ if env is None else env
    if path is None:
        path = config_path(env)
    if path is None:
        return loads("", env, source=None)
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", source=source) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", source=source) from None
    return loads(text, env, source)


def entry_from_dict(table: str, name: str, body: Any, origin: str = "command") -> Any:
    """One entry of a table (what `edgeroom ctl source add` or `pipeline set` sends), validated exactly as
    in the file, on its own: the file's other entries play no part."""
    return _from_document({table: {name: body}}, {}, origin).__getattr__(table)[name]


def defaults() -> Config:
    """The embedded defaults (no file, no environment)."""
    return loads("", env={}, source=None)


class Change(NamedTuple):
    key: str
    old: Any
    new: Any
    live: bool  # True when a reload (SIGHUP) applies it; False when it needs a restart


def _diff_section(prefix: str, old: Any, new: Any) -> list[Change]:
    return [Change(f"{prefix}.{f.name}", getattr(old, f.name), getattr(new, f.name), f.metadata["reload"] == LIVE)
            for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def _diff_table(prefix: str, old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    changes = []
    for name in dict.fromkeys([*old, *new]):
        if name in old and name in new and type(old[name]) is type(new[name]):
            changes += _diff_section(f"{prefix}.{name}", old[name], new[name])
        elif name in old and name in new:  # another variant (a source of another kind): the entry is new
            changes.append(Change(f"{prefix}.{name}", asdict(old[name]), asdict(new[name]), False))
        else:
            before, after = (asdict(t[name]) if name in t else None for t in (old, new))
            changes.append(Change(f"{prefix}.{name}", before, after, False))
    return changes


def diff(old: Config, new: Config) -> list[Change]:
    """Every dotted key whose value differs; an added or removed entry is one restart change."""
    changes = []
    for name in old.parts():
        a, b = getattr(old, name), getattr(new, name)
        changes += _diff_table(name, a, b) if isinstance(a, dict) else _diff_section(name, a, b)
    return changes
