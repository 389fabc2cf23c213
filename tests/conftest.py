"""Shared fixtures: a private bus prefix per test, and real child processes to drive."""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import framebus

HERE = Path(__file__).parent
BUSPROC = HERE / "busproc.py"
_counter = itertools.count()
# Test workers of the default run (pyproject.toml's addopts: -n auto --dist loadfile). Most tests
# wait on child processes, sockets and timers, so two workers nearly halve the run on two cores.
WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: serial (0 workers) when the marker expression may select a benchmark (they measure
    the CPU and must have the machine to themselves: `-m bench`, or `-m ''`), else WORKERS;
    PYTEST_XDIST_AUTO_NUM_WORKERS overrides WORKERS, `-n N` overrides both."""
    from _pytest.mark.expression import Expression

    expr = config.option.markexpr
    if not expr or Expression.compile(expr).evaluate(lambda name, **kwargs: name == "bench"):
        return 0
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None   # xdist's own hook reads it
    return WORKERS


def shm_leftovers(prefix: str) -> list[str]:
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(prefix + "."))


@pytest.fixture
def prefix():
    """A bus prefix no other test uses; the test must leave nothing under it."""
    name = f"t{os.getpid()}x{next(_counter)}"
    yield name
    framebus.gc(name)
    left = shm_leftovers(name)
    for f in left:  # clean up anyway, so one failure does not cascade
        try:
            os.unlink(f"/dev/shm/{f}")
        except FileNotFoundError:
            pass
    assert not left, f"segments left behind: {left}"


class Proc:
    """A child process whose stdout is a stream of JSON events."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, text=True,
        )
        self._events: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        for line in self.popen.stdout:
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                self._events.put({"event": "text", "line": line})
        self._events.put(None)

    def _pump_err(self) -> None:
        for line in self.popen.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]  # bounded: keep the last 200 lines

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def expect(self, event: str, timeout: float = 10.0) -> dict:
        """Wait for the next event named `event` (earlier other events are skipped)."""
        while True:
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"{self.args[1]} {self.pid}: no {event!r} within {timeout}s; stderr:\n{self.stderr}"
                ) from None
            if ev is None:
                self.popen.wait(timeout=5)
                raise AssertionError(
                    f"{self.args[1]} {self.pid} exited ({self.popen.returncode}) before {event!r}; "
                    f"stderr:\n{self.stderr}"
                )
            if ev.get("event") == event:
                return ev

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        self.popen.wait(timeout=10)

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.popen.wait(timeout=timeout)
        return rc


@pytest.fixture
def spawn():
    """spawn(role, *args, env=None) -> Proc running tests/busproc.py; all killed at teardown."""
    procs: list[Proc] = []

    def _spawn(*args: str, env: dict | None = None) -> Proc:
        proc = Proc([str(BUSPROC), *map(str, args)], env)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        proc.kill()


@pytest.fixture
def box(prefix):
    """A private box (config, runtime dir, bus prefix); every process it started is stopped after."""
    from tests.appliance import Box

    made: list[Box] = []

    def make(extra: str = "") -> Box:
        b = Box(prefix, extra)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def benchmark_module(name: str):
    """benchmarks/NAME.py (a script, not a package member) loaded as the module `bench_NAME`, for
    a module-scoped fixture: `yield from benchmark_module("rtp")`; unloaded after."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
