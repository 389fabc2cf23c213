"""What the vision parts hand each other: a detection, and what a vision model said.

Plain dataclasses, JSON-able through `to_dict()`, so they travel as event payloads
(ON_VIDEO_DETECTION, ON_VISION_RESULT) without a second schema.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Box", "Detection", "Face", "VisionResult"]

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels of the picture the detector was given


@dataclass(frozen=True)
class Detection:
    label: str
    confidence: float
    box: Box
    class_id: int = -1

    def to_dict(self) -> dict:
        return {"label": self.label, "confidence": round(self.confidence, 4), "box": list(self.box),
                "class_id": self.class_id}


@dataclass(frozen=True)
class Face:
    box: Box | None = None          # pixels, when the model gives one
    description: str = ""            # e.g. "smiling man with glasses"
    confidence: float | None = None


@dataclass
class VisionResult:
    """What a vision model says about one picture (RoomKit's VisionResult, complete)."""
    description: str = ""
    labels: list[str] = field(default_factory=list)
    confidence: float | None = None
    faces: list[Face] = field(default_factory=list)
    text: str = ""                   # OCR: the text visible in the picture
    data: dict[str, Any] | None = None  # the structured answer when a JSON response schema was asked for
    metadata: dict[str, Any] = field(default_factory=dict)  # provider, model, tokens_in/out, latency_ms, ...

    def to_dict(self) -> dict:
        return asdict(self)
