"""The cache's public names in one place: ``from featx.cache.store import FeatureCache`` keeps working.

The cache is split by job: :mod:`.keys` (row keys, dataset paths, file names), :mod:`.parts` (chunk
files), :mod:`.final` (the finished HDF5), :mod:`.reader` (:class:`FeatureCache`, ``find_cache``) and
:mod:`.locks`.  Code inside featx imports from those modules; this one is the stable import path.
"""

from .final import read_final_index, write_final
from .keys import (
    AUG_SEP,
    LAYOUT_VERSION,
    SPLITS,
    decode_key,
    default_cache_path,
    encode_key,
    fingerprint_digest,
    image_key,
)
from .locks import PartsLock, acquire_lock
from .parts import Chunk, PartsDir
from .reader import FeatureCache, find_cache

__all__ = [
    "AUG_SEP", "LAYOUT_VERSION", "SPLITS", "Chunk", "FeatureCache", "PartsDir", "PartsLock", "acquire_lock",
    "decode_key", "default_cache_path", "encode_key", "find_cache", "fingerprint_digest", "image_key",
    "read_final_index", "write_final",
]
