"""Stage 6, report: metrics with intervals, Markdown tables, plots, report.html and MLflow logging."""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "compute_metrics": "metrics",
    "markdown_table": "metrics",
    "plot_confusion": "metrics",
    "wilson_interval": "metrics",
    "write_report": "html",
    "find_run": "runfiles",
    "load_run": "runfiles",
    "make_predictions": "predictions",
    "write_predictions": "predictions",
    "read_predictions": "predictions",
    "predictions_path": "predictions",
    "log_run": "tracking",
    "write_report": "html",
    "log_run": "tracking",
    "publish_run": "publish",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
