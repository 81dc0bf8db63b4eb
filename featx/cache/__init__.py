"""Stage 3, cache: committed chunk files and the self-describing HDF5 feature cache."""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "Chunk": "parts",
    "FeatureCache": "reader",
    "PartsDir": "parts",
    "PartsLock": "locks",
    "acquire_lock": "locks",
    "find_cache": "reader",
    "write_final": "final",
    "read_rows": "rows",
    "export_cache": "export",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
