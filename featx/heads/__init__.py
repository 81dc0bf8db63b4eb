"""Stage 4, heads: logistic regression, SVM and kNN on cached features, tuned by CV on training rows."""

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
    "ProbeResult": "probing",
    "probe": "probing",
    "fewshot": "fewshot",
    "FewShotResult": "fewshot",
    "DinoKNNClassifier": "dino_knn",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
