"""An int8 copy of the detector's model, calibrated on the room's own frames, built in the
background and cached on disk.

    cache = Int8Cache(default_cache_dir())
    up = Int8Upgrade(model, cache, Calibrator(count=16, min_interval=0.5))
    # on the engine's worker thread, per picture, while not up.done:
    up.offer(bgr)                     # cheap: a copy only when the calibrator wants one
    path = up.poll()                  # the int8 file, once, when ready; then open a Detector on it
    up.state, up.error                # "calibrating" | "building" | "ready" | "failed", DetectorError

Why
---
The float32 person model runs at about ultralytics' speed on a CPU; an int8 copy of the same
weights runs ~2x faster and finds the same people (docs/detector.md, Figures). Static int8
needs calibration pictures, and the best are the ones the model will see: frames from this
box's cameras. So the vision service starts on the float model, the engine offers it
pictures, and once enough are collected the copy is built and swapped in. The result is
cached, so a restart is int8 from the first frame.

The cache
---------
Int8Cache keys a copy by the model file's content (sha256) and the onnxruntime version
(plus RECIPE, bumped when quantize_int8 changes): a replaced model, a new runtime or a new
recipe never reuses a stale copy, and old copies are simply not looked at. A copy is written
to a temporary name in the cache directory, fsynced and renamed, so a reader sees a whole
file or none; a file that is there but does not load (a torn write on power loss, a full
disk, bit rot) is removed and rebuilt: `get()` opens it with onnxruntime before trusting it.

The calibrator
--------------
Calibrator.offer() is called on the hot path for every picture; it returns at once (one
clock read, two comparisons) unless it wants this frame: at most `count` frames in all, at
least `min_interval` seconds apart, so they spread over time (and over the streams, which
the engine interleaves). A kept frame is copied, downscaled to at most 640 pixels wide
(the model's input size: nothing is lost; 16 frames of 640x360 are 11 MB), because the
engine's picture buffer is reused.

The build
---------
build_int8() runs quantize_int8 (below) in a child process, not in the service:
  * CPU: quantizing the bundled person model takes both cores for 8 s (4 frames) to 11 s
    (16 frames) on the build machine under its usual load (7-15 s seen); the child runs
    at nice +10 (NICE) below the vision service itself, so the float detector keeps
    running and capture/decode keep their cores;
  * memory: the child peaks at ~1.3 GB resident whatever the frame count (onnxruntime's
    calibration session and graph copies); it all goes back when the child exits, where
    in the service it would stay in the allocator;
  * the GIL: loading, rewriting and saving a 45 MB graph is Python and protobuf work that
    would stall the engine thread;
  * isolation: a crash in onnxruntime's quantizer, or a runaway (TIMEOUT), costs the
    copy, not the service; its working directory is a private temporary one, so stray
    files of the quantization tools (see quantize_int8) land there and go with it.
It still must not block the engine, so Int8Upgrade calls it on a daemon thread; close()
kills a running child. A failure is DetectorError("quantize_failed") naming the cause
(the child's own error, its exit status and last stderr line); the service keeps running
on the float model.

Threads: Calibrator is used from one thread (the engine's). Int8Upgrade's offer() and
poll() are for that same thread; the build thread only sets `state`, `error` and the path
(plain attribute writes, read by the engine).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .detector import Detector, DetectorError

__all__ = ["Calibrator", "Int8Cache", "Int8Upgrade", "build_int8", "default_cache_dir", "quantize_int8",
           "RECIPE", "NICE", "TIMEOUT", "MAX_WIDTH"]

log = logging.getLogger("edgeroom.vision.quantize")

RECIPE = 1          # bump when quantize_int8 changes what it writes: old copies are then not reused
NICE = 10           # the build child's niceness, added to the vision service's own
TIMEOUT = 900.0     # seconds a build may take before it is killed
MAX_WIDTH = 640     # calibration frames are downscaled to this width at most
_ROOT = Path(__file__).resolve().parents[2]  # the repository root, for the child's imports
_STDERR_KEEP = 8192  # bytes of the child's stderr kept for the error message


def default_cache_dir() -> Path:
    """~/.cache/edgeroom/int8 (XDG_CACHE_HOME honoured), next to the TensorRT engine cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeroom" / "int8"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# ----------------------------------------------------------------------------------------
