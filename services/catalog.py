"""What services exist and how each is run: the one source of truth for `edgeroom run`
and for the systemd units (`edgeroom units render`).

Nobody keeps this list by hand. Each service declares itself in its package's `spec`
module (services/KIND/spec.py) with `register(ServiceSpec(...))`, next to its config parts;
`specs()` finds them all (services/runtime/plugins.py). Every service is started as
`edgeroom service KIND [INSTANCE]`: `edgeroom run` builds its child processes from the
specs and the config, the units are rendered from the same two, so both run the same
command lines (a test checks it).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.runtime import plugins
from services.runtime.schema import SCHEMA

__all__ = ["ServiceSpec", "command_owner", "instance_files", "instances", "load_class", "nice", "register", "spec",
           "specs"]


@dataclass(frozen=True)
class ServiceSpec:
    kind: str
    entry: str            # "module:Class", imported only by the process that runs it
    summary: str
    order: int            # start order (hub first); also the order of its config parts in the document
    # templated services run one process per instance (capture@NAME): the instance names the
    # config asks for, with or without what commands added (the overlay)
    instances: Callable[[Any, bool], Iterable[str]] | None = None
    network: str = "loopback"  # none | loopback | any: what IP access its unit allows
    devices: tuple[str, ...] = ()  # device profiles its unit opens: "video" (V4L2), "gpu" (NVIDIA, Jetson)
    nice: int = 0         # scheduling priority when the config says 0: capture above vision
    cpu_weight: int = 100  # cgroup CPU share under contention (systemd's default is 100)
    commands: tuple[str, ...] = ()  # the command families it answers ("record" for record.start, ...)
    # a directory outside the state directory that its unit must be able to write ('' is none)
    writes: Callable[[Any], str] | None = None
    # the network it needs given the config, when that depends on the config (the hub's listeners)
    network_for: Callable[[Any], str] | None = None
    reports_exit: bool = True  # its unit tells the hub how its process ended (all but the hub itself)
    # the file in the state directory whose change changes its instances (the overlay of added sources)
    instances_file: str = ""
    docs: str = ""        # its page under docs/
    # whether the config asks for it at all (an off-by-default service: [sip] enabled); None: always
    wanted: Callable[[Any], bool] | None = None

    @property
    def templated(self) -> bool:
        return self.instances is not None

    def network_of(self, config: Any) -> str:
        return self.network_for(config) if self.network_for else self.network


_SPECS: dict[str, ServiceSpec] = {}


def register(spec: ServiceSpec) -> ServiceSpec:
    """Declare a service (from its package's spec module)."""
    if spec.kind in _SPECS and _SPECS[spec.kind] != spec:
        raise ValueError(f"service {spec.kind!r} is declared twice")
    _SPECS[spec.kind] = spec
    SCHEMA.add_service(spec.kind, spec.order)
    return spec


def specs() -> dict[str, ServiceSpec]:
    """Every service, in start order."""
    plugins.discover()
    return {s.kind: s for s in sorted(_SPECS.values(), key=lambda s: (s.order, s.kind))}


def spec(kind: str) -> ServiceSpec:
    found = specs().get(kind)
    if found is None:
        raise ValueError(f"unknown service {kind!r} (known: {', '.join(specs())})")
    return found


def nice(spec: ServiceSpec, settings: Any) -> int:
    """The niceness a service runs at: the config's [services.KIND] nice, or the catalog's when that is 0."""
    return int(settings.nice or spec.nice)


def load_class(kind: str) -> type:
    module, _, name = spec(kind).entry.partition(":")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


def instances(config: Any, with_overlay: bool = True) -> list[tuple[str, str | None]]:
    """(kind, instance) of every process the config asks for, hub first; with_overlay: with the
    entries added and removed by command (sources.json), as a running box sees them."""
    out: list[tuple[str, str | None]] = []
    for kind, s in specs().items():
        if not config.services[kind].enabled or (s.wanted is not None and not s.wanted(config)):
            continue
        if s.instances is None:
            out.append((kind, None))
        else:
            out += [(kind, name) for name in sorted(s.instances(config, with_overlay))]
    return out


def instance_files() -> list[str]:
    """Files in the state directory whose change changes which instances run (sources.json)."""
    return sorted({s.instances_file for s in specs().values() if s.instances_file})


def command_owner(family: str) -> str | None:
    """The service kind that answers the command family `family` (record -> recorder), if any."""
    return next((s.kind for s in specs().values() if family in s.commands), None)
