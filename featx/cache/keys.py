"""Names inside a cache: row keys (file-system bytes), augmented-view keys, dataset paths, the cache's file name."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from ..base.choices import SPLITS  # noqa: F401 - the cache's split names, re-exported

LAYOUT_VERSION = 1
STR_DTYPE = h5py.string_dtype("utf-8")
# Keys of augmented training views: the image's key, this separator, the recipe and view number
# (featx.embedding.engines.augment); such rows are kept in the finished cache's augmented/ group.
AUG_SEP = "\x00aug:"
# The file of a set of several backbones' caches of one data set (featx.cache.multi).
MULTI_SUFFIX = ".multi.json"


def image_key(key: str) -> str:
    """The key of the image an augmented-view key shows (a plain image's key is its own)."""
    return key.split(AUG_SEP, 1)[0]
BYTES_DTYPE = h5py.vlen_dtype(np.dtype("uint8"))


# --------------------------------------------------------------------------- atomic files








def fingerprint_digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def encode_key(key: str) -> np.ndarray:
    return np.frombuffer(os.fsencode(key), dtype=np.uint8)


def decode_key(raw) -> str:
    return os.fsdecode(bytes(raw))


def key_array(keys: Sequence[str]) -> np.ndarray:
    arr = np.empty(len(keys), dtype=object)
    for i, k in enumerate(keys):
        arr[i] = encode_key(k)
    return arr


def default_cache_path(cache_dir: str | os.PathLike, root: str, backbone: str, fingerprint: dict) -> Path:
    """``cache_dir/<dataset>__<backbone>__<fp10>.h5``: readable, and unique per settings."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "data"  # noqa: E731
    name = Path(root).name or "data"
    where = root if "://" in root else str(Path(root).resolve())  # a URL (featx.data.remote) is already absolute
    root_tag = hashlib.sha256(where.encode()).hexdigest()[:6]
    digest = fingerprint_digest(fingerprint)[:10]
    return Path(cache_dir) / f"{slug(name)}-{root_tag}__{slug(backbone)}__{digest}.h5"


# --------------------------------------------------------------------------- chunk files


def part_path(name: str) -> str:
    return name if name == "features" else f"parts/{name}"
