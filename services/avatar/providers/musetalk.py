"""MuseTalk v1.5 on a local NVIDIA GPU: a voice in, the reference face's mouth redrawn to it, frame by frame.

    p = open_provider("musetalk", Settings(model_dir="/opt/MuseTalk"), Outputs(on_frame, on_audio, on_error))
    fps = await p.start(Face(image=png, width=512, height=512, fps=25.0))   # Unavailable: why it cannot run
    p.feed(pcm)        # int16 mono at p.sample_rate (16 kHz unless the settings say): frames come back as made
    p.end_turn()       # the rest of the turn, its last partial frame padded

A paired provider (base.py): frame i of a turn shows the audio samples [i * rate / fps, (i + 1) * rate / fps)
of that turn, and a turn of n samples gives ceil(n * fps / rate) frames, in order, through `outputs.on_frame`.

Can it run? `probe(model_dir)` says None or why not, in this order: torch is not installed; torch sees no CUDA
GPU; model_dir is empty; files of the checkout or its weights are missing (each named: what MuseTalk's
download_weights.sh fetches into models/); the checkout's `musetalk` package does not import (a missing
diffusers, transformers, librosa...); no face detector (S3FD's weights not on disk, and an OpenCV without Haar
cascades: OpenCV 5 moved them out). `start()` raises `Unavailable("musetalk: <why>")`, which the service does not
retry. Nothing heavy is imported before `start()`: the box's config loads on a core without torch.

What it runs (the steps of MuseTalk's scripts/realtime_inference.py, with the checkout's own code):

* load (musetalk/utils/utils.py `load_all_model`, given absolute paths: the VAE of models/sd-vae, the UNet of
  models/musetalkV15/unet.pth + musetalk.json, the PositionalEncoding), fp16 on CUDA, as realtime_inference
  does; the whisper-tiny encoder (transformers' WhisperModel) and feature extractor (musetalk/utils/
  audio_processor.py `AudioProcessor`) from models/whisper;
* the face, once: the image decoded by OpenCV and fitted into width x height (letterboxed, aspect kept); the
  face found by the checkout's S3FD detector when its weights are on disk (musetalk/utils/face_detection;
  never downloaded), else OpenCV's Haar cascade; the crop resized to 256 x 256, its VAE latents (vae.py
  `get_latents_for_unet`: the lower half masked + the whole face); the blending mask by the checkout's face
  parsing in "jaw" mode when models/face-parse-bisent is there (blending.py `get_image_prepare_material`),
  else a feathered oval of the lower half of the face;
* per batch of frames: the whisper encoder's hidden states of the audio (50 per second), a window of 10 of
  them per frame exactly where audio_processor.py `get_whisper_chunk` takes it (zeros before the turn and past
  its end), PositionalEncoding, one UNet forward at timestep 0, `vae.decode_latents`, each face resized into
  its box and blended with the mask (blending.py `get_image_blending`, as one numpy expression per batch).

How it differs from RoomKit's MuseTalk provider (src/roomkit/video/avatar/musetalk.py), and why:

* RoomKit runs whisper, UNet and VAE inside `feed_audio()`, on the caller's thread: on an asyncio service
  that stalls every room. Here `feed()` only appends (resampling a chunk is microseconds), and one dedicated
  worker thread loads the models and renders; a task on the loop hands it batches and emits what comes back.
* RoomKit encodes the audio of each call alone (a frame's 40 ms when fed 20 ms chunks): whisper sees no
  context and get_whisper_chunk pads every window with zeros as if the clip began and ended there. Here a
  turn's audio is kept and each batch is encoded with up to 10 s of the turn before it and LOOKAHEAD features
  after its windows, so frame i's window sits where MuseTalk's offline script puts it, on real audio (the CPU
  tests check the windows against `get_whisper_chunk`'s indexing).
* RoomKit never resamples: audio at 24 kHz goes to a feature extractor that wants 16 kHz. Here anything not at
  16 kHz goes through swresample (PyAV), streamed, flushed at the end of a turn.
* RoomKit takes `sample_rate // fps` samples per frame (533 at 16 kHz and 30 fps: a frame too many every
  minute, the video running ahead of the voice) and get_whisper_chunk `int(fps)` (29 for 29.97: windows 3 %
  off); here frame counts and windows use the exact rate as a fraction.
* RoomKit changes the process's working directory to load the weights and replaces `torch.load` for the whole
  process; here every path is absolute (the face parser is subclassed to take them) and torch is untouched.
* RoomKit crops a Haar box widened 1.5 x, and silently uses the middle of the picture when it finds no face;
  here the box approximates MuseTalk's landmark box (nose bridge in the middle, chin at the bottom) and a
  picture without a face is refused at `start()`.

Frames come in batches of up to MAX_BATCH, as soon as the audio their windows need (plus LOOKAHEAD features)
has come: a GPU that keeps up renders a couple of frames at a time, one that falls behind catches up in larger
batches. An error while rendering is reported once through `outputs.on_error`: AvatarError("closed") when
inference failed (CUDA out of memory says so, with the numbers torch gives), "garbage" when a frame came back
of the wrong size; the service then stops and restarts the provider.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from services.avatar.providers.base import (
    AvatarError,
    AvatarProvider,
    Face,
    Outputs,
    Settings,
    Unavailable,
    avatar_provider,
)

__all__ = ["MuseTalkProvider", "Plan", "Turn", "face_detectors", "fit_image", "frames_covered",
           "frames_for_samples", "gather_windows", "load_model", "oval_mask", "probe", "window_start"]

log = logging.getLogger("edgeroom.avatar.musetalk")

Rgb = npt.NDArray[np.uint8]
Box = tuple[int, int, int, int]          # x1, y1, x2, y2 in the fitted picture, x2 and y2 exclusive

RATE = 16000                             # what whisper's feature extractor takes
FEATURE_RATE = 50                        # whisper encoder outputs per second (1500 for its 30 s input)
SAMPLES_PER_FEATURE = RATE // FEATURE_RATE
PAD_LEFT = PAD_RIGHT = 2                 # realtime_inference.py's audio_padding_length_left / _right
WINDOW = 2 * (PAD_LEFT + PAD_RIGHT + 1)  # features per frame (get_whisper_chunk)
LOOKAHEAD = 3                            # real features wanted past a window before it is encoded mid-turn
CONTEXT = 10 * FEATURE_RATE              # features of the turn before a batch encoded with it
MAX_SEGMENT = 30 * FEATURE_RATE          # whisper's input is 30 s
MIN_BATCH, MAX_BATCH = 2, 16             # frames per UNet forward (the last of a turn may be fewer)
CROP = 256                               # MuseTalk's face crop, in and out of the VAE

# The checkout and weights (download_weights.sh); alternatives in one tuple: either will do.
REQUIRED: tuple[tuple[str, ...], ...] = (
    ("musetalk/utils/utils.py",),
    ("models/musetalkV15/unet.pth",),
    ("models/musetalkV15/musetalk.json",),
    ("models/sd-vae/config.json",),
    ("models/sd-vae/diffusion_pytorch_model.bin", "models/sd-vae/diffusion_pytorch_model.safetensors"),
    ("models/whisper/config.json",),
    ("models/whisper/preprocessor_config.json",),
    ("models/whisper/pytorch_model.bin", "models/whisper/model.safetensors"),
)
MODULES = ("musetalk.utils.utils", "musetalk.utils.audio_processor", "musetalk.utils.blending", "transformers")
PARSER_FILES = ("models/face-parse-bisent/resnet18-5c106cde.pth", "models/face-parse-bisent/79999_iter.pth")
S3FD_FILE = "musetalk/utils/face_detection/detection/sfd/s3fd.pth"
S3FD_CACHED = "checkpoints/s3fd-619a316812.pth"   # where torch.hub keeps it once downloaded
HAAR_FILE = "haarcascade_frontalface_default.xml"
CHEEK_WIDTH = 90                         # realtime_inference.py's left/right_cheek_width for v1.5
# The Haar box runs from mid-forehead to below the lips; MuseTalk's landmark box has the nose bridge in its
# middle and the chin (plus v1.5's extra_margin) at its bottom: from the top of the Haar box to 1.1 of its height.
HAAR_BOTTOM = 1.1
S3FD_MARGIN = 0.05                       # S3FD's box ends at the chin: v1.5's extra margin, of the box height


# ---------------------------------------------------------------------------------------------------------
# Can it run?

def probe(model_dir: str) -> str | None:
    """None when MuseTalk can run from `model_dir` on this box, else why not (the first reason found)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (MuseTalk needs PyTorch with CUDA, then the checkout's requirements.txt)"
    if not torch.cuda.is_available():
        return f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False)"
    if not model_dir:
        return "set model_dir to a MuseTalk v1.5 checkout"
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        return f"model_dir {root} is not a directory: set it to a MuseTalk v1.5 checkout"
    missing = missing_files(root)
    if missing:
        return f"missing in {root}: {', '.join(missing)} (MuseTalk's download_weights.sh fetches the weights)"
    why = import_problem(root)
    if why is None and not face_detectors(root, torch):
        import cv2

        why = (f"no face detector: the checkout's S3FD weights are neither at {S3FD_FILE} nor in torch's hub cache "
               f"({S3FD_CACHED.split('/')[-1]}), and OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 moved "
               "them out; MuseTalk's requirements pin 4.x)")
    return why


