"""The MuseTalk avatar provider: the probe, the audio-to-frames arithmetic, the provider's loop, the real model.

On a box without torch or a GPU (CI) everything runs but the last test: the probe's reasons and their order
(a fake torch module gets past the GPU check), the windows of whisper features each frame gets (checked
against a port of MuseTalk's get_whisper_chunk), the blending, and the provider's asyncio side with a fake
model in place of the GPU one. The `gpu` test runs MuseTalk itself where EDGEROOM_MUSETALK_DIR names a v1.5
checkout with its weights and the probe finds a CUDA GPU.
"""
from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
import types
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from services.avatar.providers import AvatarError, Face, Outputs, Settings, Unavailable, names, open_provider
from services.avatar.providers import musetalk as mt

MUSETALK_DIR = os.environ.get("EDGEROOM_MUSETALK_DIR", "")
FIRST_FILES = [alternatives[0] for alternatives in mt.REQUIRED]


def _real_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# ------------------------------------------------------------------------------------------------
# The probe

def test_probe_says_why_on_this_box():
    torch = _real_torch()
    why = mt.probe(MUSETALK_DIR or "/nonexistent/MuseTalk")
    if torch is None:
        assert why is not None and why.startswith("torch is not installed"), why
    elif not torch.cuda.is_available():
        assert why == f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False)"
    elif not MUSETALK_DIR:
        assert why == "model_dir /nonexistent/MuseTalk is not a directory: set it to a MuseTalk v1.5 checkout"


