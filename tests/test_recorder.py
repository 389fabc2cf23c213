"""The recorder end to end: a real box (capture of a real x264 file, the recorder process,
the hub), ffprobe/ffmpeg decide what the files hold."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import framebus
from tests.appliance import metric_value, wait_for
from tests.media_files import ffprobe_frames, flashes_and_beeps, numbered_file

RECORDER = """
[services.recorder]
restart_sec = 0.2
watchdog_sec = 5.0
stop_timeout = 5.0
[recorder]
dir = "{rec}"
record = "{record}"
segment_seconds = {segment}
fragment_seconds = 0.5
max_disk_share = 0.0
"""


def probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_name,profile,width,height,nb_read_frames:format=duration", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def packet_pts(path: Path) -> list[float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def decode_errors(path: Path) -> str:
    """What ffmpeg says at level error while decoding every frame ('' is a clean decode)."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-f", "mp4", "-i", str(path), "-f", "null", "-"],
                         capture_output=True, text=True)
    return out.stderr.strip() + ("" if out.returncode == 0 else f" (exit {out.returncode})")


def framemd5(path: Path) -> list[str]:
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:0", "-f", "framemd5", "-"],
                         capture_output=True, text=True, check=True)
    return [line.split(",")[-1].strip() for line in out.stdout.splitlines() if line and not line.startswith("#")]


def recorder_box(box, tmp_path, source: str, *, record: str, segment: float = 300.0, rec: Path | None = None):
    rec = rec or tmp_path / "rec"
    b = box(source + RECORDER.format(rec=rec, record=record, segment=segment))
    return b, rec


def finished(rec: Path) -> list[Path]:
    """Finished segments, oldest first (by when they were finished)."""
    return sorted(rec.rglob("*.mp4"), key=lambda p: p.stat().st_mtime_ns)


def partials(rec: Path) -> list[Path]:
    return sorted(rec.rglob("*.mp4.partial"))


def test_a_file_source_is_remuxed_into_segments_with_every_frame_and_no_reencode(box, tmp_path):
    src = numbered_file(tmp_path / "clip.mp4", 100, fps=25, gop=10)
    b, rec = recorder_box(box, tmp_path, f'[sources.clip]\nkind = "file"\npath = "{src}"\ndecode = false\n',
                          record="clip", segment=1.5)
    b.run()
    b.wait_ready("recorder", "capture@clip")
    sub = b.subscriber("record.*")
    wait_for(lambda: "ended" in b.services()["capture@clip"]["status"], 20, "the file to end")
    time.sleep(0.5)
    b.call("record.stop", {"target": "clip"})  # finishes the last segment
    events = []
    while (ev := sub.recv(timeout=0.2)) is not None:
        events.append(ev)
    files = finished(rec)
    assert files and not partials(rec), f"{files} {partials(rec)}"
    assert len(files) >= 2, f"segments of 1.5 s over 4 s of video: {files}"
    info = [probe(f) for f in files]
    src_info = probe(src)["streams"][0]
    for i in info:
        s = i["streams"][0]
        assert (s["codec_name"], s["profile"], s["width"], s["height"]) == \
            (src_info["codec_name"], src_info["profile"], 320, 240)
        assert decode_errors(files[0]) == ""
    assert sum(int(i["streams"][0]["nb_read_frames"]) for i in info) == 100
    total = sum(float(i["format"]["duration"]) for i in info)
    assert abs(total - 4.0) < 0.25, total
    for f in files:
        pts = packet_pts(f)
        assert all(b > a for a, b in zip(pts, pts[1:])), f"{f}: timestamps not strictly increasing"
    # zero re-encodes: every decoded picture is bit-identical to the source's
    assert sum((framemd5(f) for f in files), []) == framemd5(src)
    # the segment events name the files, with their frames
    seg = [e for e in events if e.topic == "record.segment"]
    assert sorted(Path(e.data["path"]) for e in seg) == files
    assert sum(e.data["frames"] for e in seg) == 100


