"""Credentials out of text that reaches logs, and a bounded buffer for subprocess stderr.

FFmpeg and friends print the URLs they were given, passwords included. Everything a
service logs from a child goes through `scrub` and is kept in a `StderrTail` of bounded
size, dumped when the child fails.
"""
from __future__ import annotations

import collections
import re

__all__ = ["scrub", "StderrTail"]

_PATTERNS = [
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/@:]+):([^\s/@]+)@"), r"\1\2:***@"),  # scheme://user:pass@
    (re.compile(r"(?i)\b(authorization\s*[:=]\s*)(bearer|basic|token)?\s*\S+"), r"\1\2 ***"),
    (re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)(\s*[=:]\s*|\"\s*:\s*\")"
                r"([^\s&\"',;]+)"), r"\1\2***"),
    (re.compile(r"\b(sk-[A-Za-z0-9_\-]{8})[A-Za-z0-9_\-]+"), r"\1***"),  # OpenAI-style keys
    (re.compile(r"\b(AIza[0-9A-Za-z_\-]{4})[0-9A-Za-z_\-]{20,}"), r"\1***"),  # Google API keys
]


def scrub(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class StderrTail:
    """The last `max_lines` lines (each cut to `max_line` chars) of a child's stderr, scrubbed."""

    def __init__(self, max_lines: int = 200, max_line: int = 500) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self.max_line = max_line
        self.dropped = 0
        self._partial = ""

    def feed(self, chunk: str) -> list[str]:
        """Add text; returns the complete lines it finished (already scrubbed)."""
        text = self._partial + chunk
        *complete, self._partial = text.split("\n")
        if len(self._partial) > self.max_line:
            complete.append(self._partial)
            self._partial = ""
        done = [scrub(line[: self.max_line]) for line in complete]
        self.dropped += max(0, len(self.lines) + len(done) - self.lines.maxlen)
        self.lines.extend(done)
        return done

    def text(self) -> str:
        return "\n".join(self.lines)
