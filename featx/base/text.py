"""Text for the terminal: control characters from files are shown, never obeyed.

Why: file names, cache attributes, sidecar fields and head names come from whoever made the
files.  Written raw, ``\\x1b]0;...\\x07`` retitles the terminal, ``\\x1b[2J`` clears it and
``\\r`` overwrites a line.  Everything featx prints (its output, log lines, error messages)
goes through :func:`escape_controls`: C0/C1 controls other than newline and tab, DEL and the
bidirectional overrides become visible ``\\xNN`` / ``\\uNNNN`` escapes (and the undecodable bytes of a
file name that is not UTF-8 become ``\\xNN``, where printing them raw failed).  CSV cells that a
spreadsheet would run as formulas are written as text (:func:`csv_cell`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from typing import Iterator

# ... and lone surrogates: the bytes of a file name that is not UTF-8 (caf\xe9.jpg), shown as those bytes.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\udc80-\udcff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape_controls(text: str) -> str:
    """``text`` with terminal control characters (all but newline and tab) written as escapes."""
    return _CONTROLS.sub(_escape, text)


# CSV injection (OWASP): a spreadsheet runs a cell that starts with = + - @ (or tab, CR; and their
# full-width forms) as a formula, e.g. a class folder named ``=HYPERLINK("http://...")``.  Such a cell is
# written with a leading ``'``, which spreadsheets show as text; a cell already starting with ``'`` gets
# one more, so :func:`csv_value` gives back exactly what was written.  Plain numbers (``-0.25``) stay numbers.
_FORMULA_START = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20'")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value):  # noqa: ANN001, ANN201 - any cell value; only text is changed
    """A CSV cell that a spreadsheet shows as text and never runs as a formula (numbers unchanged)."""
    if isinstance(value, str) and value and value[0] in _FORMULA_START and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(cells) -> list:  # noqa: ANN001 - any iterable of cells
    """:func:`csv_cell` of every cell of a row."""
    return [csv_cell(c) for c in cells]


def csv_value(cell: str) -> str:
    """The text a cell written through :func:`csv_cell` stands for (its protective ``'`` removed)."""
    return cell[1:] if cell.startswith("'") else cell


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
