"""Text for terminals and spreadsheets (base/text.py): control characters shown, never obeyed; formula cells kept as text."""

from __future__ import annotations

import io
import logging
import os

from featx.base.text import EscapingFormatter, EscapingStream, csv_cell, csv_row, csv_value, escape_controls


def test_escape_controls_shows_terminal_controls_and_keeps_newline_and_tab() -> None:
    assert escape_controls("a\tb\nc") == "a\tb\nc"
    assert escape_controls("\x1b]0;owned\x07") == "\\x1b]0;owned\\x07"
    assert escape_controls("x\ry\x7f\x9b") == "x\\x0dy\\x7f\\x9b"
    assert escape_controls("abc\u202edef") == "abc\\u202edef"  # a bidirectional override
    assert escape_controls(os.fsdecode(b"caf\xe9")) == "caf\\xe9"  # an undecodable byte of a file name
    assert escape_controls("plain café ✓") == "plain café ✓"


def test_csv_cell_quotes_formulas_but_not_numbers() -> None:
    for formula in ("=1+1", "+cmd", "-x", "@sum(A1)", "\tx", "\rx", "\uff1dx", "'already"):
        assert csv_cell(formula) == "'" + formula
        assert csv_value(csv_cell(formula)) == formula  # what was written comes back exactly
    for plain in ("-0.25", "+3", "1e-5", ".5", "cats", ""):
        assert csv_cell(plain) == plain
    assert csv_cell(-1) == -1 and csv_cell(None) is None
    assert csv_row(["=a", 2, "b"]) == ["'=a", 2, "b"]


def test_escaping_stream_and_formatter_escape_what_they_write() -> None:
    raw = io.StringIO()
    s = EscapingStream(raw)
    assert s.write("name \x1b[2J\n") == len("name \x1b[2J\n")
    s.flush()
    assert raw.getvalue() == "name \\x1b[2J\n"
    rec = logging.LogRecord("featx", logging.WARNING, __file__, 1, "file %s", ("a\x1b]0;t\x07",), None)
    assert EscapingFormatter("%(message)s").format(rec) == "file a\\x1b]0;t\\x07"
