"""Restarts lose nothing: a recorder SIGKILLed under load takes up every target where its
file ends, from the rings' history (real box: capture with audio, decode, the recorder on
the stream and on its room; the pictures carry their frame numbers, decoded back here)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest

import framebus
from services.capture.sources.synthetic import frame_number
from tests.appliance import metric_value, wait_for

FPS = 30.0
RECORDER = """
[services.recorder]
restart_sec = 0.2
watchdog_sec = 5.0
stop_timeout = 5.0
[recorder]
dir = "{rec}"
record = "{record}"
segment_seconds = 300
fragment_seconds = 0.5
max_disk_share = 0.0
resume = {resume}
"""
CAMERA = """
kind = "synthetic"
width = 320
height = 240
fps = 30.0
gop = 1.0
audio = true
room = "lobby"
decode = {decode}
history_seconds = {history}
"""


def make_box(box, tmp_path, *, record: str = "cam, room:lobby", resume: bool = True, decode: bool = True,
             history: float = 10.0):
    rec = tmp_path / "rec"
    b = box(RECORDER.format(rec=rec, record=record, resume=str(resume).lower()))
    b.set_source("cam", CAMERA.format(decode=str(decode).lower(), history=history))
    return b, rec


def files(rec: Path, target: str) -> list[Path]:
    d = rec / target.replace(":", "-")
    return sorted([*d.glob("*.mp4"), *d.glob("*.mp4.partial")], key=lambda p: p.stat().st_mtime_ns)


def numbers(path: Path) -> list[int]:
    """The frame number drawn in each picture of the file's first video track, in order."""
    with av.open(str(path)) as f:
        return [frame_number(fr.to_ndarray(format="gray")) for fr in f.decode(video=0)]


def decode_errors(path: Path) -> str:
    out = subprocess.run(["ffmpeg", "-v", "error", "-f", "mp4", "-i", str(path), "-f", "null", "-"],
                         capture_output=True, text=True)
    return out.stderr.strip() + ("" if out.returncode == 0 else f" (exit {out.returncode})")


class Camera:
    """The camera's frame numbers as it produced them: read from the bus's own items (the
    synthetic source stamps frame n at t0 + n / fps), by a reader attached before it starts."""

    def __init__(self, prefix: str) -> None:
        self.bus = framebus.Consumer.attach("cam", prefix=prefix, missing_ok=True, start="oldest")
        self.caps: list[int] = []

    def read(self) -> None:
        while (item := self.bus.poll()) is not None:
            self.caps.append(item.capture_ns)
        assert self.bus.missed == 0

    def numbers(self) -> list[int]:
        return [round((c - self.caps[0]) * FPS / 1e9) for c in self.caps]

    def close(self) -> None:
        self.bus.close()


def kill_recorder(b, cam: Camera, times: int, every: float) -> list[float]:
    """SIGKILL the recorder `times` times, `every` s apart; the seconds each restart took to ready."""
    took = []
    for _ in range(times):
        t_end = time.monotonic() + every
        while time.monotonic() < t_end:
            cam.read()
            time.sleep(0.1)
        pid = b.services()["recorder"]["pid"]
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (s := b.services()["recorder"])["pid"] != pid and s["state"] == "ready", 15,
                 f"the recorder back; log:\n{b.log()[-3000:]}", interval=0.02)
        took.append(time.monotonic() - killed)
    return took


@pytest.mark.slow
def test_five_sigkills_under_load_lose_no_frame_and_keep_one_segment(box, tmp_path, prefix):
    b, rec = make_box(box, tmp_path, record="cam")
    cam = Camera(prefix)
    try:
        b.run()
        b.wait_ready("recorder", "capture@cam", "decode@cam")
        took = kill_recorder(b, cam, 5, 3.0)
        time.sleep(2.0)
        cam.read()
        b.call("record.stop", {"target": "cam"})
        cam.read()
    finally:
        cam.close()
    print("restart to ready (s):", [round(t, 2) for t in took])
    got = files(rec, "cam")
    assert len(got) == 1 and got[0].suffix == ".mp4", got  # one segment, continued after each kill
    assert decode_errors(got[0]) == ""
    recorded = numbers(got[0])
    produced = cam.numbers()
    assert recorded[0] == 0 and len(set(recorded)) == len(recorded), "from the first frame, none twice"
    window = [n for n in produced if recorded[0] <= n <= recorded[-1]]
    print(f"recorded {len(recorded)} of the {len(window)} frames produced meanwhile; "
          f"{len(produced)} produced in all")
    assert recorded == window, "every frame the camera produced, in order"
    assert produced[-1] - recorded[-1] < FPS, "up to the stop"
    assert max(took) < 3.0, took
