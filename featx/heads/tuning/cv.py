"""The scikit-learn CV search: adaptive folds shared by both head families, and ``HeadSearch``.

Defined at module level (picklable as ``featx.heads.tuning.cv.HeadSearch``).  scikit-learn is
imported at the top: import :mod:`featx.heads.tuning.grids` (which does not import this module)
where only the ``heads:`` config section is needed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any

import numpy as np
from joblib import parallel_config
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import BaseCrossValidator, GridSearchCV, KFold, ParameterGrid, StratifiedKFold
from sklearn.utils.metaestimators import available_if
from threadpoolctl import threadpool_limits

from ...data.splits import plan_folds
from ..estimators.scores import softmax_of_scores
from .grids import SMALL_PROBLEM

log = logging.getLogger(__name__)


def plain(v: Any) -> Any:
    """A numpy scalar as the Python number JSON wants."""
    if isinstance(v, np.generic):
        return v.item()
    return v


class AdaptiveStratifiedKFold(BaseCrossValidator):
    """Shuffled stratified k-fold that lowers k to what the smallest class allows (see plan_folds).

    Classes with a single image are in every training fold (so every fit sees all classes)
    and in no test fold; the other classes are split stratified.
    """

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


class GroupedViewFolds(BaseCrossValidator):
    """Folds over *images* when the training rows are ``n_plain`` plain rows followed by augmented views.

    ``source[j]`` is the plain row whose image augmented row ``n_plain + j`` shows.  The plain
    rows are split exactly as :class:`AdaptiveStratifiedKFold` splits them alone; each fold
    trains on its plain rows plus their images' augmented views, and validates on plain rows
    only — so no view of a validation image is trained on, and scores compare with a search
    on the plain rows (same validation rows).
    """

    def __init__(self, n_splits: int = 5, *, random_state: int | None = 0, n_plain: int = 0, source=None) -> None:
        self.n_splits = n_splits
        self.random_state = random_state
        self.n_plain = n_plain
        self.source = source

    def _plain(self):
        return AdaptiveStratifiedKFold(self.n_splits, random_state=self.random_state)

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self._plain().get_n_splits(None, None if y is None else np.asarray(y)[: self.n_plain])

    def split(self, X, y=None, groups=None):
        y = np.asarray(y)
        n, src = int(self.n_plain), np.asarray(self.source, dtype=np.int64)
        if len(y) != n + len(src):
            raise ValueError(f"GroupedViewFolds: {len(y)} rows, expected {n} plain + {len(src)} augmented")
        for tr, va in self._plain().split(np.zeros(n), y[:n]):
            in_tr = np.zeros(n, bool)
            in_tr[tr] = True
            yield np.concatenate([tr, n + np.flatnonzero(in_tr[src])]), va

    def _iter_test_indices(self, X=None, y=None, groups=None):  # pragma: no cover - split is overridden
        raise NotImplementedError


def cv_splits(y: np.ndarray, folds, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) row indices of every CV search, scikit-learn and torch heads alike.

    One function, so that both head families score hyperparameters on identical folds
    (including the one-image-class case, where such classes stay in every training fold).
    ``folds``: a number of folds, or a splitter such as :class:`GroupedViewFolds`.
    """
    y = np.asarray(y)
    splitter = folds if hasattr(folds, "split") else AdaptiveStratifiedKFold(folds, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def fold_plan(y: np.ndarray, folds) -> dict:
    """:func:`featx.data.splits.plan_folds` for a number of folds or a :class:`GroupedViewFolds`."""
    if isinstance(folds, GroupedViewFolds):
        return plan_folds(np.asarray(y)[: folds.n_plain], folds.n_splits)
    return plan_folds(y, folds)


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
        plan = fold_plan(y_arr, self.cv if isinstance(self.cv, GroupedViewFolds) else int(folds))
        self.cv_plan_ = plan
        # kNN: k may not exceed the number of training rows in a CV fold.
        n = len(y_arr)
        self._max_train_rows = n - int(math.ceil(n / plan["used"]))
        # Small problems: one BLAS thread per fit and no worker processes. Multi-threaded BLAS on
        # a few hundred rows is slower (10-20x when other processes compete for the cores), and
        # starting workers costs seconds, the whole search less.
        small = np.asarray(X).size < SMALL_PROBLEM
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
        return softmax_of_scores(self.best_estimator_.decision_function(X))

    @property
    def params_(self) -> dict:
        """The chosen hyperparameters, e.g. ``{"C": 0.003}``."""
        return {k.split("__")[-1]: plain(v) for k, v in self.best_params_.items()}


SCORERS = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "f1_macro": lambda y, p: f1_score(y, p, average="macro"),
    "f1_weighted": lambda y, p: f1_score(y, p, average="weighted"),
}


def score_predictions(scoring: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The CV score of predicted labels; ``scoring`` is one of :data:`SCORERS` (scikit-learn names).

    Raises NotImplementedError for scorers that need scores or probabilities, so that a
    caller can fall back to :class:`HeadSearch`, which supports every scikit-learn scorer.
    """
    if scoring not in SCORERS:
        raise NotImplementedError(f"scoring {scoring!r} (supported here: {', '.join(SCORERS)})")
    return float(SCORERS[scoring](y_true, y_pred))


def cv_summary(cands: list[dict], scores: np.ndarray) -> dict:
    """A ``cv_results_``-like dict: params, per-split and mean/std test score, rank (ties share one)."""
    mean = scores.mean(1)
    order = np.argsort(-mean, kind="stable")
    rank = np.empty(len(cands), dtype=np.int32)
    r, prev = 0, None
    for pos, i in enumerate(order):
        if prev is None or not math.isclose(mean[i], prev, rel_tol=0, abs_tol=1e-12):
            r, prev = pos + 1, mean[i]
        rank[i] = r
    out: dict[str, Any] = {"params": cands, "mean_test_score": mean, "std_test_score": scores.std(1), "rank_test_score": rank}
    for k in range(scores.shape[1]):
        out[f"split{k}_test_score"] = scores[:, k]
    for key in cands[0] if cands else []:
        out[f"param_{key}"] = np.array([c[key] for c in cands], dtype=object)
    return out
