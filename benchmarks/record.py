"""Recorder benchmark: the recorder remuxing and encoding bus streams against ffmpeg on the same input.

Run from the repository root:

    .venv/bin/python benchmarks/record.py [--quick] [--json PATH] [--seconds S] [--streams 1,4]

What it answers, on this machine: what one recorded stream costs the recorder process
(CPU seconds per second of video) when it remuxes an H.264 stream from the bus into
fragmented MP4, against `ffmpeg -c copy` doing the same to the same file, and against the
physical floor (reading and writing the same bytes); whether remuxing really re-encodes
nothing; and what encoding a raw 720p30 stream costs against ffmpeg's libx264 with the
same settings on the same pictures.

Method
------
* Clip: made once with the system's ffmpeg and cached under $XDG_CACHE_HOME (or
  ~/.cache)/edgeroom-bench: lavfi `testsrc2` 1280x720 30 fps, libx264 preset fast, High,
  4 Mbit/s CBR (VBV), a keyframe every 2 s, no B-frames, 20 s.
* Peers, in the same run, before the boxes, on the same file, CPU = user + sys of the
  child (os.wait4's rusage) less the CPU of the same command stopped after one frame
  (`-frames:v 1`, median of 3: start-up, ~40-60 ms), per second of video:
  - `ffmpeg -stream_loop L -i CLIP -map 0:v -c copy -f mp4 OUT` (plain MP4, its index at
    the end) and the same with the recorder's movflags (frag_keyframe+empty_moov+
    default_base_moof, frag_duration 0.5 s): flat out, L+1 passes (60 s of video; --quick 20).
  - the fragmented one paced (`-re`, S seconds): ffmpeg waking per packet in real time,
    as the recorder must.
  - limit: a Python child that reads the clip's bytes and writes them to a new file in
    chunks of one fragment (0.5 s of video), with an fsync after each chunk and without;
    CPU from getrusage around the loop (no interpreter start). The cost of moving the
    bytes at all: nothing that records can spend less.
  - encode: ffmpeg `-f rawvideo -pix_fmt rgb24 -s 1280x720 -r 30 -i - -c:v libx264 -preset
    veryfast -crf 23 -bf 0 -g 60 -pix_fmt yuv420p` + the recorder's movflags, fed through a
    pipe with the synthetic source's own pictures (services/capture/sources/synthetic.Pattern,
    the same moving bar, frame counter and flash once a second), drawn by this process
    (not counted).
* edgeroom: a private box (runtime dir under /tmp, bus prefix, metrics on 127.0.0.1:0)
  run by `python -m services.cli run` with N sources s1..sN and the recorder:
  remux: file sources (the clip, loop = true, decode = false); encode: synthetic sources
  (1280x720, 30 fps, encode = "raw": rgb24 pictures on the bus) recorded with encoder =
  "libx264" (crf 23, preset veryfast, gop 2 s: the defaults). `[recorder] record` starts
  empty; once every source is on the bus, the recorder's idle CPU is measured (3 s: its
  heartbeats and loop, with the streams flowing past it unread), then `record.start` for
  every sI, a warm-up (3 s, --quick 2 s), and the window (S = 15 s, --quick 6 s):
  - CPU: the recorder process alone (utime + stime from /proc/PID/stat, all threads, 10 ms
    ticks): capture@ is the cost of bringing the stream onto the bus, the same for any
    consumer, and is not counted. Per stream-second = CPU / (N x window). "net" also
    subtracts the idle CPU (not per stream: a box pays it once).
  - remux is measured with `[recorder] fsync = true` (the default: each fragment fsynced)
    and false (what ffmpeg does). The fragment flush histogram (writev + fsync, wall time)
    comes from the recorder's metrics.
  - zero re-encodes, proven in the run: edgeroom_recorder_encoder{target=sI} names "copy"
    and nothing else, and the decoded pictures of every sI's recording (ffmpeg -f framemd5)
    are the clip's, bit-identical, in order (from a keyframe, around the loop).
  - frames: items on sI during the window (the ring's counter) vs what the recorder
    dropped (edgeroom_recorder_dropped_total, all reasons) and its frames counter.
* Machine: everything shares its cores. The CPU the machine spent outside this
  benchmark's processes during each window (/proc/stat busy - the box - us) is reported
  as "other load" (% of one core), with the load average.
* Target: remux CPU per stream-second (fsync on, N=1) within 1.5x of ffmpeg -c copy with
  the same movflags flat out; zero re-encodes.
* Time: --quick ~70 s; a full run ~3 minutes on the 2-core build machine (the first run
  also encodes the clip, ~30 s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_ROOT)

import framebus  # noqa: E402
from benchmarks.benchbox import BenchBox, encode_testsrc  # noqa: E402
from benchmarks.ingest import (  # noqa: E402
    _on_sigterm,
    cache_dir,
    code_version,
    log,
    machine_busy_s,
    proc_cpu_s,
    run_child,
    self_cpu_s,
    tool_version,
)
from services.control.client import ControlError  # noqa: E402

FPS = 30
WIDTH, HEIGHT = 1280, 720
KBPS = 4000
CLIP_S = 20
GOP = 2 * FPS
FRAGMENT_S = 0.5
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
TARGET_RATIO = 1.5
CLIP_VERSION = 1
IDLE_S = 3.0  # /proc ticks are 10 ms: the idle figure resolves 3.3 ms/s


@dataclass
class Plan:
    seconds: float
    warmup_s: float
    streams: tuple
    encode_streams: tuple
    copy_passes: int  # ffmpeg -c copy flat out: the clip this many times


FULL = Plan(seconds=15.0, warmup_s=3.0, streams=(1, 4), encode_streams=(1,), copy_passes=15)
QUICK = Plan(seconds=6.0, warmup_s=2.0, streams=(1,), encode_streams=(1,), copy_passes=5)


def clip_path() -> Path:
    return cache_dir() / (f"record-v{CLIP_VERSION}-testsrc2-{WIDTH}x{HEIGHT}-{FPS}fps-{CLIP_S}s-{KBPS}k-"
                          f"gop{GOP}-bf0.mp4")


def make_clip() -> Path:
    return encode_testsrc(clip_path(), WIDTH, HEIGHT, FPS, CLIP_S, KBPS, GOP, log=log)


def framemd5(path: Path) -> list[str]:
    """The md5 of every decoded picture, in presentation order."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-map", "0:v:0", "-f", "framemd5",
                          "-"], capture_output=True, text=True, check=True, timeout=300)
    return [ln.rsplit(",", 1)[-1].strip() for ln in out.stdout.splitlines() if ln and not ln.startswith("#")]


