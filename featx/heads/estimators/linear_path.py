"""Linear heads for the CPU that search C along a warm-started regularisation path.

Why: scikit-learn's grid search fits every C from scratch, and ``LinearSVC`` at large C on
separable CNN features needs thousands of epochs (689 s for flowers12's 17 x 5 fits).  Here
each CV fold walks the C grid from small to large, starting every fit from the previous
solution (L-BFGS, float32 matrix products), and the walk stops once the mean CV score has
not improved for ``patience`` grid steps (the costly, nearly hard-margin fits at large C are
then never run).  With fewer rows than features every fold is solved exactly in the row
space of its training rows (an SVD), a smaller problem with the same solution.

The models are those of :func:`featx.heads.create_head`'s pipelines: standardise, then
multinomial logistic regression (``loss="logistic"``; intercept not penalised; one logit for
two classes) or the one-vs-rest squared-hinge L2 SVM of ``LinearSVC`` (``loss="squared_hinge"``;
penalised intercept).  Folds come from :func:`featx.heads.tuning.cv.cv_splits`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from joblib import effective_n_jobs
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from ...base.errors import FeatxError
from ..tuning.cv import cv_splits, cv_summary, score_predictions
from ..tuning.grids import SMALL_PROBLEM
from ..tuning.memory import available_bytes
from .scores import softmax_of_scores

log = logging.getLogger(__name__)

LOSSES = ("logistic", "squared_hinge")


def _objective(Z: np.ndarray, yi: np.ndarray, n_out: int, C: float, loss: str):
    """f(w) = mean loss + ||W||^2 / (2 C n) and its gradient, W of shape [r + 1, n_out]."""
    n, r1 = Z.shape
    pen = np.ones((r1, 1), np.float32)
    if loss == "logistic":
        pen[-1] = 0.0  # the intercept is not penalised (LogisticRegression)
    reg = 1.0 / (C * n)
    if n_out == 1:
        Y = (yi == 1).astype(np.float32)[:, None]
    else:
        Y = np.zeros((n, n_out), np.float32)
        Y[np.arange(n), yi] = 1.0

    def fun(w: np.ndarray):
        W = w.reshape(r1, n_out).astype(np.float32)
        z = Z @ W
        if loss == "logistic" and n_out == 1:
            f = np.logaddexp(0, z).sum() - (Y * z).sum()
            G = 1.0 / (1.0 + np.exp(-z)) - Y
        elif loss == "logistic":
            zmax = z.max(1, keepdims=True)
            e = np.exp(z - zmax)
            s = e.sum(1, keepdims=True)
            f = (np.log(s) + zmax).sum() - (Y * z).sum()
            G = e / s - Y
        else:
            sgn = 2 * Y - 1
            h = np.maximum(0, 1 - sgn * z)
            f = (h * h).sum()
            G = -2 * h * sgn
        WP = W * pen
        f = float(f) / n + 0.5 * reg * float((WP * W).sum())
        g = (Z.T @ G) / n + reg * WP
        return f, g.ravel().astype(np.float64)

    return fun


def _solve(Z, yi, n_out, C, loss, w0, *, tol: float, max_iter: int) -> tuple[np.ndarray, int]:
    res = minimize(
        _objective(Z, yi, n_out, C, loss), w0.ravel().astype(np.float64), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-10},
    )
    return res.x.reshape(w0.shape).astype(np.float32), int(res.nit)


def _design(X: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised ``X[rows]`` with a column of ones, built block by block (one copy, no temporaries).

    Returns (Z [n, d + 1], mean, scale) with StandardScaler's statistics of those rows.
    """
    n = len(X) if rows is None else len(rows)
    d = X.shape[1]
    Z = np.empty((n, d + 1), np.float32)
    for a in range(0, n, 4096):
        Z[a : a + 4096, :d] = X[a : a + 4096] if rows is None else X[rows[a : a + 4096]]
    mean = Z[:, :d].mean(0, dtype=np.float64).astype(np.float32)
    scale = Z[:, :d].std(0, dtype=np.float64).astype(np.float32)
    scale[scale == 0] = 1.0
    for a in range(0, n, 4096):
        Z[a : a + 4096, :d] -= mean
        Z[a : a + 4096, :d] /= scale
    Z[:, d] = 1.0
    return Z, mean, scale


