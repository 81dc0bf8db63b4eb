"""Class scores of a fitted head, the one way every stage asks for them."""

from __future__ import annotations

import numpy as np


def scores_of(est, X) -> np.ndarray | None:
    """Class scores of a fitted head: probabilities where it has them, else decision values."""
    if hasattr(est, "predict_proba"):
        return np.asarray(est.predict_proba(X))
    if hasattr(est, "decision_function"):
        d = np.asarray(est.decision_function(X))
        return np.stack([-d, d], axis=1) if d.ndim == 1 else d
    return None
