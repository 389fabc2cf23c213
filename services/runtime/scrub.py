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
    # key=value, key: value, "key": "value", key='value'; also at the end of longer names (DB_PASSWORD)
    (re.compile(r"(?i)(?<![A-Za-z0-9])((?:[A-Za-z0-9]+_)*(?:password|passwd|pwd|secret|token|api[_-]?key|"
                r"access[_-]?key))(\s*[=:]\s*[\"']?|[\"']\s*:\s*[\"'])([^\s&\"',;]+)"), r"\1\2***"),
    (re.compile(r"\b(sk-[A-Za-z0-9_\-]{8})[A-Za-z0-9_\-]+"), r"\1***"),  # OpenAI-style keys
    (re.compile(r"\b(AIza[0-9A-Za-z_\-]{4})[0-9A-Za-z_\-]{20,}"), r"\1***"),  # Google API keys
]


def scrub(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class StderrTail:
    """The last `max_lines` lines (each cut to `max_line` chars) of a child's stderr, scrubbed.

    Lines are scrubbed whole, then cut, so a cut never splits a secret out of its pattern.
    A line with no newline in sight is held up to 4 x max_line, then flushed (scrubbed and
    cut) and the rest of it, up to the next newline, dropped.
    """

    def __init__(self, max_lines: int = 200, max_line: int = 500) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self.max_lines = max_lines
        self.max_line = max_line
        self.dropped = 0
        self._partial = ""
        self._skipping = False  # inside the tail of an overlong line already flushed

    def _line(self, raw: str) -> str:
        return scrub(raw)[: self.max_line]

    def feed(self, chunk: str) -> list[str]:
        """Add text; returns the complete lines it finished (already scrubbed)."""
        *complete, self._partial = (self._partial + chunk).split("\n")
        if complete and self._skipping:
            complete, self._skipping = complete[1:], False
        done = [self._line(raw) for raw in complete]
        if len(self._partial) > 4 * self.max_line and not self._skipping:
            done.append(self._line(self._partial))
            self._skipping = True
        if self._skipping:
            self._partial = ""
        self.dropped += max(0, len(self.lines) + len(done) - self.max_lines)
        self.lines.extend(done)
        return done

    def text(self) -> str:
        return "\n".join(self.lines)
