"""The avatar service's metrics (docs/metrics.md), labelled by avatar; an avatar's series leave when it stops."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AvatarMetrics"]


class AvatarMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        a = ["avatar"]
        self.frames = Counter("edgeroom_avatar_frames", "Pictures put on the bus, by what they are: provider (a "
                              "frame made for its audio), idle (the face at rest), held (the voice went out without "
                              "its frame, with the last picture), repeated (the last picture again: no voice was "
                              "due).", a + ["kind"], registry=r)
        self.audio = Counter("edgeroom_avatar_audio_seconds", "Seconds of audio put on the bus.", a, registry=r)
        self.voice = Counter("edgeroom_avatar_voice_seconds", "Seconds of driving audio taken in, by where from: "
                             "bus (a stream) or pushed (avatar.say).", a + ["source"], registry=r)
        self.voice_dropped = Counter("edgeroom_avatar_voice_dropped", "Driving audio chunks not taken, by reason: "
                                     "wrong_kind, bad_format, torn, missed, error, too_much.", a + ["reason"],
                                     registry=r)
        self.turns = Counter("edgeroom_avatar_turns", "Turns: the voice started, then stopped for turn_gap "
                             "seconds (flushed).", a, registry=r)
        self.errors = Counter("edgeroom_avatar_provider_errors", "Provider failures, by reason (down, timeout, "
                              "garbage, refused, auth, unavailable, closed).", a + ["provider", "reason"],
                              registry=r)
        self.connects = Counter("edgeroom_avatar_provider_connects", "Provider sessions started (the first and "
                                "every reconnection).", a, registry=r)
        self.dropped_frames = Counter("edgeroom_avatar_dropped_frames", "Provider frames not shown, by reason: "
                                      "late (its audio had gone out without it), unpaired (more frames than audio), "
                                      "bus (the bus refused the write).",
                                      a + ["reason"], registry=r)
        self.up = Gauge("edgeroom_avatar_provider_up", "1 while the avatar's provider session is up.", a, registry=r)
        self.latency = Histogram("edgeroom_avatar_audio_to_frame_seconds", "From the capture time of a frame's "
                                 "audio to the frame and its audio on the bus.", a, registry=r,
                                 buckets=(0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0))

    def forget(self, avatar: str) -> None:
        for m in (self.frames, self.audio, self.voice, self.voice_dropped, self.turns, self.errors, self.connects,
                  self.dropped_frames, self.up, self.latency):
            for labels in list(m._metrics):     # prometheus_client keeps children by label tuple
                if labels[0] == avatar:
                    m.remove(*labels)