def test_sigkill_leaves_a_playable_file_missing_at_most_the_last_second_and_the_restart_completes_it(
        box, tmp_path, prefix):
    src = numbered_file(tmp_path / "long.mp4", 300, fps=25, gop=25)
    b, rec = recorder_box(box, tmp_path, f'[sources.cam2]\nkind = "file"\npath = "{src}"\ndecode = false\n',
                          record="cam2")
    with framebus.Consumer.attach("cam2", prefix=prefix, missing_ok=True, start="oldest") as bus:
        b.run()
        rows = b.wait_ready("recorder", "capture@cam2")
        pid = rows["recorder"]["pid"]
        seen: list[int] = []
        deadline = time.monotonic() + 30
        while len(seen) < 100 and time.monotonic() < deadline:  # 4 s of video on the bus
            item = bus.receive(timeout=0.5)
            if item is not None:
                seen.append(item.capture_ns)
        wait_for(lambda: partials(rec), 5, "a segment being written")
        path = partials(rec)[0]
        kill_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        os.kill(pid, signal.SIGKILL)
        while (item := bus.poll()) is not None:
            seen.append(item.capture_ns)
        copy = tmp_path / "killed.mp4"
        copy.write_bytes(path.read_bytes())  # as the kill left it, before the restarted recorder repairs it
    on_bus = sum(1 for c in seen if c <= kill_ns)
    assert decode_errors(copy) == "", "the file plays to its end"
    frames = ffprobe_frames(copy)
    assert frames >= on_bus - 25, f"{frames} frames recorded, {on_bus} on the bus before the kill (25 fps)"
    assert framemd5(copy) == framemd5(src)[:frames], "the recording is the source's first frames"
    # the supervisor restarts the recorder, which repairs the file and records on in it from the ring's
    # history (resume): when the file source ends, the one segment holds every frame, once
    final = path.with_name(path.name.removesuffix(".partial"))
    wait_for(lambda: final.exists(), 30, "the segment finished at the end of the file")
    assert "was cut by a crash; its recording continues in it" in b.log()
    assert finished(rec) == [final] and not partials(rec)
    assert decode_errors(final) == ""
    assert framemd5(final) == framemd5(src), "every frame of the source, once, in one segment"


def test_a_full_disk_is_an_error_event_and_a_metric_the_file_plays_and_recording_resumes(box, tmp_path):
    rec = tmp_path / "small"
    rec.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(rec)]).returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        filler = rec / "filler"
        filler.write_bytes(b"\0" * (2 * 1024 * 1024))
        src = numbered_file(tmp_path / "loop.mp4", 100, fps=25, gop=10, size=(640, 480))
        b, _ = recorder_box(box, tmp_path, f'[sources.door]\nkind = "file"\npath = "{src}"\nloop = true\n'
                            f'decode = false\n', record="door", rec=rec)
        b.run()
        b.wait_ready("recorder", "capture@door")
        sub = b.subscriber("record.*")
        err = wait_for(lambda: next((e for e in iter(lambda: sub.recv(timeout=0.2), None)
                                     if e.topic == "record.error"), None), 60, "record.error")
        assert err.data["reason"] == "disk_full" and err.data["target"] == "door"
        full = wait_for(lambda: finished(rec), 5, "the cut segment renamed")
        assert full == [Path(err.data["path"])], "the event names the file, which is finished"
        assert decode_errors(full[0]) == "" and ffprobe_frames(full[0]) > 0
        assert metric_value(b.settled_scrape("recorder"), "edgeroom_recorder_errors_total", target="door",
                            reason="disk_full") == 1
        assert "disk full" in b.services()["recorder"]["status"] or "disk_full" in b.services()["recorder"]["status"]
        filler.unlink()  # space returns: a new segment begins
        wait_for(lambda: [p for p in partials(rec) if p.stat().st_size > 50_000], 20, "recording to resume")
        b.runner.send_signal(signal.SIGTERM)
        b.runner.wait(timeout=20)
        assert len(finished(rec)) >= 2
        for f in finished(rec):
            assert decode_errors(f) == ""
    finally:
        subprocess.run(["umount", "-l", str(rec)])