def same_pictures(rec: list[str], src: list[str]) -> tuple[bool, int]:
    """Is `rec` the looped source's pictures from some keyframe on? (ok, that keyframe's index)"""
    if not rec:
        return False, -1
    looped = src * (len(rec) // len(src) + 2)
    for k in range(0, len(src), GOP):
        if looped[k:k + len(rec)] == rec:
            return True, k
    return False, -1


# --------------------------------------------------------------------------------------
# Peers


def ffmpeg_copy_cmd(clip: Path, out: Path, passes: int, frag: bool, paced_s: float = 0.0,
                    frames: int | None = None) -> list[str]:
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
    if paced_s:
        cmd += ["-re"]
    if passes > 1:
        cmd += ["-stream_loop", str(passes - 1)]
    cmd += ["-i", str(clip), "-map", "0:v:0", "-c", "copy"]
    if paced_s:
        cmd += ["-t", f"{paced_s:g}"]
    if frames is not None:
        cmd += ["-frames:v", str(frames)]
    if frag:
        cmd += ["-movflags", MOVFLAGS, "-frag_duration", str(int(FRAGMENT_S * 1e6))]
    return cmd + ["-f", "mp4", str(out)]


def start_cpu(cmd_of_one_frame) -> float:
    return statistics.median(run_child(cmd_of_one_frame())["child_cpu_s"] for _ in range(3))


def peer_copy(clip: Path, tmp: Path, passes: int, frag: bool, paced_s: float = 0.0) -> dict:
    out = tmp / "peer.mp4"
    start = start_cpu(lambda: ffmpeg_copy_cmd(clip, out, 1, frag, frames=1))
    cmd = ffmpeg_copy_cmd(clip, out, passes, frag, paced_s)
    r = run_child(cmd, timeout=600)
    video_s = paced_s or passes * CLIP_S
    size = out.stat().st_size
    whole = None
    if not paced_s:  # the clip once, start-up included (how a one-file remux is usually timed)
        whole = statistics.median(run_child(ffmpeg_copy_cmd(clip, out, 1, frag))["child_cpu_s"]
                                  for _ in range(3)) / CLIP_S
    out.unlink(missing_ok=True)
    name = "ffmpeg -c copy" + (" fragmented" if frag else " plain mp4") + (" paced (-re)" if paced_s else "")
    return {"with_start_per_stream_s": whole, "kind": "peer", "what": "remux", "name": name,
            "cpu_s": r["child_cpu_s"] - start, "start_cpu_s": start,
            "stream_s": video_s, "cpu_per_stream_s": (r["child_cpu_s"] - start) / video_s, "wall_s": r["wall_s"],
            "bytes": size, "other_load_pct": r["other_load_pct"], "cmd": " ".join(cmd)}


COPY_CHILD = r'''
import json, os, resource, sys
src, dst, chunk, passes, fsync = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
buf = bytearray(chunk)
c0 = cpu()
total = 0
out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for _ in range(passes):
    with open(src, "rb", buffering=0) as f:
        while (n := f.readinto(buf)):
            os.write(out, memoryview(buf)[:n])
            total += n
            if fsync:
                os.fsync(out)
os.close(out)
print(json.dumps({"cpu_s": cpu() - c0, "bytes": total}))
'''


def peer_limit(clip: Path, tmp: Path, passes: int, fsync: bool) -> dict:
    """Read the clip and write its bytes, one fragment's worth at a time (+ fsync): the floor."""
    chunk = max(4096, int(clip.stat().st_size / CLIP_S * FRAGMENT_S))
    out = tmp / "limit.bin"
    r = run_child([sys.executable, "-c", COPY_CHILD, str(clip), str(out), str(chunk), str(passes),
                   "1" if fsync else "0"], timeout=600)
    out.unlink(missing_ok=True)
    got = json.loads(r["stdout"])
    video_s = passes * CLIP_S
    return {"kind": "limit", "what": "remux", "name": "read + write the bytes" + (" + fsync" if fsync else ""),
            "cpu_s": got["cpu_s"], "stream_s": video_s, "cpu_per_stream_s": got["cpu_s"] / video_s,
            "wall_s": r["wall_s"], "bytes": got["bytes"], "chunk": chunk, "other_load_pct": r["other_load_pct"]}


def encode_cmd(out: Path, frames: int | None = None) -> list[str]:
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{WIDTH}x{HEIGHT}", "-r", str(FPS), "-i", "-"]
    if frames is not None:
        cmd += ["-frames:v", str(frames)]
    return cmd + ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-bf", "0", "-g", str(GOP),
                  "-pix_fmt", "yuv420p", "-movflags", MOVFLAGS, "-frag_duration", str(int(FRAGMENT_S * 1e6)),
                  "-f", "mp4", str(out)]


