"""The offline vision provider: describes a picture from its pixels, deterministically.

    p = MockProvider(delay=0.0)
    p.describe(jpeg, "anything").description
    # 'a bright mostly red 1280x720 picture (mean brightness 182)'

For the demo (a box with no network still shows vision results) and for tests of what
sits around a provider. Same input, same answer, no network, no model:

* the picture is decoded at a quarter of its size (libjpeg's DCT scaling: cheap), the
  true size read from the JPEG's SOF header;
* brightness is the mean of the grey picture; the dominant colour is the colour name
  most pixels of a 32x32 thumbnail get (by HSV: black/white/grey by value and saturation,
  else by hue; vectorised over the 1024 pixels);
* labels: the dominant colour, dark / dim / bright, and uniform / busy from the
  standard deviation; confidence is the dominant colour's share of the thumbnail.

With a schema, `data` holds the schema's top-level properties this provider knows
(description, labels, confidence, text, faces, width, height, brightness, colour),
None for the others. `delay` (seconds) imitates a slow API; `fail` makes every call
raise ProviderError(fail, ...), to drive error paths without a server.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from services.vision.providers.base import REASONS, ProviderError, ProviderMetrics, provider
from services.vision.types import VisionResult

__all__ = ["MockProvider", "jpeg_size"]

# Colour names by HSV: dark and unsaturated pixels by value, the rest by hue (OpenCV H is 0..179).
_NAMES = ["black", "white", "grey", "red", "orange", "brown", "yellow", "green", "blue", "purple"]
_HUE_EDGES = np.array([8, 20, 35, 85, 130, 170])                    # red|orange|yellow|green|blue|purple|red
_HUE_NAMES = np.array([3, 4, 6, 7, 8, 9, 3])                        # indexes into _NAMES
# The network providers' options, accepted and ignored so one config section can switch kind.
NETWORK_OPTIONS = frozenset({"base_url", "api_key_env", "api_version", "timeout", "retries", "backoff",
                             "backoff_max", "detail", "max_tokens", "temperature", "system_prompt"})
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(jpeg: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF segment: walks the few marker segments, never the data."""
    i = 2
    n = len(jpeg)
    if jpeg[:2] != b"\xff\xd8":
        return None
    while i + 9 <= n:
        if jpeg[i] != 0xFF:
            return None
        marker = jpeg[i + 1]
        if marker == 0xFF:              # fill byte
            i += 1
            continue
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker in _SOF:
            return int.from_bytes(jpeg[i + 7:i + 9], "big"), int.from_bytes(jpeg[i + 5:i + 7], "big")
        i += 2 + length
    return None


def _colour_counts(thumb: np.ndarray) -> np.ndarray:
    """How many pixels of a small BGR picture carry each of _NAMES (vectorised)."""
    import cv2  # the media extra, used where needed
    hsv = cv2.cvtColor(thumb, cv2.COLOR_BGR2HSV).reshape(-1, 3).astype(np.int16)
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    by_hue = _HUE_NAMES[np.searchsorted(_HUE_EDGES, h, side="right")]
    by_hue = np.where((by_hue == 4) & (v < 150), 5, by_hue)             # a dark orange is brown
    names = np.select([v < 50, (s < 50) & (v > 200), s < 50], [0, 1, 2], by_hue)
    return np.bincount(names, minlength=len(_NAMES))


@provider("mock", "offline: describes a picture from its pixels (for tests and demos)")
class MockProvider:
    kind = "mock"

    def __init__(self, *, delay: float = 0.0, fail: str | None = None, model: str = "mock-pixels",
                 metrics: ProviderMetrics | None = None, name: str | None = None, **network_options):
        unknown = set(network_options) - NETWORK_OPTIONS
        if unknown:
            raise TypeError(f"MockProvider got unexpected options: {', '.join(sorted(unknown))}")
        if fail is not None and fail not in REASONS:
            raise ValueError(f"fail must be one of {', '.join(REASONS)}, got {fail!r}")
        self.name = name or self.kind
        self.model = model
        self.delay = float(delay)
        self.fail = fail
        self.metrics = metrics
        self._closed = threading.Event()

    def describe(self, jpeg: bytes, prompt: str, *, schema: dict | None = None) -> VisionResult:
        t0 = time.monotonic()
        try:
            result = self._describe(jpeg, schema)
        except ProviderError as e:
            self._count(e.reason, t0, error=True)
            raise
        self._count("ok", t0)
        result.metadata.update(provider=self.name, model=self.model, tokens_in=0, tokens_out=0,
                               latency_ms=round((time.monotonic() - t0) * 1000, 1), attempts=1,
                               finish_reason="stop", image_bytes=len(jpeg))
        return result

    def configure(self, *, timeout: float | None = None, retries: int | None = None) -> None:
        """No network, nothing to wait for or retry: the reloadable settings do not apply."""

    def close(self) -> None:
        self._closed.set()

    def _describe(self, jpeg: bytes, schema: dict | None) -> VisionResult:
        if self.delay and self._closed.wait(self.delay):
            raise ProviderError("network", f"{self.name}: closed while waiting")
        if self.fail:
            raise ProviderError(self.fail, f"{self.name} model {self.model!r}: configured to fail ({self.fail})")
        size = jpeg_size(jpeg) if jpeg else None
        import cv2  # the media extra, used where needed
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_REDUCED_COLOR_4) if jpeg else None
        if img is None or size is None:
            raise ProviderError("bad_request", f"{self.name}: the image is not a JPEG ({len(jpeg)} bytes)")
        w, h = size
        grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        brightness = float(grey.mean())
        spread = float(grey.std())
        counts = _colour_counts(cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA))
        colour = _NAMES[int(counts.argmax())]
        share = float(counts.max()) / counts.sum()
        tone = "dark" if brightness < 60 else "dim" if brightness < 130 else "bright"
        texture = "uniform" if spread < 12 else "busy"
        description = f"a {tone} mostly {colour} {w}x{h} picture (mean brightness {brightness:.0f})"
        known = {"description": description, "labels": [colour, tone, texture], "confidence": round(share, 3),
                 "text": "", "faces": [], "width": w, "height": h, "brightness": round(brightness, 1),
                 "colour": colour, "color": colour}
        data = None
        if schema is not None:
            props = schema.get("properties") or {}
            data = {k: known.get(k) for k in props}
        return VisionResult(description=description, labels=[colour, tone, texture], confidence=round(share, 3),
                            data=data, metadata={"width": w, "height": h, "brightness": round(brightness, 1)})

    def _count(self, result: str, t0: float, *, error: bool = False) -> None:
        m = self.metrics
        if m is None:
            return
        m.requests.labels(self.name, result).inc()
        m.latency.labels(self.name, result).observe(time.monotonic() - t0)
        if error:
            m.errors.labels(self.name, result).inc()
