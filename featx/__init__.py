"""featx: frozen pretrained CNN embeddings cached to HDF5, scikit-learn heads on top.

The stages are plain functions (``featx.embed``, ``featx.probe``, ``featx.compare``) and
scikit-learn compatible objects; the ``featx`` command line is a thin layer over them.
"""

from __future__ import annotations

from .base.version import __version__

import logging as _logging

from .base.errors import CacheLockedError, CacheMismatchError, FeatxError


_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "__version__",
    "FeatxError",
    "CacheMismatchError",
    "CacheLockedError",
    "embed",
    "FeatureCache",
    "create_backbone",
    "list_backbones",
    "discover",
    "probe",
    "compare",
    "create_head",
    "FeatureExtractor",
    "fewshot",
    "write_report",
    "export_cache",
    "log_run",
    "DinoKNNClassifier",
]

_LAZY = {
    "embed": ("featx.embedding.runner", "embed"),
    "FeatureCache": ("featx.cache.store", "FeatureCache"),
    "create_backbone": ("featx.embedding.backbones", "create_backbone"),
    "list_backbones": ("featx.embedding.backbones", "list_backbones"),
    "discover": ("featx.data.folders", "discover"),
    "probe": ("featx.heads.probing", "probe"),
    "create_head": ("featx.heads.factory", "create_head"),
    "fewshot": ("featx.heads.fewshot", "fewshot"),
    "DinoKNNClassifier": ("featx.heads.dino_knn", "DinoKNNClassifier"),
    "write_report": ("featx.report.html", "write_report"),
    "export_cache": ("featx.cache.export", "export_cache"),
    "log_run": ("featx.report.tracking", "log_run"),
    "FeatureExtractor": ("featx.embedding.extractor", "FeatureExtractor"),
    "compare": ("featx.finetune.comparison", "compare"),
}


def __getattr__(name: str):
    # Lazy so that `import featx` stays fast and does not import torch until needed.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
