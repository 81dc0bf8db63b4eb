"""featx: frozen pretrained CNN embeddings cached to HDF5, scikit-learn heads on top.

The stages are plain functions (``featx.embed``, ``featx.probe``, ``featx.compare``) and
scikit-learn compatible objects; the ``featx`` command line is a thin layer over them.
"""

from __future__ import annotations

import logging as _logging

from .base.errors import CacheLockedError, CacheMismatchError, FeatxError
from .base.lazy import lazy_exports
from .base.version import __version__

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# Lazy, so that `import featx` stays fast and does not import torch until needed: name -> module.
_EXPORTS = {
    "embed": "embedding.runner",
    "FeatureCache": "cache.store",
    "create_backbone": "embedding.backbones",
    "list_backbones": "embedding.backbones",
    "discover": "data.folders",
    "probe": "runs.probe",
    "ProbeResult": "runs.probe",
    "compare": "runs.compare",
    "CompareResult": "finetune.results",
    "create_head": "heads.tuning.factory",
    "FeatureExtractor": "embedding.extractor",
    "fewshot": "runs.fewshot",
    "FewShotResult": "runs.fewshot",
    "predict": "runs.predict",
    "write_report": "report.html",
    "export_cache": "cache.export",
    "log_run": "report.tracking",
    "DinoKNNClassifier": "heads.estimators.dino_knn",
    "export_model": "runs.export_model",
}

__all__ = ["__version__", "FeatxError", "CacheMismatchError", "CacheLockedError", *_EXPORTS]
__getattr__ = lazy_exports(__name__, _EXPORTS)