def _reduce(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows in the basis of their own span when there are fewer rows than features (exact).

    The penalty only sees the weights' component in the rows' span (the rest cannot lower the
    loss), so solving for ``z`` in ``w = V z`` gives the same model on a smaller problem.
    """
    n, d1 = Z.shape
    if n >= d1 - 1:
        return Z, None
    # The row space from the n x n Gram matrix (eigh: about half an SVD's time), in float64 so that
    # the squared singular values keep float32's precision; directions with s^2 below 1e-12 of
    # the largest carry nothing a float32 product could resolve and are left out.
    A = Z[:, :-1].astype(np.float64)
    lam, U = np.linalg.eigh(A @ A.T)
    keep = lam > max(float(lam[-1]), 0.0) * 1e-12
    U, S = U[:, keep][:, ::-1], np.sqrt(lam[keep][::-1])
    out = np.empty((n, len(S) + 1), np.float32)
    out[:, :-1] = U * S
    out[:, -1] = 1.0
    return out, ((A.T @ U) / S).astype(np.float32)


# The folds' standardised designs are kept between C values while all of them together stay
# below this and half the free memory (rebuilding one costs a copy and two passes over it per
# C value); otherwise one is held at a time, as memory.probe_bytes assumes.
KEEP_FOLDS_BYTES = 512 << 20


def _can_keep(nbytes: int) -> bool:
    """Whether the folds' designs may stay in memory: small, and at most half of what is free."""
    free = available_bytes()
    return nbytes <= KEEP_FOLDS_BYTES and (free is None or nbytes <= free // 2)


def _map(fn, n: int, jobs: int) -> list:
    """``fn(k)`` for k < n, on ``jobs`` threads (the products release the GIL), results in order."""
    if jobs <= 1:
        return [fn(k) for k in range(n)]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(fn, range(n)))


class _Fold:
    """One CV fold: its training design, kept if ``keep`` (or reduced, hence small), else rebuilt per use."""

    def __init__(self, X: np.ndarray, tr: np.ndarray, va: np.ndarray, *, keep: bool) -> None:
        self.X, self.tr, self.va = X, tr, va
        self.reduced = len(tr) < X.shape[1]
        self._kept = self._build() if self.reduced or keep else None

    def _build(self):
        Z, mean, scale = _design(self.X, self.tr)
        Z, V = _reduce(Z)
        return Z, mean, scale, V

    def design(self):
        """(Z, mean, scale, V): the standardised (and, with few rows, reduced) training rows."""
        return self._kept if self._kept is not None else self._build()

    def decision(self, W: np.ndarray, mean, scale, V) -> np.ndarray:
        """Validation scores from the fold's weights, without a standardised copy of its rows."""
        Wd = W[:-1] if V is None else V @ W[:-1]
        coef = Wd / scale[:, None]
        return self.X[self.va] @ coef + (W[-1] - mean @ coef)


class PathLinearHead(ClassifierMixin, BaseEstimator):
    """Standardise + L2 linear classifier, C chosen by CV along a warm-started path.

    ``Cs``: the grid (searched in increasing order); ``patience``: grid steps without a better
    mean CV score after which larger C values are skipped (None searches them all).
    After ``fit``: ``best_params_``, ``best_score_``, ``cv_results_``, ``n_candidates_``
    (values actually fitted), ``coef_``, ``intercept_``, ``classes_``; for the squared hinge
    with ``probability=True``, ``calibration_`` (out-of-fold Platt sigmoids, as
    ``CalibratedClassifierCV(ensemble=False)``) makes ``predict_proba`` available.
    ``n_jobs``: threads that solve the CV folds of one C value side by side (each fold keeps its
    own warm start, so the result does not depend on it; -1: one per core, None: 1).
    """

    def __init__(
        self, *, loss: str = "logistic", Cs=(1.0,), folds: int = 5, seed: int = 0, scoring: str = "accuracy",
        patience: int | None = 4, tol: float = 1e-4, max_iter: int = 500, probability: bool = True,
        n_jobs: int | None = None,
    ) -> None:
        self.loss = loss
        self.Cs = Cs
        self.folds = folds
        self.seed = seed
        self.scoring = scoring
        self.patience = patience
        self.tol = tol
        self.max_iter = max_iter
        self.probability = probability
        self.n_jobs = n_jobs

    def _check_settings(self) -> list[float]:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        Cs = sorted(float(c) for c in np.atleast_1d(self.Cs))
        if not Cs or any(c <= 0 for c in Cs):
            raise FeatxError(f"C values must be positive, got {list(self.Cs)}")
        return Cs

    def fit(self, X, y) -> "PathLinearHead":
        """Walk the C grid on every CV fold, then refit the best C on all of (X, y)."""
        t0 = time.perf_counter()
        Cs = self._check_settings()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"the training labels have {len(self.classes_)} class; a classifier needs at least 2")
        n_out = 1 if len(self.classes_) == 2 else len(self.classes_)
        splits = cv_splits(yi, self.folds, self.seed)
        # Small problems: one BLAS thread. Their many small products otherwise spend the time in
        # thread hand-offs (20-60x slower measured on a loaded 2-core machine, benchmarks/heads.md).
        small = X.size < SMALL_PROBLEM
        # Folds on threads only where each product runs on one BLAS thread (else they would compete
        # for the same cores) and the folds' designs are kept (else each thread holds a copy).
        with threadpool_limits(1 if small else None):
            keep = _can_keep(sum(4 * len(tr) * (X.shape[1] + 1) for tr, _ in splits))
            threads = small and (keep or all(len(tr) < X.shape[1] for tr, _ in splits))
            jobs = min(len(splits), effective_n_jobs(self.n_jobs)) if threads else 1
            folds = _map(lambda k: _Fold(X, *splits[k], keep=keep), len(splits), jobs)
            scores, oof, best = self._walk(Cs, folds, yi, n_out, jobs)
            self._refit(X, yi, n_out, Cs[: best + 1])
        fitted = int(np.isfinite(scores[:, 0]).sum())
        self.cv_results_ = cv_summary([{"C": c} for c in Cs[:fitted]], scores[:fitted])
        self.best_index_ = best
        self.best_params_ = {"C": Cs[best]}
        self.best_score_ = float(self.cv_results_["mean_test_score"][best])
        self.n_candidates_, self.n_splits_ = fitted, len(splits)
        self.calibration_ = self._calibrate(oof, yi) if self.loss == "squared_hinge" and self.probability else None
        # Out-of-fold decision values at the chosen C (featx audit's label issues); rows in no validation fold: 0.
        self.oof_decision_, self.oof_seen_ = oof, np.isin(np.arange(len(yi)), np.concatenate([va for _, va in splits]))
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _walk(self, Cs, folds, yi, n_out, jobs: int):
        """CV scores [len(Cs), folds] (NaN where skipped), out-of-fold scores at the best C, its index."""
        W: list = [None] * len(folds)
        scores = np.full((len(Cs), len(folds)), np.nan)
        oof = best_oof = np.zeros((len(yi), n_out), np.float32)
        best, since, iters = -1, 0, 0

        def solve_fold(C: float, k: int):
            f = folds[k]
            Z, mean, scale, V = f.design()
            w0 = W[k] if W[k] is not None else np.zeros((Z.shape[1], n_out), np.float32)
            w, nit = _solve(Z, yi[f.tr], n_out, C, self.loss, w0, tol=self.tol, max_iter=self.max_iter)
            return w, nit, f.decision(w, mean, scale, V)

        for i, C in enumerate(Cs):
            oof = np.zeros_like(oof)
            for k, (w, nit, d) in enumerate(_map(partial(solve_fold, C), len(folds), jobs)):
                W[k] = w
                iters += nit
                oof[folds[k].va] = d
                scores[i, k] = score_predictions(self.scoring, yi[folds[k].va], _labels_of(d))
            log.debug("C path: C=%.3g, mean CV score %.4f (%d L-BFGS iterations so far)", C, scores[i].mean(), iters)
            if best < 0 or scores[i].mean() > scores[best].mean() + 1e-12:
                best, since, best_oof = i, 0, oof
            else:
                since += 1
                if self.patience is not None and since >= self.patience:
                    log.info("C path: no better CV score for %d steps after C=%.3g; skipping larger C", since, Cs[best])
                    break
        self.n_iter_ = iters
        return scores, best_oof, best

    def _refit(self, X, yi, n_out, path) -> None:
        Z, mean, scale = _design(X, None)
        Z, V = _reduce(Z)
        W = np.zeros((Z.shape[1], n_out), np.float32)
        for C in path[-3:]:  # warm start from two grid steps below
            W, _ = _solve(Z, yi, n_out, C, self.loss, W, tol=self.tol, max_iter=max(self.max_iter, 1000))
        Wd = W[:-1] if V is None else V @ W[:-1]
        self.coef_ = (Wd / scale[:, None]).T
        self.intercept_ = W[-1] - (mean / scale) @ Wd

    def _calibrate(self, oof: np.ndarray, yi: np.ndarray) -> np.ndarray:
        """Platt (a, b) per output on out-of-fold decision values (rows never in a test fold left out)."""
        seen = np.zeros(len(yi), bool)
        for tr, va in cv_splits(yi, self.folds, self.seed):
            seen[va] = True
        d, y = oof[seen], yi[seen]
        targets = [(y == 1)] if oof.shape[1] == 1 else [(y == k) for k in range(oof.shape[1])]
        return np.array([platt(d[:, min(k, d.shape[1] - 1)], t) for k, t in enumerate(targets)], np.float64)

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        d = X.astype(np.float64) @ self.coef_.T.astype(np.float64) + self.intercept_.astype(np.float64)
        return d[:, 0] if d.shape[1] == 1 else d

    def predict(self, X) -> np.ndarray:
        d = self.decision_function(X)
        return self.classes_[(d > 0).astype(int) if d.ndim == 1 else d.argmax(1)]

    def predict_proba(self, X) -> np.ndarray:
        d = self.decision_function(X)
        if self.loss == "logistic":
            return _binary(1 / (1 + np.exp(-d))) if d.ndim == 1 else softmax_of_scores(d)
        if self.calibration_ is None:
            return softmax_of_scores(d)
        a, b = self.calibration_[:, 0], self.calibration_[:, 1]
        if d.ndim == 1:
            return _binary(1 / (1 + np.exp(a[0] * d + b[0])))
        p = 1 / (1 + np.exp(a * d + b))
        s = p.sum(1, keepdims=True)
        return np.where(s > 0, p / np.where(s > 0, s, 1), 1.0 / d.shape[1])

    @property
    def params_(self) -> dict:
        """The chosen hyperparameters, e.g. ``{"C": 0.003}``."""
        return dict(self.best_params_)


def _binary(p1: np.ndarray) -> np.ndarray:
    return np.stack([1 - p1, p1], 1)


def _labels_of(d: np.ndarray) -> np.ndarray:
    return (d[:, 0] > 0).astype(int) if d.shape[1] == 1 else d.argmax(1)


def platt(d: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Platt's sigmoid 1 / (1 + exp(a d + b)) fitted by log loss with his smoothed targets."""
    pos = int(target.sum())
    neg = len(target) - pos
    t = np.where(target, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))
    d = d.astype(np.float64)

    def fun(ab):
        z = ab[0] * d + ab[1]
        # p = 1 / (1 + e^z); loss = -t log p - (1 - t) log(1 - p)
        loss = t * np.logaddexp(0, z) + (1 - t) * np.logaddexp(0, -z)
        p = 1 / (1 + np.exp(z))
        g = t - p  # d loss / dz
        return loss.sum(), np.array([(g * d).sum(), g.sum()])

    res = minimize(fun, np.array([0.0, np.log((neg + 1.0) / (pos + 1.0))]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])
