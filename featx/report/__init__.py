"""Stage 6, report: metrics with intervals, Markdown tables, plots."""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "compute_metrics": "metrics",
    "markdown_table": "metrics",
    "plot_confusion": "metrics",
    "wilson_interval": "metrics",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