def missing_files(root: Path) -> list[str]:
    """The files of REQUIRED not in `root` (an empty file counts as missing: a download that failed)."""
    def there(rel: str) -> bool:
        path = root / rel
        return path.is_file() and path.stat().st_size > 0
    return [" or ".join(alternatives) for alternatives in REQUIRED if not any(map(there, alternatives))]


def import_problem(root: Path) -> str | None:
    """Make the checkout's `musetalk` importable (appended to sys.path: its scripts/ must not shadow ours)."""
    checkout = str(root.resolve())
    added = checkout not in sys.path
    if added:
        sys.path.append(checkout)
    importlib.invalidate_caches()
    try:
        for name in MODULES:
            importlib.import_module(name)
        where = Path(sys.modules["musetalk.utils.utils"].__file__ or "").resolve()
        if not where.is_relative_to(checkout):
            raise ImportError(f"another musetalk package is already imported, from {where.parent.parent.parent}")
        if not hasattr(sys.modules["musetalk.utils.utils"], "load_all_model"):
            raise ImportError("musetalk.utils.utils has no load_all_model (not a MuseTalk v1.5 checkout)")
    except Exception as exc:        # ImportError, and whatever a module raises while it imports
        if added:
            sys.path.remove(checkout)
        _forget_musetalk(checkout)
        return f"the musetalk package does not import from {root}: {_first_line(exc)}"
    return None