def _encode_run(cmd: list[str], frames: int) -> tuple[float, float, float]:
    """Feed `frames` synthetic pictures to an ffmpeg through its stdin: (its CPU, wall, other load %)."""
    from services.capture.sources.synthetic import Pattern

    pattern = Pattern(WIDTH, HEIGHT)
    pic = bytearray(WIDTH * HEIGHT * 3)
    import numpy as np
    arr = np.frombuffer(pic, np.uint8).reshape(HEIGHT, WIDTH, 3)
    busy0, _ = machine_busy_s()
    own0 = self_cpu_s()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for n in range(frames):
            pattern.draw(arr, n, flash=n % FPS == 0)
            proc.stdin.write(pic)
        proc.stdin.close()
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"ffmpeg encode exited {status}: {proc.stderr.read().decode(errors='replace')[-500:]}")
    cpu = ru.ru_utime + ru.ru_stime
    other = max(0.0, (machine_busy_s()[0] - busy0) - cpu - (self_cpu_s() - own0))
    return cpu, wall, 100 * other / wall


def peer_encode(tmp: Path, seconds: float) -> dict:
    out = tmp / "enc.mp4"
    start = statistics.median(_encode_run(encode_cmd(out, 1), 1)[0] for _ in range(3))
    frames = int(seconds * FPS)
    cmd = encode_cmd(out)
    cpu, wall, other = _encode_run(cmd, frames)
    out.unlink(missing_ok=True)
    return {"kind": "peer", "what": "encode", "name": "ffmpeg libx264 veryfast crf 23", "cpu_s": cpu - start,
            "start_cpu_s": start, "stream_s": frames / FPS, "cpu_per_stream_s": (cpu - start) / (frames / FPS),
            "wall_s": wall, "other_load_pct": other, "cmd": " ".join(cmd)}