# The cache


class Int8Cache:
    """Where int8 copies live, one file per (model content, onnxruntime version, RECIPE)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._digests: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: hash a 45 MB file once

    def path_for(self, model: str | os.PathLike) -> Path:
        """The cache file for this model's content under the installed onnxruntime. Raises
        DetectorError("model_missing") when the model cannot be read."""
        model = Path(model)
        digest = self._digest(model)
        return self.directory / f"{model.stem}-{digest[:20]}-ort{_ort_version()}-r{RECIPE}.int8.onnx"

    def get(self, model: str | os.PathLike) -> Path | None:
        """The cached copy when there is one that loads; a file that does not load is removed
        (and logged) so that it gets rebuilt."""
        path = self.path_for(model)
        if not path.is_file():
            return None
        problem = _load_problem(path)
        if problem is None:
            return path
        log.warning("cached int8 copy %s does not load, rebuilding it: %s", path, problem)
        path.unlink(missing_ok=True)
        return None

    def _digest(self, model: Path) -> str:
        try:
            st = model.stat()
            key = (str(model.resolve()), st.st_size, st.st_mtime_ns)
            if key not in self._digests:
                h = hashlib.sha256()
                with open(model, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                self._digests[key] = h.hexdigest()
            return self._digests[key]
        except OSError as exc:
            raise DetectorError("model_missing", f"cannot read model {model}: {exc}") from exc


def _load_problem(path: Path) -> str | None:
    """None when onnxruntime can open the file, else why not (first line)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a load check, not a run
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
    return None


# ----------------------------------------------------------------------------------------
# Calibration frames


class Calibrator:
    """A bounded set of frames spread over time: at most `count`, `min_interval` s apart."""

    def __init__(self, count: int = 16, min_interval: float = 0.5, *, clock=time.monotonic) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        if min_interval < 0:
            raise ValueError(f"min_interval must be >= 0, not {min_interval}")
        self.count, self.min_interval, self._clock = int(count), float(min_interval), clock
        self.frames: list[np.ndarray] = []
        self._next = float("-inf")

    @property
    def ready(self) -> bool:
        return len(self.frames) >= self.count

    def offer(self, bgr: np.ndarray) -> bool:
        """Keep a downscaled copy of this BGR picture if one is due; True when kept. Pictures
        that are not BGR uint8 (H, W, 3) are not taken."""
        if len(self.frames) >= self.count:
            return False
        now = self._clock()
        if now < self._next:
            return False
        if not (isinstance(bgr, np.ndarray) and bgr.dtype == np.uint8 and bgr.ndim == 3 and bgr.shape[2] == 3
                and bgr.shape[0] > 0 and bgr.shape[1] > 0):
            return False
        h, w = bgr.shape[:2]
        if w > MAX_WIDTH:
            import cv2

            size = (MAX_WIDTH, max(1, round(h * MAX_WIDTH / w)))
            copy = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)  # a new array: the copy
        else:
            copy = bgr.copy()
        self.frames.append(copy)
        self._next = now + self.min_interval
        return True


# ----------------------------------------------------------------------------------------
# The build


