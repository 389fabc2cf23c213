"""AI vision providers: ask a model what one JPEG shows, get a complete `VisionResult` back.

    metrics = ProviderMetrics(registry)
    p = open_provider("openai", model="qwen2.5vl", base_url="http://127.0.0.1:11434/v1",
                      metrics=metrics)                     # or "gemini", "mock"
    result = p.describe(jpeg, "What is happening?")        # blocking: call it on a worker thread
    result = p.describe(jpeg, "Count the people.", schema={"type": "object", ...})  # .data
    p.close()

Three providers share one contract (`VisionProvider`): OpenAI-compatible servers (OpenAI,
Ollama, vLLM, LM Studio: `openai_compat.py`, the real `openai` client), Google Gemini
(`gemini.py`, the real `google-genai` client) and an offline `mock.py` that describes a
picture from its pixels.

What this adds over RoomKit's providers (which fill only description and metadata, retry
nothing and turn a refusal into an empty description):

* The whole VisionResult. The system prompt asks for JSON with description, labels,
  confidence, faces and text (OCR); `parse_answer` reads it tolerantly: `<think>` blocks
  and Markdown fences stripped, the outermost {...} found inside chatter, common synonyms
  accepted (caption, tags, objects, bbox, x/y/width/height), and a plain-text answer
  becomes the description. With a JSON response schema the parsed object is `data`, and
  an answer that is not a JSON object is an error (`malformed`), not a description.
* One retry loop for every provider (`RetryingProvider.describe`), so retries, backoff and
  metrics behave the same whatever client sits underneath; the clients' own retries are
  switched off. Retried: timeout, network, server (5xx), rate_limited (429, honouring
  Retry-After up to the backoff cap), with exponential backoff and jitter. Not retried:
  auth (401/403), bad_request (other 4xx), refused, malformed: asking again gets the same.
* Every failure is a `ProviderError(reason, message)`. The reasons are the metric label:
  timeout, server, rate_limited, malformed, refused, auth, bad_request, network. Messages
  name the provider, model and URL and the cause; the API key is never in them (it is
  scrubbed from any server text quoted).
* A refusal (OpenAI `message.refusal` or finish_reason content_filter, Gemini's
  promptFeedback.blockReason or a safety finishReason) is `reason="refused"` with the
  model's own words, never an empty description.
* Metrics (`ProviderMetrics`, registry passed in): requests by provider and final result,
  retries and failed attempts by reason, latency, tokens in and out.

`describe()` is blocking and thread-safe (the clients are); `close()` interrupts a backoff
wait, so a closing service never sleeps out a retry schedule.
"""
from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.vision.types import Face, VisionResult

__all__ = ["PROVIDERS", "REASONS", "SYSTEM_PROMPT", "SCHEMA_SYSTEM_PROMPT", "ProviderError", "ProviderKind",
           "ProviderMetrics", "RetryingProvider", "VisionProvider", "parse_answer", "provider"]

log = logging.getLogger("edgeroom.vision")

REASONS = ("timeout", "server", "rate_limited", "malformed", "refused", "auth", "bad_request", "network")
RETRIED = frozenset({"timeout", "server", "rate_limited", "network"})

SYSTEM_PROMPT = (
    "You are the vision system of a video room. You are given one picture from a camera and a "
    "request. Answer ONLY with one JSON object, no other text, with these keys: "
    '"description" (string: what the picture shows, answering the request), '
    '"labels" (array of short strings: the main objects, people and activities), '
    '"confidence" (number from 0 to 1: how sure you are), '
    '"faces" (array of objects {"box": [x1, y1, x2, y2] in pixels, "description": string, '
    '"confidence": number}; empty when there are no faces), '
    '"text" (string: all readable text in the picture, empty when none).'
)
SCHEMA_SYSTEM_PROMPT = (
    "You are the vision system of a video room. You are given one picture from a camera and a "
    "request. Answer ONLY with one JSON object that matches the response schema, no other text."
)


class ProviderError(Exception):
    """A vision call that failed; `reason` is one of REASONS (the metric label)."""

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown ProviderError reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@runtime_checkable
class VisionProvider(Protocol):
    """What the vision service and IntervalCaller need of a provider."""
    name: str
    model: str

    def describe(self, jpeg: bytes, prompt: str, *, schema: dict | None = None) -> VisionResult: ...

    def configure(self, *, timeout: float | None = None, retries: int | None = None) -> None:
        """Take the reloadable settings (a provider without a network ignores them)."""

    def close(self) -> None: ...


