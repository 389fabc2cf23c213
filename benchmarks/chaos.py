"""Chaos benchmark: a loaded box whose processes are SIGKILLed on a seeded schedule, and what
its recordings kept, against the naive recorder in the same run.

Run from the repository root:

    .venv/bin/python benchmarks/chaos.py [--quick] [--json PATH] [--seconds S] [--every S] [--seed N] [--keep]

What it answers, on this machine: when capture, decode, the hub, vision and the recorder
are killed at random, how long each takes to be ready again, and how much of what the
camera produced is in the recordings (per stream and per room); whether the files are
whole (gaps inside them, decode errors, a truthful timeline across a source's outage) and
the box is clean afterwards (no stale ring, no `.partial` left after a clean stop, no
orphan process). The same box and the same kills with `[recorder] resume = false` (a
restarted recorder starts at the live edge) give the naive row beside it.

Method
------
* The box, under `edgeroom run` (real supervision, the default restart settings), one per
  row, on a private runtime dir and bus prefix (benchmarks/benchbox.py): a synthetic
  camera `cam`, 640x360 at 30 fps, H.264 (libx264 in capture) with audio (a 1 kHz beep of
  100 ms on each whole second of its clock), in room `lobby`; decode@cam (cam-raw); vision
  with the offline mock provider (no detector) and a pipeline on cam (resize 320x180,
  watermark, published on cam-vision, a description every 2 s); the recorder with
  `record = "cam, room:lobby"` (the remuxed stream, and the room: video + AAC).
* The kills: every `--every` s (3; +-0.5 s of seeded jitter) from the start of the window
  (S = 30 s, --quick; 90 s full), a victim from a seeded shuffle of the five services
  (each round kills each once; no service twice in a row), none in the last 4 s. A
  victim is killed when it is ready (it waits up to 10 s, else the kill is skipped and
  says so): its pid is the one the supervisor's log last started, checked against
  /proc/PID/cmdline, then SIGKILL. Seed and schedule are printed and in the JSON; both
  rows get the same schedule.
* Time to ready: from the SIGKILL (this process's wall clock) to the supervisor's
  `SERVICE: ready after` line of the next run (its own timestamp, ms): detection, the
  restart delay and the service's start. Other restarts (a service that died on its own,
  a watchdog kill) are counted apart.
* What the camera produced: a witness in this process reads the `cam` and `cam-audio`
  rings (framebus consumers from the oldest item, attached before the box starts, polled
  every 20 ms, never holding the producer back) and keeps each item's producer
  generation, seq and capture_ns. The synthetic source stamps frame N of a run at
  t0 + N/fps exactly and draws N into the picture (services/capture/sources/synthetic.py,
  frame_number), and its run's first item is frame 0: so (generation, N) names every
  frame the camera put on the bus. Produced = those whose capture time is inside the
  window.
* What was recorded: every finished file of each target, decoded with PyAV; each
  picture's N read back from its luma plane; the file's timeline (pts) placed on the
  capture clock by the run that explains the most of its pictures; each picture is then
  the produced frame with that N nearest its place. Recorded s = distinct produced
  frames found / fps, against produced s. Lost frames are grouped into spans, each put
  down to a kill: the recorder's when it was killed up to 1 s after the span began (it
  loses what it held), else the last kill up to 5 s before the span began.
* Inside files: a gap = produced frames missing between two consecutive pictures of one
  file; an outage = a hole of more than 0.25 s where the camera produced nothing (capture
  was dead; shorter holes are frames the source skipped when late); spliced = a gap or
  outage whose pts step differs from its capture step by more than 5 ms (the file hides
  it); the timeline error = the largest |pts - capture time| after placing (a file's
  first picture aside: the room holds it from its start); decode errors = lines of
  `ffmpeg -v error` decoding every stream of the file. Room audio: the beeps the camera produced in the window
  against those found in the room files (onsets of the 1 kHz tone), and each found
  beep's offset from its capture time (A/V offset: the pictures place the file).
* Hygiene: rings whose producer is dead at the end of the window (stale), anything the
  box left under its bus prefix after a clean stop (SIGTERM to `edgeroom run`), `.partial`
  files left after that stop, and processes carrying the box's config (EDGEROOM_CONFIG)
  that are not its current services (while running) or at all (after the stop).
* Time: --quick ~100 s (two boxes of a 30 s window); full ~4 minutes.
"""
from __future__ import annotations

import argparse
import bisect
import calendar
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_ROOT)

import numpy as np  # noqa: E402

import framebus  # noqa: E402
from benchmarks.benchbox import BenchBox  # noqa: E402
from benchmarks.ingest import _on_sigterm, code_version, log, tool_version  # noqa: E402
from services.capture.sources.synthetic import AUDIO_RATE, frame_number  # noqa: E402
from services.control.client import ControlError  # noqa: E402

