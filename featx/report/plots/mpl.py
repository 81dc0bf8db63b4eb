"""matplotlib for files, set up once: the Agg backend (no display needed), imported only when a chart is drawn."""

from __future__ import annotations

import warnings

# matplotlib warns "Glyph 27 (\x1b) missing from font(s) DejaVu Sans." through warnings.warn, which writes the
# raw character to stderr: a class name holding ESC or BEL would reach the terminal.  A control character has
# no glyph to miss, so that warning says nothing; it is dropped (other missing glyphs still warn).
_CONTROL_GLYPH = r"Glyph \d+ \([\x00-\x1f\x7f-\x9f]\) missing"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (unless the caller chose one already)."""
    import matplotlib  # optional and slow to import: only when a chart is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # Again on every call: a caller's warnings.catch_warnings() restores the filters it found.
    warnings.filterwarnings("ignore", message=_CONTROL_GLYPH, category=UserWarning)
    return plt