class ProviderMetrics:
    """The providers' metric families, made once per registry and shared by all providers."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.requests = Counter("edgeroom_vision_provider_requests",
                                "describe() calls, by provider and final result (ok or the error reason).",
                                ["provider", "result"], registry=r)
        self.retries = Counter("edgeroom_vision_provider_retries",
                               "Attempts repeated after a retryable failure, by provider and reason.",
                               ["provider", "reason"], registry=r)
        self.errors = Counter("edgeroom_vision_provider_errors",
                              "Failed attempts (retried or final), by provider and reason.",
                              ["provider", "reason"], registry=r)
        self.latency = Histogram("edgeroom_vision_provider_request_seconds",
                                 "Time of a describe() call, retries included, by provider and result.",
                                 ["provider", "result"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.tokens = Counter("edgeroom_vision_provider_tokens",
                              "Tokens the model reported, by provider and direction (in, out).",
                              ["provider", "direction"], registry=r)


class RetryingProvider:
    """The retry loop, metrics and metadata shared by the network providers.

    A subclass sets `kind`, `model`, `where` (the URL for messages) and implements
    `_attempt(jpeg, prompt, schema) -> (VisionResult, tokens_in, tokens_out)` raising
    ProviderError, and `_close()`.
    """
    kind = "base"

    def __init__(self, *, model: str, where: str, timeout: float = 20.0, retries: int = 2,
                 backoff: float = 0.5, backoff_max: float = 8.0, metrics: ProviderMetrics | None = None,
                 name: str | None = None, secret: str | None = None):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.model = model
        self.name = name or self.kind
        self.where = where
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.metrics = metrics or ProviderMetrics(CollectorRegistry())
        self._secret = secret
        self._closed = threading.Event()

    def describe(self, jpeg: bytes, prompt: str, *, schema: dict | None = None) -> VisionResult:
        if not jpeg:
            raise ProviderError("bad_request", f"{self._who()}: empty image")
        t0 = time.monotonic()
        attempt = 0
        while True:
            try:
                result, tokens_in, tokens_out = self._attempt(jpeg, prompt, schema)
                break
            except ProviderError as e:
                err = ProviderError(e.reason, self._scrub(e.message), retry_after=e.retry_after)
            self.metrics.errors.labels(self.name, err.reason).inc()
            if err.reason not in RETRIED or attempt >= self.retries or self._closed.is_set():
                self._finish(err.reason, t0)
                raise err
            delay = self._delay(attempt, err.retry_after)
            log.info("%s (attempt %d of %d); retrying in %.2fs", err, attempt + 1, self.retries + 1, delay)
            self.metrics.retries.labels(self.name, err.reason).inc()
            attempt += 1
            if self._closed.wait(delay):
                self._finish(err.reason, t0)
                raise err
        latency = self._finish("ok", t0)
        if tokens_in:
            self.metrics.tokens.labels(self.name, "in").inc(tokens_in)
        if tokens_out:
            self.metrics.tokens.labels(self.name, "out").inc(tokens_out)
        result.metadata.update(provider=self.name, model=self.model, tokens_in=tokens_in, tokens_out=tokens_out,
                               latency_ms=round(latency * 1000, 1), attempts=attempt + 1,
                               image_bytes=len(jpeg))
        return result

    def configure(self, *, timeout: float | None = None, retries: int | None = None) -> None:
        """Change what applies on reload; the next request uses it (the client is not rebuilt)."""
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be > 0, got {timeout}")
            self.timeout = float(timeout)
        if retries is not None:
            if retries < 0:
                raise ValueError(f"retries must be >= 0, got {retries}")
            self.retries = int(retries)

    def close(self) -> None:
        self._closed.set()
        self._close()

    # -- for subclasses ----------------------------------------------------------------

    def _attempt(self, jpeg: bytes, prompt: str, schema: dict | None) -> tuple[VisionResult, int, int]:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _who(self) -> str:
        return f"{self.name} model {self.model!r} at {self.where}"

    def _parsed(self, text: str, schema: dict | None, *, finish, model, tokens_in: int,
                tokens_out: int) -> tuple[VisionResult, int, int]:
        """The model's answer text -> what _attempt returns; a schema answer that is not JSON is malformed."""
        try:
            result = parse_answer(text, schema=schema)
        except ValueError as e:
            raise self._fail("malformed", f"asked for JSON matching the schema, got {e}") from None
        result.metadata.update(finish_reason=finish, response_model=model)
        return result, tokens_in, tokens_out

    def _fail(self, reason: str, cause: str, *, retry_after: float | None = None) -> ProviderError:
        return ProviderError(reason, f"{self._who()}: {cause}", retry_after=retry_after)

    # -- internals ---------------------------------------------------------------------

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.backoff_max)
        base = min(self.backoff_max, self.backoff * (2 ** attempt))
        return base * (0.5 + random.random() / 2)  # jitter: callers that failed together spread out

    def _finish(self, result: str, t0: float) -> float:
        dt = time.monotonic() - t0
        self.metrics.requests.labels(self.name, result).inc()
        self.metrics.latency.labels(self.name, result).observe(dt)
        return dt

    def _scrub(self, text: str) -> str:
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        return text


