"""benchmarks/ingest.py: its sweep logic and counters, and one real box measured end to end."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import benchmark_module, shm_leftovers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ingest():
    yield from benchmark_module("ingest")


def sweep(ingest, capacity: int, max_n: int, linear: bool = False, estimate: float | None = None) -> list[int]:
    """The stream counts the benchmark tries on a box that sustains `capacity` streams (and whose
    sustained runs' CPU says `estimate`)."""
    tried: dict[int, bool] = {}
    est: dict[int, float] = {}
    order = []
    while (n := ingest.next_n(tried, max_n, linear, est)) is not None:
        assert n not in tried, f"{n} tried twice: {order}"
        order.append(n)
        tried[n] = n <= capacity
        if tried[n] and estimate is not None:
            est[n] = estimate
    best = max((n for n, ok in tried.items() if ok), default=0)
    want = min(capacity, max_n)
    assert best <= want and (linear and best == want or want - best <= best // ingest.RESOLUTION), (order, best)
    return order


def test_sweep_doubles_then_halves_the_gap(ingest):
    assert sweep(ingest, 13, 64) == [1, 2, 4, 8, 16, 12, 14, 13]
    assert sweep(ingest, 3, 64) == [1, 2, 4, 3]
    assert sweep(ingest, 0, 64) == [1]
    assert sweep(ingest, 40, 20) == [1, 2, 4, 8, 16, 20]  # capped, all sustained
    assert sweep(ingest, 2, 2) == [1, 2]  # --quick
    for capacity in range(0, 70):
        sweep(ingest, capacity, 64)


def test_sweep_jumps_to_what_the_cpu_suggests(ingest):
    assert sweep(ingest, 16, 64, estimate=16.5) == [1, 4, 16, 19, 17]
    assert sweep(ingest, 8, 64, estimate=12.0) == [1, 4, 14, 9, 6, 7, 8]  # too hopeful: halving
    assert sweep(ingest, 20, 64, estimate=12.0) == [1, 4, 14, 21, 17, 19, 20]  # too timid: steps of N/2
    for capacity in range(0, 40):
        for estimate in (0.5, capacity * 0.7, capacity + 0.3, capacity * 1.5 + 1):
            order = sweep(ingest, capacity, 64, estimate=estimate)
            assert len(order) <= 14, order


def test_sweep_linear_stops_at_the_first_failure(ingest):
    assert sweep(ingest, 3, 64, linear=True) == [1, 2, 3, 4]
    assert sweep(ingest, 5, 5, linear=True) == [1, 2, 3, 4, 5]


def test_counters_and_percentiles(ingest):
    a = {("edgeroom_decode_dropped_frames_total", "decode@s1", "missed"): 2.0}
    b = {("edgeroom_decode_dropped_frames_total", "decode@s1", "missed"): 5.0,
         ("edgeroom_decode_dropped_frames_total", "decode@s2", "waiting_keyframe"): 4.0,  # new since a
         ("edgeroom_capture_dropped_frames_total", "capture@s1", "too_large"): 9.0}
    assert ingest.metric_delta(a, b, "edgeroom_decode_dropped_frames_total", True) == (
        7, {"missed": 3, "waiting_keyframe": 4})
    assert ingest.metric_delta(a, a, "edgeroom_decode_dropped_frames_total") == 0
    assert ingest.held_frames(1) == 0 and ingest.held_frames(4) == 3
    assert ingest.held_frames(0) == (min(os.cpu_count() + 1, 16) - 1 if os.cpu_count() > 1 else 0)
    vals = list(range(101))
    assert ingest.pct(vals, 50) == 50 and ingest.pct(vals, 99) == 99 and ingest.pct([], 50) is None


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_one_box_measured_end_to_end(ingest, tmp_path, monkeypatch):
    """A tiny clip through a real `edgeroom run` (hub, capture@s1, decode@s1): every figure the
    table needs comes back, nothing is lost at N=1, and nothing is left on the bus."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    clip = ingest.Clip("tiny", 320, 240, 300)
    path = ingest.make_clip(clip)
    assert path.parent == tmp_path / "edgeroom-bench" and path.exists()
    assert ingest.make_clip(clip) == path  # cached
    info = ingest.clip_info(path)
    assert info["frames"] == ingest.FPS * ingest.CLIP_S and info["keyframes"] >= 7

    plan = ingest.Plan(reps=1, paced_s=1.0, warmup_s=1.0, settle_s=2.0, seconds=2.0, max_streams=1, sizes=())
    rec = ingest.run_box(clip, path, 1, plan, f"t{os.getpid()}", decode_threads=1)
    assert not rec.get("failure"), rec
    assert rec["sustained"], rec["why"]
    assert rec["drops"] == 0 and rec["decode_errors"] == 0
    assert rec["lat_samples"] >= 50
    assert 0 < rec["lat_p50_ms"] <= rec["lat_p99_ms"] < 1000
    assert rec["cpu_decode_per_stream_s"] > 0 and rec["cpu_capture_per_stream_s"] > 0
    assert 28 <= rec["fps_out"] <= 32 and 28 <= rec["fps_in"] <= 32
    assert not shm_leftovers(f"ing{os.getpid()}t{os.getpid()}")

    bare = ingest.bare_pyav(path, 1)
    assert bare["frames"] == info["frames"] and bare["threads_used"] == 1 and bare["frame_ms_mean"] > 0
    start = ingest.ffmpeg_start_cpu(path, 1, 1)
    ff = ingest.bare_ffmpeg(path, 1, info["frames"], start)
    assert ff["cpu_per_stream_s"] > 0
