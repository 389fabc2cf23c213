"""Ingest benchmark: file sources through capture@ and decode@ against bare decoding.

Run from the repository root:

    .venv/bin/python benchmarks/ingest.py [--quick] [--json PATH] [--seconds S]
                                          [--max-streams N] [--sizes 1080p,720p] [--linear]

What it answers, on this machine: what one H.264 stream costs to bring onto the bus and
decode there (capture@NAME + decode@NAME, CPU seconds per second of video) against
decoding the same file with nothing around it; how many 30 fps streams the box sustains
with no frame lost; and how late a decoded picture reaches a consumer of NAME-raw.

Method
------
* Clips: made once with the system's ffmpeg and cached under $XDG_CACHE_HOME (or
  ~/.cache)/edgeroom-bench: lavfi `testsrc2` (moving, a running clock, gradients), libx264
  preset fast, High profile, 30 fps, a keyframe every 2 s (60 frames, no scene cuts), no
  B-frames (an IP camera's stream; B-frames would add their reorder delay to every
  latency below), constant bit rate (VBV): 1080p at 5 Mbit/s, 720p at 2.5 Mbit/s, 15 s.
* Bare decoding, in the same run, on the same files, nothing else of ours running, right
  before that size's boxes (so both see the same machine), each with one decoder thread
  and with FFmpeg's automatic frame threads (one per core plus one, up to 16), and with
  decode@'s default decode_threads if that is neither:
  - `ffmpeg -threads 1 -i FILE -f null -` and `ffmpeg -i FILE -f null -` (ffmpeg's own
    default: auto). CPU = user + sys of that child (os.wait4's rusage) less the CPU of an
    ffmpeg that starts, opens the file and decodes one frame (`-frames:v 1`, median of 3):
    the fixed start-up, ~60 ms here.
  - PyAV in a subprocess (`av.open`, demux, decode every frame, no bus, no copy out), its
    codec set up as services/decode/decoder.py sets it (thread_type FRAME, thread_count =
    decode_threads). CPU = getrusage(RUSAGE_SELF) around the decode loop only (no
    interpreter start, no import). The one-thread run also gives the decode time per frame
    (wall time between frames out of the decode loop, demux included; mean and p99) used by
    the latency target. ffmpeg and PyAV are different FFmpeg builds (the system's and PyAV's
    wheel); decode@ uses PyAV's, so the PyAV rows are the like-for-like reference.
  - PyAV paced: one process reads the file and sleeps until each packet is due, as
    capture does, then decodes it (no bus): the CPU of decoding in real time rather than
    flat out, and the latency floor of the decoder itself (picture out - packet due).
  Each flat-out measurement is repeated (3 times, --quick once) and the median taken.
* edgeroom: for N streams, a private box (its own runtime dir under /tmp, bus prefix,
  metrics on 127.0.0.1:0) with N file sources s1..sN (the same file, loop = true,
  decode = true, decode@'s defaults: hw_decode auto, decode_threads as a file source has
  it) run by `python -m services.cli run`: the hub, capture@sI and decode@sI. When every
  service is ready and every sI-raw delivers, it warms up (3 s; --quick 2 s; then up to
  10 s (3 s) more until every decode@ is at most 2 items behind what its threads hold: a
  crowded start leaves a backlog), then measures over S seconds (10; --quick 5; --seconds):
  - CPU: user + sys from /proc/PID/stat (utime + stime, every thread, 10 ms ticks) of every
    capture@ and decode@ process (pids from the hub's `status`), deltas over the window,
    per stream-second (N x window). The hub's and `edgeroom run`'s own CPU are reported
    apart (box overhead, not per stream).
  - frames: items sent on sI (capture@'s access units) and sI-raw (decode@'s pictures),
    read off the rings (framebus.list_streams: exact, at the window's edges), and what the
    consumer received. Metrics reach the hub with each service's heartbeat (every
    hub.heartbeat_interval, 1 s), so the drop counters are read once more a heartbeat after
    the window (a drop in the window's last second is counted; one in that extra second
    too: conservative).
  - drops: edgeroom_capture_dropped_frames_total{reason} + edgeroom_decode_dropped_frames
    _total{reason} + the consumer's own `missed`, deltas; decode errors apart.
  - latency: one consumer process attached (not reliable: it never holds decode back) to
    every sI-raw, waiting on their fds with selectors, takes every item and records
    clock_gettime_ns(CLOCK_MONOTONIC) - item.capture_ns (capture_ns: the instant the packet
    was due in capture's real-time pacing), split into decode's part (item.publish_ns -
    capture_ns) and the bus's (receive - publish_ns). It reads no pixels. p50/p99 pool all
    streams. Its CPU is in the JSON.
  - decode's backlog: every second, decode's consumer lag on sI (framebus.list_streams).
  - sustained = zero drops, every stream received >= 98 % of 30 fps, its latency did not
    grow over the window (median of the last fifth - median of the first fifth < one
    frame interval: decode keeping pace) and ended low (median of the last fifth <= the
    frames decode holds by design (decode_threads - 1) + 3 frame intervals: no backlog
    carried), no restart.
  N starts at 1; after a sustained N it goes to 1.1 x the N that this box's CPU use says
  the cores hold (N x (0.95 x cores - other load) / cores busy; at most 4 x N; N + N/2
  when that is not above N) until the first N that is not sustained, then halves the gap
  to the highest sustained N until the two are adjacent or within 10 % (--linear: 1, 2,
  3, ... and stop at the first failure; --max-streams caps it). A window is cut short
  (and the N not sustained) when a decode@ falls 56 of its ring's 64 items behind. The
  result is the highest N sustained. Then one more box with N=1 and the other
  decode_threads (0, FFmpeg's auto frame threads, when the default is 1; else 1): what
  the choice costs in CPU and latency.
* Targets: CPU per stream-second of capture@ + decode@ at N=1 (decode@'s defaults) within
  1.25x of bare PyAV decoding flat out with the same threads; latency p99 at N=1 under one
  frame interval (33.3 ms) plus the decode time per frame (PyAV, one thread, mean).
* Machine: everything shares its cores. The CPU the machine spent outside this
  benchmark's processes during each window and each bare run (/proc/stat busy - ours) is
  reported as "other load", in % of one core, and named beside a failure when it is 50 % or
  more; the load average is printed. Every child is stopped and every temp dir and
  bus object removed on exit, Ctrl-C and SIGTERM included.
* Time: --quick ~50 s; a full run 6-8 minutes on the 2-core build machine (more streams
  sustained, longer sweep); the first run also encodes the clips (~30 s).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Run as a script, this file's directory is sys.path[0]; the repository root is what we need.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_ROOT)

import framebus  # noqa: E402
from benchmarks.benchbox import BenchBox, encode_testsrc  # noqa: E402
from services.capture.sink import ENCODED_SLOTS  # noqa: E402
from services.capture.sources.media import FileConfig  # noqa: E402
from services.runtime.streams import raw_stream  # noqa: E402

FPS = 30
FRAME_MS = 1000.0 / FPS
CLIP_S = 15
GOP = 2 * FPS
CLK_TCK = os.sysconf("SC_CLK_TCK")
OVERSHOOT = 1.1  # the sweep's next N: this much above what the last sustained N's CPU suggests
USABLE_SHARE = 0.95  # of the machine's cores, what streams can have (the rest: the OS, this benchmark)
RATE_OK = 0.98  # a stream must deliver at least this share of FPS
BUSY_NEIGHBOUR_PCT = 50.0  # other work on the machine above this (% of a core) is called out
LATE_FRAMES = 3  # a backlog beyond the frames decode holds by design, in frames, that counts as behind
ABORT_LAG = ENCODED_SLOTS - 8  # decode this far behind on its input ring: losses imminent, cut the window
RESOLUTION = 10  # the sweep stops when the first failing N is within 1/RESOLUTION of the highest sustained
TARGET_CPU_RATIO = 1.25
CLIP_VERSION = 1  # bump when the encoding below changes (the cache key)


@dataclass(frozen=True)
class Clip:
    name: str
    width: int
    height: int
    kbps: int

    @property
    def file_name(self) -> str:
        return (f"ingest-v{CLIP_VERSION}-testsrc2-{self.width}x{self.height}-{FPS}fps-{CLIP_S}s-"
                f"{self.kbps}k-gop{GOP}-bf0.mp4")


CLIPS = {"1080p": Clip("1080p", 1920, 1080, 5000), "720p": Clip("720p", 1280, 720, 2500)}


@dataclass
class Plan:
    reps: int  # flat-out baseline repetitions (median taken)
    paced_s: float  # the paced PyAV baseline
    warmup_s: float
    settle_s: float  # at most this much longer while a decode@ works off a backlog
    seconds: float  # S, the measured window
    max_streams: int
    sizes: tuple


FULL = Plan(reps=3, paced_s=6.0, warmup_s=3.0, settle_s=10.0, seconds=10.0, max_streams=64,
            sizes=("1080p", "720p"))
QUICK = Plan(reps=1, paced_s=4.0, warmup_s=2.0, settle_s=3.0, seconds=5.0, max_streams=2, sizes=("720p",))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


# --------------------------------------------------------------------------------------
# small helpers


def pct(sorted_vals: list, q: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def proc_cpu_s(pid: int) -> float | None:
    """user + sys seconds of a process, every thread (those that ended too): /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeroom-bench"


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.splitlines()[0].split(" Copyright")[0] if out else "?"


