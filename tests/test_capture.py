"""Capture: sources onto the bus, decoded by decode@NAME, checked picture by picture.

Real processes (`edgeroom run`), real files from real encoders (libx264 through PyAV,
ffprobe counting frames), a real X server for the screen. Every test picture carries its
frame number, so "every frame, in order, intact" is checked on the decoded pixels.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from fractions import Fraction

import cv2
import numpy as np

import framebus
from services.capture.sink import Sink, SinkMetrics
from services.capture.timeline import Timeline
from tests.appliance import metric_value, wait_for
from tests.media_files import ffprobe_frames, numbered_file, picture_number


# ----------------------------------------------------------------------------- units
def test_timeline_follows_a_steady_clock_from_zero():
    tl = Timeline(Fraction(1, 90000))
    out = [tl.map(90000 * 5 + i * 3000, i * 33_333_333) for i in range(5)]
    assert out == [(i * 3000, False) for i in range(5)]


def test_timeline_rebases_a_wrapping_rtp_clock():
    tl = Timeline(Fraction(1, 90000))
    start = 2**32 - 6000
    pts = [(start + i * 3000) % 2**32 for i in range(6)]  # wraps after the second item
    out = [tl.map(p, i * 33_333_333) for i, p in enumerate(pts)]
    values = [v for v, _ in out]
    assert values == sorted(values) and len(set(values)) == 6, values
    assert [r for _, r in out] == [False, False, True, False, False, False]
    assert values[2] - values[1] == 3000  # carried on by what the capture clock saw (33.3 ms)
    assert tl.rebases == 1


def test_timeline_rebases_a_leap_and_a_restart_but_not_a_real_pause():
    tl = Timeline(Fraction(1, 1000), max_gap=5.0)
    assert tl.map(1000, 0) == (0, False)
    assert tl.map(1040, 40_000_000) == (40, False)
    assert tl.map(11040, 10_040_000_000) == (10040, False)  # a 10 s pause that the capture clock saw too
    v, rebased = tl.map(99_000_000, 10_080_000_000)  # a camera's clock leaping by a day
    assert rebased and v == 10080
    v, rebased = tl.map(0, 10_120_000_000)  # the camera restarted its clock
    assert rebased and v == 10120


def test_timeline_keeps_b_frame_order_by_moving_pts_with_dts():
    tl = Timeline(Fraction(1, 25))
    # decode order I P B B with pts 0 3 1 2 and dts -1 0 1 2
    out = [tl.map(p, i * 40_000_000, dts=d)[0] for i, (p, d) in enumerate([(0, -1), (3, 0), (1, 1), (2, 2)])]
    assert out == [1, 4, 2, 3]


def test_timeline_without_source_times_uses_the_capture_clock():
    tl = Timeline(Fraction(1, 1000))
    assert [tl.map(None, ns)[0] for ns in (5_000_000_000, 5_040_000_000)] == [0, 40]


class _Count:
    def __init__(self):
        self.n = 0

    def inc(self, k=1):
        self.n += k

    def observe(self, _v):
        self.n += 1

    def labels(self, *_):
        return self


def test_sink_grows_the_encoded_ring_and_remakes_the_raw_ring_on_a_size_change(prefix):
    m = SinkMetrics(*(_Count() for _ in range(7)))
    sink = Sink("s", prefix, m)
    try:
        with framebus.Consumer.attach("s", prefix=prefix, missing_ok=True, start="oldest") as c:
            sink.encoded(b"\x00\x00\x00\x01\x65" + b"x" * 1000, "h264", keyframe=True, pts=0,
                         time_base=Fraction(1, 90000), capture_ns=1, width=320, height=240)
            first = c.receive(timeout=2)
            assert first.kind == "encoded" and first.keyframe and first.size == 1005
            assert (first.width, first.height) == (320, 240)  # the stream's size travels with its access units
            big = b"\x00\x00\x00\x01\x41" + bytes(600_000)  # outgrows the 256 KiB slots
            assert sink.encoded(big, "h264", keyframe=False, pts=3000, time_base=Fraction(1, 90000),
                                capture_ns=2, width=320, height=240)
            item = c.receive(timeout=2)
            assert item.size == len(big) and bytes(item.array[:5]) == big[:5]
            assert c.resyncs == 1  # a new ring (generation) that the consumer followed by itself
            loan = sink.loan_picture(64, 48, "rgb24")
            loan.array[:] = 7
            sink.send_picture(loan, pts=1, time_base=Fraction(1, 1000), capture_ns=3)
            pic = c.receive(timeout=2)
            assert pic.kind == "video" and (pic.width, pic.height) == (64, 48) and int(pic.array.max()) == 7
            loan = sink.loan_picture(32, 24, "rgb24")
            sink.send_picture(loan, pts=2, time_base=Fraction(1, 1000), capture_ns=4, discontinuity=True)
            pic = c.receive(timeout=2)
            assert (pic.width, pic.height) == (32, 24) and pic.flags & framebus.FLAG_DISCONTINUITY
        assert m.frames.n == 4 and m.keyframes.n == 1 and m.rebases.n == 1
    finally:
        sink.close()


def test_an_encoded_ring_nobody_reads_keeps_its_history_for_a_late_decoder(prefix):
    m = SinkMetrics(*(_Count() for _ in range(7)))
    sink = Sink("h", prefix, m, history_seconds=2.0, fps=25.0)  # 50 items: the least, 64 slots
    try:
        for i in range(100):  # more than the 64 slots, with no reader at all
            sink.encoded(bytes([0, 0, 0, 1, 0x65 if i % 10 == 0 else 0x41, i]), "h264", keyframe=i % 10 == 0,
                         pts=i, time_base=Fraction(1, 25), capture_ns=i + 1, width=320, height=240)
        with framebus.Consumer.attach("h", prefix=prefix, start="oldest") as late:
            got = [item.pts for item in iter(late.poll, None)]
        assert got == list(range(36, 100)), "the last 64 items, oldest first: a late decoder finds keyframe 40"
    finally:
        sink.close()


def test_the_history_rings_hold_history_seconds_at_the_rate_and_cost_what_their_items_take(prefix):
    """10 s at 25 frames/s: 250 access units; the audio ring 10 s of its 20 ms chunks. The
    pages of /dev/shm they take are those of the items (a few KiB each), not 250 slots of
    256 KiB."""
    m = SinkMetrics(*(_Count() for _ in range(7)))
    sink = Sink("h", prefix, m, history_seconds=10.0, fps=25.0)
    try:
        for i in range(300):
            sink.encoded(bytes([0, 0, 0, 1, 0x65 if i % 25 == 0 else 0x41]) + bytes(2000), "h264",
                         keyframe=i % 25 == 0, pts=i, time_base=Fraction(1, 25), capture_ns=i + 1, width=640,
                         height=360)
            sink.audio(np.zeros((960, 1), np.int16), 48000, pts=i * 960, capture_ns=i + 1)
        with framebus.Consumer.attach("h", prefix=prefix, start="oldest") as late:
            got = [item.pts for item in iter(late.poll, None)]
        assert got == list(range(50, 300)), "the last 250 items"
        assert sink.audio_producer.geometry.slot_count == 500  # 10 s of 20 ms chunks
        ring = f"/dev/shm/{prefix}.h"
        slots, stride = sink.video.geometry.slot_count, sink.video.geometry.slot_stride
        taken = os.stat(ring).st_blocks * 512 - sink.video.geometry.payloads_off
        assert slots == 250 and stride >= 256 * 1024
        assert taken <= 250 * 4096, f"{taken} bytes of pages for 250 items of 2 KB (reserved up front: " \
                                    f"{slots * stride})"
    finally:
        sink.close()


# ----------------------------------------------------------------------------- helpers
def _row(item: framebus.Item) -> tuple | None:
    """(number or None, pts, capture_ns, flags) of an item, None if it was overwritten while read."""
    number = picture_number(item) if item.kind == "video" else None
    row = (number, item.pts, item.capture_ns, item.flags)
    return row if item.valid() else None


def collect(consumer: framebus.Consumer, want: int, timeout: float, keep=lambda item: True) -> list:
    """(number or None, pts, capture_ns, flags) of items until `want` were kept or `timeout` passed."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        item = consumer.receive(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
        if item is None or not keep(item):
            continue
        if (row := _row(item)) is not None:
            out.append(row)
    return out


