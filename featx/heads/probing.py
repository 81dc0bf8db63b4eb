"""scikit-learn heads on cached features: logistic regression, SVM and kNN, tuned by CV.

``create_head(name)`` returns an unfitted :class:`HeadSearch` — a ``GridSearchCV`` over a
``Pipeline`` (scaling/normalisation + estimator) whose folds adapt to the smallest class, so a
class with 3 images means 3-fold CV with a logged note instead of a crash.  ``probe(cache)``
trains heads on a cache's training rows, evaluates on its ``val``/``test`` split (or a seeded
stratified hold-out from :func:`featx.data.train_eval_split`), writes ``metrics.json``, a
Markdown table, confusion matrices and the fitted heads (joblib + JSON sidecar with sha256).
``load_head`` verifies the checksum before unpickling; ``check_head_compatible`` refuses a
head trained on another backbone or preprocessing.  ``predict`` applies a saved head to image
files (embedding them with the head's backbone through :func:`featx.embed.embed`'s cache).

Hyperparameters are only ever chosen by cross-validation on the training rows.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..base.errors import FeatxError

from ..base.io import write_json
from ..base.runtime import resolve_device
from ..cache.store import FeatureCache, find_cache
from ..data.splits import plan_folds, train_eval_split
from ..report.metrics import compute_metrics, markdown_table, plot_confusion
from .grids import HEAD_NAMES, KERNELS, SMALL_PROBLEM, expand_values, resolve_grids, validate_heads_section
from .persist import save_head
from .torch_heads import create_torch_head

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- grids / config












# --------------------------------------------------------------------------- CV folds




def cv_splits(y: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) row indices of the CV search, exactly as the scikit-learn heads use them.

    For other implementations of the same search (e.g. :mod:`featx.torch_heads`), so that both
    score hyperparameters on identical folds.
    """
    _define_search_classes()
    y = np.asarray(y)
    return list(AdaptiveStratifiedKFold(folds, random_state=seed).split(np.zeros(len(y)), y))


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def _define_search_classes() -> None:
    """Define the sklearn-based classes on first use, so that importing this module (which the
    CLI does to validate the ``heads:`` config section) does not import scikit-learn."""
    global AdaptiveStratifiedKFold, HeadSearch
    if "HeadSearch" in globals():
        return
    from sklearn.base import clone
    from sklearn.model_selection import BaseCrossValidator, GridSearchCV, KFold, ParameterGrid, StratifiedKFold
    from sklearn.utils.metaestimators import available_if

    class AdaptiveStratifiedKFold(BaseCrossValidator):
        """Shuffled stratified k-fold that lowers k to what the smallest class allows (see plan_folds)."""

        def __init__(self, n_splits: int = 5, *, random_state: int | None = 0) -> None:
            self.n_splits = n_splits
            self.random_state = random_state

        def _splitter(self, y):
            plan = plan_folds(y, self.n_splits)
            cls = StratifiedKFold if plan["stratified"] else KFold
            return cls(plan["used"], shuffle=True, random_state=self.random_state)

        def get_n_splits(self, X=None, y=None, groups=None) -> int:
            if y is None:
                return self.n_splits
            return self._splitter(y).get_n_splits(X, y, groups)

        def split(self, X, y=None, groups=None):
            if y is None:
                raise ValueError("AdaptiveStratifiedKFold needs y")
            y = np.asarray(y)
            plan = plan_folds(y, self.n_splits)
            if plan.get("singletons_in_train"):
                # Classes with one image are in every training fold (so every fit sees all classes)
                # and in no test fold; the other classes are split stratified.
                cls, cnt = np.unique(y, return_counts=True)
                single = np.isin(y, cls[cnt == 1])
                rest, always = np.flatnonzero(~single), np.flatnonzero(single)
                skf = StratifiedKFold(plan["used"], shuffle=True, random_state=self.random_state)
                for tr, te in skf.split(rest, y[rest]):
                    yield np.sort(np.concatenate([rest[tr], always])), rest[te]
                return
            yield from self._splitter(y).split(X, y, groups)

        def _iter_test_indices(self, X=None, y=None, groups=None):  # pragma: no cover - split is overridden
            raise NotImplementedError

    # ------------------------------------------------------------------ the search estimator


    def _best_has(attr: str):
        def check(self) -> bool:
            if attr == "predict_proba" and getattr(self, "probability", False):
                return True
            if hasattr(self, "best_estimator_"):
                return hasattr(self.best_estimator_, attr)
            return hasattr(self.estimator, attr)

        return check

    class HeadSearch(GridSearchCV):
        """``GridSearchCV`` with adaptive folds, kNN grids capped to the fold size, and probabilities.

        ``probability=True`` makes ``predict_proba`` available for estimators without one (SVMs):
        a sigmoid calibration fitted on out-of-fold decision values (``CalibratedClassifierCV``
        with ``ensemble=False``), while ``predict`` stays the SVM's own decision.  After ``fit``:
        ``params_`` (chosen hyperparameters, without pipeline prefixes), ``best_score_``,
        ``cv_plan_`` (folds asked/used and why), ``n_candidates_``.
        """

        def __init__(
            self,
            estimator,
            param_grid,
            *,
            scoring=None,
            n_jobs=None,
            refit=True,
            cv=None,
            verbose=0,
            pre_dispatch="2*n_jobs",
            error_score=np.nan,
            return_train_score=False,
            probability=False,
        ) -> None:
            super().__init__(
                estimator, param_grid, scoring=scoring, n_jobs=n_jobs, refit=refit, cv=cv, verbose=verbose,
                pre_dispatch=pre_dispatch, error_score=error_score, return_train_score=return_train_score,
            )
            self.probability = probability

        def fit(self, X, y=None, **params):
            y_arr = np.asarray(y)
            folds = getattr(self.cv, "n_splits", 5) if not isinstance(self.cv, int) else self.cv
            plan = plan_folds(y_arr, int(folds))
            self.cv_plan_ = plan
            # kNN: k may not exceed the number of training rows in a CV fold.
            n = len(y_arr)
            self._max_train_rows = n - int(math.ceil(n / plan["used"]))
            # Small problems: one BLAS thread per fit. Multi-threaded BLAS on a few hundred rows
            # is slower, and 10-20x slower when other processes compete for the cores.
            from threadpoolctl import threadpool_limits

            from joblib import parallel_config

            small = np.asarray(X).size < SMALL_PROBLEM
            # ...and no worker processes: starting them costs seconds, the whole search less.
            backend = parallel_config(backend="sequential") if small else contextlib.nullcontext()
            self.parallel_ = "sequential (small problem)" if small else f"n_jobs={self.n_jobs}"
            with warnings.catch_warnings(), threadpool_limits(1 if small else None), backend:
                warnings.filterwarnings("ignore", message=".*[Cc]onverge.*")
                super().fit(X, y, **params)
                self.calibrator_ = None
                if self.probability and not hasattr(self.best_estimator_, "predict_proba"):
                    self.calibrator_ = self._fit_calibrator(X, y_arr)
            return self

        def _fit_calibrator(self, X, y):
            from sklearn.calibration import CalibratedClassifierCV

            cal = CalibratedClassifierCV(
                clone(self.estimator).set_params(**self.best_params_), method="sigmoid", cv=self.cv,
                ensemble=False, n_jobs=self.n_jobs,
            )
            try:
                return cal.fit(X, y)
            except ValueError as exc:  # e.g. a training fold missing a class
                log.warning("could not calibrate probabilities by cross-validation (%s); using a softmax of the scores", exc)
                return None

        def _run_search(self, evaluate_candidates) -> None:
            cands = list(ParameterGrid(self.param_grid))
            limit = getattr(self, "_max_train_rows", None)
            if limit:
                keep = [c for c in cands if all(v <= limit for k, v in c.items() if k.endswith("n_neighbors"))]
                if len(keep) < len(cands):
                    log.info("kNN: dropping k > %d (the rows in one CV training fold) from the grid", limit)
                cands = keep or [{k: (1 if k.endswith("n_neighbors") else v) for k, v in cands[0].items()}]
            self.n_candidates_ = len(cands)
            evaluate_candidates(cands)

        @available_if(_best_has("predict_proba"))
        def predict_proba(self, X):
            if getattr(self, "calibrator_", None) is not None:
                return self.calibrator_.predict_proba(X)
            if hasattr(self.best_estimator_, "predict_proba"):
                return self.best_estimator_.predict_proba(X)
            d = np.asarray(self.best_estimator_.decision_function(X), dtype=np.float64)
            if d.ndim == 1:
                d = np.stack([-d, d], axis=1)
            d = d - d.max(axis=1, keepdims=True)
            e = np.exp(d)
            return e / e.sum(axis=1, keepdims=True)

        @property
        def params_(self) -> dict:
            """The chosen hyperparameters, e.g. ``{"C": 0.003}``."""
            return {k.split("__")[-1]: _plain(v) for k, v in self.best_params_.items()}

    for cls in (AdaptiveStratifiedKFold, HeadSearch):
        cls.__qualname__ = cls.__name__  # picklable as featx.heads.<name>
        cls.__module__ = __name__