def test_a_resolution_change_mid_stream_starts_a_new_segment(box, tmp_path):
    a = numbered_file(tmp_path / "a.h264", 50, fps=25, gop=10, fmt="h264")
    c = numbered_file(tmp_path / "c.h264", 50, fps=25, gop=10, size=(640, 480), fmt="h264")
    joined = tmp_path / "both.h264"
    joined.write_bytes(a.read_bytes() + c.read_bytes())
    both = tmp_path / "both.ts"  # a container with timestamps, so capture paces it at 25 fps
    subprocess.run(["ffmpeg", "-v", "error", "-r", "25", "-i", str(joined), "-c", "copy", str(both)], check=True)
    b, rec = recorder_box(box, tmp_path, f'[sources.res]\nkind = "file"\npath = "{both}"\ndecode = false\n',
                          record="res")
    b.run()
    b.wait_ready("recorder", "capture@res")
    wait_for(lambda: "ended" in b.services()["capture@res"]["status"], 20, "the file to end")
    time.sleep(0.5)
    b.call("record.stop", {"target": "res"})
    files = finished(rec)
    sizes = [(probe(f)["streams"][0]["width"], ffprobe_frames(f)) for f in files]
    assert sizes == [(320, 50), (640, 50)], sizes
    for f in files:
        assert decode_errors(f) == ""


def test_record_start_stop_and_list_by_command(box, tmp_path):
    b, rec = recorder_box(box, tmp_path, '[sources.syn]\nwidth = 320\nheight = 240\nfps = 30.0\nencode = "raw"\n',
                          record="")
    b.run()
    b.wait_ready("recorder", "capture@syn")
    wait_for(lambda: "record.start" in json.dumps(b.call("commands")), 10, "the recorder's commands")
    sub = b.subscriber("record.*")
    got = b.call("record.start", {"target": "syn"})
    assert got["target"] == "syn"
    started = wait_for(lambda: sub.recv(timeout=0.5), 10, "record.started")
    assert started.topic == "record.started" and started.data["encoder"] == "libx264"
    assert [r["target"] for r in b.call("record.list")["recordings"]] == ["syn"]
    time.sleep(2.0)
    stopped = b.call("record.stop", {"target": "syn"})
    path = Path(stopped["path"])
    assert path.exists() and path.suffix == ".mp4"
    info = probe(path)["streams"][0]
    assert info["codec_name"] == "h264" and (info["width"], info["height"]) == (320, 240)
    assert int(info["nb_read_frames"]) >= 30
    assert decode_errors(path) == ""
    scrape = b.scrape()
    assert 'edgeroom_recorder_encoder{hardware="false",name="libx264",service="recorder",target="syn"} 1.0' in scrape \
        or any(line.startswith("edgeroom_recorder_encoder{") and 'name="libx264"' in line and line.endswith(" 1.0")
               for line in scrape.splitlines()), scrape
    with pytest.raises(Exception, match="not_found|not being recorded"):
        b.call("record.stop", {"target": "syn"})
    with pytest.raises(Exception, match="bad_args|target must be"):
        b.call("record.start", {"target": "Bad Name!"})


def test_a_stream_with_b_frames_is_remuxed_in_presentation_order(box, tmp_path):
    src = tmp_path / "bf.mp4"  # x264 with B-frames: decode order differs from presentation order
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-t", "3",
                    "-c:v", "libx264", "-bf", "2", "-g", "25", "-pix_fmt", "yuv420p", str(src)], check=True)
    b, rec = recorder_box(box, tmp_path, f'[sources.bfr]\nkind = "file"\npath = "{src}"\ndecode = false\n',
                          record="bfr")
    b.run()
    b.wait_ready("recorder", "capture@bfr")
    wait_for(lambda: "ended" in b.services()["capture@bfr"]["status"], 20, "the file to end")
    time.sleep(0.5)
    path = Path(b.call("record.stop", {"target": "bfr"})["path"])
    assert decode_errors(path) == ""
    assert framemd5(path) == framemd5(src), "every picture, bit-identical, in the source's order"
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts,dts",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout.split()
    pts, dts = zip(*((int(a), int(b)) for a, b in (x.split(",") for x in out)))
    assert all(y > x for x, y in zip(dts, dts[1:])) and all(p >= d for p, d in zip(pts, dts))
    assert sorted(pts) != list(pts), "presentation order differs from decode order, as in the source"
    assert len(set(pts)) == len(pts)




