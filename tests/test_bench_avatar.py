"""benchmarks/avatar.py: its pure helpers (percentiles, pairing by capture time, how fast a path falls behind, the
pairing of onsets, the lip-sync verdict), and one --quick run end to end (the reference server in a process of its
own, a real box with edgeroom-avatar, the naive client, the bus copy, a real box with an aiortc caller)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import benchmark_module, shm_leftovers

ROOT = Path(__file__).resolve().parent.parent
MS = 1_000_000


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("avatar")


def test_the_voice_is_whole_slices_of_tone_and_silence(bench):
    pcm = bench.voice_pattern(1.0)
    assert len(pcm) == 25 * bench.SLICE == 16000
    assert abs(int(pcm[: 6400].astype(int).max()) - 16383) < 20      # 0.4 s of tone at -6 dBFS
    assert not pcm[6400:12800].any()                                  # 0.4 s of silence
    assert pcm[12800:].any()
    assert len(bench.voice_pattern(0.3)) % bench.SLICE == 0


def test_slices_are_paired_by_capture_time_and_the_missing_counted(bench):
    t0 = 10_000 * MS
    sent = bench.slice_times(t0, 4)
    assert sent == [t0, t0 + 40 * MS, t0 + 80 * MS, t0 + 120 * MS]
    # audio of slices 0, 1, 3 (slice 1 twice: the first counts), an idle picture stamped at its own time
    audio = [(sent[0], t0 + 50 * MS), (sent[1], t0 + 95 * MS), (sent[1], t0 + 200 * MS), (sent[3], t0 + 170 * MS)]
    video = [(t0 + 7 * MS, t0 + 7 * MS), (sent[0], t0 + 49 * MS)]
    part = bench.latency_of(sent, video, audio)
    assert (part["slices"], part["paired"], part["missing"], part["pictures_paired"]) == (4, 3, 1, 1)
    assert part["latency_ms"]["n"] == 3 and part["latency_ms"]["p50"] == pytest.approx(50.0)
    assert part["latency_ms"]["max"] == pytest.approx(55.0) and part["picture_latency_ms"]["p50"] == 49.0
    both = bench.merge([part, bench.latency_of(sent, [], [(c, c + 45 * MS) for c in sent])])
    assert (both["slices"], both["paired"], both["missing"]) == (8, 7, 1)
    assert both["latency_ms"]["n"] == 7 and both["last_latency_ms"] == pytest.approx(50.0)


def test_percentiles_and_empty_stats(bench):
    s = bench.stats_ms([float(x) for x in range(1, 101)])
    assert (s["n"], s["p50"], s["max"], s["mean"]) == (100, 51.0, 100.0, 50.5)
    assert s["p99"] == 99.0
    assert bench.stats_ms([]) == {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}


def test_falling_behind_is_the_slope_of_the_latency(bench):
    caps = [k * 40 * MS for k in range(50)]
    assert bench.behind_ms_per_s([(c, 45.0) for c in caps]) == pytest.approx(0.0)
    # a round trip of 60 ms per 40 ms slice: 20 ms more per slice, 500 ms per second of voice
    assert bench.behind_ms_per_s([(c, 60.0 + 20.0 * k) for k, c in enumerate(caps)]) == pytest.approx(500.0)
    assert bench.behind_ms_per_s([(0, 1.0), (1, 2.0)]) is None


def test_onsets_pair_with_the_nearest_voice_onset_within_the_window(bench):
    voice = [1.0, 2.5, 4.0]
    mouth = [0.98, 2.53, 3.2, 5.0]          # 3.2 and 5.0: no voice onset within 0.3 s
    got = bench.pair_onsets(voice, mouth)
    assert [round(x * 1000) for x in got] == [-20, 30]
    assert bench.pair_onsets([], mouth) == []


def test_the_lip_sync_verdict_is_on_the_largest_offset(bench):
    ok = bench.sync_verdict([-0.039, 0.004, -0.02])
    assert ok["verdict"] == "PASS" and ok["n"] == 3 and ok["max_abs_ms"] == pytest.approx(39.0)
    assert ok["mean_ms"] == pytest.approx(-55.0 / 3)
    bad = bench.sync_verdict([-0.041, 0.0])
    assert bad["verdict"] == "FAIL" and bad["offsets_ms"] == [-41.0, 0.0]
    assert bench.sync_verdict([])["verdict"] == "NO DATA"


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (the lip-sync row's tone file)")
def test_quick_run_measures_every_row(tmp_path):
    out = tmp_path / "avatar.json"
    r = subprocess.run([sys.executable, "benchmarks/avatar.py", "--quick", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    n = res["avatars"]
    assert n == 4
    assert not [x for x in rows if x.get("failure")], rows
    kinds = [(x["kind"], x["setting"], x["avatars"]) for x in rows]
    want = [("limit", s, 1) for s in ("fast", "late", "busy")]
    want += [(k, s, 1) for k in ("service", "naive") for s in ("fast", "late", "busy")]
    want += [("service", "fast", n), ("naive", "fast", n), ("copy", "-", 1), ("copy", "-", n), ("lip-sync", "fast", 1)]
    for w in want:
        assert w in kinds, (w, kinds)
    for x in rows:
        if x["kind"] in ("limit", "service", "naive"):
            lat = x["latency_ms"]
            assert _finite(lat["p50"]) and 0 < lat["p50"] <= lat["p99"] <= lat["max"], x
            assert x["paired"] == x["slices"] > 0 and x["missing"] == 0, x
        if x["kind"] == "limit":
            assert 0 < x["rtt_ms"]["p50"] and x["latency_ms"]["p50"] >= 40.0, x
        if x["kind"] in ("service", "naive"):
            # a slice's audio cannot be out before the slice is whole (40 ms after its first sample)
            assert lat["p50"] >= 40.0 and x["window_s"] > 2.0, x
            assert x["cpu_per_avatar_s"] > 0 and x["server_cpu_per_s"] > 0, x
            assert _finite(x["behind_ms_per_s"]) and x["pictures_paired"] > 0, x
        if x["kind"] == "service":
            assert x["service"]["provider"] > 0, x
            if x["setting"] in ("fast", "late"):     # busy: the service may hold pictures (and give up the server)
                assert x["service"]["held"] == 0 and x["service"]["errors"] == 0, x
                assert x["server_messages_per_slice"] >= 1, x
        if x["kind"] == "copy":
            assert x["cpu_per_avatar_s"] > 0 and x["frames"] > 0, x
        assert not shm_leftovers(x["prefix"]), x["prefix"]      # every stream of the bus gone
    s = res["summary"]
    late = s["latency_ms"]["late"]
    # a server that answers 50 ms late (a round trip above 40 ms) keeps edgeroom-avatar near the limit and puts
    # the naive path behind real time for good
    assert late["naive"]["p99"] > late["service"]["p99"], late
    assert late["naive"]["behind_ms_per_s"] > 100 > abs(late["service"]["behind_ms_per_s"]), late
    assert late["service"]["p50"] < late["limit"]["p50"] + 40, late
    for k in ("service_1", "service_n", "naive_1", "naive_n", "copy_1", "copy_n"):
        assert s["cpu_ms_per_avatar_s"][k] > 0, (k, s)
    lip = s["lip_sync"]
    assert lip["n"] >= 1 and _finite(lip["mean_ms"]) and _finite(lip["max_abs_ms"]), lip
    assert lip["verdict"] in ("PASS", "FAIL") and lip["target_ms"] == 40.0, lip
    assert lip["bus"]["offsets_ms"] and lip["bus"]["max_abs_ms"] <= 60, lip      # on the bus: within a frame
    assert 0 < lip["caller_audio_s"] and lip["caller_span_s"] >= 3.0, lip
    verdicts = {t["target"]: t["verdict"] for t in res["targets"]}
    assert verdicts["the caller hears all the avatar's voice"] in ("PASS", "FAIL"), verdicts
    assert verdicts["lip sync at the caller within 40 ms (mouth - voice onsets, every one)"] == lip["verdict"]
    assert verdicts["audio-in to frame on the bus, p99 below the naive path's, server late 50 ms"] == "PASS"
    assert "## targets" in r.stdout and "| edgeroom-avatar | fast | 1 |" in r.stdout
    assert "## lip sync at the caller" in r.stdout