SOURCE, ROOM = "cam", "lobby"
WIDTH, HEIGHT, FPS = 640, 360, 30
PERIOD_NS = 1_000_000_000 / FPS
VICTIMS = ("capture@cam", "decode@cam", "hub", "vision", "recorder")
TARGETS = (SOURCE, f"room:{ROOM}")
WARMUP_S = 2.0        # all ready -> the window opens (the room's session list settles)
QUIET_TAIL_S = 4.0    # no kill in the window's last seconds: the last victim is back inside it
READY_WAIT_S = 10.0   # a victim not ready this long after its time is skipped
TOL_NS = 60_000_000   # a picture placed within this of a produced frame's time is that frame
SPLICE_NS = 5_000_000  # a hole whose pts step differs from the capture step by more is "spliced"
OUTAGE_NS = 250_000_000  # a hole in a file where the camera sent nothing for longer: its outage
BEEP_TOL_NS = 100_000_000
HELD_NS = 1_000_000_000  # a killed recorder loses what it held: its last fragment, at most 1 s (fragment_seconds)


@dataclass
class Plan:
    seconds: float
    every: float
    jitter: float = 0.5


FULL = Plan(seconds=90.0, every=3.0)
QUICK = Plan(seconds=30.0, every=3.0)


# --------------------------------------------------------------------------------------
# the schedule


def schedule(seed: int, plan: Plan) -> list[dict]:
    """Kill times (s from the window's start) and victims: seeded rounds of the five services."""
    rng = random.Random(seed)
    out: list[dict] = []
    k = 1
    order: list[str] = []
    while True:
        at = k * plan.every + rng.uniform(-plan.jitter, plan.jitter)
        if at > plan.seconds - QUIET_TAIL_S:
            return out
        if not order:
            order = rng.sample(VICTIMS, len(VICTIMS))
            if out and order[0] == out[-1]["victim"]:
                order[0], order[1] = order[1], order[0]
        out.append({"at_s": round(at, 2), "victim": order.pop(0)})
        k += 1


# --------------------------------------------------------------------------------------
# the witness: what the camera put on the bus


@dataclass
class Run:
    """One producer generation of the camera's video ring: frame N -> capture_ns."""
    generation: int
    t0: int | None = None          # capture_ns of its frame 0 (its seq 0)
    first_seq: int = -1
    by_n: dict[int, int] = field(default_factory=dict)
    unnumbered: int = 0            # items seen before frame 0 was (cannot be numbered)


class Witness(threading.Thread):
    """Reads `cam` and `cam-audio` from their oldest items, every 20 ms, and keeps what it saw."""

    def __init__(self, prefix: str) -> None:
        super().__init__(daemon=True, name="witness")
        self.prefix = prefix
        self.halt = threading.Event()
        self.runs: dict[int, Run] = {}
        self.beeps: list[int] = []     # capture_ns of each beep's first chunk
        self.audio_samples = 0
        self.missed = {"video": 0, "audio": 0}
        self.error = ""

    def run(self) -> None:
        try:
            video = framebus.Consumer.attach(SOURCE, prefix=self.prefix, missing_ok=True, start="oldest")
            audio = framebus.Consumer.attach(f"{SOURCE}-audio", prefix=self.prefix, missing_ok=True, start="oldest")
        except framebus.BusError as exc:
            self.error = str(exc)
            return
        try:
            while not self.halt.is_set():
                while (item := video.poll()) is not None:
                    self._video(item)
                while (item := audio.poll()) is not None:
                    self.audio_samples += item.samples
                    if item.pts % AUDIO_RATE == 0:  # the chunk that starts a second: its beep
                        self.beeps.append(item.capture_ns)
                self.halt.wait(0.02)
            self.missed = {"video": video.missed, "audio": audio.missed}
        finally:
            video.close()
            audio.close()

    def _video(self, item) -> None:
        run = self.runs.get(item.generation)
        if run is None:
            run = self.runs[item.generation] = Run(item.generation, first_seq=item.seq)
        if item.seq == 0:
            run.t0 = item.capture_ns
        if run.t0 is None:
            run.unnumbered += 1
            return
        run.by_n[round((item.capture_ns - run.t0) / PERIOD_NS)] = item.capture_ns

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)


# --------------------------------------------------------------------------------------
# the supervisor's log


_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) +\w+ +run: (\S+): "
                   r"(?:started \(pid (\d+)\)|ready after ([\d.]+) s|exited \(([^)]*)\)(.*))$")


def _midnight(epoch: float) -> float:
    t = time.localtime(epoch)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