def __getattr__(name: str):
    if name in ("AdaptiveStratifiedKFold", "HeadSearch"):
        _define_search_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- factory


def _check_name(name: str) -> str:
    if name not in HEAD_NAMES:
        close = difflib.get_close_matches(str(name), HEAD_NAMES, n=1)
        raise FeatxError(
            f"unknown head {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; choose --head {', '.join(HEAD_NAMES)} or all"
        )
    return name


def grid_key(name: str, kernel: str = "linear") -> str:
    """Key of a head's grid in ``heads:``: the name, or ``svm_rbf`` for the RBF SVM."""
    return "svm_rbf" if name == "svm" and kernel == "rbf" else name


def _wants_cuda(device: str) -> bool:
    d = (device or "cpu").lower()
    if d == "cpu":
        return False
    if d == "auto" and "torch" not in sys.modules and sys.platform.startswith("linux"):
        # Importing torch only to learn there is no GPU costs seconds; no NVIDIA driver, no CUDA.
        if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")):
            return False

    return resolve_device(d).startswith("cuda")


def create_head(
    name: str,
    *,
    kernel: str = "linear",
    grid: dict | None = None,
    folds: int = 5,
    seed: int = 0,
    n_jobs: int | None = -1,
    device: str = "cpu",
    scoring: str | None = None,
    max_iter: int | None = None,
    probability: bool = True,
):
    """An unfitted head: hyperparameter search by stratified CV over scaling + estimator.

    ``grid`` maps parameter -> values (lists or ``{"logspace": [a, b, n]}``) for this head and
    replaces its default grid parameter by parameter.  On CUDA (``device`` "cuda" or "auto" with
    a GPU) the torch implementation from :mod:`featx.torch_heads` is used when present.
    """
    _check_name(name)
    if kernel not in KERNELS:
        raise FeatxError(f"--kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    key = grid_key(name, kernel)
    resolved = resolve_grids()
    g = dict(resolved[key])
    if grid:
        validate_heads_section({key: grid}, "grid")
        g.update({p: expand_values(v, where=f"grid.{p}") for p, v in grid.items()})
    scoring = scoring or resolved["scoring"]
    max_iter = int(max_iter or resolved["max_iter"])

    if _wants_cuda(device):
        try:
            return create_torch_head(name, grid=g, folds=folds, seed=seed, device=device, kernel=kernel)
        except NotImplementedError as exc:
            log.warning("no GPU implementation of head %r (%s); using scikit-learn on the CPU", name, exc)

    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        # lbfgs fits the multinomial (softmax) model for more than two classes.
        pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=max_iter))])
    elif name == "svm" and kernel == "linear":
        from sklearn.svm import LinearSVC

        pipe = Pipeline([("scale", StandardScaler()), ("clf", LinearSVC(max_iter=max_iter, random_state=seed))])
    elif name == "svm":
        from sklearn.svm import SVC

        pipe = Pipeline(
            [("scale", StandardScaler()), ("norm", Normalizer()), ("clf", SVC(kernel="rbf", random_state=seed))]
        )
    else:  # knn: cosine on L2-normalised features
        pipe = Pipeline([("norm", Normalizer()), ("clf", KNeighborsClassifier(algorithm="brute"))])
    param_grid = {f"clf__{p}": list(v) for p, v in g.items()}
    _define_search_classes()
    return HeadSearch(
        pipe, param_grid, scoring=scoring, n_jobs=n_jobs, cv=AdaptiveStratifiedKFold(folds, random_state=seed),
        probability=probability,
    )


