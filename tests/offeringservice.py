"""A service that answers commands of its own, for the tests of forwarded commands.
Run: offeringservice.py CONFIG."""
from __future__ import annotations

import sys

from services.control.protocol import ProtocolError
from services.runtime import config as configuration
from services.runtime.service import Service


class Offering(Service):
    kind = "probe"

    def setup(self) -> None:
        self.offer("probe.echo", lambda args: {"echo": args, "pid": self.pid}, "answers with its args",
                   args={"x": object})
        self.offer("probe.refuse", self._refuse, "refuses with bad_args", args={"a": int})
        self.offer("probe.crash", lambda args: 1 / 0, "a bug in a handler")
        self.offer("probe.later", self._later, "answers after args.delay seconds", args={"delay": (int, float)},
                   required=("delay",), deadline=0.6, later=True)

    @property
    def pid(self) -> int:
        import os
        return os.getpid()

    def _refuse(self, args: dict) -> dict:
        raise ProtocolError("bad_args", f"cannot echo {sorted(args)}")

    def _later(self, args: dict, done) -> None:
        self.loop.call_later(float(args.get("delay", 0.1)), lambda: done({"late": True}))


if __name__ == "__main__":
    sys.exit(Offering(configuration.load(sys.argv[1]), None, sys.argv[1]).run())
