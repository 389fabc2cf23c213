"""A real box for tests: a config in a short private runtime directory, `edgeroom run` or one
service as child processes, and a control client pointed at it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from services.control.client import Client, HubUnreachable, Subscriber

FAST = """
[log]
level = "debug"
[hub]
heartbeat_interval = 0.2
stale_after = 1.5
session_grace = 2.0
metrics_listen = "127.0.0.1:0"
[hooks.BEFORE_BRIDGE_VIDEO]
deadline = 0.3
on_timeout = "block"
[services.hub]
restart_sec = 0.2
watchdog_sec = 3.0
stop_timeout = 2.0
[services.capture]
restart_sec = 0.2
watchdog_sec = 1.5
stop_timeout = 1.0
[sources.cam]
width = 320
height = 240
fps = 30.0
room = "lobby"
encode = "raw"      # supervision tests: one capture process, pictures straight on the bus
"""

# Services a test box runs only when the test asks for them with a [services.KIND] table.
OPT_IN = ("vision", "recorder")


def wait_for(predicate, timeout: float, what, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail with `what` (a string, or a function
    that makes it then: a log read when the wait failed, not when it began) after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (HubUnreachable, OSError, KeyError, ValueError) as exc:
            last_exc = exc
        time.sleep(interval)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_exc})")


class Box:
    def __init__(self, prefix: str, extra: str = "") -> None:
        self.prefix = prefix
        self.dir = Path(tempfile.mkdtemp(prefix="er", dir="/tmp"))
        self.rundir = self.dir / "run"
        self.config = self.dir / "edgeroom.toml"
        extra = extra.replace("{dir}", str(self.dir))
        for kind in OPT_IN:  # off unless the test's extra config has its [services.KIND] table
            if f"[services.{kind}]" not in extra:
                extra += f"\n[services.{kind}]\nenabled = false\n"
        self.config.write_text(f'[box]\nruntime_dir = "{self.rundir}"\n[bus]\nprefix = "{prefix}"\n{FAST}{extra}')
        self.log_path = self.dir / "out.log"
        self.procs: list[subprocess.Popen] = []
        self._client: Client | None = None

    def set_source(self, name: str, body: str) -> None:
        """Replace the config's [sources.NAME] table (whatever keys it had: they are its kind's) with `body`."""
        text = re.sub(rf"(?ms)^\[sources\.{re.escape(name)}\]\n.*?(?=^\[|\Z)", "", self.config.read_text())
        self.config.write_text(f"{text.rstrip()}\n\n[sources.{name}]\n{body.strip()}\n")

    # --- processes ---------------------------------------------------------------------
    def spawn(self, *args: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
        env["EDGEROOM_CONFIG"] = str(self.config)
        log = open(self.log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def run(self) -> subprocess.Popen:
        self.runner = self.spawn("run")
        return self.runner

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- the hub ---------------------------------------------------------------------------
    @property
    def control(self) -> str:
        return f"ipc://{self.rundir}/control.sock"

    @property
    def events(self) -> str:
        return f"ipc://{self.rundir}/events.sock"

    @property
    def events_in(self) -> str:
        return f"ipc://{self.rundir}/events-in.sock"

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.control, timeout=1.0)
        return self._client

    def call(self, cmd: str, args: dict | None = None):
        return self.client().call(cmd, args)

    def services(self) -> dict[str, dict]:
        return {s["service"]: s for s in self.call("status")["services"]}

    def wait_ready(self, *ids: str, timeout: float = 20.0) -> dict[str, dict]:
        def ready():
            rows = self.services()
            return rows if all(rows.get(i, {}).get("state") == "ready" for i in ids) else None
        return wait_for(ready, timeout, lambda: f"{', '.join(ids)} ready; log:\n{self.log()[-3000:]}")

    def subscriber(self, *patterns: str) -> Subscriber:
        sub = Subscriber(self.events, list(patterns) or ["*"])
        sub.wait_ready(self.client())
        return sub

    def scrape(self) -> str:
        url = self.call("status")["metrics_url"]
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def settled_scrape(self, *services: str, timeout: float = 5.0) -> str:
        """A scrape whose samples of `services` were all taken after this call. The hub shows each
        service's metrics as of its last heartbeat, so a count read right after the event it counts
        can lag it by a heartbeat. The heartbeat counter goes up after the snapshot it carries is
        taken: two more than now means a snapshot taken since."""
        def beats(page: str) -> list[float | None]:
            return [metric_value(page, "edgeroom_service_heartbeats_total", service=s) for s in services]
        start = beats(self.scrape())
        assert None not in start, f"no heartbeats from {services}"
        def later():
            page = self.scrape()
            return page if all(n is not None and n >= s + 2 for n, s in zip(beats(page), start)) else None
        return wait_for(later, timeout, f"two heartbeats from each of {', '.join(services)}")

    # --- cleanup ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Transport:
    """tests/sendingservice.py, a test call transport, for one session NAME of the box: its config is the
    box's plus [sendtest.NAME] (`keys`: send_video, send_audio, raw_video, room), which the box's own
    processes never read. It writes what it sends to `out` (JSON lines) and its H.264 to `out`.h264."""

    def __init__(self, box: Box, name: str, **keys: object) -> None:
        self.box, self.name, self.out = box, name, box.dir / f"sent-{name}.jsonl"
        self.config = box.dir / f"transport-{name}.toml"
        table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in {**keys, "out": str(self.out)}.items())
        self.config.write_text(f"{box.config.read_text()}\n[sendtest.{name}]\n{table}")
        for old in (self.out, Path(f"{self.out}.h264")):  # an earlier Transport's: this one starts afresh
            old.unlink(missing_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
        with open(self.box.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "sendingservice.py"),
                                          str(self.config), self.name], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.box.procs.append(self.proc)
        if wait:
            wait_for(self.session, 15, f"the transport's session; log:\n{self.box.log()[-3000:]}")
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=10) == 0

    def session(self) -> dict | None:
        return next((s for s in self.box.call("sessions") if s["session"] == self.name), None)

    def sent(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines()] if self.out.exists() else []

    def video(self) -> list[dict]:
        return [x for x in self.sent() if x["track"] == "video"]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text exposition, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample != name:
            continue
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if all(f'{k}="{v}"' in got.split(",") for k, v in labels.items()) or got == want:
            return float(value)
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
