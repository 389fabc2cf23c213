"""The WebRTC service's metrics (docs/metrics.md, "WebRTC")."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.capture.sink import SinkMetrics

__all__ = ["WebrtcMetrics"]


class _Reason:
    """`dropped.labels(reason)` for a sink, with the session label applied."""

    def __init__(self, counter: Counter, session: str) -> None:
        self.counter, self.session = counter, session

    def labels(self, reason: str) -> object:
        return self.counter.labels(self.session, reason)


class WebrtcMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.requests = Counter("edgeroom_webrtc_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "code"], registry=r)
        self.refused = Counter("edgeroom_webrtc_refused", "Requests or sessions refused, by reason (token, "
                               "bad_offer, no_codec, busy, conflict, not_found, too_large, ...).", ["reason"],
                               registry=r)
        self.sessions = Gauge("edgeroom_webrtc_sessions", "Peer connections open, by kind (publisher, viewer, "
                              "call) and path (pass-through, transcode, '').", ["kind", "path"], registry=r)
        self.ended = Counter("edgeroom_webrtc_sessions_ended", "Peer connections ended, by kind and reason "
                             "(deleted, closed, ice_failed, connect_timeout, disconnected, stopping).",
                             ["kind", "reason"], registry=r)
        self.connect_seconds = Histogram("edgeroom_webrtc_connect_seconds", "From the offer to the connection "
                                         "being up (ICE and DTLS).", registry=r,
                                         buckets=(.01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.units_in = Counter("edgeroom_webrtc_units_in", "Video access units and audio chunks received from "
                                "publishers and calls, put on the bus.", ["media"], registry=r)
        self.viewer_dropped = Counter("edgeroom_webrtc_viewer_dropped", "Video access units or audio chunks not "
                                      "sent to a viewer, by reason (late: the viewer fell behind its queue bound; "
                                      "gated: deltas before the keyframe that follows).", ["reason"], registry=r)
        self.feedback = Counter("edgeroom_webrtc_feedback", "Keyframe requests: pli_received from viewers (sent "
                                "on to the producer), pli_sent to publishers.", ["type"], registry=r)
        self.library_errors = Counter("edgeroom_webrtc_library_errors", "Errors raised inside aiortc/aioice/aiohttp "
                                      "tasks, logged and contained to their connection.", registry=r)
        self.events = Counter("edgeroom_webrtc_events_relayed", "Events sent to the web page's event streams "
                              "(SSE), and dropped for a client that does not read.", ["result"], registry=r)
        # the inbound streams' sink counters, labelled by session
        self.frames = Counter("edgeroom_webrtc_frames", "Video access units put on the bus.", ["session"],
                              registry=r)
        self.bytes = Counter("edgeroom_webrtc_bytes", "Bytes of video access units put on the bus.", ["session"],
                             registry=r)
        self.keyframes = Counter("edgeroom_webrtc_keyframes", "Keyframes put on the bus.", ["session"], registry=r)
        self.latency = Histogram("edgeroom_webrtc_to_bus_seconds", "From an access unit's arrival to the bus.",
                                 ["session"], registry=r, buckets=(.0005, .001, .002, .005, .01, .05))
        self.sink_dropped = Counter("edgeroom_webrtc_dropped_units", "Inbound access units not put on the bus, by "
                                    "reason.", ["session", "reason"], registry=r)
        self.audio = Counter("edgeroom_webrtc_audio_chunks", "Audio chunks put on the bus.", ["session"], registry=r)
        self.rebases = Counter("edgeroom_webrtc_timestamp_rebases", "Timestamp rebases of inbound streams.",
                               ["session"], registry=r)

    def sink(self, session: str) -> SinkMetrics:
        return SinkMetrics(self.frames.labels(session), self.bytes.labels(session), self.keyframes.labels(session),
                           self.latency.labels(session), _Reason(self.sink_dropped, session),
                           self.audio.labels(session), self.rebases.labels(session))

    def forget(self, session: str) -> None:
        """An ended session's series leave the scrape."""
        for metric in (self.frames, self.bytes, self.keyframes, self.latency, self.sink_dropped, self.audio,
                       self.rebases):
            for key in [k for k in getattr(metric, "_metrics", {}) if k and k[0] == session]:
                metric.remove(*key)
