"""Choosing the feature view and normalisation of a head by cross-validation (issue 12).

A cache may store several views of each image (:mod:`featx.cache.views`).  For each head the
probe fits its usual CV search once per candidate (view, normalisation) on the training rows,
and every candidate is scored on the same folds (the search's folds depend only on the labels
and the seed); the evaluation split is never looked at.  The choice follows the
one-standard-error rule: the *first* candidate (simplest first: the plain ``final`` view, no
normalisation, no augmented views) whose mean CV score is within one standard error of the
best one's.  With a few hundred training rows, CV differences of a few tenths of a point are
noise (one fold of 144 flowers12 images moves by 0.7 pt per image); picking the raw maximum
chose kNN with power-norm on flowers12 and lost 1.7 pt on the test split.

Augmented training views (``featx embed --train-views K``) multiply a fit's rows by 1 + K, so
they are tried in a second stage, on the view and normalisation chosen on the plain rows only.

Normalisations (row-wise, stateless, applied before the head's own scaling):
``none`` (the head as it always was: logreg/SVM standardise, kNN uses cosine),
``l2`` (unit-length rows), ``power`` (signed square root, then unit length).  ``--norm auto``
tries ``none`` only; name several (``--norm none,l2,power``) to let CV choose among them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

from ..base.errors import FeatxError

NORMS = ("none", "l2", "power")
# --norm auto: only the head's own scaling.  Power-norm measured no gain for logreg/SVM on
# flowers12 and hymenoptera with the full training set, and CV picked it for kNN on flowers12
# (+1.0 pt CV) where it lost 1.7 pt on the test split (ACCURACY.md); --norm none,l2,power lets CV choose.
AUTO_NORMS = ("none",)


class FeatureNorm(TransformerMixin, BaseEstimator):
    """Row-wise normalisation ``kind`` (none, l2, power); nothing is learned from the data."""

    def __init__(self, kind: str = "none") -> None:
        self.kind = kind

    def fit(self, X, y=None) -> "FeatureNorm":
        if self.kind not in NORMS:
            raise FeatxError(f"--norm {self.kind!r}: expected one of {', '.join(NORMS)} or auto")
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.kind == "none":
            return X
        if self.kind == "power":
            X = np.sign(X) * np.sqrt(np.abs(X))
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def with_norm(est, kind: str):
    """``est`` itself for ``none``, else a Pipeline (normalise, head): what is saved and applied."""
    if kind == "none":
        return est
    return Pipeline([("norm", FeatureNorm(kind)), ("head", est)])


def _names(value: str | Sequence[str] | None, auto: Sequence[str]) -> list[str]:
    if value is None or value == "auto":
        return list(auto)
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v and v.strip()]
    return list(dict.fromkeys(names))


TRAIN_VIEWS = ("auto", "on", "off")


def candidates(view: str | Sequence[str] | None, norm: str | Sequence[str] | None, available: Sequence[str],
               *, cache_name: str, train_views: str = "off", stored_views: int = 0) -> list[tuple[str, str, int]]:
    """(view, norm, augmented views) to score: ``auto`` = every view the cache has x ``AUTO_NORMS`` (none)
    x (without, with the cache's augmented training views when it has them)."""
    views = _names(view, available)
    missing = [v for v in views if v not in available]
    if missing:
        raise FeatxError(f"--view {','.join(missing)}: cache {cache_name} has the views {', '.join(available)}; "
                         "choose among them, or embed with --views stages,gem (and --tta flip)")
    if not views:
        raise FeatxError(f"--view {view!r}: expected auto or a comma list of {', '.join(available)}")
    norms = _names(norm, AUTO_NORMS)
    bad = [n for n in norms if n not in NORMS]
    if bad or not norms:
        raise FeatxError(f"--norm {','.join(bad) or repr(norm)}: expected auto or a comma list of {', '.join(NORMS)}")
    return [(v, n, k) for v in views for n in norms for k in _train_views(train_views, stored_views, cache_name)]


def _train_views(mode: str, stored: int, cache_name: str) -> list[int]:
    if mode not in TRAIN_VIEWS:
        raise FeatxError(f"--train-views {mode!r}: expected one of {', '.join(TRAIN_VIEWS)}")
    if mode == "on" and not stored:
        raise FeatxError(f"--train-views on: cache {cache_name} stores no augmented views; embed with "
                         "`featx embed DATA --train-views 8`, or drop --train-views")
    return {"off": [0], "on": [stored], "auto": [0, stored] if stored else [0]}[mode]


@dataclass
class Candidate:
    """One row of the per-view table: a (view, norm) and its CV search on the training rows."""

    view: str
    norm: str
    train_views: int  # augmented views per training image trained on (0: the plain rows only)
    dim: int
    cv_score: float
    cv_std_err: float  # standard error of the mean CV score over the folds
    params: dict
    fit_seconds: float
    # Repeated paired CV (featx.heads.repeated_cv): mean difference to the chosen candidate over the
    # same folds, its standard error, folds scored, and the repeat after which it was dropped.
    paired_margin: float | None = None
    paired_se: float | None = None
    folds_scored: int | None = None
    dropped_after_repeat: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def best_index(table: Sequence[Candidate]) -> int:
    """The first candidate within one standard error of the best CV score (NaN scores never win)."""
    scores = np.array([c.cv_score if np.isfinite(c.cv_score) else -np.inf for c in table])
    top = int(np.argmax(scores))
    se = table[top].cv_std_err if np.isfinite(table[top].cv_std_err) else 0.0
    return int(np.flatnonzero(scores >= scores[top] - se)[0])


def fold_std_err(search) -> float:
    """Standard error of a fitted search's best mean CV score (its per-fold scores' std / sqrt(folds))."""
    cv = getattr(search, "cv_results_", None)
    if not cv:
        return float("nan")
    i = int(getattr(search, "best_index_", np.argmax(cv["mean_test_score"])))
    folds = [np.asarray(v)[i] for k, v in cv.items() if k.startswith("split") and k.endswith("_test_score")]
    if len(folds) < 2:
        return float("nan")
    return float(np.std(folds, ddof=1) / np.sqrt(len(folds)))
