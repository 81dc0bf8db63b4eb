"""Experiment tracking: one featx run folder logged as one MLflow run.

Why: people keep their runs in MLflow; a probe or comparison should land there with its
settings, numbers, report and heads, without the user copying files.  Built from the run
folder's files (like the report), through an explicit ``MlflowClient`` so no global MLflow
state is changed.  Tracking URI: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a local
``./mlruns`` folder.  ``mlflow`` is imported only here, inside the call (optional extra
``featx[mlflow]``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from ..base.errors import FeatxError
from .plots.charts import fewshot_series
from .runfiles import RunFiles, load_run

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 500
ARTIFACT_GLOBS = ("report.html", "report.md", "*.png", "*.json", "compare.md", "predictions_*.csv", "*.joblib", "*.skops")
HEAD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "cv_score", "fit_seconds", "predict_seconds")


def _key(s: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . /`` and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", s)[:250]


def _flatten(d: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(d, dict) and d:
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}{k}.")
        return
    text = str(d) if not isinstance(d, str) else d
    yield _key(prefix.rstrip(".")), text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_params(run: RunFiles) -> dict[str, str]:
    """Settings of every stage in the run plus the cache identity, flattened to ``a.b`` keys."""
    out: dict[str, str] = {}
    info = run.cache_info
    for k in ("backbone", "fingerprint", "dim", "dtype", "preprocess", "weights_sha256", "rows", "root"):
        if info.get(k) is not None:
            out[f"cache.{k}"] = str(info[k])[:MAX_PARAM_CHARS]
    out["cache.n_classes"] = str(len(info.get("classes") or []))
    for stage, src in (("probe", run.metrics), ("compare", run.compare), ("fewshot", run.fewshot)):
        if src and isinstance(src.get("settings"), dict):
            out.update(dict(_flatten(src["settings"], f"{stage}.")))
    if run.metrics:
        for head, h in (run.metrics.get("heads") or {}).items():
            out.update(dict(_flatten(h.get("params") or {}, f"probe.{head}.params.")))
            if h.get("view"):
                out[f"probe.{head}.view"] = str(h["view"])
    return out


def run_metrics(run: RunFiles) -> list[tuple[str, float, int]]:
    """(key, value, step) for every head, compared method and few-shot point."""
    out = []
    for head, h in ((run.metrics or {}).get("heads") or {}).items():
        out += [(f"{head}.{m}", float(h[m]), 0) for m in HEAD_METRICS if _finite(h.get(m))]
        ci = h.get("accuracy_ci95") or []
        if len(ci) == 2 and all(_finite(c) for c in ci):
            out += [(f"{head}.accuracy_ci95_low", float(ci[0]), 0), (f"{head}.accuracy_ci95_high", float(ci[1]), 0)]
    for r in (run.compare or {}).get("rows") or []:
        for m in ("accuracy", "balanced_accuracy", "macro_f1", "wall_seconds"):
            if _finite(r.get(m)):
                out.append((f"compare.{r.get('method')}.{m}", float(r[m]), 0))
    for head, pts in (fewshot_series(run.fewshot) if run.fewshot else {}).items():
        out += [(f"fewshot.{head}.accuracy", float(mean), int(k)) for k, mean, _, _ in pts]
    return [(_key(k), v, s) for k, v, s in out]


def run_artifacts(run: RunFiles) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) pairs: the report, PNGs, JSON, predictions and saved heads."""
    out: list[tuple[Path, str | None]] = []
    seen: set[Path] = set()
    dirs = [(run.run_dir, None)] + ([(run.probe_dir, "probe")] if run.probe_dir and run.probe_dir != run.run_dir else [])
    for d, sub in dirs:
        for pattern in ARTIFACT_GLOBS:
            for p in sorted(d.glob(pattern)):
                if p.is_file() and p not in seen and not p.name.startswith("."):
                    seen.add(p)
                    out.append((p, sub))
    return out


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store in the local ``./mlruns`` folder.

    MLflow 3 refuses its plain-file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; SQLite is the
    local backend it recommends, and keeps everything in ``mlruns/`` (database and artifacts).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    folder = Path("mlruns").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, creating it (artifacts beside a local SQLite database) when new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def log_run(run_dir: str | os.PathLike, *, tracking_uri: str | None = None, experiment: str = "featx",
            run_name: str | None = None) -> dict:
    """Log a run folder (settings, metrics, report, PNGs, saved heads) as one MLflow run.

    Returns ``{"run_id", "experiment_id", "tracking_uri", "params", "metrics", "artifacts"}``.
    """
    try:
        from mlflow.entities import Metric, Param, RunTag  # optional extra featx[mlflow]
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FeatxError("--mlflow needs MLflow: pip install 'featx[mlflow]' (or pip install mlflow)") from None
    run = load_run(run_dir)
    uri = tracking_uri or default_tracking_uri()
    try:
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, experiment, uri)
        src = run.metrics or run.compare or run.fewshot or {}
        tags = {"featx.run_dir": str(Path(run.run_dir).resolve()), "featx.version": str(src.get("featx_version", "")),
                "featx.backbone": str(run.cache_info.get("backbone", "")), "featx.dataset": Path(str(run.cache_info.get("root", ""))).name}
        mrun = client.create_run(exp_id, run_name=run_name or Path(run.run_dir).name, tags=tags)
        rid = mrun.info.run_id
        params = run_params(run)
        metrics = run_metrics(run)
        now = int(time.time() * 1000)
        items = [Param(k, v) for k, v in params.items()]
        for a in range(0, max(len(items), 1), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(rid, params=items[a : a + 100], metrics=[], tags=[RunTag("featx.kind", _kind(run))] if a == 0 else [])
        client.log_batch(rid, metrics=[Metric(k, v, now, s) for k, v, s in metrics])
        arts = run_artifacts(run)
        for p, sub in arts:
            client.log_artifact(rid, str(p), artifact_path=sub)
        client.set_terminated(rid)
    except FeatxError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types (network, permissions, schema)
        hint = " (for a file store set MLFLOW_ALLOW_FILE_STORE=true, or use sqlite:///mlruns/mlflow.db)" if uri.startswith(("file:", "/", ".")) else ""
        raise FeatxError(f"could not log {run_dir} to MLflow at {uri}: {exc}; check MLFLOW_TRACKING_URI{hint}") from exc
    log.info("mlflow: logged %s as run %s (experiment %r at %s)", run_dir, rid, experiment, uri)
    return {"run_id": rid, "experiment_id": exp_id, "tracking_uri": uri, "params": len(params), "metrics": len(metrics),
            "artifacts": [str(p) for p, _ in arts]}


def _kind(run: RunFiles) -> str:
    return "compare" if run.compare else "fewshot" if run.fewshot and not run.metrics else "probe"
