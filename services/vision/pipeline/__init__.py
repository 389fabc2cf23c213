"""The per-stream picture pipeline of the vision service (docs/vision-pipeline.md).

Bus picture -> (resize, in its own format) -> BGR working picture -> transforms ->
censor -> watermark -> output format, each stage on reusable buffers.
"""
from __future__ import annotations

from .censor import MODES, SCOPES, Censor
from .chain import STAGES, Pipeline
from .picture import FORMATS, FromBGR, PictureError, ToBGR, parse_colour
from .resize import Resizer
from .transforms import TRANSFORMS, Transform, TransformError, make_transform, make_transforms
from .watermark import PLACEHOLDERS, POSITIONS, Watermark

__all__ = [
    "FORMATS", "MODES", "PLACEHOLDERS", "POSITIONS", "SCOPES", "STAGES", "TRANSFORMS",
    "Censor", "FromBGR", "PictureError", "Pipeline", "Resizer", "ToBGR", "Transform",
    "TransformError", "Watermark", "make_transform", "make_transforms", "parse_colour",
]
