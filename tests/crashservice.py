"""A service that dies: before it is ready (AFTER < 0: its setup fails), or AFTER seconds after it
is ready (as a crash would, with no STOPPING=1). Run: crashservice.py CONFIG AFTER."""
from __future__ import annotations

import os
import sys

from services.runtime import config as configuration
from services.runtime.service import Service


class Crash(Service):
    kind = "capture"

    def setup(self) -> None:
        after = float(sys.argv[2])
        if after < 0:
            raise RuntimeError("broken at start (tests/crashservice.py)")
        self.loop.call_later(after, lambda: os._exit(3))


if __name__ == "__main__":
    sys.exit(Crash(configuration.load(sys.argv[1]), "crash", sys.argv[1]).run())
