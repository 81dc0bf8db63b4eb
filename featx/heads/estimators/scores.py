"""Class scores of a fitted head, the one way every stage asks for them."""

from __future__ import annotations

import numpy as np


def softmax_of_scores(d: np.ndarray) -> np.ndarray:
    """Rows of decision values as probabilities (binary 1-D scores become two columns)."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim == 1:
        d = np.stack([-d, d], axis=1)
    d = d - d.max(axis=1, keepdims=True)
    e = np.exp(d)
    return e / e.sum(axis=1, keepdims=True)


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows of class scores as probabilities: kept when they already are, else a softmax."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = np.stack([-s, s], axis=1)
    if s.size and s.min() >= 0 and s.max() <= 1 and np.allclose(s.sum(axis=1), 1.0, atol=1e-3):
        return s
    return softmax_of_scores(s)


def scores_of(est, X) -> np.ndarray | None:
    """Class scores of a fitted head: probabilities where it has them, else decision values."""
    if hasattr(est, "predict_proba"):
        return np.asarray(est.predict_proba(X))
    if hasattr(est, "decision_function"):
        d = np.asarray(est.decision_function(X))
        return np.stack([-d, d], axis=1) if d.ndim == 1 else d
    return None
