"""Capture's source kinds: one module each in this package, found by `kinds()`.

Adding a kind is adding a module here (services/capture/sources/KIND.py) that declares its
config class and registers its implementation with `@source_kind` (see base.py), plus its
documented keys in config/edgeroom.toml and its page in docs/capture.md; a test checks both.
"""
from __future__ import annotations

from typing import Any

from services.capture.sources.base import (
    KINDS,
    Emit,
    EncodedSourceConfig,
    Source,
    SourceConfig,
    SourceError,
    SourceKind,
    source_kind,
)
from services.runtime.plugins import import_entries

__all__ = ["Emit", "EncodedSourceConfig", "Source", "SourceConfig", "SourceError", "SourceKind", "config_classes",
           "kinds", "open_source", "source_kind"]


def kinds() -> dict[str, SourceKind]:
    """Every source kind, by name, in the order their modules sort."""
    import_entries(__name__, __path__)
    order = ["synthetic", *sorted(k for k in KINDS if k != "synthetic")]  # the default kind first
    return {name: KINDS[name] for name in order if name in KINDS}


def config_classes() -> dict[str, type[SourceConfig]]:
    return {name: kind.config for name, kind in kinds().items()}


def open_source(name: str, cfg: Any) -> Source:
    """The source `cfg` describes, ready to `run` (nothing is opened until then)."""
    kind = kinds().get(cfg.kind)
    if kind is None:
        raise ValueError(f"source {name!r}: unknown kind {cfg.kind!r} (known: {', '.join(kinds())})")
    return kind.factory(cfg)
