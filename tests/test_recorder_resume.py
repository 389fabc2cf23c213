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
from tests.media_files import flashes_and_beeps

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
        self.gens: list[int] = []

    def read(self) -> None:
        while (item := self.bus.poll()) is not None:
            self.caps.append(item.capture_ns)
            self.gens.append(item.generation)
        assert self.bus.missed == 0

    def numbers(self) -> list[int]:
        """Frame numbers of one capture process (it draws from 0)."""
        return [round((c - self.caps[0]) * FPS / 1e9) for c in self.caps]

    def runs(self) -> list[tuple[list[int], list[int]]]:
        """Per capture process (ring generation): its frame numbers and capture times."""
        out: dict[int, tuple[list[int], list[int]]] = {}
        for g, c in zip(self.gens, self.caps):
            nums, caps = out.setdefault(g, ([], []))
            caps.append(c)
            nums.append(round((c - caps[0]) * FPS / 1e9))
        return list(out.values())

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
        wait_for(lambda old=pid: (s := b.services()["recorder"])["pid"] != old and s["state"] == "ready", 15,
                 f"the recorder back; log:\n{b.log()[-3000:]}", interval=0.02)
        took.append(time.monotonic() - killed)
    return took




def check_stream(rec: Path, cam: Camera, target: str = "cam") -> tuple[int, int]:
    """The target's one file holds every frame the camera produced from its first to its last,
    each once, in order; (recorded, produced meanwhile)."""
    got = files(rec, target)
    assert len(got) == 1 and got[0].suffix == ".mp4", got  # one segment, continued after each kill
    assert decode_errors(got[0]) == ""
    recorded = numbers(got[0])
    produced = cam.numbers()
    assert len(set(recorded)) == len(recorded), "no frame twice"
    window = [n for n in produced if recorded[0] <= n <= recorded[-1]]
    print(f"{target}: recorded {len(recorded)} of the {len(window)} frames produced meanwhile "
          f"({len(produced)} produced in all, from {recorded[0]} to {recorded[-1]})")
    jumps = [(a, b) for a, b in zip(recorded, recorded[1:]) if b != a + 1]
    assert recorded == window, f"every frame the camera produced, in order; jumps {jumps}"
    assert produced[-1] - recorded[-1] < FPS, "up to the stop"
    return len(recorded), len(window)


@pytest.mark.slow
def test_five_sigkills_under_load_lose_no_frame_and_keep_the_room_in_sync(box, tmp_path, prefix):
    """Capture with its tone, its decoder, the recorder on the stream and on the room: five
    SIGKILLs of the recorder, 3 s apart. Each target is one file holding every frame the camera
    produced, once; the room's flashes and beeps stay within 40 ms; each restart is ready
    within 3 s."""
    b, rec = make_box(box, tmp_path)
    cam = Camera(prefix)
    try:
        b.run()
        b.wait_ready("recorder", "capture@cam", "decode@cam")
        with b.subscriber("record.started") as sub:
            wait_for(lambda: (e := sub.recv(timeout=0.5)) is not None and e.data["target"] == "room:lobby", 15,
                     f"the room recording started; log:\n{b.log()[-3000:]}")
        took = kill_recorder(b, cam, 5, 3.0)
        time.sleep(3.0)
        cam.read()
        b.call("record.stop", {"target": "cam"})
        b.call("record.stop", {"target": "room:lobby"})
        cam.read()
        gaps = metric_value(b.scrape(), "edgeroom_recorder_gaps_total")
    finally:
        cam.close()
    print("restart to ready (s):", [round(t, 2) for t in took])
    assert max(took) < 3.0, took
    assert "start limit hit" not in b.log() and "in a row" not in b.log(), "healthy runs: no crash loop"
    assert not gaps, "no gap reported"
    check_stream(rec, cam)
    room = files(rec, "room:lobby")
    assert len(room) == 1 and room[0].suffix == ".mp4", room
    assert decode_errors(room[0]) == ""
    check_stream(rec, cam, "room:lobby")
    flashes, beeps = flashes_and_beeps(room[0])
    inside = [t for t in flashes if min(beeps) - 0.5 < t < max(beeps) + 0.5]
    offsets = [min(beeps, key=lambda x: abs(x - t)) - t for t in inside]
    print("room: flash -> beep (ms):", [round(float(o) * 1000, 1) for o in offsets])
    assert len(inside) >= 15 and len(beeps) >= 15, (flashes, beeps)
    assert all(abs(o) <= 0.040 for o in offsets), offsets
    steps = np.diff(beeps)
    assert np.all(np.abs(steps - 1.0) < 0.03), f"a beep each second, none lost or doubled: {steps}"