# --------------------------------------------------------------------------- save / load














# --------------------------------------------------------------------------- probe


def _open_cache(cache, cache_dir: str | os.PathLike):

    if isinstance(cache, FeatureCache):
        return cache
    return FeatureCache(find_cache(cache, cache_dir=cache_dir))


def _gather_rows(fc, rows: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Features of global ``rows``, read one split at a time (never the whole cache at once)."""
    out = np.empty((len(rows), fc.dim), dtype=np.float32)
    for name in fc.splits:
        in_split = np.flatnonzero(splits == name)
        if not len(in_split):
            continue
        start = int(in_split[0])
        mask = (rows >= start) & (rows < start + len(in_split))
        if mask.any():
            out[mask] = fc.features(name)[rows[mask] - start]
    return out


def _heads_list(head: str | Sequence[str]) -> list[str]:
    if isinstance(head, str):
        names = list(HEAD_NAMES) if head == "all" else [h.strip() for h in head.split(",") if h.strip()]
    else:
        names = list(head)
    if not names:
        raise FeatxError("--head: name at least one head (logreg, svm, knn) or all")
    for n in names:
        _check_name(n)
    return list(dict.fromkeys(names))


def scores_of(est, X) -> np.ndarray | None:
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
) -> dict:
    """Train ``head`` ("logreg", "svm", "knn", "all" or a list) on a cache and evaluate it.

    ``cache``: a path, a :class:`FeatureCache`, or None for the newest cache in ``cache_dir``.
    Hyperparameters are chosen by CV on the training rows only; the evaluation rows are the
    cache's val/test split or a seeded stratified hold-out (``test_size``).  Writes
    ``metrics.json``, ``report.md``, ``confusion_<head>.png`` and ``<head>.joblib`` (+ sidecar)
    to ``out_dir`` (default ``runs/probe-<cache stem>/``) and returns the same dict.
    """

    names = _heads_list(head)
    if kernel not in KERNELS:
        raise FeatxError(f"--kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    if folds is None or folds < 2:
        raise FeatxError(f"--folds must be at least 2, got {folds}")
    fc = _open_cache(cache, cache_dir)
    resolved = resolve_grids(grids)
    t_load = time.perf_counter()
    labels = fc.labels()
    splits = fc.split_array()
    tr, ev, split_desc = train_eval_split(labels, splits, test_size=test_size, seed=seed)
    if not len(ev):
        raise FeatxError(
            f"cache {fc.path.name} leaves no rows to evaluate on; add a val/ split or raise --test-size"
        )
    X_tr, y_tr = _gather_rows(fc, tr, splits), labels[tr]
    X_ev, y_ev = _gather_rows(fc, ev, splits), labels[ev]
    load_seconds = time.perf_counter() - t_load
    for what, X_, y_, idx in (("training", X_tr, y_tr, tr), ("evaluation", X_ev, y_ev, ev)):
        bad = ~np.isfinite(X_).all(axis=1)
        if bad.any():
            log.warning(
                "%d %s rows of %s have NaN/inf features and are left out; rebuild the cache with "
                "`featx embed ... --dtype float32 --overwrite`", int(bad.sum()), what, fc.path.name,
            )
            if what == "training":
                X_tr, y_tr, tr = X_[~bad], y_[~bad], idx[~bad]
            else:
                X_ev, y_ev, ev = X_[~bad], y_[~bad], idx[~bad]
    plan = plan_folds(y_tr, folds)
    if plan["note"]:
        log.warning("%s", plan["note"])
    missing = sorted(set(np.unique(y_ev)) - set(np.unique(y_tr)))
    if missing:
        log.warning(
            "classes %s appear in the evaluation split but not in training: no head can predict them",
            [fc.classes[i] for i in missing],
        )
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"probe-{fc.path.stem}"
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if (device or "cpu").lower() == "cpu" else device
    summary = fc.summary()
    split_info = dict(split_desc, n_train=int(len(tr)), n_eval=int(len(ev)))
    settings = {
        "heads": names, "kernel": kernel, "test_size": test_size, "folds": folds, "seed": seed,
        "device": device, "n_jobs": n_jobs, "grids": {grid_key(n, kernel): resolved[grid_key(n, kernel)] for n in names},
        "scoring": resolved["scoring"], "max_iter": resolved["max_iter"],
    }
    result: dict[str, Any] = {
        "featx_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cache": summary,
        "backbone": summary.get("backbone"),
        "fingerprint": fc.fingerprint,
        "split": split_info,
        "cv": plan,
        "settings": settings,
        "load_seconds": load_seconds,
        "heads": {},
    }
    fp_dict = fc.fingerprint_dict
    for name in names:
        est = create_head(
            name, kernel=kernel, grid=resolved[grid_key(name, kernel)], folds=folds, seed=seed, n_jobs=n_jobs,
            device=dev, scoring=resolved["scoring"], max_iter=resolved["max_iter"],
        )
        log.info("fitting %s on %d rows x %d features (%d-fold CV)", name, len(tr), fc.dim, plan["used"])
        t0 = time.perf_counter()
        est.fit(X_tr, y_tr)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = np.asarray(est.predict(X_ev))
        scores = scores_of(est, X_ev)
        pred_s = time.perf_counter() - t0
        est_classes = np.asarray(getattr(est, "classes_", np.unique(y_tr)))
        m = compute_metrics(y_ev, pred, classes=fc.classes, scores=scores, score_labels=est_classes)
        params = getattr(est, "params_", None) or {k.split("__")[-1]: _plain(v) for k, v in getattr(est, "best_params_", {}).items()}
        if name == "svm":
            params = {"kernel": kernel, **params}
        entry: dict[str, Any] = {
            **{k: m[k] for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1") if k in m},
            **({"top5_accuracy": m["top5_accuracy"]} if "top5_accuracy" in m else {}),
            "fit_seconds": fit_s,
            "predict_seconds": pred_s,
            "params": params,
            "cv_score": _plain(getattr(est, "best_score_", float("nan"))),
            "cv_scoring": resolved["scoring"],
            "cv_folds": int(getattr(est, "n_splits_", plan["used"])),
            "n_candidates": int(getattr(est, "n_candidates_", 0) or 0),
            "search": getattr(est, "parallel_", type(est).__name__),
            "probabilities": "calibrated (sigmoid, out-of-fold)" if getattr(est, "calibrator_", None) is not None
            else ("native" if hasattr(est, "predict_proba") else "none"),
            "per_class": m["per_class"],
            "model_path": None,
            "confusion_png": None,
        }
        edges = _grid_edges(params, resolved[grid_key(name, kernel)])
        if edges:
            entry["grid_edge"] = edges
            log.warning(
                "%s: chosen %s at the edge of the searched grid; widen heads.%s in the config to be sure the "
                "optimum is inside it", name, ", ".join(edges), grid_key(name, kernel),
            )
        if "confusion_matrix" in m:
            entry["confusion_matrix"] = m["confusion_matrix"]
        if plots:
            png = out / f"confusion_{name}.png"
            plot_confusion(
                m["confusion_full"], fc.classes, png,
                title=f"{name} on {summary.get('backbone')} features: {split_info['eval_split']} "
                f"(n={len(ev)}, accuracy {m['accuracy']:.3f})",
            )
            entry["confusion_png"] = str(png)
        if save:
            sidecar = {
                "head": name,
                "kernel": kernel if name == "svm" else None,
                "classes": list(fc.classes),
                "estimator_classes": [int(c) for c in est_classes],
                "backbone": summary.get("backbone"),
                "weights_source": summary.get("weights_source"),
                "preprocess": summary.get("preprocess"),
                "fingerprint": fc.fingerprint,
                "fingerprint_dict": fp_dict,
                "dim": fc.dim,
                "params": params,
                "cv_score": entry["cv_score"],
                "eval_accuracy": entry["accuracy"],
                "cache": str(fc.path),
                "n_train": int(len(tr)),
                "split": split_info,
            }
            entry["model_path"] = str(save_head(est, out / f"{name}.joblib", sidecar=sidecar))
        log.info("%s: accuracy %.4f (cv %.4f, %s) in %.1fs", name, entry["accuracy"], entry["cv_score"], params, fit_s)
        result["heads"][name] = entry
    result["seconds"] = time.perf_counter() - t_load
    result["out_dir"] = str(out)
    result["table"] = markdown_table(result)
    (out / "report.md").write_text(result["table"] + "\n", encoding="utf-8")
    result["metrics_path"] = str(out / "metrics.json")
    write_json(out / "metrics.json", result)
    return result


# --------------------------------------------------------------------------- predict




