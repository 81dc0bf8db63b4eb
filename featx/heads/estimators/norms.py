"""Row-wise feature normalisations applied before a head's own scaling: ``none``, ``l2``, ``power``.

Why its own module: the probe's selection (:mod:`featx.heads.tuning.selection`) chooses among them by CV,
and the streamed heads (:mod:`featx.heads.stream.source`) apply them while reading rows; both import them
from here.  The unit-length rows are :func:`featx.cache.views.l2_rows`, the one L2 normaliser.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from ...base.errors import FeatxError
from ...cache.views import l2_rows

NORMS = ("none", "l2", "power")


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
        return l2_rows(X)
