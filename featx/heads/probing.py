"""``probe``: train heads on a cache's training rows, evaluate them, write the run's files.

Hyperparameters are only ever chosen by cross-validation on the training rows (the search
lives in :mod:`featx.heads.search`, :mod:`featx.heads.linear_path` and
:mod:`featx.heads.torch_heads`; :func:`featx.heads.factory.create_head` picks one).  The
evaluation rows are the cache's ``val``/``test`` split or a seeded stratified hold-out
(:func:`featx.data.train_eval_split`).  Writes ``metrics.json``, a Markdown table, confusion
matrices and the fitted heads (``save_head``: model file + JSON sidecar with sha256).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..base.errors import FeatxError
from ..base.io import write_json
from ..cache.multi import open_cache
from ..cache.store import FeatureCache, find_cache  # noqa: F401 - re-exported
from ..data.splits import plan_folds, train_eval_split
from ..report.metrics import compute_metrics, markdown_table, plot_confusion
from ..report.predictions import make_predictions, predictions_path, write_predictions
from ..report.publish import publish_run
from .factory import check_head_name, create_head, grid_key
from .grids import ALL_HEADS, KERNELS, resolve_grids
from .memory import check_memory, stratified_subset
from .persist import HEAD_FORMATS, save_head
from .repeated_cv import choose_plain
from .selection import Candidate, best_index, candidates, fold_std_err, with_norm
from .search import AdaptiveStratifiedKFold, GroupedViewFolds, HeadSearch, cv_splits, plain  # noqa: F401
from .torch_heads import create_torch_head  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

# Rows read from the cache per block: a few tens of MB, so reading never needs twice the features.
READ_BLOCK_BYTES = 32 << 20


@dataclass(eq=False)
class ProbeResult(dict):
    """What :func:`probe` returns and writes to ``metrics.json`` (``to_dict()``, same keys as ever).

    Also a dict holding the same values (``result["heads"]``), so that callers written for the
    former dict, ``json.dumps`` and :func:`featx.base.io.write_json` keep working unchanged.
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

    def to_dict(self) -> dict:
        """The JSON document: every field set so far, in the order metrics.json has always had."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not _unset(f.name, getattr(self, f.name))}

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if _unset(name, value):
            self.pop(name, None)
        else:
            dict.__setitem__(self, name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value) if key in self.__dataclass_fields__ else dict.__setitem__(self, key, value)


def _unset(name: str, value: Any) -> bool:
    """Fields filled at the end of a probe (or only with a subset) are left out until set."""
    return value is None and name in ("seconds", "out_dir", "table", "metrics_path", "train_subset", "report_path")


@dataclass
class _Rows:
    """Training and evaluation features read from a cache, with where they came from."""

    X_tr: np.ndarray
    y_tr: np.ndarray
    tr: np.ndarray
    X_ev: np.ndarray
    y_ev: np.ndarray
    ev: np.ndarray
    split_desc: dict
    load_seconds: float
    subset: dict | None
    fc: FeatureCache | None = None
    # The last other view (or augmented rows) read: at most one is held beside the final features,
    # so choosing among views needs memory for two, not for all of them.
    by_view: dict = field(default_factory=dict)

    def _held(self, key, read):
        if key not in self.by_view:
            self.by_view.clear()
            self.by_view[key] = read()
        return self.by_view[key]

    def augmented(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Features of view ``name`` of the training rows' augmented views, and their row in ``X_tr``."""
        def read():
            X, src = self.fc.augmented(self.tr, view=name)
            return X, np.searchsorted(self.tr, src)  # tr is sorted

        return self._held(("augmented", name), read)

    def training(self, name: str, train_views: int, *, folds: int, seed: int):
        """(X, y, folds) to fit on: the plain training rows, plus their augmented views with
        folds grouped by image (:class:`featx.heads.search.GroupedViewFolds`) when asked."""
        X_tr = self.view(name)[0]
        if not train_views:
            return X_tr, self.y_tr, folds
        X_aug, src = self.augmented(name)
        grouped = GroupedViewFolds(folds, random_state=seed, n_plain=len(X_tr), source=src)
        return np.vstack([X_tr, X_aug]), np.concatenate([self.y_tr, self.y_tr[src]]), grouped

    def view(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Training and evaluation features of view ``name`` (``final``: the cache's features)."""
        if name == "final":
            return self.X_tr, self.X_ev
        def read():
            splits = self.fc.split_array()
            return read_rows(self.fc, self.tr, splits, view=name), read_rows(self.fc, self.ev, splits, view=name)

        return self._held(name, read)


def _open_cache(cache, cache_dir: str | os.PathLike) -> FeatureCache:
    """A cache, or a set of several backbones' caches (:class:`featx.cache.multi.MultiCache`)."""
    return open_cache(cache, cache_dir=cache_dir)


def read_rows(fc: FeatureCache, rows: np.ndarray, splits: np.ndarray, *, view: str | None = None) -> np.ndarray:
    """float32 features (of ``view``) of sorted global ``rows``, read in blocks (never a whole split at once).

    ``splits``: the cache's per-row split names (each split is one contiguous run of rows).
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    dim = fc.view_dim(view)
    out = np.empty((len(rows), dim), dtype=np.float32)
    block = max(256, READ_BLOCK_BYTES // max(1, 4 * dim))
    for name in fc.splits:
        in_split = np.flatnonzero(splits == name)
        a, b = int(in_split[0]), int(in_split[-1]) + 1
        lo, hi = np.searchsorted(rows, [a, b])
        if lo == hi:
            continue
        start = a
        for chunk in fc.iter_features(name, rows=block, view=view):
            c_lo, c_hi = np.searchsorted(rows, [start, start + len(chunk)])
            out[c_lo:c_hi] = chunk[rows[c_lo:c_hi] - start]
            start += len(chunk)
    return out


def _drop_non_finite(X: np.ndarray, y: np.ndarray, idx: np.ndarray, what: str, name: str):
    bad = ~np.isfinite(X).all(axis=1)
    if not bad.any():
        return X, y, idx
    log.warning(
        "%d %s rows of %s have NaN/inf features and are left out; rebuild the cache with "
        "`featx embed ... --dtype float32 --overwrite`", int(bad.sum()), what, name,
    )
    return X[~bad], y[~bad], idx[~bad]


def _load_rows(fc: FeatureCache, *, test_size: float, seed: int, max_train_rows: int | None, dim: int) -> _Rows:
    """Split, subset (``max_train_rows``), check memory, then read the features block by block."""
    t0 = time.perf_counter()
    labels, splits = fc.labels(), fc.split_array()
    tr, ev, split_desc = train_eval_split(labels, splits, test_size=test_size, seed=seed)
    if not len(ev):
        raise FeatxError(f"cache {fc.path.name} leaves no rows to evaluate on; add a val/ split or raise --test-size")
    subset = None
    if max_train_rows is not None:
        kept = stratified_subset(tr, labels[tr], int(max_train_rows), seed=seed)
        if len(kept) < len(tr):
            subset = {"max_train_rows": int(max_train_rows), "n_available": int(len(tr)), "n_used": int(len(kept)),
                      "stratified": True, "seed": seed}
            log.info("training on a stratified subset of %d of %d training rows", len(kept), len(tr))
        tr = kept
    mem = check_memory(len(tr), len(ev), dim, len(fc.classes), cache_name=fc.path.name)
    log.info("probe memory: about %.0f MiB needed", mem["needed_bytes"] / 2**20)
    X_tr, y_tr, tr = _drop_non_finite(read_rows(fc, tr, splits), labels[tr], tr, "training", fc.path.name)
    X_ev, y_ev, ev = _drop_non_finite(read_rows(fc, ev, splits), labels[ev], ev, "evaluation", fc.path.name)
    return _Rows(X_tr, y_tr, tr, X_ev, y_ev, ev, split_desc, time.perf_counter() - t0, subset, fc)


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


def scores_of(est, X) -> np.ndarray | None:
    """Class scores of a fitted head: probabilities where it has them, else decision values."""
    if hasattr(est, "predict_proba"):
        return np.asarray(est.predict_proba(X))
    if hasattr(est, "decision_function"):
        d = np.asarray(est.decision_function(X))
        return np.stack([-d, d], axis=1) if d.ndim == 1 else d
    return None


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


def _params(name: str, inner, kernel: str) -> dict:
    params = getattr(inner, "params_", None) or {k.split("__")[-1]: plain(v)
                                                 for k, v in getattr(inner, "best_params_", {}).items()}
    return {"kernel": kernel, **params} if name == "svm" else dict(params)


def _fit_candidate(name: str, rows: _Rows, cand: tuple[str, str, int], opts: dict):
    """(fitted head, its inner CV search, Candidate row) of one (view, norm, augmented views)."""
    kernel, resolved = opts["kernel"], opts["resolved"]
    view, norm, k = cand
    X, y, folds = rows.training(view, k, folds=opts["folds"], seed=opts["seed"])
    inner = create_head(
        name, kernel=kernel, grid=resolved[grid_key(name, kernel)], folds=folds, seed=opts["seed"],
        n_jobs=opts["n_jobs"], device=opts["device"], scoring=resolved["scoring"], max_iter=resolved["max_iter"],
        problem=(len(y), X.shape[1], len(np.unique(y))),
    )
    est = with_norm(inner, norm)
    log.info("fitting %s on %d rows x %d features of view %s, norm %s%s (%d-fold CV)", name, len(y), X.shape[1],
             view, norm, f", {k} augmented views per image" if k else "", opts["plan"]["used"])
    t1 = time.perf_counter()
    est.fit(X, y)
    row = Candidate(view, norm, k, int(X.shape[1]), float(plain(getattr(inner, "best_score_", np.nan))),
                    fold_std_err(inner), _params(name, inner, kernel), time.perf_counter() - t1)
    return est, inner, row


def _select(name: str, rows: _Rows, opts: dict):
    """Fit the head's CV search on the candidates (view, norm, augmented views) of the training rows.

    Returns (chosen fitted head, its inner search, the table of candidates, index of the choice,
    seconds).  Only training rows are used; every candidate is scored on the same folds.  Two
    stages, because a fit on the augmented views costs (1 + K) plain fits: the view and norm are
    chosen on the plain rows, then the augmented views are tried on that choice only (with
    ``--train-views on`` they are then used whatever their score).  Only the current choice is
    kept fitted (heads such as kNN hold their training rows); one dropped earlier is refitted.
    """
    cands = opts["candidates"]
    plain = list(dict.fromkeys((v, n, 0) for v, n, _ in cands))
    aug = sorted({k for _, _, k in cands if k})
    forced_aug = bool(aug) and all(k for _, _, k in cands)
    table: list[Candidate] = []
    kept: dict[int, tuple] = {}
    t0 = time.perf_counter()
    if forced_aug and len(plain) == 1:  # nothing to choose on the plain rows
        plain = []
    if len(plain) > 1 and opts["cv_repeats"] > 1:  # several candidates: repeated paired CV (issue 19)
        return _select_repeated(name, rows, plain, aug, forced_aug, opts, t0)
    for cand in plain:
        _try(name, rows, cand, opts, table, kept)
    if aug:
        chosen = table[best_index(table)] if table else None
        view, norm = (chosen.view, chosen.norm) if chosen else cands[0][:2]
        _try(name, rows, (view, norm, aug[-1]), opts, table, kept)
    b = len(table) - 1 if forced_aug else best_index(table)
    if b not in kept:
        c = table[b]
        kept[b] = _fit_candidate(name, rows, (c.view, c.norm, c.train_views), opts)[:2]
    return kept[b][0], kept[b][1], table, b, time.perf_counter() - t0


def _select_repeated(name: str, rows: _Rows, plain: list, aug: list, forced_aug: bool, opts: dict, t0: float):
    """:func:`_select` among several plain candidates: chosen by :func:`featx.heads.repeated_cv.choose_plain`
    (a cheap proxy on repeated paired folds), then only the choice is fitted by the head's own search.
    Augmented views, if any, are tried on that choice and kept when their search beats its search."""
    table, b, choice = choose_plain(rows, plain, head=name, folds=opts["folds"], repeats=opts["cv_repeats"],
                                    seed=opts["seed"], memo=opts.setdefault("proxy_memo", {}))
    est, inner, real = _fit_candidate(name, rows, (table[b].view, table[b].norm, 0), opts)
    table[b].params, table[b].fit_seconds = real.params, real.fit_seconds
    opts.setdefault("choices", {})[name] = {**choice.to_dict(), "search_cv_score": real.cv_score}
    if aug:
        a_est, a_inner, a_row = _fit_candidate(name, rows, (table[b].view, table[b].norm, aug[-1]), opts)
        table.append(a_row)
        if forced_aug or best_index([real, a_row]) == 1:
            return a_est, a_inner, table, len(table) - 1, time.perf_counter() - t0
    return est, inner, table, b, time.perf_counter() - t0


def _try(name: str, rows: _Rows, cand: tuple, opts: dict, table: list, kept: dict) -> None:
    """Fit one candidate, add its row to ``table``; keep it fitted if it is the current choice."""
    est, inner, row = _fit_candidate(name, rows, cand, opts)
    table.append(row)
    kept[len(table) - 1] = (est, inner)
    keep = {best_index(table)} | ({len(table) - 1} if row.train_views else set())
    for i in [i for i in kept if i not in keep]:
        del kept[i]


def _fit_and_score(name: str, rows: _Rows, fc: FeatureCache, *, opts: dict):
    """Choose and fit the head on the training rows, score it on the evaluation rows: (entry, metrics, classes, est)."""
    est, inner, table, b, fit_s = _select(name, rows, opts)
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
        "view_choice": _view_choice(name, table, opts),
        "views": [c.to_dict() for c in table],
        **({"choice": opts["choices"][name]} if name in opts.get("choices", {}) else {}),
        "cv_score": table[b].cv_score,
        "cv_scoring": opts["resolved"]["scoring"],
        "cv_folds": int(getattr(inner, "n_splits_", opts["plan"]["used"])),
        "n_candidates": int(getattr(inner, "n_candidates_", 0) or 0),
        "search": getattr(inner, "parallel_", type(inner).__name__),
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


def _view_choice(name: str, table: list, opts: dict) -> str:
    if len(table) <= 1:
        return "given"
    if name in opts.get("choices", {}):
        return ("cv, repeated and paired (first within one standard error of the paired difference between the "
                "best and the simplest candidate)")
    return "cv (first within one standard error of the best)"


def _sidecar(name: str, kernel: str, fc: FeatureCache, est_classes, entry: dict, rows: _Rows, split_info: dict) -> dict:
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


def _run_head(name: str, rows: _Rows, fc: FeatureCache, result: ProbeResult, out: Path, *, opts: dict) -> dict:
    """Search, fit, evaluate, plot and save one head; returns its metrics.json entry."""
    kernel, resolved = opts["kernel"], opts["resolved"]
    key = grid_key(name, kernel)
    entry, m, est_classes, est = _fit_and_score(name, rows, fc, opts=opts)
    edges = _grid_edges(entry["params"], resolved[key])
    if edges:
        entry["grid_edge"] = edges
        log.warning(
            "%s: chosen %s at the edge of the searched grid; widen heads.%s in the config to be sure the "
            "optimum is inside it", name, ", ".join(edges), key,
        )
    if "confusion_matrix" in m:
        entry["confusion_matrix"] = m["confusion_matrix"]
    entry["predictions_csv"] = str(write_predictions(predictions_path(out, name), entry.pop("predictions")))
    if opts["plots"]:
        png = out / f"confusion_{name}.png"
        plot_confusion(
            m["confusion_full"], fc.classes, png,
            title=f"{name} on {result.backbone} features: {result.split['eval_split']} "
            f"(n={len(rows.ev)}, accuracy {m['accuracy']:.3f})",
        )
        entry["confusion_png"] = str(png)
    if opts["save"]:
        sidecar = _sidecar(name, kernel, fc, est_classes, entry, rows, result.split)
        entry["model_path"] = str(save_head(est, out / f"{name}.{opts['head_format']}", sidecar=sidecar, format=opts["head_format"]))
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


def _warn_about_data(rows: _Rows, plan: dict, fc: FeatureCache) -> None:
    if plan["note"]:
        log.warning("%s", plan["note"])
    missing = sorted(set(np.unique(rows.y_ev)) - set(np.unique(rows.y_tr)))
    if missing:
        log.warning(
            "classes %s appear in the evaluation split but not in training: no head can predict them",
            [fc.classes[i] for i in missing],
        )


def _held_dim(fc: FeatureCache, cands: list) -> int:
    """Feature columns per training row held at once: the final features and one other view (the
    widest), which an augmented fit holds 1 + K times (plain rows, their views, and the stack of both)."""
    other = max((fc.view_dim(v) for v, _, _ in cands if v != "final"), default=0)
    k = max(k for _, _, k in cands)
    return fc.dim + other + (2 * (1 + k) * max(other, fc.dim) if k else 0)


def _joined(value) -> str | None:
    return value if isinstance(value, str) or value is None else ",".join(value)


def probe(
    cache=None,
    *,
    head: str | Sequence[str] = "svm",
    kernel: str = "linear",
    test_size: float = 0.2,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    n_jobs: int | None = -1,
    out_dir: str | os.PathLike | None = None,
    grids: dict | None = None,
    save: bool = True,
    cache_dir: str | os.PathLike = "cache",
    plots: bool = True,
    max_train_rows: int | None = None,
    head_format: str = "skops",
    report: bool = False,
    mlflow: bool = False,
    view: str | Sequence[str] | None = "auto",
    norm: str | Sequence[str] | None = "auto",
    train_views: str = "auto",
    cv_repeats: int = 3,
) -> ProbeResult:
    """Train ``head`` ("logreg", "svm", "knn", "all" or a list) on a cache and evaluate it.

    ``cache``: a path, a :class:`FeatureCache`, or None for the newest cache in ``cache_dir``.
    Hyperparameters are chosen by CV on the training rows only; the evaluation rows are the
    cache's val/test split or a seeded stratified hold-out (``test_size``).  ``max_train_rows``
    trains on a stratified, seeded subset of the training rows (for caches bigger than memory:
    the probe stops with a message naming a value that fits before reading anything).  Writes
    ``metrics.json``, ``report.md``, ``predictions_<head>.csv``, ``confusion_<head>.png`` and
    ``<head>.skops`` (``head_format="joblib"``: a pickle) + JSON sidecar to ``out_dir`` (default
    ``runs/probe-<cache stem>/``) and returns the same as a ProbeResult.  ``report`` also writes
    ``report.html``; ``mlflow`` logs the run to MLflow.  ``view``/``norm``: ``auto`` chooses, per
    head and by the same CV, among every feature view the cache stores and the normalisations
    none/power (:mod:`featx.heads.selection`); a name (or comma list) forces (or limits) the choice.
    ``train_views``: ``auto`` also tries training on the cache's augmented views of the training
    images (``featx embed --train-views K``; CV folds grouped by image), ``on``/``off`` force it.
    """
    names = _heads_list(head)
    _check_args(kernel, folds, head_format, cv_repeats)
    fc = _open_cache(cache, cache_dir)
    resolved = resolve_grids(grids)
    cands = candidates(view, norm, fc.views, cache_name=fc.path.name, train_views=train_views,
                       stored_views=fc.train_views)
    rows = _load_rows(fc, test_size=test_size, seed=seed, max_train_rows=max_train_rows, dim=_held_dim(fc, cands))
    plan = plan_folds(rows.y_tr, folds)
    _warn_about_data(rows, plan, fc)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"probe-{fc.path.stem}"
    out.mkdir(parents=True, exist_ok=True)
    settings, summary = {
        "heads": names, "kernel": kernel, "test_size": test_size, "folds": folds, "seed": seed, "cv_repeats": cv_repeats,
        "device": device, "n_jobs": n_jobs, "grids": {grid_key(n, kernel): resolved[grid_key(n, kernel)] for n in names},
        "scoring": resolved["scoring"], "max_iter": resolved["max_iter"], "max_train_rows": max_train_rows,
        "view": _joined(view), "norm": _joined(norm), "train_views": train_views, "candidates": [list(c) for c in cands],
    }, fc.summary()
    result = ProbeResult(
        featx_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), cache=summary,
        backbone=summary.get("backbone"), fingerprint=fc.fingerprint,
        split=dict(rows.split_desc, n_train=int(len(rows.tr)), n_eval=int(len(rows.ev))), cv=plan, settings=settings,
        load_seconds=rows.load_seconds, train_subset=rows.subset,
    )
    opts = {"kernel": kernel, "resolved": resolved, "folds": folds, "seed": seed, "n_jobs": n_jobs, "plots": plots,
            "cv_repeats": int(cv_repeats), "save": save, "candidates": cands, "plan": plan, "head_format": head_format,
            "device": "cpu" if (device or "cpu").lower() == "cpu" else device}
    t0 = time.perf_counter()
    for name in names:
        result.heads[name] = _run_head(name, rows, fc, result, out, opts=opts)
    result.seconds = rows.load_seconds + time.perf_counter() - t0
    result.out_dir = str(out)
    result.table = markdown_table(result.to_dict())
    (out / "report.md").write_text(result.table + "\n", encoding="utf-8")
    result.metrics_path = str(out / "metrics.json")
    write_json(out / "metrics.json", result.to_dict())
    if report or mlflow:
        result.report_path = publish_run(out, cache=fc, report=report, mlflow=mlflow)["report"]
        if result.report_path:
            write_json(out / "metrics.json", result.to_dict())
    return result
