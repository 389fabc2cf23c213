"""The Gemini vision provider, through the real `google-genai` client.

    p = GeminiProvider(model="gemini-2.5-flash")             # GEMINI_API_KEY

One generateContent request per picture:

    contents: [inline JPEG bytes (Part.from_bytes, image/jpeg), prompt]
    config:   system_instruction = SYSTEM_PROMPT (SCHEMA_SYSTEM_PROMPT with a schema),
              response_mime_type = "application/json",
              response_json_schema = schema                   (with a schema)

The schema goes in `response_json_schema` (the API's field for a JSON Schema), not
`response_schema`, which takes Gemini's OpenAPI subset and rejects common JSON Schema
keywords such as additionalProperties; a config's schema file is plain JSON Schema.
JSON output is asked for even without a schema: Gemini honours it, and the tolerant parser
still copes when a proxy or older model does not.

A refusal is a `refused` ProviderError: promptFeedback.blockReason (the picture or prompt
was blocked) or a candidate whose finishReason is a safety/recitation/blocklist one.

`base_url` points the client at another endpoint (a proxy, or the tests' local server);
`timeout` becomes HttpOptions.timeout (milliseconds); the client's retries are off
(no retry_options): RetryingProvider retries, counts and backs off.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from services.vision.providers.base import (
    SCHEMA_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    ProviderError,
    ProviderMetrics,
    RetryingProvider,
    provider,
)
from services.vision.types import VisionResult

if TYPE_CHECKING:
    from google.genai import errors, types

__all__ = ["GeminiProvider"]

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_MODEL = "gemini-2.5-flash"
DEFAULT_KEY_ENV = "GEMINI_API_KEY"
LOCAL_PLACEHOLDER_KEY = "not-needed"
REFUSING_FINISH = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
                             "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR"})


def _name(v) -> str | None:
    """An enum's name (or a plain string the client could not map)."""
    return None if v is None else getattr(v, "value", None) or str(v)


@provider("gemini", "Google Gemini (the `google-genai` client)")
class GeminiProvider(RetryingProvider):
    kind = "gemini"

    def __init__(self, *, model: str = DEFAULT_MODEL, base_url: str | None = None,
                 api_key_env: str = DEFAULT_KEY_ENV, api_version: str | None = None,
                 timeout: float = 20.0, retries: int = 2, backoff: float = 0.5, backoff_max: float = 8.0,
                 max_tokens: int | None = None, temperature: float | None = None,
                 system_prompt: str | None = None, metrics: ProviderMetrics | None = None,
                 name: str | None = None):
        import pydantic  # the ai extra: loaded when a provider opens, so the box's config loads without it
        from google import genai
        from google.genai import errors, types
        try:                        # google-genai >= 3 sends through httpx2, older releases through httpx
            import httpx2 as http
        except ImportError:         # pragma: no cover (depends on the installed client)
            import httpx as http
        self._types, self._errors, self._http, self._invalid = types, errors, http, pydantic.ValidationError
        model, base_url, api_key_env = model or DEFAULT_MODEL, base_url or None, api_key_env or DEFAULT_KEY_ENV
        where = (base_url or DEFAULT_BASE_URL).rstrip("/")
        key = os.environ.get(api_key_env, "")
        super().__init__(model=model, where=where, timeout=timeout, retries=retries, backoff=backoff,
                         backoff_max=backoff_max, metrics=metrics, name=name, secret=key or None)
        if not key:
            if base_url is None:
                raise self._fail("auth", f"no API key: the environment variable {api_key_env} is not set")
            key = LOCAL_PLACEHOLDER_KEY
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.system_prompt = system_prompt
        opts = types.HttpOptions(base_url=base_url, api_version=api_version, timeout=int(self.timeout * 1000))
        self._client = genai.Client(api_key=key, http_options=opts)

    def _config(self, schema: dict | None) -> types.GenerateContentConfig:
        types = self._types
        return types.GenerateContentConfig(
            system_instruction=self.system_prompt or (SCHEMA_SYSTEM_PROMPT if schema else SYSTEM_PROMPT),
            response_mime_type="application/json",
            response_json_schema=schema,
            max_output_tokens=self.max_tokens,
            temperature=self.temperature,
            http_options=types.HttpOptions(timeout=int(self.timeout * 1000)),   # per request: configure()
        )

    def _attempt(self, jpeg: bytes, prompt: str, schema: dict | None) -> tuple[VisionResult, int, int]:
        http, errors = self._http, self._errors
        try:
            response = self._client.models.generate_content(
                model=self.model, contents=[self._types.Part.from_bytes(data=jpeg, mime_type="image/jpeg"), prompt],
                config=self._config(schema))
        except http.TimeoutException:
            raise self._fail("timeout", f"no answer within {self.timeout:g}s") from None
        except http.TransportError as e:
            raise self._fail("network", f"cannot reach the server ({type(e).__name__}: {e})") from None
        except errors.APIError as e:
            raise self._status_error(e) from None
        except (ValueError, self._invalid) as e:   # UnknownApiResponseError is a ValueError
            raise self._fail("malformed", f"the server's answer is not valid JSON ({str(e)[:200]})") from None
        return self._result(response, schema)

    def _status_error(self, e: errors.APIError) -> ProviderError:
        code = int(e.code or 0)
        cause = f"HTTP {code} {e.status or ''}: {str(e.message or '')[:300]}".replace(" :", ":")
        if code == 429:
            return self._fail("rate_limited", cause, retry_after=_retry_after(e))
        if code >= 500:
            return self._fail("server", cause)
        if code in (401, 403) or "API_KEY_INVALID" in str(e.details):   # Gemini says 400 for a bad key
            return self._fail("auth", cause + " (check the API key variable)")
        return self._fail("bad_request", cause)

    def _result(self, response, schema: dict | None) -> tuple[VisionResult, int, int]:
        feedback = getattr(response, "prompt_feedback", None)
        blocked = _name(getattr(feedback, "block_reason", None))
        if blocked:
            raise self._fail("refused", f"the request was blocked (blockReason {blocked})")
        candidates = getattr(response, "candidates", None)
        if not candidates:
            raise self._fail("malformed", "the answer has no candidates")
        cand = candidates[0]
        finish = _name(getattr(cand, "finish_reason", None))
        if finish in REFUSING_FINISH:
            raise self._fail("refused", f"the model withheld its answer (finishReason {finish})")
        parts = getattr(getattr(cand, "content", None), "parts", None) or []
        text = "".join(p.text for p in parts if getattr(p, "text", None) and not getattr(p, "thought", False))
        if not text.strip():
            raise self._fail("malformed", f"empty answer (finishReason {finish})")
        usage = getattr(response, "usage_metadata", None)
        return self._parsed(text, schema, finish=finish, model=getattr(response, "model_version", None),
                            tokens_in=int(getattr(usage, "prompt_token_count", 0) or 0),
                            tokens_out=int(getattr(usage, "candidates_token_count", 0) or 0))

    def _close(self) -> None:
        self._client.close()


def _retry_after(e: errors.APIError) -> float | None:
    try:
        return float(e.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None
