"""Features of chosen rows of a cache, read block by block (never a whole split at once)."""

from __future__ import annotations

import numpy as np

from .reader import FeatureCache

# Rows read from the cache per block: a few tens of MB, so reading never needs twice the features.
READ_BLOCK_BYTES = 32 << 20



def read_rows(fc: FeatureCache, rows: np.ndarray, splits: np.ndarray, *, view: str | None = None) -> np.ndarray:
    """float32 features (of ``view``) of sorted global ``rows``, read in blocks (never a whole split at once).

    ``splits``: the cache's per-row split names (each split is one contiguous run of rows).
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    dim = fc.view_dim(view)
    out = np.empty((len(rows), dim), dtype=np.float32)
    block = max(256, READ_BLOCK_BYTES // max(1, 4 * dim))
    for name in fc.splits:
        in_split = np.flatnonzero(splits == name)
        a, b = int(in_split[0]), int(in_split[-1]) + 1
        lo, hi = np.searchsorted(rows, [a, b])
        if lo == hi:
            continue
        start = a
        for chunk in fc.iter_features(name, rows=block, view=view):
            c_lo, c_hi = np.searchsorted(rows, [start, start + len(chunk)])
            out[c_lo:c_hi] = chunk[rows[c_lo:c_hi] - start]
            start += len(chunk)
    return out