@pytest.fixture
def fake_torch(monkeypatch, tmp_path):
    """A torch module that says a CUDA GPU is there: the probe's later steps, on a box without one."""
    torch = types.ModuleType("torch")
    torch.__version__ = "9.9.fake"
    torch.cuda = types.SimpleNamespace(is_available=lambda: True)
    torch.hub = types.SimpleNamespace(get_dir=lambda: str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(sys, "path", list(sys.path))       # the probe appends the checkout: put back after
    before = set(sys.modules)
    yield torch
    for name in set(sys.modules) - before:
        if name == "musetalk" or name.startswith("musetalk."):
            del sys.modules[name]


def _checkout(root: Path, files=FIRST_FILES, utils="def load_all_model(**kw):\n    pass\n") -> Path:
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (root / "musetalk/utils").mkdir(parents=True, exist_ok=True)
    (root / "musetalk/utils/utils.py").write_text(utils)
    (root / "musetalk/utils/audio_processor.py").write_text("class AudioProcessor:\n    pass\n")
    (root / "musetalk/utils/blending.py").write_text("")
    return root


def test_probe_checks_the_gpu_before_the_settings(fake_torch):
    fake_torch.cuda.is_available = lambda: False
    assert mt.probe("") == "no CUDA GPU: torch 9.9.fake sees none (torch.cuda.is_available() is False)"


def test_probe_asks_for_model_dir(fake_torch):
    assert mt.probe("") == "set model_dir to a MuseTalk v1.5 checkout"


def test_probe_names_a_model_dir_that_is_not_there(fake_torch, tmp_path):
    assert mt.probe(str(tmp_path / "nope")) == \
        f"model_dir {tmp_path / 'nope'} is not a directory: set it to a MuseTalk v1.5 checkout"


def test_probe_names_every_missing_file(fake_torch, tmp_path):
    root = tmp_path / "MuseTalk"
    root.mkdir()
    (root / "models/musetalkV15").mkdir(parents=True)
    (root / "models/musetalkV15/unet.pth").write_bytes(b"weights")
    (root / "models/musetalkV15/musetalk.json").write_bytes(b"")       # empty: a download that failed
    (root / "models/whisper").mkdir()
    (root / "models/whisper/model.safetensors").write_bytes(b"weights")  # the other name will do
    assert mt.probe(str(root)) == (
        f"missing in {root}: musetalk/utils/utils.py, models/musetalkV15/musetalk.json, models/sd-vae/config.json, "
        "models/sd-vae/diffusion_pytorch_model.bin or models/sd-vae/diffusion_pytorch_model.safetensors, "
        "models/whisper/config.json, models/whisper/preprocessor_config.json "
        "(MuseTalk's download_weights.sh fetches the weights)")


def test_probe_says_what_the_musetalk_package_lacks(fake_torch, tmp_path):
    root = _checkout(tmp_path / "MuseTalk", utils="import diffusers_not_here\n")
    why = mt.probe(str(root))
    assert why == f"the musetalk package does not import from {root}: No module named 'diffusers_not_here'"
    assert str(root.resolve()) not in sys.path and "musetalk.utils" not in sys.modules   # tried again next time


def test_probe_wants_a_v15_checkout(fake_torch, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    root = _checkout(tmp_path / "MuseTalk", utils="VERSION = 1\n")
    assert mt.probe(str(root)) == (f"the musetalk package does not import from {root}: musetalk.utils.utils has "
                                   "no load_all_model (not a MuseTalk v1.5 checkout)")


def test_probe_wants_a_face_detector_then_says_yes(fake_torch, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    monkeypatch.setattr(mt, "_haar_file", lambda: None)                 # as in OpenCV 5
    root = _checkout(tmp_path / "MuseTalk")
    why = mt.probe(str(root))
    assert why is not None and why.startswith("no face detector: the checkout's S3FD weights are neither at "
                                              f"{mt.S3FD_FILE} nor in torch's hub cache")
    cached = tmp_path / "hub" / mt.S3FD_CACHED
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"s3fd")
    assert mt.probe(str(root)) is None
    assert mt.face_detectors(root, fake_torch) == ["s3fd"]
    assert str(root.resolve()) in sys.path


def test_musetalk_is_a_registered_paired_provider_that_says_why_it_cannot_start():
    assert "musetalk" in names()
    p = open_provider("musetalk", Settings(model_dir=MUSETALK_DIR), Outputs(print, print, print))
    assert isinstance(p, mt.MuseTalkProvider) and p.paired and p.sample_rate == 16000
    why = mt.probe(MUSETALK_DIR)
    if why is None:
        pytest.skip("MuseTalk can run here: the gpu test starts it")

    async def go():
        with pytest.raises(Unavailable) as info:
            await p.start(Face(b"", 256, 256, 25.0))
        assert str(info.value) == f"musetalk: {why}" and info.value.reason == "unavailable"
        assert p._executor is None              # the worker thread went with the failed start
        await p.stop()
        await p.stop()
        with pytest.raises(AvatarError, match="not started"):
            await p.idle_frame()
        p.feed(np.zeros(160, np.int16))         # ignored, never raises
        p.end_turn()
    asyncio.run(go())


# ------------------------------------------------------------------------------------------------
# Audio to frames

def test_frames_for_samples_whole_or_padded():
    f25 = Fraction(25)
    assert mt.frames_for_samples(16000, 16000, f25) == 25
    assert mt.frames_for_samples(16000, 16000, f25, final=True) == 25
    assert mt.frames_for_samples(16001, 16000, f25) == 25
    assert mt.frames_for_samples(16001, 16000, f25, final=True) == 26          # the last partial frame, padded
    assert mt.frames_for_samples(639, 16000, f25) == 0
    assert mt.frames_for_samples(639, 16000, f25, final=True) == 1
    assert mt.frames_for_samples(0, 16000, f25, final=True) == 0
    assert mt.frames_for_samples(48000, 48000, Fraction(30)) == 30            # not 48000 // 30 per frame...
    ntsc = mt.exact_fps(30000 / 1001)
    assert ntsc == Fraction(30000, 1001) and mt.exact_fps(29.97) == Fraction(2997, 100)
    assert mt.frames_for_samples(1001 * 16000, 16000, ntsc) == 30000          # ...nor int(29.97): no drift
    with pytest.raises(ValueError):
        mt.exact_fps(0)


def test_window_start_is_get_whisper_chunks_index():
    f25, f30 = Fraction(25), Fraction(30)
    assert [mt.window_start(i, f25) for i in range(4)] == [-4, -2, 0, 2]       # 2 features a frame, 4 zeros first
    assert [mt.window_start(i, f30) for i in range(7)] == [-4, -3, -1, 1, 2, 4, 6]
    assert mt.WINDOW == 10


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30), Fraction(24), Fraction(30000, 1001), Fraction(12)])
def test_frames_covered_counts_the_frames_whose_windows_have_come(fps):
    for features in range(0, 160):
        brute = 0
        while mt.window_start(brute, fps) + mt.WINDOW + mt.LOOKAHEAD <= features:
            brute += 1
        assert mt.frames_covered(features, fps) == brute, features


