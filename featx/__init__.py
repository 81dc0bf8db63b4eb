"""featx: frozen pretrained CNN embeddings cached to HDF5, scikit-learn heads on top.

The stages are plain functions (``featx.embed``, ``featx.probe``, ``featx.compare``) and
scikit-learn compatible objects; the ``featx`` command line is a thin layer over them.
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging as _logging

from .errors import CacheLockedError, CacheMismatchError, FeatxError

# Bound eagerly: the submodule ``featx.embed`` would otherwise shadow the function of the
# same name as soon as anything imports the module.
from .embed import embed  # noqa: E402

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
]

_LAZY = {
    "FeatureCache": ("featx.cache", "FeatureCache"),
    "create_backbone": ("featx.backbones", "create_backbone"),
    "list_backbones": ("featx.backbones", "list_backbones"),
    "discover": ("featx.data", "discover"),
    "probe": ("featx.heads", "probe"),
    "create_head": ("featx.heads", "create_head"),
    "FeatureExtractor": ("featx.extractor", "FeatureExtractor"),
    "compare": ("featx.comparison", "compare"),
}


def __getattr__(name: str):
    # Lazy so that `import featx` stays fast and does not import torch until needed.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