def packet_times(path: Path) -> list[float]:
    """pts (s) of the file's first video track, in order."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def gap_events(sub) -> list:
    out = []
    while (ev := sub.recv(timeout=0.3)) is not None:
        if ev.topic == "record.gap":
            out.append(ev.data)
    return out


def test_a_recorder_down_longer_than_the_history_reports_the_overrun_with_its_length(box, tmp_path, prefix):
    """A 2 s history and a recorder that stops reading for 4 s, then is killed: the file goes on
    after a hole as long as what the ring no longer held (plus the wait for a keyframe), with its
    true timestamps; record.gap {reason: overrun, seconds} and the metric say how long."""
    b, rec = make_box(box, tmp_path, record="cam, room:lobby", decode=False, history=2.0)
    b.run()
    b.wait_ready("recorder", "capture@cam")
    with b.subscriber("record.started") as sub:
        wait_for(lambda: (e := sub.recv(timeout=0.5)) is not None and e.data["target"] == "room:lobby", 15,
                 f"the room recording started; log:\n{b.log()[-3000:]}")
    time.sleep(2.0)
    sub = b.subscriber("record.gap")
    pid = b.services()["recorder"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # not reading, not writing (below the 5 s watchdog)
    time.sleep(4.0)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (s := b.services()["recorder"])["pid"] != pid and s["state"] == "ready", 15, "the recorder back")
    time.sleep(3.0)
    gaps = gap_events(sub)
    sub.close()
    text = b.scrape()
    b.call("record.stop", {"target": "cam"})
    b.call("record.stop", {"target": "room:lobby"})
    got = files(rec, "cam")
    assert len(got) == 1 and decode_errors(got[0]) == "", got  # the same segment, after the hole
    nums, pts = numbers(got[0]), packet_times(got[0])
    jumps = [(i, a, b2) for i, (a, b2) in enumerate(zip(nums, nums[1:])) if b2 != a + 1]
    assert len(jumps) == 1, jumps
    i, before, after = jumps[0]
    missing = (after - before - 1) / FPS
    assert abs((pts[i + 1] - pts[i]) - (after - before) / FPS) < 0.005, "the hole is in the timeline, true to time"
    mine = [g for g in gaps if g["target"] == "cam"]
    print(f"cam: {missing:.3f} s missing in the file; record.gap: {gaps}")
    assert len(mine) == 1 and mine[0]["reason"] == "overrun", gaps
    assert missing > 1.0 and abs(mine[0]["seconds"] - missing) <= 1.5 / FPS, (mine, missing)
    assert metric_value(text, "edgeroom_recorder_gap_seconds_total", target="cam", reason="overrun") == \
        mine[0]["seconds"]
    room = {g["track"]: g for g in gaps if g["target"] == "room:lobby"}
    assert set(room) == {"cam/video", "cam/audio"} and all(g["reason"] == "overrun" for g in room.values()), gaps
    rooms = files(rec, "room:lobby")
    assert len(rooms) == 1 and decode_errors(rooms[0]) == "", rooms
    rnums = numbers(rooms[0])
    rjumps = [(a, b2) for a, b2 in zip(rnums, rnums[1:]) if b2 != a + 1]
    assert len(rjumps) == 1 and abs(room["cam/video"]["seconds"] - (rjumps[0][1] - rjumps[0][0] - 1) / FPS) \
        <= 1.5 / FPS, (rjumps, room)
    flashes, beeps = flashes_and_beeps(rooms[0])
    longest = max(np.diff(beeps))  # the beeps (one a second) the hole took: its length, to the beep
    assert longest - 1.15 <= room["cam/audio"]["seconds"] <= longest + 0.15, (beeps, room)
    # in sync on both sides of the hole; the first beep after it may have lost its head to it
    cut = beeps[int(np.argmax(np.diff(beeps))) + 1]
    inside = [t for t in flashes if min(beeps) - 0.5 < t < max(beeps) + 0.5 and abs(t - cut) > 0.5]
    assert len(inside) >= 5
    assert all(abs(min(beeps, key=lambda x: abs(x - t)) - t) <= 0.040 for t in inside), (flashes, beeps)


def test_a_capture_outage_is_a_gap_with_true_timestamps_in_the_same_segment(box, tmp_path, prefix):
    """capture@cam is killed and comes back: the recording goes on in the same file, every frame
    of both capture processes in it, the outage a hole in the timeline as long as it was (no
    splice), and record.gap {reason: source, seconds} says so, for the stream and the room."""
    b, rec = make_box(box, tmp_path, record="cam, room:lobby", decode=False)
    cam = Camera(prefix)
    try:
        b.run()
        b.wait_ready("recorder", "capture@cam")
        with b.subscriber("record.started") as sub:
            wait_for(lambda: (e := sub.recv(timeout=0.5)) is not None and e.data["target"] == "room:lobby", 15,
                     f"the room recording started; log:\n{b.log()[-3000:]}")
        sub = b.subscriber("record.gap")
        time.sleep(2.0)
        cam.read()
        pid = b.services()["capture@cam"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (s := b.services()["capture@cam"])["pid"] != pid and s["state"] == "ready", 15,
                 "capture back")
        t_end = time.monotonic() + 4.0
        while time.monotonic() < t_end:
            cam.read()
            time.sleep(0.1)
        gaps = gap_events(sub)
        sub.close()
        b.call("record.stop", {"target": "cam"})
        b.call("record.stop", {"target": "room:lobby"})
        cam.read()
    finally:
        cam.close()
    runs = cam.runs()
    assert len(runs) == 2, "two capture processes"
    (nums1, caps1), (nums2, caps2) = runs
    outage = (caps2[0] - caps1[-1]) / 1e9 - 1 / FPS  # from the bus: the frames that never were
    got = files(rec, "cam")
    assert len(got) == 1 and decode_errors(got[0]) == "", got
    nums, pts = numbers(got[0]), packet_times(got[0])
    cut = next(i for i, (a, b2) in enumerate(zip(nums, nums[1:])) if b2 != a + 1) + 1
    assert nums[cut:] == nums2[:len(nums) - cut], "the new process's frames, from its first"
    assert nums[:cut] == [n for n in nums1 if nums[0] <= n], "the old process's, to its last"
    hole = pts[cut] - pts[cut - 1] - 1 / FPS
    mine = [g for g in gaps if g["target"] == "cam"]
    print(f"outage on the bus {outage:.3f} s, in the file {hole:.3f} s; record.gap: {gaps}")
    assert abs(hole - outage) < 0.005, "the file's timeline holds the outage as it was"
    assert len(mine) == 1 and mine[0]["reason"] == "source" and abs(mine[0]["seconds"] - outage) < 0.005, gaps
    room = {g["track"]: g for g in gaps if g["target"] == "room:lobby"}
    assert room.get("cam/video", {}).get("reason") == "source", gaps
    assert abs(room["cam/video"]["seconds"] - outage) < 0.005, gaps
    rooms = files(rec, "room:lobby")
    assert len(rooms) == 1 and decode_errors(rooms[0]) == "", rooms
    rnums, rpts = numbers(rooms[0]), packet_times(rooms[0])
    j = next(i for i, (a, b2) in enumerate(zip(rnums, rnums[1:])) if b2 != a + 1) + 1
    assert rnums[:j] == [n for n in nums1 if n >= rnums[0]] and rnums[j:] == nums2[:len(rnums) - j], \
        "the room's video: every frame of both capture processes"
    assert abs(rpts[j] - rpts[j - 1] - 1 / FPS - outage) < 0.005, "the room's timeline holds the outage too"
    flashes, beeps = flashes_and_beeps(rooms[0])
    after = [t for t in flashes if t > rpts[j] and t < max(beeps) - 0.5]
    assert after and all(abs(min(beeps, key=lambda x: abs(x - t)) - t) <= 0.040 for t in after), (flashes, beeps)


def test_resume_off_starts_at_the_live_edge_in_a_new_segment(box, tmp_path, prefix):
    """`[recorder] resume = false`, the naive recorder a benchmark compares against: after a
    SIGKILL the recording starts again at the live edge, in a new segment, and what came while
    it was down is not in any file."""
    b, rec = make_box(box, tmp_path, record="cam", resume=False, decode=False)
    cam = Camera(prefix)
    try:
        b.run()
        b.wait_ready("recorder", "capture@cam")
        kill_recorder(b, cam, 1, 3.0)
        time.sleep(3.0)
        b.call("record.stop", {"target": "cam"})
        cam.read()
    finally:
        cam.close()
    got = files(rec, "cam")
    assert len(got) == 2 and all(f.suffix == ".mp4" for f in got), got
    first, second = numbers(got[0]), numbers(got[1])
    lost = second[0] - first[-1] - 1
    print(f"resume off: {lost} frames ({lost / FPS:.2f} s) lost to the restart")
    assert lost > FPS / 2 and first == list(range(first[0], first[-1] + 1)), (first[-3:], second[:3])


def test_a_recorder_that_dies_at_start_is_given_up_by_the_start_limit(box, tmp_path):
    """Crash-loop protection holds for the recorder: its recordings directory is a file, so every
    start fails before it is ready; the supervisor backs off and gives up at the start limit
    (while a recorder killed after healthy runs, as above, is restarted every time)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    b = box(RECORDER.format(rec=blocker, record="cam", resume="true").replace(
        "restart_sec = 0.2", "restart_sec = 0.1\nstart_limit_burst = 4"))
    b.run()
    wait_for(lambda: "recorder: start limit hit" in b.log(), 25, "the recorder given up")
    log = b.log()
    assert "recorder: start limit hit (4 starts in 30 s)" in log
    assert "failure 3 in a row" in log
    assert b.services()["capture@cam"]["state"] == "ready"  # the rest of the box runs on
