"""After a run: the HTML report and, when asked, the MLflow record; neither may lose the run itself."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..base.errors import FeatxError
from ..cache.store import FeatureCache
from ..report.html import write_report
from ..report.runfiles import find_run
from ..report.tracking import log_run

log = logging.getLogger(__name__)


def publish_run(run_dir: str | os.PathLike, *, cache: FeatureCache | None = None, report: bool = True,
                mlflow: bool = False) -> dict[str, Any]:
    """Write ``report.html`` and log to MLflow as asked; returns ``{"report": path|None, "mlflow": info|None}``.

    The run's JSON is already written when this runs, so a failing report is a warning, not an error:
    ``featx report RUN_DIR`` can build it again.  MLflow was asked for explicitly, so its errors stand.
    """
    out: dict[str, Any] = {"report": None, "mlflow": None}
    if report:
        try:
            out["report"] = str(write_report(run_dir, cache=cache))
        except (FeatxError, OSError, ValueError) as exc:
            log.warning("report.html was not written (%s); the run's results are saved; retry with `featx report %s`",
                        exc, run_dir)
    if mlflow:
        out["mlflow"] = log_run(run_dir)
    return out


def publish_existing_run(run_dir: str | os.PathLike | None = None, *, runs_dir: str | os.PathLike = "runs",
                         cache: str | os.PathLike | None = None, mlflow: bool = False) -> dict[str, Any]:
    """``featx report``: the report of ``run_dir``; errors stand.

    Without ``run_dir``: the newest probe or compare run under ``runs_dir`` (a few-shot run only when
    there is none), whose report includes the few-shot curve of the same cache
    (:func:`featx.report.runfiles.find_run`).  ``out["run"]`` names the run reported.
    """
    run = run_dir if run_dir is not None else find_run(runs_dir)
    out: dict[str, Any] = {"report": str(write_report(run, cache=cache)), "mlflow": None, "run": str(run)}
    if mlflow:
        out["mlflow"] = log_run(run)
    return out
