"""The names of a source's streams on the bus: one place for the convention every service reads.

    NAME          what capture puts on the bus: encoded access units, or raw pictures
    NAME-raw      the pictures decode@NAME makes from an encoded NAME
    NAME-audio    capture's s16 PCM audio of NAME
    NAME-vision   a vision pipeline's output pictures (publish = true)

A source's name never ends in a suffix (the config refuses it), so `source_of` is exact.
"""
from __future__ import annotations

__all__ = ["AUDIO", "RAW", "SUFFIXES", "VISION", "audio_stream", "raw_stream", "source_of", "vision_stream"]

RAW, AUDIO, VISION = "-raw", "-audio", "-vision"
SUFFIXES = (RAW, AUDIO, VISION)


def raw_stream(name: str) -> str:
    """The stream decode@NAME publishes NAME's pictures on."""
    return name + RAW


def audio_stream(name: str) -> str:
    return name + AUDIO


def vision_stream(name: str) -> str:
    """The stream the vision pipeline NAME publishes its pictures on."""
    return name + VISION


def source_of(stream: str) -> str:
    """The source (or pipeline) a stream belongs to: door-raw -> door; a plain name is its own."""
    for suffix in SUFFIXES:
        if stream.endswith(suffix):
            return stream[: -len(suffix)]
    return stream


def name_rule(name: str) -> str | None:
    """Why `name` cannot name a source (or a pipeline), or None."""
    if name.endswith(SUFFIXES):
        return (f"a source name must not end in {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]}: those name the "
                "streams made from a source (NAME-raw, NAME-audio, NAME-vision)")
    return None
