"""The recorder's entry in the catalog, and its part of the config: [recorder]."""
from __future__ import annotations

import re
from dataclasses import dataclass

from services.catalog import ServiceSpec, register
from services.runtime.schema import LIVE, RESTART, SCHEMA, Section, parse_list, setting

__all__ = ["TARGET", "RecorderConfig"]

# a recording target: a stream name, or room:NAME
TARGET = re.compile(r"room:[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}|[a-z0-9][a-z0-9_-]{0,63}")


def _check_targets(text: str) -> None:
    for target in parse_list(text):
        if not TARGET.fullmatch(target):
            raise ValueError(f"expected stream names or room:NAME separated by commas, got {target!r}")


@dataclass(frozen=True)
class RecorderConfig:
    dir: str = setting("", "Directory of the recordings; '' is $STATE_DIRECTORY/recordings, else "
                       "<runtime dir>/recordings.", RESTART)
    record: str = setting("", "What to record from the start: comma-separated targets, each a stream name "
                          "(NAME, NAME-raw, NAME-audio) or room:NAME; '' is none (start by command).", LIVE,
                          off="", check=_check_targets)
    segment_seconds: float = setting(300.0, "Length of a segment file; a new one begins at the next keyframe "
                                     "after this many seconds.", LIVE, min=1, max=86400)
    fragment_seconds: float = setting(0.5, "Longest MP4 fragment, and how often a WAV is written and fsynced, in "
                                      "seconds: at most this much (plus a few frames: a remuxed stream's last 8 "
                                      "access units wait to be put in order) is lost when the box dies.", LIVE,
                                      min=0.1, max=1.0)
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
    resume: bool = setting(True, "A restarted recorder takes up each target where its last file ends, from the "
                           "ring's history (nothing lost, nothing twice, the same segment continued); false: at "
                           "the live edge, in a new segment.", LIVE)


def _writes(config) -> str:
    return str(config.recorder.dir)


register(ServiceSpec(
    "recorder", "services.recorder.service:Recorder", "records streams and rooms as crash-safe fragmented MP4",
    order=4, network="none", devices=("gpu",), commands=("record",), writes=_writes, docs="recorder.md"))

SCHEMA.add(Section("recorder", RecorderConfig, "The recorder service.", owner="recorder"))