def test_gather_windows_fills_zeros_where_asked():
    feats = np.arange(1, 7, dtype=np.float32).reshape(3, 2, 1)          # 3 features of 2 layers
    idx = np.array([[-1, 0], [1, 2]])
    out = mt.gather_windows(feats, idx)
    assert out.shape == (2, 4, 1)
    assert out[:, :, 0].tolist() == [[0, 0, 1, 2], [3, 4, 5, 6]]
    assert mt.gather_windows(np.zeros((0, 2, 1), np.float32), np.full((1, 2), -1)).shape == (1, 4, 1)


def get_whisper_chunk(features: np.ndarray, samples: int, fps: int) -> np.ndarray:
    """MuseTalk's audio_processor.get_whisper_chunk (v1.5), on numpy: features (T, layers, d) of a whole clip."""
    left = right = 2
    per_frame = 2 * (left + right + 1)
    mult = 50 / fps
    num_frames = math.floor(samples / 16000 * fps)
    actual = math.floor(samples / 16000 * 50)
    f = features[:actual]
    pad = math.ceil(mult)
    f = np.concatenate([np.zeros_like(f[:pad * left]), f, np.zeros_like(f[:pad * 3 * right])])
    clips = []
    for i in range(num_frames):
        start = math.floor(i * mult)
        clip = f[start:start + per_frame]
        assert clip.shape[0] == per_frame
        clips.append(clip)
    return np.stack(clips).reshape(num_frames, -1, features.shape[-1])


def _stream(turn: mt.Turn, audio: np.ndarray, rng: np.random.Generator):
    """Feed `audio` in random chunks, planning after each; then end the turn and plan the rest."""
    plans, pos = [], 0
    while pos < len(audio):
        n = int(rng.integers(1, 900))
        turn.add(audio[pos:pos + n], len(audio[pos:pos + n]))
        pos += n
        while (plan := turn.plan()) is not None:
            assert not turn.final
            plans.append((plan, turn.received))
    turn.finish()
    while (plan := turn.plan()) is not None:
        plans.append((plan, turn.received))
    assert turn.done and turn.plan() is None
    return plans


