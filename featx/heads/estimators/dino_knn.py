"""DINO-style weighted kNN: cosine similarity, top-k neighbours, votes weighted by exp(sim / T).

This is the kNN protocol of DINO (Caron et al. 2021, ``eval_knn.py``) and DINOv2: neighbours
that are much closer than the rest dominate the vote, which makes k far less critical than in
a uniform-vote kNN and often helps on CNN features too.  A plain scikit-learn estimator so that
``GridSearchCV``, ``Pipeline``, ``clone`` and joblib work on it unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ...base.errors import FeatxError
from ...config import DEFAULT_GRIDS

# A small grid: DINO uses k=20, T=0.07; k matters little once votes are similarity-weighted.
# The one default grid, typed in featx.config (the `heads: knn_dino:` section).
DINO_KNN_GRID: dict[str, list] = DEFAULT_GRIDS["knn_dino"]
# Rows of the query matrix scored at once (keeps the similarity block at ~ block x n_train floats).
_BLOCK = 2048


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as float32."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


class DinoKNNClassifier(ClassifierMixin, BaseEstimator):
    """Weighted kNN on cosine similarity: ``p(c | x) ∝ Σ_{j in top-k(x), y_j = c} exp(s(x, x_j) / T)``.

    ``n_neighbors`` (k) is capped at the number of training rows; ``temperature`` (T) > 0.
    Fitted attributes: ``classes_``, ``train_`` (L2-normalised training rows), ``y_idx_``
    (training labels as indices into ``classes_``), ``n_features_in_``.
    """

    def __init__(self, n_neighbors: int = 20, temperature: float = 0.07) -> None:
        self.n_neighbors = n_neighbors
        self.temperature = temperature

    def fit(self, X, y) -> "DinoKNNClassifier":
        if not (isinstance(self.n_neighbors, (int, np.integer)) and self.n_neighbors >= 1):
            raise FeatxError(f"DinoKNNClassifier: n_neighbors must be an integer >= 1, got {self.n_neighbors!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise FeatxError(f"DinoKNNClassifier: temperature must be a positive number, got {self.temperature!r}")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, self.y_idx_ = np.unique(y, return_inverse=True)
        self.train_ = l2_normalise(X)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Normalised similarity-weighted votes, columns in the order of ``classes_``."""
        check_is_fitted(self, "train_")
        X = l2_normalise(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]))
        k = min(int(self.n_neighbors), len(self.train_))
        n_cls = len(self.classes_)
        out = np.zeros((len(X), n_cls), dtype=np.float64)
        for start in range(0, len(X), _BLOCK):
            sim = X[start:start + _BLOCK] @ self.train_.T
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < sim.shape[1] else np.broadcast_to(
                np.arange(sim.shape[1]), sim.shape
            )
            top_sim = np.take_along_axis(sim, top, axis=1).astype(np.float64)
            # Subtracting the row maximum leaves the normalised votes unchanged and avoids overflow at small T.
            w = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / float(self.temperature))
            votes = np.zeros((len(top), n_cls), dtype=np.float64)
            np.add.at(votes, (np.arange(len(top))[:, None], self.y_idx_[top]), w)
            out[start:start + len(top)] = votes
        return out / out.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def dino_knn_search(
    *,
    grid: dict[str, Sequence] | None = None,
    folds: int = 5,
    seed: int = 0,
    n_jobs: int | None = None,
    scoring: str = "accuracy",
) -> GridSearchCV:
    """An unfitted ``GridSearchCV`` over ``DINO_KNN_GRID`` (or ``grid``) with stratified, seeded folds.

    The search sees only the rows passed to ``fit`` (the training rows), never the evaluation split.
    """
    if folds < 2:
        raise FeatxError(f"--folds must be at least 2 for the DINO kNN search, got {folds}")
    params = {k: list(v) for k, v in (grid or DINO_KNN_GRID).items()}
    unknown = set(params) - {"n_neighbors", "temperature"}
    if unknown:
        raise FeatxError(f"DINO kNN grid: unknown parameter(s) {sorted(unknown)}; it searches n_neighbors, temperature")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return GridSearchCV(DinoKNNClassifier(), params, cv=cv, scoring=scoring, n_jobs=n_jobs, refit=True)
