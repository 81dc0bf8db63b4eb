"""Stage 4, heads: logistic regression, SVM and kNN on cached features, tuned by CV on training rows.

Estimators and their search only; the probe and few-shot runs that drive them are in :mod:`featx.runs`.
"""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "HEAD_NAMES": "grids",
    "KERNELS": "grids",
    "resolve_grids": "grids",
    "check_head_compatible": "persist",
    "load_head": "persist",
    "save_head": "persist",
    "create_head": "factory",
    "grid_key": "factory",
    "cv_splits": "search",
    "HeadSearch": "search",
    "PathLinearHead": "linear_path",
    "scores_of": "scores",
    "draw_shots": "fewshot",
    "fit_in_draw": "fewshot",
    "DinoKNNClassifier": "dino_knn",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
