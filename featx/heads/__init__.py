"""Stage 4, heads: logistic regression, SVM and kNN on cached features, tuned by CV on training rows.

Estimators and their search only; the probe and few-shot runs that drive them are in :mod:`featx.runs`.
"""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "HEAD_NAMES": "tuning.grids",
    "KERNELS": "tuning.grids",
    "resolve_grids": "tuning.grids",
    "check_head_compatible": "saved.persist",
    "load_head": "saved.persist",
    "save_head": "saved.persist",
    "create_head": "tuning.factory",
    "grid_key": "tuning.factory",
    "cv_splits": "tuning.cv",
    "HeadSearch": "tuning.cv",
    "PathLinearHead": "estimators.linear_path",
    "scores_of": "estimators.scores",
    "draw_shots": "estimators.fewshot",
    "fit_in_draw": "estimators.fewshot",
    "DinoKNNClassifier": "estimators.dino_knn",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
