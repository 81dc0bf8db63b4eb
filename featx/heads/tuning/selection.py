"""Choosing the feature view and normalisation of a head by cross-validation.

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

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.pipeline import Pipeline

from ...base.choices import TRAIN_VIEWS
from ...base.errors import FeatxError
from ..estimators.norms import NORMS, FeatureNorm  # noqa: F401 - FeatureNorm: saved heads name it here
from .cv import plain
from .factory import create_head
from .rows import TrainingRows

log = logging.getLogger(__name__)

# --norm auto: only the head's own scaling.  Power-norm measured no gain for logreg/SVM on
# flowers12 and hymenoptera with the full training set, and CV picked it for kNN on flowers12
# (+1.0 pt CV) where it lost 1.7 pt on the test split (ACCURACY.md); --norm none,l2,power lets CV choose.
AUTO_NORMS = ("none",)


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
    # Repeated paired CV (featx.heads.tuning.repeated_cv): mean difference to the chosen candidate over the
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


@dataclass(frozen=True)
class SearchPlan:
    """How every candidate of one head is searched: the same grid, CV folds, seed and jobs for each."""

    name: str
    kernel: str
    grid: dict
    scoring: str
    max_iter: int
    folds: int  # as asked (--folds); the search adapts them to the smallest class
    folds_used: int  # what the fold plan uses (data.splits.plan_folds), for the log
    seed: int
    n_jobs: int | None
    device: str
    candidates: tuple[tuple[str, str, int], ...]
    # Passes over the training rows of a streamed fit (ProbeSettings.stream_epochs, featx.heads.stream.linear).
    stream_epochs: int | None = None
    # Several plain candidates: repeats of the paired CV that chooses among them (featx.heads.tuning.repeated_cv;
    # 1 = one full search per candidate), and its proxy scores shared by the heads of one probe.
    cv_repeats: int = 1
    memo: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Selection:
    """The chosen candidate, fitted: the head (``est``), its inner CV search, every candidate's row, which one won."""

    est: Any
    inner: Any
    table: list[Candidate]
    chosen: int
    seconds: float
    choice: dict | None = None  # the repeated paired CV's record, when it chose (featx.heads.tuning.repeated_cv)

    @property
    def row(self) -> Candidate:
        return self.table[self.chosen]


def chosen_params(name: str, inner, kernel: str) -> dict:
    """The hyperparameters a fitted search chose (with the SVM's kernel)."""
    params = getattr(inner, "params_", None) or {k.split("__")[-1]: plain(v)
                                                 for k, v in getattr(inner, "best_params_", {}).items()}
    return {"kernel": kernel, **params} if name == "svm" else dict(params)


def fit_candidate(rows: TrainingRows, cand: tuple[str, str, int], plan: SearchPlan, *, refit: bool = False):
    """(fitted head, its inner CV search, Candidate row) of one (view, norm, augmented views)."""
    view, norm, k = cand
    X, y, folds = rows.training(view, k, folds=plan.folds, seed=plan.seed)
    inner = create_head(
        plan.name, kernel=plan.kernel, grid=plan.grid, folds=folds, seed=plan.seed, n_jobs=plan.n_jobs,
        device=plan.device, scoring=plan.scoring, max_iter=plan.max_iter, problem=(len(y), X.shape[1], len(np.unique(y))),
    )
    est = with_norm(inner, norm)
    what = "refitting the chosen" if refit else "fitting"
    log.info("%s %s on %d rows x %d features of view %s, norm %s%s (%d-fold CV)", what, plan.name, len(y), X.shape[1],
             view, norm, f", {k} augmented views per image" if k else "", plan.folds_used)
    t1 = time.perf_counter()
    est.fit(X, y)
    row = Candidate(view, norm, k, int(X.shape[1]), float(plain(getattr(inner, "best_score_", np.nan))),
                    fold_std_err(inner), chosen_params(plan.name, inner, plan.kernel), time.perf_counter() - t1)
    return est, inner, row


def plain_and_augmented(cands) -> tuple[list[tuple[str, str, int]], list[int], bool]:
    """The plain candidates to choose among, the augmented-view counts, and whether augmented views are forced."""
    plain_c = list(dict.fromkeys((v, n, 0) for v, n, _ in cands))
    aug = sorted({k for _, _, k in cands if k})
    forced_aug = bool(aug) and all(k for _, _, k in cands)
    if forced_aug and len(plain_c) == 1:  # nothing to choose on the plain rows
        plain_c = []
    return plain_c, aug, forced_aug


def select(rows: TrainingRows, plan: SearchPlan, *, fit: Callable = fit_candidate) -> Selection:
    """Fit the head's CV search on the candidates (view, norm, augmented views) of the training rows.

    Only training rows are used; every candidate is scored on the same folds.  Two stages, because a
    fit on the augmented views costs (1 + K) plain fits: the view and norm are chosen on the plain
    rows, then the augmented views are tried on that choice only (with ``--train-views on`` they are
    then used whatever their score).  Only the current choice is kept fitted (heads such as kNN hold
    their training rows); a choice dropped earlier is refitted (logged as such).  ``fit``: how one
    candidate is fitted, :func:`fit_candidate`'s signature (``featx.heads.stream.linear.fit_streamed`` streams).
    """
    cands = plan.candidates
    plain_c, aug, forced_aug = plain_and_augmented(cands)
    table: list[Candidate] = []
    kept: dict[int, tuple] = {}
    t0 = time.perf_counter()
    for cand in plain_c:
        _try(rows, cand, plan, table, kept, fit)
    if aug:
        chosen = table[best_index(table)] if table else None
        view, norm = (chosen.view, chosen.norm) if chosen else cands[0][:2]
        _try(rows, (view, norm, aug[-1]), plan, table, kept, fit)
    b = len(table) - 1 if forced_aug else best_index(table)
    if b not in kept:
        c = table[b]
        kept[b] = fit(rows, (c.view, c.norm, c.train_views), plan, refit=True)[:2]
    return Selection(kept[b][0], kept[b][1], table, b, time.perf_counter() - t0)


def _try(rows: TrainingRows, cand: tuple, plan: SearchPlan, table: list, kept: dict, fit: Callable) -> None:
    """Fit one candidate, add its row to ``table``; keep it fitted if it is the current choice."""
    est, inner, row = fit(rows, cand, plan)
    table.append(row)
    kept[len(table) - 1] = (est, inner)
    keep = {best_index(table)} | ({len(table) - 1} if row.train_views else set())
    for i in [i for i in kept if i not in keep]:
        del kept[i]
