"""The OpenAI-compatible vision provider: OpenAI, Ollama, vLLM, LM Studio through `base_url`.

    p = OpenAIProvider(model="gpt-4o-mini")                                   # OPENAI_API_KEY
    p = OpenAIProvider(model="qwen2.5vl:7b", base_url="http://127.0.0.1:11434/v1")  # Ollama, no key

One chat-completions request per picture, with the real `openai` client:

    system: SYSTEM_PROMPT (or SCHEMA_SYSTEM_PROMPT with a schema)
    user:   [{"type": "text", "text": prompt},
             {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,...", "detail": "low"}}]
    response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}  (with a schema)

`detail="low"` (RoomKit's choice) costs a fixed 85 tokens on OpenAI; "high" or "auto"
when small text matters. No `response_format` is sent without a schema: several
compatible servers reject `json_object`, and the tolerant parser copes with prose.

The API key comes from the environment variable named by `api_key_env`, read once at
open. A local server (any `base_url`) needs none, so a placeholder is sent; without
`base_url` a missing key is an `auth` error at open, not on the first call. The client's
own retries are off (`max_retries=0`): RetryingProvider retries, counts and backs off.
"""
from __future__ import annotations

import base64
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
    import openai

__all__ = ["OpenAIProvider"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
LOCAL_PLACEHOLDER_KEY = "not-needed"


@provider("openai", "any OpenAI-compatible server: OpenAI, Ollama, vLLM, LM Studio (the `openai` client)")
class OpenAIProvider(RetryingProvider):
    kind = "openai"

    def __init__(self, *, model: str = DEFAULT_MODEL, base_url: str | None = None,
                 api_key_env: str = DEFAULT_KEY_ENV, timeout: float = 20.0, retries: int = 2,
                 backoff: float = 0.5, backoff_max: float = 8.0, detail: str = "low",
                 max_tokens: int | None = None, temperature: float | None = None,
                 system_prompt: str | None = None, metrics: ProviderMetrics | None = None,
                 name: str | None = None):
        if detail not in ("low", "high", "auto"):
            raise ValueError(f"detail must be low, high or auto, got {detail!r}")
        import openai  # the ai extra: loaded when a provider opens, so the box's config loads without it
        import pydantic
        self._openai, self._invalid = openai, pydantic.ValidationError
        model, base_url, api_key_env = model or DEFAULT_MODEL, base_url or None, api_key_env or DEFAULT_KEY_ENV
        where = (base_url or DEFAULT_BASE_URL).rstrip("/")
        key = os.environ.get(api_key_env, "")
        super().__init__(model=model, where=where, timeout=timeout, retries=retries, backoff=backoff,
                         backoff_max=backoff_max, metrics=metrics, name=name, secret=key or None)
        if not key:
            if base_url is None:
                raise self._fail("auth", f"no API key: the environment variable {api_key_env} is not set")
            key = LOCAL_PLACEHOLDER_KEY
        self.detail = detail
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.system_prompt = system_prompt
        self._client = openai.OpenAI(api_key=key, base_url=where, timeout=self.timeout, max_retries=0)

    def _request(self, jpeg: bytes, prompt: str, schema: dict | None) -> dict:
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        system = self.system_prompt or (SCHEMA_SYSTEM_PROMPT if schema else SYSTEM_PROMPT)
        kw: dict = {
            "model": self.model,
            "timeout": self.timeout,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": [{"type": "text", "text": prompt},
                                             {"type": "image_url", "image_url": {"url": url, "detail": self.detail}}]},
            ],
        }
        if schema is not None:
            kw["response_format"] = {"type": "json_schema", "json_schema": {
                "name": str(schema.get("title") or "vision_answer")[:64].replace(" ", "_"),
                "schema": schema, "strict": bool(schema.get("additionalProperties") is False)}}
        if self.max_tokens is not None:
            kw["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        return kw

    def _attempt(self, jpeg: bytes, prompt: str, schema: dict | None) -> tuple[VisionResult, int, int]:
        openai = self._openai
        try:
            completion = self._client.chat.completions.create(**self._request(jpeg, prompt, schema))
        except openai.APITimeoutError:
            raise self._fail("timeout", f"no answer within {self.timeout:g}s") from None
        except openai.APIConnectionError as e:
            raise self._fail("network", f"cannot reach the server ({e.__cause__ or e})") from None
        except openai.APIStatusError as e:
            raise self._status_error(e) from None
        except (ValueError, self._invalid, openai.APIResponseValidationError) as e:
            raise self._fail("malformed", f"the server's answer is not valid JSON ({e})") from None
        return self._result(completion, schema)

    def _status_error(self, e: openai.APIStatusError) -> ProviderError:
        status = e.status_code
        cause = f"HTTP {status}: {_server_message(e)}"
        if status == 429:
            return self._fail("rate_limited", cause, retry_after=_retry_after(e))
        if status >= 500:
            return self._fail("server", cause)
        if status in (401, 403):
            return self._fail("auth", cause + " (check the API key variable)")
        return self._fail("bad_request", cause)

    def _result(self, completion, schema: dict | None) -> tuple[VisionResult, int, int]:
        choices = getattr(completion, "choices", None)
        if not choices:
            raise self._fail("malformed", "the answer has no choices")
        choice = choices[0]
        message = getattr(choice, "message", None)
        finish = getattr(choice, "finish_reason", None)
        refusal = getattr(message, "refusal", None)
        if refusal:
            raise self._fail("refused", f"the model refused: {refusal}")
        if finish == "content_filter":
            raise self._fail("refused", "the answer was withheld by the content filter (finish_reason content_filter)")
        content = getattr(message, "content", None)
        if not isinstance(content, str) or not content.strip():
            raise self._fail("malformed", f"empty answer (finish_reason {finish})")
        usage = getattr(completion, "usage", None)
        return self._parsed(content, schema, finish=finish, model=getattr(completion, "model", None),
                            tokens_in=int(getattr(usage, "prompt_tokens", 0) or 0),
                            tokens_out=int(getattr(usage, "completion_tokens", 0) or 0))

    def _close(self) -> None:
        self._client.close()


def _server_message(e: openai.APIStatusError) -> str:
    body = e.body           # the client hands over the JSON's "error" object when there is one
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else body.get("message")
        if msg:
            return str(msg)[:300]
    return str(e.message)[:300]


def _retry_after(e: openai.APIStatusError) -> float | None:
    try:
        return float(e.response.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None