# -- answers -----------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def _strip(text: str) -> str:
    text = _THINK.sub("", text)
    if "</think>" in text:          # a reasoning model whose opening tag was in the prompt template
        text = text.rsplit("</think>", 1)[1]
    return _FENCE.sub("", text.strip()).strip()


def _json_object(text: str) -> dict | None:
    """The JSON object in a model's answer, or None."""
    for candidate in (text, text[text.find("{"):text.rfind("}") + 1] if "{" in text else ""):
        if not candidate:
            continue
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _first(d: dict, *keys: str) -> Any:
    for k in keys:
        if d.get(k) not in (None, ""):
            return d[k]
    return None


def _confidence(v: Any) -> float | None:
    try:
        c = float(str(v).rstrip("%")) if v is not None else None
    except ValueError:
        return None
    if c is None or c != c:
        return None
    if c > 1 and c <= 100:          # "87" or "87%": a percentage
        c /= 100
    return min(1.0, max(0.0, c))


def _labels(v: Any) -> list[str]:
    if isinstance(v, str):
        v = v.split(",")
    if not isinstance(v, list):
        return []
    out = []
    for item in v:
        if isinstance(item, dict):
            item = _first(item, "label", "name", "object")
        if item not in (None, ""):
            out.append(str(item).strip())
    return [s for s in out if s]


def _box(f: dict) -> tuple[int, int, int, int] | None:
    b = _first(f, "box", "bbox", "box_2d")
    try:
        if isinstance(b, (list, tuple)) and len(b) == 4:
            return tuple(int(round(float(x))) for x in b)  # type: ignore[return-value]
        if all(k in f for k in ("x", "y", "width", "height")):
            x, y, w, h = (float(f[k]) for k in ("x", "y", "width", "height"))
            return int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h))
    except (TypeError, ValueError):
        pass
    return None


def _faces(v: Any) -> list[Face]:
    if not isinstance(v, list):
        return []
    return [Face(box=_box(f), description=str(_first(f, "description", "label") or ""),
                 confidence=_confidence(f.get("confidence")))
            for f in v if isinstance(f, dict)]


def _text(v: Any) -> str:
    if isinstance(v, list):
        return "\n".join(str(x) for x in v if x not in (None, ""))
    return "" if v is None else str(v)


def parse_answer(answer: str, *, schema: dict | None = None) -> VisionResult:
    """A model's text answer as a VisionResult (see the module docstring for the tolerance).

    Raises ValueError when a schema was asked for and the answer holds no JSON object.
    """
    text = _strip(answer or "")
    obj = _json_object(text)
    if schema is not None and obj is None:
        raise ValueError(f"the answer is not a JSON object: {text[:120]!r}")
    if obj is None:
        return VisionResult(description=text)
    description = _first(obj, "description", "caption", "summary", "answer")
    return VisionResult(
        description=str(description) if description is not None else ("" if schema else text),
        labels=_labels(_first(obj, "labels", "tags", "objects")),
        confidence=_confidence(obj.get("confidence")),
        faces=_faces(obj.get("faces")),
        text=_text(_first(obj, "text", "ocr")),
        data=obj if schema is not None else None,
    )


@dataclass(frozen=True)
class ProviderKind:
    name: str
    factory: Callable[..., VisionProvider]
    summary: str


PROVIDERS: dict[str, ProviderKind] = {}


def provider(name: str, summary: str) -> Callable[[type], type]:
    """Register the decorated class as the provider `name` ([vision] provider = NAME)."""
    def register(cls: type) -> type:
        if name in PROVIDERS and PROVIDERS[name].factory is not cls:
            raise ValueError(f"vision provider {name!r} is registered twice")
        PROVIDERS[name] = ProviderKind(name, cls, summary)
        return cls
    return register