@pytest.mark.parametrize("fps,seconds", [(25, 3.37), (30, 2.0), (25, 21.3)])
def test_streamed_windows_are_musetalks_offline_windows(fps, seconds):
    """Frame i gets exactly the features get_whisper_chunk gives it for the whole clip, however the audio came."""
    rng = np.random.default_rng(fps)
    n = int(seconds * 16000)
    ramp = (np.arange(n) / 2 ** 24).astype(np.float32)       # each sample says where it is
    turn = mt.Turn(Fraction(fps), 16000)
    windows, expected_first = [], 0
    for plan, received in _stream(turn, ramp, rng):
        assert plan.first == expected_first and 1 <= plan.count <= mt.MAX_BATCH
        expected_first += plan.count
        start = plan.segment * mt.SAMPLES_PER_FEATURE
        assert np.array_equal(plan.audio, ramp[start:start + len(plan.audio)])     # the right audio, trimmed or not
        assert len(plan.audio) % mt.SAMPLES_PER_FEATURE == 0 and len(plan.audio) <= mt.MAX_SEGMENT * 320
        segment_features = len(plan.audio) // mt.SAMPLES_PER_FEATURE
        # a stand-in for whisper: each feature is its index in the turn, plus one (zero stays padding)
        feats = (np.arange(segment_features) + plan.segment + 1).astype(np.float32).reshape(-1, 1, 1)
        windows.append(mt.gather_windows(feats, plan.idx))
        if received < n:     # mid-turn: every window inside audio that had come, with LOOKAHEAD more
            last = mt.window_start(plan.first + plan.count - 1, turn.fps) + mt.WINDOW + mt.LOOKAHEAD
            assert last <= received // mt.SAMPLES_PER_FEATURE
    got = np.concatenate(windows)
    assert len(got) == math.ceil(n * fps / 16000) == turn.total
    offline = get_whisper_chunk((np.arange(1500 * math.ceil(seconds / 30)) + 1.0).reshape(-1, 1, 1), n, fps)
    assert np.array_equal(got[:len(offline)], offline)
    assert np.all(got[len(offline):] <= n // mt.SAMPLES_PER_FEATURE)     # the padded frame: zeros past the audio
    if seconds > 20:
        assert turn.head > 0                                  # what no batch needs any more went


def test_a_turn_shorter_than_a_frame_gives_one_frame_and_an_empty_one_none():
    turn = mt.Turn(Fraction(25), 16000)
    turn.add(np.ones(100, np.float32), 100)
    assert turn.plan() is None and turn.ready == 0
    turn.finish()
    plan = turn.plan()
    assert plan is not None and (plan.first, plan.count, len(plan.audio)) == (0, 1, 0)
    assert np.all(plan.idx == -1) and turn.done
    empty = mt.Turn(Fraction(25), 16000)
    empty.finish()
    assert empty.total == 0 and empty.plan() is None and empty.done


def test_batches_wait_for_min_batch_mid_turn_and_stop_at_max_batch():
    turn = mt.Turn(Fraction(25), 16000)
    need = (mt.window_start(0, turn.fps) + mt.WINDOW + mt.LOOKAHEAD) * 320    # frame 0's window, lookahead
    turn.add(np.zeros(need, np.float32), need)
    assert turn.ready == 1 and turn.plan() is None                            # one frame: wait for a second
    turn.add(np.zeros(640, np.float32), 640)
    assert turn.plan().count == 2
    turn.add(np.zeros(16000 * 2, np.float32), 16000 * 2)
    assert turn.plan().count == mt.MAX_BATCH
    with pytest.raises(RuntimeError):
        turn.finish()
        turn.add(np.zeros(1, np.float32), 1)


def test_audio_at_another_rate_is_resampled_to_16k_streamed():
    pytest.importorskip("av")
    to16k = mt.To16k(24000)
    t = np.arange(24000) / 24000
    pcm = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)
    parts = [to16k(pcm[i:i + 480]) for i in range(0, 24000, 480)] + [to16k.flush()]
    out = np.concatenate(parts)
    assert len(out) == 16000 and out.dtype == np.float32
    assert abs(np.abs(out[1000:15000]).max() - 12000 / 32768) < 0.01         # the tone, at its level
    assert len(to16k(pcm[:480])) > 0                                          # a new stream after the flush
    same = mt.To16k(16000)
    assert np.array_equal(same(np.array([-32768, 0, 16384], np.int16)), np.array([-1, 0, 0.5], np.float32))


# ------------------------------------------------------------------------------------------------
# The picture

def test_fit_image_letterboxes():
    pytest.importorskip("cv2")
    bgr = np.full((50, 100, 3), 200, np.uint8)
    out = mt.fit_image(bgr, 64, 64)
    assert out.shape == (64, 64, 3)
    assert np.all(out[:16] == 0) and np.all(out[48:] == 0) and np.all(out[16:48] == 200)


def test_decode_image_refuses_what_is_not_a_picture():
    cv2 = pytest.importorskip("cv2")
    with pytest.raises(Unavailable, match=r"the face image \(5 bytes\) is not a picture"):
        mt.decode_image(b"hello")
    ok, png = cv2.imencode(".png", np.full((8, 8, 3), 7, np.uint8))
    assert mt.decode_image(png.tobytes()).shape == (8, 8, 3)


def test_oval_mask_is_the_lower_half_of_the_face_feathered():
    pytest.importorskip("cv2")
    m = mt.oval_mask(120, 100)
    assert m.shape == (120, 100, 1) and m.dtype == np.float32
    assert m.min() >= 0 and m.max() <= 1
    assert np.all(m[:40] == 0)                   # the eyes stay as they are
    assert m[90, 50, 0] > 0.95                   # the mouth is redrawn
    assert m[90, 0, 0] < 0.2 and m[119, 0, 0] < 0.01   # the cheek's edge fades into the picture


def test_blend_mixes_only_inside_the_box():
    pytest.importorskip("cv2")
    ref = np.full((40, 50, 3), 100, np.uint8)
    faces = np.stack([np.full((256, 256, 3), 0, np.uint8), np.full((256, 256, 3), 250, np.uint8)])
    box = (10, 5, 30, 35)
    half = np.full((30, 20, 1), 0.5, np.float32)
    frames = mt.blend(ref, faces, box, half)
    assert len(frames) == 2 and all(f.shape == (40, 50, 3) and f.dtype == np.uint8 for f in frames)
    assert np.all(frames[0][5:35, 10:30] == 50) and np.all(frames[1][5:35, 10:30] == 175)
    outside = np.ones((40, 50), bool)
    outside[5:35, 10:30] = False
    assert all(np.all(f[outside] == 100) for f in frames)
    assert np.all(mt.blend(ref, faces, box, np.zeros_like(half))[1] == ref)


