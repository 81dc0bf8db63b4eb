"""The warm start of the streamed linear heads: class sums, linear discriminant analysis, hinge scaling.

Why: from zero, a thousand classes need many passes before the logits mean anything; the class
means and the within-class covariance gathered in the statistics pass give a classifier
(:func:`lda`) that the mini-batch optimisation of :mod:`featx.heads.stream.linear` only refines.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_ROWS = 2048  # held-out rows that scale a warm start: a seeded sample, across every class


def calibration_rows(rows: np.ndarray, *, seed: int) -> np.ndarray:
    """At most :data:`CALIBRATION_ROWS` of ``rows``, a seeded sample kept in order.

    Why: held-out rows come in the cache's order, often class by class, so the first 2,048 of
    50,000 would hold about 40 of a thousand classes.
    """
    if len(rows) <= CALIBRATION_ROWS:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, CALIBRATION_ROWS, replace=False))


def lda(sums: np.ndarray, cnt: np.ndarray, gram: np.ndarray, mean: np.ndarray, scale: np.ndarray):
    """(W [d, classes], b [classes]) of linear discriminant analysis in standardised units, shrunk covariance."""
    n = max(1.0, cnt.sum())
    mu = (sums / np.maximum(cnt, 1)[:, None] - mean) / scale  # class means, standardised [classes, d]
    m0 = (sums.sum(0) / n - mean) / scale
    total = (gram / n - np.outer(sums.sum(0) / n, sums.sum(0) / n)) / np.outer(scale, scale)
    p = cnt / n
    within = total - (mu - m0).T @ ((mu - m0) * p[:, None])
    within = 0.9 * within + 0.1 * np.eye(len(within)) * max(1e-6, float(np.trace(within)) / len(within))
    W = np.linalg.solve(within, mu.T)  # [d, classes]
    b = -0.5 * (mu.T * W).sum(0) + np.log(np.maximum(p, 1e-12))
    return W, b


def class_sums(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """[k, d] sums of the rows of each class (float64)."""
    out = np.zeros((k, X.shape[1]))
    order = np.argsort(y, kind="stable")
    ys = y[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    out[ys[starts]] = np.add.reduceat(X[order], starts, axis=0, dtype=np.float64)
    return out


def hinge_scaled(W: np.ndarray, b: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-classifier scores rescaled for one-vs-rest hinge losses: the winner near +1, the others below -1."""
    if not len(Z):
        return W * 0, b * 0
    s = Z[:, :-1] @ W + b
    top2 = np.sort(s, 1)[:, -2:]
    t = float(np.median(top2.mean(1)))
    a = 2.0 / max(1e-6, float(np.median(top2[:, 1] - top2[:, 0])))
    return W * a, (b - t) * a


def softmax_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The factor of least log loss for softmax ``scores`` [rows, classes] of rows labelled ``y`` (1.0 if no rows).

    Why: the Gaussian classifier's scores are far too confident on rows it was not fitted on
    (weights ~20x the regularised optimum's on dtd10), and where the softmax is saturated the
    loss has almost no curvature, so the optimisation would need thousands of passes to shrink them.
    """
    if not len(y):
        return 1.0
    best, best_t = np.inf, 1.0
    for t in np.geomspace(1e-3, 10.0, 41):
        z = t * scores
        z = z - z.max(1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))
        if nll < best:
            best, best_t = nll, float(t)
    return best_t
