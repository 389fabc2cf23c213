"""YOLO object detection on BGR pictures: onnxruntime by default, ultralytics optionally.

    det = Detector.open("person.onnx", device="auto", confidence=0.4, classes=["person"])
    det.backend, det.fallback_reason    # "onnxruntime:CPUExecutionProvider", "CUDAExecutionProvider ..."
    for d in det.detect(bgr):           # Detection(label, confidence, box=(x1, y1, x2, y2), class_id)
        ...
    det.detect_batch([bgr1, bgr2])      # one run when the model's batch dimension is dynamic

Choosing the runtime
--------------------
`.onnx` runs on onnxruntime (the `vision` extra): a 15 MB dependency rather than GBs of
torch, less CPU per frame than ultralytics + torch, and the same file runs on CUDA/TensorRT
with `onnxruntime-gpu` (the `vision-gpu` extra). Speed against ultralytics depends on the
file: on a YOLOv8s-sized float32 640x640 model about even; the same weights exported with
dynamic height/width (rect letterbox, below) and/or quantized (quantize.quantize_int8) 2.5-4.7x
faster (benchmarks/vision.py, docs/detector.md).
`.pt` needs ultralytics + torch (the `ultralytics` extra; AGPL, optional): opening one
without it raises MissingExtra, an ImportError that names the extra. runtime= forces one
(ultralytics also runs .onnx files).

Providers and the probe
-----------------------
device="auto" tries TensorRT, then CUDA, then CPU; "tensorrt" tries TensorRT then CUDA;
"cuda" CUDA; "cpu" only the CPU. A hardware provider is used only when it is in this
onnxruntime build, the session really put it first (onnxruntime silently drops a
provider whose libraries do not load), and one inference on a blank input succeeded.
Otherwise the detector runs on the CPU and says so: `backend` names what runs,
`fallback_reason` why it is not what was asked for (None when it is). The CPU session is
always created first: it proves the file is a model, gives the input/output layout, and
is the fallback.

Pictures in, tensors out
------------------------
Input pictures are BGR uint8 HxWx3 (OpenCV's order, what the pipeline holds). Models
exported by ultralytics (and nudenet's) want RGB, so channels="rgb" is the default and
the swap happens inside the one pass that converts to the model's layout. Each picture
is letterboxed to the model's input size (static from the model; for a dynamic input
`input_size` or 640, rounded up to the model's stride, and then, as ultralytics does, only
to the smallest multiple of the stride that holds the scaled picture: 640x384 for a 16:9
frame, 40 % fewer pixels to infer; a batch takes the largest of its pictures' rectangles):
resized keeping its aspect ratio
by cv2.resize straight into a view of a reusable canvas whose borders are grey (114, as
ultralytics pads) and are only repainted when the picture's size changes; then one numpy
pass writes canvas[..., ::-1].transpose(2, 0, 1) / 255 into a reusable NCHW blob of the
model's dtype (float16 models get float16; the bundled person model is float32 despite its
file name). No per-frame allocation but the model's own output.

Decoding
--------
The YOLOv8 head, (B, 4 + nc, N) (or its transpose), boxes as centre x, y, width,
height in the letterboxed input: the best class and its score per anchor with numpy, a
score threshold, the class filter (applied before the max, so a kept class is not hidden
by a filtered one), then NMS with cv2.dnn.NMSBoxesBatched grouped by the *output* label:
classes aliased to one label ({"Normal": "person", "Fall": "person"}) suppress each
other, as one person must not come out twice. The YOLOv5 head (B, N, 5 + nc: an
objectness column) is recognised when the model's names say nc. Boxes are mapped back
to the input picture's pixels and clipped to it. Any other output shape raises
DetectorError("unsupported_output") at open. Class names come from the ONNX metadata
(`names`, written by ultralytics' exporter) or the `names` argument, else "0", "1", ...

Threads
-------
A Detector owns reusable buffers and is NOT thread-safe: the vision service uses one
Detector from a single worker thread (per model), and that is the contract. onnxruntime
itself uses `threads` intra-op threads (default: its own choice, one per core), which
do not spin-wait between operators unless spin=True: on an edge box the detector shares
its cores with capture and decode, and spinning threads take CPU they need.

int8 on CPUs without VNNI
-------------------------
onnxruntime's fast u8s8 kernels on x86-64 CPUs without VNNI (AVX2, or AVX-512 without
VNNI) add pairs of uint8 x int8 products in 16 bits, which saturate: on an int8 copy
(models.quantize_int8) that is not noise but wrong answers (on bus.jpg, an AVX2 CPU
finds a fourth "person" at 0.44 between two real ones, and moves a box; the float model
is bit-identical there). On such CPUs every session is opened with onnxruntime's
"session.x64quantprecision" = 1: exact u8u8 kernels, which give the same results as a
VNNI/AMX CPU (checked under emulation). Slower than the saturating kernels, still faster
than float32; float models are not affected. `exact_int8` (and describe()) says whether
it is on; u8s8_saturates() decides it from /proc/cpuinfo.

Errors
------
DetectorError(reason, message) with reason one of: model_missing, not_a_model,
unsupported_input, unsupported_output, unknown_class, bad_picture, runtime_failed;
MissingExtra (reason missing_extra, also an ImportError) when the runtime a model
needs is not installed. Counting them is the caller's job (the vision service's
edgeroom_vision_... counters); a bad picture never breaks the Detector.
"""
from __future__ import annotations

