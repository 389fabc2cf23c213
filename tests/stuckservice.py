"""A service whose main loop blocks for a while (as a bug would): used to show the watchdog
pings stop while the loop is stuck. Run: stuckservice.py CONFIG SECONDS_BEFORE STUCK_SECONDS."""
from __future__ import annotations

import sys
import time

from services.runtime import config as configuration
from services.runtime.service import Service


class Stuck(Service):
    kind = "capture"

    def setup(self) -> None:
        self.loop.call_later(float(sys.argv[2]), lambda: time.sleep(float(sys.argv[3])))


if __name__ == "__main__":
    sys.exit(Stuck(configuration.load(sys.argv[1]), "stuck", sys.argv[1]).run())
