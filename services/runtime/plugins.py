"""Finding what the box is made of: every `services.PACKAGE.spec` module, imported once.

A package of `services/` that is a service, or brings config of its own, has a `spec`
module that declares it (its catalog entry, its config parts, its sync hooks) when
imported. Nothing keeps a list of them: `discover()` imports every one there is, in name
order, the first time anybody needs the whole schema or the catalog. A spec module imports
only light modules (no PyAV, OpenCV, ONNX or AI clients), so discovery costs little and
works on a box with only the core installed.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import threading

__all__ = ["discover", "import_entries", "spec_modules"]

_ROOT = "services"
_lock = threading.Lock()
_done = False


def spec_modules() -> list[str]:
    """The names of every spec module under services/, in package name order."""
    root = importlib.import_module(_ROOT)
    found = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda i: i.name):
        # looked up on disk: asking the import system would import every package (the CLI's too)
        if info.ispkg and any(os.path.isfile(os.path.join(p, info.name, "spec.py")) for p in root.__path__):
            found.append(f"{_ROOT}.{info.name}.spec")
    return found


def discover() -> None:
    """Import every spec module once (thread-safe; later calls return at once)."""
    global _done
    if _done:
        return
    with _lock:
        if not _done:  # another thread may have finished while we waited for the lock
            for name in spec_modules():
                importlib.import_module(name)
            _done = True


_imported: set[str] = set()
_entries_lock = threading.RLock()     # apart from discover()'s: a spec module may ask for its registry's entries


def import_entries(package: str, path: list[str], skip: tuple[str, ...] = ("base",)) -> None:
    """Import every module of a registry package (capture's source kinds, the vision and avatar providers) once,
    in name order: each module registers its entry when imported, so nothing keeps a list of them."""
    if package in _imported:
        return
    with _entries_lock:
        if package not in _imported:
            for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
                if info.name not in skip:
                    importlib.import_module(f"{package}.{info.name}")
            _imported.add(package)