import ast
import functools
import logging
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .models import aliases_for, bundled_person_model
from .types import Detection

__all__ = ["Detector", "DetectorError", "MissingExtra", "OnnxDetector", "UltralyticsDetector",
           "bundled_person_model", "u8s8_saturates"]

log = logging.getLogger("edgeroom.vision.detector")

RUNTIMES = ("auto", "onnxruntime", "ultralytics")
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PAD_VALUE = 114  # ultralytics' letterbox grey
DEFAULT_SIZE = 640
MAX_CANDIDATES = 30000  # boxes handed to NMS at most (ultralytics' max_nms)
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_ORT_PROVIDER = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}
_CHAINS = {"auto": ("tensorrt", "cuda"), "tensorrt": ("tensorrt", "cuda"), "cuda": ("cuda",), "cpu": ()}


class DetectorError(Exception):
    """A model that cannot be used, or a picture that cannot be detected on; `reason` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class MissingExtra(DetectorError, ImportError):
    """The runtime a model needs is not installed (reason "missing_extra")."""

    def __init__(self, message: str) -> None:
        DetectorError.__init__(self, "missing_extra", message)


# ----------------------------------------------------------------------------------------
# Labels: names, aliases, the class filter


def parse_names(raw) -> dict[int, str]:
    """{id: name} from a list, a dict, or ultralytics' metadata string "{0: 'person', ...}"."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return {}
    if isinstance(raw, dict):
        return {int(k): str(v) for k, v in raw.items()}
    return {i: str(v) for i, v in enumerate(raw)}


@dataclass(frozen=True)
class LabelMap:
    """Per model class id: the label it is reported as, its NMS group, whether it is kept."""

    names: dict[int, str]
    labels: tuple[str, ...]  # by class id, after aliases
    group: np.ndarray        # int32 by class id: classes with one output label share a group
    keep: np.ndarray | None  # int64 class ids kept (None: all)

    @classmethod
    def build(cls, names: dict[int, str], nc: int, aliases: dict[str, str],
              classes: Iterable[str | int] | None) -> LabelMap:
        names = {i: names.get(i, str(i)) for i in range(nc)}
        labels = tuple(aliases.get(names[i], names[i]) for i in range(nc))
        uniq = {lab: g for g, lab in enumerate(dict.fromkeys(labels))}
        group = np.array([uniq[lab] for lab in labels], dtype=np.int32)
        keep = None
        if classes is not None:
            ids: set[int] = set()
            for c in classes:
                if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                    if not 0 <= int(c) < nc:
                        raise DetectorError("unknown_class", f"class id {c} is not in the model (0..{nc - 1})")
                    ids.add(int(c))
                    continue
                hit = {i for i in range(nc) if names[i] == c or labels[i] == c}
                if not hit:
                    known = sorted(set(names.values()) | set(labels))
                    raise DetectorError("unknown_class", f"class {c!r} is not in the model (it has: "
                                        f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''})")
                ids |= hit
            keep = np.array(sorted(ids), dtype=np.int64)
        return cls(names, labels, group, keep)