def supervisor_events(text: str, since_epoch: float) -> list[dict]:
    """`edgeroom run`'s started / ready / exited lines as {t (epoch), service, what, pid, how}."""
    base = _midnight(since_epoch)
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        hh, mm, ss, ms, service, pid, _ready, how, rest = m.groups()
        t = base + int(hh) * 3600 + int(mm) * 60 + int(ss) + int(ms) / 1000
        if t < since_epoch - 43200:  # the log crossed midnight
            t += 86400
        what = "started" if pid else "ready" if _ready else "exited"
        out.append({"t": t, "service": service, "what": what, "pid": int(pid or 0),
                    "how": (how or "") + (rest or "")})
    return out


def current(events: list[dict], service: str) -> tuple[int, bool]:
    """The service's last started pid and whether that run is ready (and has not exited)."""
    pid, ready = 0, False
    for e in events:
        if e["service"] != service:
            continue
        if e["what"] == "started":
            pid, ready = e["pid"], False
        elif e["what"] == "ready":
            ready = True
        elif e["what"] == "exited":
            ready = False
    return pid, ready


def is_service(pid: int, service: str) -> bool:
    kind = service.split("@")[0]
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"service" in argv and kind.encode() in argv


def box_processes(config: Path) -> dict[int, str]:
    """Processes of this user whose environment names the box's config: pid -> command line."""
    want = {f"EDGEROOM_CONFIG={config}".encode(), f"EDGEROOM_CONFIG={config.resolve()}".encode()}
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            env = set(Path(f"/proc/{d}/environ").read_bytes().split(b"\0"))
            if want & env:
                out[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


# --------------------------------------------------------------------------------------
# the box


class Box(BenchBox):
    def __init__(self, tag: str, resume: bool) -> None:
        super().__init__(f"bch{os.getpid()}{tag}", "echaos", [SOURCE])
        self.rec_dir = self.dir / "recordings"
        self.write_config([
            f'[sources.{SOURCE}]\nkind = "synthetic"\nroom = "{ROOM}"\nwidth = {WIDTH}\nheight = {HEIGHT}\n'
            f'fps = {FPS}.0\nencode = "h264"\naudio = true',
            '[vision]\nprovider = "mock"',
            f'[pipelines.{SOURCE}]\nresize = "320x180"\nwatermark = "{{stream}} {{frame}}"\npublish = true\n'
            'describe_interval = 2.0',
            f'[recorder]\ndir = {json.dumps(str(self.rec_dir))}\nrecord = "{", ".join(TARGETS)}"\n'
            f'resume = {"true" if resume else "false"}'])

    def events(self, since: float) -> list[dict]:
        try:
            return supervisor_events(self.log_path.read_text(errors="replace"), since)
        except OSError:
            return []

    def stop(self) -> int:
        """A clean stop: SIGTERM to `edgeroom run` and its exit status (the box's files stay)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def kill_one(box: Box, victim: str, since: float) -> dict:
    """SIGKILL the victim's ready process (waiting up to READY_WAIT_S for one)."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        pid, ready = current(box.events(since), victim)
        if ready and is_service(pid, victim):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            else:
                return {"pid": pid, "t": time.time()}
        if time.monotonic() > deadline:
            return {"pid": pid, "t": time.time(), "skipped": f"not ready within {READY_WAIT_S:g} s"}
        time.sleep(0.05)


def ready_times(kills: list[dict], events: list[dict]) -> None:
    """Each kill's time to the victim's next `ready` line (None: it never came back)."""
    for k in kills:
        if k.get("skipped"):
            continue
        k["ready_s"] = next((round(e["t"] - k["t"], 3) for e in events if e["service"] == k["victim"]
                             and e["what"] == "ready" and e["t"] >= k["t"]), None)


def collateral(kills: list[dict], events: list[dict], since: float) -> dict:
    """Restarts our kills do not explain, and the exits that caused them, per service."""
    killed = {}
    for k in kills:
        if not k.get("skipped"):
            killed[k["victim"]] = killed.get(k["victim"], 0) + 1
    starts, exits = {}, {}
    for e in events:
        if e["t"] < since:
            continue
        if e["what"] == "started":
            starts[e["service"]] = starts.get(e["service"], 0) + 1
        elif e["what"] == "exited" and "SIGKILL" not in e["how"]:
            exits.setdefault(e["service"], []).append(e["how"][:160])
    extra = {s: n - killed.get(s, 0) for s, n in starts.items() if n > killed.get(s, 0)}
    return {"restarts": extra, "exits": exits}


# --------------------------------------------------------------------------------------
# the recordings


def decode_file(path: Path) -> dict:
    """Each video track's pictures as (pts ns, N), the audio as mono float32 with its first pts."""
    import av
    tracks: dict[int, list[tuple[int, int]]] = {}
    audio: list[np.ndarray] = []
    audio_start = None
    error = ""
    try:
        with av.open(str(path)) as c:
            for packet in c.demux():
                index = packet.stream.index
                for frame in packet.decode():
                    if frame.pts is None:
                        continue
                    tb = frame.time_base
                    pts_ns = frame.pts * tb.numerator * 1_000_000_000 // tb.denominator
                    if isinstance(frame, av.VideoFrame):
                        plane = frame.planes[0]
                        y = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:frame.height, :frame.width]
                        tracks.setdefault(index, []).append((pts_ns, frame_number(y)))
                    elif isinstance(frame, av.AudioFrame):
                        if audio_start is None:
                            audio_start = pts_ns
                        a = frame.to_ndarray()
                        audio.append(a.mean(axis=0) if a.ndim == 2 else a.reshape(-1))
    except av.error.FFmpegError as exc:  # a file that does not open or decode: counted, not fatal
        error = str(exc)[:200]
    return {"tracks": [t for t in tracks.values() if t],
            "audio": np.concatenate(audio) if audio else np.zeros(0, np.float32),
            "audio_start_ns": audio_start or 0, "error": error}