def test_mask_in_box_cuts_the_parsers_mask_to_the_face_box():
    mask = np.zeros((60, 60), np.uint8)           # over the crop box (-10, -5, 50, 55): outside the picture
    mask[20:30, 15:35] = 255                      # the face box (5, 15, 25, 25), where the crop box has it
    mask[19], mask[:, 14] = 255, 255              # just outside it
    cut = mt.mask_in_box(mask, (-10, -5, 50, 55), (5, 15, 25, 25))
    assert cut.shape == (10, 20, 1)
    assert cut[:, :, 0].tolist() == [[1.0] * 20] * 10


def test_haar_box_finds_a_demo_face_where_this_opencv_has_the_cascade():
    cv2 = pytest.importorskip("cv2")
    demo = Path(MUSETALK_DIR or "/nonexistent") / "assets/demo/musk/musk.png"
    if mt._haar_file() is None or not demo.is_file():
        pytest.skip("needs OpenCV's Haar cascade (OpenCV 4) and EDGEROOM_MUSETALK_DIR's assets/demo/musk/musk.png")
    bgr = mt.fit_image(mt.decode_image(demo.read_bytes()), 512, 512)
    x1, y1, x2, y2 = mt.haar_box(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    assert 100 < x2 - x1 < 250 and 1.0 < (y2 - y1) / (x2 - x1) < 1.3
    assert mt.haar_box(np.zeros((200, 200), np.uint8)) is None


# ------------------------------------------------------------------------------------------------
# The provider's loop, with a fake model in place of the GPU

class FakeModel:
    """Renders frame i of a turn as a picture full of i; remembers the threads it ran on."""

    def __init__(self, face: Face, fail: BaseException | None = None, size: tuple[int, int] | None = None) -> None:
        self.face, self.fail, self.size = face, fail, size
        self.idle = np.full((face.height, face.width, 3), 7, np.uint8)
        self.threads: set[str] = set()
        self.plans: list[mt.Plan] = []
        self.closed = False

    def render(self, plan: mt.Plan) -> list[np.ndarray]:
        self.threads.add(threading.current_thread().name)
        self.plans.append(plan)
        time.sleep(0.002)                       # the GPU's time: the loop goes on meanwhile
        if self.fail is not None:
            raise self.fail
        h, w = self.size or (self.face.height, self.face.width)
        return [np.full((h, w, 3), (plan.first + k) % 251, np.uint8) for k in range(plan.count)]

    def close(self) -> None:
        self.closed = True

    def facts(self) -> dict:
        return {"gpu": "fake"}


@pytest.fixture
def fake_model(monkeypatch):
    made: list[FakeModel] = []
    options: dict = {}

    def load(root, face):
        made.append(FakeModel(face, **options))
        return made[-1]
    monkeypatch.setattr(mt, "probe", lambda model_dir: None)
    monkeypatch.setattr(mt, "load_model", load)
    return made, options


class Collect:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.errors: list[AvatarError] = []
        self.threads: set[int] = set()

    def on_frame(self, rgb: np.ndarray) -> None:
        self.threads.add(threading.get_ident())
        self.frames.append(rgb)

    def on_error(self, err: AvatarError) -> None:
        self.errors.append(err)

    def outputs(self) -> Outputs:
        return Outputs(self.on_frame, lambda pcm, rate: None, self.on_error)

    def values(self) -> list[int]:
        return [int(f[0, 0, 0]) for f in self.frames]


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)