def collect_both(a: framebus.Consumer, b: framebus.Consumer, want: int, timeout: float) -> tuple[list, list]:
    """collect() from two streams at once (a file's encoded ring closes when the file ends).

    It waits on both wake-up fds together and reads whichever has news: a reader that sat in
    one stream's wait while the other's pictures piled up would lose pictures of a ring nobody
    else reads (8 slots: 160 ms at 50 fps), or attach to a new one late."""
    outs, deadline = ([], []), time.monotonic() + timeout
    while any(len(out) < want for out in outs) and (left := deadline - time.monotonic()) > 0:
        select.select([a.fileno(), b.fileno()], [], [], min(0.05, left))  # detached: looked at every 50 ms
        for consumer, out in zip((a, b), outs):
            while len(out) < want and (item := consumer.poll()) is not None:
                if (row := _row(item)) is not None:
                    out.append(row)
    return outs


def ctl(b, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
    env["EDGEROOM_CONFIG"] = str(b.config)
    return subprocess.run([sys.executable, "-m", "services.cli", "ctl", *args], capture_output=True, text=True,
                          env=env, timeout=30)


# ----------------------------------------------------------------------------- files
def test_a_file_reaches_the_bus_decoded_every_frame_in_order_at_its_pace(box, prefix, tmp_path):
    path = numbered_file(tmp_path / "clip.mp4", 50, fps=25, gop=10)
    assert ffprobe_frames(path) == 50
    b = box(f'[sources.clip]\nkind = "file"\npath = "{path}"\nroom = "lobby"\n')
    with framebus.Consumer.attach("clip-raw", prefix=prefix, missing_ok=True, start="oldest") as raw, \
            framebus.Consumer.attach("clip", prefix=prefix, missing_ok=True, start="oldest") as enc:
        b.run()
        pictures, encoded = collect_both(raw, enc, 50, 20)
    # every picture in order; the first one or two may come out before this reader's attach
    # takes hold (a picture ring keeps no history); decode's own count below covers those
    numbers = [n for n, *_ in pictures]
    assert numbers == list(range(numbers[0], 50)) and numbers[0] <= 10, numbers
    capture = [c for *_, c, _ in pictures]
    span = (capture[-1] - capture[0]) / 1e9
    expected = (49 - numbers[0]) / 25
    assert abs(span - expected) < 0.1, f"paced at 25 fps: {expected:.2f} s expected, took {span:.2f}"
    pts = [p for _, p, _, _ in pictures]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    assert len(encoded) == 50 and [c for *_, c, _ in encoded][numbers[0]:] == capture, "capture_ns passed through"
    # the file ended: capture stays up, says so, and its session ends
    status = wait_for(lambda: "ended" in (s := b.services()["capture@clip"])["status"] and s, 10, "capture ended")
    assert status["state"] == "ready"
    wait_for(lambda: not [s for s in b.call("sessions") if s["session"] == "clip"], 5, "the clip's session to end")
    scrape = b.settled_scrape("capture@clip", "decode@clip")  # decode's last pictures may follow its last heartbeat
    assert metric_value(scrape, "edgeroom_capture_frames_total", stream="clip") == 50
    assert metric_value(scrape, "edgeroom_capture_keyframes_total", stream="clip") == 5
    assert metric_value(scrape, "edgeroom_decode_frames_out_total", stream="clip") == 50


def test_a_file_waits_for_its_decoder_then_plays_from_its_first_picture(box, prefix, tmp_path):
    """A file started before its decoder read it was decoded in one burst from the ring's history,
    faster than any reader of NAME-raw could follow, and those readers lost its first pictures.
    Capture makes NAME at open and starts the file's clock when NAME has its reader."""
    path = numbered_file(tmp_path / "wait.mp4", 20, fps=25, gop=10)
    b = box(f'[sources.wait]\nkind = "file"\npath = "{path}"\n')
    b.spawn("service", "hub")
    b.wait_ready("hub")
    b.spawn("service", "capture", "wait")  # and no decode@wait: nobody reads the stream
    wait_for(lambda: "waiting for decode@wait" in b.services().get("capture@wait", {}).get("status", ""), 20,
             f"capture waiting for its decoder; log:\n{b.log()[-2000:]}")
    (ring,) = [s for s in framebus.list_streams(prefix) if s.stream == "wait"]
    assert ring.items == 0, "made, and nothing sent"
    came = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    with framebus.Consumer.attach("wait", prefix=prefix, start="oldest") as reader:  # stands in for decode
        items = collect(reader, 20, 10)
    assert len(items) == 20 and [p for _, p, _, _ in items] == sorted(p for _, p, _, _ in items)
    capture = [c for *_, c, _ in items]
    assert capture[0] >= came, "the file's clock started when its reader came"
    gaps = np.diff(capture) / 1e6
    assert abs(gaps - 40).max() < 1, f"paced at 25 fps from the first picture: {gaps}"
    assert "reads wait after" in b.log()


def test_a_looping_file_keeps_time_moving_forward(box, prefix, tmp_path):
    path = numbered_file(tmp_path / "loop.mp4", 10, fps=25, gop=5)
    b = box(f'[sources.loop]\nkind = "file"\npath = "{path}"\nloop = true\ndecode = false\n')
    with framebus.Consumer.attach("loop", prefix=prefix, missing_ok=True, start="oldest") as enc:
        b.run()
        items = collect(enc, 25, 10)
    assert len(items) == 25
    pts = [p for _, p, _, _ in items]
    assert all(b > a for a, b in zip(pts, pts[1:])), f"pts went backwards at a loop: {pts}"
    marked = [i for i, (*_, flags) in enumerate(items) if flags & framebus.FLAG_DISCONTINUITY]
    assert marked and all(i % 10 == 0 for i in marked), marked
    gaps = np.diff([c for *_, c, _ in items]) / 1e6
    assert gaps.max() < 80, f"capture times stay paced across the loop, got gaps up to {gaps.max():.0f} ms"
    assert "decode@loop" not in b.services()


def test_corrupt_and_truncated_files_resume_at_the_next_keyframe(box, prefix, tmp_path):
    good = numbered_file(tmp_path / "good.ts", 100, fps=50, gop=10, fmt="mpegts")
    data = bytearray(good.read_bytes())
    bad = tmp_path / "garbage.ts"
    at = len(data) // 2
    data[at: at + 6000] = np.random.default_rng(1).integers(0, 256, 6000, dtype=np.uint8).tobytes()
    bad.write_bytes(data)
    cut = tmp_path / "cut.ts"
    cut.write_bytes(good.read_bytes()[: len(data) * 7 // 10])
    b = box(f'[sources.bad]\nkind = "file"\npath = "{bad}"\n[sources.cut]\nkind = "file"\npath = "{cut}"\n')
    with framebus.Consumer.attach("bad-raw", prefix=prefix, missing_ok=True, start="oldest") as c1, \
            framebus.Consumer.attach("cut-raw", prefix=prefix, missing_ok=True, start="oldest") as c2:
        b.run()
        bad_pics, cut_pics = collect_both(c1, c2, 100, 6)  # neither reaches 100: both lose pictures
    numbers = [n for n, *_ in bad_pics]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), "pictures intact and in order"
    assert numbers[0] <= 10 and numbers[-1] >= 90, f"decoding went on after the garbage: {numbers}"
    missing = sorted(set(range(100)) - set(numbers))
    assert missing, "the garbage cost some pictures"
    resumed = [n for n in numbers if n > missing[0]]
    assert resumed and resumed[0] % 10 == 0, f"resumed at {resumed[0]}, not at a keyframe"
    def decode_counted():
        text = b.scrape()
        return text if metric_value(text, "edgeroom_decode_frames_in_total", stream="bad") else None
    scrape = wait_for(decode_counted, 5, "decode metrics")
    errors = metric_value(scrape, "edgeroom_decode_errors_total", stream="bad") or 0
    dropped = sum(metric_value(scrape, "edgeroom_decode_dropped_frames_total", stream="bad", reason=r) or 0
                  for r in ("corrupt", "waiting_keyframe"))
    assert errors + dropped > 0, "the damage is counted"
    cut_numbers = [n for n, *_ in cut_pics]
    assert cut_numbers == list(range(cut_numbers[0], cut_numbers[0] + len(cut_numbers))), cut_numbers
    assert cut_numbers[0] <= 10 and 50 < cut_numbers[-1] < 80, cut_numbers
    assert b.services()["decode@bad"]["state"] == "ready" and b.services()["capture@cut"]["state"] == "ready"


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_h264_pictures_and_the_beep_line_up_with_the_flash(box, prefix):
    b = box('[sources.syn]\nwidth = 320\nheight = 240\nfps = 30.0\naudio = true\ngop = 0.5\n')
    with framebus.Consumer.attach("syn-raw", prefix=prefix, missing_ok=True, start="oldest") as raw, \
            framebus.Consumer.attach("syn-audio", prefix=prefix, missing_ok=True, start="oldest") as audio:
        b.run()
        flashes, numbers, beeps, chunks = [], [], [], 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and (len(flashes) < 3 or len(beeps) < 3):
            item = raw.receive(timeout=0.05)
            if item is not None:
                y = item.planes()[0]
                if float(y[40:, :].mean()) > 200:
                    flashes.append(item.capture_ns)
                else:
                    numbers.append(picture_number(item))
            while (chunk := audio.poll()) is not None:
                chunks += 1
                samples = chunk.array
                if int(np.abs(samples[:10]).max()) > 1000 and chunk.pts % 48000 == 0:
                    beeps.append(chunk.capture_ns)
    assert numbers == sorted(numbers) and len(numbers) > 40
    assert len(flashes) >= 2 and len(beeps) >= 2, (flashes, beeps, chunks)
    for f in flashes:
        nearest = min(beeps, key=lambda t: abs(t - f)) if beeps else None
        if nearest is not None and abs(nearest - f) < 5e8:
            assert abs(nearest - f) < 1_000_000, f"flash and beep {abs(nearest - f) / 1e6:.2f} ms apart"
    sessions = {s["session"]: s for s in b.call("sessions")}
    tracks = {t["id"]: t for t in sessions["syn"]["tracks"]}
    assert tracks["video"]["format"] == "h264" and tracks["audio"]["rate"] == 48000


# ----------------------------------------------------------------------------- control
def test_sources_added_and_removed_by_command_start_and_stop_their_processes(box, prefix, tmp_path):
    path = numbered_file(tmp_path / "clip.mp4", 50, fps=25, gop=10)
    b = box()
    b.run()
    b.wait_ready("hub", "capture@cam")
    bad = ctl(b, "source", "add", "door", "kind=url", "url=ftp://nowhere")
    assert bad.returncode == 1 and "sources.door.url: expected an address starting with" in bad.stderr
    ok = ctl(b, "source", "add", "clip", "kind=file", f"path={path}", "loop=true", "room=lobby")
    assert ok.returncode == 0, ok.stderr
    b.wait_ready("capture@clip", "decode@clip")
    again = ctl(b, "source", "add", "clip", "kind=synthetic")
    assert again.returncode == 1 and "exists already" in again.stderr
    wait_for(lambda: [s for s in b.call("sessions") if s["session"] == "clip" and s["room"] == "lobby"], 5,
             "the clip's session in the lobby")
    listed = {r["name"]: r for r in b.call("source.list")}
    assert listed["clip"]["origin"] == "command" and listed["cam"]["origin"] == "config"
    # a snapshot of the encoded stream is answered from its decoded twin
    shot = tmp_path / "shot.jpg"
    snap = wait_for(lambda: (r := ctl(b, "snapshot", "clip", str(shot))).returncode == 0 and r, 5, "a snapshot")
    assert "320x240" in snap.stdout
    picture = cv2.imread(str(shot))
    assert picture.shape == (240, 320, 3) and 0 <= picture_number_bgr(picture) < 50
    missing = ctl(b, "snapshot", "nope", str(tmp_path / "x.jpg"))
    assert missing.returncode == 1 and "no stream 'nope'" in missing.stderr
    # removal: a command-added source and a config source both stop
    assert ctl(b, "source", "remove", "clip").returncode == 0
    assert ctl(b, "source", "remove", "cam").returncode == 0
    wait_for(lambda: not {"capture@clip", "decode@clip", "capture@cam"} & {
        k for k, v in b.services().items() if v["state"] != "stopped"}, 10, "their processes to stop")
    assert ctl(b, "source", "remove", "cam").returncode == 1
    assert [r["name"] for r in b.call("source.list")] == []
    # a config source added back by command, then removed again, stays removed
    assert ctl(b, "source", "add", "cam", "kind=synthetic", "encode=raw", "width=160", "height=120").returncode == 0
    assert [(r["name"], r["origin"]) for r in b.call("source.list")] == [("cam", "command")]
    assert ctl(b, "source", "remove", "cam").returncode == 0
    assert [r["name"] for r in b.call("source.list")] == []
    assert not [s for s in framebus.list_streams(prefix) if s.stream.startswith(("clip", "cam"))]


def picture_number_bgr(picture: np.ndarray) -> int:
    from services.capture.sources.synthetic import frame_number
    return frame_number(picture)


# ----------------------------------------------------------------------------- screen
def test_screen_source_sends_changes_skips_a_still_screen_and_fires_share_events(box, prefix, monkeypatch):
    from tests.test_screen import H, Painter, W, Xvfb
    x = Xvfb()
    try:
        monkeypatch.setenv("DISPLAY", x.display)
        paint = Painter(x.display)
        paint.fill(0x204060)
        b = box('[sources.desk]\nkind = "screen"\nmonitor = 1\nfps = 20.0\nscale = 0.5\n'
                'diff_threshold = 0.0001\nreconnect_min = 0.2\n')
        b.run()
        b.wait_ready("hub")
        with b.subscriber("hook.ON_SCREEN_SHARE_STARTED", "hook.ON_SCREEN_SHARE_STOPPED") as sub, \
                framebus.Consumer.attach("desk", prefix=prefix, missing_ok=True, start="oldest") as c:
            started = sub.recv(timeout=10)
            assert started is not None and started.topic == "hook.ON_SCREEN_SHARE_STARTED"
            assert started.data["session"] == "desk"
            time.sleep(1.0)  # a still screen: one frame, then skips
            still = []
            while (item := c.poll()) is not None:
                still.append(item.seq)
            moving, shape = 0, None
            for i in range(10):
                paint.fill(0x100000 * (i + 1))
                time.sleep(0.1)
                while (item := c.poll()) is not None:
                    moving += 1
                    shape = (item.format, item.width, item.height)
            assert shape == ("rgb24", W // 2, H // 2)
            assert len(still) <= 2, f"a still screen sent {len(still)} frames in a second"
            assert moving >= 8, f"a changing screen sent only {moving} frames"
            scrape = b.scrape()
            assert metric_value(scrape, "edgeroom_capture_dropped_frames_total", stream="desk",
                                reason="unchanged") >= 10
            assert ctl(b, "source", "remove", "desk").returncode == 0
            stopped = sub.recv(timeout=10)
            assert stopped is not None and stopped.topic == "hook.ON_SCREEN_SHARE_STOPPED"
        paint.close()
    finally:
        x.stop()
