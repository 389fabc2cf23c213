"""AI vision providers: ask a model what one JPEG shows, get a complete `VisionResult` back.

    metrics = ProviderMetrics(registry)
    p = open_provider("openai", model="qwen2.5vl", base_url="http://127.0.0.1:11434/v1",
                      metrics=metrics)                     # or "gemini", "mock"
    result = p.describe(jpeg, "What is happening?")        # blocking: call it on a worker thread
    p.close()

The contract, the answer parser and the retry loop every provider shares are in base.py.
A provider is one module of this package that registers its class with
`@provider(NAME, summary)`; `names()` and `open_provider()` find them all, so `[vision]
provider` accepts exactly the registered names. A provider module imports its client
library (openai, google-genai) when a provider opens, not at import, so the box's config
loads without the ai extra.
"""
from __future__ import annotations

from typing import Any

from services.runtime.plugins import import_entries
from services.vision.providers.base import (
    PROVIDERS,
    REASONS,
    SCHEMA_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    ProviderError,
    ProviderKind,
    ProviderMetrics,
    RetryingProvider,
    VisionProvider,
    parse_answer,
    provider,
)

__all__ = ["REASONS", "SCHEMA_SYSTEM_PROMPT", "SYSTEM_PROMPT", "ProviderError", "ProviderKind", "ProviderMetrics",
           "RetryingProvider", "VisionProvider", "kinds", "names", "open_provider", "parse_answer", "provider"]


def kinds() -> dict[str, ProviderKind]:
    """Every provider, by name (the modules of this package, imported once)."""
    import_entries(__name__, __path__)
    return dict(sorted(PROVIDERS.items()))


def names() -> tuple[str, ...]:
    return tuple(kinds())


def open_provider(kind: str, **kwargs: Any) -> VisionProvider:
    """A provider by name ("openai", "gemini", "mock"); kwargs are its constructor's."""
    found = kinds().get(kind)
    if found is None:
        raise ValueError(f"unknown vision provider {kind!r}: expected one of {', '.join(kinds())}")
    return found.factory(**kwargs)
