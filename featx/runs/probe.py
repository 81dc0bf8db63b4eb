"""``probe``: train heads on a cache's training rows, evaluate them, write the run's files.

Hyperparameters are only ever chosen by cross-validation on the training rows (the search
lives in :mod:`featx.heads.tuning.cv`, :mod:`featx.heads.estimators.linear_path` and
:mod:`featx.heads.estimators.torch_heads`; :func:`featx.heads.tuning.factory.create_head` picks one).  The
evaluation rows are the cache's ``val``/``test`` split or a seeded stratified hold-out
(:func:`featx.data.train_eval_split`).  Writes ``metrics.json``, a Markdown table, confusion
matrices and the fitted heads (``save_head``: model file + JSON sidecar with sha256).
``solver="stream"`` (or ``auto`` when the training rows do not fit in memory) trains logreg and the
linear SVM on rows streamed from the cache, ``stream_epochs`` passes (:mod:`featx.heads.stream.linear`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..base.choices import HEAD_FORMATS, KERNELS
from ..base.errors import FeatxError
from ..base.io import write_json
from ..base.records import ItemAccess
from ..base.version import __version__
from ..base.writable import default_run_dir, run_key, staged_dir
from ..cache.multi import open_cache
from ..cache.store import FeatureCache
from ..config import ProbeSettings
from ..data.splits import Split, plan_folds
from ..heads.estimators.scores import scores_of
from ..heads.saved.persist import save_head
from ..heads.stream.linear import fit_streamed, stream_candidates
from ..heads.tuning.factory import check_head_name, grid_key
from ..heads.tuning.grids import ALL_HEADS, LINEAR_HEADS, resolve_grids
from ..heads.tuning.repeated_cv import select_repeated
from ..heads.tuning.rows import TrainingRows, held_dim, load_rows
from ..heads.tuning.selection import SearchPlan, candidates, select
from ..report.metrics import compute_metrics, markdown_table, plot_confusion
from ..report.predictions import make_predictions, predictions_path, write_predictions
from .publish import publish_run

log = logging.getLogger(__name__)

# Fields filled at the end of a probe (or only with a subset): left out of metrics.json until set.
_LATE = ("seconds", "out_dir", "table", "metrics_path", "train_subset", "report_path", "audit", "drop_flagged",
         "identity", "run_key")


@dataclass(eq=False)
class ProbeResult(ItemAccess):
    """What :func:`probe` returns and writes to ``metrics.json`` (``to_dict()``, same keys as ever).

    ``result["heads"]`` reads a field too (:class:`featx.base.records.ItemAccess`), for callers written
    for the former dict; a field not filled in yet reads as absent there and in ``to_dict()``.
    """

    featx_version: str
    created: str
    cache: dict
    backbone: str | None
    fingerprint: str
    split: dict
    cv: dict
    settings: dict
    load_seconds: float
    heads: dict = field(default_factory=dict)
    seconds: float | None = None
    out_dir: str | None = None
    table: str | None = None
    metrics_path: str | None = None
    report_path: str | None = None
    train_subset: dict | None = None  # only when max_train_rows drew a subset
    audit: dict | None = None  # only with --audit (featx.runs.audit_probe)
    drop_flagged: dict | None = None  # only with --drop-flagged
    identity: dict | None = None  # the cache's data + embedding settings (featx.cache.identity): what joins runs
    run_key: str | None = None  # names the default folder: the identity and the settings that change results

    def _unset(self, name: str, value: Any) -> bool:
        return value is None and name in _LATE

    def to_dict(self) -> dict:
        """The JSON document: every field set so far, in the order metrics.json has always had."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not self._unset(f.name, getattr(self, f.name))}


def _heads_list(head: str | Sequence[str]) -> list[str]:
    if isinstance(head, str):
        names = list(ALL_HEADS) if head == "all" else [h.strip() for h in head.split(",") if h.strip()]
    else:
        names = list(head)
    if not names:
        raise FeatxError("--head: name at least one head (logreg, svm, knn, knn_dino) or all")
    for n in names:
        check_head_name(n)
    return list(dict.fromkeys(names))


