"""Stage 3, cache: committed chunk files and the self-describing HDF5 feature cache."""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "Chunk": "store",
    "FeatureCache": "store",
    "PartsDir": "store",
    "acquire_lock": "store",
    "find_cache": "store",
    "write_final": "store",
    "export_cache": "export",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
