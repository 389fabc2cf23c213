"""A call transport for the tests of routes: a service that owns one session, reads its routes through
RouteBook and RouteReader (services/calls/), and writes down what it would send.

Run: sendingservice.py CONFIG NAME, where CONFIG is the box's config plus a [sendtest.NAME] table
(the box's own processes never read it: they do not know the part); tests/appliance.py's
Transport writes that config and runs it. It declares its table with
RouteKeys as a real transport does, so send_video / send_audio are checked by the one validator and
apply on reload (SIGHUP). For each item RouteReader hands it, it appends one JSON line to `out`
(track, stream, codec, keyframe, switched, capture_ns, size, and `at`, CLOCK_MONOTONIC ns when it was
handed out) and each H.264 access unit, as it came, to `out`.h264: a test decodes that file as the
peer would.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from services.calls.book import RouteBook
from services.calls.config import RouteKeys
from services.runtime import config as configuration
from services.runtime.schema import RESTART, SCHEMA, Table, setting
from services.runtime.service import AsyncService, main

BATCH = 32  # items per loop turn at most, then the loop's timers (heartbeat, watchdog) run


@dataclass(frozen=True)
class SendTestConfig(RouteKeys):
    room: str = setting("calls", "The room of its session.", RESTART)
    raw_video: bool = setting(False, "It sends raw pictures too (else H.264 only).", RESTART)
    out: str = setting("", "The file it writes what it sends to (one JSON line per item); video to OUT.h264.",
                       RESTART)


SCHEMA.add(Table("sendtest", SendTestConfig, "A test transport: one session that writes what it sends.",
                 names=r"[a-z][a-z0-9]{0,15}", owner="sendtest"))


class Sending(AsyncService):
    kind = "sendtest"

    def setup(self) -> None:
        self.cfg: SendTestConfig = self.config.sendtest[self.instance]
        self.routes = RouteBook(self, video_codecs=() if self.cfg.raw_video else ("h264",),
                                raw_video=self.cfg.raw_video)
        self.reader = self.own(self.routes.reader(self.instance, self.cfg.route()))
        self.lines = self.own(open(self.cfg.out, "a", buffering=1))
        self.video = self.own(open(self.cfg.out + ".h264", "ab"))
        self._again = False
        self.loop.add_reader(self.reader.fileno(), self._send)
        self.on_stop(lambda: self.loop.remove_reader(self.reader.fileno()))

    def _send(self) -> None:
        self._again = False
        for _ in range(BATCH):
            m = self.reader.poll()
            if m is None:
                return
            if m.codec == "h264":
                self.video.write(m.data)
                self.video.flush()
            self.lines.write(json.dumps({"track": m.track, "stream": m.stream, "codec": m.codec, "key": m.keyframe,
                                         "switched": m.switched, "capture_ns": m.capture_ns, "size": len(m.data),
                                         "at": time.clock_gettime_ns(time.CLOCK_MONOTONIC)}) + "\n")
        self._again = True                      # more may wait, its wake-up already drained: come back
        self.loop.call_later(0, self._continue)

    def _continue(self) -> None:
        if self._again:
            self._send()

    def apply(self, new: configuration.Config, changes: list[configuration.Change]) -> list[str]:
        self.routes.configure(self.instance, new.sendtest[self.instance].route())
        return [c.key for c in changes if not c.live]

    def describe(self) -> dict:
        return {"status": self.reader.summary(), "rate": 0.0,
                "sessions": [{"id": self.instance, "room": self.cfg.room, "kind": "call",
                              "tracks": self.reader.tracks()}]}


if __name__ == "__main__":
    sys.exit(main(Sending, sys.argv[2], sys.argv[1]))   # a bad config: exit 78, the reason on stderr