def ffmpeg_errors(path: Path) -> list[str]:
    r = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0", "-f", "null", "-"],
                       capture_output=True, text=True, timeout=120)
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def place(frames: list[tuple[int, int]], runs: list[Run], opened_ns: int) -> tuple[int | None, list]:
    """Put a track's pictures on the capture clock: (offset C with capture = C + pts, [(run, N) or None]).

    The hypothesis (a run for one of three anchor pictures) that explains the most pictures wins;
    among equals, the latest whose first picture was captured before the file was opened
    (`opened_ns`, from its name: a file holds nothing captured after it began, plus its name's
    second): a short file's numbers 0..29 are in every run, at the same spacing.
    """
    anchors = {frames[0], frames[len(frames) // 2], frames[-1]}
    sample = frames[:: max(1, len(frames) // 60)]
    best, best_key = None, None
    for pts, n in anchors:
        for r in runs:
            if n not in r.by_n:
                continue
            c = r.by_n[n] - pts
            score = sum(1 for p, m in sample if _nearest(runs, m, c + p)[1] <= TOL_NS)
            key = (c + frames[0][0] <= opened_ns + 2_000_000_000, score, c)
            if best_key is None or key > best_key:
                best, best_key = c, key
    if best is None:
        return None, [None] * len(frames)
    fits = [r.by_n[m] - p for p, m in frames for r in [_nearest(runs, m, best + p)[0]] if r is not None
            and abs(r.by_n[m] - best - p) <= TOL_NS]
    c = int(statistics.median(fits)) if fits else best
    out = []
    for p, m in frames:
        r, _ = _nearest(runs, m, c + p)
        out.append((r, m) if r is not None else None)
    return c, out


def opened_ns(path: Path, wall_minus_mono: float) -> int:
    """When a segment began, on the capture clock, from its name's UTC second (the end of that second)."""
    m = re.search(r"(\d{8}T\d{6})Z", path.name)
    if not m:
        return 2 ** 62
    epoch = calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S")) + 1
    return int((epoch - wall_minus_mono) * 1e9)


def _nearest(runs: list[Run], n: int, at: int) -> tuple[Run | None, float]:
    best, err = None, float("inf")
    for r in runs:
        t = r.by_n.get(n)
        if t is not None and abs(t - at) < err:
            best, err = r, abs(t - at)
    return best, err


def beep_onsets(audio: np.ndarray, start_ns: int) -> list[int]:
    """pts (ns) of each 1 kHz beep's start: 5 ms blocks louder than 0.1 after 20 ms quieter than 0.02
    (and at most one block between them that the start grazes)."""
    block = AUDIO_RATE // 200
    n = len(audio) // block
    if n == 0:
        return []
    level = np.abs(audio[: n * block].reshape(n, block)).mean(axis=1)
    scale = 32768.0 if level.max() > 2 else 1.0  # PyAV gives float planar AAC in [-1, 1]
    level = level / scale
    out = []
    quiet = edge = 0
    for i, v in enumerate(level):
        if v > 0.1 and max(quiet, edge) >= 4:
            out.append(start_ns + i * block * 1_000_000_000 // AUDIO_RATE)
        # a block the beep's start only grazes (it began in its last samples) keeps the quiet before it:
        # where a block boundary falls is chance (a restarted capture's audio lands anywhere)
        edge = quiet if 0.02 <= v <= 0.1 else 0
        quiet = quiet + 1 if v < 0.02 else 0
    return out


def analyse_target(files: list[Path], runs: list[Run], window: tuple[int, int], kills: list[dict],
                   beeps: list[int], room: bool, wall_minus_mono: float) -> dict:
    produced = sorted((t, (r.generation, n)) for r in runs for n, t in r.by_n.items())
    times = [t for t, _ in produced]
    in_window = {ident for t, ident in produced if window[0] <= t <= window[1]}
    recorded: set = set()
    twice: set = set()
    res = {"files": len(files), "gaps": 0, "gap_s": 0.0, "outages": 0, "outage_s": 0.0, "spliced": 0,
           "timeline_err_ms": 0.0, "decode_errors": 0, "decode_error_lines": [], "unplaced": 0}
    found_beeps: list[int] = []
    offsets: list[float] = []
    for f in files:
        errs = ffmpeg_errors(f)
        d = decode_file(f)
        if d["error"]:
            errs.append(d["error"])
        res["decode_errors"] += len(errs)
        res["decode_error_lines"] += [f"{f.name}: {e}"[:200] for e in errs[:2]]
        c = None
        for frames in d["tracks"]:
            c, ids = place(frames, runs, opened_ns(f, wall_minus_mono))
            res["unplaced"] += sum(1 for i in ids if i is None)
            _inside(res, frames, ids, c, times)
            mine = {(r.generation, n) for i in ids if i is not None for r, n in [i]}
            twice |= recorded & mine  # in another file too: recorded again after a restart
            recorded |= mine
        if room and c is not None and len(d["audio"]):
            for onset in beep_onsets(d["audio"], d["audio_start_ns"]):
                at = c + onset
                j = bisect.bisect_left(beeps, at - BEEP_TOL_NS)
                if j < len(beeps) and abs(beeps[j] - at) <= BEEP_TOL_NS:
                    found_beeps.append(beeps[j])
                    offsets.append((at - beeps[j]) / 1e6)
    got = recorded & in_window
    res.update(produced_s=len(in_window) / FPS, recorded_s=len(got) / FPS, twice_s=len(twice & in_window) / FPS,
               recall=len(got) / len(in_window) if in_window else None)
    res.update(_losses(produced, in_window - got, kills, window[0]))
    if room:
        want = [b for b in beeps if window[0] <= b <= window[1]]
        res.update(beeps_produced=len(want), beeps_recorded=len(set(found_beeps) & set(want)),
                   beeps_missing_at_s=[round((b - window[0]) / 1e9, 2) for b in want if b not in set(found_beeps)],
                   av_offset_ms_p50=round(statistics.median(offsets), 1) if offsets else None,
                   av_offset_ms_max=round(max(abs(o) for o in offsets), 1) if offsets else None)
    res["gap_s"], res["outage_s"] = round(res["gap_s"], 3), round(res["outage_s"], 3)
    return res


def _inside(res: dict, frames: list, ids: list, c: int | None, times: list[int]) -> None:
    """Gaps (produced frames missing between two pictures), outages and timeline error of one track."""
    prev = None
    for k, ((pts, _n), ident) in enumerate(zip(frames, ids)):
        if ident is None:
            continue
        r, n = ident
        cap = r.by_n[n]
        if k > 0 and c is not None:
            res["timeline_err_ms"] = max(res["timeline_err_ms"], round(abs(c + pts - cap) / 1e6, 1))
        if prev is not None and cap > prev[0]:
            missing = bisect.bisect_left(times, cap) - bisect.bisect_right(times, prev[0])
            if missing > 0:
                res["gaps"] += 1
                res["gap_s"] += missing / FPS
            elif cap - prev[0] > OUTAGE_NS:  # shorter holes: frames the source skipped when late
                res["outages"] += 1
                res["outage_s"] += (cap - prev[0] - PERIOD_NS) / 1e9
            if (missing > 0 or cap - prev[0] > OUTAGE_NS) and abs((cap - prev[0]) - (pts - prev[1])) > SPLICE_NS:
                res["spliced"] += 1
        if prev is None or cap > prev[0]:
            prev = (cap, pts)


def _losses(produced: list, lost: set, kills: list[dict], w0_ns: int) -> dict:
    """Lost frames in spans, each put down to a kill: a recorder's killed up to 1 s after the
    span began (it loses what it held: its last fragment's worth, and what the room held back
    to reorder), else the last kill up to 5 s before the span began (the effect follows it)."""
    spans: list[list[int]] = []
    last = None  # the run of the frame before, if it was lost
    for t, ident in produced:
        if ident not in lost:
            last = None
            continue
        if last != ident[0]:
            spans.append([t, 0])
        spans[-1][1] += 1
        last = ident[0]
    by_victim: dict[str, float] = {}
    detail = []
    made = [k for k in kills if not k.get("skipped")]
    for start, count in spans:
        held = [k for k in made if k["victim"] == "recorder" and start <= k["mono_ns"] <= start + HELD_NS]
        before = [k for k in made if start - 5e9 <= k["mono_ns"] <= start]
        who = held[0]["victim"] if held else before[-1]["victim"] if before else "no kill"
        by_victim[who] = round(by_victim.get(who, 0.0) + count / FPS, 3)
        detail.append({"at_s": round((start - w0_ns) / 1e9, 2), "s": round(count / FPS, 3), "kill": who})
    return {"lost_spans": len(spans), "max_lost_s": round(max((c for _, c in spans), default=0) / FPS, 3),
            "lost_s_by_victim": by_victim, "lost": detail[:30]}


# --------------------------------------------------------------------------------------
# one row


def run_row(resume: bool, plan: Plan, sched: list[dict], tag: str, keep: bool) -> dict:
    name = "resume" if resume else "naive (resume = false)"
    rec: dict = {"name": name, "resume": resume}
    box = Box(tag, resume)
    rec["prefix"], rec["dir"] = box.prefix, str(box.dir)
    witness = Witness(box.prefix)
    witness.start()
    since = time.time() - 1
    try:
        t0 = time.monotonic()
        box.start()
        box.wait_ready(60, list(VICTIMS))
        rec["startup_s"] = round(time.monotonic() - t0, 1)
        time.sleep(WARMUP_S)
        w0_ns, w0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.monotonic()
        window_epoch = time.time()
        wall_minus_mono = window_epoch - w0_ns / 1e9
        kills = []
        for s in sched:
            time.sleep(max(0.0, w0 + s["at_s"] - time.monotonic()))
            k = {"at_s": s["at_s"], "victim": s["victim"], **kill_one(box, s["victim"], since)}
            k["mono_ns"] = w0_ns + int((k["t"] - window_epoch) * 1e9)
            kills.append(k)
            log(f"   {time.monotonic() - w0:5.1f} s: SIGKILL {k['victim']} (pid {k['pid']})"
                + (f" skipped: {k['skipped']}" if k.get("skipped") else ""))
        time.sleep(max(0.0, w0 + plan.seconds - time.monotonic()))
        w1_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        rec["window_s"] = round((w1_ns - w0_ns) / 1e9, 2)
        try:
            box.wait_ready(15, list(VICTIMS))
            rec["all_back"] = True
        except RuntimeError as exc:
            rec["all_back"] = False
            rec["not_back"] = str(exc)[:300]
        time.sleep(1.5)  # what the window's last frames need to reach the files (room: reorder + fragment)
        events = box.events(since)
        current_pids = {current(events, s)[0] for s in VICTIMS}
        rings = framebus.list_streams(box.prefix)
        rec["rings_alive"] = sorted(i.stream for i in rings if i.status == "alive")
        rec["stale_rings"] = sorted(i.stream for i in rings if i.status != "alive")
        procs = box_processes(box.config)
        rec["processes_running"] = len(procs)  # edgeroom run + one per service: the scan sees the box
        rec["orphans_running"] = sorted(cmd[:120] for pid, cmd in procs.items()
                                        if pid not in current_pids and pid != box.proc.pid)
        rec["stop_status"] = box.stop()
        witness.stop()
        rec["left_after_stop"] = sorted(f for f in os.listdir("/dev/shm") if f.startswith(box.prefix + "."))
        rec["partial_after_stop"] = sorted(str(p.relative_to(box.rec_dir)) for p in box.rec_dir.rglob("*.partial"))
        rec["orphans_after_stop"] = sorted(cmd[:120] for cmd in box_processes(box.config).values())
        events = box.events(since)
        ready_times(kills, events)
        rec["kills"] = [{k: v for k, v in x.items() if k not in ("t", "mono_ns")} for x in kills]
        rec["ready"] = ready_summary(kills)
        rec["collateral"] = collateral(kills, events, window_epoch)
        rec["watchdog_kills"] = sum(1 for e in events if e["what"] == "exited" and "watchdog" in e["how"])
        runs = list(witness.runs.values())
        if keep:  # what the witness saw, beside the box's log and recordings
            (box.dir / "witness.json").write_text(json.dumps({
                "window_ns": [w0_ns, w1_ns], "beeps": witness.beeps,
                "runs": [{"generation": r.generation, "t0": r.t0, "frames": len(r.by_n),
                          "n": [min(r.by_n, default=None), max(r.by_n, default=None)]} for r in runs]}))
        rec["witness"] = {"runs": len(runs), "missed": witness.missed, "unnumbered": sum(r.unnumbered for r in runs),
                          "error": witness.error}
        rec["targets"] = {}
        for target in TARGETS:
            files = sorted((box.rec_dir / target.replace(":", "-")).glob("*.mp4"))
            rec["targets"][target] = analyse_target(files, runs, (w0_ns, w1_ns), kills, witness.beeps,
                                                    target.startswith("room:"), wall_minus_mono)
        rec["warnings"] = warnings_seen(box.warning_lines())
        return rec
    except (RuntimeError, ControlError, OSError) as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
        log(f"   FAILED: {rec['failure']}")
        return rec
    finally:
        witness.stop()
        box.close(keep_dir=keep)


def warnings_seen(lines: list[str]) -> list[str]:
    """The box's warnings and errors, alike ones counted once (times, numbers and paths masked),
    without the supervisor's lines about our own SIGKILLs."""
    counts: dict[str, int] = {}
    for line in lines:
        if "exited (signal SIGKILL)" in line:
            continue
        key = re.sub(r"(?<![\w@])/[^\s,]+", "PATH", re.sub(r"^\S+ ", "", line))  # absolute paths, not cam/video
        key = re.sub(r"\d+(\.\d+)?", "N", key)
        counts[key] = counts.get(key, 0) + 1
    return [f"{n} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])][:10]


def ready_summary(kills: list[dict]) -> dict:
    out = {}
    for v in VICTIMS:
        got = [k.get("ready_s") for k in kills if k["victim"] == v and not k.get("skipped")]
        back = sorted(x for x in got if x is not None)
        out[v] = {"kills": len(got), "back": len(back),
                  "p50_s": round(statistics.median(back), 2) if back else None,
                  "max_s": round(back[-1], 2) if back else None}
    return out


# --------------------------------------------------------------------------------------
# the report


def _s(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def recordings_table(rows: list[dict]) -> str:
    out = ["| row | target | produced s | recorded s | recall | twice s | lost spans (max s) | lost s by kill of "
           "| files | gaps in files (s) | outages shown (s, spliced) | timeline err ms | decode errors | beeps "
           "| A/V ms p50/max |",
           "|---|---|---:|---:|---:|---:|---|---|---:|---|---|---:|---:|---|---|"]
    for r in rows:
        if r.get("failure"):
            out.append(f"| {r['name']} | FAILED: {r['failure'][:150]} |" + " |" * 13)
            continue
        for target, t in r["targets"].items():
            lost = ", ".join(f"{k} {v:.1f}" for k, v in sorted(t["lost_s_by_victim"].items())) or "-"
            beeps = f"{t['beeps_recorded']}/{t['beeps_produced']}" if "beeps_produced" in t else ""
            av = f"{_s(t.get('av_offset_ms_p50'))} / {_s(t.get('av_offset_ms_max'))}" if "beeps_produced" in t else ""
            recall = "-" if t["recall"] is None else f"{100 * t['recall']:.1f} %"
            out.append(f"| {r['name']} | {target} | {t['produced_s']:.1f} | {t['recorded_s']:.1f} | {recall} | "
                       f"{t['twice_s']:.1f} | "
                       f"{t['lost_spans']} ({t['max_lost_s']:.2f}) | {lost} | {t['files']} | "
                       f"{t['gaps']} ({t['gap_s']:.2f}) | {t['outages']} ({t['outage_s']:.2f}, {t['spliced']}) | "
                       f"{t['timeline_err_ms']:.1f} | {t['decode_errors']} | {beeps} | {av} |")
    return "\n".join(out)


def ready_table(rows: list[dict]) -> str:
    ok = [r for r in rows if not r.get("failure")]
    head = "| service | " + " | ".join(f"{r['name']}: kills, back, ready p50 / max s" for r in ok) + " |"
    out = [head, "|---|" + "---|" * len(ok)]
    for v in VICTIMS:
        cells = []
        for r in ok:
            x = r["ready"][v]
            cells.append(f"{x['kills']}, {x['back']}, {_s(x['p50_s'], 2)} / {_s(x['max_s'], 2)}")
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def hygiene_table(rows: list[dict]) -> str:
    out = ["| row | start s | kills (skipped) | all back | other restarts | stale rings | left on the bus after stop "
           "| .partial after stop | orphans running / after stop | witness missed |",
           "|---|---:|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("failure"):
            continue
        skipped = sum(1 for k in r["kills"] if k.get("skipped"))
        other = ", ".join(f"{k} {v}" for k, v in r["collateral"]["restarts"].items()) or "0"
        out.append(f"| {r['name']} | {r['startup_s']} | {len(r['kills']) - skipped} ({skipped}) | {r['all_back']} | "
                   f"{other} | {len(r['stale_rings'])} | {len(r['left_after_stop'])} | "
                   f"{len(r['partial_after_stop'])} | {len(r['orphans_running'])} / {len(r['orphans_after_stop'])} | "
                   f"{r['witness']['missed']['video']} + {r['witness']['missed']['audio']} |")
    return "\n".join(out)


def report(rows: list[dict], plan_name: str, seed: int, sched: list[dict], elapsed: float, load: tuple) -> str:
    text = [f"## chaos benchmark ({plan_name}, {elapsed:.0f} s, seed {seed}, code {code_version()}, "
            f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in load)} at start, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end, {tool_version(['ffmpeg', '-version'])})", "",
            "schedule (s into the window: victim): " + ", ".join(f"{s['at_s']:.1f}: {s['victim']}" for s in sched),
            "", "### recordings", "", recordings_table(rows), "", "### time to ready after a SIGKILL", "",
            ready_table(rows), "", "### the box", "", hygiene_table(rows), "", "## notes", "",
            f"- camera: synthetic {WIDTH}x{HEIGHT} {FPS} fps H.264 with a beep each second; recorded: "
            f"{', '.join(TARGETS)}. produced = frames the camera put on the bus inside the window (a witness "
            "reads the ring); recorded = those found in the finished files (frame numbers drawn in the pictures).",
            "- twice s: frames in more than one file. lost s by kill of: lost spans put down to the recorder's kill "
            "when it came up to 1 s after they began (it loses what it held), else to the last kill before them. "
            "gaps in files: produced frames missing between two pictures of one file; outages shown: "
            "holes > 0.25 s where the camera produced nothing (capture dead); spliced: gaps or outages the file's "
            "timestamps hide. timeline err: largest |pts - capture time| in a file. A/V: a found beep's place "
            "against its capture time.",
            "- resume row: [recorder] resume = true (the default); naive row: resume = false (starts at the live "
            "edge on restart). The same kills, in the same order, at the same times, for both."]
    for r in rows:
        if r.get("failure"):
            text.append(f"- {r['name']}: FAILED: {r['failure']}")
            continue
        if not r["all_back"]:
            text.append(f"- {r['name']}: not every service came back: {r.get('not_back')}")
        for what in ("stale_rings", "left_after_stop", "partial_after_stop", "orphans_running", "orphans_after_stop"):
            if r[what]:
                text.append(f"- {r['name']}: {what.replace('_', ' ')}: {', '.join(r[what][:6])}")
        if r["collateral"]["exits"]:
            text.append(f"- {r['name']}: exits not ours: {r['collateral']['exits']}")
        for t, x in r["targets"].items():
            if x["lost"]:
                text.append(f"- {r['name']} {t}: lost (s into the window: length, after the kill of): "
                            + ", ".join(f"{d['at_s']:.1f}: {d['s']:.2f} s, {d['kill']}" for d in x["lost"][:12]))
            if x["decode_error_lines"]:
                text.append(f"- {r['name']} {t}: decode errors: {' | '.join(x['decode_error_lines'][:3])}")
        if r["warnings"]:
            text.append(f"- {r['name']}: the box logged (besides our kills): "
                        + " | ".join(w[:200] for w in r["warnings"][:6]))
    return "\n".join(text)


def _json(v):
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {k: _json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json(x) for x in v]
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 30 s window per row (ends within ~2 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--seconds", type=float, help="the window per row (default 90, --quick 30)")
    ap.add_argument("--every", type=float, help="seconds between kills (default 3)")
    ap.add_argument("--seed", type=int, default=15, help="the schedule's seed (default 15)")
    ap.add_argument("--keep", action="store_true", help="keep each box's directory (config, log, recordings)")
    args = ap.parse_args(argv)
    plan = Plan(**vars(QUICK if args.quick else FULL))
    if args.seconds is not None:
        if args.seconds < QUIET_TAIL_S + 4:
            ap.error(f"--seconds: at least {QUIET_TAIL_S + 4:g}")
        plan.seconds = args.seconds
    if args.every is not None:
        if args.every < 1.5:
            ap.error("--every: at least 1.5 (the jitter is +-0.5 s)")
        plan.every = args.every
    sched = schedule(args.seed, plan)
    signal.signal(signal.SIGTERM, _on_sigterm)
    log(f"-- seed {args.seed}: " + ", ".join(f"{s['at_s']:.1f} s {s['victim']}" for s in sched))
    t0 = time.monotonic()
    load = os.getloadavg()
    rows = []
    try:
        for i, resume in enumerate((True, False)):
            log(f"-- box: recorder resume = {str(resume).lower()}")
            rows.append(run_row(resume, plan, sched, f"r{i}", args.keep))
    except KeyboardInterrupt:
        log("interrupted: every child stopped, temp dirs and bus objects removed")
        return 130
    name = "quick" if args.quick else "full"
    print(report(rows, name, args.seed, sched, time.monotonic() - t0, load), flush=True)
    if args.json:
        out = {"plan": name, "seconds": plan.seconds, "every": plan.every, "seed": args.seed, "schedule": sched,
               "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load],
               "loadavg_end": [round(x, 2) for x in os.getloadavg()], "code": code_version(),
               "camera": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "audio": True, "room": ROOM},
               "rows": _json(rows)}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if any(r.get("failure") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
