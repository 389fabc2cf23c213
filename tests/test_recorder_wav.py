"""An audio target recorded as WAV: the writer (placing, flushing, its header always whole,
its resume state after the samples), crash repair, and on a real box the synthetic
camera's beeps at their capture times, also in a WAV cut by SIGKILL that the restarted
recorder continues from the ring's history."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
import wave
from pathlib import Path

import numpy as np

import framebus
from services.recorder import segments
from services.recorder.wav import HEADER_BYTES, STATE_CHUNK, WavWriter, header, read_state, repair
from tests.appliance import wait_for

RATE = 48000


def header_sizes(path: Path) -> tuple[int, int]:
    """(RIFF size, data size) as the file's header says them."""
    head = path.read_bytes()[:HEADER_BYTES]
    return struct.unpack_from("<I", head, 4)[0], struct.unpack_from("<I", head, 40)[0]


def ffprobe_duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=duration", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout)


def decode_errors(path: Path) -> str:
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True, text=True)
    return out.stderr.strip() + ("" if out.returncode == 0 else f" (exit {out.returncode})")


def test_chunks_land_at_their_sample_and_the_header_is_whole_after_every_flush(tmp_path):
    path = tmp_path / "a.wav"
    flushes = []
    w = WavWriter(path, RATE, 2, fragment_seconds=0.1, on_flush=lambda s, n: flushes.append(n),
                  state=lambda: {"kind": "wav"})
    ramp = np.arange(2 * 4800, dtype=np.int16).reshape(-1, 2)          # 100 ms, stereo
    w.write(ramp, 0, token=[1, 7, 123])
    assert header_sizes(path) == (36 + ramp.nbytes + STATE_CHUNK, ramp.nbytes)
    assert path.stat().st_size == 44 + ramp.nbytes + STATE_CHUNK
    st = read_state(path)                                               # after the samples: what the file holds
    assert st["tracks"][0]["tok"] == [1, 7, 123] and st["tracks"][0]["end"] == 4800 and st["owner"] == {"kind": "wav"}
    w.write(np.ones((480, 2), np.int16), 4800 + 960, token=[1, 8, 456])  # 20 ms late: a hole of silence
    w.write(np.full((960, 2), 7, np.int16), 4800 + 960 + 240)          # overlaps by 240 samples: its head goes
    assert (w.silence, w.dropped) == (960, 240)
    w.close()
    assert read_state(path)["tracks"][0]["tok"] == [1, 8, 456] and read_state(path)["tracks"][0]["end"] == 6960
    with wave.open(str(path)) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (RATE, 2, 2)
        pcm = np.frombuffer(f.readframes(f.getnframes()), np.int16).reshape(-1, 2)
    assert len(pcm) == 4800 + 960 + 480 + 720 == w.samples
    assert (pcm[:4800] == ramp).all() and not pcm[4800:5760].any()
    assert (pcm[5760:6240] == 1).all() and (pcm[6240:] == 7).all()
    assert sum(flushes) == pcm.nbytes and len(flushes) == 2                # one flush per 100 ms of audio
    assert abs(ffprobe_duration(path) - len(pcm) / RATE) < 1e-4 and decode_errors(path) == ""


