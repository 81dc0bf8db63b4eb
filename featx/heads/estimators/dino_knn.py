"""DINO-style weighted kNN: cosine similarity, top-k neighbours, votes weighted by exp(sim / T).

This is the kNN protocol of DINO (Caron et al. 2021, ``eval_knn.py``) and DINOv2: neighbours
that are much closer than the rest dominate the vote, which makes k far less critical than in
a uniform-vote kNN and often helps on CNN features too.  A plain scikit-learn estimator so that
``GridSearchCV``, ``Pipeline``, ``clone`` and joblib work on it unchanged; its CV search is the one
every head has (:func:`featx.heads.tuning.factory.create_head` with ``knn_dino``).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ...base.errors import FeatxError
from ...cache.views import l2_rows
from ...config import DEFAULT_GRIDS

# A small grid: DINO uses k=20, T=0.07; k matters little once votes are similarity-weighted.
# The one default grid, typed in featx.config (the `heads: knn_dino:` section).
DINO_KNN_GRID: dict[str, list] = DEFAULT_GRIDS["knn_dino"]
# Rows of the query matrix scored at once (keeps the similarity block at ~ block x n_train floats).
_BLOCK = 2048


def _unit_rows(X) -> np.ndarray:
    """Rows at unit L2 length (all-zero rows stay zero), as float32."""
    return l2_rows(np.asarray(X, dtype=np.float32))


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
        self.train_ = _unit_rows(X)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Normalised similarity-weighted votes, columns in the order of ``classes_``."""
        check_is_fitted(self, "train_")
        X = _unit_rows(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]))
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

