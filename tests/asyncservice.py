"""A service on asyncio (AsyncService), for the tests of that flavour of the service loop.
Run: asyncservice.py CONFIG [fail]   (with `fail`, a task of its own raises after 0.5 s)."""
from __future__ import annotations

import asyncio
import sys

from services.runtime import config as configuration
from services.runtime.service import AsyncService


class Echo(AsyncService):
    kind = "probe"

    def setup(self) -> None:
        self.ticks = 0
        self.offer("probe.sleep", self._sleep, "answers from a coroutine after args.delay seconds",
                   args={"delay": (int, float)}, required=("delay",), deadline=5.0, later=True)

    async def started(self) -> None:
        if sys.argv[2:3] == ["fail"]:
            await asyncio.sleep(0.5)
            print(1 / 0)  # a bug in a task
        while True:
            await asyncio.sleep(0.05)
            self.ticks += 1

    def _sleep(self, args: dict, done) -> None:
        async def answer() -> None:
            await asyncio.sleep(args["delay"])
            done({"slept": args["delay"], "ticks": self.ticks})
        self.loop.spawn(answer())

    def describe(self) -> dict:
        return {"status": f"asyncio, {self.ticks} ticks", "rate": 0.0}


if __name__ == "__main__":
    sys.exit(Echo(configuration.load(sys.argv[1]), None, sys.argv[1]).run())
