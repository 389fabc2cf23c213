"""The hub's entry in the catalog: one process, first to start, the box's control endpoint."""
from __future__ import annotations

from typing import Any

from services.catalog import ServiceSpec, register
from services.runtime.schema import parse_host_port

LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


def _network(config: Any) -> str:
    """Loopback, unless the metrics or a TCP control endpoint listens beyond it."""
    for listen in (config.hub.metrics_listen, config.control.tcp_control, config.control.tcp_events):
        if listen and parse_host_port(listen)[0] not in LOCAL_HOSTS:
            return "any"
    return "loopback"


register(ServiceSpec(
    "hub", "services.hub.service:Hub",
    "rooms, sessions, service registry, control endpoint, event fan-out, hooks",
    order=0, network_for=_network, reports_exit=False, docs="protocol.md"))
