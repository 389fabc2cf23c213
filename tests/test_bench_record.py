"""benchmarks/record.py: its picture check, and one --quick run end to end (real ffmpeg, a real box)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import benchmark_module, shm_leftovers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def record():
    yield from benchmark_module("record")


def test_same_pictures_finds_the_loop_from_a_keyframe_and_nothing_else(record):
    gop = record.GOP
    src = [f"f{i}" for i in range(3 * gop)]
    assert record.same_pictures(src[gop:] + src[:gop], src) == (True, gop)  # around the loop
    assert record.same_pictures(src + src + src[:5], src) == (True, 0)
    assert record.same_pictures(src[5:50], src) == (False, -1)  # not from a keyframe
    assert record.same_pictures(src[:10] + ["x"] + src[11:20], src) == (False, -1)  # one picture differs
    assert record.same_pictures([], src) == (False, -1)


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_quick_run_writes_every_row_and_proves_zero_reencodes(tmp_path):
    out = tmp_path / "record.json"
    r = subprocess.run([sys.executable, "benchmarks/record.py", "--quick", "--seconds", "4", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert not [x for x in rows if x.get("failure")], rows
    names = {x["name"] for x in rows}
    assert {"ffmpeg -c copy plain mp4", "ffmpeg -c copy fragmented", "ffmpeg -c copy fragmented paced (-re)",
            "read + write the bytes", "read + write the bytes + fsync", "ffmpeg libx264 veryfast crf 23",
            "recorder remux fsync on", "recorder remux fsync off", "recorder encode"} <= names, names
    for x in rows:
        assert x["cpu_per_stream_s"] > 0, x
    remux = [x for x in rows if x["kind"] == "edgeroom" and x["what"] == "remux"]
    assert {x["fsync"] for x in remux} == {True, False}
    for x in remux:
        assert x["reencodes"] == 0 and x["encoders"] == {"s1": ["copy"]}, x
        assert x["bit_identical"], x["pictures"]
        assert x["pictures"]["s1"]["frames"] >= 60, x["pictures"]  # at least 2 s of pictures checked
        assert 27 <= x["fps_in"] <= 33 and x["dropped"] == 0, x
        assert x["vs_ffmpeg"] > 0 and x["vs_ffmpeg_paced"] > 0
    on = next(x for x in remux if x["fsync"])
    assert on["flush_ms_mean"] > 0 and 1.5 <= on["fragments_per_s"] <= 4  # 0.5 s fragments + a cut per keyframe
    enc = next(x for x in rows if x["name"] == "recorder encode")
    assert enc["encoders"] == {"s1": ["libx264"]} and enc["vs_ffmpeg"] > 0
    assert any(t["target"].startswith("zero re-encodes") and t["verdict"] == "PASS" for t in res["targets"])
    assert "recorder remux fsync on" in r.stdout and "## targets" in r.stdout
    for x in rows:  # every box's bus objects are gone
        if x["kind"] == "edgeroom":
            assert not shm_leftovers(x["prefix"]), x["prefix"]
