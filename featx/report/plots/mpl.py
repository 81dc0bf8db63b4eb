"""matplotlib for files, set up once: the Agg backend (no display needed), imported only when a chart is drawn."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (unless the caller chose one already)."""
    import matplotlib  # optional and slow to import: only when a chart is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