def build_int8(model: str | os.PathLike, pictures: list[np.ndarray], cache: Int8Cache, *,
               channels: str = "rgb", timeout: float = TIMEOUT, nice: int = NICE,
               stop: threading.Event | None = None) -> Path:
    """Quantize `model` on `pictures` (BGR) into its cache file and return that path. Blocks
    for seconds to tens of seconds: call it on a background thread; setting `stop` kills the
    build. Errors: DetectorError with reason "quantize_failed" (or "model_missing" for an
    unreadable model) naming the cause."""
    model = Path(model)
    if not pictures:
        raise DetectorError("quantize_failed", f"int8 copy of {model.name}: no calibration pictures")
    dest = cache.path_for(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp_out = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeroom-int8-") as work:
            frames = Path(work) / "frames.npz"
            np.savez(frames, *pictures)
            _run_child(model, tmp_out, frames, Path(work), channels, timeout, nice, stop or threading.Event())
        problem = _load_problem(tmp_out)
        if problem is not None:
            raise DetectorError("quantize_failed", f"int8 copy of {model.name} was written but does not load: "
                                f"{problem}")
        os.chmod(tmp_out, 0o644)  # mkstemp made it 0600 (reading the umask would mean changing it)
        with open(tmp_out, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_out, dest)
        _fsync_dir(dest.parent)
    finally:
        tmp_out.unlink(missing_ok=True)
    return dest


def _run_child(model: Path, out: Path, frames: Path, work: Path, channels: str, timeout: float, nice: int,
               stop: threading.Event) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "services.vision.quantize", str(model.resolve()), str(out), str(frames),
           "--channels", channels, "--nice", str(nice)]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while True:
        try:
            _out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            why = ("stopped" if stop.is_set() else
                   f"took longer than {timeout:.0f} s" if time.monotonic() > deadline else None)
            if why:
                proc.kill()
                proc.communicate()
                raise DetectorError("quantize_failed", f"int8 copy of {model.name}: the quantizer {why} "
                                    "and was killed") from None
    if proc.returncode == 0:
        return
    report = work / "error.json"
    if report.is_file():
        e = json.loads(report.read_text())
        cause = f"{e['type']}" + (f" ({e['reason']})" if e.get("reason") else "") + f": {e['message']}"
    else:
        tail = err[-_STDERR_KEEP:].decode(errors="replace").strip().splitlines()
        cause = f"the quantizer exited with status {proc.returncode}" + (f": {tail[-1]}" if tail else "")
    raise DetectorError("quantize_failed", f"int8 copy of {model.name} failed: {cause}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the int8 copy itself: the same weights, ~2x faster on CPUs with VNNI/AMX ------------------


def quantize_int8(model: str | Path, out: str | Path, pictures: list, *, channels: str = "rgb") -> Path:
    """Write an int8 (QDQ, per-channel weights) copy of a YOLOv8 ONNX model, calibrated on
    `pictures` (BGR frames like the ones it will see: a few dozen from the room's cameras
    are better than the two test photos). The detection head after its last convolutions
    (box decoding, DFL, the final concat of pixel boxes with 0..1 scores) stays float:
    quantized together, one scale cannot hold both and every score rounds to zero.
    Needs onnxruntime (its quantization tools) and the onnx package. On this project's
    build machine (Xeon with AMX/VNNI) the result runs ~2.2x faster than float32 and finds
    the same people with boxes a few pixels apart (tests/test_detector.py)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    det = Detector.open(model, runtime="onnxruntime", device="cpu", channels=channels, aliases={})
    feeds = [{det.input_name: det.input_blob(pic)} for pic in pictures]

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="edgeroom-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ONNX's own shape inference only: onnxruntime's symbolic one fails on dynamic height/width
        # and then saves sym_shape_infer_temp.onnx and a <uuid>.data into the *current directory*
        # (onnxruntime 1.32, tools/symbolic_shape_infer.py) before raising; on a static YOLO export
        # both give the same graph (checked: 233 nodes, same ops).
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        head = _head_prefix(graph)
        exclude = [n.name for n in graph.node if head and n.name.startswith(head)
                   and (n.op_type != "Conv" or "/dfl/" in n.name)]
        quantize_static(str(pre), str(out), Frames(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    return out


def _head_prefix(graph) -> str:
    """'/model.22/' for ultralytics' YOLOv8 export: the module that holds the DFL."""
    for node in graph.node:
        if "/dfl/" in node.name:
            return node.name.split("/dfl/")[0] + "/"
    return ""


def _child(argv: list[str]) -> int:
    """python -m services.vision.quantize MODEL OUT FRAMES.npz [--channels rgb] [--nice N],
    run by build_int8 in a private working directory: quantize_int8, or error.json there."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m services.vision.quantize")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("frames")
    ap.add_argument("--channels", default="rgb")
    ap.add_argument("--nice", type=int, default=NICE)
    args = ap.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    try:
        with np.load(args.frames) as z:
            pictures = [z[k] for k in z.files]
        quantize_int8(args.model, args.out, pictures, channels=args.channels)
    except Exception as exc:
        first = (str(getattr(exc, "message", "") or exc).strip() or type(exc).__name__).splitlines()[0][:500]
        Path("error.json").write_text(json.dumps({"type": type(exc).__name__, "reason": getattr(exc, "reason", None),
                                                  "message": first}))
        print(f"{type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------
# The state machine the engine drives


class Int8Upgrade:
    """calibrating -> building -> ready | failed, driven by offer()/poll() from the engine's
    thread; the build runs on its own thread. A cached copy that loads makes it ready at once."""

    def __init__(self, model: str | os.PathLike, cache: Int8Cache, calibrator: Calibrator | None = None, *,
                 channels: str = "rgb", timeout: float = TIMEOUT, nice: int = NICE) -> None:
        self.model, self.cache = Path(model), cache
        self.calibrator = calibrator or Calibrator()
        self.channels, self.timeout, self.nice = channels, timeout, nice
        self.state = "calibrating"
        self.error: DetectorError | None = None
        self.path: Path | None = None
        self.build_seconds: float | None = None  # how long the build took (None: cached or not built)
        self._handed = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        try:
            cached = cache.get(self.model)
        except DetectorError as exc:
            self._fail(exc)
            return
        if cached is not None:
            self.path, self.state = cached, "ready"

    @property
    def done(self) -> bool:
        """True once the engine has nothing more to do: the copy was handed over, or it failed."""
        return self.state == "failed" or (self.state == "ready" and self._handed)

    def offer(self, bgr: np.ndarray) -> None:
        """Per picture while calibrating (a no-op otherwise); starts the build when the
        calibrator has its frames."""
        if self.state != "calibrating":
            return
        if self.calibrator.offer(bgr) and self.calibrator.ready:
            self._start()

    def poll(self) -> Path | None:
        """The finished copy's path, once; None before and after."""
        if self.state == "ready" and not self._handed:
            self._handed = True
            return self.path
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the build thread has finished (tests, shutdown); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def close(self) -> None:
        """Stop a running build (its child is killed: the state becomes failed); waits for it."""
        self._stop.set()
        self.wait(10.0)

    def describe(self) -> dict:
        return {"model": str(self.model), "state": self.state, "path": str(self.path) if self.path else None,
                "frames": len(self.calibrator.frames), "needed": self.calibrator.count,
                "build_seconds": self.build_seconds, "error": str(self.error) if self.error else None,
                "reason": self.error.reason if self.error else None}

    def _start(self) -> None:
        self.state = "building"
        self._thread = threading.Thread(target=self._build, name="vision-int8-build", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        t0 = time.monotonic()
        frames, self.calibrator.frames = self.calibrator.frames, []  # the build owns them now
        try:
            path = build_int8(self.model, frames, self.cache, channels=self.channels, timeout=self.timeout,
                              nice=self.nice, stop=self._stop)
        except DetectorError as exc:
            self._fail(exc)
            return
        except Exception as exc:  # a bug here must cost the copy, not the service
            log.exception("int8 build failed")
            self._fail(DetectorError("quantize_failed", f"int8 copy of {self.model.name} failed: "
                                     f"{type(exc).__name__}: {exc}"))
            return
        self.build_seconds = time.monotonic() - t0
        log.info("int8 copy of %s built in %.1f s from %d frames: %s", self.model.name, self.build_seconds,
                 len(frames), path)
        self.path = path
        self.state = "ready"

    def _fail(self, exc: DetectorError) -> None:
        self.error = exc
        self.state = "failed"
        if self._stop.is_set():  # close(): the service is stopping, nothing went wrong
            log.info("int8 copy of %s: the build was stopped with the service", self.model.name)
        else:
            log.warning("no int8 copy of %s: %s", self.model.name, exc)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