def code_version() -> str:
    """The commit and whether services/ differs from it (read-only git; no index refresh)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--", "services"],
                               cwd=_ROOT, capture_output=True, text=True, timeout=5).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or '?'}" + (f" + uncommitted changes in {len(dirty)} file(s) under services/" if dirty else "")


# --------------------------------------------------------------------------------------
# Clips


def make_clip(clip: Clip) -> Path:
    """The clip's file, encoded once (atomically: a half-written file is never cached)."""
    return encode_testsrc(cache_dir() / clip.file_name, clip.width, clip.height, FPS, CLIP_S, clip.kbps, GOP,
                          log=log)


def clip_info(path: Path) -> dict:
    """Frames, duration, bit rate and keyframes of the clip's video stream (demux only)."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = keys = nbytes = 0
        for p in c.demux(v):
            if p.size:
                frames += 1
                nbytes += p.size
                keys += bool(p.is_keyframe)
        cc = v.codec_context
        return {"frames": frames, "seconds": frames / FPS, "kbps": round(nbytes * 8 / (frames / FPS) / 1000),
                "keyframes": keys, "profile": cc.profile, "width": cc.width, "height": cc.height}


# --------------------------------------------------------------------------------------
# Bare decoding


def run_child(cmd: list[str], timeout: float = 300) -> dict:
    """Run one child to its end: its stdout, its CPU (user + sys, os.wait4), wall time, and the CPU the
    machine spent on anything else meanwhile (in % of one core)."""
    busy0, _ = machine_busy_s()
    own0 = self_cpu_s()
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        busy1, _ = machine_busy_s()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited {proc.returncode}: {stderr.strip()[-800:]}")
    cpu = ru.ru_utime + ru.ru_stime
    other = max(0.0, (busy1 - busy0) - cpu - (self_cpu_s() - own0))
    return {"stdout": stdout, "child_cpu_s": cpu, "wall_s": wall, "other_load_pct": 100 * other / wall}


def ffmpeg_cmd(path: Path, threads: int, frames: int | None = None) -> list[str]:
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error"]
    if threads:  # 0: ffmpeg's default, auto
        cmd += ["-threads", str(threads)]  # before -i: the decoder's threads
    cmd += ["-i", str(path), "-map", "0:v:0"]
    if frames is not None:
        cmd += ["-frames:v", str(frames)]
    return cmd + ["-f", "null", "-"]


def ffmpeg_start_cpu(path: Path, threads: int, reps: int) -> float:
    """CPU of an ffmpeg that starts, opens the clip and decodes one frame: its fixed cost."""
    return statistics.median(run_child(ffmpeg_cmd(path, threads, 1))["child_cpu_s"] for _ in range(max(3, reps)))


def bare_ffmpeg(path: Path, threads: int, frames: int, start_cpu: float) -> dict:
    """ffmpeg decoding the clip into the null muxer; CPU of that child less its start."""
    cmd = ffmpeg_cmd(path, threads)
    r = run_child(cmd)
    cpu = r["child_cpu_s"] - start_cpu
    n = frames - 1
    return {"cpu_s": cpu, "wall_s": r["wall_s"], "frames": frames, "stream_s": n / FPS,
            "cpu_per_stream_s": cpu / (n / FPS), "fps": frames / r["wall_s"], "start_cpu_s": start_cpu,
            "other_load_pct": r["other_load_pct"], "cmd": " ".join(cmd)}


PYAV_CHILD = r'''
import json, resource, sys, time
import av
path, threads, paced_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
container = av.open(path)
video = container.streams.video[0]
cc = video.codec_context
cc.thread_type = "FRAME"  # what services/decode/decoder.py does: frame threads, decode_threads of them
cc.thread_count = threads  # (0: FFmpeg picks, one per core plus one)
out = {}
if paced_s <= 0:  # flat out
    times = []
    c0, t0 = cpu(), time.perf_counter()
    last = t0
    for frame in container.decode(video):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    out.update(cpu_s=cpu() - c0, wall_s=time.perf_counter() - t0, frames=len(times), frame_s=times)
else:  # paced like capture: sleep until each packet is due, then decode it
    tb = video.time_base
    lat, due_by_pts = [], {}
    first = None
    c0, t0 = cpu(), time.perf_counter()
    origin = time.monotonic_ns() + 50_000_000
    frames = 0
    for packet in container.demux(video):
        if not packet.size:
            continue
        ts = packet.dts if packet.dts is not None else packet.pts
        first = ts if first is None else first
        due = origin + int((ts - first) * tb * 1_000_000_000)
        if due - origin > paced_s * 1e9:
            break
        wait = due - time.monotonic_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        due_by_pts[packet.pts] = due
        for frame in cc.decode(packet):
            now = time.monotonic_ns()
            frames += 1
            d = due_by_pts.pop(frame.pts, None)
            if d is not None:
                lat.append(now - d)
    out.update(cpu_s=cpu() - c0, wall_s=time.perf_counter() - t0, frames=frames, lat_ns=lat,
               stream_s=(time.monotonic_ns() - origin) / 1e9)
out["threads_used"] = cc.thread_count
out["thread_type"] = str(cc.thread_type)
out["codec"] = cc.name
container.close()
print(json.dumps(out))
'''


def bare_pyav(path: Path, threads: int, paced_s: float = 0.0) -> dict:
    c = run_child([sys.executable, "-c", PYAV_CHILD, str(path), str(threads), str(paced_s)])
    r = json.loads(c["stdout"])
    stream_s = r.pop("stream_s", None) or r["frames"] / FPS
    out = {"cpu_s": r["cpu_s"], "wall_s": r["wall_s"], "frames": r["frames"], "stream_s": stream_s,
           "cpu_per_stream_s": r["cpu_s"] / stream_s, "threads_used": r["threads_used"],
           "thread_type": r["thread_type"], "other_load_pct": c["other_load_pct"]}
    if "frame_s" in r:
        ft = sorted(r["frame_s"])
        out["fps"] = r["frames"] / r["wall_s"]
        out["frame_ms_mean"] = 1000 * sum(ft) / len(ft)
        out["frame_ms_p50"] = 1000 * pct(ft, 50)
        out["frame_ms_p99"] = 1000 * pct(ft, 99)
    if "lat_ns" in r:
        lat = sorted(x / 1e6 for x in r["lat_ns"])
        out.update(lat_p50_ms=pct(lat, 50), lat_p99_ms=pct(lat, 99), lat_max_ms=lat[-1] if lat else None,
                   lat_samples=len(lat))
    return out


def median_of(fn, reps: int) -> dict:
    """Run fn() reps times; the run with the median CPU per stream-second (all runs' figures kept)."""
    runs = [fn() for _ in range(reps)]
    runs.sort(key=lambda r: r["cpu_per_stream_s"])
    best = dict(runs[len(runs) // 2])
    best["cpu_per_stream_s_runs"] = [round(r["cpu_per_stream_s"], 4) for r in runs]
    best["other_load_pct"] = max(r["other_load_pct"] for r in runs)  # the worst the neighbours did
    return best


def default_decode_threads() -> int:
    """decode_threads when a source does not set it: what decode@ runs with by default."""
    return FileConfig(path="x").decode_threads


def held_frames(threads: int) -> int:
    """Pictures FFmpeg's frame threads hold back: thread_count - 1 (0 = auto: one per core plus one, <= 16)."""
    if threads == 0:
        cores = os.cpu_count() or 1
        threads = min(cores + 1, 16) if cores > 1 else 1
    return threads - 1


def threads_label(threads: int) -> str:
    if threads == 1:
        return "1 thread"
    return "frame threads, auto" if threads == 0 else f"{threads} frame threads"


def baselines(clip: Clip, path: Path, info: dict, plan: Plan, settings: list[int]) -> list[dict]:
    """The bare rows of one clip, for each decoder threading in `settings` (0: auto)."""
    rows = []
    default = default_decode_threads()
    start = {th: ffmpeg_start_cpu(path, th, plan.reps) for th in settings}
    specs = []
    for th in settings:
        specs.append(("ffmpeg", th, "ffmpeg " + (f"-threads {th}" if th else "(default threads: auto)"),
                      lambda th=th: bare_ffmpeg(path, th, info["frames"], start[th])))
    for th in settings:
        specs.append(("pyav", th, f"PyAV, {threads_label(th)}" + (" (decode@'s default)" if th == default else ""),
                      lambda th=th: bare_pyav(path, th)))
    for tool, threads, label, fn in specs:
        rec = {"kind": "bare", "tool": tool, "threads": threads, "label": label, "size": clip.name}
        t = time.monotonic()
        try:
            rec.update(median_of(fn, plan.reps))
        except Exception as e:
            rec["failure"] = str(e).strip()
        rows.append(rec)
        log(f"   {label:44s} {clip.name:>5s}  cpu/stream-s={_fmt(rec.get('cpu_per_stream_s'), 3)}  "
            f"fps={_fmt(rec.get('fps'), 0)}  ({time.monotonic() - t:.1f} s)")
    for th in settings:
        label = f"PyAV paced, {threads_label(th)}"
        rec = {"kind": "bare", "tool": "pyav-paced", "threads": th, "label": label, "size": clip.name}
        t = time.monotonic()
        try:
            rec.update(bare_pyav(path, th, plan.paced_s))
        except Exception as e:
            rec["failure"] = str(e).strip()
        rows.append(rec)
        log(f"   {label:44s} {clip.name:>5s}  cpu/stream-s={_fmt(rec.get('cpu_per_stream_s'), 3)}  "
            f"latency p50/p99={_fmt(rec.get('lat_p50_ms'))}/{_fmt(rec.get('lat_p99_ms'))} ms  "
            f"({time.monotonic() - t:.1f} s)")
    return rows


# --------------------------------------------------------------------------------------
# The consumer of NAME-raw (a forked child)


def consumer_main(streams: list[str], prefix: str, conn) -> None:
    """Attach to every stream's NAME-raw, take every item, record its latency when asked.

    Commands on `conn`: "start" (reset and record), "stop" (send the window's results),
    "quit". Sends ("ready", None) once every stream has delivered an item.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    clock = time.clock_gettime_ns
    mono = time.CLOCK_MONOTONIC
    cons = {s: framebus.Consumer.attach(raw_stream(s), prefix=prefix, missing_ok=True) for s in streams}
    sel = selectors.DefaultSelector()
    for s, c in cons.items():
        sel.register(c.fileno(), selectors.EVENT_READ, s)
    sel.register(conn.fileno(), selectors.EVENT_READ, None)
    seen: set[str] = set()
    recording = False
    samples: dict[str, list] = {s: [] for s in streams}
    missed0: dict[str, int] = {}
    t0 = cpu0 = 0.0

    def drain(s: str) -> None:
        c = cons[s]
        while (item := c.poll()) is not None:
            now = clock(mono)
            if recording:
                samples[s].append((now, item.capture_ns, item.publish_ns))
            if s not in seen:
                seen.add(s)
                if len(seen) == len(streams):
                    conn.send(("ready", None))

    try:
        while True:
            for key, _ in sel.select(timeout=0.2):
                if key.data is not None:
                    drain(key.data)
                    continue
                cmd = conn.recv()
                if cmd == "start":
                    for s in streams:
                        drain(s)
                        samples[s] = []
                    missed0 = {s: c.missed for s, c in cons.items()}
                    t0, cpu0 = time.monotonic(), self_cpu_s()
                    recording = True
                elif cmd == "stop":
                    for s in streams:
                        drain(s)
                    recording = False
                    conn.send(("result", {
                        "window_s": time.monotonic() - t0, "cpu_s": self_cpu_s() - cpu0,
                        "samples": samples, "missed": {s: c.missed - missed0[s] for s, c in cons.items()},
                        "resyncs": {s: c.resyncs for s, c in cons.items()}}))
                elif cmd == "quit":
                    return
            for s, c in cons.items():
                if not c.attached:
                    drain(s)  # look for a stream that is not there yet
    finally:
        for c in cons.values():
            c.close()


# --------------------------------------------------------------------------------------
# A private box


def scrape(url: str) -> dict:
    """{(sample name, service, reason): value} of the edgeroom_capture_/decode_ samples."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(("edgeroom_capture_", "edgeroom_decode_")):
            continue
        for s in fam.samples:
            out[(s.name, s.labels.get("service", ""), s.labels.get("reason", ""))] = s.value
    return out


def metric_delta(a: dict, b: dict, name: str, by_reason: bool = False):
    """Sum over services of b - a for one sample name (a counter absent before counts from 0)."""
    tot, reasons = 0.0, {}
    for key, v in b.items():
        if key[0] != name:
            continue
        d = v - a.get(key, 0.0)
        tot += d
        if d:
            reasons[key[2]] = reasons.get(key[2], 0) + int(round(d))
    return (int(round(tot)), reasons) if by_reason else tot


class Box(BenchBox):
    """One `edgeroom run` with N file sources, in a private runtime dir and bus prefix."""

    def __init__(self, tag: str, clip_path: Path, n: int, decode_threads: int | None) -> None:
        super().__init__(f"ing{os.getpid()}{tag}", "ering", [f"s{i + 1}" for i in range(n)])
        self.n = n
        q = json.dumps
        self.write_config([f'[sources.{s}]\nkind = "file"\npath = {q(str(clip_path))}\nloop = true\nroom = "bench"'
                           + (f"\ndecode_threads = {decode_threads}" if decode_threads is not None else "")
                           for s in self.streams])

    def warnings(self, keep: int = 6) -> dict:
        """How many warning/error lines the box logged, and the first and last few of them."""
        bad = self.warning_lines()
        shown = bad if len(bad) <= keep else bad[:keep // 2] + ["..."] + bad[-(keep - keep // 2):]
        return {"count": len(bad), "lines": shown}

    def wait_ready(self, timeout: float) -> dict:
        """Every capture@ and decode@ ready and every decode@ publishing NAME-raw: the status."""
        want = [f"capture@{s}" for s in self.streams] + [f"decode@{s}" for s in self.streams]
        return super().wait_ready(timeout, want, lambda rows: [
            f"{raw_stream(s)} (from decode@{s})" for s in self.streams
            if raw_stream(s) not in rows.get(f"decode@{s}", {}).get("streams", [])])

    def bus(self) -> dict[str, tuple[int, int, int]]:
        """{stream: (generation, items sent, the largest live consumer lag)} of every ring of the box."""
        out = {}
        for info in framebus.list_streams(self.prefix):
            lags = [c.lag for c in info.consumers if c.alive]
            out[info.stream] = (info.generation, info.items, max(lags, default=0))
        return out


def run_box(clip: Clip, path: Path, n: int, plan: Plan, tag: str, decode_threads: int | None = None) -> dict:
    """Start a box with n streams, warm up, measure one window; the row.

    decode_threads: set in every source; None leaves decode@'s default."""
    rec: dict = {"kind": "edgeroom", "size": clip.name, "streams": n, "sweep": False,
                 "default_threads": decode_threads is None,
                 "decode_threads": default_decode_threads() if decode_threads is None else decode_threads}
    box = Box(tag, path, n, decode_threads)
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    consumer = None
    try:
        t_start = time.monotonic()
        box.start()
        st = box.wait_ready(timeout=40 + 3 * n)
        consumer = ctx.Process(target=consumer_main, args=(box.streams, box.prefix, child_end),
                               name="ingest-consumer", daemon=True)
        consumer.start()
        if not parent_end.poll(20):
            raise RuntimeError(f"the consumer got no picture on every NAME-raw within 20 s: {box.log_tail()}")
        parent_end.recv()
        rec["startup_s"] = round(time.monotonic() - t_start, 1)
        # warm up; then, while a decode@ still works off the backlog of a crowded start, a little longer
        time.sleep(plan.warmup_s)
        hold = held_frames(rec["decode_threads"])
        t_settle = time.monotonic()
        while time.monotonic() - t_settle < plan.settle_s:
            lags = [lag for s, (_, _, lag) in box.bus().items() if s in box.streams]
            if lags and max(lags) <= hold + 2:
                break
            time.sleep(0.5)
        rec["warmup_s"] = round(plan.warmup_s + time.monotonic() - t_settle, 1)

        st = box.status()
        rows = {r["service"]: r for r in st["services"]}
        url = st["metrics_url"]
        pids = {sid: r["pid"] for sid, r in rows.items() if sid.startswith(("capture@", "decode@", "hub"))}
        pids["run"] = box.proc.pid
        restarts0 = {sid: r.get("restarts", 0) for sid, r in rows.items()}
        # --- the window
        m0 = scrape(url)
        parent_end.send("start")
        cpu0 = {sid: proc_cpu_s(pid) for sid, pid in pids.items()}
        busy0, steal0 = machine_busy_s()
        own0 = self_cpu_s()
        t0 = time.monotonic()
        bus0 = box.bus()
        lag_max: dict[str, int] = {}
        while (left := plan.seconds - (time.monotonic() - t0)) > 0:
            time.sleep(min(1.0, left))
            for s, (_, _, lag) in box.bus().items():
                if s in box.streams:
                    lag_max[s] = max(lag_max.get(s, 0), lag)
            if time.monotonic() - t0 >= 3.0 and max(lag_max.values(), default=0) >= ABORT_LAG:
                rec["window_cut"] = (f"decode's backlog reached {max(lag_max.values())} of {ENCODED_SLOTS} items "
                                     f"{time.monotonic() - t0:.1f} s into the window: cut short")
                break
        bus1 = box.bus()
        cpu1 = {sid: proc_cpu_s(pid) for sid, pid in pids.items()}
        busy1, steal1 = machine_busy_s()
        own1 = self_cpu_s()
        window = time.monotonic() - t0
        parent_end.send("stop")
        if not parent_end.poll(10):
            raise RuntimeError("the consumer did not report")
        _, res = parent_end.recv()
        time.sleep(1.3)  # one heartbeat: counters of the window's last second reach the hub
        m2 = scrape(url)
        st2 = box.status()
        rows2 = {r["service"]: r for r in st2["services"]}
        # --- reduce
        gone = [sid for sid in pids if cpu0[sid] is None or cpu1[sid] is None]
        restarted = [sid for sid, r in rows2.items() if r.get("restarts", 0) != restarts0.get(sid, 0)
                     or r.get("pid") != rows.get(sid, {}).get("pid")]
        not_ready = [sid for sid, r in rows2.items() if r.get("state") != "ready"]
        d = {sid: (cpu1[sid] - cpu0[sid]) if sid not in gone else None for sid in pids}
        stream_s = n * window
        cap = sum(v for sid, v in d.items() if sid.startswith("capture@") and v is not None)
        dec = sum(v for sid, v in d.items() if sid.startswith("decode@") and v is not None)
        ours = sum(v for v in d.values() if v is not None) + res["cpu_s"] + (own1 - own0)
        rec.update(
            window_s=round(window, 2),
            cpu_capture_per_stream_s=cap / stream_s, cpu_decode_per_stream_s=dec / stream_s,
            cpu_per_stream_s=(cap + dec) / stream_s,
            cpu_decode_each=[round(d[f"decode@{s}"], 3) if d.get(f"decode@{s}") is not None else None
                             for s in box.streams],
            cpu_hub_pct=100 * (d.get("hub") or 0) / window, cpu_run_pct=100 * (d.get("run") or 0) / window,
            cpu_consumer_pct=100 * res["cpu_s"] / res["window_s"],
            box_cores_busy=(cap + dec + (d.get("hub") or 0) + (d.get("run") or 0)) / window,
            other_load_pct=100 * max(0.0, (busy1 - busy0) - ours) / window,
            steal_pct=100 * (steal1 - steal0) / window,
        )
        # frames: items sent on sI (capture) and sI-raw (decode), read off the rings (exact, no heartbeat lag)
        regen = [s for s in bus1 if s in bus0 and bus1[s][0] != bus0[s][0]]
        fin = sum(bus1[s][1] - bus0[s][1] for s in box.streams if s in bus0 and s in bus1 and s not in regen)
        fout = sum(bus1[raw_stream(s)][1] - bus0[raw_stream(s)][1] for s in box.streams
                   if raw_stream(s) in bus0 and raw_stream(s) in bus1 and raw_stream(s) not in regen)
        cap_drop, cap_reasons = metric_delta(m0, m2, "edgeroom_capture_dropped_frames_total", True)
        dec_drop, dec_reasons = metric_delta(m0, m2, "edgeroom_decode_dropped_frames_total", True)
        missed = sum(res["missed"].values())
        rec.update(
            fps_in=fin / window / n, fps_out=fout / window / n, new_ring_generations=regen,
            capture_dropped=cap_drop, capture_dropped_by_reason=cap_reasons,
            decode_dropped=dec_drop, decode_dropped_by_reason=dec_reasons,
            decode_errors=int(round(metric_delta(m0, m2, "edgeroom_decode_errors_total"))),
            consumer_missed=missed, consumer_missed_each=res["missed"],
            drops=cap_drop + dec_drop + missed,
            decode_backlog_max=max(lag_max.values(), default=None), decode_backlog_each=lag_max,
        )
        lat_all, dec_all, bus_all, per = [], [], [], {}
        for s, smp in res["samples"].items():
            lat = [(now - cap_ns) / 1e6 for now, cap_ns, _ in smp]
            lat_all += lat
            dec_all += [(pub - cap_ns) / 1e6 for _, cap_ns, pub in smp]
            bus_all += [(now - pub) / 1e6 for now, _, pub in smp]
            k = max(1, len(lat) // 5)
            end = statistics.median(lat[-k:]) if lat else None
            trend = end - statistics.median(lat[:k]) if lat else None
            fps = len(smp) / res["window_s"]
            per[s] = {"fps": round(fps, 2), "p50_ms": pct(sorted(lat), 50), "p99_ms": pct(sorted(lat), 99),
                      "trend_ms": trend, "end_ms": end}
        lat_all.sort()
        dec_all.sort()
        bus_all.sort()
        rec.update(
            lat_samples=len(lat_all), lat_p50_ms=pct(lat_all, 50), lat_p99_ms=pct(lat_all, 99),
            lat_max_ms=lat_all[-1] if lat_all else None,
            decode_part_p50_ms=pct(dec_all, 50), decode_part_p99_ms=pct(dec_all, 99),
            bus_part_p50_ms=pct(bus_all, 50), bus_part_p99_ms=pct(bus_all, 99),
            received_fps_min=min((p["fps"] for p in per.values()), default=0.0), per_stream=per,
        )
        problems = []
        if rec["drops"]:
            bits = [f"capture {cap_reasons}" if cap_drop else "", f"decode {dec_reasons}" if dec_drop else "",
                    f"consumer missed {missed}" if missed else ""]
            problems.append("drops: " + ", ".join(b for b in bits if b))
        slow = [s for s, p in per.items() if p["fps"] < RATE_OK * FPS]
        if slow:
            problems.append("below real time: " + ", ".join(f"{s} {per[s]['fps']:.1f} fps" for s in slow))
        behind = [s for s, p in per.items() if p["trend_ms"] is not None and p["trend_ms"] > FRAME_MS]
        if behind:
            problems.append("falling behind (latency grew over the window): "
                            + ", ".join(f"{s} +{per[s]['trend_ms']:.0f} ms" for s in behind))
        late_ms = (hold + LATE_FRAMES) * FRAME_MS
        late = [s for s, p in per.items() if p["end_ms"] is not None and p["end_ms"] > late_ms and s not in behind]
        if late:
            problems.append(f"a backlog (latency at the window's end over {late_ms:.0f} ms: the frames decode "
                            f"holds by design + {LATE_FRAMES}): "
                            + ", ".join(f"{s} {per[s]['end_ms']:.0f} ms" for s in late))
        if rec.get("window_cut"):
            problems.append(rec["window_cut"])
        if gone or restarted:
            problems.append("restarted: " + ", ".join(sorted(set(gone + restarted))))
        if not_ready:
            problems.append("not ready at the end (the hub's view): "
                            + ", ".join(f"{sid} {rows2[sid].get('state')}" for sid in sorted(not_ready)))
        rec["sustained"] = not problems
        if problems and rec["other_load_pct"] >= BUSY_NEIGHBOUR_PCT:
            problems.append(f"meanwhile other work took {rec['other_load_pct']:.0f} % of a core of this machine")
        rec["why"] = "; ".join(problems)
    except Exception as e:
        rec["failure"] = str(e).strip()
        rec["sustained"] = False
        rec["why"] = "FAILED: " + rec["failure"][:300]
    finally:
        if consumer is not None:
            try:
                parent_end.send("quit")
            except OSError:
                pass
            consumer.join(3)
            if consumer.is_alive():
                consumer.kill()
                consumer.join()
        parent_end.close()
        child_end.close()
        t = time.monotonic()
        rec["log_warnings"] = box.warnings()
        box.close()
        rec["shutdown_s"] = round(time.monotonic() - t, 1)
    return rec


# --------------------------------------------------------------------------------------
# The sweep


def next_n(tried: dict[int, bool], max_n: int, linear: bool, est: dict[int, float] | None = None) -> int | None:
    """The next stream count to try, or None when the highest sustained N is known.

    est: for a sustained N, the N its CPU use suggests the machine holds. Without one the
    count doubles; with one it goes to OVERSHOOT x the estimate (at most 4 x N; N + N/2 when
    the estimate is no more than N), so the first failure is usually just above the capacity
    and the halving ends in a step or two."""
    lo = max((n for n, ok in tried.items() if ok), default=0)
    fails = [n for n, ok in tried.items() if not ok]
    if linear:
        if fails or lo >= max_n:
            return None
        return lo + 1
    hi = min(fails, default=None)
    if hi is None:
        if lo >= max_n:
            return None
        if lo == 0:
            return 1
        e = (est or {}).get(lo)
        if e is None:
            up = 2 * lo
        elif OVERSHOOT * e <= lo + 1:  # the CPU says full, yet it held: step on by half
            up = lo + max(1, lo // 2)
        else:
            up = min(4 * lo, math.ceil(OVERSHOOT * e))
        return min(up, max_n)
    if hi - lo <= max(1, lo // RESOLUTION):
        return None
    return (lo + hi) // 2


def capacity_estimate(rec: dict) -> float | None:
    """How many streams the cores hold, from a sustained box's CPU: the cores this benchmark can have
    (all but what other work took) over the cores one stream used (capture, decode, hub and run)."""
    busy = rec.get("box_cores_busy")
    if not rec.get("sustained") or not busy:
        return None
    usable = max(0.5, (os.cpu_count() or 1) * USABLE_SHARE - rec.get("other_load_pct", 0.0) / 100)
    return rec["streams"] * usable / busy


def sweep(clip: Clip, path: Path, plan: Plan, args, counter: list) -> list[dict]:
    rows, tried, est = [], {}, {}
    while (n := next_n(tried, plan.max_streams, args.linear, est)) is not None:
        counter[0] += 1
        t = time.monotonic()
        rec = run_box(clip, path, n, plan, f"r{counter[0]}")
        rec["sweep"] = True
        tried[n] = rec["sustained"]
        if (e := capacity_estimate(rec)) is not None:
            est[n] = rec["capacity_estimate"] = e
        rows.append(rec)
        log_box(rec, time.monotonic() - t)
    return rows


def log_box(rec: dict, took: float) -> None:
    log(f"   edgeroom {rec['size']:>5s} x{rec['streams']:<2d} decode_threads={rec['decode_threads']}  "
        f"cpu/stream-s={_fmt(rec.get('cpu_per_stream_s'), 3)}  fps out={_fmt(rec.get('received_fps_min'))}  "
        f"drops={rec.get('drops')}  p50/p99={_fmt(rec.get('lat_p50_ms'))}/{_fmt(rec.get('lat_p99_ms'))} ms  "
        f"{'sustained' if rec['sustained'] else 'NOT sustained: ' + rec['why']}  ({took:.1f} s)")


def run(args, plan: Plan) -> tuple[list[dict], dict, list[str]]:
    rows: list[dict] = []
    clips: dict = {}
    notes: list[str] = []
    counter = [0]
    for size in plan.sizes:
        clip = CLIPS[size]
        path = make_clip(clip)
        info = clip_info(path)
        clips[size] = {"path": str(path), **info}
        log(f"-- {size}: {path.name}: {info['frames']} frames, {info['kbps']} kbit/s, {info['keyframes']} keyframes, "
            f"{info['profile']}")
    default = default_decode_threads()
    other = 0 if default == 1 else 1  # the one other setting measured: frame threads (auto) or one thread
    settings = sorted({1, 0, default}, key=lambda t: (t == 0, t))
    notes.append(f"decode@'s default decode_threads is {default} ({threads_label(default)}); the last box of "
                 f"each size runs decode_threads = {other} ({threads_label(other)}) for comparison")
    for size in plan.sizes:  # each size's bare rows right before its boxes: the same machine weather
        clip = CLIPS[size]
        path = Path(clips[size]["path"])
        rows += baselines(clip, path, clips[size], plan, settings)
        rows += sweep(clip, path, plan, args, counter)
        counter[0] += 1
        t = time.monotonic()
        rec = run_box(clip, path, 1, plan, f"r{counter[0]}", decode_threads=other)
        rows.append(rec)
        log_box(rec, time.monotonic() - t)
    return rows, clips, notes


# --------------------------------------------------------------------------------------
# Report


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _bare(rows, size, tool, threads):
    for r in rows:
        if r["kind"] == "bare" and (r["size"], r["tool"], r["threads"]) == (size, tool, threads):
            return r
    return None


def decode_ms(rows, size) -> float | None:
    r = _bare(rows, size, "pyav", 1)
    return r.get("frame_ms_mean") if r else None


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def annotate(rows: list[dict]) -> None:
    """Ratios of every edgeroom row to the bare rows with the same threading."""
    for r in rows:
        if r["kind"] != "edgeroom":
            continue
        th = r["decode_threads"]
        py, ff = _bare(rows, r["size"], "pyav", th), _bare(rows, r["size"], "ffmpeg", th)
        paced = _bare(rows, r["size"], "pyav-paced", th)
        r["vs_pyav"] = ratio(r.get("cpu_per_stream_s"), py and py.get("cpu_per_stream_s"))
        r["vs_pyav_paced"] = ratio(r.get("cpu_per_stream_s"), paced and paced.get("cpu_per_stream_s"))
        r["vs_ffmpeg"] = ratio(r.get("cpu_per_stream_s"), ff and ff.get("cpu_per_stream_s"))
        dm = decode_ms(rows, r["size"])
        r["lat_target_ms"] = FRAME_MS + dm if dm is not None else None


def bare_table(rows: list[dict]) -> str:
    head = ["bare decoding", "size", "CPU s per stream-s", "decoded fps (flat out)", "decode ms/frame mean / p99",
            "latency p50 / p99 ms (paced)", "threads used", "other load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r["kind"] != "bare":
            continue
        if r.get("failure"):
            lines.append(f"| {r['label']} | {r['size']} | FAILED: {r['failure'][:120]} | | | | | |")
            continue
        runs = r.get("cpu_per_stream_s_runs")
        cpu = _fmt(r.get("cpu_per_stream_s"), 3) + (f" ({', '.join(f'{x:.3f}' for x in runs)})"
                                                      if runs and len(runs) > 1 else "")
        fm = (f"{r['frame_ms_mean']:.2f} / {r['frame_ms_p99']:.2f}" if r.get("frame_ms_mean") is not None
              and r["threads"] == 1 else "-")
        lat = (f"{r['lat_p50_ms']:.1f} / {r['lat_p99_ms']:.1f}" if r.get("lat_p50_ms") is not None else "-")
        other = f"{r['other_load_pct']:.0f} %" if r.get("other_load_pct") is not None else "-"
        lines.append("| " + " | ".join([r["label"], r["size"], cpu, _fmt(r.get("fps"), 0), fm, lat,
                                         _fmt(r.get("threads_used")), other]) + " |")
    return "\n".join(lines)


def box_table(rows: list[dict]) -> str:
    head = ["edgeroom", "size", "streams", "CPU s per stream-s (capture + decode)", "x PyAV", "x PyAV paced",
            "x ffmpeg",
            "fps out per stream (min)", "drops", "latency p50 / p99 ms (decode part p99)", "target p99",
            "backlog max", "other load", "sustained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r["kind"] != "edgeroom":
            continue
        label = f"capture@ + decode@, decode_threads = {r['decode_threads']}" + (
            " (default)" if r["default_threads"] else "")
        if r.get("failure"):
            lines.append(f"| {label} | {r['size']} | {r['streams']} | FAILED: {r['failure'][:160]} "
                         "| | | | | | | | | | no |")
            continue
        cpu = (f"{r['cpu_per_stream_s']:.3f} ({r['cpu_capture_per_stream_s']:.3f} + "
               f"{r['cpu_decode_per_stream_s']:.3f})")
        drops = str(r["drops"]) if not r["drops"] else f"**{r['drops']}**"
        lat = (f"{_fmt(r.get('lat_p50_ms'))} / {_fmt(r.get('lat_p99_ms'))} ({_fmt(r.get('decode_part_p99_ms'))})")
        tgt = r.get("lat_target_ms")
        tgt_s = "-" if tgt is None or r.get("lat_p99_ms") is None else (
            f"{tgt:.1f} {'ok' if r['lat_p99_ms'] <= tgt else '**over**'}")
        sus = "yes" if r["sustained"] else f"**no**: {r['why']}"
        lines.append("| " + " | ".join([
            label, r["size"], str(r["streams"]), cpu, _fmt(r.get("vs_pyav"), 2) + "x",
            _fmt(r.get("vs_pyav_paced"), 2) + "x", _fmt(r.get("vs_ffmpeg"), 2) + "x",
            _fmt(r.get("received_fps_min")), drops, lat, tgt_s, _fmt(r.get("decode_backlog_max")),
            f"{r['other_load_pct']:.0f} %", sus]) + " |")
    return "\n".join(lines)


def highest(rows: list[dict], size: str) -> tuple[int | None, dict | None]:
    """(highest N sustained, the first failing row above it) for the default-threads sweep."""
    sweep_rows = [r for r in rows if r["kind"] == "edgeroom" and r["size"] == size and r["sweep"]]
    if not sweep_rows:
        return None, None
    ok = [r["streams"] for r in sweep_rows if r["sustained"]]
    best = max(ok, default=0)
    above = sorted((r for r in sweep_rows if not r["sustained"] and r["streams"] > best), key=lambda r: r["streams"])
    return best, (above[0] if above else None)


def _row(rows, size, n, default=True):
    """The box row of `size` with n streams, run with decode@'s default decode_threads (or not)."""
    for r in rows:
        if r["kind"] == "edgeroom" and (r["size"], r["streams"], r["default_threads"]) == (size, n, default):
            return r
    return None


def _setting(r: dict) -> str:
    return f"decode_threads = {r['decode_threads']}" + (" (default)" if r["default_threads"] else "")


def targets(rows: list[dict], sizes) -> list[tuple[str, str, str]]:
    out = []
    for size in sizes:
        r1 = _row(rows, size, 1)
        py = r1 and _bare(rows, size, "pyav", r1["decode_threads"])
        name = f"{size} N=1: capture@ + decode@ CPU <= {TARGET_CPU_RATIO}x bare PyAV decoding (same threads)"
        if not r1 or r1.get("cpu_per_stream_s") is None or not py or py.get("cpu_per_stream_s") is None:
            out.append(("SKIP", name, "no data"))
        else:
            v = r1["vs_pyav"]
            out.append(("PASS" if v <= TARGET_CPU_RATIO else "FAIL", name,
                        f"{_setting(r1)}: {r1['cpu_per_stream_s']:.3f} vs {py['cpu_per_stream_s']:.3f} CPU s per "
                        f"stream-s = {v:.2f}x (capture {r1['cpu_capture_per_stream_s']:.3f}, decode "
                        f"{r1['cpu_decode_per_stream_s']:.3f}); {_fmt(r1.get('vs_pyav_paced'), 2)}x PyAV paced, "
                        f"{_fmt(r1.get('vs_ffmpeg'), 2)}x ffmpeg"))
        for default in (True, False):
            r = _row(rows, size, 1, default)
            what = _setting(r) if r else ("decode@'s default" if default else "the other decode_threads")
            name = f"{size} N=1 ({what}): latency p99 <= {FRAME_MS:.1f} ms + decode time per frame"
            if not r or r.get("lat_p99_ms") is None or r.get("lat_target_ms") is None:
                out.append(("SKIP", name, "no data"))
                continue
            out.append(("PASS" if r["lat_p99_ms"] <= r["lat_target_ms"] else "FAIL", name,
                        f"p99 {r['lat_p99_ms']:.1f} ms (p50 {r['lat_p50_ms']:.1f}; decode@'s part p99 "
                        f"{r['decode_part_p99_ms']:.1f}, bus p99 {r['bus_part_p99_ms']:.2f}) vs "
                        f"{r['lat_target_ms']:.1f} ms"))
        best, fail = highest(rows, size)
        if best is None:
            continue
        detail = f"N={best}" + (f" (N={fail['streams']}: {fail['why']})" if fail else " (the largest N tried)")
        if fail and fail["streams"] > best + 1:
            detail += (f"; N={best + 1}..{fail['streams'] - 1} not tried (the sweep stops within "
                       f"{100 // RESOLUTION} %)")
        bestrow = _row(rows, size, best) if best else None
        if bestrow:
            detail += (f"; at N={best}: {bestrow['cpu_per_stream_s']:.3f} CPU s per stream-s "
                       f"({_fmt(bestrow.get('vs_pyav'), 2)}x PyAV), the box busy {bestrow['box_cores_busy']:.2f} "
                       f"of {os.cpu_count()} cores, other work {bestrow['other_load_pct']:.0f} % of a core, "
                       f"latency p50/p99 {_fmt(bestrow.get('lat_p50_ms'))}/{_fmt(bestrow.get('lat_p99_ms'))} ms")
        out.append(("INFO", f"{size}30: highest N sustained with zero drops", detail))
    return out


def reading(rows: list[dict], sizes) -> list[str]:
    """Where edgeroom's CPU above bare decoding goes, at N=1, from the rows themselves."""
    out = []
    for size in sizes:
        for default in (True, False):
            r = _row(rows, size, 1, default)
            if not r or r.get("cpu_per_stream_s") is None:
                continue
            th = r["decode_threads"]
            flat, paced = _bare(rows, size, "pyav", th), _bare(rows, size, "pyav-paced", th)
            if not flat or not paced or flat.get("cpu_per_stream_s") is None \
                    or paced.get("cpu_per_stream_s") is None:
                continue
            f, p = flat["cpu_per_stream_s"], paced["cpu_per_stream_s"]
            cap, dec = r["cpu_capture_per_stream_s"], r["cpu_decode_per_stream_s"]
            out.append(
                f"{size} N=1, {_setting(r)}: edgeroom {cap + dec:.3f} CPU s per stream-s = bare PyAV flat out "
                f"{f:.3f} + decoding in real time rather than flat out {p - f:+.3f} (PyAV paced {p:.3f}) "
                f"+ decode@ beyond paced PyAV {dec - p:+.3f} (the copy into the slot, the bus, the loop, "
                f"metrics) + capture@ {cap:.3f} (demux, Annex B, pacing, the copy into the ring): "
                f"{1000 / FPS * (cap + dec):.2f} ms of CPU per frame, of which bare decoding "
                f"{1000 / FPS * f:.2f}")
        r, o = _row(rows, size, 1, True), _row(rows, size, 1, False)
        if r and o and r.get("lat_p50_ms") is not None and o.get("lat_p50_ms") is not None:
            out.append(f"{size} N=1 latency p50: {_setting(r)} {r['lat_p50_ms']:.1f} ms, {_setting(o)} "
                       f"{o['lat_p50_ms']:.1f} ms. Frame threads hold thread_count - 1 pictures back "
                       f"({FRAME_MS:.1f} ms each at {FPS} fps); FFmpeg's auto count is one per core plus one "
                       f"(up to 16), here {os.cpu_count() + 1 if (os.cpu_count() or 1) > 1 else 1}")
    return out


def report(rows, clips, notes, plan_name: str, elapsed: float, load: tuple, sizes) -> str:
    import av

    parts = [f"## ingest benchmark ({plan_name}, {elapsed:.0f} s, code {code_version()}, {os.cpu_count()} CPUs, "
             f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start, Python {sys.version.split()[0]}, "
             f"PyAV {av.__version__} (FFmpeg {getattr(av, 'ffmpeg_version_info', '?')}), "
             f"{tool_version(['ffmpeg', '-version'])})", "",
             bare_table(rows), "", box_table(rows), "", "## targets", ""]
    for verdict, name, detail in targets(rows, sizes):
        parts.append(f"- {verdict}  {name}: {detail}")
    parts += ["", "## reading", ""]
    parts += [f"- {line}" for line in reading(rows, sizes)]
    parts += ["", "## notes", ""]
    for size, c in clips.items():
        parts.append(f"- clip {size}: {c['width']}x{c['height']} {c['profile']}, {c['frames']} frames at {FPS} fps, "
                     f"{c['kbps']} kbit/s, {c['keyframes']} keyframes, no B-frames ({c['path']})")
    parts += [
        "- CPU s per stream-s: CPU seconds (user + sys) per second of video. Bare rows decode flat out "
        "(median of the runs in brackets); edgeroom rows are capture@ + decode@ over the window, paced in real "
        "time. x PyAV, x PyAV paced, x ffmpeg: against the bare row with the same decoder threads "
        "(decode_threads = 0: FFmpeg's frame threads, count auto; 1: one thread).",
        "- latency: consumer receive - item.capture_ns (the instant capture's pacing made the packet due), "
        "pooled over streams; decode part = item.publish_ns - capture_ns; target = one frame interval + the "
        "decode time per frame (PyAV, 1 thread, mean, flat out).",
        "- drops: capture + decode dropped counters (all reasons) + the NAME-raw consumer's missed, over the "
        "window (+1 heartbeat). backlog max: decode@'s largest lag on its input ring (of 64 slots), sampled "
        "each second.",
        "- other load: CPU the machine spent outside this benchmark's processes during the window (or the bare "
        "run), in % of one core; non-zero means someone else was using the cores (the worst of a bare row's runs).",
    ]
    for r in rows:
        if r["kind"] == "edgeroom" and not r.get("failure"):
            parts.append(
                f"- {r['size']} x{r['streams']} decode_threads={r['decode_threads']}: hub {r['cpu_hub_pct']:.1f} % "
                f"and edgeroom run {r['cpu_run_pct']:.1f} % of a core, consumer {r['cpu_consumer_pct']:.1f} %, box "
                f"{r['box_cores_busy']:.2f} cores busy; items/s per stream on sI/sI-raw {r['fps_in']:.1f}/"
                f"{r['fps_out']:.1f}; decode errors {r['decode_errors']}; bus part p50/p99 "
                f"{_fmt(r['bus_part_p50_ms'], 2)}/{_fmt(r['bus_part_p99_ms'], 2)} ms; startup {r['startup_s']} s, "
                f"shutdown {r.get('shutdown_s')} s; steal {r['steal_pct']:.0f} %")
        if r["kind"] == "edgeroom" and r.get("log_warnings", {}).get("count"):
            w = r["log_warnings"]
            parts.append(f"- {r['size']} x{r['streams']} decode_threads={r['decode_threads']}: the box logged "
                         f"{w['count']} warning/error line(s), e.g.: " + " | ".join(w["lines"]))
    parts += [f"- {n}" for n in notes]
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="720p only, N up to 2, S = 5 (ends within ~90 s)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--seconds", type=float, help="the measured window per box (default 10, --quick 5)")
    ap.add_argument("--max-streams", type=int, help="the largest N to try (default 64, --quick 2)")
    ap.add_argument("--sizes", help="comma-separated subset of " + ",".join(CLIPS) + " (default all, --quick 720p)")
    ap.add_argument("--linear", action="store_true",
                    help="N = 1, 2, 3, ... until the first failure (default: ramp, then halve the gap)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        if args.seconds < 2:
            ap.error("--seconds: at least 2")
        plan.seconds = args.seconds
    if args.max_streams is not None:
        if args.max_streams < 1:
            ap.error("--max-streams: at least 1")
        plan.max_streams = args.max_streams
    if args.sizes:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        bad = [s for s in sizes if s not in CLIPS]
        if bad or not sizes:
            ap.error("--sizes: choose from " + ", ".join(CLIPS))
        plan.sizes = tuple(s for s in CLIPS if s in sizes)

    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    load = os.getloadavg()
    try:
        rows, clips, notes = run(args, plan)
    except KeyboardInterrupt:
        log("interrupted: every child stopped, temp dirs and bus objects removed")
        return 130
    annotate(rows)
    notes.append(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; window {plan.seconds:g} s "
                 f"after {plan.warmup_s:g} s of warm-up")
    name = "quick" if args.quick else "full"
    text = report(rows, clips, notes, name, time.monotonic() - t0, load, plan.sizes)
    print(text, flush=True)
    if args.json:
        out = {"plan": name, "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load],
               "code": code_version(), "clips": clips,
               "targets": [{"verdict": v, "target": t, "detail": d} for v, t, d in targets(rows, plan.sizes)],
               "highest_sustained": {s: highest(rows, s)[0] for s in plan.sizes},
               "rows": [_json_row(r) for r in rows]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failure") for r in rows) else 0


def _json_row(r: dict) -> dict:
    out = {}
    for k, v in r.items():
        out[k] = round(v, 4) if isinstance(v, float) else v
    return out


if __name__ == "__main__":
    sys.exit(main())
