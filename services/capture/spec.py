"""Capture's entry in the catalog, and its part of the config: [sources.NAME], one table per source.

A source's keys depend on its kind: each kind's module in services/capture/sources/ declares
its config class (services/capture/sources/base.py).
"""
from __future__ import annotations

from typing import Any

from services.capture import book, sources
from services.catalog import ServiceSpec, register
from services.runtime import streams
from services.runtime.schema import SCHEMA, Table, Variants

SOURCE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"


def _instances(config: Any, with_overlay: bool) -> list[str]:
    return list(book.effective(config) if with_overlay else config.sources)


register(ServiceSpec(
    "capture", "services.capture.service:Capture", "brings one source's frames onto the bus",
    order=1, instances=_instances, instances_file=book.FILE, network="any", devices=("video",), nice=-5,
    cpu_weight=200, docs="capture.md"))

SCHEMA.add(Table(
    "sources", Variants("kind", "synthetic", sources.config_classes, "source"),
    "Capture sources by name; each source's keys depend on its kind.",
    names=SOURCE_NAME_PATTERN, defaults=lambda: {"synthetic": {}}, replaced=True, env_adds=True,
    name_rule=streams.name_rule, owner="capture"))