def face_detectors(root: Path, torch: Any) -> list[str]:
    """The face detectors that can run here, best first: the checkout's S3FD when its weights are on disk (it
    would download them otherwise), OpenCV's Haar cascade when this OpenCV has it (OpenCV 5 has not)."""
    found = []
    if (root / S3FD_FILE).is_file() or (Path(torch.hub.get_dir()) / S3FD_CACHED).is_file():
        found.append("s3fd")
    if _haar_file() is not None:
        found.append("haar")
    return found


def _haar_file() -> str | None:
    try:
        import cv2
    except ImportError:
        return None
    path = Path(getattr(getattr(cv2, "data", None), "haarcascades", "") or "/nonexistent") / HAAR_FILE
    return str(path) if hasattr(cv2, "CascadeClassifier") and path.is_file() else None


def _forget_musetalk(checkout: str) -> None:
    """Drop what a failed import left of the checkout's modules, so the next probe tries again."""
    def ours(module: Any) -> bool:
        paths = [getattr(module, "__file__", None) or "", *list(getattr(module, "__path__", []))]
        return any(p.startswith(checkout) for p in paths)
    doomed = [n for n, m in sys.modules.items() if (n == "musetalk" or n.startswith("musetalk.")) and ours(m)]
    for name in doomed:     # decided before any goes: a namespace package's __path__ looks its parent up
        del sys.modules[name]


# ---------------------------------------------------------------------------------------------------------
# Audio to frames: pure numpy (the CPU tests drive these)

def exact_fps(fps: float) -> Fraction:
    """The frame rate as a fraction: 25 -> 25, 29.97 -> 2997/100, 30000/1001 stays 30000/1001."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return Fraction(fps).limit_denominator(10_000)


def frames_for_samples(samples: int, rate: int, fps: Fraction, *, final: bool = False) -> int:
    """Frames of `samples` at `rate`: whole frames only, or (final) the last partial one padded to a whole."""
    n = Fraction(samples) * fps / rate
    return math.ceil(n) if final else math.floor(n)


def window_start(frame: int, fps: Fraction) -> int:
    """The first feature of frame `frame`'s window, in the turn's features (negative: before the turn).

    get_whisper_chunk pads the features with 2 * ceil(50 / fps) zeros in front and takes 10 from
    floor(frame * 50 / fps) of the padded ones: frame i's window starts that many before i * 50 / fps.
    """
    return math.floor(frame * FEATURE_RATE / fps) - PAD_LEFT * math.ceil(FEATURE_RATE / fps)


def frames_covered(features: int, fps: Fraction) -> int:
    """How many frames from the turn's first have their window and LOOKAHEAD more inside `features`."""
    k = features - WINDOW - LOOKAHEAD + PAD_LEFT * math.ceil(FEATURE_RATE / fps)   # floor(i * 50 / fps) <= k
    return 0 if k < 0 else math.ceil((k + 1) * fps / FEATURE_RATE)