def test_frames_stream_in_order_fps_per_second_of_audio(fake_model):
    made, _ = fake_model
    out = Collect()

    async def go():
        p = open_provider("musetalk", Settings(model_dir="/opt/MuseTalk"), out.outputs())
        assert await p.start(Face(b"png", 64, 48, 25.0)) == 25.0
        assert (await p.idle_frame()).shape == (48, 64, 3)
        for _ in range(50):                     # 1 s in 20 ms chunks
            p.feed(np.zeros(320, np.int16))
        await _until(lambda: len(out.frames) == 21)   # mid-turn: the frames whose windows have come
        await asyncio.sleep(0.05)
        assert len(out.frames) == 21
        p.end_turn()
        p.feed(np.zeros(3360, np.int16))        # the next turn: 0.21 s, 5.25 frames
        p.end_turn()
        p.end_turn()                            # an empty turn: no frames
        await _until(lambda: len(out.frames) == 31)
        await asyncio.sleep(0.05)
        status = p.status()
        await p.stop()
        await p.stop()
        return status, threading.get_ident()
    status, loop_thread = asyncio.run(go())
    assert out.values() == list(range(25)) + list(range(6))
    assert out.threads == {loop_thread} and not out.errors
    assert made[0].threads == {t for t in made[0].threads if t.startswith("musetalk")} and made[0].closed
    assert status["frames"] == 31 and status["turns"] == 3 and status["behind_frames"] == 0
    assert status["gpu"] == "fake"


def test_audio_at_24k_gives_the_same_frames(fake_model):
    pytest.importorskip("av")
    out = Collect()

    async def go():
        p = open_provider("musetalk", Settings(model_dir="/opt/MuseTalk", sample_rate=24000), out.outputs())
        assert p.sample_rate == 24000
        await p.start(Face(b"png", 64, 64, 30.0))
        for _ in range(50):
            p.feed(np.zeros(480, np.int16))
        p.end_turn()
        await _until(lambda: len(out.frames) == 30)
        await asyncio.sleep(0.05)
        await p.stop()
    asyncio.run(go())
    assert out.values() == list(range(30))


class OutOfMemoryError(RuntimeError):
    """What torch.cuda raises, by name."""


@pytest.mark.parametrize("fail,size,reason,words", [
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), None, "closed",
     "inference failed at frame 0 of the turn: RuntimeError: cuDNN error"),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), None, "closed",
     "CUDA out of memory rendering 16 frame(s): CUDA out of memory. Tried to allocate 2.00 GiB"),
    (None, (10, 10), "garbage", "16 frame(s) of uint8(10, 10, 3) for 16 of 64x48"),
])
def test_a_failed_batch_is_reported_once_and_nothing_follows(fake_model, fail, size, reason, words):
    made, options = fake_model
    options.update(fail=fail, size=size)
    out = Collect()

    async def go():
        p = open_provider("musetalk", Settings(model_dir="/opt/MuseTalk"), out.outputs())
        await p.start(Face(b"png", 64, 48, 25.0))
        for _ in range(50):                     # fed before the drain runs: a first batch of MAX_BATCH
            p.feed(np.zeros(320, np.int16))
        await _until(lambda: out.errors)
        p.feed(np.zeros(16000, np.int16))
        p.end_turn()
        await asyncio.sleep(0.05)
        status = p.status()
        await p.stop()
        return status
    status = asyncio.run(go())
    assert len(out.errors) == 1 and not out.frames and len(made[0].plans) == 1
    assert out.errors[0].reason == reason and words in str(out.errors[0]), str(out.errors[0])
    assert status["error"] == str(out.errors[0]) and status["dropped_samples"] == 16000


@pytest.mark.parametrize("fail,cls,reason,words", [
    (RuntimeError("Error(s) in loading state_dict for UNet2DConditionModel"), Unavailable, "unavailable",
     "loading the models of /opt/MuseTalk failed: RuntimeError: Error(s) in loading state_dict"),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB"), AvatarError, "down",
     "CUDA out of memory loading the models of /opt/MuseTalk"),
    (Unavailable("musetalk: no face found in the face image (64x48) by haar: use a frontal portrait"),
     Unavailable, "unavailable", "no face found"),
])
def test_a_failed_load_says_why_and_leaves_nothing_running(monkeypatch, fail, cls, reason, words):
    def load(root, face):
        raise fail
    monkeypatch.setattr(mt, "probe", lambda model_dir: None)
    monkeypatch.setattr(mt, "load_model", load)

    async def go():
        p = open_provider("musetalk", Settings(model_dir="/opt/MuseTalk"), Collect().outputs())
        with pytest.raises(cls) as info:
            await p.start(Face(b"png", 64, 48, 25.0))
        assert info.value.reason == reason and words in str(info.value)
        assert p._executor is None and p._task is None
        await p.stop()
    asyncio.run(go())


