"""Text for the terminal: control characters from files are shown, never obeyed.

Why: file names, cache attributes, sidecar fields and head names come from whoever made the
files.  Written raw, ``\\x1b]0;...\\x07`` retitles the terminal, ``\\x1b[2J`` clears it and
``\\r`` overwrites a line.  Everything featx prints (its output, log lines, error messages)
goes through :func:`escape_controls`: C0/C1 controls other than newline and tab, DEL and the
bidirectional overrides become visible ``\\xNN`` / ``\\uNNNN`` escapes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from typing import Iterator

_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape_controls(text: str) -> str:
    """``text`` with terminal control characters (all but newline and tab) written as escapes."""
    return _CONTROLS.sub(_escape, text)


class EscapingStream(io.TextIOBase):
    """A text stream that escapes control characters before writing to ``raw``."""

    def __init__(self, raw) -> None:  # noqa: ANN001 - any text stream
        self.raw = raw

    def write(self, s: str) -> int:
        self.raw.write(escape_controls(s))
        return len(s)

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.raw, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.raw, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.raw, "errors", None)


@contextlib.contextmanager
def escaped_stdout() -> Iterator[None]:
    """Escape control characters in everything written to ``sys.stdout`` inside the block."""
    saved = sys.stdout
    sys.stdout = EscapingStream(saved)
    try:
        yield
    finally:
        sys.stdout = saved


class EscapingFormatter(logging.Formatter):
    """Log lines with control characters escaped (messages name files)."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))
