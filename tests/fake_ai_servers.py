"""Local HTTP servers that speak the OpenAI chat-completions API and Gemini's generateContent.

The real `openai` and `google-genai` clients are pointed at them (base_url), so tests see
exactly the bytes those clients put on the wire and exercise their real error handling.

    srv = FakeAIServer("openai")              # or "gemini"; bound to 127.0.0.1, port 0
    srv.base_url                              # http://127.0.0.1:PORT/v1 (openai) or http://127.0.0.1:PORT
    srv.script(Reply(status=500), Reply(status=500))   # the next replies, in order; then the default
    srv.default = Reply(delay=0.5)            # what every unscripted request gets (echo answer)
    srv.requests                              # every request: path, headers, body, image, prompt, ...
    srv.max_concurrent("stream=a")            # most requests in flight at once with that prompt key
    srv.close()

The default reply is an *echo*: the server decodes the JPEG it was sent and answers, in the
API's own response shape, a JSON text whose description names the picture's size and mean
brightness, so a test can check the round trip end to end. A `Reply` may instead give a
status, a raw body (bytes, for malformed JSON), an API answer (`openai_answer`,
`gemini_answer`), and a delay before answering (interruptible: close() never waits on it).

Requests are keyed for concurrency accounting by the `stream=NAME` token in their prompt
(the whole prompt when it has none).
"""
from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

__all__ = ["FakeAIServer", "Recorded", "Reply", "gemini_answer", "openai_answer"]

_STREAM_KEY = re.compile(r"stream=(\S+)")


@dataclass
class Reply:
    status: int = 200
    body: Any = None            # dict (sent as JSON), bytes (sent raw), or None: the echo answer
    delay: float = 0.0          # seconds before answering
    headers: dict = field(default_factory=dict)


@dataclass
class Recorded:
    path: str
    headers: dict
    body: dict | None
    raw: bytes
    model: str = ""
    prompt: str = ""
    system: str = ""
    image: np.ndarray | None = None   # the decoded JPEG the client sent
    image_mime: str = ""
    detail: str | None = None         # OpenAI image_url.detail
    schema: Any = None                # the JSON schema in the API's own field
    key: str = ""
    t_start: float = 0.0
    t_end: float = 0.0


def openai_answer(content: str | None, *, refusal: str | None = None, finish: str = "stop",
                  tokens_in: int = 120, tokens_out: int = 30, model: str = "fake-model") -> dict:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content, "refusal": refusal}}],
        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                  "total_tokens": tokens_in + tokens_out},
    }


def gemini_answer(text: str | None, *, finish: str = "STOP", block_reason: str | None = None,
                  tokens_in: int = 260, tokens_out: int = 40, model: str = "gemini-fake") -> dict:
    usage = {"promptTokenCount": tokens_in, "candidatesTokenCount": tokens_out,
             "totalTokenCount": tokens_in + tokens_out}
    if block_reason:
        return {"promptFeedback": {"blockReason": block_reason}, "usageMetadata": usage, "modelVersion": model}
    cand: dict = {"index": 0, "finishReason": finish}
    if text is not None:
        cand["content"] = {"role": "model", "parts": [{"text": text}]}
    return {"candidates": [cand], "usageMetadata": usage, "modelVersion": model}


def _decode(b64: str) -> np.ndarray | None:
    # Gemini's client sends URL-safe base64, OpenAI's the standard alphabet: accept both.
    raw = base64.b64decode(b64.replace("-", "+").replace("_", "/") + "==")
    return cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)


def _parse_openai(rec: Recorded, body: dict) -> None:
    rec.model = body.get("model", "")
    rf = body.get("response_format") or {}
    rec.schema = (rf.get("json_schema") or {}).get("schema") if rf.get("type") == "json_schema" else None
    for msg in body.get("messages", []):
        content = msg.get("content")
        if msg.get("role") == "system":
            rec.system = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
            continue
        if isinstance(content, str):
            rec.prompt = content
            continue
        for part in content or []:
            if part.get("type") == "text":
                rec.prompt = part["text"]
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                rec.detail = part["image_url"].get("detail")
                head, _, b64 = url.partition(",")
                rec.image_mime = head.removeprefix("data:").removesuffix(";base64")
                rec.image = _decode(b64)


def _parse_gemini(rec: Recorded, body: dict) -> None:
    m = re.search(r"/models/([^/:]+):generateContent", rec.path)
    rec.model = m.group(1) if m else ""
    gen = body.get("generationConfig") or {}
    rec.schema = gen.get("responseJsonSchema") or gen.get("responseSchema")
    si = body.get("systemInstruction") or {}
    rec.system = " ".join(p.get("text", "") for p in si.get("parts", []))
    for content in body.get("contents", []):
        for part in content.get("parts", []):
            if "text" in part:
                rec.prompt = part["text"]
            inline = part.get("inlineData") or part.get("inline_data")
            if inline:
                rec.image_mime = inline.get("mimeType") or inline.get("mime_type", "")
                rec.image = _decode(inline["data"])


def _echo_text(rec: Recorded) -> str:
    if rec.image is None:
        return json.dumps({"description": "no image"})
    h, w = rec.image.shape[:2]
    mean = float(rec.image.mean())
    return json.dumps({"description": f"picture {w}x{h} mean {mean:.1f}", "labels": ["echo", f"{w}x{h}"],
                       "confidence": 0.9, "faces": [{"box": [1, 2, 30, 40], "description": "a face",
                                                     "confidence": 0.8}],
                       "text": "EXIT"})


class FakeAIServer:
    def __init__(self, kind: str = "openai"):
        if kind not in ("openai", "gemini"):
            raise ValueError(f"unknown kind {kind!r}")
        self.kind = kind
        self.default = Reply()
        self.requests: list[Recorded] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._inflight: Counter[str] = Counter()
        self._max: Counter[str] = Counter()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-{kind}", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.kind == "openai" else root

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def max_concurrent(self, key: str) -> int:
        with self._lock:
            return self._max[key]

    def requests_for(self, key: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.key == key]

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- serving -----------------------------------------------------------------------

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        rec = Recorded(path=h.path, headers={k.lower(): v for k, v in h.headers.items()}, body=None, raw=raw,
                       t_start=time.monotonic())
        try:
            rec.body = json.loads(raw)
            (_parse_openai if self.kind == "openai" else _parse_gemini)(rec, rec.body)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        m = _STREAM_KEY.search(rec.prompt)
        rec.key = m.group(1) if m else rec.prompt
        reply = self._next_reply()
        with self._lock:
            self.requests.append(rec)
            self._inflight[rec.key] += 1
            self._max[rec.key] = max(self._max[rec.key], self._inflight[rec.key])
        try:
            if reply.delay and self._closing.wait(reply.delay):
                return
            body = reply.body
            if body is None and reply.status == 200:
                text = _echo_text(rec)
                body = openai_answer(text, model=rec.model) if self.kind == "openai" else gemini_answer(text)
            elif body is None:
                body = {"error": {"code": reply.status, "message": f"fake error {reply.status}",
                                  "status": "FAKE", "type": "fake_error"}}
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h.send_response(reply.status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): what a real server sees too
        finally:
            with self._lock:
                self._inflight[rec.key] -= 1
                rec.t_end = time.monotonic()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True      # headers and body are two writes: no 40 ms delayed-ACK stall

            def do_POST(self):  # noqa: N802 (http.server's name)
                server._handle(self)

            def log_message(self, *args):
                pass

        return Handler
