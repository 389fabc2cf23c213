"""Avatar providers: a voice in, a talking face out (the contract is in base.py).

    p = open_provider("websocket", Settings(url=...), Outputs(on_frame, on_audio, on_error))

A provider is one module of this package that registers its class with
`@avatar_provider(NAME, summary)`; `names()` and `open_provider()` find them all, so
`--provider` and `[avatars.NAME] provider` accept exactly the registered names.
"""
from __future__ import annotations

from services.avatar.providers.base import (
    PROVIDERS,
    REASONS,
    AvatarError,
    AvatarProvider,
    Face,
    Outputs,
    ProviderKind,
    Settings,
    Unavailable,
    avatar_provider,
)
from services.runtime.plugins import import_entries

__all__ = ["REASONS", "AvatarError", "AvatarProvider", "Face", "Outputs", "ProviderKind", "Settings", "Unavailable",
           "avatar_provider", "kinds", "names", "open_provider"]


def kinds() -> dict[str, ProviderKind]:
    """Every provider, by name (the modules of this package, imported once)."""
    import_entries(__name__, __path__)
    return dict(sorted(PROVIDERS.items()))


def names() -> tuple[str, ...]:
    return tuple(kinds())


def open_provider(kind: str, settings: Settings, outputs: Outputs) -> AvatarProvider:
    found = kinds().get(kind)
    if found is None:
        raise ValueError(f"unknown avatar provider {kind!r}: expected one of {', '.join(kinds())}")
    return found.factory(settings, outputs)
