"""Encode's entry in the catalog and its part of the config: [encoders.NAME], one encode@NAME each.

An encoder reads a stream of raw pictures (a decoded source's NAME-raw, a raw camera's NAME,
a vision pipeline's NAME-vision) and puts H.264 or VP8 access units on the bus stream NAME,
the encoder's own name: what a call transport sends to a peer that needs them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.catalog import ServiceSpec, register
from services.runtime import streams
from services.runtime.schema import RESTART, SCHEMA, Problem, Table, setting

__all__ = ["CODECS", "ENCODER_NAME_PATTERN", "EncoderConfig"]

ENCODER_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
STREAM_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9_-]{0,63})?$"
CODECS = ("h264", "vp8")


@dataclass(frozen=True)
class EncoderConfig:
    input: str = setting("", "The stream of raw pictures to encode: a decoded source's NAME-raw, a raw camera's "
                         "NAME, a vision pipeline's NAME-vision. Required.", RESTART, pattern=STREAM_PATTERN)
    codec: str = setting("h264", "h264 (constrained baseline, no B-frames, SPS/PPS before every IDR) or vp8.",
                         RESTART, choices=CODECS)
    bitrate: int = setting(2000, "Target bit rate in kbit/s, capped over one second (VBV).", RESTART, min=50,
                           max=100000)
    width: int = setting(0, "Output width in pixels, even; 0 is the input's (or, with height set, keeps the "
                         "input's aspect ratio).", RESTART, off=0, min=16, max=7680, even=True)
    height: int = setting(0, "Output height in pixels, even; 0 is the input's (or, with width set, keeps the "
                          "input's aspect ratio).", RESTART, off=0, min=16, max=4320, even=True)
    fps: float = setting(0.0, "Most pictures per second encoded (the others are skipped); 0 encodes every "
                         "picture at the input's pace.", RESTART, off=0.0, min=1.0, max=240)
    gop: float = setting(2.0, "Seconds between periodic keyframes (keyframe requests force more).", RESTART,
                         min=0.1, max=3600)
    threads: int = setting(1, "Software encoder threads: 1 costs the least CPU per stream (many streams use the "
                           "cores through their own processes); N encodes N slices (x264) or partitions (VP8) of a "
                           "picture at once, for one heavy stream; 0 lets FFmpeg pick (one per core).", RESTART, min=0,
                           max=16)
    slice_bytes: int = setting(0, "H.264: the largest slice in bytes (x264 slice-max-size), so every NAL unit fits "
                               "one RTP packet: what a peer in packetization-mode 0 needs (single NAL units; set "
                               "it at the call's mtu minus 12, 1188 by default). 0: slices as the encoder likes. "
                               "Software (libx264) only: a hardware encoder is not used while it is set.", RESTART,
                               min=0, max=65000)
    hw_encode: str = setting("auto", "auto (NVENC or the Jetson encoder when a real probe encode works, else "
                             "libx264 / libvpx), off (software), or an encoder name like h264_nvenc.", RESTART,
                             pattern=r"^[a-z0-9_]{2,32}$")

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        if not self.input:
            return "input", "is required: the stream of raw pictures to encode (NAME-raw, NAME, NAME-vision)", ()
        if self.slice_bytes and self.codec != "h264":
            return "slice_bytes", f"cuts H.264 slices; {key('codec')} is {self.codec}", ("codec",)
        if self.slice_bytes and 0 < self.slice_bytes < 200:
            return "slice_bytes", "must be 0 or at least 200 bytes", ()
        return None


def _name_rule(name: str) -> str | None:
    if name.endswith(streams.SUFFIXES):
        return (f"an encoder's name is its output stream's, and must not end in {', '.join(streams.SUFFIXES[:-1])} "
                f"or {streams.SUFFIXES[-1]}: those name a source's streams")
    return None


def _instances(config: Any, with_overlay: bool) -> list[str]:
    return list(config.encoders)


register(ServiceSpec(
    "encode", "services.encode.service:Encode", "encodes a stream of raw pictures into H.264 or VP8 on NAME",
    order=4, instances=_instances, network="none", devices=("gpu",), nice=-2, cpu_weight=150, docs="encode.md"))

SCHEMA.add(Table(
    "encoders", EncoderConfig, "Encoders by name: each encodes a stream of raw pictures onto the stream NAME.",
    names=ENCODER_NAME_PATTERN, replaced=True, name_rule=_name_rule, owner="encode"))