def _grid_edges(params: dict, grid: dict) -> list[str]:
    """Numeric hyperparameters chosen at the smallest or largest value of a grid of 3 or more."""
    out = []
    for k, v in params.items():
        vals = grid.get(k)
        if not vals or len(vals) < 3 or not all(isinstance(x, (int, float)) for x in vals):
            continue
        if not isinstance(v, (int, float)):
            continue
        if v == max(vals) or (v == min(vals) and k != "n_neighbors"):  # k=1 is a natural lower bound
            out.append(f"{k}={v:.3g}")
    return out


def _probabilities(est) -> str:
    if getattr(est, "calibrator_", None) is not None or getattr(est, "calibration_", None) is not None:
        return "calibrated (sigmoid, out-of-fold)"
    return "native" if hasattr(est, "predict_proba") else "none"


def _fit_and_score(rows: TrainingRows, fc: FeatureCache, plan: SearchPlan):
    """Choose and fit the head on the training rows, score it on the evaluation rows: (entry, metrics, classes, est)."""
    # Streamed rows are never all in memory: one search per candidate; else a repeated paired CV among them.
    sel = select(rows, plan, fit=fit_streamed) if rows.stream else select_repeated(rows, plan)
    est, inner, table, b, fit_s = sel.est, sel.inner, sel.table, sel.chosen, sel.seconds
    view, norm = table[b].view, table[b].norm
    X_ev = rows.view(view)[1]
    t0 = time.perf_counter()
    pred = np.asarray(est.predict(X_ev))
    scores = scores_of(est, X_ev)
    pred_s = time.perf_counter() - t0
    est_classes = np.asarray(getattr(est, "classes_", np.unique(rows.y_tr)))
    m = compute_metrics(rows.y_ev, pred, classes=fc.classes, scores=scores, score_labels=est_classes)
    entry: dict[str, Any] = {
        **{k: m[k] for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1") if k in m},
        **({"top5_accuracy": m["top5_accuracy"]} if "top5_accuracy" in m else {}),
        "fit_seconds": fit_s,
        "predict_seconds": pred_s,
        "params": table[b].params,
        "view": view,
        "norm": norm,
        "train_views": table[b].train_views,
        "view_choice": _view_choice(sel),
        "views": [c.to_dict() for c in table],
        **({"choice": sel.choice} if sel.choice is not None else {}),
        "cv_score": table[b].cv_score,
        "cv_scoring": plan.scoring,
        "cv_folds": int(getattr(inner, "n_splits_", plan.folds_used)),
        "n_candidates": int(getattr(inner, "n_candidates_", 0) or 0),
        "search": getattr(inner, "parallel_", type(inner).__name__),
        "solver": "stream" if rows.stream else "memory",
        **({"selection": inner.selection_} if hasattr(inner, "selection_") else {}),
        "probabilities": _probabilities(inner),
        "per_class": m["per_class"],
        "model_path": None,
        "confusion_png": None,
    }
    keys = fc.keys()
    entry["predictions"] = make_predictions(
        rows=rows.ev, keys=[keys[i] for i in rows.ev], splits=fc.split_array()[rows.ev], y_true=rows.y_ev,
        y_pred=pred, classes=fc.classes, scores=scores, score_labels=est_classes)
    return entry, m, est_classes, est


def _view_choice(sel) -> str:
    if len(sel.table) <= 1:
        return "given"
    if sel.choice is not None:
        return ("cv, repeated and paired (first within one standard error of the paired difference between the "
                "best and the simplest candidate)")
    return "cv (first within one standard error of the best)"


def _sidecar(name: str, kernel: str, fc: FeatureCache, est_classes, entry: dict, rows: TrainingRows, split_info: dict) -> dict:
    summary = fc.summary()
    return {
        "head": name,
        "kernel": kernel if name == "svm" else None,
        "classes": list(fc.classes),
        "estimator_classes": [int(c) for c in est_classes],
        "backbone": summary.get("backbone"),
        "weights_source": summary.get("weights_source"),
        "preprocess": summary.get("preprocess"),
        "fingerprint": fc.fingerprint,
        "fingerprint_dict": fc.fingerprint_dict,
        "identity": fc.identity.to_dict(),
        "dim": fc.view_dim(entry["view"]),
        "view": entry["view"],
        "norm": entry["norm"],
        "params": entry["params"],
        "cv_score": entry["cv_score"],
        "eval_accuracy": entry["accuracy"],
        "cache": str(fc.path),
        "n_train": int(len(rows.tr)),
        "split": split_info,
    }


def _run_head(rows: TrainingRows, fc: FeatureCache, result: ProbeResult, plan: SearchPlan, s: ProbeSettings, *,
              out: Path, final: Path, plots: bool, save: bool) -> dict:
    """Search, fit, evaluate, plot and save one head into ``out`` (the run's staging folder, which becomes
    ``final``: the paths recorded name ``final``); returns its metrics.json entry."""
    name, kernel = plan.name, plan.kernel
    key = grid_key(name, kernel)
    entry, m, est_classes, est = _fit_and_score(rows, fc, plan)
    edges = _grid_edges(entry["params"], plan.grid)
    if edges:
        entry["grid_edge"] = edges
        log.warning(
            "%s: chosen %s at the edge of the searched grid; widen heads.%s in the config to be sure the "
            "optimum is inside it", name, ", ".join(edges), key,
        )
    if "confusion_matrix" in m:
        entry["confusion_matrix"] = m["confusion_matrix"]
    entry["predictions_csv"] = str(final / write_predictions(predictions_path(out, name), entry.pop("predictions")).name)
    if plots:
        png = out / f"confusion_{name}.png"
        plot_confusion(
            m["confusion_full"], fc.classes, png,
            title=f"{name} on {result.backbone} features: {result.split['eval_split']} "
            f"(n={len(rows.ev)}, accuracy {m['accuracy']:.3f})",
        )
        entry["confusion_png"] = str(final / png.name)
    if save:
        sidecar = _sidecar(name, kernel, fc, est_classes, entry, rows, result.split)
        entry["model_path"] = str(final / save_head(est, out / f"{name}.{s.head_format}", sidecar=sidecar,
                                                    format=s.head_format).name)
    log.info("%s: view %s, norm %s, accuracy %.4f (cv %.4f, %s) in %.1fs", name, entry["view"], entry["norm"],
             entry["accuracy"], entry["cv_score"], entry["params"], entry["fit_seconds"])
    return entry


def _check_args(kernel: str, folds: int | None, head_format: str, cv_repeats: int = 1) -> None:
    if int(cv_repeats) < 1:
        raise FeatxError(f"--cv-repeats must be at least 1, got {cv_repeats}")
    if head_format not in HEAD_FORMATS:
        raise FeatxError(f"--format {head_format!r}: expected one of {', '.join(HEAD_FORMATS)}")
    if kernel not in KERNELS:
        raise FeatxError(f"--kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    if folds is None or folds < 2:
        raise FeatxError(f"--folds must be at least 2, got {folds}")


def _warn_about_data(rows: TrainingRows, plan: dict, fc: FeatureCache) -> None:
    if plan["note"]:
        log.warning("%s", plan["note"])
    missing = sorted(set(np.unique(rows.y_ev)) - set(np.unique(rows.y_tr)))
    if missing:
        log.warning(
            "classes %s appear in the evaluation split but not in training: no head can predict them",
            [fc.classes[i] for i in missing],
        )


def _joined(value) -> str | None:
    return value if isinstance(value, str) or value is None else ",".join(value)


def _settings_doc(s: ProbeSettings, names: list[str], resolved: dict, cands: list) -> dict:
    """The settings saved in metrics.json (the keys it has always had)."""
    return {
        "heads": names, "kernel": s.kernel, "test_size": s.test_size, "folds": s.folds, "seed": s.seed, "solver": s.solver,
        "cv_repeats": s.cv_repeats, "device": s.device, "n_jobs": s.n_jobs,
        "grids": {grid_key(n, s.kernel): resolved[grid_key(n, s.kernel)] for n in names},
        "scoring": resolved["scoring"], "max_iter": resolved["max_iter"], "max_train_rows": s.max_train_rows,
        "view": _joined(s.view), "norm": _joined(s.norm), "train_views": s.train_views,
        "candidates": [list(c) for c in cands],
    }


# Keywords of probe() that are not options of `featx probe`, with their library defaults.
_EXTRAS = {"grids": None, "plots": True, "save": None, "report": None, "exclude_rows": None, "split": None}

# Settings that change where and how a probe is reported, not what it finds: left out of its run key.
_NOT_RESULTS = ("out_dir", "report", "mlflow", "n_jobs", "cache_dir", "cache_path", "audit")


def probe_run_key(fc, s: ProbeSettings, names: list[str], resolved: dict, split: Split, exclude) -> str:
    """The identity of what the probe reads and of every setting that changes its results."""
    doc = {k: v for k, v in asdict(s).items() if k not in _NOT_RESULTS}
    return run_key("probe", fc.identity.digest, doc, names, {n: resolved[grid_key(n, s.kernel)] for n in names},
                   split.to_dict(), exclude)


def probe(cache=None, *, settings: ProbeSettings | None = None, **overrides: Any) -> ProbeResult:
    """Train heads on a cache's training rows and evaluate them once on its evaluation rows.

    ``settings``: the options of ``featx probe`` (:class:`featx.config.ProbeSettings`, default its defaults);
    keyword ``overrides`` replace single fields (``head="logreg"``, ``folds=3``; an unknown name is a
    TypeError).  ``head`` is "logreg", "svm", "knn", "all", a comma list or a list.  Library-only
    keywords: ``grids`` (overrides of the ``heads:`` grids), ``plots`` (confusion PNGs), ``save`` (the
    fitted heads; default ``not settings.no_save``) and ``report``.

    ``cache``: a path, a :class:`FeatureCache`, a cache set of several backbones (``.multi.json``,
    :class:`featx.cache.multi.MultiCache`), or None for the newest cache (or set) in ``cache_dir``.
    ``cv_repeats``: with several candidate views, they are chosen by a repeated paired CV
    (:mod:`featx.heads.tuning.repeated_cv`); 1 = one full search per candidate.
    Hyperparameters are chosen by CV on the training rows only; the evaluation rows are the
    cache's val/test split or a seeded stratified hold-out (``test_size``).  ``max_train_rows``
    trains on a stratified, seeded subset of the training rows (for caches bigger than memory:
    the probe stops with a message naming a value that fits before reading anything).  Writes
    ``metrics.json``, ``report.md``, ``predictions_<head>.csv``, ``confusion_<head>.png`` and
    ``<head>.skops`` (``head_format="joblib"``: a pickle) + JSON sidecar to ``out_dir`` (default
    ``runs/probe-<cache stem>/``) and returns the same as a ProbeResult.

    ``report.html``: written when ``report=True``, or when a ``settings`` object says ``report`` (the
    CLI's default).  Called with no settings, the library writes none unless asked, because
    rendering it (thumbnails, embedding map) costs more than a small probe; ``featx report RUN_DIR``
    builds it later.  ``mlflow`` logs the run to MLflow.  ``view``/``norm``: ``auto`` chooses,
    per head and by the same CV, among every feature view the cache stores and the normalisations
    (:mod:`featx.heads.tuning.selection`); a name (or comma list) forces (or limits) the choice.
    ``train_views``: ``auto`` also tries training on the cache's augmented views of the training
    images (``featx embed --train-views K``; CV folds grouped by image), ``on``/``off`` force it.
    ``exclude_rows`` (library only): {"train": rows, "eval": rows} of the cache left out
    (``featx probe --drop-flagged``).
    """
    s, x = ProbeSettings.with_overrides(settings, overrides, call="probe", extras=_EXTRAS)
    report = x["report"] if x["report"] is not None else (settings is not None and s.report)
    save = x["save"] if x["save"] is not None else not s.no_save
    names = _heads_list(s.head)
    _check_args(s.kernel, s.folds, s.head_format, s.cv_repeats)
    fc = open_cache(cache, cache_dir=s.cache_dir)
    resolved = resolve_grids(x["grids"])
    cands = candidates(s.view, s.norm, fc.views, cache_name=fc.path.name, train_views=s.train_views,
                       stored_views=fc.train_views)
    split = x["split"] if x["split"] is not None else Split.of_cache(fc, test_size=s.test_size, seed=s.seed)
    split.check_matches(test_size=s.test_size, seed=s.seed, n_rows=len(fc), what="probe")
    key = probe_run_key(fc, s, names, resolved, split, x["exclude_rows"])
    out = Path(s.out_dir) if s.out_dir is not None else default_run_dir("probe", fc.path.stem, key)
    with staged_dir(out, option="--out-dir") as work:  # before any head is trained: proven writable
        rows = load_rows(fc, split, seed=s.seed, max_train_rows=s.max_train_rows, dim=held_dim(fc, cands),
                         exclude=x["exclude_rows"], solver=s.solver, linear=any(n in LINEAR_HEADS for n in names))
        if rows.stream:  # a streamed probe scores the plain rows only (featx.heads.stream.linear)
            cands = stream_candidates(cands)
        result = _new_result(fc, rows, s, settings_doc=_settings_doc(s, names, resolved, cands), key=key)
        _run_heads(rows, fc, result, s, names=names, resolved=resolved, cands=cands, x=x, save=save, dirs=(work, out))
    if report or s.mlflow:
        result.report_path = publish_run(out, cache=fc, report=report, mlflow=s.mlflow)["report"]
        if result.report_path:
            write_json(out / "metrics.json", result.to_dict())
    return result


def _new_result(fc, rows: TrainingRows, s: ProbeSettings, *, settings_doc: dict, key: str) -> ProbeResult:
    summary = fc.summary()
    return ProbeResult(
        featx_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), cache=summary,
        backbone=summary.get("backbone"), fingerprint=fc.fingerprint,
        split=dict(rows.split_desc, n_train=int(len(rows.tr)), n_eval=int(len(rows.ev))), cv=plan_folds(rows.y_tr, s.folds),
        settings=settings_doc, load_seconds=rows.load_seconds, train_subset=rows.subset,
        identity=fc.identity.to_dict(), run_key=key,
    )


def _run_heads(rows: TrainingRows, fc, result: ProbeResult, s: ProbeSettings, *, names: list[str], resolved: dict,
               cands: list, x: dict, save: bool, dirs: tuple[Path, Path]) -> None:
    """Every head, then metrics.json and report.md, into the staging folder ``dirs[0]`` (becomes ``dirs[1]``)."""
    work, out = dirs
    _warn_about_data(rows, result.cv, fc)
    t0, memo = time.perf_counter(), {}  # memo: the paired CV's proxy scores, shared by the heads
    for name in names:
        plan = SearchPlan(
            name=name, kernel=s.kernel, grid=resolved[grid_key(name, s.kernel)], scoring=resolved["scoring"],
            max_iter=resolved["max_iter"], folds=s.folds, folds_used=result.cv["used"], seed=s.seed, n_jobs=s.n_jobs,
            device="cpu" if (s.device or "cpu").lower() == "cpu" else s.device, candidates=tuple(cands),
            stream_epochs=s.stream_epochs, cv_repeats=int(s.cv_repeats), memo=memo)
        result.heads[name] = _run_head(rows, fc, result, plan, s, out=work, final=out, plots=x["plots"], save=save)
        result.heads[name]["view_dim"] = int(fc.view_dim(result.heads[name]["view"]))
    result.seconds = rows.load_seconds + time.perf_counter() - t0
    result.out_dir = str(out)
    result.table = markdown_table(result.to_dict())
    (work / "report.md").write_text(result.table + "\n", encoding="utf-8")
    result.metrics_path = str(out / "metrics.json")
    write_json(work / "metrics.json", result.to_dict())
