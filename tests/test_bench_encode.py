"""benchmarks/encode.py: its x264 version reader, and one --quick run end to end (real ffmpeg, a real box)."""
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
def bench():
    yield from benchmark_module("encode")


def test_x264_version_is_read_from_the_sei(bench):
    sei = b"\x00\x00\x01\x06\x05\x2c" + b"\x00" * 16 + b"x264 - core 164 r3095 baee400 - H.264/MPEG-4 AVC codec"
    assert bench.x264_version(sei) == "core 164 r3095 baee400"
    assert bench.x264_version(b"x264 - core 165 - H.264") == "core 165"
    assert bench.x264_version(b"\x00\x00\x01\x65") is None


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_quick_run_writes_every_row_and_times_the_keyframe_requests(tmp_path):
    out = tmp_path / "encode.json"
    r = subprocess.run([sys.executable, "benchmarks/encode.py", "--quick", "--seconds", "3", "--requests", "3",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert not [x for x in rows if x.get("failure")], rows
    names = {x["name"] for x in rows}
    assert {"ffmpeg libx264 flat out", "ffmpeg libx264 paced", "ffmpeg libvpx flat out", "ffmpeg libvpx paced",
            "encode@ h264", "encode@ vp8"} <= names, names
    for x in rows:
        assert x["cpu_per_stream_s"] > 0 and x["kbps"] > 0, x
    for codec in ("h264", "vp8"):
        box = next(x for x in rows if x["name"] == f"encode@ {codec}")
        assert 25 <= box["fps_out"] <= 33 and box["vs_paced"] > 0 and box["vs_flat"] > 0, box
        assert f"-> {codec} 1280x720" in box["status"]
    h264 = next(x for x in rows if x["name"] == "encode@ h264")
    k = h264["keyframes"]
    assert k["requests"] == 3 and len(k["aus_before_idr"]) == 3 and k["encoder_side_ms_mean"] > 0
    assert h264["x264"] and h264["x264"].startswith("core ")
    verdicts = {t["target"].split(" (")[0]: t["verdict"] for t in res["targets"]}
    assert any(t.startswith("encode@ h264 CPU within 1.2x") for t in verdicts), verdicts
    assert any(t.startswith("keyframe request -> IDR within one frame") for t in verdicts), verdicts
    assert "encode@ h264" in r.stdout and "## targets" in r.stdout
    for x in rows:  # every box's bus objects are gone
        if x["kind"] == "edgeroom":
            assert not shm_leftovers(x["prefix"]), x["prefix"]
