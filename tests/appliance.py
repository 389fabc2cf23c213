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


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
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
        return wait_for(ready, timeout, f"{', '.join(ids)} ready; log:\n{self.log()[-3000:]}")

    def subscriber(self, *patterns: str) -> Subscriber:
        sub = Subscriber(self.events, list(patterns) or ["*"])
        sub.wait_ready(self.client())
        return sub

    def scrape(self) -> str:
        url = self.call("status")["metrics_url"]
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

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
