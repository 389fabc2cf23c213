"""Every codec the bus carries, recorded: files ffmpeg makes (H.264 with B-frames and a
frame-rate change, H.265, VP8, VP9, AV1) played as looping `file` sources, and a raw
camera, all on one box with the recorder on; ffmpeg and ffprobe judge each recording."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.appliance import wait_for

RECORDER = """
[services.recorder]
restart_sec = 0.2
watchdog_sec = 5.0
stop_timeout = 5.0
[recorder]
dir = "{rec}"
record = "{record}"
fragment_seconds = 0.5
max_disk_share = 0.0
"""

# name: (ffmpeg arguments making the file, file name, size, recorded codec, encoder)
CLIPS = {
    # 1 s at 30 fps, then 1 s at 15 fps; x264's adaptive B-frames begin on the moving half
    "vfr": (["-f", "lavfi", "-i", "testsrc=size=192x108:rate=30", "-t", "2", "-vf",
             "select='lt(t\\,1)+not(mod(n\\,2))'", "-vsync", "vfr", "-c:v", "libx264", "-g", "30"],
            "vfr.mp4", (192, 108), "h264", "copy"),
    "hevc": (["-f", "lavfi", "-i", "testsrc=size=176x144:rate=15", "-t", "1.2", "-c:v", "libx265", "-g", "9",
              "-x265-params", "log-level=error"], "hevc.mp4", (176, 144), "hevc", "copy"),
    "vpx8": (["-f", "lavfi", "-i", "testsrc=size=160x96:rate=15", "-t", "1.2", "-c:v", "libvpx", "-g", "9",
              "-deadline", "realtime"], "vp8.webm", (160, 96), "h264", "libx264"),
    "vpx9": (["-f", "lavfi", "-i", "testsrc=size=208x120:rate=15", "-t", "1.2", "-c:v", "libvpx-vp9", "-g", "9",
              "-deadline", "realtime", "-cpu-used", "8"], "vp9.webm", (208, 120), "vp9", "copy"),
    "aom1": (["-f", "lavfi", "-i", "testsrc=size=128x96:rate=15", "-t", "1.2", "-c:v", "libsvtav1", "-g", "9",
              "-preset", "12"], "av1.mp4", (128, 96), "av1", "copy"),
}


def make_clip(tmp_path: Path, args: list[str], name: str) -> Path:
    out = tmp_path / name
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args, "-pix_fmt", "yuv420p", str(out)], check=True,
                   capture_output=True)
    return out


def probe(path: Path) -> dict:
    """The video stream's codec and size, its frames' pts (presentation order) and packets' dts."""
    def show(entries: str) -> dict:
        out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", entries, "-of",
                              "json", str(path)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    info = show("stream=codec_name,width,height")
    info["frames"] = [f["pts"] for f in show("frame=pts")["frames"]]
    info["dts"] = [p["dts"] for p in show("packet=dts")["packets"]]
    return info


def decode_errors(path: Path) -> str:
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True, text=True)
    return out.stderr.strip() + ("" if out.returncode == 0 else f" (exit {out.returncode})")


