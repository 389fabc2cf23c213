"""The bridge's own metrics (its transcodes' and mixes' are theirs: transcode.py, mixer.py)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BridgeMetrics"]


class BridgeMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.rooms = Gauge("edgeroom_bridge_rooms", "Rooms bridged now.", registry=r)
        self.participants = Gauge("edgeroom_bridge_participants", "Sessions bridged, by room.", ["room"], registry=r)
        self.routes = Gauge("edgeroom_bridge_routes", "Video routes the bridge keeps, by room and path "
                            "(pass-through, transcode, grid, blocked, replaced, waiting, none).", ["room", "path"],
                            registry=r)
        self.refused = Counter("edgeroom_bridge_refused", "Sessions not bridged, by room and reason (full).",
                               ["room", "reason"], registry=r)
        self.commands = Counter("edgeroom_bridge_route_commands", "Route changes sent to the transports, by result.",
                                ["result"], registry=r)
        self.switches = Counter("edgeroom_bridge_speaker_switches", "Active-speaker changes, by room.", ["room"],
                                registry=r)
        self.hook = Counter("edgeroom_bridge_hook_answers", "BEFORE_BRIDGE_VIDEO answers, by decision and reason "
                            "(answered, no_handler, timeout, error).", ["decision", "reason"], registry=r)
        self.join = Histogram("edgeroom_bridge_route_seconds", "From the hub's word of a new member to its routes "
                              "being sent.", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                              registry=r)
