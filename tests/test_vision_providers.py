"""Vision providers against real HTTP servers on loopback, through the real openai and google-genai clients.

The fake servers (tests/fake_ai_servers.py) decode the JPEG the client sent, so these tests
check what went over the wire (image pixels, model, prompt, schema, API key) and what came
back (the full VisionResult, tokens, latency), and every failure path: timeout, 5xx with
retries, 429 with Retry-After, malformed JSON, refusals, 401, an unreachable server.
"""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.vision.providers import ProviderError, ProviderMetrics, open_provider, parse_answer
from services.vision.providers.mock import MockProvider, jpeg_size
from tests.fake_ai_servers import FakeAIServer, Reply, gemini_answer, openai_answer
from tests.ports import closed_port

KINDS = ["openai", "gemini"]
KEY_ENV = "EDGEROOM_TEST_VISION_KEY"
SECRET = "sk-test-S3CRET-value-42"
TOKENS = {"openai": (120, 30), "gemini": (260, 40)}


@pytest.fixture
def jpeg() -> bytes:
    """96x64: left half red, right half blue (BGR)."""
    img = np.zeros((64, 96, 3), np.uint8)
    img[:, :48] = (0, 0, 255)
    img[:, 48:] = (255, 0, 0)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def server(kind):
    srv = FakeAIServer(kind)
    yield srv
    srv.close()


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def metrics(registry):
    return ProviderMetrics(registry)