def test_a_cut_wav_is_repaired_to_what_its_state_vouches_for(tmp_path):
    def one_second(path):
        with WavWriter(path, RATE, 2, fragment_seconds=0.5) as w:     # flushed twice, each with its state
            w.write(np.full((RATE // 2, 2), 1000, np.int16), 0, token=[1, 0, 0])
            w.write(np.full((RATE // 2, 2), -1000, np.int16), RATE // 2, token=[1, 1, 0])

    # SIGKILL between a flush's pwritev and its header update: the header is a flush behind,
    # the state at the end says the file holds the whole second
    path = tmp_path / "stale.wav.partial"
    one_second(path)
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", 36 + RATE * 2 + STATE_CHUNK))
        f.seek(40)
        f.write(struct.pack("<I", RATE * 2))
    assert repair(path) == HEADER_BYTES + RATE * 4 + STATE_CHUNK == path.stat().st_size
    assert header_sizes(path) == (36 + RATE * 4 + STATE_CHUNK, RATE * 4)
    assert read_state(path)["tracks"][0]["tok"] == [1, 1, 0]
    final = segments.finish(path)
    assert abs(ffprobe_duration(final) - 1.0) < 1e-4 and decode_errors(final) == ""

    # a power cut that tore the second flush (its samples half there, its state not): back to the first
    path = tmp_path / "torn.wav.partial"
    one_second(path)
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + RATE * 3 + 3)
        f.seek(4)
        f.write(struct.pack("<I", 36 + RATE * 2 + STATE_CHUNK))
        f.seek(40)
        f.write(struct.pack("<I", RATE * 2))
    assert repair(path) == HEADER_BYTES + RATE * 2 == path.stat().st_size
    assert header_sizes(path) == (36 + RATE * 2, RATE * 2) and read_state(path) is None  # no position to resume
    final = segments.finish(path)
    assert abs(ffprobe_duration(final) - 0.5) < 1e-4 and decode_errors(final) == ""

    # a header ahead of the samples (a power cut kept its update, not all of the flush): the last whole sample frame
    path = tmp_path / "ahead.wav.partial"
    path.write_bytes(header(RATE, 2, RATE * 8, 0) + np.full((RATE * 3 // 2, 2), 5, np.int16).tobytes() + b"\x01\x02")
    assert repair(path) == HEADER_BYTES + RATE * 6 and header_sizes(path) == (36 + RATE * 6, RATE * 6)
    assert decode_errors(segments.finish(path)) == ""

    empty = tmp_path / "cam-audio" / "cam-audio-x.wav.partial"            # only a header: no media, removed
    empty.parent.mkdir()
    WavWriter(empty, RATE, 1).close()
    other = tmp_path / "cam-audio" / "cam-audio-y.wav.partial"            # not a WAV at all
    other.write_bytes(b"RIFX" + bytes(100))
    torn = tmp_path / "cam-audio" / "cam-audio-z.wav.partial"
    with WavWriter(torn, RATE, 1) as w:
        w.write(np.ones(4800, np.int16), 0)
    with open(torn, "ab") as f:
        f.write(b"\x05")                                                   # half a sample
    got = segments.recover(tmp_path)
    assert sorted(got.removed) == [empty, other]
    assert got.kept == [torn.with_name("cam-audio-z.wav")] and header_sizes(got.kept[0])[1] == 9600
    assert got.kept[0].stat().st_size == HEADER_BYTES + 9600  # the byte after its state: back to its header's flush


def test_retention_counts_wav_segments(tmp_path):
    old = tmp_path / "cam-audio" / "cam-audio-old.wav"
    old.parent.mkdir()
    old.write_bytes(b"o" * 100)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    live = tmp_path / "cam-audio" / "cam-audio-live.wav.partial"
    live.write_bytes(b"l" * 100)
    assert segments.new_path(tmp_path, "cam-audio", wall=0, ext="wav").name == \
        "cam-audio-19700101T000000Z.wav.partial"
    assert segments.sweep(tmp_path, max_age_s=3600) == [old] and live.exists()


RECORDER = """
[services.recorder]
restart_sec = 0.2
watchdog_sec = 5.0
stop_timeout = 5.0
[recorder]
dir = "{rec}"
record = "cam-audio"
fragment_seconds = 0.5
max_disk_share = 0.0
"""


def onsets(pcm: np.ndarray) -> list[int]:
    """Sample indexes where a beep begins (loud after at least 10 ms of quiet)."""
    loud = np.abs(pcm.astype(np.int32)) > 1000
    quiet_before = np.convolve(loud, np.ones(480, int), "full")[:len(loud)] - loud == 0
    return [int(i) for i in np.flatnonzero(loud & quiet_before)]


def test_the_beeps_are_at_their_capture_times_and_a_killed_wav_is_made_whole(box, tmp_path, prefix):
    rec = tmp_path / "rec"
    b = box(RECORDER.format(rec=rec))
    b.set_source("cam", 'width = 160\nheight = 120\nfps = 10.0\nencode = "raw"\naudio = true\n')
    beeps: list[int] = []   # capture times of the chunks a beep begins with (the tone's sample 0 of a second)
    with framebus.Consumer.attach("cam-audio", prefix=prefix, missing_ok=True, start="oldest") as bus:
        b.run()
        b.wait_ready("recorder", "capture@cam")
        sub = b.subscriber("record.segment")
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            item = bus.receive(timeout=0.2)
            if item is not None and item.pts % RATE == 0:
                beeps.append(item.capture_ns)
        done = b.call("record.stop", {"target": "cam-audio"})
    path = Path(done["path"])
    seg = wait_for(lambda: sub.recv(timeout=0.2), 5, "record.segment").data
    assert path.suffix == ".wav" and seg["path"] == str(path) and seg["bytes"] == path.stat().st_size
    assert decode_errors(path) == ""
    with wave.open(str(path)) as f:
        assert (f.getframerate(), f.getnchannels()) == (RATE, 1)
        pcm = np.frombuffer(f.readframes(f.getnframes()), np.int16)
    # the tone's first loud sample is its second: sin(0) = 0
    found = [seg["start_ns"] + (i - 1) * 1_000_000_000 // RATE for i in onsets(pcm)]
    assert len(found) >= 2, (found, beeps)
    print("beep in the WAV - on the bus (us):", [round(min((t - c for c in beeps), key=abs) / 1000) for t in found])
    for t in found:   # each beep in the file at the capture time its chunk had on the bus, within 1 ms
        assert min(abs(t - c) for c in beeps) <= 1_000_000, (t, beeps)
    spanned = [c for c in beeps if seg["start_ns"] < c < seg["start_ns"] + seg["duration"] * 1e9 - 0.1e9]
    for c in spanned:  # and every beep the file spans is in it
        assert min(abs(t - c) for t in found) <= 1_000_000, (c, found)
    loud = np.abs(pcm.astype(np.int32)) > 1000
    first = onsets(pcm)[0]
    assert abs(int(np.flatnonzero(loud[first:first + 9600])[-1]) - 4800) < 48, "100 ms long"

    # SIGKILL while writing: the restarted recorder continues the same WAV from the ring's history
    b.call("record.start", {"target": "cam-audio"})
    wait_for(lambda: [p for p in rec.rglob("*.wav.partial") if p.stat().st_size > HEADER_BYTES + 2 * RATE], 10,
             "a second of audio in a new WAV")
    partial = next(rec.rglob("*.wav.partial"))
    beeps = []
    with framebus.Consumer.attach("cam-audio", prefix=prefix, start="oldest") as bus, \
            b.subscriber("record.resumed") as resumed:
        pid = b.services()["recorder"]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        event = None
        while time.monotonic() < deadline and event is None:
            if (item := bus.receive(timeout=0.1)) is not None and item.pts % RATE == 0:
                beeps.append(item.capture_ns)
            event = resumed.recv(timeout=0.01)
        assert event is not None, f"record.resumed; log:\n{b.log()[-2000:]}"
        assert event.data == {"target": "cam-audio", "path": str(partial), "appended": True}
        assert "cut by a crash; its recording continues in it" in b.log()
        # the file holds 1 s before the kill; 3.5 s more make its span (less 0.1 s at each end) hold at
        # least 4 whole seconds, so at least 4 beeps whatever their phase (2.5 s made it 4.0 s: 3 or 4)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            if (item := bus.receive(timeout=0.1)) is not None and item.pts % RATE == 0:
                beeps.append(item.capture_ns)
        done = b.call("record.stop", {"target": "cam-audio"})
    path = Path(done["path"])
    assert path == partial.with_name(partial.name.removesuffix(".partial")), (path, partial)
    assert len(list(rec.rglob("*.wav"))) == 2 and path.exists() and not list(rec.rglob("*.partial"))
    seg = wait_for(lambda: sub.recv(timeout=0.2), 5, "record.segment").data
    assert seg["path"] == str(path) and decode_errors(path) == ""
    with wave.open(str(path)) as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), np.int16)
    assert abs(ffprobe_duration(path) - len(pcm) / RATE) < 1e-4
    found = [seg["start_ns"] + (i - 1) * 1_000_000_000 // RATE for i in onsets(pcm) if i > 480]  # not a cut head
    spanned = [c for c in beeps if seg["start_ns"] + 0.1e9 < c < seg["start_ns"] + seg["duration"] * 1e9 - 0.1e9]
    assert len(spanned) >= 4, (spanned, seg)
    print("across the kill, beep in the WAV - on the bus (us):",
          [round(min((t - c for c in beeps), key=abs) / 1000) for t in found if t >= beeps[0] - 1e6])
    for c in spanned:  # every beep of the time the recorder was dead and restarting is in the file, once, on time
        assert sum(abs(t - c) <= 1_000_000 for t in found) == 1, (c, found)
    assert all(abs(s - 1.0) < 0.002 for s in np.diff(found) / 1e9), f"a beep each second: {np.diff(found) / 1e9}"
