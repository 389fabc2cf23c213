"""benchmarks/webrtc.py: its small helpers, and one --quick run end to end (a real box with edgeroom-webrtc, headless
Chromium playing the camera by WHEP, aiortc viewers, the naive decode + re-encode server)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import benchmark_module, shm_leftovers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("webrtc")


def test_nal_keys_ignore_start_code_lengths_and_trailing_zeros(bench):
    sps, pps, idr = b"\x67\x64\x00\x1f\xac", b"\x68\xee\x3c\x80", b"\x65\x88\x84\x00\x10"
    four = b"\x00\x00\x00\x01" + sps + b"\x00\x00\x00\x01" + pps + b"\x00\x00\x01" + idr
    three = b"\x00\x00\x01" + sps + b"\x00\x00\x01" + pps + b"\x00\x00\x00\x01" + idr + b"\x00\x00"
    assert bench.nal_key(four) == bench.nal_key(three)
    assert bench.nal_key(four) != bench.nal_key(b"\x00\x00\x01" + pps + b"\x00\x00\x01" + idr)
    assert bench.nal_key(four) != bench.nal_key(four[:-1] + b"\x11")


def test_frame_numbers_map_to_the_cameras_capture_times(bench):
    t0 = 5_000_000_000
    assert bench.capture_of(0, t0) == t0
    assert bench.capture_of(3, t0) == t0 + 100_000_000
    assert bench.capture_of(1, t0) == t0 + 33_333_333
    units = [(bench.capture_of(n, t0), 0, 0, False, 0) for n in (0, 1, 2, 5, 6, 9)]
    assert bench.camera_gaps(units) == 2 + 2


def test_the_sweep_climbs_the_ladder_then_halves_the_gap(bench):
    ladder = (1, 2, 4, 10, 16, 24, 32)
    assert bench.next_n({}, 64, ladder) == 1
    assert bench.next_n({1: True, 2: True}, 64, ladder) == 4
    assert bench.next_n({1: True, 2: True, 4: True, 10: True}, 8, ladder) is None     # the cap
    assert bench.next_n({1: True, 2: True, 4: True, 10: True, 16: False}, 64, ladder) == 13
    assert bench.next_n({10: True, 11: False}, 64, ladder) is None
    assert bench.next_n({10: True}, 12, ladder) == 12


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs chromium (Debian chromium)")
def test_quick_run_measures_latency_cpu_and_viewers(tmp_path):
    pytest.importorskip("aiortc")
    out = tmp_path / "webrtc.json"
    r = subprocess.run([sys.executable, "benchmarks/webrtc.py", "--quick", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads(out.read_text())
    printed = json.loads(r.stdout.split("## JSON", 1)[1])
    assert printed["summary"] == res["summary"]
    rows = res["rows"]
    assert not [x for x in rows if x.get("failure")], rows
    assert [x["kind"] for x in rows][0] == "latency"

    lat = rows[0]                       # the camera's frame numbers read back in Chromium
    assert lat["frames_matched"] >= 0.5 * lat["bus_units"] > 0, lat
    assert lat["misread"] + lat["unmatched"] <= 0.05 * lat["frames_presented"], lat
    assert lat["clock_uncertainty_ms"] < 5 and abs(lat["clock_wall_check_ms"]) < 20, lat
    assert lat["whep_delete"] == 200, lat
    for stage in ("bus", "received", "presented", "glass"):
        assert lat[stage]["n"] > 0 and 0 < lat[stage]["p50_ms"] <= lat[stage]["p99_ms"], (stage, lat[stage])
    assert lat["bus"]["p50_ms"] <= lat["received"]["p50_ms"] < lat["glass"]["p50_ms"], lat
    assert lat["received"]["min_ms"] > 0 and lat["bus_to_glass"]["min_ms"] > 0, lat     # no frame before its time

    passed = {x["viewers"]: x for x in rows if x["kind"] == "pass-through"}
    assert {0, 1, 10} <= set(passed), passed.keys()          # --quick: 0, 1, 10
    for n in (1, 10):
        x = passed[n]
        assert x["paths"] == ["pass-through"] and x["codecs"] == ["h264"] and x["sessions"] == n, x
        assert x["fps_mean"] > 20 and x["kbps_mean"] > 100, x
        assert x["identical_units"] == x["checked_units"] > 0, x       # the bus's bytes, not re-encoded
    naive = {x.get("stage"): x for x in rows if x["kind"] == "naive"}
    assert set(naive) == {"idle", "decoding", "viewers"}, naive.keys()
    assert naive["decoding"]["decoded_fps"] > 15, naive["decoding"]
    one = naive["viewers"]
    assert one["viewers"] == 1 and one["encoded_fps_min"] > 10 and one["checked_units"] > 0, one
    assert one["identical_units"] < one["checked_units"], one           # re-encoded: not the bus's bytes

    s = res["summary"]                  # the physical targets
    assert 0 < s["passthrough_per_viewer_pct"] < s["transcode_per_viewer_pct"], s
    assert s["passthrough_10_viewers_pct"] < s["one_transcode_pct"], s
    assert s["glass_p50_ms"] < 500, s
    assert s["identical_units"] == s["checked_units"] > 0, s
    assert s["highest_sustained"] in (0, 1, 10)
    verdicts = {t["target"]: t["verdict"] for t in res["targets"]}
    assert verdicts["pass-through adds no decode and no encode"] == "PASS", res["targets"]
    assert verdicts["10 viewers cost less CPU than one transcode"] == "PASS", res["targets"]
    assert "| pass-through N=10 | 10 |" in r.stdout and "## targets" in r.stdout
    assert not shm_leftovers(res["info"]["prefix"])                  # the box's bus objects are gone
