"""Metrics: each service keeps a prometheus-client registry; the hub serves the box's total.

A service sends a snapshot of its registry with every heartbeat (structured JSON made from
`registry.collect()`, never parsed text). The hub keeps the latest snapshot per service
and exposes them all on one scrape URL, each sample labelled `service="capture@cam1"`.
Aggregation in the hub rather than prometheus-client's multiprocess mode: no shared
directory to clean after crashes, gauges keep their meaning, services on other boxes
or in containers would work the same, and a dead service's last values stay visible
(with `edgeroom_service_up 0`) instead of vanishing.
"""
from __future__ import annotations

import math
import os
import re
import resource
from collections.abc import Callable, Iterable
from typing import Any, TypedDict, TypeGuard

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

__all__ = ["snapshot", "clean_families", "BoxCollector", "new_registry", "process_sample", "Derived",
           "process_collector", "Family", "Sample"]

# One sample: [name, labels, value], a JSON array (a list before it is sent, too).
Sample = list[Any]


class Family(TypedDict):
    """One metric family as a heartbeat carries it and the hub keeps it."""

    name: str
    type: str
    help: str
    samples: list[Sample]


_TYPES = {"counter", "gauge", "histogram", "summary", "info", "stateset", "gaugehistogram", "unknown"}


def new_registry() -> CollectorRegistry:
    # *_created series double the output for nothing here
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    return CollectorRegistry(auto_describe=True)


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """The registry as JSON-able families: name, type, help, samples [name, labels, value]."""
    families: list[Family] = []
    for fam in registry.collect():
        samples = [[s.name, s.labels, s.value] for s in fam.samples if math.isfinite(s.value)]
        families.append({"name": fam.name, "type": fam.type, "help": fam.documentation, "samples": samples})
    return families


_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_sample() -> tuple[float, int]:
    """(CPU seconds used, resident bytes) of this process, from the kernel."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/statm", "rb") as f:
        rss_pages = int(f.read().split()[1])
    return usage.ru_utime + usage.ru_stime, rss_pages * _PAGE


_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _valid_family(fam: object) -> TypeGuard[dict[str, Any]]:
    return (isinstance(fam, dict) and isinstance(fam.get("name"), str) and fam["name"].startswith("edgeroom_")
            and bool(_NAME.match(fam["name"])) and isinstance(fam.get("help", ""), str)
            and fam.get("type") in _TYPES and isinstance(fam.get("samples"), list))


def _valid_sample(sample: object) -> TypeGuard[Sample]:
    return (isinstance(sample, list) and len(sample) == 3 and isinstance(sample[0], str)
            and bool(_NAME.match(sample[0])) and isinstance(sample[1], dict)
            and all(isinstance(k, str) and _NAME.match(k) and isinstance(v, str) for k, v in sample[1].items())
            and isinstance(sample[2], (int, float)) and not isinstance(sample[2], bool))


def clean_families(families: object) -> tuple[list[Family], int]:
    """Only well-formed families and samples survive; returns (kept, how many things were dropped)."""
    if not isinstance(families, list):
        return [], 1
    kept: list[Family] = []
    dropped = 0
    for fam in families:
        if not _valid_family(fam):
            dropped += 1
            continue
        samples = [x for x in fam["samples"] if _valid_sample(x)]
        dropped += len(fam["samples"]) - len(samples)
        kept.append({"name": fam["name"], "type": fam["type"], "help": fam.get("help", ""), "samples": samples})
    return kept, dropped


class BoxCollector:
    """A prometheus-client collector over the services' latest snapshots.

    `snapshots` maps service id -> families; the hub replaces an entry wholesale (one
    reference assignment), so the HTTP thread always sees a complete snapshot.
    """

    def __init__(self) -> None:
        self.snapshots: dict[str, list[Family]] = {}
        self.live: dict[str, CollectorRegistry] = {}  # registries of this process, read at scrape time

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        current = {**self.snapshots, **{service: snapshot(r) for service, r in self.live.items()}}
        for service, families in sorted(current.items()):
            for fam in families:
                if not _valid_family(fam):
                    continue
                metric = merged.get(fam["name"])
                if metric is None:
                    metric = merged[fam["name"]] = Metric(fam["name"], str(fam.get("help", "")), fam["type"])
                elif metric.type != fam["type"]:
                    continue  # two services disagree on a type: keep the first, never emit a broken family
                for name, labels, value in filter(_valid_sample, fam["samples"]):
                    metric.add_sample(name, {"service": service, **labels}, value)  # a service label inside wins
        yield from merged.values()


class Derived:
    """A collector whose families are computed at scrape time from state the owner keeps
    (restart counts, process CPU): counters stay counters without a second bookkeeping."""

    def __init__(self, produce: Callable[[], Iterable[Metric]]) -> None:
        self.produce = produce

    def collect(self) -> Iterable[Metric]:
        return list(self.produce())


def process_families(started: float) -> list[Metric]:
    cpu, rss = process_sample()
    return [CounterMetricFamily("edgeroom_service_cpu_seconds", "CPU time this process has used.", value=cpu),
            GaugeMetricFamily("edgeroom_service_resident_memory_bytes", "Resident memory of this process.",
                              value=rss),
            GaugeMetricFamily("edgeroom_service_start_time_seconds", "When this process started (Unix time).",
                              value=started)]


def process_collector(started: float) -> Derived:
    return Derived(lambda: process_families(started))