def increasing(values: list[int]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def test_every_codec_the_bus_carries_is_recorded_at_its_size_with_increasing_timestamps(box, tmp_path):
    rec = tmp_path / "rec"
    clips = {name: make_clip(tmp_path, args, file) for name, (args, file, *_) in CLIPS.items()}
    sources = "".join(f'[sources.{name}]\nkind = "file"\npath = "{path}"\nloop = true\ndecode = false\n'
                      for name, path in clips.items())
    b = box(sources + RECORDER.format(rec=rec, record=", ".join([*CLIPS, "cam"])))
    b.set_source("cam", 'width = 160\nheight = 120\nfps = 15.0\nencode = "raw"\n')   # raw: through the encoder
    b.run()
    b.wait_ready("recorder", "capture@cam", *(f"capture@{n}" for n in CLIPS), timeout=40)
    sub = b.subscriber("record.error")

    def recording():
        rows = {r["target"]: r for r in b.call("record.list")["recordings"]}
        return rows if all(r["state"] == "recording" for r in rows.values()) and len(rows) == len(CLIPS) + 1 \
            else None
    started = wait_for(recording, 20, f"every target recording; log:\n{b.log()[-3000:]}")
    time.sleep(3.5)   # every clip loops at least once (the longest is 2 s)
    paths = {name: Path(b.call("record.stop", {"target": name})["path"]) for name in [*CLIPS, "cam"]}
    errors = []
    while (ev := sub.recv(timeout=0.1)) is not None:
        errors.append(ev.data)
    assert errors == [], errors
    assert "Unknown codec" not in b.log() and "refused" not in b.log()

    expected = {name: (size, codec, encoder) for name, (_, _, size, codec, encoder) in CLIPS.items()}
    expected["cam"] = ((160, 120), "h264", "libx264")
    for name, path in paths.items():
        (w, h), codec, encoder = expected[name]
        assert path.suffix == ".mp4" and path.exists(), (name, path)
        assert decode_errors(path) == "", f"{name}: {path}"
        info = probe(path)
        s = info["streams"][0]
        assert (s["codec_name"], s["width"], s["height"]) == (codec, w, h), (name, s)
        assert started[name]["encoder"] in ((encoder,) if encoder == "copy" else (encoder, "h264_nvenc")), \
            (name, started[name])
        frames = info["frames"]
        assert increasing(frames), f"{name}: presentation times not strictly increasing: {frames}"
        assert increasing(info["dts"]), f"{name}: decode times not strictly increasing"
        if name != "cam":
            seconds = (frames[-1] - frames[0]) / 90000
            assert seconds > (2.0 if name == "vfr" else 1.2), f"{name}: {seconds:.2f} s, the clip did not loop"

    # variable frame rate as the file has it: 33 ms steps, then 67 ms steps, across the loop as well
    vfr = probe(paths["vfr"])["frames"]
    steps = {round((b2 - a) / 90) for a, b2 in zip(vfr, vfr[1:])}
    assert {33, 67} <= steps, steps


class _Item:
    """What StreamRecorder reads of a framebus item, for feeding it without a box."""
    kind, generation = "encoded", 1

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)

    def valid(self) -> bool:
        return True


def _feed(rec, path: Path, codec: str, t0_ns: int, *, sized: bool) -> int:
    """Feed a file's packets as capture would put them on the bus; returns the capture time after the last."""
    import av
    import numpy as np
    with av.open(str(path)) as f:
        v = f.streams.video[0]
        bsf = av.BitStreamFilterContext("hevc_mp4toannexb", v) if codec == "h265" else None
        cap, seq = t0_ns, 0
        for p in f.demux(v):
            for q in (bsf.filter(p) if bsf else [p]) if p.size else []:
                cap = t0_ns + int((q.dts - v.start_time) * q.time_base * 1e9)
                seq += 1
                rec.feed(_Item(codec=codec, seq=seq, keyframe=q.is_keyframe, capture_ns=cap, pts=q.pts,
                               time_base=q.time_base, array=np.frombuffer(bytes(q), np.uint8),
                               width=v.codec_context.width if sized else 0,
                               height=v.codec_context.height if sized else 0))
    return cap + 100_000_000


def test_a_size_the_items_do_not_carry_is_read_and_a_new_size_starts_a_new_segment(tmp_path):
    from services.recorder.stream import Settings, StreamRecorder
    events: list = []
    small = make_clip(tmp_path, ["-f", "lavfi", "-i", "testsrc=size=128x96:rate=15", "-t", "0.6", "-c:v",
                                 "libx265", "-x265-params", "log-level=error"], "small.mp4")
    vp9 = make_clip(tmp_path, CLIPS["vpx9"][0], "vp9.webm")
    hevc = make_clip(tmp_path, CLIPS["hevc"][0], "hevc.mp4")
    rec = StreamRecorder("t", tmp_path / "rec", Settings(fsync=False), lambda topic, data: events.append(data))
    t = _feed(rec, hevc, "h265", 10**9, sized=True)
    _feed(rec, small, "h265", t, sized=True)       # a new SPS and size: a new segment
    rec.stop()
    rec2 = StreamRecorder("u", tmp_path / "rec", Settings(fsync=False), lambda topic, data: events.append(data))
    _feed(rec2, vp9, "vp9", 10**9, sized=False)    # no size in the items: read from the keyframe
    rec2.stop()
    files = sorted((tmp_path / "rec" / "t").glob("*.mp4")) + sorted((tmp_path / "rec" / "u").glob("*.mp4"))
    streams = [probe(f)["streams"][0] for f in files]
    sizes = [(s["codec_name"], s["width"], s["height"]) for s in streams]
    assert sorted(sizes) == sorted([("hevc", 176, 144), ("hevc", 128, 96), ("vp9", 208, 120)]), sizes
    assert all(decode_errors(f) == "" for f in files)
