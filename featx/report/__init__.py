"""Stage 6, report: metrics with intervals, Markdown tables, plots, report.html and MLflow logging.

It renders results it is given; :func:`featx.runs.publish.publish_run` calls it after a run.
"""

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
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