def gather_windows(features: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(T, layers, d) features and (n, WINDOW) indices (-1: a zero feature) -> (n, WINDOW * layers, d).

    What get_whisper_chunk returns for those frames ('b c h w -> b (c h) w'); the GPU path does the same
    with torch.
    """
    table = np.concatenate([np.zeros((1, *features.shape[1:]), features.dtype), features])
    windows: np.ndarray = table[idx + 1]
    return windows.reshape(len(idx), -1, features.shape[-1])


@dataclass(frozen=True)
class Plan:
    """One batch to render: frames [first, first + count) of a turn."""
    first: int
    count: int
    audio: npt.NDArray[np.float32]     # 16 kHz, from feature `segment` of the turn: what whisper encodes
    segment: int
    idx: npt.NDArray[np.int64]         # (count, WINDOW): each frame's features in the segment's, -1 for zeros


class Turn:
    """One turn's audio at 16 kHz and the frames planned of it so far.

    `fed` counts the samples fed at the service's rate: the pairing's clock, which decides how many frames
    the turn has. The 16 kHz audio decides when a frame's window can be encoded: mid-turn once the window
    and LOOKAHEAD features more have come; after `finish()`, all of them, the features past the audio zeros
    (MuseTalk trims its features to floor(samples / 320) and pads with zeros).
    """

    def __init__(self, fps: Fraction, rate: int) -> None:
        self.fps, self.rate = fps, rate
        self.fed = 0                     # samples at `rate`
        self.received = 0                # samples at 16 kHz
        self.head = 0                    # the 16 kHz index of the buffer's first sample
        self.made = 0                    # frames planned
        self.final = False
        self._buf = np.zeros(0, np.float32)
        self._chunks: list[npt.NDArray[np.float32]] = []

    def add(self, audio: npt.NDArray[np.float32], fed: int) -> None:
        if self.final:
            raise RuntimeError("this turn has ended")
        if len(audio):
            self._chunks.append(audio)
            self.received += len(audio)
        self.fed += fed

    def finish(self, tail: npt.NDArray[np.float32] | None = None) -> None:
        if tail is not None:
            self.add(tail, 0)
        self.final = True

    @property
    def total(self) -> int | None:
        """The turn's frames, once it has ended."""
        return frames_for_samples(self.fed, self.rate, self.fps, final=True) if self.final else None

    @property
    def ready(self) -> int:
        """Frames that can be planned now (those made included)."""
        if self.final:
            return frames_for_samples(self.fed, self.rate, self.fps, final=True)
        return min(frames_for_samples(self.fed, self.rate, self.fps),
                   frames_covered(self.received // SAMPLES_PER_FEATURE, self.fps))

    @property
    def done(self) -> bool:
        return self.final and self.made >= (self.total or 0)

    def plan(self, min_batch: int = MIN_BATCH, max_batch: int = MAX_BATCH) -> Plan | None:
        """The next batch (and it counts as made), or None until enough audio has come."""
        n = min(self.ready - self.made, max_batch)
        if n <= 0 or (n < min_batch and not self.final):
            return None
        first = self.made
        starts = np.array([window_start(i, self.fps) for i in range(first, first + n)], np.int64)
        end = min(self.received // SAMPLES_PER_FEATURE, int(starts[-1]) + WINDOW + LOOKAHEAD)
        begin = max(0, int(starts[0]) - CONTEXT, end - MAX_SEGMENT)
        end = max(begin, end)
        audio = self._samples(begin * SAMPLES_PER_FEATURE, end * SAMPLES_PER_FEATURE)
        j = starts[:, None] + np.arange(WINDOW)
        idx = np.where((j >= begin) & (j < end), j - begin, -1)
        self.made += n
        self._trim()
        return Plan(first, n, audio, begin, idx)

    def _samples(self, start: int, stop: int) -> npt.NDArray[np.float32]:
        if self._chunks:
            self._buf = np.concatenate([self._buf, *self._chunks])
            self._chunks.clear()
        return self._buf[start - self.head:stop - self.head].copy()

    def _trim(self) -> None:
        """Keep only what later batches can still encode (their windows and CONTEXT before them)."""
        keep = max(0, window_start(self.made, self.fps) - CONTEXT) * SAMPLES_PER_FEATURE
        if keep > self.head:
            self._samples(0, 0)     # fold the chunks in
            self._buf = self._buf[keep - self.head:]
            self.head = keep


class To16k:
    """int16 mono at `rate` -> float32 in [-1, 1) at 16 kHz, streamed (swresample through PyAV; none at 16k)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._resampler: Any = None
        if rate != RATE:
            try:
                import av
            except ImportError as exc:
                raise Unavailable(f"musetalk: audio at {rate} Hz must be resampled to 16 kHz, and PyAV is not "
                                  "installed (the media extra), or set sample_rate to 16000") from exc
            self._av = av

    def __call__(self, pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
        if self.rate == RATE:
            return pcm.astype(np.float32) / 32768.0
        if self._resampler is None:
            self._resampler = self._av.AudioResampler(format="s16", layout="mono", rate=RATE)
        frame = self._av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> npt.NDArray[np.float32]:
        """What the filter still holds (the end of a turn); the next chunk starts a new stream."""
        resampler, self._resampler = self._resampler, None
        return self._collect(resampler.resample(None)) if resampler is not None else np.zeros(0, np.float32)

    @staticmethod
    def _collect(frames: Sequence[Any]) -> npt.NDArray[np.float32]:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts).astype(np.float32) / 32768.0 if parts else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------------------
# The picture: fitting, the face box, the mask, blending (numpy and OpenCV)

def fit_image(bgr: np.ndarray, width: int, height: int) -> np.ndarray:
    """The picture scaled to fit width x height, aspect kept, centred on black."""
    import cv2

    h, w = bgr.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    inter = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    out = np.zeros((height, width, 3), np.uint8)
    x, y = (width - nw) // 2, (height - nh) // 2
    out[y:y + nh, x:x + nw] = cv2.resize(bgr, (nw, nh), interpolation=inter)
    return out


def clamp_box(box: tuple[float, float, float, float], shape: tuple[int, ...]) -> Box:
    h, w = shape[:2]
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    return x1, y1, min(w, int(round(box[2]))), min(h, int(round(box[3])))


def haar_box(gray: np.ndarray) -> Box | None:
    """The largest frontal face OpenCV's Haar cascade finds, as MuseTalk's crop (see HAAR_BOTTOM)."""
    import cv2

    path = _haar_file()
    if path is None:
        return None
    cascade = cv2.CascadeClassifier(path)
    side = max(32, min(gray.shape[:2]) // 10)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: int(f[2]) * int(f[3]))
    return clamp_box((x, y, x + w, y + h * HAAR_BOTTOM), gray.shape)


def oval_mask(h: int, w: int) -> npt.NDArray[np.float32]:
    """A (h, w, 1) blend mask in [0, 1] without the face parser: the oval of the face box, its lower half only
    (MuseTalk keeps upper_boundary_ratio 0.5 of the expanded box, whose middle is the face box's), blurred by
    MuseTalk's kernel (a tenth of the expanded box)."""
    import cv2

    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (w // 2, h // 2), (max(1, w // 2), max(1, h // 2)), 0, 0, 360, 255, -1)
    m[:h // 2] = 0
    side = 2 * int(max(w, h) // 2 * 1.5)
    k = int(0.1 * side // 2 * 2) + 1
    return (cv2.GaussianBlur(m, (k, k), 0).astype(np.float32) / 255.0)[..., None]


def mask_in_box(mask: np.ndarray, crop_box: Sequence[int], box: Box) -> npt.NDArray[np.float32]:
    """get_image_prepare_material's mask (over the expanded crop box) cut to the face box, as (h, w, 1) floats:
    outside the face box MuseTalk's blend leaves the picture as it is."""
    x1, y1, x2, y2 = box
    xs, ys = int(crop_box[0]), int(crop_box[1])
    return (mask[y1 - ys:y2 - ys, x1 - xs:x2 - xs].astype(np.float32) / 255.0)[..., None]


def blend(reference: Rgb, faces: np.ndarray, box: Box, mask: npt.NDArray[np.float32]) -> list[Rgb]:
    """Each (256, 256, 3) face resized into `box` of the reference and mixed by `mask`: one frame per face."""
    import cv2

    x1, y1, x2, y2 = box
    resized = np.stack([cv2.resize(f, (x2 - x1, y2 - y1)) for f in faces]).astype(np.float32)
    region = reference[y1:y2, x1:x2].astype(np.float32)
    mixed = region + (resized - region) * mask
    out = np.repeat(reference[None], len(faces), axis=0)
    out[:, y1:y2, x1:x2] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return list(out)


def decode_image(data: bytes) -> np.ndarray:
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if bgr is None:
        raise Unavailable(f"musetalk: the face image ({len(data)} bytes) is not a picture OpenCV decodes "
                          "(JPEG or PNG)")
    return bgr


# ---------------------------------------------------------------------------------------------------------
# The models (the worker thread only)

class Model(Protocol):
    idle: Rgb

    def render(self, plan: Plan) -> list[Rgb]: ...

    def close(self) -> None: ...

    def facts(self) -> dict[str, Any]: ...


def load_model(root: Path, face: Face) -> Model:
    """The models on the GPU and the face prepared; slow (seconds): run it on the worker thread."""
    return MuseTalk(root, face)


class MuseTalk:
    """MuseTalk v1.5's models, fp16 on CUDA, and one prepared face: `render(plan)` -> RGB frames."""

    def __init__(self, root: Path, face: Face) -> None:
        import torch

        self.torch, self.root, self.device = torch, root, torch.device("cuda")
        try:        # the models are only ever held by self: a failed start lets go of the GPU's memory
            self._load(root / "models")
            self._prepare(face)
            self.render(Plan(0, MIN_BATCH, np.zeros(RATE, np.float32), 0,
                             np.zeros((MIN_BATCH, WINDOW), np.int64)))    # warm up, and prove the chain works
        except BaseException:
            self.close()
            raise

    def _load(self, models: Path) -> None:
        from musetalk.utils.audio_processor import AudioProcessor
        from musetalk.utils.utils import load_all_model
        from transformers import WhisperModel

        self.vae, self.unet, self.pe = load_all_model(
            unet_model_path=str(models / "musetalkV15" / "unet.pth"),
            vae_type=str(models / "sd-vae"),          # os.path.join("models", an absolute path) is that path
            unet_config=str(models / "musetalkV15" / "musetalk.json"), device=self.device)
        self.pe = self.pe.half().to(self.device)
        self.vae.vae = self.vae.vae.half().to(self.device)
        self.unet.model = self.unet.model.half().to(self.device)
        self.dtype = self.unet.model.dtype
        self.timesteps = self.torch.tensor([0], device=self.device)
        self.extractor = AudioProcessor(feature_extractor_path=str(models / "whisper")).feature_extractor
        self.whisper = WhisperModel.from_pretrained(str(models / "whisper")).to(self.device, self.dtype).eval()
        self.whisper.requires_grad_(False)
        cfg = self.whisper.config
        self.layers, self.width = cfg.encoder_layers + 1, cfg.d_model
        self._fe_device = "device" in inspect.signature(self.extractor.__call__).parameters
        self.gpu = self.torch.cuda.get_device_name(self.device)

    # --- the face, once ---
    def _prepare(self, face: Face) -> None:
        import cv2

        self.bgr = fit_image(decode_image(face.image), face.width, face.height)
        self.idle = np.ascontiguousarray(self.bgr[..., ::-1])
        box, self.detector = self._find_face()
        if box is None or box[2] - box[0] < 16 or box[3] - box[1] < 16:
            raise Unavailable(f"musetalk: no face found in the face image ({face.width}x{face.height}) by "
                              f"{self.detector}: use a frontal portrait")
        self.box = box
        x1, y1, x2, y2 = box
        crop = cv2.resize(self.bgr[y1:y2, x1:x2], (CROP, CROP), interpolation=cv2.INTER_LANCZOS4)
        with self.torch.inference_mode():
            self.latents = self.vae.get_latents_for_unet(crop).to(self.device, self.dtype)   # (1, 8, 32, 32)
        self.mask, self.blend_mode = self._mask()
        log.info("musetalk: face %s by %s, blend %s, on %s", box, self.detector, self.blend_mode, self.gpu)

    def _find_face(self) -> tuple[Box | None, str]:
        import cv2

        detectors = face_detectors(self.root, self.torch)
        if "s3fd" in detectors:
            try:
                return self._s3fd_box(), "s3fd"
            except Exception as exc:
                if "haar" not in detectors:
                    raise
                log.warning("musetalk: the checkout's S3FD face detector failed (%s): Haar cascade instead",
                            _first_line(exc))
        return haar_box(cv2.cvtColor(self.bgr, cv2.COLOR_BGR2GRAY)), "haar"

    def _s3fd_box(self) -> Box | None:
        from musetalk.utils.face_detection import FaceAlignment, LandmarksType

        cudnn = self.torch.backends.cudnn
        benchmark = cudnn.benchmark     # FaceAlignment turns it on for the whole process: put back
        try:
            found = FaceAlignment(LandmarksType._2D, flip_input=False, device="cuda").get_detections_for_batch(
                np.asarray([self.bgr]))[0]
        finally:
            cudnn.benchmark = benchmark
        if found is None:
            return None
        x1, y1, x2, y2 = found
        return clamp_box((x1, y1, x2, y2 + (y2 - y1) * S3FD_MARGIN), self.bgr.shape)

    def _mask(self) -> tuple[npt.NDArray[np.float32], str]:
        x1, y1, x2, y2 = self.box
        if all((self.root / f).is_file() for f in PARSER_FILES):
            try:
                from musetalk.utils.blending import get_image_prepare_material

                mask, crop_box = get_image_prepare_material(self.bgr, list(self.box), fp=self._parser(),
                                                            mode="jaw")
                return mask_in_box(np.asarray(mask), crop_box, self.box), "face-parsing"
            except Exception as exc:
                log.warning("musetalk: face parsing failed (%s): an oval mask instead", _first_line(exc))
        return oval_mask(y2 - y1, x2 - x1), "oval"

    def _parser(self) -> Any:
        from musetalk.utils.face_parsing import FaceParsing

        resnet, bisenet = (str(self.root / f) for f in PARSER_FILES)

        class Parser(FaceParsing):      # type: ignore[misc]  # its weights by absolute path: no chdir
            def model_init(self, resnet_path: str = resnet, model_pth: str = bisenet) -> Any:
                return super().model_init(resnet_path, model_pth)

        return Parser(left_cheek_width=CHEEK_WIDTH, right_cheek_width=CHEEK_WIDTH)

    # --- per batch ---
    def render(self, plan: Plan) -> list[Rgb]:
        with self.torch.inference_mode():
            feats = self._features(plan.audio)
            table = self.torch.cat([feats.new_zeros((1, *feats.shape[1:])), feats])
            windows = table[self.torch.as_tensor(plan.idx + 1, device=self.device)]
            prompts = windows.reshape(plan.count, -1, self.width)            # (n, 50, 384)
            latents = self.latents.repeat(plan.count, 1, 1, 1)
            pred = self.unet.model(latents, self.timesteps, encoder_hidden_states=self.pe(prompts)).sample
            faces = self.vae.decode_latents(pred.to(self.vae.vae.dtype))     # (n, 256, 256, 3) BGR uint8
        return blend(self.idle, np.ascontiguousarray(faces[..., ::-1]), self.box, self.mask)

    def _features(self, audio: npt.NDArray[np.float32]) -> Any:
        """Whisper's hidden states of the segment: (floor(samples / 320), layers, 384)."""
        n = len(audio) // SAMPLES_PER_FEATURE
        if n == 0:
            return self.torch.zeros((0, self.layers, self.width), device=self.device, dtype=self.dtype)
        extra = {"device": "cuda"} if self._fe_device else {}
        mel = self.extractor(audio, return_tensors="pt", sampling_rate=RATE, **extra).input_features
        hidden = self.whisper.encoder(mel.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        return self.torch.stack(hidden, dim=2)[0, :n]

    def close(self) -> None:
        for name in ("vae", "unet", "pe", "whisper", "latents", "timesteps"):
            self.__dict__.pop(name, None)
        self.torch.cuda.empty_cache()

    def facts(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "detector": self.detector, "blend": self.blend_mode, "box": list(self.box)}


# ---------------------------------------------------------------------------------------------------------
# The provider

@avatar_provider("musetalk", "MuseTalk v1.5 on a local NVIDIA GPU (a checkout and its weights)")
class MuseTalkProvider(AvatarProvider):
    paired = True
    default_rate = RATE

    def __init__(self, settings: Settings, outputs: Outputs) -> None:
        super().__init__(settings, outputs)
        self._executor: ThreadPoolExecutor | None = None
        self._model: Model | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._turns: deque[Turn] = deque()
        self._to16k: To16k | None = None
        self._fps = Fraction(0)
        self._size = (0, 0)
        self._failed: AvatarError | None = None
        self.frames = self.batches = self.turns = self.dropped = 0
        self.render_s = 0.0

    async def start(self, face: Face) -> float:
        if self._executor is not None:
            raise AvatarError("refused", "musetalk: already started")
        if face.width < 32 or face.height < 32 or not face.fps > 0:
            raise Unavailable(f"musetalk: a face of {face.width}x{face.height} at {face.fps} fps cannot be rendered "
                              "(32x32 at least, fps above 0)")
        self._fps = exact_fps(face.fps)
        self._size = (face.width, face.height)
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="musetalk")
        try:
            why = await loop.run_in_executor(self._executor, probe, self.settings.model_dir)
            if why:
                raise Unavailable(f"musetalk: {why}")
            self._to16k = To16k(self.sample_rate)
            root = Path(self.settings.model_dir).expanduser()
            try:
                self._model = await loop.run_in_executor(self._executor, load_model, root, face)
            except AvatarError:
                raise
            except Exception as exc:
                raise _load_error(exc, root) from exc
        except BaseException:
            await self.stop()
            raise
        self._failed = None
        self._wake = asyncio.Event()
        self._turns = deque([Turn(self._fps, self.sample_rate)])
        self._task = asyncio.create_task(self._drain(), name="musetalk-frames")
        log.info("musetalk: started %dx%d at %s fps, audio at %d Hz: %s", face.width, face.height, face.fps,
                 self.sample_rate, self._model.facts())
        return face.fps

    async def idle_frame(self) -> Rgb:
        if self._model is None:
            raise AvatarError("closed", "musetalk: not started")
        return self._model.idle.copy()

    def feed(self, pcm: npt.NDArray[np.int16]) -> None:
        if self._wake is None or self._to16k is None or self._failed is not None:   # not started, or failed
            self.dropped += len(pcm)
            return
        mono = np.asarray(pcm)
        if mono.ndim == 2 and mono.shape[1] == 1:
            mono = mono[:, 0]
        if mono.ndim != 1 or mono.dtype != np.int16:
            raise ValueError(f"musetalk: feed() takes int16 mono audio, got {mono.dtype} {mono.shape}")
        self._turns[-1].add(self._to16k(mono), len(mono))
        self._wake.set()

    def end_turn(self) -> None:
        if self._wake is None or self._to16k is None or self._failed is not None:
            return
        self._turns[-1].finish(self._to16k.flush())
        self._turns.append(Turn(self._fps, self.sample_rate))
        self.turns += 1
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        model, self._model = self._model, None
        executor, self._executor = self._executor, None
        if executor is not None:
            if model is not None:       # after a batch in flight, on the thread that owns the CUDA tensors
                with contextlib.suppress(Exception):
                    await asyncio.get_running_loop().run_in_executor(executor, model.close)
            executor.shutdown(wait=False)
        self._turns.clear()
        self._to16k = self._wake = None

    def status(self) -> dict[str, Any]:
        behind = sum(t.ready - t.made for t in self._turns)
        facts = self._model.facts() if self._model is not None else {}
        return {"model_dir": self.settings.model_dir, "sample_rate": self.sample_rate, "fps": float(self._fps),
                "frames": self.frames, "batches": self.batches, "turns": self.turns, "behind_frames": behind,
                "ms_per_frame": round(1000 * self.render_s / self.frames, 1) if self.frames else None,
                "dropped_samples": self.dropped, "error": str(self._failed) if self._failed else None, **facts}

    # --- the loop's side of the worker ---
    def _next_plan(self) -> Plan | None:
        while self._turns:
            turn = self._turns[0]
            plan = turn.plan()
            if plan is not None:
                return plan
            if not (turn.done and len(self._turns) > 1):
                return None
            self._turns.popleft()
        return None

    async def _drain(self) -> None:
        loop, wake = asyncio.get_running_loop(), self._wake
        assert wake is not None
        while True:
            plan = self._next_plan()
            if plan is None:
                wake.clear()
                await wake.wait()
                continue
            model = self._model
            assert model is not None and self._executor is not None
            t0 = time.perf_counter()
            try:
                frames = await loop.run_in_executor(self._executor, model.render, plan)
            except Exception as exc:
                return self._fail(_render_error(exc, plan))
            self.render_s += time.perf_counter() - t0
            if len(frames) != plan.count or any(f.shape != (self._size[1], self._size[0], 3)
                                                or f.dtype != np.uint8 for f in frames):
                shapes = sorted({f"{f.dtype}{tuple(f.shape)}" for f in frames})
                return self._fail(AvatarError("garbage", f"musetalk: {len(frames)} frame(s) of {', '.join(shapes)} "
                                              f"for {plan.count} of {self._size[0]}x{self._size[1]}"))
            self.batches += 1
            self.frames += len(frames)
            for frame in frames:
                self.outputs.on_frame(frame)

    def _fail(self, err: AvatarError) -> None:
        if self._failed is None:
            self._failed = err
            log.warning("%s", err)
            self.outputs.on_error(err)


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def _render_error(exc: BaseException, plan: Plan) -> AvatarError:
    if _is_oom(exc):
        return AvatarError("closed", f"musetalk: CUDA out of memory rendering {plan.count} frame(s): "
                                     f"{_first_line(exc)} (another process holds the GPU, or the face is too large)")
    return AvatarError("closed", f"musetalk: inference failed at frame {plan.first} of the turn: "
                                 f"{type(exc).__name__}: {_first_line(exc)}")


def _load_error(exc: BaseException, root: Path) -> AvatarError:
    if _is_oom(exc):     # another process may let go of the GPU: worth a retry
        return AvatarError("down", f"musetalk: CUDA out of memory loading the models of {root}: {_first_line(exc)}")
    return Unavailable(f"musetalk: loading the models of {root} failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
