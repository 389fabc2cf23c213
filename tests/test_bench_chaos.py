"""benchmarks/chaos.py: its schedule and log reading, and one short run end to end (two real boxes,
real SIGKILLs, the recordings decoded) holding the benchmark to its own promises: both rows, every
kill made and answered by a ready service, a clean box afterwards, a complete JSON. Not the
recall figure: what a restarted recorder keeps is the recorder's tests' business."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import benchmark_module, shm_leftovers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chaos():
    yield from benchmark_module("chaos")


def test_schedule_is_seeded_rounds_of_every_service_and_spares_the_tail(chaos):
    plan = chaos.Plan(seconds=60.0, every=3.0)
    a = chaos.schedule(7, plan)
    assert a == chaos.schedule(7, plan) and a != chaos.schedule(8, plan)
    victims = [k["victim"] for k in a]
    n = len(chaos.VICTIMS)
    for i in range(0, len(victims) - n + 1, n):  # each full round kills each service once
        assert sorted(victims[i:i + n]) == sorted(chaos.VICTIMS)
    assert all(x != y for x, y in zip(victims, victims[1:]))  # never the same one twice in a row
    times = [k["at_s"] for k in a]
    assert times == sorted(times) and times[-1] <= plan.seconds - chaos.QUIET_TAIL_S
    assert all(2.0 <= y - x <= 4.0 for x, y in zip(times, times[1:]))  # every 3 s, +-0.5 s each


def test_supervisor_lines_are_read_with_their_times_and_pids(chaos):
    since = time.mktime((2026, 12, 7, 4, 0, 0, 0, 0, -1))
    log = "\n".join([
        "04:13:27.998 info    run: capture@cam: started (pid 30741)",
        "04:13:28.300 info    capture@cam: ready (pid 30741)",  # the service's own line: not the supervisor's
        "04:13:28.300 info    run: capture@cam: ready after 0.31 s",
        "04:13:31.477 warning run: hub: exited (signal SIGKILL); restarting in 0.50 s",
        "04:13:32.022 info    run: hub: started (pid 30768)",
    ])
    ev = chaos.supervisor_events(log, since)
    assert [(e["service"], e["what"], e["pid"]) for e in ev] == [
        ("capture@cam", "started", 30741), ("capture@cam", "ready", 0), ("hub", "exited", 0), ("hub", "started", 30768)]
    assert ev[1]["t"] - since == pytest.approx(13 * 60 + 28.3)
    assert "SIGKILL" in ev[2]["how"]
    assert chaos.current(ev, "capture@cam") == (30741, True)
    assert chaos.current(ev, "hub") == (30768, False)  # started again, not ready yet
    kills = [{"victim": "hub", "t": ev[2]["t"] - 0.1}]
    chaos.ready_times(kills, ev + [{"t": ev[2]["t"] + 0.9, "service": "hub", "what": "ready", "pid": 0, "how": ""}])
    assert kills[0]["ready_s"] == pytest.approx(1.0)


def test_lost_frames_are_put_down_to_the_kill_that_explains_them(chaos):
    s = 1_000_000_000
    produced = [(t * s, (1, t)) for t in range(10)] + [(t * s, (2, t - 20)) for t in range(20, 30)]
    lost = {(1, 3), (1, 4), (1, 9), (2, 0), (2, 1)}  # 3-4 one span; 9 and the next run's 0-1 are two
    kills = [{"victim": "capture@cam", "mono_ns": 1 * s},  # 2 s before the first span
             {"victim": "recorder", "mono_ns": 4 * s},     # 1 s after it began: the recorder lost what it held
             {"victim": "capture@cam", "mono_ns": 18 * s},  # 2 s before the new run's lost start
             {"victim": "hub", "mono_ns": 21 * s},  # 1 s after it began: only a recorder's kill loses the past
             {"victim": "hub", "mono_ns": 28 * s, "skipped": "not ready"}]
    got = chaos._losses(produced, lost, kills, 0)
    assert got["lost_spans"] == 3
    # 9: the last kill up to 5 s before it (the recorder's)
    assert [(x["at_s"], x["kill"]) for x in got["lost"]] == [(3, "recorder"), (9, "recorder"), (20, "capture@cam")]
    assert got["lost_s_by_victim"] == {"recorder": pytest.approx(3 / 30, abs=1e-3),
                                       "capture@cam": pytest.approx(2 / 30, abs=1e-3)}
    assert got["max_lost_s"] == pytest.approx(2 / 30, abs=1e-3)
    assert chaos._losses(produced, lost, [], 0)["lost_s_by_victim"] == {"no kill": pytest.approx(5 / 30, abs=1e-3)}


def test_every_beep_is_found_wherever_its_start_falls_in_a_block(chaos):
    """A beep each second (100 ms of 1 kHz), its start at every offset within the detector's 5 ms
    block: each found, within a block of its place (a restarted capture's audio lands anywhere:
    a start in a block's last samples made a block too loud to be quiet and too quiet to be the
    beep, and a whole capture run's beeps went unfound)."""
    import numpy as np
    rate, block = chaos.AUDIO_RATE, chaos.AUDIO_RATE // 200
    for shift in range(0, block, 7):
        audio = np.zeros(rate * 4, np.int16)
        starts = [rate // 2 + k * rate + shift for k in range(3)]
        t = np.arange(rate // 10) / rate
        for s0 in starts:
            audio[s0:s0 + len(t)] = (np.sin(2 * np.pi * 1000 * t) * 16000).astype(np.int16)
        got = chaos.beep_onsets(audio, 0)
        want = [s0 * 1_000_000_000 // rate for s0 in starts]
        assert len(got) == 3 and all(abs(g - w) <= 5_000_000 for g, w in zip(got, want)), (shift, got, want)


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_short_run_kills_every_service_and_reports_both_rows(tmp_path, chaos):
    out = tmp_path / "chaos.json"
    r = subprocess.run([sys.executable, "benchmarks/chaos.py", "--seconds", "20", "--seed", "3", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    res = json.loads(out.read_text())
    assert res["seed"] == 3 and res["schedule"] == chaos.schedule(3, chaos.Plan(seconds=20.0, every=3.0))
    rows = res["rows"]
    assert [x["resume"] for x in rows] == [True, False], [x.get("failure") for x in rows]
    for x in rows:
        assert not x.get("failure"), x
        kills = x["kills"]
        assert [(k["at_s"], k["victim"]) for k in kills] == [(s["at_s"], s["victim"]) for s in res["schedule"]]
        assert {k["victim"] for k in kills} == set(chaos.VICTIMS) and not [k for k in kills if k.get("skipped")]
        assert all(k["pid"] > 0 and 0 < k["ready_s"] < 15 for k in kills), kills
        assert x["all_back"], x.get("not_back")
        for v in chaos.VICTIMS:
            assert x["ready"][v]["kills"] == x["ready"][v]["back"] >= 1 and x["ready"][v]["max_s"] > 0
        # the box: clean while running and after its stop, and the scans saw what they scan
        assert x["processes_running"] == 1 + len(chaos.VICTIMS)
        assert {"cam", "cam-audio", "cam-raw", "cam-vision"} <= set(x["rings_alive"])
        assert x["stale_rings"] == [] and x["left_after_stop"] == [] and x["partial_after_stop"] == []
        assert x["orphans_running"] == [] and x["orphans_after_stop"] == []
        assert x["stop_status"] == 0
        assert not shm_leftovers(x["prefix"])
        # the witness saw every item: produced is what the camera sent
        assert x["witness"]["missed"] == {"video": 0, "audio": 0} and x["witness"]["unnumbered"] == 0
        assert x["witness"]["runs"] == 1 + sum(1 for k in kills if k["victim"] == "capture@cam")
        for target in chaos.TARGETS:
            t = x["targets"][target]
            assert t["files"] >= 1 and t["unplaced"] == 0, t
            assert 0.6 * x["window_s"] < t["produced_s"] <= x["window_s"] + 0.1, (t, x["window_s"])
            assert 0 < t["recorded_s"] <= t["produced_s"] and t["recall"] == pytest.approx(
                t["recorded_s"] / t["produced_s"], abs=1e-3)
            assert set(t) >= {"twice_s", "lost_spans", "max_lost_s", "lost_s_by_victim", "gaps", "gap_s", "outages",
                              "outage_s", "spliced", "timeline_err_ms", "decode_errors"}
        room = x["targets"]["room:lobby"]
        assert room["beeps_produced"] >= 15 and room["beeps_recorded"] >= 1 and room["av_offset_ms_max"] is not None
    for head in ("### recordings", "### time to ready after a SIGKILL", "### the box", "| resume | cam |",
                 "| naive (resume = false) | room:lobby |"):
        assert head in r.stdout, r.stdout[-3000:]
