"""`edgeroom bus ls` and `edgeroom bus gc`, run as the real console script."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGEROOM = shutil.which("edgeroom", path=str(Path(sys.executable).parent)) or "edgeroom"


def edgeroom(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([EDGEROOM, *args], capture_output=True, text=True, timeout=30)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_bus_ls_shows_producer_rate_consumers_and_drops(prefix, spawn):
    producer = spawn("producer", prefix, "cam", "--slots", "4", "--count", "100000", "--rate", "100")
    ready = producer.expect("ready")
    slow = spawn("consumer", prefix, "cam", "--sleep", "0.1", "--timeout", "60")
    slow.expect("ready")
    time.sleep(2.5)  # the rate is published once a second; drops need the slow one to fall behind
    rows = json.loads(edgeroom("bus", "ls", "--prefix", prefix, "--json").stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["stream"] == "cam" and row["status"] == "alive" and row["kind"] == "video"
    assert row["producer_pid"] == ready["pid"] == producer.pid
    assert 60 < row["rate_hz"] < 140
    assert [c["pid"] for c in row["consumers"]] == [slow.pid]
    assert row["drops"] > 50 and row["drops"] == row["consumers"][0]["missed"]
    text = edgeroom("bus", "ls", "--prefix", prefix).stdout
    header, line = text.splitlines()
    assert header.split()[:5] == ["STREAM", "KIND", "PRODUCER", "STATUS", "GEN"]
    assert line.split()[:4] == ["cam", "video", str(producer.pid), "alive"]
    slow.kill()
    producer.kill(signal.SIGTERM)


def test_bus_gc_removes_only_what_is_stale(prefix, spawn):
    dead = spawn("producer", prefix, "dead", "--count", "3", "--linger", "30")
    dead.expect("done")
    live = spawn("producer", prefix, "live", "--count", "3", "--linger", "30")
    live.expect("done")
    dead.kill(signal.SIGKILL)
    listed = json.loads(edgeroom("bus", "ls", "--prefix", prefix, "--json").stdout)
    statuses = {r["stream"]: r["status"] for r in listed}
    assert statuses == {"dead": "stale", "live": "alive"}
    out = edgeroom("bus", "gc", "--prefix", prefix).stdout
    assert f"removed /dev/shm/{prefix}.dead\n" in out
    assert f"{prefix}.live" not in out.replace(f"{prefix}.live.", "")  # only the dead one's files
    assert os.path.exists(f"/dev/shm/{prefix}.live")
    assert edgeroom("bus", "gc", "--prefix", prefix).stdout == "nothing stale\n"
    live.kill(signal.SIGTERM)


def test_bad_prefix_is_a_usage_error():
    out = edgeroom("bus", "ls", "--prefix", "bad/prefix", check=False)
    assert out.returncode == 1
    assert "bad prefix name 'bad/prefix'" in out.stderr


@pytest.mark.slow
def test_demo_runs_and_cleans_up():
    out = subprocess.run([EDGEROOM, "bus", "demo", "--seconds", "3", "--prefix", f"demo{os.getpid()}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "frames/s" in out.stdout
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"demo{os.getpid()}.")]


@pytest.mark.slow
def test_appliance_demo_shows_the_box_and_cleans_up(tmp_path, prefix):
    rundir = Path("/tmp") / f"erdemo{os.getpid()}"
    env = {**os.environ, "EDGEROOM_BOX__RUNTIME_DIR": str(rundir), "EDGEROOM_BUS__PREFIX": prefix,
           "EDGEROOM_HUB__METRICS_LISTEN": "127.0.0.1:0"}
    out = subprocess.run([EDGEROOM, "demo", "--seconds", "6"], capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"capture@synthetic\s+ready", out.stdout), out.stdout
    assert re.search(r"synthetic\s+default\s+capture@synthetic\s+camera", out.stdout), out.stdout
    assert "run: all stopped" in out.stdout
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix + ".")]
    assert not (rundir / "control.sock").exists()
