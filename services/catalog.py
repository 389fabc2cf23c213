"""What services exist and how each is run: the one source of truth for `edgeroom run`
and for the systemd units.

Every service is started as `edgeroom service KIND [INSTANCE]`. `edgeroom run` builds its
child processes from this table and the config; the systemd units (the operations issue)
are to be generated from the same table, so both run the same command lines.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from services.runtime import sources

__all__ = ["ServiceSpec", "CATALOG", "instances", "load_class", "nice"]


@dataclass(frozen=True)
class ServiceSpec:
    kind: str
    entry: str            # "module:Class"
    summary: str
    templated: bool       # one process per instance (capture@NAME), instances from the config
    instances_from: str = ""  # the config table whose names are the instances
    network: str = "loopback"  # none | loopback | any: what IP access its unit allows
    devices: tuple[str, ...] = ()  # device profiles its unit opens: "video" (V4L2), "gpu" (NVIDIA, Jetson)
    nice: int = 0         # scheduling priority when the config says 0: capture above vision
    cpu_weight: int = 100  # cgroup CPU share under contention (systemd's default is 100)
    only: Callable[[Any], bool] | None = None  # which entries of instances_from get an instance (None: all)


CATALOG: dict[str, ServiceSpec] = {
    "hub": ServiceSpec("hub", "services.hub.service:Hub",
                       "rooms, sessions, service registry, control endpoint, event fan-out, hooks", False),
    "capture": ServiceSpec("capture", "services.capture.service:Capture",
                           "brings one source's frames onto the bus", True, "sources",
                           network="any", devices=("video",), nice=-5, cpu_weight=200),
    "decode": ServiceSpec("decode", "services.decode.service:Decode",
                          "decodes one encoded source's stream into pictures on NAME-raw", True, "sources",
                          network="none", devices=("gpu",), nice=-2, cpu_weight=150,
                          only=lambda source: source.wants_decode()),
    "vision": ServiceSpec("vision", "services.vision.service:Vision",
                          "runs the vision pipelines (detector, censor, watermark) and asks AI vision models "
                          "what they see", False, network="any", devices=("gpu",), nice=5, cpu_weight=50),
    "recorder": ServiceSpec("recorder", "services.recorder.service:Recorder",
                            "records streams and rooms as crash-safe fragmented MP4", False,
                            network="none", devices=("gpu",), nice=0, cpu_weight=100),
}


def nice(spec: ServiceSpec, settings) -> int:
    """The niceness a service runs at: the config's [services.KIND] nice, or the catalog's when that is 0."""
    return settings.nice or spec.nice


def load_class(kind: str) -> type:
    spec = CATALOG.get(kind)
    if spec is None:
        raise ValueError(f"unknown service {kind!r} (known: {', '.join(CATALOG)})")
    module, _, name = spec.entry.partition(":")
    return getattr(importlib.import_module(module), name)


def instances(config, with_overlay: bool = True) -> list[tuple[str, str | None]]:
    """(kind, instance) of every process the config asks for, hub first; with_overlay: with the
    sources added and removed by command (sources.json), as a running box sees them."""
    out: list[tuple[str, str | None]] = []
    for kind, spec in CATALOG.items():
        svc = config.services.get(kind)
        if svc is not None and not svc.enabled:
            continue
        if not spec.templated:
            out.append((kind, None))
            continue
        table = getattr(config, spec.instances_from)
        if spec.instances_from == "sources" and with_overlay:
            table = sources.effective(config)
        out += [(kind, name) for name in sorted(table)
                if getattr(table[name], "enabled", True) and (spec.only is None or spec.only(table[name]))]
    return out
