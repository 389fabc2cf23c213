"""A service whose main loop blocks for a while (as a bug would): used to show the watchdog
pings stop while the loop is stuck. Run: stuckservice.py CONFIG SECONDS_BEFORE STUCK_SECONDS [asyncio]
(with `asyncio`, an AsyncService whose coroutine blocks its asyncio loop)."""
from __future__ import annotations

import asyncio
import sys
import time

from services.runtime import config as configuration
from services.runtime.service import AsyncService, Service


class Stuck(Service):
    kind = "capture"

    def setup(self) -> None:
        self.loop.call_later(float(sys.argv[2]), lambda: time.sleep(float(sys.argv[3])))


class StuckAsync(AsyncService):
    kind = "capture"

    async def started(self) -> None:
        await asyncio.sleep(float(sys.argv[2]))
        time.sleep(float(sys.argv[3]))  # a blocking call in a coroutine: the whole asyncio loop stops


if __name__ == "__main__":
    cls = StuckAsync if sys.argv[4:5] == ["asyncio"] else Stuck
    sys.exit(cls(configuration.load(sys.argv[1]), "stuck", sys.argv[1]).run())