@pytest.fixture
def make(kind, server, metrics, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    made = []

    def _make(**kw):
        opts = dict(model="vision-model-1", base_url=server.base_url, api_key_env=KEY_ENV, timeout=2.0,
                    retries=2, backoff=0.01, metrics=metrics)
        opts.update(kw)
        p = open_provider(kind, **opts)
        made.append(p)
        return p

    yield _make
    for p in made:
        p.close()


def sample(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# -- the happy path: what goes over the wire, what comes back -----------------------------

def test_request_carries_image_model_prompt_and_key(kind, server, make, registry, jpeg):
    p = make()
    result = p.describe(jpeg, "What is on the table?")
    assert len(server.requests) == 1
    rec = server.requests[0]
    assert rec.model == "vision-model-1"
    assert rec.prompt == "What is on the table?"
    assert rec.image_mime == "image/jpeg"
    assert rec.image.shape == (64, 96, 3)
    assert np.abs(rec.image[32, 10].astype(int) - (0, 0, 255)).max() < 30      # red half
    assert np.abs(rec.image[32, 85].astype(int) - (255, 0, 0)).max() < 30      # blue half
    assert '"faces"' in rec.system and '"labels"' in rec.system and '"text"' in rec.system
    if kind == "openai":
        assert rec.headers["authorization"] == f"Bearer {SECRET}"
        assert rec.detail == "low"
        assert "response_format" not in rec.body
    else:
        assert rec.headers["x-goog-api-key"] == SECRET
        assert rec.body["generationConfig"]["responseMimeType"] == "application/json"
    # the echo server's answer, parsed into every field
    assert result.description.startswith("picture 96x64 mean ")
    assert result.labels == ["echo", "96x64"]
    assert result.confidence == pytest.approx(0.9)
    assert len(result.faces) == 1 and result.faces[0].box == (1, 2, 30, 40)
    assert result.faces[0].description == "a face" and result.faces[0].confidence == pytest.approx(0.8)
    assert result.text == "EXIT"
    assert result.data is None
    md = result.metadata
    tin, tout = TOKENS[kind]
    assert (md["provider"], md["model"], md["tokens_in"], md["tokens_out"]) == (kind, "vision-model-1", tin, tout)
    assert md["latency_ms"] > 0 and md["attempts"] == 1 and md["finish_reason"] in ("stop", "STOP")
    assert sample(registry, "edgeroom_vision_provider_requests_total", provider=kind, result="ok") == 1
    assert sample(registry, "edgeroom_vision_provider_tokens_total", provider=kind, direction="in") == tin
    assert sample(registry, "edgeroom_vision_provider_tokens_total", provider=kind, direction="out") == tout
    assert sample(registry, "edgeroom_vision_provider_request_seconds_count", provider=kind, result="ok") == 1


def test_schema_reaches_server_in_the_apis_field(kind, server, make, jpeg):
    schema = {"type": "object", "title": "people count",
              "properties": {"people": {"type": "integer"}, "description": {"type": "string"}},
              "required": ["people", "description"], "additionalProperties": False}
    answer = '{"people": 2, "description": "two people at a desk"}'
    server.script(Reply(body=openai_answer(answer) if kind == "openai" else gemini_answer(answer)))
    result = make().describe(jpeg, "How many people?", schema=schema)
    rec = server.requests[0]
    assert rec.schema == schema
    if kind == "openai":
        rf = rec.body["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "people_count"
        assert rf["json_schema"]["strict"] is True
    else:
        assert "responseJsonSchema" in rec.body["generationConfig"]
    assert "schema" in rec.system
    assert result.data == {"people": 2, "description": "two people at a desk"}
    assert result.description == "two people at a desk"


def test_plain_text_answer_becomes_the_description(kind, server, make, jpeg):
    text = "<think>a sofa, something furry</think>A cat sleeps on a grey sofa."
    server.script(Reply(body=openai_answer(text) if kind == "openai" else gemini_answer(text)))
    result = make().describe(jpeg, "What is this?")
    assert result.description == "A cat sleeps on a grey sofa."
    assert result.labels == [] and result.faces == [] and result.data is None


def test_prose_when_a_schema_was_asked_is_malformed(kind, server, make, registry, jpeg):
    text = "There are two people."
    server.script(Reply(body=openai_answer(text) if kind == "openai" else gemini_answer(text)))
    with pytest.raises(ProviderError) as ei:
        make().describe(jpeg, "How many?", schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    assert ei.value.reason == "malformed" and "not a JSON object" in ei.value.message
    assert len(server.requests) == 1                     # not retried
    assert sample(registry, "edgeroom_vision_provider_errors_total", provider=kind, reason="malformed") == 1


# -- failures -------------------------------------------------------------------------------

def test_timeout_is_retried_then_a_clear_error(kind, server, make, registry, jpeg):
    server.default = Reply(delay=5.0)
    p = make(timeout=0.4, retries=1)
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as ei:
        p.describe(jpeg, "slow?")
    elapsed = time.monotonic() - t0
    assert ei.value.reason == "timeout"
    assert "0.4s" in ei.value.message and server.base_url in ei.value.message and "vision-model-1" in ei.value.message
    assert 0.7 < elapsed < 3.0, elapsed                  # two attempts of 0.4 s, not the server's 5 s
    assert len(server.requests) == 2
    assert sample(registry, "edgeroom_vision_provider_errors_total", provider=kind, reason="timeout") == 2
    assert sample(registry, "edgeroom_vision_provider_retries_total", provider=kind, reason="timeout") == 1
    assert sample(registry, "edgeroom_vision_provider_requests_total", provider=kind, result="timeout") == 1


def test_configure_changes_timeout_and_retries_on_reload(kind, server, make, jpeg):
    server.default = Reply(delay=5.0)
    p = make(timeout=30.0, retries=3)
    p.configure(timeout=0.3, retries=0)
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as ei:
        p.describe(jpeg, "x")
    assert ei.value.reason == "timeout" and time.monotonic() - t0 < 2.0 and len(server.requests) == 1


def test_http_500_is_retried_then_a_clear_error(kind, server, make, registry, jpeg):
    server.default = Reply(status=500)
    with pytest.raises(ProviderError) as ei:
        make(retries=2).describe(jpeg, "x")
    assert ei.value.reason == "server"
    assert "HTTP 500" in ei.value.message and "fake error 500" in ei.value.message
    assert server.base_url in ei.value.message
    assert len(server.requests) == 3
    assert sample(registry, "edgeroom_vision_provider_retries_total", provider=kind, reason="server") == 2
    assert sample(registry, "edgeroom_vision_provider_errors_total", provider=kind, reason="server") == 3
    assert sample(registry, "edgeroom_vision_provider_requests_total", provider=kind, result="server") == 1


def test_http_500_then_success_counts_one_retry(kind, server, make, registry, jpeg):
    server.script(Reply(status=503))
    result = make().describe(jpeg, "x")
    assert result.metadata["attempts"] == 2 and result.description.startswith("picture 96x64")
    assert sample(registry, "edgeroom_vision_provider_retries_total", provider=kind, reason="server") == 1
    assert sample(registry, "edgeroom_vision_provider_requests_total", provider=kind, result="ok") == 1


def test_429_waits_for_retry_after(kind, server, make, registry, jpeg):
    server.script(Reply(status=429, headers={"Retry-After": "0.3"}))
    make(backoff=0.001).describe(jpeg, "x")
    first, second = server.requests
    assert second.t_start - first.t_end >= 0.25
    assert sample(registry, "edgeroom_vision_provider_retries_total", provider=kind, reason="rate_limited") == 1


def test_malformed_json_body(kind, server, make, registry, jpeg):
    server.default = Reply(body=b'{"choices": [ this is not json')
    with pytest.raises(ProviderError) as ei:
        make().describe(jpeg, "x")
    assert ei.value.reason == "malformed" and "not valid JSON" in ei.value.message
    assert len(server.requests) == 1
    assert sample(registry, "edgeroom_vision_provider_requests_total", provider=kind, result="malformed") == 1


def test_answer_without_choices_or_candidates_is_malformed(kind, server, make, jpeg):
    server.default = Reply(body={"unexpected": True})
    with pytest.raises(ProviderError) as ei:
        make().describe(jpeg, "x")
    assert ei.value.reason == "malformed"
    assert ("no choices" if kind == "openai" else "no candidates") in ei.value.message


REFUSALS = {
    "openai": [(openai_answer(None, refusal="I can't help identify people."), "I can't help identify people."),
               (openai_answer("", finish="content_filter"), "content_filter")],
    "gemini": [(gemini_answer(None, block_reason="SAFETY"), "blockReason SAFETY"),
               (gemini_answer(None, finish="PROHIBITED_CONTENT"), "finishReason PROHIBITED_CONTENT")],
}


@pytest.mark.parametrize("which", [0, 1])
def test_refusal_is_a_clear_error_not_an_empty_description(kind, server, make, registry, jpeg, which):
    body, words = REFUSALS[kind][which]
    server.default = Reply(body=body)
    with pytest.raises(ProviderError) as ei:
        make().describe(jpeg, "Who is this?")
    assert ei.value.reason == "refused" and words in ei.value.message
    assert len(server.requests) == 1                     # asking again gets the same answer
    assert sample(registry, "edgeroom_vision_provider_errors_total", provider=kind, reason="refused") == 1


def test_401_is_auth_not_retried_and_never_shows_the_key(kind, server, make, registry, jpeg):
    server.default = Reply(status=401, body={"error": {"code": 401, "status": "UNAUTHENTICATED",
                                                       "message": f"Incorrect API key provided: {SECRET}"}})
    with pytest.raises(ProviderError) as ei:
        make().describe(jpeg, "x")
    assert ei.value.reason == "auth" and "HTTP 401" in ei.value.message and "API key" in ei.value.message
    assert SECRET not in str(ei.value) and "***" in ei.value.message
    assert len(server.requests) == 1
    assert sample(registry, "edgeroom_vision_provider_errors_total", provider=kind, reason="auth") == 1
    assert sample(registry, "edgeroom_vision_provider_retries_total", provider=kind, reason="auth") == 0


def test_400_is_bad_request(kind, server, make, jpeg):
    server.default = Reply(status=400)
    with pytest.raises(ProviderError) as ei:
        make().describe(jpeg, "x")
    assert ei.value.reason == "bad_request" and len(server.requests) == 1


def test_unreachable_server_is_network_and_retried(kind, metrics, registry, monkeypatch, jpeg):
    port = closed_port()                                  # nothing listens there (tests/ports.py)
    url = f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else "")
    p = open_provider(kind, model="m", base_url=url, api_key_env=KEY_ENV, timeout=1.0, retries=1,
                      backoff=0.01, metrics=metrics)
    with pytest.raises(ProviderError) as ei:
        p.describe(jpeg, "x")
    p.close()
    assert ei.value.reason == "network" and f"127.0.0.1:{port}" in ei.value.message
    assert sample(registry, "edgeroom_vision_provider_retries_total", provider=kind, reason="network") == 1


def test_missing_key_for_the_public_api_fails_at_open(kind, monkeypatch):
    monkeypatch.delenv("EDGEROOM_NO_SUCH_KEY", raising=False)
    with pytest.raises(ProviderError) as ei:
        open_provider(kind, model="m", api_key_env="EDGEROOM_NO_SUCH_KEY")
    assert ei.value.reason == "auth" and "EDGEROOM_NO_SUCH_KEY" in ei.value.message


def test_local_server_needs_no_key(kind, server, monkeypatch, jpeg):
    monkeypatch.delenv("EDGEROOM_NO_SUCH_KEY", raising=False)
    p = open_provider(kind, model="m", base_url=server.base_url, api_key_env="EDGEROOM_NO_SUCH_KEY")
    assert p.describe(jpeg, "x").description.startswith("picture 96x64")
    p.close()
    assert server.requests[0].headers.get("authorization", "Bearer not-needed") == "Bearer not-needed"


def test_empty_config_strings_mean_the_defaults(kind, server, monkeypatch, jpeg):
    """The config's "" (model, base_url, api_key_env) is the provider's default, not an empty value."""
    env = "OPENAI_API_KEY" if kind == "openai" else "GEMINI_API_KEY"
    monkeypatch.setenv(env, "default-env-key")
    p = open_provider(kind, model="", base_url=server.base_url, api_key_env="")
    p.describe(jpeg, "x")
    p.close()
    assert server.requests[0].model == ("gpt-4o-mini" if kind == "openai" else "gemini-2.5-flash")
    header = server.requests[0].headers.get("authorization" if kind == "openai" else "x-goog-api-key")
    assert header.endswith("default-env-key")


def test_close_interrupts_the_backoff_wait(kind, server, make, jpeg):
    import threading
    server.default = Reply(status=500)
    p = make(retries=5, backoff=5.0, backoff_max=5.0)
    threading.Timer(0.3, p.close).start()
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as ei:
        p.describe(jpeg, "x")
    assert ei.value.reason == "server" and time.monotonic() - t0 < 2.0


# -- parsing, the factory, the mock -----------------------------------------------------------------

def test_parse_answer_tolerates_fences_synonyms_and_geometry():
    r = parse_answer('```json\n{"caption": "a desk", "tags": "lamp, laptop", "confidence": "87%",'
                     ' "faces": [{"x": 10, "y": 20, "width": 5, "height": 6, "label": "man"}],'
                     ' "ocr": ["EXIT", "5"]}\n```')
    assert r.description == "a desk" and r.labels == ["lamp", "laptop"] and r.confidence == pytest.approx(0.87)
    assert r.faces[0].box == (10, 20, 15, 26) and r.faces[0].description == "man" and r.text == "EXIT\n5"
    r = parse_answer('Sure! Here it is: {"description": "x", "labels": [{"name": "cup"}], "confidence": 7}')
    assert r.description == "x" and r.labels == ["cup"] and r.confidence == pytest.approx(0.07)
    r = parse_answer("reasoning...</think>\nJust a hallway.")
    assert r.description == "Just a hallway."
    with pytest.raises(ValueError):
        parse_answer("[1, 2]", schema={"type": "object"})


def test_open_provider_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown vision provider 'claude'.*gemini, mock, openai"):
        open_provider("claude")


def test_provider_error_rejects_an_unknown_reason():
    with pytest.raises(ValueError):
        ProviderError("oops", "x")


def test_metrics_are_exposed_with_help(registry, metrics, jpeg):
    MockProvider(metrics=metrics).describe(jpeg, "x")
    text = generate_latest(registry).decode()
    assert "# HELP edgeroom_vision_provider_requests_total" in text
    assert 'edgeroom_vision_provider_requests_total{provider="mock",result="ok"} 1.0' in text


def _solid(w: int, h: int, bgr) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = bgr
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_mock_describes_pixels_deterministically(registry, metrics):
    p = open_provider("mock", metrics=metrics, base_url="ignored", timeout=3)   # network keys accepted
    red = _solid(1280, 720, (30, 30, 220))
    a, b = p.describe(red, "x"), p.describe(red, "y")
    assert a.description == b.description
    assert "1280x720" in a.description and "red" in a.description
    assert a.labels[0] == "red" and a.confidence == 1.0 and a.metadata["width"] == 1280
    dark_green = _solid(320, 240, (10, 70, 10))
    r = p.describe(dark_green, "x", schema={"type": "object", "properties": {"colour": {}, "width": {}, "odd": {}}})
    assert r.labels[:2] == ["green", "dark"]
    assert r.data == {"colour": "green", "width": 320, "odd": None}
    assert jpeg_size(dark_green) == (320, 240)
    with pytest.raises(ProviderError) as ei:
        p.describe(b"not a jpeg", "x")
    assert ei.value.reason == "bad_request"
    assert sample(registry, "edgeroom_vision_provider_requests_total", provider="mock", result="ok") == 3
    assert sample(registry, "edgeroom_vision_provider_errors_total", provider="mock", reason="bad_request") == 1
    with pytest.raises(TypeError, match="colour_typo"):
        open_provider("mock", colour_typo=1)


def test_mock_delay_and_configured_failure():
    p = MockProvider(delay=0.2)
    t0 = time.monotonic()
    p.describe(_solid(64, 64, (0, 0, 0)), "x")
    assert time.monotonic() - t0 >= 0.19
    with pytest.raises(ProviderError) as ei:
        MockProvider(fail="rate_limited").describe(_solid(64, 64, (0, 0, 0)), "x")
    assert ei.value.reason == "rate_limited"
