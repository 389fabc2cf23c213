"""benchmarks/vision.py --quick: every row is there, with figures or with the reason it could not run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.bench
@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "vision.json"
    r = subprocess.run([sys.executable, "benchmarks/vision.py", "--quick", "--frames", "3", "--seconds", "3",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {row["row"]: row for row in res["rows"]}
    assert {"edgeroom", "edgeroom-rect", "edgeroom-int8", "edgeroom-rect-int8", "ultralytics", "naive",
            "limit"} <= set(rows), rows
    for name in ("edgeroom", "naive", "limit"):  # these need only onnxruntime + onnx: they must run
        assert rows[name].get("fps", 0) > 0 and rows[name]["p50_ms"] > 0, rows[name]
    for name, row in rows.items():
        assert ("fps" in row) != ("error" in row), row  # figures, or why not
        if "fps" in row and name not in ("limit", "limit-rect"):
            assert row["frames"] == 3 and row["p99_ms"] >= row["p50_ms"] > 0
            assert row["detections_per_frame"] >= 2, row  # bus.jpg and zidane.jpg: people found
    assert rows["limit"]["gflops"] > 1 and rows["limit"]["nodes"] > 10
    if "fps" in rows["ultralytics"]:
        assert res["verdict"]["edgeroom_over_ultralytics"] > 0
    load = res["load"]
    assert "error" not in load, load
    for key in ("without_detector", "with_detector"):
        w = load[key]
        assert w["capture_drops"] >= 0 and w["decode_drops"] >= 0 and w["fps_per_stream_min"] > 0
    assert load["with_detector"]["detector_fps"] > 0
    assert "edgeroom" in r.stdout and "load:" in r.stdout