def test_a_room_recording_holds_the_sessions_video_and_audio_in_sync(box, tmp_path):
    b, rec = recorder_box(box, tmp_path, '[sources.syn]\nwidth = 320\nheight = 240\nfps = 30.0\naudio = true\n'
                          'gop = 1.0\nroom = "sync"\ndecode = false\n', record="room:sync")
    b.run()
    b.wait_ready("recorder", "capture@syn")
    sub = b.subscriber("record.*")
    started = wait_for(lambda: sub.recv(timeout=0.5), 15, "record.started")
    assert started.topic == "record.started" and started.data["target"] == "room:sync"
    time.sleep(4.5)
    path = Path(b.call("record.stop", {"target": "room:sync"})["path"])
    assert path.suffix == ".mp4" and path.parent.name == "room-sync"
    streams = {s["codec_name"]: s for s in probe(path)["streams"]}
    assert set(streams) == {"h264", "aac"}, streams
    assert decode_errors(path) == ""
    flashes, beeps = flashes_and_beeps(path)
    assert len(flashes) >= 3 and len(beeps) >= 3, (flashes, beeps)
    inside = [t for t in flashes if min(beeps) - 0.5 < t < max(beeps) + 0.5]  # where both tracks have media
    assert len(inside) >= 3, (flashes, beeps)
    offsets = [min(beeps, key=lambda b: abs(b - t)) - t for t in inside]
    print("flash -> beep offsets (ms):", [round(o * 1000, 1) for o in offsets])
    assert all(abs(o) <= 0.040 for o in offsets), f"flashes {flashes}, beeps {beeps}"


def test_a_recording_started_by_command_goes_on_after_the_recorder_restarts(box, tmp_path):
    b, rec = recorder_box(box, tmp_path, "", record="")
    b.run()
    b.wait_ready("recorder", "capture@cam")
    wait_for(lambda: "record.start" in b.call("commands"), 10, "the recorder's commands")
    b.call("record.start", {"target": "cam"})
    wait_for(lambda: partials(rec) and partials(rec)[0].stat().st_size > 20000, 10, "the first fragments")
    pid = b.services()["recorder"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: b.services()["recorder"]["pid"] != pid and b.services()["recorder"]["state"] == "ready", 30,
             "the recorder restarted")
    assert [r["target"] for r in b.call("record.list")["recordings"]] == ["cam"]   # remembered, not lost
    wait_for(lambda: len(partials(rec)) == 1 and len(finished(rec)) == 1, 10,
             "the killed segment repaired, a new one being written")
    b.call("record.stop", {"target": "cam"})
    pid = b.services()["recorder"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: b.services()["recorder"]["pid"] != pid and b.services()["recorder"]["state"] == "ready", 30,
             "the recorder restarted")
    assert b.call("record.list")["recordings"] == []   # stopped stays stopped


def test_no_reader_of_a_recorded_camera_drops_an_item(box, tmp_path):
    """The demo's box in small: a camera with its tone, its decoder, the recorder on the stream
    and on its room. Every reader of the encoded stream and of the audio keeps up: after the
    rings have wrapped several times, no drops on either (`ctl streams`)."""
    b, rec = recorder_box(box, tmp_path, '[sources.syn]\nwidth = 320\nheight = 240\nfps = 30.0\naudio = true\n'
                          'room = "lobby"\n', record="syn, room:lobby")
    b.run()
    b.wait_ready("recorder", "capture@syn", "decode@syn")
    with b.subscriber("record.started") as sub:
        wait_for(lambda: (e := sub.recv(timeout=0.5)) is not None and e.data["target"] == "room:lobby", 15,
                 f"the room recording started; log:\n{b.log()[-3000:]}")
    def wrapped():   # 64 slots each: both rings went round three times since the readers attached
        streams = {s["stream"]: s for s in b.call("streams")}
        return streams if min(streams["syn"]["items"], streams["syn-audio"]["items"]) > 3 * 64 else None
    streams = wait_for(wrapped, 20, "200 items on syn and syn-audio")
    video, audio = streams["syn"], streams["syn-audio"]
    assert len(video["consumers"]) == 3 and len(audio["consumers"]) == 1, streams  # decode, recorder, its room
    assert (video["drops"], audio["drops"]) == (0, 0), (video["consumers"], audio["consumers"])