def test_a_face_that_cannot_be_rendered_is_refused(fake_model):
    async def go():
        p = open_provider("musetalk", Settings(model_dir="/opt/MuseTalk"), Collect().outputs())
        with pytest.raises(Unavailable, match="a face of 16x16 at 25.0 fps cannot be rendered"):
            await p.start(Face(b"png", 16, 16, 25.0))
        with pytest.raises(Unavailable, match="at 0.0 fps"):
            await p.start(Face(b"png", 64, 64, 0.0))
    asyncio.run(go())


# ------------------------------------------------------------------------------------------------
# The real thing

def _speech(root: Path) -> tuple[np.ndarray, int]:
    """Two seconds of the checkout's demo speech (data/audio), or a voiced, syllabic stand-in."""
    for name in ("yongen.wav", "eng.wav", "sun.wav"):
        path = root / "data/audio" / name
        if not path.is_file():
            continue
        with wave.open(str(path)) as w:
            if w.getsampwidth() != 2:
                continue
            rate, channels = w.getframerate(), w.getnchannels()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, channels)
        pcm = pcm.mean(axis=1).astype(np.int16)
        start = min(len(pcm) // 4, rate)
        return pcm[start:start + 2 * rate], rate
    t = np.arange(32000) / 16000
    voice = sum(np.sin(2 * np.pi * 130 * k * t) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (voice * syllables * 6000).astype(np.int16), 16000


@pytest.mark.gpu
def test_musetalk_renders_a_talking_face_on_the_gpu():
    why = mt.probe(MUSETALK_DIR)
    if why is not None:
        pytest.skip(f"MuseTalk cannot run here: {why} (EDGEROOM_MUSETALK_DIR: a v1.5 checkout with its weights, "
                    "on a CUDA box)")
    root = Path(MUSETALK_DIR)
    pictures = [root / "assets/demo" / p for p in ("musk/musk.png", "yongen/yongen.jpeg", "man/man.png")]
    picture = next((p for p in pictures if p.is_file()), None)
    if picture is None:
        pytest.skip(f"no demo portrait under {root}/assets/demo")
    speech, rate = _speech(root)
    out = Collect()

    async def go():
        p = open_provider("musetalk", Settings(model_dir=MUSETALK_DIR, sample_rate=rate), out.outputs())
        t0 = time.monotonic()
        assert await p.start(Face(picture.read_bytes(), 384, 384, 25.0)) == 25.0
        loaded = time.monotonic() - t0
        idle = await p.idle_frame()
        chunk = rate // 50
        for _ in range(0, rate, chunk):                         # 1 s of silence
            p.feed(np.zeros(chunk, np.int16))
        p.end_turn()
        await _until(lambda: len(out.frames) == 25, timeout=120)
        silent = len(out.frames)
        for i in range(0, len(speech), chunk):                  # then 2 s of speech
            p.feed(speech[i:i + chunk])
            await asyncio.sleep(0)
        p.end_turn()
        await _until(lambda: len(out.frames) == silent + 50 or out.errors, timeout=120)
        status = p.status()
        await p.stop()
        return idle, status, loaded
    idle, status, loaded = asyncio.run(go())
    assert not out.errors, out.errors
    print(f"\nMuseTalk on {status['gpu']}: loaded in {loaded:.1f} s, {status['ms_per_frame']} ms a frame, "
          f"face {status['box']} by {status['detector']}, blend {status['blend']}")
    assert len(out.frames) == 75 and all(f.shape == (384, 384, 3) and f.dtype == np.uint8 for f in out.frames)
    x1, y1, x2, y2 = status["box"]
    assert np.array_equal(out.frames[30][:y1], idle[:y1])       # above the face: the picture as it is
    mouth = (slice(None), slice((y1 + y2) // 2, y2), slice(x1, x2))
    silence = np.stack(out.frames[:25]).astype(np.float32)[mouth]
    talking = np.stack(out.frames[25:]).astype(np.float32)[mouth]
    moved = np.abs(talking - silence.mean(axis=0)).mean(axis=(1, 2, 3))
    assert moved.max() > 4.0, moved                             # the mouth opens...
    assert talking.std(axis=0).mean() > silence.std(axis=0).mean() + 1.0   # ...and keeps moving while it talks
