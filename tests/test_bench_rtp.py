"""benchmarks/rtp.py: its matching (units out of packets, the box's RTP clock back to capture time), and one --quick
run end to end (a real relay, real boxes, real sockets)."""
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
    yield from benchmark_module("rtp")


def test_units_are_grouped_by_rtp_time_in_sequence_order_across_the_wrap(bench):
    # (seq, ts, marker, arrival, payload hash), arriving out of order around the 16-bit wrap
    packets = [(65534, 100, 0, 1000, 1), (0, 100, 1, 1002, 3), (65535, 100, 0, 1001, 2),
               (1, 200, 0, 2000, 4), (2, 200, 1, 2001, 5), (2, 200, 1, 2001, 5)]     # the last one twice
    units, gaps = bench.out_units(packets, offset_ns=0)
    assert gaps == 0
    assert [(u["ts"], u["hash"], u["rx"], u["ended"], u["whole"]) for u in units] == [
        (100, [1, 2, 3], [1000, 1001, 1002], True, True), (200, [4, 5], [2000, 2001], True, True)]
    # a packet lost inside a unit: the unit is cut there and not whole; the gap is counted
    units, gaps = bench.out_units([(10, 7, 0, 1, 1), (12, 7, 1, 3, 3), (13, 8, 1, 4, 4)], offset_ns=0)
    assert gaps == 1 and [(u["hash"], u["whole"], u["ended"]) for u in units] == [
        ([1], True, False), ([3], False, True), ([4], True, True)]
    # arrival times move to the monotonic clock by the offset
    units, _ = bench.out_units([(5, 1, 1, 10_000, 9)], offset_ns=4_000)
    assert units[0]["rx"] == [6_000]


def test_the_box_rtp_time_is_traced_back_to_capture_time_through_its_sender_reports(bench):
    from services.rtp.rtcp import ntp_now

    offset = 1_700_000_000_000_000_000 - 5_000_000_000_000          # CLOCK_REALTIME - CLOCK_MONOTONIC
    base = 0xFFFF_F000                                              # the box's random RTP base, about to wrap
    mono_now = 5_000_000_000_000                                    # 5000 s after boot: RTP time wrapped many times

    def rtp_at(mono_ns: int) -> int:                                # what services/rtp/outbound.py sends
        return (base + (mono_ns * 90000 + 500_000_000) // 1_000_000_000) & 0xFFFFFFFF

    srs = [(ntp_now(mono_now + i * 10**9 + offset), rtp_at(mono_now + i * 10**9)) for i in range(3)]
    found = bench.ts_base(srs, offset)
    assert abs(((found - base + 0x80000000) & 0xFFFFFFFF) - 0x80000000) <= 1
    capture = mono_now + 123_456_789
    got = bench.capture_ns(rtp_at(capture), found, near_ns=capture + 40_000_000)   # it came out 40 ms later
    assert abs(got - capture) < 30_000                              # a tick (11 us) and the SR's rounding
    assert bench.ts_base([], offset) is None


def test_annexb_of_an_mp4_sample(bench):
    sample = (3).to_bytes(4, "big") + b"\x65\x01\x02" + (2).to_bytes(4, "big") + b"\x41\x09"
    assert bench.annexb(sample) == b"\x00\x00\x00\x01\x65\x01\x02\x00\x00\x00\x01\x41\x09"


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_quick_run_measures_every_row_and_loses_nothing_at_one_stream(tmp_path):
    out = tmp_path / "rtp.json"
    r = subprocess.run([sys.executable, "benchmarks/rtp.py", "--quick", "--seconds", "2", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert not [x for x in rows if x.get("failure")], rows
    names = [(x["name"], x["streams"]) for x in rows]
    assert ("bare Python UDP relay", 1) in names and ("rtp@ forward (bus, no decode)", 1) in names, names
    assert ("rtp@ forward (bus, no decode), pacing_kbps = 1000000", 1) in names, names
    assert ("decode + re-encode (rtp@ -> decode@ -> encode@ -> rtp@)", 1) in names, names
    assert {x["streams"] for x in rows if x["kind"] == "forward" and x["sweep"]} == {1, 2}   # --quick: N up to 2
    for x in rows:
        n = x["streams"]
        assert x["cpu_per_stream_s"] > 0 and x["window_s"] >= 1.9, x
        assert 2 * 30 * n - n <= x["sent_units"] <= 2 * 30 * n + n, x          # 2 s of units of every stream
        assert x["streams_without_sr"] == 0 and x["unmatched_units"] == 0, x   # every unit out traced to one in
        assert x["unit_p50_ms"] > 0 and x["unit_p99_ms"] >= x["unit_p50_ms"], x
        if x["kind"] == "naive":
            assert x["matched_units"] > 0 and x["packets_matched"] == 0, x     # new packets: per unit only
            continue
        assert x["packets_matched"] == x["packets_of_matched_units"] > 0, x    # every packet of every unit paired
        assert 0 < x["packet_p50_ms"] <= x["packet_p99_ms"] <= x["packet_max_ms"], x
        if x["kind"] == "forward":
            assert x["identical_units"] == x["matched_units"] and x["differing_units"] == 0, x   # bytes forwarded
            assert x["box_lost_packets"] == 0 and x["rtcp_from_box"].get("RtcpSrPacket", 0) >= 1, x
            assert x["in_to_bus_p50_ms"] > 0 and x["bus_to_out_p50_ms"] > 0, x
            assert x["pacing_kbps"] in (20000, 1000000), x
        if n == 1:   # nothing lost at one stream: every unit out whole, no socket dropped anything
            assert x["missing_units"] == 0 and x["out_seq_gaps"] == 0, x
            assert x["receiver_dropped"] == 0 and x["box_socket_drops"] == 0, x
        if x["kind"] != "relay":   # the relay's stream beside the box's, at the same moments
            beside = x["relay_beside"]
            assert beside["matched_units"] == beside["sent_units"] > 0 and beside["packet_p99_ms"] > 0, x
            assert x["added_unit_p99_ms"] == pytest.approx(x["unit_p99_ms"] - beside["unit_p99_ms"]), x
    fwd = next(x for x in rows if x["kind"] == "forward" and x["streams"] == 1 and x["sweep"])
    assert fwd["added_packet_p99_ms"] is not None and fwd["cpu_vs_relay"] > 0
    verdicts = {t["target"].split(" (")[0]: t["verdict"] for t in res["targets"]}
    assert verdicts.get("forwarding adds at most 2 ms p99 over the relay") in ("PASS", "FAIL"), verdicts
    assert "the most forwarded streams with zero loss and packet p99 within one frame interval" in verdicts
    assert res["highest_sustained"] in (0, 1, 2) and res["clip"]["frames"] == 600
    assert "| rtp@ forward (bus, no decode) | 1 |" in r.stdout and "## targets" in r.stdout
    for x in rows:  # every box's bus objects are gone
        if x["kind"] != "relay":
            assert not shm_leftovers(x["prefix"]), x["prefix"]