# --------------------------------------------------------------------------------------
# edgeroom


def scrape(url: str) -> dict:
    """{(sample name, target, label extra): value} of the box's edgeroom_recorder_ samples."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("edgeroom_recorder_"):
            continue
        for s in fam.samples:
            lab = dict(s.labels)
            out[(s.name, lab.pop("target", ""), tuple(sorted((k, v) for k, v in lab.items() if k != "service")))] = \
                s.value
    return out


def msum(m: dict, name: str, target: str | None = None) -> float:
    return sum(v for (n, t, _), v in m.items() if n == name and (target is None or t == target))


class Box(BenchBox):
    """One `edgeroom run` with N sources and the recorder, in a private runtime dir and bus prefix."""

    def __init__(self, tag: str, n: int, mode: str, clip: Path | None, fsync: bool) -> None:
        super().__init__(f"rec{os.getpid()}{tag}", "erec", [f"s{i + 1}" for i in range(n)], client_timeout=3.0)
        self.rec_dir = self.dir / "rec"
        q = json.dumps
        lines = ["[services.vision]\nenabled = false", "[services.recorder]\nenabled = true",
                 f"[recorder]\ndir = {q(str(self.rec_dir))}\nrecord = \"\"\nfsync = {str(fsync).lower()}\n"
                 f"encoder = \"libx264\"\nsegment_seconds = 3600\nfragment_seconds = {FRAGMENT_S}\n"
                 "max_disk_share = 0.0"]
        for s in self.streams:
            if mode == "remux":
                lines.append(f'[sources.{s}]\nkind = "file"\npath = {q(str(clip))}\nloop = true\ndecode = false\n'
                             'room = "bench"')
            else:
                lines.append(f'[sources.{s}]\nkind = "synthetic"\nwidth = {WIDTH}\nheight = {HEIGHT}\nfps = {FPS}\n'
                             'encode = "raw"\nroom = "bench"')
        self.write_config(lines)

    def warnings(self) -> list[str]:
        return self.warning_lines()

    def wait_ready(self, timeout: float) -> dict:
        def off_bus(rows: dict) -> list[str]:
            on_bus = {i.stream for i in framebus.list_streams(self.prefix) if i.items > 0}
            return [f"{s} on the bus" for s in self.streams if s not in on_bus]
        return super().wait_ready(timeout, ["recorder"] + [f"capture@{s}" for s in self.streams], off_bus)

    def items(self) -> dict[str, int]:
        return {i.stream: i.items for i in framebus.list_streams(self.prefix)}

    def pids(self) -> dict[str, int]:
        return {r["service"]: r["pid"] for r in self.client.call("status")["services"] if r.get("pid")}


def run_box(mode: str, n: int, fsync: bool, plan: Plan, tag: str, clip: Path | None,
            src_md5: list[str] | None) -> dict:
    """One box: idle CPU, record.start, warm up, one window; then the files checked. The row."""
    rec: dict = {"kind": "edgeroom", "what": mode, "streams": n, "fsync": fsync,
                 "name": f"recorder {mode}" + (f" fsync {'on' if fsync else 'off'}" if mode == "remux" else "")}
    box = Box(tag, n, mode, clip, fsync)
    rec["prefix"] = box.prefix
    try:
        t0 = time.monotonic()
        box.start()
        st = box.wait_ready(timeout=40 + 5 * n)
        rec["startup_s"] = round(time.monotonic() - t0, 1)
        pids = box.pids()
        rpid = pids["recorder"]
        others = [p for s, p in pids.items() if s != "recorder"] + [box.proc.pid]
        # idle: the recorder with every stream flowing and nothing recorded
        c0, w0 = proc_cpu_s(rpid), time.monotonic()
        time.sleep(IDLE_S)
        rec["idle_cpu_per_s"] = (proc_cpu_s(rpid) - c0) / (time.monotonic() - w0)
        for s in box.streams:
            box.client.call("record.start", {"target": s})
        time.sleep(plan.warmup_s)
        url = st["metrics_url"]
        m0 = scrape(url)
        items0 = box.items()
        busy0, steal0 = machine_busy_s()
        own0 = self_cpu_s()
        ours0 = [proc_cpu_s(p) or 0.0 for p in others]
        c0, w0 = proc_cpu_s(rpid), time.monotonic()
        time.sleep(plan.seconds)
        c1, w1 = proc_cpu_s(rpid), time.monotonic()
        ours1 = [proc_cpu_s(p) or 0.0 for p in others]
        busy1, steal1 = machine_busy_s()
        own1 = self_cpu_s()
        items1 = box.items()
        wall = w1 - w0
        if c0 is None or c1 is None:
            raise RuntimeError(f"the recorder (pid {rpid}) went away during the window: {box.log_tail()}")
        cpu = c1 - c0
        box_cpu = sum(b - a for a, b in zip(ours0, ours1))
        rec.update(window_s=round(wall, 2), cpu_s=cpu, cpu_per_stream_s=cpu / (n * wall),
                   net_cpu_per_stream_s=(cpu - rec["idle_cpu_per_s"] * wall) / (n * wall),
                   recorder_cores=cpu / wall, box_other_cpu_pct=100 * box_cpu / wall,
                   other_load_pct=100 * max(0.0, (busy1 - busy0) - cpu - box_cpu - (own1 - own0)) / wall,
                   steal_pct=100 * (steal1 - steal0) / wall,
                   fps_in=sum(items1.get(s, 0) - items0.get(s, 0) for s in box.streams) / (n * wall))
        time.sleep(1.3)  # one heartbeat: the recorder's counters reach the hub's scrape
        m1 = scrape(url)
        rec["dropped"] = int(msum(m1, "edgeroom_recorder_dropped_total") - msum(m0, "edgeroom_recorder_dropped_total"))
        fl_n = msum(m1, "edgeroom_recorder_fragment_flush_seconds_count") - \
            msum(m0, "edgeroom_recorder_fragment_flush_seconds_count")
        fl_s = msum(m1, "edgeroom_recorder_fragment_flush_seconds_sum") - \
            msum(m0, "edgeroom_recorder_fragment_flush_seconds_sum")
        rec["fragments_per_s"] = fl_n / (n * wall)
        rec["flush_ms_mean"] = 1000 * fl_s / fl_n if fl_n else None
        enc: dict[str, list[str]] = {}
        for (name, target, labels), v in m1.items():
            if name == "edgeroom_recorder_encoder" and v == 1:
                enc.setdefault(target, []).append(dict(labels)["name"])
        rec["encoders"] = {s: sorted(enc.get(s, [])) for s in box.streams}
        stopped = {}
        for s in box.streams:
            stopped[s] = box.client.call("record.stop", {"target": s})
        rec["warnings"] = box.warnings()[:6]
        # the files: zero re-encodes, proven by the pictures
        if mode == "remux":
            checks = {}
            for s in box.streams:
                files = sorted((box.rec_dir / s).glob("*.mp4"))
                md5 = sum((framemd5(f) for f in files), [])
                ok, k = same_pictures(md5, src_md5 or [])
                checks[s] = {"files": len(files), "frames": len(md5), "identical": ok, "from_frame": k}
            rec["pictures"] = checks
            rec["reencodes"] = sum(1 for s in box.streams if rec["encoders"][s] != ["copy"])
            rec["bit_identical"] = all(c["identical"] for c in checks.values())
        else:
            rec["frames_recorded"] = {s: stopped[s].get("frames") for s in box.streams}
        return rec
    except (RuntimeError, ControlError, OSError, KeyError) as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
        log(f"   FAILED: {rec['failure']}")
        return rec
    finally:
        box.close()


# --------------------------------------------------------------------------------------
# the run and the report


def run(plan: Plan) -> tuple[list[dict], dict]:
    clip = make_clip()
    src_md5 = framemd5(clip)
    info = {"path": str(clip), "frames": len(src_md5), "bytes": clip.stat().st_size,
            "kbps": round(clip.stat().st_size * 8 / CLIP_S / 1000)}
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="erecpeer", dir="/tmp"))
    try:
        log("-- peers: ffmpeg -c copy (plain, fragmented, paced), the byte-copy floor")
        rows.append(peer_copy(clip, tmp, plan.copy_passes, frag=False))
        rows.append(peer_copy(clip, tmp, plan.copy_passes, frag=True))
        rows.append(peer_copy(clip, tmp, 1, frag=True, paced_s=plan.seconds))
        rows.append(peer_limit(clip, tmp, plan.copy_passes, fsync=False))
        rows.append(peer_limit(clip, tmp, plan.copy_passes, fsync=True))
        log("-- peer: ffmpeg libx264 on the synthetic pictures")
        rows.append(peer_encode(tmp, plan.seconds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tag = 0
    for n in plan.streams:
        for fsync in (True, False):
            tag += 1
            log(f"-- box: remux N={n} fsync={'on' if fsync else 'off'}")
            rows.append(run_box("remux", n, fsync, plan, f"b{tag}", clip, src_md5))
    for n in plan.encode_streams:
        tag += 1
        log(f"-- box: encode N={n}")
        rows.append(run_box("encode", n, True, plan, f"b{tag}", None, None))
    return rows, info


def _peer(rows, name):
    return next((r for r in rows if r.get("name") == name and r["kind"] != "edgeroom"), None)


FRAG_PEER = "ffmpeg -c copy fragmented"
ENC_PEER = "ffmpeg libx264 veryfast crf 23"


def annotate(rows: list[dict]) -> None:
    frag, enc = _peer(rows, FRAG_PEER), _peer(rows, ENC_PEER)
    paced = _peer(rows, FRAG_PEER + " paced (-re)")
    for r in rows:
        if r.get("cpu_per_stream_s") is None:
            continue
        ref = enc if r["what"] == "encode" else frag
        if ref and ref["cpu_per_stream_s"] > 0:
            r["vs_ffmpeg"] = r["cpu_per_stream_s"] / ref["cpu_per_stream_s"]
            if r.get("net_cpu_per_stream_s") is not None:
                r["net_vs_ffmpeg"] = r["net_cpu_per_stream_s"] / ref["cpu_per_stream_s"]
        if r["kind"] == "edgeroom" and r["what"] == "remux":
            if frag and frag.get("with_start_per_stream_s"):
                r["vs_ffmpeg_with_start"] = r["cpu_per_stream_s"] / frag["with_start_per_stream_s"]
            if paced and paced["cpu_per_stream_s"] > 0:
                r["vs_ffmpeg_paced"] = r["cpu_per_stream_s"] / paced["cpu_per_stream_s"]


def _ms(v) -> str:
    return "-" if v is None else f"{1000 * v:.2f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(rows: list[dict]) -> str:
    head = ("| what | row | N | ms CPU per stream-s | net of idle | x ffmpeg frag | other load % | notes |\n"
            "|---|---|---:|---:|---:|---:|---:|---|")
    out = [head]
    for r in rows:
        if r.get("failure"):
            out.append(f"| {r['what']} | {r['name']} | {r.get('streams', '')} | FAILED | | | | {r['failure'][:120]} |")
            continue
        if r["kind"] == "edgeroom":
            note = (f"idle {1000 * r['idle_cpu_per_s']:.1f} ms/s; {r['fps_in']:.1f} fps in, dropped {r['dropped']}")
            if r.get("flush_ms_mean") is not None:
                note += f"; flush {r['flush_ms_mean']:.2f} ms x {r['fragments_per_s']:.1f}/s"
            if r["what"] == "remux":
                note += f"; encoders {sorted({e for v in r['encoders'].values() for e in v})}, bit-identical " \
                        f"{r['bit_identical']}"
            out.append(f"| {r['what']} | {r['name']} | {r['streams']} | {_ms(r['cpu_per_stream_s'])} | "
                       f"{_ms(r['net_cpu_per_stream_s'])} | {_x(r.get('vs_ffmpeg'))} | {r['other_load_pct']:.0f} | "
                       f"{note} |")
        else:
            note = f"{r['stream_s']:g} s of video"
            if r.get("start_cpu_s") is not None:
                note += f", start-up {1000 * r['start_cpu_s']:.0f} ms subtracted"
            if r.get("with_start_per_stream_s") is not None:
                note += f"; the 20 s clip once, start-up included: {_ms(r['with_start_per_stream_s'])} ms/s"
            if r.get("chunk"):
                note += f", chunks of {r['chunk']} B"
            out.append(f"| {r['what']} | {r['name']} | 1 | {_ms(r['cpu_per_stream_s'])} | | "
                       f"{_x(r.get('vs_ffmpeg'))} | {r['other_load_pct']:.0f} | {note} |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    out = []
    for r in rows:
        if r["kind"] != "edgeroom" or r.get("failure") or r["what"] != "remux":
            continue
        v = r.get("vs_ffmpeg")
        if r["fsync"] and v is not None:
            out.append(("PASS" if v <= TARGET_RATIO else "FAIL", f"remux N={r['streams']} fsync on within "
                        f"{TARGET_RATIO}x ffmpeg -c copy (fragmented, flat out, start-up subtracted)",
                        f"{v:.2f}x ({_x(r.get('net_vs_ffmpeg'))} net of the recorder's idle); against the same "
                        f"ffmpeg timed on the 20 s clip with its start-up {_x(r.get('vs_ffmpeg_with_start'))}, "
                        f"against it paced in real time (-re) {_x(r.get('vs_ffmpeg_paced'))}"))
        out.append(("PASS" if r["reencodes"] == 0 and r["bit_identical"] else "FAIL",
                    f"zero re-encodes, N={r['streams']} fsync {'on' if r['fsync'] else 'off'}",
                    f"encoders {r['encoders']}; pictures {r['pictures']}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1 only, S = 6 (ends within ~90 s)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--seconds", type=float, help="the measured window per box (default 15, --quick 6)")
    ap.add_argument("--streams", help="comma-separated remux stream counts (default 1,4; --quick 1)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        if args.seconds < 2:
            ap.error("--seconds: at least 2")
        plan.seconds = args.seconds
    if args.streams:
        try:
            plan.streams = tuple(int(x) for x in args.streams.split(",") if x.strip())
        except ValueError:
            ap.error("--streams: comma-separated integers")
        if not plan.streams or min(plan.streams) < 1:
            ap.error("--streams: at least 1")
    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    load = os.getloadavg()
    try:
        rows, clip = run(plan)
    except KeyboardInterrupt:
        log("interrupted: every child stopped, temp dirs and bus objects removed")
        return 130
    annotate(rows)
    name = "quick" if args.quick else "full"
    tg = targets(rows)
    text = [f"## recorder benchmark ({name}, {time.monotonic() - t0:.0f} s, code {code_version()}, {os.cpu_count()} "
            f"CPUs, load average {' '.join(f'{x:.2f}' for x in load)} at start, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end, {tool_version(['ffmpeg', '-version'])})",
            "", table(rows), "", "## targets", ""]
    text += [f"- {v}  {t}: {d}" for v, t, d in tg]
    text += ["", "## notes", "",
             f"- clip: {WIDTH}x{HEIGHT} {FPS} fps H.264 High, {clip['kbps']} kbit/s, {clip['frames']} frames, "
             f"keyframe every {GOP} frames, no B-frames ({clip['path']})",
             "- recorder rows: the recorder process only (capture@ not counted), over the window, per stream-second; "
             "net of idle subtracts its CPU with the streams flowing and nothing recorded (heartbeats, loop). "
             "CPU from /proc ticks (10 ms): +-10 ms over the window.",
             "- peers: flat out unless paced; start-up (the same command stopped after one frame, median of 3) "
             "subtracted. x ffmpeg frag: against ffmpeg -c copy with the recorder's movflags (remux) or ffmpeg "
             "libx264 (encode).",
             "- other load: CPU the machine spent outside this benchmark's processes, % of one core."]
    for r in rows:
        if r.get("warnings"):
            text.append(f"- {r['name']} N={r['streams']}: the box logged: " + " | ".join(r["warnings"]))
    print("\n".join(text), flush=True)
    if args.json:
        out = {"plan": name, "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load],
               "loadavg_end": [round(x, 2) for x in os.getloadavg()], "code": code_version(), "clip": clip,
               "targets": [{"verdict": v, "target": t, "detail": d} for v, t, d in tg],
               "rows": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failure") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