# ----------------------------------------------------------------------------------------
# The common surface


class Detector:
    """What every runtime offers; open one with Detector.open()."""

    path: Path
    runtime: str
    backend: str
    fallback_reason: str | None
    input_size: tuple[int, int]  # (width, height) the model sees
    labels: LabelMap
    confidence: float
    iou: float
    max_detections: int

    @classmethod
    def open(cls, model: str | os.PathLike, *, runtime: str = "auto", device: str = "auto",
             confidence: float = 0.25, iou: float = 0.45, classes: Iterable[str | int] | None = None,
             aliases: dict[str, str] | None = None, input_size: int | tuple[int, int] | None = None,
             names: Sequence[str] | dict[int, str] | None = None, channels: str = "rgb",
             threads: int | None = None, spin: bool = False, max_detections: int = 300) -> Detector:
        """Open a model file. aliases=None takes the aliases a known bundled model comes with
        (models.aliases_for); pass {} for none."""
        path = Path(model)
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        if channels not in ("rgb", "bgr"):
            raise ValueError(f"channels must be 'rgb' or 'bgr', not {channels!r}")
        if not 0.0 <= confidence <= 1.0 or not 0.0 <= iou <= 1.0:
            raise ValueError(f"confidence and iou must be within 0..1 (got {confidence}, {iou})")
        if not path.is_file():
            raise DetectorError("model_missing", f"model file {path} does not exist" if not path.exists()
                                else f"model path {path} is not a file")
        if runtime == "auto":
            suffix = path.suffix.lower()
            if suffix == ".onnx":
                runtime = "onnxruntime"
            elif suffix == ".pt":
                runtime = "ultralytics"
            else:
                raise DetectorError("not_a_model", f"{path}: unknown model type {suffix or '(no suffix)'!r} "
                                    "(expected .onnx for onnxruntime or .pt for ultralytics)")
        size = _size_pair(input_size)
        kw = dict(device=device, confidence=confidence, iou=iou, classes=classes,
                  aliases=aliases_for(path) if aliases is None else dict(aliases), input_size=size,
                  names=names, threads=threads, max_detections=max_detections)
        if runtime == "onnxruntime":
            return OnnxDetector(path, channels=channels, spin=spin, **kw)
        return UltralyticsDetector(path, **kw)

    def detect(self, bgr: np.ndarray) -> list[Detection]:
        """The detections in one BGR picture, best first."""
        return self.detect_batch([bgr])[0]

    def detect_batch(self, pictures: Sequence[np.ndarray]) -> list[list[Detection]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """What runs, for status pages and logs."""
        return {"model": str(self.path), "runtime": self.runtime, "backend": self.backend,
                "fallback_reason": self.fallback_reason, "input_size": list(self.input_size),
                "classes": sorted(set(self.labels.labels))}

    def _init_common(self, path: Path, confidence: float, iou: float, max_detections: int) -> None:
        self.path = path
        self.confidence = float(confidence)
        self.iou = float(iou)
        self.max_detections = int(max_detections)
        self.fallback_reason = None


def _size_pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    w, h = size
    return (int(w), int(h))


_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo's names


@functools.lru_cache(maxsize=1)
def u8s8_saturates(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True where onnxruntime's u8s8 kernels saturate: an x86-64 CPU without VNNI (or AMX).
    A CPU whose flags cannot be read counts as one (exact kernels: slower, never wrong)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return not _VNNI_FLAGS & set(line.partition(":")[2].split())
    except OSError:
        pass
    return True


def check_picture(pic) -> None:
    if not isinstance(pic, np.ndarray) or pic.dtype != np.uint8 or pic.ndim != 3 or pic.shape[2] != 3:
        what = (f"{pic.dtype} array of shape {pic.shape}" if isinstance(pic, np.ndarray)
                else type(pic).__name__)
        raise DetectorError("bad_picture", f"a picture must be a BGR uint8 array of shape (H, W, 3), not a {what}")
    if pic.shape[0] < 1 or pic.shape[1] < 1:
        raise DetectorError("bad_picture", f"empty picture of shape {pic.shape}")


# ----------------------------------------------------------------------------------------
# onnxruntime


@dataclass
class _Slot:
    """One batch position's letterbox canvas and the geometry painted on it."""

    canvas: np.ndarray  # (H, W, 3) uint8
    key: tuple = ()  # (picture h, w, target w, h) last letterboxed here
    scale: float = 1.0
    left: int = 0
    top: int = 0
    new_w: int = 0
    new_h: int = 0


class OnnxDetector(Detector):
    runtime = "onnxruntime"

    def __init__(self, path: Path, *, device: str, confidence: float, iou: float, classes, aliases: dict,
                 input_size: tuple[int, int] | None, names, threads: int | None, max_detections: int,
                 channels: str = "rgb", spin: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingExtra(f"{path.name} needs onnxruntime: pip install 'edgeroom[vision]' "
                               f"(or [vision-gpu] on NVIDIA) ({exc})") from exc
        import cv2  # the media extra; needed for resize and NMS

        self._cv2 = cv2
        self._ort = ort
        self._init_common(path, confidence, iou, max_detections)
        self.rgb = channels == "rgb"
        self._opts = ort.SessionOptions()
        self._opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._opts.log_severity_level = 3  # errors only: provider fallbacks are reported through fallback_reason
        if threads:
            self._opts.intra_op_num_threads = int(threads)
        # onnxruntime's pool threads spin between operators by default: fast on idle cores, CPU
        # taken from capture/decode on a shared box (and slower when the cores are oversubscribed)
        self._opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # exact int8 where the fast kernels saturate (module docstring, "int8 on CPUs without VNNI")
        self.exact_int8 = u8s8_saturates()
        if self.exact_int8:
            self._opts.add_session_config_entry("session.x64quantprecision", "1")
        cpu = self._session(["CPUExecutionProvider"])
        meta = cpu.get_modelmeta().custom_metadata_map or {}
        self._read_input(cpu, meta, input_size)
        self._slots: list[_Slot] = []
        self._flat = np.empty(0, self.dtype)  # the blobs, (n, 3, H, W) views of its start
        raw = self._probe(cpu)
        self._read_output(raw, parse_names(names) or parse_names(meta.get("names")), aliases, classes)
        self.session, self.backend, self.fallback_reason = self._choose_provider(cpu, device)

    # --- opening ---------------------------------------------------------------------------
    def _session(self, providers: list):
        try:
            return self._ort.InferenceSession(str(self.path), self._opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail, ...)
            if providers == ["CPUExecutionProvider"]:
                raise DetectorError("not_a_model", f"{self.path} is not a model onnxruntime can load: "
                                    f"{_first_line(exc)}") from exc
            raise

    def _read_input(self, sess, meta: dict, input_size) -> None:
        inputs = sess.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] not in (3, None) and \
                isinstance(inputs[0].shape[1], int):
            shapes = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs)
            raise DetectorError("unsupported_input", f"{self.path.name}: expected one NCHW image input with "
                                f"3 channels, the model has {shapes}")
        inp = inputs[0]
        self.input_name = inp.name
        if inp.type not in _DTYPES:
            raise DetectorError("unsupported_input", f"{self.path.name}: input type {inp.type} is not a float tensor")
        self.dtype = np.dtype(_DTYPES[inp.type])
        b, _, h, w = inp.shape
        self.batch_dynamic = not isinstance(b, int)
        self.stride = int(meta.get("stride", 32) or 32)
        self.rect = False  # dynamic height and width: each batch letterboxed to its smallest rectangle
        if isinstance(h, int) and isinstance(w, int):
            if input_size is not None and input_size != (w, h):
                log.warning("%s has a fixed %dx%d input; input_size %s ignored", self.path.name, w, h, input_size)
            self.input_size = (w, h)
        else:
            want = input_size or (DEFAULT_SIZE, DEFAULT_SIZE)
            self.input_size = tuple(-(-int(v) // self.stride) * self.stride for v in want)  # type: ignore[assignment]
            self.rect = True

    def _probe(self, sess) -> np.ndarray:
        """One inference on a blank input of batch 1: the output layout, and proof the session runs."""
        w, h = self.input_size
        try:
            return sess.run(None, {self.input_name: np.zeros((1, 3, h, w), self.dtype)})[0]
        except Exception as exc:
            raise DetectorError("runtime_failed", f"{self.path.name}: a first inference on the CPU failed: "
                                f"{_first_line(exc)}") from exc

    def _read_output(self, out: np.ndarray, names: dict[int, str], aliases: dict, classes) -> None:
        if out.ndim != 3 or max(out.shape[1:]) < 5:
            raise DetectorError("unsupported_output", f"{self.path.name}: output of shape {list(out.shape)} is not "
                                "a YOLO detection head (expected (batch, 4 + classes, anchors))")
        # (B, C, N) is ultralytics' export; (B, N, C) its transpose. The values per box are the dim
        # that fits the names (4 + nc or 5 + nc), else the smaller one (anchors outnumber classes).
        fits = [d for d in (1, 2) if names and out.shape[d] in (4 + len(names), 5 + len(names))]
        self.transposed = (fits[0] == 2) if fits else out.shape[1] > out.shape[2]
        c = out.shape[2] if self.transposed else out.shape[1]
        if names and c == 5 + len(names):
            self.head, nc = "yolov5", len(names)
        elif not names or c == 4 + len(names):
            self.head, nc = "yolov8", c - 4
        else:
            raise DetectorError("unsupported_output", f"{self.path.name}: output of shape {list(out.shape)} has "
                                f"{c} values per box, which fits neither 4 + {len(names)} classes (YOLOv8) nor "
                                f"5 + {len(names)} (YOLOv5)")
        self.labels = LabelMap.build(names, nc, aliases, classes)

    def _choose_provider(self, cpu, device: str):
        available = self._ort.get_available_providers()
        reasons = []
        for kind in _CHAINS[device]:
            name = _ORT_PROVIDER[kind]
            if name not in available:
                reasons.append(f"{name} is not in this onnxruntime build (it has {', '.join(available)}; "
                               "the vision-gpu extra installs onnxruntime-gpu)")
                continue
            try:
                sess = self._session([(name, self._provider_options(kind)), "CPUExecutionProvider"])
                if sess.get_providers()[0] != name:
                    reasons.append(f"{name} did not load (onnxruntime fell back to {sess.get_providers()[0]}; "
                                   "CUDA/cuDNN/TensorRT libraries missing or not matching)")
                    continue
                self._probe(sess)
            except Exception as exc:
                reasons.append(f"{name} failed its probe inference: {_first_line(exc)}")
                continue
            return sess, f"onnxruntime:{name}", None if kind == _CHAINS[device][0] else "; ".join(reasons)
        reason = "; ".join(reasons) or None
        if reason:
            log.info("%s runs on the CPU: %s", self.path.name, reason)
        return cpu, "onnxruntime:CPUExecutionProvider", reason

    def _provider_options(self, kind: str) -> dict:
        if kind != "tensorrt":
            return {}
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeroom" / "trt"
        cache.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                "trt_fp16_enable": True}

    # --- running ---------------------------------------------------------------------------
    def detect_batch(self, pictures: Sequence[np.ndarray]) -> list[list[Detection]]:
        for pic in pictures:
            check_picture(pic)
        n = len(pictures)
        if n == 0:
            return []
        self._reserve(n if self.batch_dynamic else 1)
        if not self.batch_dynamic:
            out = []
            for pic in pictures:
                blob = self._blob(1, self._target((pic,)))
                self._letterbox(0, pic, blob)
                out.append(self._decode(self._run(blob)[0], self._slots[0], pic.shape))
            return out
        blob = self._blob(n, self._target(pictures))
        for i, pic in enumerate(pictures):
            self._letterbox(i, pic, blob)
        raw = self._run(blob)
        return [self._decode(raw[i], self._slots[i], pic.shape) for i, pic in enumerate(pictures)]

    def _target(self, pictures) -> tuple[int, int]:
        """(W, H) of the model input for these pictures: the model's size, or (rect) the smallest
        multiple of the stride that holds each picture scaled into input_size."""
        if not self.rect:
            return self.input_size
        sw, sh, st = *self.input_size, self.stride
        tw = th = st
        for pic in pictures:
            ph, pw = pic.shape[:2]
            r = min(sw / pw, sh / ph)
            tw = max(tw, -(-max(1, round(pw * r)) // st) * st)
            th = max(th, -(-max(1, round(ph * r)) // st) * st)
        return tw, th

    def _blob(self, n: int, target: tuple[int, int]) -> np.ndarray:
        w, h = target
        return self._flat[: n * 3 * h * w].reshape(n, 3, h, w)

    def _run(self, blob: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(None, {self.input_name: blob})[0]
        except Exception as exc:
            raise DetectorError("runtime_failed", f"{self.path.name}: inference failed on {self.backend}: "
                                f"{_first_line(exc)}") from exc

    def input_blob(self, pic: np.ndarray) -> np.ndarray:
        """The model's input for this one picture (letterboxed, scaled to 0..1, NCHW), a copy: what
        the int8 copy is calibrated on (services/vision/quantize.py)."""
        self._reserve(1)
        blob = self._blob(1, self._target((pic,)))
        self._letterbox(0, pic, blob)
        return blob.copy()

    def _reserve(self, n: int) -> None:
        """Canvases and blob rows for n pictures (grown, never shrunk)."""
        if len(self._slots) >= n:
            return
        w, h = self.input_size
        while len(self._slots) < n:
            self._slots.append(_Slot(np.full((h, w, 3), PAD_VALUE, np.uint8)))
        self._flat = np.empty(n * 3 * h * w, self.dtype)

    def _letterbox(self, i: int, pic: np.ndarray, blob: np.ndarray) -> None:
        """Picture i, letterboxed into the top-left (W, H) of its canvas, into blob[i]."""
        slot = self._slots[i]
        ph, pw = pic.shape[:2]
        h, w = blob.shape[2:]
        canvas = slot.canvas[:h, :w]
        if slot.key != (ph, pw, w, h):  # new geometry: repaint the borders
            sw, sh = self.input_size
            slot.scale = min(sw / pw, sh / ph)
            slot.new_w, slot.new_h = max(1, round(pw * slot.scale)), max(1, round(ph * slot.scale))
            slot.left, slot.top = (w - slot.new_w) // 2, (h - slot.new_h) // 2
            canvas.fill(PAD_VALUE)
            slot.key = (ph, pw, w, h)
        inner = canvas[slot.top:slot.top + slot.new_h, slot.left:slot.left + slot.new_w]
        if (ph, pw) == inner.shape[:2]:
            np.copyto(inner, pic)
        else:
            # bilinear, as ultralytics letterboxes (INTER_AREA costs ~4x more on a downscale)
            self._cv2.resize(pic, (slot.new_w, slot.new_h), dst=inner, interpolation=self._cv2.INTER_LINEAR)
        src = canvas[..., ::-1] if self.rgb else canvas
        np.multiply(src.transpose(2, 0, 1), self.dtype.type(1 / 255), out=blob[i], casting="unsafe")

    def _decode(self, pred: np.ndarray, slot: _Slot, shape: tuple) -> list[Detection]:
        if self.transposed:
            pred = pred.T
        lm = self.labels
        scores = pred[5:] * pred[4:5] if self.head == "yolov5" else pred[4:]
        if lm.keep is not None:
            scores = scores[lm.keep]
        best = scores.max(axis=0)
        idx = np.flatnonzero(best >= self.confidence)
        if idx.size == 0:
            return []
        conf = best[idx].astype(np.float32)
        if idx.size > MAX_CANDIDATES:
            top = np.argpartition(-conf, MAX_CANDIDATES)[:MAX_CANDIDATES]
            idx, conf = idx[top], conf[top]
        cls = scores[:, idx].argmax(axis=0)
        if lm.keep is not None:
            cls = lm.keep[cls]
        cxcywh = pred[:4, idx].T.astype(np.float32)
        xywh = cxcywh.copy()
        xywh[:, :2] -= cxcywh[:, 2:] / 2
        kept = self._cv2.dnn.NMSBoxesBatched(xywh, conf, lm.group[cls], self.confidence, self.iou)
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)[: self.max_detections]
        return self._emit(xywh[kept], conf[kept], cls[kept], slot, shape)

    def _emit(self, xywh: np.ndarray, conf: np.ndarray, cls: np.ndarray, slot: _Slot, shape) -> list[Detection]:
        h, w = shape[:2]
        boxes = np.empty_like(xywh)
        boxes[:, :2] = xywh[:, :2]
        boxes[:, 2:] = xywh[:, :2] + xywh[:, 2:]
        boxes[:, [0, 2]] -= slot.left
        boxes[:, [1, 3]] -= slot.top
        boxes /= slot.scale
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
        ints = np.rint(boxes).astype(np.int64).tolist()
        labels = self.labels.labels
        return [Detection(labels[c], float(s), tuple(b), int(c))  # type: ignore[arg-type]
                for b, s, c in zip(ints, conf.tolist(), cls.tolist())]

    def describe(self) -> dict:
        return {**super().describe(), "dtype": str(self.dtype), "channels": "rgb" if self.rgb else "bgr",
                "batch_dynamic": self.batch_dynamic, "rect": self.rect, "head": self.head,
                "exact_int8": self.exact_int8}

    def close(self) -> None:
        self.session = None


# ----------------------------------------------------------------------------------------
# ultralytics (optional)


def import_ultralytics():
    """ultralytics.YOLO, or MissingExtra naming the extra. Works around a torchvision whose
    compiled ops do not load (see _torchvision_standin)."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(os.environ.get("XDG_CONFIG_HOME")
                                                       or Path.home() / ".config") / "edgeroom" / "ultralytics"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics import YOLO
    except Exception as exc:  # ImportError, or a dependency failing inside its import
        raise MissingExtra(f"the ultralytics runtime (.pt models) needs the ultralytics extra: pip install "
                           f"'edgeroom[ultralytics]' torch  (importing it failed: {_first_line(exc)})") from exc
    try:
        import torchvision  # noqa: F401  (ultralytics imports it for its NMS)
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        _torchvision_standin(exc)
    return YOLO


def _torchvision_standin(exc: Exception) -> None:
    """A torchvision whose C++ ops do not match the installed torch fails at import with
    "operator torchvision::nms does not exist" (torch 2.13 CPU with the only torchvision
    wheels on offer, see /work/shared/design/ENVIRONMENT.md). ultralytics needs nothing
    from torchvision for detection but ops.nms, and ships a pure-torch equivalent
    (ultralytics.utils.nms.TorchNMS.nms, what it uses when torchvision is absent), so a
    stand-in module with that one function goes into sys.modules. Remove when a CPU
    torchvision matching the pinned torch is installable."""
    import types

    from ultralytics.utils.nms import TorchNMS

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = TorchNMS.nms  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    tv.__version__ = "0.0+edgeroom-standin"  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    log.warning("torchvision does not load (%s); ultralytics uses its own torch NMS", _first_line(exc))


class UltralyticsDetector(Detector):
    runtime = "ultralytics"

    def __init__(self, path: Path, *, device: str, confidence: float, iou: float, classes, aliases: dict,
                 input_size: tuple[int, int] | None, names, threads: int | None, max_detections: int) -> None:
        YOLO = import_ultralytics()
        import torch

        self._init_common(path, confidence, iou, max_detections)
        if threads:
            torch.set_num_threads(int(threads))
        try:
            self.model = YOLO(str(path), task="detect")
        except Exception as exc:
            raise DetectorError("not_a_model", f"{path} is not a model ultralytics can load: "
                                f"{_first_line(exc)}") from exc
        model_names = parse_names(names) or parse_names(getattr(self.model, "names", None))
        nc = max(model_names) + 1 if model_names else 80
        self.labels = LabelMap.build(model_names, nc, aliases, classes)
        self.agnostic = len(set(self.labels.labels)) == 1 and nc > 1  # every class one label: one NMS group
        w, h = input_size or (DEFAULT_SIZE, DEFAULT_SIZE)
        self.input_size = (w, h)
        self._device, self.backend, self.fallback_reason = self._choose_device(torch, device)

    def _choose_device(self, torch, device: str):
        reasons = []
        if device == "tensorrt":
            reasons.append("the ultralytics runtime does not drive TensorRT here (export an engine, or use the "
                           "onnxruntime runtime)")
        if device != "cpu":
            if not torch.cuda.is_available():
                reasons.append(f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")
            else:
                try:
                    self._predict([np.zeros((64, 64, 3), np.uint8)], "cuda:0")
                    return "cuda:0", "ultralytics:cuda:0", "; ".join(reasons) or None
                except Exception as exc:
                    reasons.append(f"CUDA failed its probe inference: {_first_line(exc)}")
        try:
            self._predict([np.zeros((64, 64, 3), np.uint8)], "cpu")
        except Exception as exc:
            raise DetectorError("runtime_failed", f"{self.path.name}: a first inference on the CPU failed: "
                                f"{_first_line(exc)}") from exc
        return "cpu", "ultralytics:cpu", "; ".join(reasons) or None

    def _predict(self, pictures: list, device: str):
        keep = None if self.labels.keep is None else self.labels.keep.tolist()
        # numpy pictures are taken as BGR by ultralytics, as ours are
        return self.model.predict(pictures, imgsz=[self.input_size[1], self.input_size[0]], conf=self.confidence,
                                  iou=self.iou, classes=keep, device=device, verbose=False,
                                  agnostic_nms=self.agnostic, max_det=self.max_detections)

    def detect_batch(self, pictures: Sequence[np.ndarray]) -> list[list[Detection]]:
        for pic in pictures:
            check_picture(pic)
        if not pictures:
            return []
        try:
            results = self._predict(list(pictures), self._device)
        except Exception as exc:
            raise DetectorError("runtime_failed", f"{self.path.name}: inference failed on {self.backend}: "
                                f"{_first_line(exc)}") from exc
        labels = self.labels.labels
        out = []
        for r in results:
            b = r.boxes
            xyxy = np.rint(b.xyxy.cpu().numpy()).astype(np.int64).tolist()
            out.append([Detection(labels[int(c)], float(s), tuple(x), int(c))  # type: ignore[arg-type]
                        for x, s, c in zip(xyxy, b.conf.cpu().numpy().tolist(), b.cls.cpu().numpy().tolist())])
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
